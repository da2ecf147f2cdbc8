//! The search strategies, the tie rule and the `--range` parser, with their CLI names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::SearchError;

/// How candidates are explored. The default is [`Strategy::Halving`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Every boundary in `[lo, hi]` on every sample: `hi - lo + 1` full evaluations (+1 for
    /// the full-LoRA reference when it lies outside the range).
    Exhaustive,
    /// A grid with stride `s` (default `max(2, round(√K))` for `K` candidates) on all
    /// samples, then repeated refinement: with `t = ⌈t/2⌉` starting from `s` down to 1,
    /// evaluate `c ± t` and `best ± t` around the current choice `c` and the current best.
    CoarseToFine,
    /// Adaptive successive halving (the default), within a budget of full validation
    /// evaluations (default 3): full LoRA on every sample, every candidate screened on
    /// `min_samples` samples, then the sample count of one candidate at a time is multiplied
    /// by η (default 2) — always the one whose comparison the selection rule currently rests
    /// on least firmly (a boundary below the choice that might be tied, the choice itself, or
    /// a candidate that might beat the best by more than ε); candidates that are clearly out
    /// stay on their few samples. Budget for completing the choice on every sample is kept
    /// back throughout; the completed choice and full LoRA are the finalists. Estimates come
    /// from an additive fit (boundary effect + per-sample difficulty) of all scores so far.
    #[default]
    Halving,
    /// Rank the candidates by a cheap proxy scorer on all samples (every `proxy_stride`-th
    /// boundary first, then every boundary around the plateau's edges and the proxy's best,
    /// which makes the same plan as scoring them all where the proxy's plateau tests change
    /// once along the boundaries); the short list holds the proxy's plateau edges — the smallest boundary keeping all but `proxy_margin` (10%) of
    /// the proxy's rise, and the smallest not significantly below the proxy's best (paired
    /// differences) — up to `shortlist` (default 2) boundaries, evaluated with the real
    /// scorer together with the full-LoRA reference: at most `shortlist + 1` full evaluations.
    ProxyFirst,
}

impl Strategy {
    /// The CLI name (`exhaustive`, `coarse-to-fine`, `halving`, `proxy-first`).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Exhaustive => "exhaustive",
            Strategy::CoarseToFine => "coarse-to-fine",
            Strategy::Halving => "halving",
            Strategy::ProxyFirst => "proxy-first",
        }
    }

    /// All strategies, in CLI order.
    pub const ALL: [Strategy; 4] =
        [Strategy::Exhaustive, Strategy::CoarseToFine, Strategy::Halving, Strategy::ProxyFirst];
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = SearchError;

    /// Parses `exhaustive|coarse-to-fine|halving|proxy-first` (ASCII case-insensitive).
    ///
    /// ```
    /// use lora_search::Strategy;
    /// # fn main() -> Result<(), lora_search::SearchError> {
    /// assert_eq!("coarse-to-fine".parse::<Strategy>()?, Strategy::CoarseToFine);
    /// assert!("greedy".parse::<Strategy>().is_err());
    /// # Ok(())
    /// # }
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| SearchError::UnknownStrategy(s.to_string()))
    }
}

/// When two candidates count as tied (ties go to the smaller boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TieRule {
    /// `b` ties the best when `mean(b) ≥ mean(best) − ε` (the default).
    #[default]
    Epsilon,
    /// `b` ties the best when the upper end of the paired-bootstrap 95% CI of
    /// `mean(b) − mean(best)` is `≥ −ε` (the best is not significantly better by more than ε).
    BootstrapCi,
}

/// Parses a range `"LO-HI"` (inclusive), as the CLI's `--range` takes it.
///
/// ```
/// # fn main() -> Result<(), lora_search::SearchError> {
/// assert_eq!(lora_search::parse_range("4-20")?, (4, 20));
/// assert!(lora_search::parse_range("20").is_err());
/// # Ok(())
/// # }
/// ```
pub fn parse_range(s: &str) -> Result<(usize, usize), SearchError> {
    let bad = || SearchError::BadRange(s.to_string());
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    let lo = a.trim().parse::<usize>().map_err(|_| bad())?;
    let hi = b.trim().parse::<usize>().map_err(|_| bad())?;
    if lo > hi {
        return Err(SearchError::EmptyRange { lo, hi });
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_range_and_strategy() {
        assert_eq!(parse_range(" 3 - 7 ").unwrap(), (3, 7));
        assert_eq!(parse_range("7-3"), Err(SearchError::EmptyRange { lo: 7, hi: 3 }));
        assert!(matches!(parse_range("a-b"), Err(SearchError::BadRange(_))));
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>().unwrap(), s);
            assert_eq!(s.to_string(), s.name());
        }
        assert_eq!(Strategy::default(), Strategy::Halving);
    }
}
