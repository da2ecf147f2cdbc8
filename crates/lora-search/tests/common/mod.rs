//! How this crate's integration tests reach their files: committed fixtures through [`fixtures`],
//! read with [`read`].

use std::path::{Path, PathBuf};

/// The workspace root (`crates/lora-search/../..`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed search fixtures, `tests/fixtures/search/` at the workspace root.
pub fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures/search")
}

/// The text of `path`. A committed file that cannot be read fails the test (it is never skipped).
#[track_caller]
pub fn read(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}
