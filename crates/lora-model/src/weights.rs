//! Weight files: memory-mapped safetensors (single or sharded) in, safetensors out.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

/// Where tensors are loaded to: device and floating-point kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// CPU or CUDA device.
    pub device: Device,
    /// `Float`, `BFloat16` or `Half`.
    pub kind: Kind,
}

impl Default for Placement {
    fn default() -> Self {
        Placement { device: Device::Cpu, kind: Kind::Float }
    }
}

/// A source of named tensors (HF naming).
pub trait WeightSource {
    /// The file or directory named in errors.
    fn origin(&self) -> &Path;
    /// Whether a tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// Loads `name` as f32 on the CPU, checking its shape when `expected` is given.
    fn load(&self, name: &str, expected: Option<&[i64]>) -> Result<Tensor>;
    /// All tensor names.
    fn names(&self) -> Vec<String>;
    /// [`WeightSource::load`], converted to floating-point `kind` when given (integer tensors keep theirs). A
    /// source may convert while copying to avoid a whole-tensor transient in the file's dtype.
    fn load_as(&self, name: &str, expected: Option<&[i64]>, kind: Option<Kind>) -> Result<Tensor> {
        let t = self.load(name, expected)?;
        match kind {
            Some(k) if t.is_floating_point() && t.kind() != k => Ok(t.f_to_kind(k)?),
            _ => Ok(t),
        }
    }
    /// A hint that a model is about to be loaded from this source (embedding, then block by block, then the
    /// head). A source may read the tensors ahead in the background (safetensors does); the default does nothing.
    fn prefetch(&self) {}
    /// Whether the source refuses non-finite values itself while reading (then loaders skip [`check_finite`]).
    fn checks_finite(&self) -> bool {
        false
    }
}

struct Shard {
    path: PathBuf,
    /// For positioned reads of tensor data (and the prefetch readers).
    file: Arc<File>,
    /// For the header and range checks; tensor data is read with `pread`, never through the map.
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// One or more memory-mapped `.safetensors` files seen as one name space.
pub struct SafetensorsWeights {
    origin: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
    /// Bytes of tensor data read so far (paces the prefetch readers).
    consumed: Arc<AtomicU64>,
    prefetch: std::sync::Mutex<Option<Prefetch>>,
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only; a file changed underneath us while mapped is outside what we defend against,
    // as with every memory-mapped model loader.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let (n, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
    Ok(Shard { path: path.to_path_buf(), file: Arc::new(file), mmap, header_len: n + 8, metadata })
}

impl SafetensorsWeights {
    /// Opens one `.safetensors` file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shard = open_shard(path)?;
        let index = shard.metadata.tensors().keys().map(|k| (k.clone(), 0)).collect();
        Ok(SafetensorsWeights::new(path.to_path_buf(), vec![shard], index))
    }

    /// Opens a model directory: `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_file(single);
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.exists() {
            if dir.join("pytorch_model.bin").exists() {
                return Err(ModelError::Safetensors {
                    path: dir.join("pytorch_model.bin"),
                    message: "pickled PyTorch weights are not loaded (unpickling runs code); convert to safetensors"
                        .into(),
                });
            }
            return Err(ModelError::MissingTensor {
                name: "model.safetensors or model.safetensors.index.json".into(),
                file: dir.to_path_buf(),
            });
        }
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let idx: Index =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index_path.clone(), source })?;
        let mut files: Vec<String> = idx.weight_map.values().cloned().collect();
        files.sort();
        files.dedup();
        let mut shards = Vec::with_capacity(files.len());
        let mut file_pos = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            if f.contains('/') || f.contains("..") {
                return Err(ModelError::Safetensors {
                    path: index_path.clone(),
                    message: format!("shard name `{f}` leaves the model directory"),
                });
            }
            shards.push(open_shard(&dir.join(f))?);
            file_pos.insert(f.clone(), i);
        }
        let mut index = HashMap::new();
        for (name, f) in &idx.weight_map {
            let pos = file_pos[f]; // ok: every value of weight_map was inserted above
            if shards[pos].metadata.info(name).is_none() {
                return Err(ModelError::MissingTensor { name: name.clone(), file: shards[pos].path.clone() });
            }
            index.insert(name.clone(), pos);
        }
        Ok(SafetensorsWeights::new(index_path, shards, index))
    }

    fn new(origin: PathBuf, shards: Vec<Shard>, index: HashMap<String, usize>) -> Self {
        let (consumed, prefetch) = (Arc::new(AtomicU64::new(0)), std::sync::Mutex::new(None));
        SafetensorsWeights { origin, shards, index, consumed, prefetch }
    }

    fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = self.shards.get(*self.index.get(name)?)?;
        Some((shard, shard.metadata.info(name)?))
    }
}

/// The libtorch kind of a safetensors dtype we load.
fn kind_of(dtype: Dtype, name: &str, path: &Path) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        other => {
            return Err(ModelError::TensorDtype {
                name: name.into(),
                file: path.to_path_buf(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// Bytes read per `pread` when copying a tensor out of its file: bounds the transient buffer to one chunk,
/// whatever the tensor's size.
const COPY_CHUNK: usize = 32 << 20;

/// Reads a tensor's little-endian bytes (at `range` of `file`, stored as `file_kind`) into a new CPU tensor of
/// `kind` and `shape`, [`COPY_CHUNK`] bytes at a time with positioned reads (no file page is mapped into the
/// process, so none counts in its RSS): each chunk is converted on the way (a bf16 file loads as f32 without a
/// whole-tensor bf16 transient). `consumed` counts the bytes read, for the [`Prefetch`] threads to pace themselves.
fn copy_out(
    file: &File,
    range: std::ops::Range<usize>,
    file_kind: Kind,
    kind: Kind,
    shape: &[i64],
    consumed: &AtomicU64,
) -> Result<(Tensor, u64)> {
    use std::os::unix::fs::FileExt;
    let mut bad = 0u64;
    let t = empty_on_huge_pages(shape, kind)?;
    let elt = file_kind.elt_size_in_bytes();
    let n = range.end - range.start;
    if t.numel() * elt != n {
        return Err(ModelError::InvalidArgument(format!("tensor data is {n} bytes, its shape needs another size")));
    }
    if kind == file_kind && t.is_contiguous() {
        // Same type: read straight into the tensor's memory, one copy (kernel → tensor), chunk by chunk so the
        // prefetch readers are paced.
        let base = t.data_ptr().cast::<u8>();
        let mut done = 0usize;
        while done < n {
            let len = COPY_CHUNK.min(n - done);
            // SAFETY: `t` was allocated above as a contiguous CPU tensor of exactly `n` bytes (checked), so
            // `base + done .. + len` lies inside its storage. Aliasing: `t` is new; when it was carved from a load's
            // arena, its chunk is shared with other weights, but their byte ranges never overlap `t`'s (the arena
            // hands out each byte once), so this is the only access to those bytes while the slice lives. Threads:
            // the slice lives within this loop iteration on this thread only, and a load's other weights are not
            // reachable from other threads while it runs.
            let buf = unsafe { std::slice::from_raw_parts_mut(base.add(done), len) };
            file.read_exact_at(buf, (range.start + done) as u64)
                .map_err(|e| ModelError::InvalidArgument(format!("reading: {e}")))?;
            bad += non_finite_in(buf, file_kind);
            consumed.fetch_add(len as u64, Ordering::Relaxed);
            done += len;
        }
        return Ok((t, bad));
    }
    let flat = t.f_reshape([-1])?;
    let per_chunk = (COPY_CHUNK / elt).max(1).min(t.numel().max(1));
    // u64 storage: the buffer is aligned for every element type the view below may take.
    let mut words = vec![0u64; (per_chunk * elt).div_ceil(8)];
    let mut done = 0usize;
    while done < t.numel() {
        let len = per_chunk.min(t.numel() - done);
        let bytes = len * elt;
        let offset = (range.start + done * elt) as u64;
        {
            // SAFETY: a `u64` buffer reinterpreted as its own bytes (`u8` has no alignment or validity
            // requirement); the slice covers `bytes ≤ words.len() · 8` bytes and is the only live borrow of `words`.
            let buf = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes) };
            file.read_exact_at(buf, offset).map_err(|e| ModelError::InvalidArgument(format!("reading: {e}")))?;
            bad += non_finite_in(buf, file_kind);
        }
        // SAFETY: the view covers the first `bytes` bytes of `words` (`len` values of `elt` bytes, 8-aligned), which
        // live, unmodified, until the view is dropped at the end of this iteration. libtorch only reads the view
        // (it is the source of `copy_`). Aliasing: no Rust reference to `words` is live while the view exists.
        // Threads: the view never leaves this call; libtorch's copy may read it from its pool's threads only within
        // `copy_`, which returns after they finish.
        let view =
            unsafe { Tensor::f_from_blob(words.as_ptr().cast::<u8>(), &[len as i64], &[1], file_kind, Device::Cpu)? };
        flat.f_narrow(0, done as i64, len as i64)?.f_copy_(&view)?;
        drop(view);
        consumed.fetch_add(bytes as u64, Ordering::Relaxed);
        done += len;
    }
    Ok((t, bad))
}

/// A new, uninitialised contiguous CPU tensor on memory advised onto transparent huge pages (2 MB) before
/// anything touched it: what every CPU weight is loaded into. Within a model's load a tensor of up to a quarter
/// of a 64 MB chunk is carved out of a shared chunk (64-byte aligned, starting on a 2 MB boundary) rather than
/// allocated alone, so that a model's many small matrices (SmolLM2's are 0.4–3.5 MB) lie on huge pages too; a
/// thread faults the next chunk in while the current one fills. The decode kernels stream weights on huge pages
/// faster (fewer TLB misses, no 4 KB page-boundary stops for the hardware prefetchers): batch-1 decode of
/// SmolLM2 7–12 % (f32) and 10–14 % (bf16) faster on the Xeon VM of `docs/performance.md`. Where the kernel allows
/// huge pages only on request (`madvise` mode) this is the request; where it refuses them, plain pages are used.
///
/// # Errors
/// [`ModelError::Torch`] when libtorch cannot allocate the tensor or view it with `shape`.
///
/// ```
/// use lora_model::tch::Kind;
/// let t = lora_model::weights::empty_on_huge_pages(&[1024, 1024], Kind::Float)?;
/// assert_eq!(t.size(), [1024, 1024]);
/// # Ok::<(), lora_model::ModelError>(())
/// ```
pub fn empty_on_huge_pages(shape: &[i64], kind: Kind) -> Result<Tensor> {
    let n = shape.iter().try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) });
    let bytes = n.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as i64));
    if let Some(bytes) = bytes.filter(|&b| b > 0 && carvable(b as u64)) {
        let carved = ARENA.try_with(|a| a.try_borrow_mut().ok()?.as_mut().map(|a| a.carve(bytes, shape, kind)));
        if let Ok(Some(t)) = carved {
            return t;
        }
    }
    fresh_on_huge_pages(shape, kind)
}

/// A new, uninitialised contiguous CPU tensor of its own, its memory advised onto huge pages ([`huge_pages`])
/// before anything touched it (never carved from an arena).
pub(crate) fn fresh_on_huge_pages(shape: &[i64], kind: Kind) -> Result<Tensor> {
    let t = Tensor::f_empty(shape, (kind, Device::Cpu))?;
    huge_pages(t.data_ptr().cast::<u8>(), t.numel() * kind.elt_size_in_bytes());
    Ok(t)
}

/// Whether weights and large buffers go on huge pages: yes unless `LORA_BOUNDARY_HUGE_PAGES` is `off` or `0`
/// (read once). On a VM that hands freed memory back to its host (virtio free page reporting) a fresh huge page
/// costs the host's faults as well (about 2 ms per 2 MB page on the Xeon VM of `docs/performance.md`: +0.6–1.1 s
/// to load SmolLM2 in f32), which a short run may not win back in decoding.
fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| {
        !std::env::var("LORA_BOUNDARY_HUGE_PAGES").is_ok_and(|v| v.eq_ignore_ascii_case("off") || v == "0")
    })
}

/// Bytes of a transparent huge page (x86-64 and most aarch64 kernels).
const HUGE_PAGE: usize = 2 << 20;

/// Bytes of one chunk of a weight arena ([`empty_on_huge_pages`]).
const ARENA_CHUNK: i64 = 64 << 20;

/// Whether a tensor of `bytes` is carved out of an open arena (larger ones get storage of their own): what a
/// caller of [`arena_scope`] counts in its `expected` bytes.
pub(crate) fn carvable(bytes: u64) -> bool {
    bytes <= ARENA_CHUNK as u64 / 4
}

thread_local! {
    /// The weight arena of this thread's [`arena_scope`], if one is open.
    static ARENA: std::cell::RefCell<Option<Arena>> = const { std::cell::RefCell::new(None) };
}

/// The chunk weights are being carved from: a byte tensor on huge pages, and how much of it is taken. Each carved
/// weight is a view of the chunk, which libtorch keeps alive for as long as any of them lives.
struct Arena {
    chunk: Option<Tensor>,
    used: usize,
    /// Where the chunk's usable bytes end.
    end: i64,
    /// Bytes of weights the scope still expects beyond the chunks taken so far.
    left: i64,
    /// The next chunk, being faulted in by a background thread while this one fills.
    next: Option<NextChunk>,
}

/// A chunk being faulted in by its own thread, which hands it back when done.
struct NextChunk {
    thread: std::thread::JoinHandle<Tensor>,
    /// The addresses of its usable bytes.
    range: std::ops::Range<usize>,
}

impl Arena {
    /// A `shape`/`kind` view of the next `bytes` (64-byte aligned) of the chunk, with a new chunk when this one
    /// is full.
    fn carve(&mut self, bytes: i64, shape: &[i64], kind: Kind) -> Result<Tensor> {
        // 64-byte aligned by address (the chunk's own alignment is the allocator's business).
        let aligned = |c: &Tensor, used: usize| {
            let base = c.data_ptr() as usize;
            (base + used).next_multiple_of(64) - base
        };
        let mut at = self.chunk.as_ref().map_or(0, |c| aligned(c, self.used));
        if self.chunk.is_none() || at as i64 + bytes > self.end {
            let ready = match self.next.take() {
                Some(next) => {
                    if !next.thread.is_finished() {
                        // Still faulting: this thread faults the back half in meanwhile (pages the helper reaches
                        // afterwards are already mapped), so both cores share the host's faults.
                        populate(next.range.start + next.range.len() / 2, next.range.end);
                    }
                    match next.thread.join() {
                        Ok(c) if usable(&c) >= bytes => Some(c),
                        _ => None,
                    }
                }
                None => None,
            };
            let c = match ready {
                Some(c) => c,
                None => new_chunk(bytes.max(self.chunk_len()))?,
            };
            // Weights start at the chunk's first 2 MB boundary (it has a huge page to spare for that), so that
            // every one of them lies on huge pages.
            at = (c.data_ptr() as usize).next_multiple_of(HUGE_PAGE) - c.data_ptr() as usize;
            self.end = at as i64 + usable(&c);
            self.left -= usable(&c);
            self.chunk = Some(c);
            self.prepare_next();
        }
        let chunk = self.chunk.as_ref().ok_or_else(|| ModelError::InvalidArgument("weight arena: no chunk".into()))?;
        let view = chunk.f_narrow(0, at as i64, bytes)?.f_view_dtype(kind)?.f_view(shape)?;
        self.used = at + bytes as usize;
        Ok(view)
    }

    /// Usable bytes of the next chunk: what is still expected, in whole huge pages, at most [`ARENA_CHUNK`].
    fn chunk_len(&self) -> i64 {
        (self.left.clamp(1, ARENA_CHUNK) as u64).next_multiple_of(HUGE_PAGE as u64) as i64
    }

    /// While more weights are expected, has a thread fault in the next chunk's pages: on a VM a fresh huge page
    /// costs its zeroing plus the host's own faults (about 2 ms per 2 MB page on the Xeon VM of
    /// `docs/performance.md`), which the loading thread would otherwise wait for.
    fn prepare_next(&mut self) {
        if self.left <= 0 || self.next.is_some() || !huge_pages_wanted() {
            return;
        }
        let Ok(c) = new_chunk(self.chunk_len()) else { return };
        let start = (c.data_ptr() as usize).next_multiple_of(HUGE_PAGE);
        let range = start..start + usable(&c) as usize;
        let faulted = range.clone();
        let thread = std::thread::Builder::new().name("lora-weight-pages".into()).spawn(move || {
            populate(faulted.start, faulted.end);
            c
        });
        self.next = thread.ok().map(|thread| NextChunk { thread, range });
    }
}

/// Usable bytes of an arena chunk (all but the huge page kept for alignment).
fn usable(chunk: &Tensor) -> i64 {
    chunk.numel() as i64 - HUGE_PAGE as i64
}

/// A new arena chunk with `len` usable bytes (plus a huge page for alignment), advised onto huge pages.
fn new_chunk(len: i64) -> Result<Tensor> {
    fresh_on_huge_pages(&[len + HUGE_PAGE as i64], Kind::Uint8)
}

/// Faults in the pages of `start..end` (inside a chunk of the arena, not yet handed out) for writing, without
/// writing to them (`MADV_POPULATE_WRITE`, Linux 5.14+; elsewhere nothing happens and the pages fault in when first
/// written).
fn populate(start: usize, end: usize) {
    #[cfg(target_os = "linux")]
    {
        // madvise takes whole 4 KB pages: those inside the range.
        let (start, end) = (start.next_multiple_of(4096), end / 4096 * 4096);
        if end <= start {
            return;
        }
        // SAFETY: the range lies inside an arena chunk that nobody reads or writes before the arena carves it, which
        // happens only after its faulting thread has been joined; the loading thread may fault part of it at the
        // same time as that thread, which the kernel serialises per page (threads). MADV_POPULATE_WRITE maps the
        // pages as a write would but never changes what they hold, so no reader of the memory could observe it even
        // if there were one (aliasing). Were the chunk freed meanwhile (its thread panicked), the call would only
        // fail or map pages of whatever reuses the range, without touching their contents.
        let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, end);
}

/// Gives the whole 2 MB pages of `chunk` past `used` (never carved, so no view covers them) back to the system.
fn release_tail(chunk: &Tensor, used: usize) {
    #[cfg(target_os = "linux")]
    {
        let base = chunk.data_ptr() as usize;
        let (start, end) = ((base + used).next_multiple_of(HUGE_PAGE), (base + chunk.numel()) / HUGE_PAGE * HUGE_PAGE);
        if end > start {
            // SAFETY: aliasing: every view carved from the chunk lies below `base + used` ≤ `start`, and the arena
            // hands out nothing more once it lets go of the chunk, so no Rust or libtorch handle reads or writes
            // `start..end`; MADV_DONTNEED on it only drops pages nobody can see. Threads: the chunk is owned by
            // this thread's arena (no other thread has it).
            let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (chunk, used);
}

/// While the returned guard lives, [`empty_on_huge_pages`] on this thread carves weights out of shared chunks
/// (a model's load opens one, with `expected` the bytes of weights it will carve, so that the chunks are faulted
/// in ahead on another thread). Dropping it lets go of the arena's last chunk (the weights carved from it keep
/// it alive); a scope opened inside another changes nothing.
pub(crate) fn arena_scope(expected: u64) -> ArenaScope {
    let opened = ARENA.try_with(|a| {
        let Ok(mut a) = a.try_borrow_mut() else { return false };
        if a.is_some() {
            return false;
        }
        let mut arena =
            Arena { chunk: None, used: 0, end: 0, left: i64::try_from(expected).unwrap_or(i64::MAX), next: None };
        arena.prepare_next();
        *a = Some(arena);
        true
    });
    ArenaScope { opened: opened.unwrap_or(false), _thread: std::marker::PhantomData }
}

/// Runs `f` with this thread's arena (if any) set aside, so that what it allocates is not carved.
fn without_arena<T>(f: impl FnOnce() -> T) -> T {
    let saved = ARENA.try_with(|a| a.try_borrow_mut().ok().and_then(|mut a| a.take())).ok().flatten();
    let out = f();
    if saved.is_some() {
        let _ = ARENA.try_with(|a| {
            if let Ok(mut a) = a.try_borrow_mut() {
                *a = saved;
            }
        });
    }
    out
}

/// The guard of [`arena_scope`] (bound to its thread).
pub(crate) struct ArenaScope {
    opened: bool,
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for ArenaScope {
    fn drop(&mut self) {
        if self.opened {
            // The untouched end of the last chunk goes back; a chunk still being faulted in is left to its thread,
            // which frees it when done.
            let arena = ARENA.try_with(|a| a.try_borrow_mut().ok().and_then(|mut a| a.take()));
            if let Ok(Some(Arena { chunk: Some(c), used, .. })) = arena {
                release_tail(&c, used);
            }
        }
    }
}

/// Asks the kernel to back the fresh allocation at `base` (`len` bytes) with transparent huge pages where it
/// allows them on request (`madvise` mode): filling gigabytes of new memory then takes 2 MB page faults instead of
/// 4 KB ones. Only the whole 2 MB pages inside the range are advised; small tensors are left alone.
pub(crate) fn huge_pages(base: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    if huge_pages_wanted() {
        let start = (base as usize).div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let end = (base as usize + len) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: `start..end` lies inside the caller's allocation (rounded inwards to 2 MB boundaries).
            // MADV_HUGEPAGE changes only how the kernel backs the pages, never their contents, so no Rust or
            // libtorch view of this or neighbouring memory can observe it (aliasing); madvise is a system call
            // on this process's own address space and safe to make from any thread (threads).
            let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (base, len);
}

/// How many values of `kind` in the little-endian `bytes` are NaN or ±inf, read from their bit patterns (all
/// exponent bits set), so the check costs one pass over bytes just read instead of a libtorch reduction; integer
/// kinds have none.
pub(crate) fn non_finite_in(bytes: &[u8], kind: Kind) -> u64 {
    macro_rules! count {
        ($t:ty, $exp:expr) => {{
            // SAFETY: every bit pattern is a valid integer of this width, so viewing the aligned middle of the
            // bytes as such integers reads nothing invalid; the views borrow `bytes` immutably (aliasing), on this
            // thread only (threads). Little-endian hosts only (x86-64, aarch64), as the files are.
            let (pre, mid, post) = unsafe { bytes.align_to::<$t>() };
            let slow = |b: &[u8]| -> u64 {
                b.chunks_exact(std::mem::size_of::<$t>())
                    .filter(|c| {
                        let mut a = [0u8; std::mem::size_of::<$t>()];
                        a.copy_from_slice(c);
                        <$t>::from_le_bytes(a) & $exp == $exp
                    })
                    .count() as u64
            };
            if pre.is_empty() && post.is_empty() {
                mid.iter().filter(|&&x| x & $exp == $exp).count() as u64
            } else {
                slow(bytes)
            }
        }};
    }
    match kind {
        Kind::BFloat16 => count!(u16, 0x7F80),
        Kind::Half => count!(u16, 0x7C00),
        Kind::Float => count!(u32, 0x7F80_0000),
        Kind::Double => count!(u64, 0x7FF0_0000_0000_0000),
        _ => 0,
    }
}

/// Bytes the [`Prefetch`] readers may run ahead of what loading has consumed: enough to keep the disk busy, small
/// enough that the page cache keeps what was read ahead until it is used.
const PREFETCH_AHEAD: u64 = 1 << 30;

/// Reader threads that pull the tensors a load will ask for into the page cache, in the order it will ask for
/// them, a bounded distance ahead of it: two streams keep the disk's queue full while the loading thread converts
/// and checks. Stopped and joined on drop.
struct Prefetch {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Prefetch {
    /// Starts `threads` readers over `items` (file, offset, length) in order; reader `i` takes items `i`,
    /// `i + threads`, …; each waits while the bytes issued before its next item run more than
    /// [`PREFETCH_AHEAD`] past `consumed`.
    fn start(items: Vec<(Arc<File>, u64, u64)>, consumed: Arc<AtomicU64>, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let starts: Vec<u64> = items
            .iter()
            .scan(0u64, |acc, it| {
                let s = *acc;
                *acc += it.2;
                Some(s)
            })
            .collect();
        let items = Arc::new(items);
        let starts = Arc::new(starts);
        let handles = (0..threads)
            .filter_map(|i| {
                let (items, starts, consumed, stop) = (items.clone(), starts.clone(), consumed.clone(), stop.clone());
                std::thread::Builder::new()
                    .name(format!("lora-prefetch-{i}"))
                    .spawn(move || {
                        use std::os::unix::fs::FileExt;
                        let mut scratch = vec![0u8; 4 << 20];
                        for k in (i..items.len()).step_by(threads) {
                            let (file, offset, len) = &items[k];
                            while starts[k] > consumed.load(Ordering::Relaxed) + PREFETCH_AHEAD {
                                if stop.load(Ordering::Relaxed) {
                                    return;
                                }
                                std::thread::sleep(std::time::Duration::from_millis(2));
                            }
                            let mut at = 0u64;
                            while at < *len {
                                if stop.load(Ordering::Relaxed) {
                                    return;
                                }
                                let n = (scratch.len() as u64).min(len - at) as usize;
                                // A failed read only means this range is not cached ahead; loading reads it itself.
                                // (readahead(2) instead of reading into a scratch buffer measured slower here.)
                                if file.read_exact_at(&mut scratch[..n], offset + at).is_err() {
                                    break;
                                }
                                at += n as u64;
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        Prefetch { stop, handles }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl WeightSource for SafetensorsWeights {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    fn load(&self, name: &str, expected: Option<&[i64]>) -> Result<Tensor> {
        self.load_as(name, expected, None)
    }

    fn checks_finite(&self) -> bool {
        true
    }

    fn prefetch(&self) {
        // The order a decoder loads in: the embedding, the blocks in order (within a block any order: a block is
        // well under the read-ahead distance), then the rest (final norm, LM head).
        let mut names: Vec<&String> = self.index.keys().collect();
        let rank = |n: &str| match layer_of(n) {
            _ if n.contains("embed_tokens") => 0,
            Some(l) => l + 1,
            None => usize::MAX,
        };
        names.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
        let items: Vec<(Arc<File>, u64, u64)> = names
            .into_iter()
            .filter_map(|n| {
                let (shard, info) = self.info(n)?;
                let (start, end) = info.data_offsets;
                Some((shard.file.clone(), (shard.header_len + start) as u64, end.saturating_sub(start) as u64))
            })
            .collect();
        self.consumed.store(0, Ordering::Relaxed);
        let started = Prefetch::start(items, self.consumed.clone(), 2);
        if let Ok(mut slot) = self.prefetch.lock() {
            *slot = Some(started); // the previous readers, if any, stop and are joined here
        }
    }

    fn load_as(&self, name: &str, expected: Option<&[i64]>, kind: Option<Kind>) -> Result<Tensor> {
        let (shard, info) = self
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into(), file: self.origin.clone() })?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if let Some(exp) = expected {
            if exp != shape.as_slice() {
                return Err(ModelError::TensorShape {
                    name: name.into(),
                    file: shard.path.clone(),
                    expected: exp.to_vec(),
                    actual: shape,
                });
            }
        }
        let (start, end) = info.data_offsets;
        let range = shard.header_len + start..shard.header_len + end;
        if shard.mmap.get(range.clone()).is_none() {
            return Err(ModelError::Safetensors {
                path: shard.path.clone(),
                message: format!("data of `{name}` lies past the end of the file"),
            });
        }
        let file_kind = kind_of(info.dtype, name, &shard.path)?;
        let float = matches!(file_kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double);
        let kind = if float { kind.unwrap_or(file_kind) } else { file_kind };
        let (t, bad) = copy_out(&shard.file, range, file_kind, kind, &shape, &self.consumed).map_err(|e| match e {
            ModelError::InvalidArgument(m) => {
                ModelError::Safetensors { path: shard.path.clone(), message: format!("`{name}`: {m}") }
            }
            e => e,
        })?;
        refuse_non_finite(name, &shard.path, bad)?;
        Ok(t)
    }
}

/// Drops the mapped pages of `range` from this process's resident set once their bytes have been copied out, so
/// that loading a checkpoint costs its weights once (in their tensors), not twice (tensors + mapped file pages,
/// which count in RSS). The pages stay in the OS page cache; a later read of the range faults them back in.
pub(crate) fn release_pages(mmap: &Mmap, range: std::ops::Range<usize>) {
    #[cfg(unix)]
    {
        // SAFETY: aliasing: `Mmap::map` maps the file read-only and MAP_SHARED, so MADV_DONTNEED discards no data:
        // a later access to the range (through a slice some other caller still holds, on any thread) faults the
        // same file bytes back in from the page cache. No Rust reference can observe a change, as long as the file
        // itself is not modified while mapped — the assumption every memory-mapped loader (this one included)
        // already makes. Threads: madvise is a system call on our own mapping; concurrent readers are covered by
        // the argument above. The range lies inside the mapping (the caller sliced it from the same map).
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.end - range.start)
        };
    }
    #[cfg(not(unix))]
    let _ = (mmap, range);
}

/// Loads a tensor from a source and places it (device, kind).
pub(crate) fn load_placed(src: &dyn WeightSource, name: &str, shape: &[i64], place: Placement) -> Result<Tensor> {
    // On the CPU the source converts while copying (one chunk-sized transient); elsewhere the file's dtype crosses
    // to the device and is converted there.
    let t = if place.device == Device::Cpu {
        src.load_as(name, Some(shape), Some(place.kind))?
    } else {
        // A CPU transient on its way to the device: not carved from the load's arena, whose chunk would keep it.
        without_arena(|| src.load(name, Some(shape)))?
    };
    if !src.checks_finite() {
        check_finite(&t, name, src.origin())?;
    }
    Ok(t.f_to_device(place.device)?.f_to_kind(place.kind)?.f_contiguous()?)
}

/// Writes named tensors to a `.safetensors` file atomically (temporary file, then rename).
///
/// Tensors are written in their own kind (`Float`, `BFloat16`, `Half`, `Int64`, …) after moving to the CPU.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    struct View {
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }
    impl safetensors::View for &View {
        fn dtype(&self) -> Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let (dtype, elem) = match t.kind() {
            Kind::Float => (Dtype::F32, 4),
            Kind::BFloat16 => (Dtype::BF16, 2),
            Kind::Half => (Dtype::F16, 2),
            Kind::Double => (Dtype::F64, 8),
            Kind::Int64 => (Dtype::I64, 8),
            Kind::Int => (Dtype::I32, 4),
            other => {
                return Err(ModelError::TensorDtype {
                    name: name.clone(),
                    file: path.to_path_buf(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let numel: usize = shape.iter().product();
        let mut data = vec![0u8; numel * elem];
        t.f_copy_data_u8(&mut data, numel)?;
        views.push((name.clone(), View { dtype, shape, data }));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::atomic::clean_stale(parent);
    }
    let tmp = tmp_path(path);
    let refs: Vec<(String, &View)> = views.iter().map(|(n, v)| (n.clone(), v)).collect();
    if let Err(e) = safetensors::serialize_to_file(refs, metadata, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::Safetensors { path: path.to_path_buf(), message: e.to_string() });
    }
    Ok(crate::atomic::commit_file(&tmp, path)?)
}

/// The floating-point kind a checkpoint stores its weights in, as transformers' `dtype="auto"` picks it: an HF
/// directory's `config.json` `dtype` (or `torch_dtype`), else the dtype of its first floating-point tensor; a
/// GGUF file dequantizes to `Float` (f32), as transformers' GGUF loader does.
pub fn checkpoint_kind(path: &Path) -> Result<Kind> {
    if !path.is_dir() {
        return Ok(Kind::Float);
    }
    let from_name = |s: &str| match s {
        "float32" | "float" => Some(Kind::Float),
        "bfloat16" => Some(Kind::BFloat16),
        "float16" | "half" => Some(Kind::Half),
        _ => None,
    };
    let cfg_path = path.join("config.json");
    if let Ok(text) = std::fs::read_to_string(&cfg_path) {
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: cfg_path.clone(), source })?;
        let named = v.get("dtype").or_else(|| v.get("torch_dtype")).and_then(|d| d.as_str());
        if let Some(kind) = named.and_then(from_name) {
            return Ok(kind);
        }
    }
    let weights = SafetensorsWeights::open_dir(path)?;
    for name in weights.names() {
        if let Some((_, info)) = weights.info(&name) {
            match info.dtype {
                Dtype::F32 | Dtype::F64 => return Ok(Kind::Float),
                Dtype::BF16 => return Ok(Kind::BFloat16),
                Dtype::F16 => return Ok(Kind::Half),
                _ => {}
            }
        }
    }
    Ok(Kind::Float)
}

/// A sibling temporary path for atomic writes (see [`crate::atomic`]).
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    crate::atomic::partial_path(path)
}

/// Writes a text file atomically.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    Ok(crate::atomic::write_file(path, contents)?)
}

/// Values summed at once by [`check_finite`] (16 Mi values: a 128 MB f64 transient).
const FINITE_CHUNK: i64 = 1 << 24;

/// Refuses a floating-point tensor holding NaN or ±inf, naming the tensor, its block and the file.
///
/// One vectorised pass per tensor: the f64 sum of the values is finite exactly when every value is (a NaN or an
/// infinity propagates; f64 cannot overflow on sums of f32/bf16/f16 values of any realistic tensor). libtorch
/// widens the input to f64 before summing, so the sum runs over slices of 16 Mi values: the transient
/// is 128 MB whatever the tensor (a whole 128256 × 4096 embedding would be a 4.2 GB transient). Only a failing
/// tensor is scanned again to count its bad values. Integer tensors pass unchecked.
pub fn check_finite(t: &Tensor, name: &str, file: &Path) -> Result<()> {
    let n = t.numel() as i64;
    if !t.is_floating_point() || n == 0 {
        return Ok(());
    }
    let flat = t.f_reshape([-1])?;
    let mut finite = true;
    let mut at = 0i64;
    while at < n && finite {
        let len = FINITE_CHUNK.min(n - at);
        // An f32 sum is NaN/inf when any value is (vectorised bf16/f16 widening: several times faster than an f64
        // sum); a finite tensor whose sum overflows f32 is caught by the exact count below.
        finite = flat.f_narrow(0, at, len)?.f_sum(Kind::Float)?.f_double_value(&[])?.is_finite();
        at += len;
    }
    if finite {
        return Ok(());
    }
    let bad = t.f_isfinite()?.f_logical_not()?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    if bad == 0 {
        return Ok(());
    }
    refuse_non_finite(name, file, bad as u64)
}

/// [`ModelError::NonFinite`] for tensor `name` of `file` when `count` of its values are NaN or ±inf.
pub(crate) fn refuse_non_finite(name: &str, file: &Path, count: u64) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    Err(ModelError::NonFinite { name: name.into(), layer: layer_of(name), file: file.to_path_buf(), count })
}

/// The decoder block a tensor name belongs to (`...layers.N...` or GGUF's `blk.N.`).
pub fn layer_of(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "blk" {
            return parts.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside an arena scope weights are views of shared chunks: each with its shape and kind, 64-byte aligned,
    /// none overlapping another, alive after the scope closes; a nested scope changes nothing; a tensor larger
    /// than a quarter chunk and any tensor outside a scope get storage of their own.
    #[test]
    fn arena_carves_disjoint_aligned_weights() {
        let _g = tch::no_grad_guard();
        let shapes: [(&[i64], Kind); 5] = [
            (&[576, 576], Kind::Float),
            (&[3], Kind::Float),
            (&[192, 576], Kind::BFloat16),
            (&[1536, 576], Kind::Float),
            (&[5, 7], Kind::Half),
        ];
        let expected: u64 = 3 * ARENA_CHUNK as u64;
        let mut made = Vec::new();
        {
            let _arena = arena_scope(expected);
            let _inner = arena_scope(0);
            for _ in 0..20 {
                for &(shape, kind) in &shapes {
                    made.push(empty_on_huge_pages(shape, kind).unwrap());
                }
            }
            let own = empty_on_huge_pages(&[ARENA_CHUNK / 4 / 4 + 1], Kind::Float).unwrap();
            let last = made.last().map_or(0, |t| t.data_ptr() as usize + t.numel() * t.kind().elt_size_in_bytes());
            assert_ne!(own.data_ptr() as usize, last.next_multiple_of(64), "a large tensor is not carved");
            let next = empty_on_huge_pages(&[4], Kind::Float).unwrap();
            assert_eq!(next.data_ptr() as usize, last.next_multiple_of(64), "small tensors go on being carved");
        }
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut adjacent = 0;
        for (i, t) in made.iter_mut().enumerate() {
            let (shape, kind) = shapes[i % shapes.len()];
            assert_eq!((t.size().as_slice(), t.kind()), (shape, kind));
            assert!(t.is_contiguous());
            let base = t.data_ptr() as usize;
            assert_eq!(base % 64, 0, "tensor {i} is 64-byte aligned");
            if spans.last().is_some_and(|&(_, end)| end.next_multiple_of(64) == base) {
                adjacent += 1;
            }
            spans.push((base, base + t.numel() * kind.elt_size_in_bytes()));
            let _ = t.fill_(i as f64);
        }
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "carved tensors never overlap");
        assert!(adjacent >= made.len() / 2, "tensors are carved one after another from shared chunks ({adjacent})");
        for (i, t) in made.iter().enumerate() {
            // Integers below 256 are exact in every kind used here.
            let all = t.eq(i as f64).all().int64_value(&[]);
            assert_eq!(all, 1, "tensor {i} keeps its own values after the scope closed");
        }
        let alone = empty_on_huge_pages(&[16, 16], Kind::Float).unwrap();
        let next = spans.iter().map(|s| s.1.next_multiple_of(64)).any(|a| a == alone.data_ptr() as usize);
        assert!(!next, "outside a scope a tensor is not carved after the last one");
    }

    /// The bit-pattern count equals libtorch's `isfinite` on values of every float kind, special values included
    /// (NaN, ±inf, ±0, subnormals, the largest finite value).
    #[test]
    fn non_finite_count_matches_libtorch() {
        let mut vals: Vec<f64> = (0..1000).map(|i| ((i as f64) * 0.37).sin() * 10f64.powi(i % 9 - 4)).collect();
        vals.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0, 1e-40, -1e-310, 65504.0, 3.0e38]);
        vals.extend([f64::NAN, 1e300, -1e300]);
        let base = Tensor::from_slice(&vals);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double] {
            let t = base.to_kind(kind).contiguous();
            let want = t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]) as u64;
            let n = t.numel();
            let mut bytes = vec![0u8; n * kind.elt_size_in_bytes()];
            t.copy_data_u8(&mut bytes, n);
            assert_eq!(non_finite_in(&bytes, kind), want, "{kind:?}");
            assert!(want >= 3, "{kind:?}: the special values must include non-finite ones");
        }
        assert_eq!(non_finite_in(&[0xff; 16], Kind::Int64), 0);
    }
}
