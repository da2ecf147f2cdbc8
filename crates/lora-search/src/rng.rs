//! The seeded generators of the search (xoshiro256** seeded through SplitMix64, and the seed mixer), from
//! `lora-common`: reproducible bit for bit across platforms and dependency upgrades.
//!
//! ```
//! use lora_search::rng::mix;
//! assert_ne!(mix(&[1, 2]), mix(&[2, 1]));
//! ```
pub use lora_common::rng::{mix, splitmix64, Xoshiro256 as Rng};
