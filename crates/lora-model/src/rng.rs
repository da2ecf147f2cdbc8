//! The crate's one seeded generator (LoRA initialisation, data order, sampling): SplitMix64 from `lora-common`,
//! identical on every platform (initialisation, shuffling and sampling do not depend on libtorch's generator).
pub(crate) use lora_common::rng::SplitMix64 as Rng;
