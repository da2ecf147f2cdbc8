//! How this crate's integration tests reach their files: committed fixtures through [`fixtures`],
//! committed data sets through [`workspace_root`], both read with [`read`].

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The workspace root (`crates/lora-metrics/../..`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// This crate's committed fixtures, `crates/lora-metrics/tests/fixtures/`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The text of `path`. A committed file that cannot be read fails the test (it is never skipped).
#[track_caller]
pub fn read(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}
