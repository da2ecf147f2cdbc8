//! Boundary-layer detection on probe curves and automated boundary search.
//!
//! After LoRA fine-tuning, the probability of the first answer tokens (read through a
//! logit lens) rises sharply at a *boundary layer*; keeping LoRA only on decoder blocks
//! `0..=b` ("keep-through `b`") and dropping it above keeps quality (Chen et al. 2025,
//! "Not All LoRA Parameters Are Essential", arXiv 2503.23360). This crate finds `b`
//! in two ways, without libtorch:
//!
//! * **From a probe curve** — [`detect`] with a [`Detection`] method (steepest sustained
//!   rise, threshold crossing, Kneedle knee). Curve point `i` is the state after `i`
//!   blocks; a rise at point `i` is produced by block `i − 1`, which is boundary
//!   `b = i − 1`. Flat curves yield no boundary rather than an invented one.
//! * **By search on validation samples** — [`BoundarySearch`] drives a [`Scorer`]
//!   (boundary × samples → per-sample scores, higher is better) with one of four
//!   [`Strategy`] values and returns a [`SearchReport`]. Selection rule: the best mean
//!   score wins; candidates tied with it within ε go to the smaller boundary. The default,
//!   adaptive successive halving, spends at most 3 full validation evaluations.
//!
//! A model has `L` blocks; boundary `L − 1` is full LoRA, the reference every candidate is
//! compared against (paired-bootstrap 95% CI of the difference).
//!
//! ```
//! use lora_search::{BoundarySearch, Strategy};
//! use lora_search::synthetic::{Profile, SyntheticScorer};
//! # fn main() -> Result<(), lora_search::SearchError> {
//! let means = Profile::Step { at: 17, low: 0.3, high: 0.8 }.means(30);
//! let mut scorer = SyntheticScorer::new(means, 0.1, 0.05, 1);
//! let report = BoundarySearch::new(30).seed(1).run(&mut scorer, 256)?;
//! assert_eq!(report.strategy, Strategy::Halving);
//! assert_eq!(report.boundary, 17);
//! assert!(report.full_evaluations <= 3.0);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod curve;
mod error;
mod race;
pub mod rng;
mod scorer;
mod search;
mod stats;
pub mod synthetic;

pub use curve::{
    detect, detect_with, Curve, Detected, Detection, Evidence, RiseCheck, Shape, DEFAULT_MIN_RISE, MIN_KNEE,
};
pub use error::SearchError;
pub use scorer::{FnScorer, Memo, Scorer};
pub use search::{
    parse_range, BoundarySearch, Candidate, ProxyScore, SearchReport, Strategy, TieRule, DEFAULT_BUDGET,
    DEFAULT_EPSILON, DEFAULT_PROXY_MARGIN, DEFAULT_RESAMPLES,
};
pub use stats::paired_bootstrap_ci;
