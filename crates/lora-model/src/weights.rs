//! Weight files: memory-mapped safetensors (single or sharded) in, safetensors out.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

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
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// One or more memory-mapped `.safetensors` files seen as one name space.
pub struct SafetensorsWeights {
    origin: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only; a file changed underneath us while mapped is outside what we defend against,
    // as with every memory-mapped model loader.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let (n, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
    Ok(Shard { path: path.to_path_buf(), mmap, header_len: n + 8, metadata })
}

impl SafetensorsWeights {
    /// Opens one `.safetensors` file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shard = open_shard(path)?;
        let index = shard.metadata.tensors().keys().map(|k| (k.clone(), 0)).collect();
        Ok(SafetensorsWeights { origin: path.to_path_buf(), shards: vec![shard], index })
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
        Ok(SafetensorsWeights { origin: index_path, shards, index })
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

/// Bytes copied out of the mapping between two page releases: bounds the mapped pages a load keeps resident
/// beside the weights to one chunk, whatever the tensor's size.
const COPY_CHUNK: usize = 32 << 20;

/// Copies a tensor's little-endian bytes (at `range` of `mmap`, stored as `file_kind`) into a new CPU tensor of
/// `kind` and `shape`, [`COPY_CHUNK`] bytes at a time: each chunk is converted on the way (so a bf16 file loads
/// as f32 without a whole-tensor bf16 transient) and its mapped pages are released as soon as it is copied
/// ([`release_pages`]). The transient is one chunk, whatever the tensor.
fn copy_out(mmap: &Mmap, range: std::ops::Range<usize>, file_kind: Kind, kind: Kind, shape: &[i64]) -> Result<Tensor> {
    let t = Tensor::f_empty(shape, (kind, Device::Cpu))?;
    let elt = file_kind.elt_size_in_bytes();
    let n = range.end - range.start;
    if t.numel() * elt != n {
        return Err(ModelError::InvalidArgument(format!("tensor data is {n} bytes, its shape needs another size")));
    }
    let flat = t.f_reshape([-1])?;
    // Ask the kernel to read the whole tensor ahead (page cache only: nothing is mapped into the process), so the
    // chunks below copy pages already read or in flight instead of faulting them in one readahead window at a time.
    #[cfg(unix)]
    let _ = mmap.advise_range(memmap2::Advice::WillNeed, range.start, n);
    let per_chunk = (COPY_CHUNK / elt).max(1);
    let mut done = 0usize;
    while done < t.numel() {
        let len = per_chunk.min(t.numel() - done);
        let bytes = range.start + done * elt..range.start + (done + len) * elt;
        let src = mmap.get(bytes.clone()).ok_or_else(|| ModelError::InvalidArgument("data past the mapping".into()))?;
        if src.len() != len * elt {
            return Err(ModelError::InvalidArgument("data past the mapping".into()));
        }
        // SAFETY: the view covers exactly `src` (`len` values of `elt` bytes, checked above), which stays mapped
        // and unmodified while the view lives: the view is dropped at the end of this iteration, before the pages
        // are released and before `mmap` can go. libtorch only reads it (it is the source of `copy_`), so the
        // read-only mapping is never written through it. Aliasing: no Rust `&mut` to these bytes exists (the map is
        // read-only); threads: the view never leaves this call, and libtorch's copy reads the bytes from threads of
        // its own pool only within `copy_`, which returns after they finish. Only an aligned pointer is viewed (a
        // file whose data is not aligned to its element size takes the copying path).
        let mut dst = flat.f_narrow(0, done as i64, len as i64)?;
        if (src.as_ptr() as usize).is_multiple_of(elt) {
            let view = unsafe { Tensor::f_from_blob(src.as_ptr(), &[len as i64], &[1], file_kind, Device::Cpu)? };
            dst.f_copy_(&view)?;
            drop(view);
        } else {
            dst.f_copy_(&Tensor::f_from_data_size(src, &[len as i64], file_kind)?)?;
        }
        release_pages(mmap, bytes);
        done += len;
    }
    Ok(t)
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
        copy_out(&shard.mmap, range, file_kind, kind, &shape).map_err(|e| match e {
            ModelError::InvalidArgument(m) => {
                ModelError::Safetensors { path: shard.path.clone(), message: format!("`{name}`: {m}") }
            }
            e => e,
        })
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
        src.load(name, Some(shape))?
    };
    check_finite(&t, name, src.origin())?;
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
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
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
    Err(ModelError::NonFinite { name: name.into(), layer: layer_of(name), file: file.to_path_buf(), count: bad as u64 })
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
