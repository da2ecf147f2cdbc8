//! Shared build script for every package that links libtorch into a test, binary, example or bench.
//!
//! Cargo embeds no rpath, so without this the binaries only run with `LD_LIBRARY_PATH` set. `LIBTORCH` comes
//! from `.cargo/config.toml` (the project-local venv that `scripts/setup.sh` creates) or from the environment.
//! Set `LORA_BOUNDARY_CUDA=1` at build time to link `libtorch_cuda` (needed for `Cuda::is_available()`);
//! leave it unset on CPU-only machines, where that library's CUDA dependencies are absent.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LORA_BOUNDARY_CUDA");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let cuda = std::env::var("LORA_BOUNDARY_CUDA").is_ok_and(|v| v == "1");
    if cuda && lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
