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

/// Converts raw little-endian bytes of a safetensors dtype to a CPU tensor of the same kind.
fn bytes_to_tensor(bytes: &[u8], dtype: Dtype, shape: &[i64], name: &str, path: &Path) -> Result<Tensor> {
    let kind = match dtype {
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
    };
    Ok(Tensor::f_from_data_size(bytes, shape, kind)?)
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
        let bytes = shard.mmap.get(shard.header_len + start..shard.header_len + end).ok_or_else(|| {
            ModelError::Safetensors {
                path: shard.path.clone(),
                message: format!("data of `{name}` lies past the end of the file"),
            }
        })?;
        bytes_to_tensor(bytes, info.dtype, &shape, name, &shard.path)
    }
}

/// Loads a tensor from a source and places it (device, kind).
pub(crate) fn load_placed(src: &dyn WeightSource, name: &str, shape: &[i64], place: Placement) -> Result<Tensor> {
    let t = src.load(name, Some(shape))?;
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
    let tmp = tmp_path(path);
    let refs: Vec<(String, &View)> = views.iter().map(|(n, v)| (n.clone(), v)).collect();
    safetensors::serialize_to_file(refs, metadata, &tmp)
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// A sibling temporary path for atomic writes.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Writes a text file atomically.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, contents).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}
