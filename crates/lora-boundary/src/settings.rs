//! Typed settings parsed once at the edges (command line, TOML config): what the rest of the facade receives
//! instead of strings.
use std::fmt;
use std::str::FromStr;

use lora_metrics::Metric;

use crate::error::Error;

/// Candidate boundaries `LO-HI` (inclusive), e.g. `4-20`.
///
/// ```
/// let r: lora_boundary::settings::BoundaryRange = "4-20".parse()?;
/// assert_eq!((r.lo, r.hi), (4, 20));
/// assert_eq!(r.to_string(), "4-20");
/// # Ok::<(), lora_boundary::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundaryRange {
    /// Lowest candidate boundary.
    pub lo: usize,
    /// Highest candidate boundary.
    pub hi: usize,
}

impl FromStr for BoundaryRange {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (lo, hi) = lora_search::parse_range(s)?;
        Ok(BoundaryRange { lo, hi })
    }
}

impl fmt::Display for BoundaryRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// What the search scores candidates by: a task metric on generated answers, or the teacher-forced answer
/// log-probability alone (`logprob`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMetric {
    /// The teacher-forced proxy alone.
    LogProb,
    /// A task metric.
    Metric(Metric),
}

impl FromStr for SearchMetric {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "logprob" => Ok(SearchMetric::LogProb),
            m => Ok(SearchMetric::Metric(m.parse()?)),
        }
    }
}

/// Output format of `probe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeFormat {
    /// One line of probabilities per mask.
    Text,
    /// The full result as JSON.
    Json,
    /// One CSV row per (mask, point).
    Csv,
}

/// Serde through `Display` / `FromStr`, for setting types that are written as strings in TOML and JSON.
pub mod as_string {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the value's `Display` form.
    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Parses the value with `FromStr`.
    pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<T, D::Error>
    where
        T::Err: Display,
    {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }

    /// The same for an optional value.
    pub mod option {
        use super::*;

        /// Writes `Some` values' `Display` form, `None` as null.
        pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        /// Parses a string with `FromStr`; null or absent is `None`.
        pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error>
        where
            T::Err: Display,
        {
            Option::<String>::deserialize(d)?.map(|s| s.parse().map_err(serde::de::Error::custom)).transpose()
        }
    }
}
