//! # lora-common
//!
//! The small pieces every crate of the workspace needs, in one place and without libtorch:
//!
//! - [`rng`]: the seeded generators (SplitMix64, xoshiro256**), identical on every platform;
//! - [`bootstrap`]: the one paired bootstrap behind every confidence interval the tool reports;
//! - [`atomic`]: crash-safe outputs (a file or directory appears whole or not at all; leftovers of killed runs are
//!   cleaned by the next);
//! - [`text`]: UTF-8 text and JSONL reading that names the line of a bad row;
//! - [`Sample`]: a prompt, its answer and every reference a metric accepts.
#![warn(missing_docs)]

pub mod atomic;
pub mod bootstrap;
pub mod error;
pub mod rng;
pub mod sample;
pub mod text;

pub use bootstrap::{paired_bootstrap, BootstrapResult};
pub use error::{CommonError, Result};
pub use sample::Sample;
