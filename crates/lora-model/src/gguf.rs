//! GGUF import: a reader for llama.cpp's GGUF v2/v3 files over a memory map.
//!
//! [`GgufFile::open`] parses the header, the metadata key/value pairs and the tensor table, and
//! checks that every tensor of a known storage type lies inside the file. Tensors are decoded on
//! demand with [`GgufFile::dequantize`], bit-exactly as gguf-py's `gguf.quants.dequantize` does.
//! The submodules turn what a GGUF holds into what the rest of this crate expects: Hugging Face
//! tensor names and row order ([`hf_tensor_name`], [`unpermute_qk`]), an HF `config.json`
//! ([`hf_config`]) and a `tokenizers` tokenizer ([`gguf_tokenizer`]).

mod convert;
mod dequant;
mod tokenizer;

pub use convert::{gemma3_hf_config, hf_config, hf_tensor_name, hf_tensor_name_for, unpermute_qk, QkKind};
pub use tokenizer::{gguf_chat_template, gguf_tokenizer, GgufSpecialTokens};

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// The magic number at the start of every GGUF file (`"GGUF"` in little-endian byte order).
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The tensor data alignment when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;

/// Nesting limit for array metadata values (guards against hostile files).
const MAX_ARRAY_DEPTH: usize = 4;

/// Upper bound on tensor dimensions (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `UINT8` (type 0).
    U8(u8),
    /// `INT8` (type 1).
    I8(i8),
    /// `UINT16` (type 2).
    U16(u16),
    /// `INT16` (type 3).
    I16(i16),
    /// `UINT32` (type 4).
    U32(u32),
    /// `INT32` (type 5).
    I32(i32),
    /// `FLOAT32` (type 6).
    F32(f32),
    /// `BOOL` (type 7).
    Bool(bool),
    /// `STRING` (type 8), UTF-8.
    String(String),
    /// `ARRAY` (type 9): the element type id and the elements.
    Array(u32, Vec<GgufValue>),
    /// `UINT64` (type 10).
    U64(u64),
    /// `INT64` (type 11).
    I64(i64),
    /// `FLOAT64` (type 12).
    F64(f64),
}

impl GgufValue {
    /// The GGUF name of this value's type (`"uint32"`, `"array"`, ...), for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::F32(_) => "float32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(..) => "array",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F64(_) => "float64",
        }
    }

    /// The value as a signed integer when it is an integer of any width that fits `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(i64::from(v)),
            GgufValue::I8(v) => Some(i64::from(v)),
            GgufValue::U16(v) => Some(i64::from(v)),
            GgufValue::I16(v) => Some(i64::from(v)),
            GgufValue::U32(v) => Some(i64::from(v)),
            GgufValue::I32(v) => Some(i64::from(v)),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as an unsigned integer when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }

    /// The value as an `f64` when it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(f64::from(v)),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice when it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool when it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements when the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, items) => Some(items),
            _ => None,
        }
    }
}

/// Decodes one block of raw bytes into its values.
type BlockDecoder = fn(&[u8], &mut [f32]);

/// A ggml tensor storage type, by its numeric id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// `F32`.
    pub const F32: GgmlType = GgmlType(0);
    /// `F16`.
    pub const F16: GgmlType = GgmlType(1);
    /// `Q4_0`.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// `Q4_1`.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// `Q5_0`.
    pub const Q5_0: GgmlType = GgmlType(6);
    /// `Q5_1`.
    pub const Q5_1: GgmlType = GgmlType(7);
    /// `Q8_0`.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// `Q2_K`.
    pub const Q2_K: GgmlType = GgmlType(10);
    /// `Q3_K`.
    pub const Q3_K: GgmlType = GgmlType(11);
    /// `Q4_K`.
    pub const Q4_K: GgmlType = GgmlType(12);
    /// `Q5_K`.
    pub const Q5_K: GgmlType = GgmlType(13);
    /// `Q6_K`.
    pub const Q6_K: GgmlType = GgmlType(14);
    /// `BF16`.
    pub const BF16: GgmlType = GgmlType(30);

    /// ggml's name for the type (`"Q4_1"`), or `"type N"` for one this reader does not know.
    pub fn name(self) -> String {
        let known = match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            _ => return format!("type {}", self.0),
        };
        known.to_string()
    }

    /// `(elements per block, bytes per block)` for the types [`GgufFile::dequantize`] decodes.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self.0 {
            0 => (1, 4),
            1 => (1, 2),
            30 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            _ => return None,
        })
    }

    /// The block decoder for this type.
    fn decoder(self) -> Option<BlockDecoder> {
        Some(match self.0 {
            0 => dequant::f32_block,
            1 => dequant::f16_block,
            30 => dequant::bf16_block,
            2 => dequant::q4_0,
            3 => dequant::q4_1,
            6 => dequant::q5_0,
            7 => dequant::q5_1,
            8 => dequant::q8_0,
            10 => dequant::q2_k,
            11 => dequant::q3_k,
            12 => dequant::q4_k,
            13 => dequant::q5_k,
            14 => dequant::q6_k,
            _ => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Where one tensor lives in a GGUF file and how it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor's name in the file (GGUF naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` (ne0) is the fastest-varying one, the row length.
    pub dims: Vec<u64>,
    /// The storage type.
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The number of elements (the product of the dimensions), `None` on overflow.
    pub fn n_elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// The shape in PyTorch order (ggml dims reversed), `None` when a dimension does not fit `usize`.
    pub fn shape(&self) -> Option<Vec<usize>> {
        self.dims.iter().rev().map(|&d| usize::try_from(d).ok()).collect()
    }

    /// The stored size in bytes for a type this reader decodes, `None` for other types, a row
    /// length that is not a whole number of blocks, or an overflow.
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, size) = self.ggml_type.block_layout()?;
        let ne0 = *self.dims.first().unwrap_or(&1);
        if !ne0.is_multiple_of(block as u64) {
            return None;
        }
        (self.n_elements()? / block as u64).checked_mul(size as u64)
    }
}

/// An open GGUF file: parsed metadata and tensor table over a read-only memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: BTreeMap<String, usize>,
    alignment: u64,
    data_start: usize,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

/// A bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, message: String) -> ModelError {
        ModelError::Gguf { path: self.path.to_path_buf(), message }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            self.err(format!(
                "truncated file: {what} needs {n} bytes at offset {}, file has {}",
                self.pos,
                self.buf.len()
            ))
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// A count that must be satisfiable by the remaining bytes at `min_item` bytes per item.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let fits =
            usize::try_from(n).ok().filter(|&n| n.checked_mul(min_item.max(1)).is_some_and(|b| b <= self.remaining()));
        fits.ok_or_else(|| {
            self.err(format!(
                "{what} is {n}, more than the {} bytes left at offset {} can hold",
                self.remaining(),
                self.pos
            ))
        })
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(key)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("metadata `{key}`: invalid bool byte {b}"))),
            },
            8 => GgufValue::String(self.string(&format!("metadata `{key}` string"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!("metadata `{key}`: arrays nested too deeply")));
                }
                let elem = self.u32(key)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    t => return Err(self.err(format!("metadata `{key}`: unknown array element type {t}"))),
                };
                let n = self.count(&format!("metadata `{key}` array length"), min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(elem, items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(key)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.err(format!("metadata `{key}`: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF v2 or v3 file.
    ///
    /// Fails with [`ModelError::Io`] when the file cannot be read and [`ModelError::Gguf`] when it
    /// is not a GGUF file, is truncated, or describes a tensor of a known type that does not fit
    /// inside it. Tensors of types this reader cannot decode are listed, and fail only when
    /// dequantized.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the map is read-only and private to this struct; like every mmap-based model
        // loader we assume the file is not truncated by another process while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: memmap2::Mmap) -> Result<Self> {
        let mut c = Cursor { buf: &mmap[..], pos: 0, path: &path };
        let magic = c.array::<4>("magic")?;
        if magic != GGUF_MAGIC {
            return Err(c.err(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("unsupported GGUF version {version} (supported: 2, 3)")));
        }
        // name (8) + n_dims (4) + type (4) + offset (8) at least
        let n_tensors = c.u64("tensor count")?;
        // key (8) + type (4) + smallest value (1)
        let n_kv = c.count("metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let n_tensors = usize::try_from(n_tensors)
            .ok()
            .filter(|&n| n.checked_mul(24).is_some_and(|b| b <= c.remaining()))
            .ok_or_else(|| c.err(format!("tensor count {n_tensors} does not fit in the file")))?;
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut index = BTreeMap::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&name)?;
            if n_dims > MAX_DIMS {
                return Err(c.err(format!("tensor `{name}`: {n_dims} dimensions (at most {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ggml_type = GgmlType(c.u32(&name)?);
            let offset = c.u64(&name)?;
            if index.insert(name.clone(), i).is_some() {
                return Err(c.err(format!("duplicate tensor `{name}`")));
            }
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|&a| a > 0 && a.is_power_of_two())
                .ok_or_else(|| c.err(format!("`general.alignment` is {v:?}, not a power of two")))?,
        };
        let pos = c.pos as u64;
        let data_start = pos.div_ceil(alignment).saturating_mul(alignment);
        let data_start = usize::try_from(data_start)
            .ok()
            .filter(|&d| d <= mmap.len())
            .ok_or_else(|| c.err(format!("data section at {data_start} is past the end of the file")))?;
        let data_len = (mmap.len() - data_start) as u64;
        for t in &tensors {
            if t.n_elements().is_none() {
                return Err(c.err(format!("tensor `{}`: dimensions {:?} overflow", t.name, t.dims)));
            }
            if t.ggml_type.block_layout().is_none() {
                continue;
            }
            let n_bytes = t.n_bytes().ok_or_else(|| {
                c.err(format!("tensor `{}`: {:?} of {} is not a whole number of blocks", t.name, t.dims, t.ggml_type))
            })?;
            if t.offset.checked_add(n_bytes).is_none_or(|end| end > data_len) {
                return Err(c.err(format!(
                    "tensor `{}`: {} bytes at data offset {} run past the end of the file \
                     (data section is {} bytes)",
                    t.name, n_bytes, t.offset, data_len
                )));
            }
        }
        Ok(GgufFile { path, mmap, version, metadata, tensors, index, alignment, data_start })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// One metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A [`ModelError::Gguf`] about this file.
    pub(crate) fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), message: message.into() }
    }

    fn typed<'a, T>(&'a self, key: &str, want: &str, f: impl FnOnce(&'a GgufValue) -> Option<T>) -> Result<T> {
        let v = self.get(key).ok_or_else(|| self.err(format!("missing metadata key `{key}`")))?;
        f(v).ok_or_else(|| self.err(format!("metadata `{key}` is {} {}, expected {want}", v.type_name(), short(v))))
    }

    fn typed_opt<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        f: impl FnOnce(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.typed(key, want, f).map(Some)
    }

    /// An unsigned integer of any width (negative signed values are an error).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.typed(key, "a non-negative integer", GgufValue::as_u64)
    }

    /// Like [`GgufFile::get_u64`], `Ok(None)` when the key is absent.
    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.typed_opt(key, "a non-negative integer", GgufValue::as_u64)
    }

    /// A signed integer of any width.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.typed(key, "an integer", GgufValue::as_i64)
    }

    /// A float (or integer), as `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.typed(key, "a number", |v| v.as_f64().map(|x| x as f32))
    }

    /// Like [`GgufFile::get_f32`], `Ok(None)` when the key is absent.
    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>> {
        self.typed_opt(key, "a number", |v| v.as_f64().map(|x| x as f32))
    }

    /// A float (or integer), as `f64`.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.typed(key, "a number", GgufValue::as_f64)
    }

    /// A bool.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    /// Like [`GgufFile::get_bool`], `Ok(None)` when the key is absent.
    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.typed_opt(key, "a bool", GgufValue::as_bool)
    }

    /// A string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    /// Like [`GgufFile::get_str`], `Ok(None)` when the key is absent.
    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.typed_opt(key, "a string", GgufValue::as_str)
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.typed(key, "an array of strings", |v| v.as_array()?.iter().map(GgufValue::as_str).collect())
    }

    /// An array of integers of any width, as `i64`.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        self.typed(key, "an array of integers", |v| v.as_array()?.iter().map(GgufValue::as_i64).collect())
    }

    /// An array of numbers, as `f32`.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.typed(key, "an array of numbers", |v| v.as_array()?.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name).ok_or_else(|| self.err(format!("no tensor `{name}` in the file")))
    }

    /// The raw stored bytes of a tensor whose type this reader knows.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        Ok(&self.mmap[self.tensor_range(name)?]) // ok: tensor_range checks the range lies inside the map
    }

    /// Where a tensor's stored bytes lie in the file (checked to lie inside it).
    fn tensor_range(&self, name: &str) -> Result<std::ops::Range<usize>> {
        let t = self.info_or_err(name)?;
        let n_bytes = t
            .n_bytes()
            .ok_or_else(|| self.err(format!("tensor `{name}`: unsupported type {} for {:?}", t.ggml_type, t.dims)))?;
        let range = usize::try_from(t.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start))
            .and_then(|s| Some(s..s.checked_add(usize::try_from(n_bytes).ok()?)?))
            .filter(|r| r.end <= self.mmap.len())
            .ok_or_else(|| self.err(format!("tensor `{name}`: data runs past the end of the file")))?;
        Ok(range)
    }

    /// Decodes a tensor to `f32`, row-major, with its shape in PyTorch order (ggml dims reversed).
    ///
    /// Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K;
    /// the values are bit-identical to gguf-py's `gguf.quants.dequantize`.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let shape = self.dequantized_shape(name)?;
        let mut out = vec![0f32; shape.iter().product()];
        self.dequantize_into(name, &mut out)?;
        Ok((out, shape))
    }

    /// The shape (PyTorch order) [`GgufFile::dequantize`] gives a tensor, after checking that this reader decodes
    /// its type and that its stored size matches.
    ///
    /// # Errors
    /// As [`GgufFile::dequantize`].
    pub fn dequantized_shape(&self, name: &str) -> Result<Vec<usize>> {
        self.decoder_for(name).map(|(_, shape)| shape)
    }

    /// [`GgufFile::dequantize`] into `out`, which must hold exactly the tensor's values (see
    /// [`GgufFile::dequantized_shape`]): for a caller that owns the destination (a tensor's memory), so the values
    /// are written once.
    ///
    /// Returns the tensor's shape (PyTorch order).
    ///
    /// # Errors
    /// As [`GgufFile::dequantize`], and [`ModelError::Gguf`] when `out` has another length.
    pub fn dequantize_into(&self, name: &str, out: &mut [f32]) -> Result<Vec<usize>> {
        let ((decode, block, size), shape) = self.decoder_for(name)?;
        let n: usize = shape.iter().product();
        if out.len() != n {
            return Err(self.err(format!("tensor `{name}`: {n} values, the destination holds {}", out.len())));
        }
        let mapped = self.tensor_range(name)?;
        let bytes = &self.mmap[mapped.clone()]; // ok: tensor_range checks the range lies inside the map
        if block == 1 {
            decode(bytes, out);
        } else {
            for (y, b) in out.chunks_exact_mut(block).zip(bytes.chunks_exact(size)) {
                decode(b, y);
            }
        }
        crate::weights::release_pages(&self.mmap, mapped);
        Ok(shape)
    }

    /// The block decoder of a tensor (with its block length and stored block size) and its shape, once the
    /// stored size is checked against both.
    fn decoder_for(&self, name: &str) -> Result<((BlockDecoder, usize, usize), Vec<usize>)> {
        let t = self.info_or_err(name)?;
        let (decode, (block, size)) = match (t.ggml_type.decoder(), t.ggml_type.block_layout()) {
            (Some(d), Some(l)) => (d, l),
            _ => {
                return Err(self.err(format!(
                    "tensor `{name}`: unsupported ggml type {} (supported: F32, F16, BF16, Q4_0, \
                     Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                    t.ggml_type
                )))
            }
        };
        let stored = self.tensor_range(name)?.len();
        let shape = t.shape().ok_or_else(|| self.err(format!("tensor `{name}`: dimensions do not fit in memory")))?;
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        n.filter(|&n| n / block * size == stored && n % block == 0)
            .ok_or_else(|| self.err(format!("tensor `{name}`: size does not match its type")))?;
        Ok(((decode, block, size), shape))
    }
}

/// A short rendering of a value for error messages.
fn short(v: &GgufValue) -> String {
    match v {
        GgufValue::Array(t, items) => format!("(element type {t}, {} items)", items.len()),
        GgufValue::String(s) if s.len() > 40 => {
            format!("{:?}...", &s[..s.floor_char_boundary_compat(40)])
        }
        other => format!("{other:?}"),
    }
}

/// `str::floor_char_boundary` is unstable; this is the same for our use.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, i: usize) -> usize {
        (0..=i.min(self.len())).rev().find(|&j| self.is_char_boundary(j)).unwrap_or(0)
    }
}
