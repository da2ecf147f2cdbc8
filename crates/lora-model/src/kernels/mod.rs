//! Small-batch CPU matrix–vector products for decoding, with the LoRA update fused in.
//!
//! A decode step multiplies one (or a few) activation rows by every weight matrix of the model, so its speed is
//! set by how fast the weights stream from memory. libtorch hands these products to its BLAS, whose generic
//! `gemv` path reaches about half of this machine's memory bandwidth on AMD CPUs and converts bf16 weights in a
//! slow loop. The kernels here read each weight row once for all activation rows, accumulate in f32 with AVX2/FMA,
//! and add `scaling · B (A x)` in the same pass, so an unmerged LoRA projection costs one call instead of five
//! libtorch ops.
//!
//! Used only where it is exact to do so: CPU, f32 or bf16 contiguous weights, at most [`MAX_ROWS`] activation
//! rows, no autograd, and a CPU with AVX2 and FMA. Everything else (prefill, training, CUDA, other dtypes) goes to
//! libtorch. Results equal libtorch's up to the order of summation (f32) and one final rounding instead of three
//! (bf16: libtorch rounds the base output, the LoRA output and their sum; here only the sum is rounded). Set
//! `LORA_BOUNDARY_KERNELS=off` to route everything to libtorch (for comparisons).
//!
//! The parts, by concern:
//! - `runtime`: the threads a product runs on ([`decode_scope`], the spinning helper thread, `join`) and the
//!   per-thread buffer pool;
//! - `borrow`: tensors borrowed as f32/bf16 slices (`Mat`, `MatMut`) and bf16 rounding;
//! - `schedule`: how the output rows of a split product are handed out to the two threads (`Chunks`, `Out`);
//! - `linear`: the fused projections (`small_linear`, `linear_rows`);
//! - `simd`: the inner loops, dispatched per instruction set (AVX2/FMA, or portable scalar loops).
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

mod borrow;
mod linear;
mod runtime;
mod schedule;
mod simd;

pub(crate) use borrow::{borrow, borrow_f32_mut, borrow_mut, Mat};
pub(crate) use linear::{linear_rows, small_linear, Linear, LoraPart};
pub use runtime::{decode_scope, DecodeScope};
pub(crate) use runtime::{join, pool};
pub(crate) use simd::{axpy, dot, scale_mul, swiglu};

/// Largest number of activation rows (batch × new tokens) the kernels take; more go to libtorch's GEMM.
pub const MAX_ROWS: i64 = 8;

/// 0 = not decided yet, 1 = on, 2 = off.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether the fused kernels are used: the CPU has AVX2 and FMA, the environment does not say
/// `LORA_BOUNDARY_KERNELS=off`, and [`set_enabled`] did not switch them off.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("LORA_BOUNDARY_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("off") || v == "0");
            let on = !off && simd::available();
            STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Switches the fused kernels on or off for the whole process (for side-by-side measurements against libtorch).
/// Switching on has no effect on a CPU without AVX2 and FMA. Returns whether they are now used.
pub fn set_enabled(on: bool) -> bool {
    let on = on && simd::available();
    STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    on
}

/// Decode steps that ran on the fused one-token path (see [`Llama::forward_cached`](crate::Llama::forward_cached)),
/// process-wide: for tests and diagnostics.
pub fn fused_decode_steps() -> u64 {
    FUSED_STEPS.load(Ordering::Relaxed)
}

pub(crate) static FUSED_STEPS: AtomicU64 = AtomicU64::new(0);
