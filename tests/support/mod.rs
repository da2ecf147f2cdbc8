//! How the tests of lora-model, lora-probe and lora-boundary reach files: one file, included by each test as
//! `#[path = "../../../tests/support/mod.rs"] mod common;`, so every test finds fixtures the same way.
//! (`env!("CARGO_MANIFEST_DIR")` is the including crate's directory.)
#![allow(dead_code)]
use std::path::PathBuf;

/// The workspace root: `$LORA_BOUNDARY_HOME` when set (test binaries run from `scripts/gpu-build.sh`'s bundle on
/// another machine), else the workspace this test was compiled in.
pub fn root() -> PathBuf {
    std::env::var_os("LORA_BOUNDARY_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The workspace's committed reference fixtures (`tests/fixtures/`).
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// This crate's own committed fixtures (`<crate>/tests/fixtures/`).
pub fn crate_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Prints why a test skips, straight to stderr: `eprintln!` output is captured by the test harness and would only
/// show for a failing test, so a skip would pass silently.
pub fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

/// The embedded SmolLM2 GGUF that `scripts/setup.sh` fetches, or `None` after printing why the caller skips.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        skip(&format!("{} not found (run scripts/setup.sh)", p.display()));
        None
    }
}

/// The Gemma 3 270M GGUF that `scripts/fetch-gemma3.sh` fetches (`$LORA_GEMMA3_GGUF` overrides the path), or
/// `None` after printing why the caller skips.
pub fn gemma3_gguf() -> Option<PathBuf> {
    let p = match std::env::var_os("LORA_GEMMA3_GGUF") {
        Some(p) => PathBuf::from(p),
        None => root().join("models/gemma-3-270m-q4_k_m.gguf"),
    };
    if p.exists() {
        Some(p)
    } else {
        skip(&format!("{} not found (run `bash scripts/fetch-gemma3.sh`)", p.display()));
        None
    }
}
