//! The decode kernels' instruction-set paths against each other and against libtorch, on the projection shapes of
//! SmolLM2-135M (hidden 576, FFN 1536, 3 KV heads of 64) and Llama-3.2-1B (hidden 2048, FFN 8192, 8 KV heads of
//! 64), f32 and bf16 weights.
//!
//! - `decode/<model>/<dtype>/<projection>/<path>`: one activation row (batch-1 decode), every path this CPU has
//!   (`kernels::linear_on`), with and without an r = 16 LoRA (`+lora`), beside libtorch's `linear` (`libtorch`, and
//!   `libtorch+lora` for the unfused five ops). Reported as bytes of weights per second: compare with `stream/sum`,
//!   a plain reduction over the same bytes (the read-bandwidth cap of the same run).
//! - `stream/side/{alone,beside,within}`: what a second, short stream read beside the weights costs against the
//!   same bytes inside the weight rows (LoRA's `B` beside `W`; see [`stream_side`]).
//! - `rows/<model>/<dtype>/<projection>/<rows>`: the active path against libtorch for 1–32 activation rows: where
//!   libtorch's GEMM overtakes the kernels is what `kernels::MAX_ROWS` should be set to (see its documentation).
//!
//! Each measurement cycles through copies of the weight matrix that together take [`STREAM_BYTES`], so the weights
//! come from memory as in decoding, not from the last-level cache. The kernel runs go through a
//! `kernels::decode_scope` (two threads, as in decoding, where libtorch has two or more); libtorch runs with its own
//! threads. `kernels::linear_on` copies the activation rows in and the output out of tensors (a few microseconds per
//! call), which the fused decode step does not do. Run on a quiet machine:
//! `cargo bench -p lora-model --bench kernels` (`-- decode/smollm2` for one group).
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_model::kernels::{self, SimdPath};
use lora_model::tch::{self, Device, Kind, Tensor};

/// Bytes of weights each measurement cycles through (more than any last-level cache).
const STREAM_BYTES: i64 = 512 << 20;

/// LoRA rank of the `+lora` runs.
const RANK: i64 = 16;

/// A projection: `(name, out, in)`.
type Projection = (&'static str, i64, i64);

/// `(model, its projections)`.
const SHAPES: [(&str, [Projection; 4]); 2] = [
    ("smollm2", [("q", 576, 576), ("k", 192, 576), ("gate", 1536, 576), ("down", 576, 1536)]),
    ("llama1b", [("q", 2048, 2048), ("k", 512, 2048), ("gate", 8192, 2048), ("down", 2048, 8192)]),
];

/// Copies of one projection's weights (with a LoRA pair each), `copies` of them in one tensor, so that cycling
/// through them streams [`STREAM_BYTES`].
struct Weights {
    w: Tensor,
    a: Tensor,
    b: Tensor,
    out: i64,
    copies: i64,
}

impl Weights {
    fn new(out: i64, inp: i64, kind: Kind) -> Self {
        let bytes = out * inp * if kind == Kind::Float { 4 } else { 2 };
        let copies = (STREAM_BYTES / bytes).max(1);
        tch::manual_seed(1);
        let opts = (kind, Device::Cpu);
        let w = (Tensor::randn([copies * out, inp], opts) * 0.02).to_kind(kind);
        let a = (Tensor::randn([copies * RANK, inp], opts) * 0.02).to_kind(kind);
        let b = (Tensor::randn([copies * out, RANK], opts) * 0.02).to_kind(kind);
        Weights { w, a, b, out, copies }
    }

    /// Copy `k`'s weight, A and B (contiguous views).
    fn get(&self, k: i64) -> (Tensor, Tensor, Tensor) {
        let k = k % self.copies;
        (
            self.w.narrow(0, k * self.out, self.out),
            self.a.narrow(0, k * RANK, RANK),
            self.b.narrow(0, k * self.out, self.out),
        )
    }

    fn bytes(&self, lora: bool) -> u64 {
        let per = |t: &Tensor| (t.numel() / self.copies as usize * t.kind().elt_size_in_bytes()) as u64;
        per(&self.w) + if lora { per(&self.a) + per(&self.b) } else { 0 }
    }
}

fn kind_name(kind: Kind) -> &'static str {
    if kind == Kind::Float {
        "f32"
    } else {
        "bf16"
    }
}

fn configure(c: &mut Criterion, name: String) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g
}

/// A plain reduction over [`STREAM_BYTES`] of f32: the read bandwidth of this run.
fn stream(c: &mut Criterion) {
    let _g = tch::no_grad_guard();
    let data = Tensor::ones([STREAM_BYTES / 4], (Kind::Float, Device::Cpu));
    let mut g = configure(c, "stream".into());
    g.throughput(Throughput::Bytes(STREAM_BYTES as u64));
    g.bench_function("sum", |b| b.iter(|| std::hint::black_box(data.sum(Kind::Float).double_value(&[]))));
    g.finish();
}

/// Bytes of one weight row in `stream/side` (a bf16 row of SmolLM2's width) and of its LoRA `B` row (r = 16, bf16).
#[cfg(target_arch = "x86_64")]
const SIDE_ROW: usize = 1152;
#[cfg(target_arch = "x86_64")]
const SIDE_B: usize = 32;

/// How far ahead `stream/side` prefetches the rows, in bytes of the stream: the AVX-512 decode loops' distance.
#[cfg(target_arch = "x86_64")]
const SIDE_AHEAD: usize = 8192;

/// Where `stream/side` reads `B`'s rows from.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq)]
enum SideLayout {
    /// No `B`: the weight rows only.
    Alone,
    /// A buffer of its own, beside the rows (as LoRA's `B` is read in `W`'s loop).
    Beside,
    /// Inside the rows: each weight row followed by its `B` row.
    Within,
}

#[cfg(target_arch = "x86_64")]
impl SideLayout {
    /// Bytes from one weight row to the next.
    fn stride(self) -> usize {
        if self == SideLayout::Within {
            SIDE_ROW + SIDE_B
        } else {
            SIDE_ROW
        }
    }

    /// Bytes read per row.
    fn bytes(self) -> usize {
        if self == SideLayout::Alone {
            SIDE_ROW
        } else {
            SIDE_ROW + SIDE_B
        }
    }
}

/// How a second, short stream read beside a weight stream costs: two threads (as in decoding) each read half of
/// [`STREAM_BYTES`] of [`SIDE_ROW`]-byte rows the way the AVX-512 decode loops do (every line asked for into L2
/// twice, [`SIDE_AHEAD`] bytes ahead), and with each row a [`SIDE_B`]-byte row of `B` (2.8 % more bytes): `alone`
/// reads the rows only; `beside` reads `B` from a buffer of its own (as LoRA's `B` is read in `W`'s loop, asked for
/// into L1 512 bytes ahead); `within` reads the same bytes laid out in the rows themselves (each row followed by its
/// `B` row, one stream). Compare the times: on the Xeon VM of `docs/performance.md`, `beside` costs several times
/// its bytes and `within` about its bytes.
fn stream_side(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        if !is_x86_feature_detected!("avx2") {
            eprintln!("stream/side skipped: this CPU lacks AVX2");
            return;
        }
        let rows = STREAM_BYTES as usize / SIDE_ROW;
        let half = rows / 2;
        let buffer = |bytes: usize| {
            let mut t = lora_model::weights::empty_on_huge_pages(&[bytes as i64], Kind::Uint8).expect("buffer");
            let _ = t.fill_(1);
            t
        };
        let (w, b, wb) = (buffer(rows * SIDE_ROW), buffer(rows * SIDE_B), buffer(rows * (SIDE_ROW + SIDE_B)));
        // Addresses as integers, so that the threads can take them (the tensors outlive the runs and are only read).
        let (wp, bp, wbp) = (w.data_ptr() as usize, b.data_ptr() as usize, wb.data_ptr() as usize);
        let mut g = configure(c, "stream/side".into());
        for (name, layout) in
            [("alone", SideLayout::Alone), ("beside", SideLayout::Beside), ("within", SideLayout::Within)]
        {
            g.throughput(Throughput::Bytes((rows * layout.bytes()) as u64));
            let base = if layout == SideLayout::Within { wbp } else { wp };
            g.bench_function(name, |bench| {
                bench.iter(|| {
                    std::thread::scope(|s| {
                        // SAFETY: the rows `half..rows` lie in the buffers (`rows` rows of `layout.stride()` bytes,
                        // and of `SIDE_B` for `B`), which live and are not written while this runs; the CPU has AVX2
                        // (checked above).
                        let t = s.spawn(|| unsafe { side_rows(base, bp, layout, half..rows) });
                        // SAFETY: as above, for the rows `0..half`.
                        let a = unsafe { side_rows(base, bp, layout, 0..half) };
                        std::hint::black_box(a.wrapping_add(t.join().expect("thread")))
                    })
                })
            });
        }
        g.finish();
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

/// Sums (as 32-bit integers) the first [`SIDE_ROW`] bytes of rows `rows` at address `w` (`layout.stride()` bytes
/// apart), plus per row [`SIDE_B`] bytes of `B` where `layout` has them: from the buffer at `b` (row `o` at
/// `o · SIDE_B`), or from the row's own tail.
///
/// # Safety
/// The CPU must have AVX2; every row of `rows` (and its `B` row) must lie in live memory that nothing writes
/// meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn side_rows(w: usize, b: usize, layout: SideLayout, rows: std::ops::Range<usize>) -> i32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 3];
    for o in rows {
        let row = (w + o * layout.stride()) as *const u8;
        let mut i = 0;
        while i < SIDE_ROW {
            let ahead = row.wrapping_add(i + SIDE_AHEAD) as *const i8;
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * l));
            }
            for k in 0..4 {
                let v = _mm256_loadu_si256(row.add(i + 32 * k) as *const __m256i);
                acc[k % 2] = _mm256_add_epi32(acc[k % 2], v);
            }
            i += 128;
        }
        let side = match layout {
            SideLayout::Alone => None,
            SideLayout::Beside => {
                let p = (b + o * SIDE_B) as *const u8;
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(512) as *const i8);
                Some(p)
            }
            SideLayout::Within => Some(row.add(SIDE_ROW)),
        };
        if let Some(p) = side {
            acc[2] = _mm256_add_epi32(acc[2], _mm256_loadu_si256(p as *const __m256i));
        }
    }
    let mut out = [0i32; 8];
    let sum = _mm256_add_epi32(acc[0], _mm256_add_epi32(acc[1], acc[2]));
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, sum);
    out.iter().fold(0i32, |a, &v| a.wrapping_add(v))
}

/// Batch-1 products on every path, and libtorch.
fn decode(c: &mut Criterion) {
    let _g = tch::no_grad_guard();
    for (model, projections) in SHAPES {
        for kind in [Kind::Float, Kind::BFloat16] {
            for (proj, out, inp) in projections {
                let w = Weights::new(out, inp, kind);
                let x = Tensor::randn([1, inp], (Kind::Float, Device::Cpu)).to_kind(kind);
                let mut g = configure(c, format!("decode/{model}/{}/{proj}", kind_name(kind)));
                for lora in [false, true] {
                    g.throughput(Throughput::Bytes(w.bytes(lora)));
                    let suffix = if lora { "+lora" } else { "" };
                    for path in SimdPath::ALL.into_iter().filter(|p| p.supported()) {
                        g.bench_function(format!("{path}{suffix}"), |bench| {
                            let _scope = kernels::decode_scope();
                            let mut k = 0;
                            bench.iter(|| {
                                let (wk, ak, bk) = w.get(k);
                                k += 1;
                                let l = lora.then_some((&ak, &bk, 2.0));
                                std::hint::black_box(kernels::linear_on(path, &x, &wk, None, l).expect("kernels"))
                            })
                        });
                    }
                    g.bench_function(format!("libtorch{suffix}"), |bench| {
                        let mut k = 0;
                        bench.iter(|| {
                            let (wk, ak, bk) = w.get(k);
                            k += 1;
                            let mut y = x.linear::<Tensor>(&wk, None);
                            if lora {
                                y += x.linear::<Tensor>(&ak, None).linear::<Tensor>(&bk, None) * 2.0;
                            }
                            std::hint::black_box(y)
                        })
                    });
                }
                g.finish();
            }
        }
    }
}

/// The active path against libtorch for a growing number of activation rows.
fn rows(c: &mut Criterion) {
    let _g = tch::no_grad_guard();
    let path = kernels::simd_path();
    for (model, projections) in SHAPES {
        for kind in [Kind::Float, Kind::BFloat16] {
            for (proj, out, inp) in projections.into_iter().filter(|p| p.0 == "gate" || p.0 == "down") {
                let w = Weights::new(out, inp, kind);
                let mut g = configure(c, format!("rows/{model}/{}/{proj}", kind_name(kind)));
                g.throughput(Throughput::Bytes(w.bytes(false)));
                for m in [1i64, 2, 4, 8, 12, 16, 24, 32] {
                    let x = Tensor::randn([m, inp], (Kind::Float, Device::Cpu)).to_kind(kind);
                    g.bench_with_input(BenchmarkId::new(path.name(), m), &m, |bench, _| {
                        let _scope = kernels::decode_scope();
                        let mut k = 0;
                        bench.iter(|| {
                            let (wk, _, _) = w.get(k);
                            k += 1;
                            std::hint::black_box(kernels::linear_on(path, &x, &wk, None, None).expect("kernels"))
                        })
                    });
                    g.bench_with_input(BenchmarkId::new("libtorch", m), &m, |bench, _| {
                        let mut k = 0;
                        bench.iter(|| {
                            let (wk, _, _) = w.get(k);
                            k += 1;
                            std::hint::black_box(x.linear::<Tensor>(&wk, None))
                        })
                    });
                }
                g.finish();
            }
        }
    }
}

criterion_group!(benches, stream, stream_side, decode, rows);
criterion_main!(benches);
