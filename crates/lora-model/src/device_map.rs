//! Where a model's parts live: blocks placed in order over one or more devices ([`DeviceMap`]), planned from
//! the memory each device has free ([`DeviceMap::plan`]), as accelerate's `device_map="auto"` does.
//!
//! The embedding goes on the first device; blocks follow in order, filling a device before moving on to the next;
//! the final norm and the LM head go with the last block (a tied head gets its own copy of the embedding there
//! when the embedding sits on another device). A hidden state crosses devices only at block boundaries.
//!
//! ```
//! use lora_model::device_map::{DeviceMap, Footprint};
//! use lora_model::tch::Device;
//! // Four blocks of 100 bytes, a 50-byte embedding and head (tied): 300 bytes fit on the first "device".
//! let fp = Footprint { embed: 50, blocks: vec![100; 4], head: 0, tied_head_copy: 50, kv_per_block: 0 };
//! let map = DeviceMap::plan(&fp, &[(Device::Cpu, 300), (Device::Cpu, 1000)])?;
//! assert_eq!(map.segments(), vec![(0..2, 0), (2..4, 1)]);
//! # Ok::<(), lora_model::ModelError>(())
//! ```
use std::fmt;
use std::ops::Range;

use tch::{Device, Kind};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Positions of KV cache the planner reserves room for beside each block's weights (one row), unless the
/// model's context is shorter.
pub const PLANNED_KV_TOKENS: usize = 4096;

/// The bytes each part of a model takes on its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    /// The token embedding.
    pub embed: u64,
    /// Each block's weights.
    pub blocks: Vec<u64>,
    /// The final norm and an untied LM head.
    pub head: u64,
    /// What a tied LM head costs when it sits on another device than the embedding (a copy of the embedding).
    pub tied_head_copy: u64,
    /// The KV cache the planner reserves per block ([`PLANNED_KV_TOKENS`] positions of one row).
    pub kv_per_block: u64,
}

impl Footprint {
    /// The footprint of a model of `config` with weights in `kind`.
    pub fn of(config: &ModelConfig, kind: Kind) -> Self {
        let c = config;
        let elt = kind.elt_size_in_bytes() as u64;
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let q = (c.num_heads * c.head_dim) as u64;
        let kv = (c.num_kv_heads * c.head_dim) as u64;
        let mut per_block = q * h + 2 * kv * h + h * q + 3 * i * h + 2 * h;
        if c.qkv_bias {
            per_block += q + 2 * kv;
        }
        if c.o_bias {
            per_block += h;
        }
        if c.mlp_bias {
            per_block += 2 * i + h;
        }
        let embed = c.vocab_size as u64 * h * elt;
        let tokens = PLANNED_KV_TOKENS.min(c.max_position_embeddings.max(1)) as u64;
        Footprint {
            embed,
            blocks: vec![per_block * elt; c.num_layers],
            head: h * elt + if c.tie_word_embeddings { 0 } else { embed },
            tied_head_copy: if c.tie_word_embeddings { embed } else { 0 },
            kv_per_block: 2 * kv * tokens * elt,
        }
    }

    /// Bytes of the weights on one device (no tied-head copy).
    pub fn weights(&self) -> u64 {
        self.embed + self.blocks.iter().sum::<u64>() + self.head
    }

    /// Bytes of the planned KV cache of all blocks.
    pub fn kv(&self) -> u64 {
        self.kv_per_block * self.blocks.len() as u64
    }
}

/// The device of every part of a model: the embedding (where inputs go), each block, and the final norm and LM
/// head (where logits come out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMap {
    devices: Vec<Device>,
    /// Index into `devices` per block.
    blocks: Vec<usize>,
    embed: usize,
    head: usize,
}

impl DeviceMap {
    /// Everything on `device`.
    pub fn single(device: Device, layers: usize) -> Self {
        DeviceMap { devices: vec![device], blocks: vec![0; layers], embed: 0, head: 0 }
    }

    /// Blocks `0..counts[0]` on `devices[0]`, the next `counts[1]` on `devices[1]`, and so on; the embedding on
    /// the first device, the head with the last block. Every count must be at least 1, and a device may repeat
    /// (two CPU "devices" give a split that runs the cross-device code on one machine).
    pub fn split(devices: &[Device], counts: &[usize]) -> Result<Self> {
        if devices.is_empty() || devices.len() != counts.len() || counts.contains(&0) {
            return Err(ModelError::InvalidArgument(format!(
                "a device split needs one positive block count per device, got devices {devices:?} and counts \
                 {counts:?}"
            )));
        }
        let blocks = counts.iter().enumerate().flat_map(|(d, &n)| std::iter::repeat_n(d, n)).collect();
        Ok(DeviceMap { devices: devices.to_vec(), blocks, embed: 0, head: devices.len() - 1 })
    }

    /// Places the blocks in order over `capacities` (device, bytes free), filling each device before the next,
    /// as accelerate's `device_map="auto"`: the embedding on the first device, the final norm and LM head with
    /// the last block. Each block reserves its planned KV cache beside its weights. Devices left with no block
    /// are dropped. A model that does not fit is refused, naming what it needs and what each device has.
    pub fn plan(fp: &Footprint, capacities: &[(Device, u64)]) -> Result<Self> {
        let n = fp.blocks.len();
        let too_large = |why: String| {
            let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
            let have: Vec<String> =
                capacities.iter().map(|(d, c)| format!("{} {:.2} GiB", name(*d), gib(*c))).collect();
            ModelError::Limit(format!(
                "the model does not fit: it needs about {:.2} GiB (weights {:.2} GiB + KV cache {:.2} GiB for {} \
                 positions of one row), {why}; free: {}",
                gib(fp.weights() + fp.kv()),
                gib(fp.weights()),
                gib(fp.kv()),
                PLANNED_KV_TOKENS,
                have.join(", ")
            ))
        };
        if capacities.is_empty() {
            return Err(ModelError::InvalidArgument("no device to place the model on".into()));
        }
        let mut blocks = Vec::with_capacity(n);
        let mut d = 0usize;
        let mut used = fp.embed;
        if used > capacities[0].1 {
            return Err(too_large(format!("the embedding alone exceeds {}", name(capacities[0].0))));
        }
        for (l, &size) in fp.blocks.iter().enumerate() {
            let last = l + 1 == n;
            loop {
                let head = if last { fp.head + if d == 0 { 0 } else { fp.tied_head_copy } } else { 0 };
                let need = size + fp.kv_per_block + head;
                if used.saturating_add(need) <= capacities[d].1 {
                    used += need;
                    break;
                }
                d += 1;
                used = 0;
                if d == capacities.len() {
                    return Err(too_large(format!("block {l} finds no room")));
                }
            }
            blocks.push(d);
        }
        if n == 0 && used.saturating_add(fp.head) > capacities[0].1 {
            return Err(too_large("the head finds no room".into()));
        }
        // Keep only the devices that received something, renumbered in order.
        let last = blocks.last().copied().unwrap_or(0);
        let mut keep: Vec<usize> = blocks.clone();
        keep.insert(0, 0);
        keep.dedup();
        let devices: Vec<Device> = keep.iter().map(|&i| capacities[i].0).collect();
        let index = |i: usize| keep.iter().position(|&k| k == i).unwrap_or(0);
        let blocks = blocks.into_iter().map(index).collect();
        Ok(DeviceMap { devices, blocks, embed: 0, head: index(last) })
    }

    /// Plans over `devices` by the memory each has free now ([`free_memory`]); a device whose free memory
    /// cannot be read is taken as unlimited.
    pub fn plan_free(fp: &Footprint, devices: &[Device]) -> Result<Self> {
        let caps: Vec<(Device, u64)> = devices.iter().map(|&d| (d, free_memory(d).unwrap_or(u64::MAX))).collect();
        Self::plan(fp, &caps)
    }

    /// The device inputs (token ids, position ids, masks) go to: the embedding's.
    pub fn input(&self) -> Device {
        self.devices[self.embed]
    }

    /// The device of the final norm and LM head, where logits are produced.
    pub fn output(&self) -> Device {
        self.devices[self.head]
    }

    /// The device of block `layer` (the output device past the last block).
    pub fn block(&self, layer: usize) -> Device {
        self.blocks.get(layer).map_or(self.output(), |&d| self.devices[d])
    }

    /// The slot (index into [`DeviceMap::devices`]) of block `layer`; two slots may be the same device.
    pub fn slot(&self, layer: usize) -> usize {
        self.blocks.get(layer).copied().unwrap_or(self.head)
    }

    /// The devices in order of use (a device may appear twice in a split).
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Number of blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Whether everything is on one device slot.
    pub fn is_single(&self) -> bool {
        self.devices.len() == 1
    }

    /// Whether every part is on the CPU.
    pub fn all_cpu(&self) -> bool {
        self.devices.iter().all(|&d| d == Device::Cpu)
    }

    /// Consecutive block ranges with their device slot, in order.
    pub fn segments(&self) -> Vec<(Range<usize>, usize)> {
        let mut out: Vec<(Range<usize>, usize)> = Vec::new();
        for (l, &d) in self.blocks.iter().enumerate() {
            match out.last_mut() {
                Some((r, slot)) if *slot == d => r.end = l + 1,
                _ => out.push((l..l + 1, d)),
            }
        }
        out
    }
}

impl fmt::Display for DeviceMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .segments()
            .into_iter()
            .map(|(r, d)| format!("blocks {}-{} on {}", r.start, r.end - 1, name(self.devices[d])))
            .collect();
        write!(f, "{}; head on {}", parts.join(", "), name(self.output()))
    }
}

/// `cpu` or `cuda:N`.
pub use crate::dtype_support::device_name as name;

/// Bytes free on `device` now: `MemAvailable` of `/proc/meminfo` for the CPU, `cudaMemGetInfo` for a CUDA device
/// (read through the CUDA runtime libtorch loaded); `None` when it cannot be read.
pub fn free_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => crate::generate::available_memory(),
        Device::Cuda(n) => cuda_free_memory(n),
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn cuda_free_memory(index: usize) -> Option<u64> {
    use std::ffi::{c_int, c_void, CStr};
    type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
    type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const std::ffi::c_char) -> *mut c_void;
    }
    if !tch::Cuda::is_available() || index as i64 >= tch::Cuda::device_count() {
        return None;
    }
    let index = c_int::try_from(index).ok()?;
    // RTLD_DEFAULT on glibc: the null handle searches the global scope, where libtorch_cuda's cudart lives.
    let lookup = |sym: &CStr| {
        // SAFETY: `sym` is a NUL-terminated C string and the null handle is glibc's RTLD_DEFAULT; dlsym only reads
        // the loaded objects' symbol tables (it is thread-safe) and returns null when the symbol is absent.
        let p = unsafe { dlsym(std::ptr::null_mut(), sym.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    let get = lookup(c"cudaGetDevice")?;
    let set = lookup(c"cudaSetDevice")?;
    let info = lookup(c"cudaMemGetInfo")?;
    // SAFETY: the three pointers are the CUDA runtime's own functions with these C signatures (cuda_runtime_api.h:
    // `cudaError_t cudaGetDevice(int*)`, `cudaSetDevice(int)`, `cudaMemGetInfo(size_t*, size_t*)`). Threads: the
    // runtime API is thread-safe and the current device is per host thread, so switching it here affects only this
    // thread, and it is restored before returning. Aliasing: the out-pointers are to locals of this frame that
    // nothing else references.
    unsafe {
        let get: GetDevice = std::mem::transmute::<*mut c_void, GetDevice>(get);
        let set: SetDevice = std::mem::transmute::<*mut c_void, SetDevice>(set);
        let info: MemGetInfo = std::mem::transmute::<*mut c_void, MemGetInfo>(info);
        let mut current: c_int = 0;
        if get(&mut current) != 0 || set(index) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        let ok = info(&mut free, &mut total) == 0;
        set(current);
        ok.then_some(free as u64)
    }
}

#[cfg(not(target_os = "linux"))]
fn cuda_free_memory(_index: usize) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(blocks: usize) -> Footprint {
        Footprint { embed: 40, blocks: vec![100; blocks], head: 10, tied_head_copy: 40, kv_per_block: 5 }
    }

    #[test]
    fn fills_devices_in_order() {
        // Device 0: embed 40 + 3 × 105 = 355 ≤ 360; device 1 takes the rest and the head (+ tied copy).
        let map = DeviceMap::plan(&fp(6), &[(Device::Cuda(0), 360), (Device::Cpu, 1000)]).unwrap();
        assert_eq!(map.segments(), vec![(0..3, 0), (3..6, 1)]);
        assert_eq!(map.input(), Device::Cuda(0));
        assert_eq!(map.output(), Device::Cpu);
        assert_eq!(map.block(2), Device::Cuda(0));
        assert_eq!(map.block(3), Device::Cpu);
        assert_eq!(map.to_string(), "blocks 0-2 on cuda:0, blocks 3-5 on cpu; head on cpu");
    }

    #[test]
    fn everything_fits_on_the_first_device() {
        let map = DeviceMap::plan(&fp(4), &[(Device::Cuda(0), 10_000), (Device::Cuda(1), 10_000)]).unwrap();
        assert!(map.is_single());
        assert_eq!(map.devices(), &[Device::Cuda(0)]);
        assert_eq!(map.segments(), vec![(0..4, 0)]);
    }

    #[test]
    fn the_head_moves_the_last_block_when_it_does_not_fit_beside_it() {
        // 40 + 4 × 105 = 460 fits, but the last block with the head (10) does not: block 3 goes to device 1, with
        // the tied head copy (40).
        let map = DeviceMap::plan(&fp(4), &[(Device::Cuda(0), 465), (Device::Cuda(1), 200)]).unwrap();
        assert_eq!(map.segments(), vec![(0..3, 0), (3..4, 1)]);
        // With no room for the copy there, nothing fits.
        let err = DeviceMap::plan(&fp(4), &[(Device::Cuda(0), 465), (Device::Cuda(1), 150)]).unwrap_err();
        assert!(err.to_string().contains("block 3 finds no room"), "{err}");
    }

    #[test]
    fn three_devices_in_order() {
        let map =
            DeviceMap::plan(&fp(5), &[(Device::Cuda(0), 250), (Device::Cuda(1), 215), (Device::Cpu, 1000)]).unwrap();
        assert_eq!(map.segments(), vec![(0..2, 0), (2..4, 1), (4..5, 2)]);
        assert_eq!(map.devices(), &[Device::Cuda(0), Device::Cuda(1), Device::Cpu]);
    }

    #[test]
    fn a_device_too_small_for_any_block_is_passed_over() {
        let map =
            DeviceMap::plan(&fp(2), &[(Device::Cuda(0), 250), (Device::Cuda(1), 50), (Device::Cpu, 1000)]).unwrap();
        assert_eq!(map.segments(), vec![(0..1, 0), (1..2, 1)]);
        assert_eq!(map.devices(), &[Device::Cuda(0), Device::Cpu]);
    }

    #[test]
    fn too_large_names_need_and_free() {
        let err = DeviceMap::plan(&fp(8), &[(Device::Cpu, 500)]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ModelError::Limit(_)));
        assert!(msg.contains("block 4 finds no room") && msg.contains("free: cpu"), "{msg}");
        let err = DeviceMap::plan(&fp(1), &[(Device::Cpu, 30)]).unwrap_err();
        assert!(err.to_string().contains("embedding alone"), "{err}");
    }

    #[test]
    fn split_by_counts() {
        let map = DeviceMap::split(&[Device::Cpu, Device::Cpu], &[2, 3]).unwrap();
        assert_eq!(map.segments(), vec![(0..2, 0), (2..5, 1)]);
        assert_eq!(map.slot(4), 1);
        assert!(!map.is_single() && map.all_cpu());
        assert!(DeviceMap::split(&[Device::Cpu], &[0]).is_err());
        assert!(DeviceMap::split(&[Device::Cpu, Device::Cpu], &[3]).is_err());
    }

    #[test]
    fn footprint_of_a_llama_shape() {
        // Llama-3.2-1B: 1.236 G parameters (tied), bf16 = 2.47 GB.
        let json = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,
            "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"tie_word_embeddings":true,
            "max_position_embeddings":131072}"#;
        let raw: crate::config::HfConfig = serde_json::from_str(json).unwrap();
        let cfg = ModelConfig::from_hf(&raw, std::path::Path::new("config.json")).unwrap();
        let f = Footprint::of(&cfg, Kind::BFloat16);
        assert_eq!(f.weights(), 2 * 1_235_814_400);
        // KV: 2 × 8 heads × 64 × 4096 positions × 2 bytes per block.
        assert_eq!(f.kv_per_block, 2 * 8 * 64 * 4096 * 2);
    }
}
