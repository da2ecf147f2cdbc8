//! Whether a device can run a floating-point dtype, checked once when a model is placed: a pair the device cannot
//! run (f16 or bf16 on a device or libtorch build without those kernels, an 8-bit float anywhere) is refused by
//! name before any weight is read, instead of failing deep inside a forward pass or producing garbage.
//!
//! The check is empirical: it runs each kind of operation the decoder uses (a matrix product, RMSNorm, scaled
//! dot-product attention, SiLU) on a few elements of that dtype on that device, and turns libtorch's refusal into
//! [`ModelError::UnsupportedDtype`]. It draws no random numbers, so seeded results are unchanged by it.
//!
//! ```
//! use lora_model::dtype_support::{check_dtype, dtype_name};
//! use lora_model::tch::{Device, Kind};
//! assert!(check_dtype(Device::Cpu, Kind::Float).is_ok());
//! let err = check_dtype(Device::Cpu, Kind::Int64).err().ok_or("int64 weights must be refused")?;
//! assert!(err.to_string().contains(dtype_name(Kind::Int64)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::weights::Placement;

/// The name a dtype goes by in messages: the `--dtype` spelling for the three the decoder runs (`f32`, `bf16`,
/// `f16`), libtorch's otherwise (`f64`, `float8_e4m3fn`, `int64`, …).
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Double => "f64",
        Kind::Float8e5m2 => "float8_e5m2",
        Kind::Float8e4m3fn => "float8_e4m3fn",
        Kind::Float8e5m2fnuz => "float8_e5m2fnuz",
        Kind::Float8e4m3fnuz => "float8_e4m3fnuz",
        Kind::Uint8 => "uint8",
        Kind::Int8 => "int8",
        Kind::Int16 => "int16",
        Kind::Int => "int32",
        Kind::Int64 => "int64",
        Kind::Bool => "bool",
        Kind::ComplexHalf => "complex32",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        Kind::QInt8 => "qint8",
        Kind::QUInt8 => "quint8",
        Kind::QInt32 => "qint32",
    }
}

/// The name a device goes by in messages and on the command line (`cpu`, `cuda:N`).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// Refuses, by name, a device that is not there or a dtype it cannot run (see the module docs); `Ok` means the
/// decoder's operations ran on a few elements of `kind` on `device`.
pub fn check_dtype(device: Device, kind: Kind) -> Result<()> {
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count();
        if !tch::Cuda::is_available() || n as i64 >= count {
            return Err(ModelError::InvalidArgument(format!(
                "device {} is not available here ({count} CUDA device(s) visible to libtorch; a CPU-only build \
                 sees none: build with LORA_BOUNDARY_CUDA=1)",
                device_name(device)
            )));
        }
    }
    let refuse = |reason: String| ModelError::UnsupportedDtype {
        dtype: dtype_name(kind).into(),
        device: device_name(device),
        reason,
    };
    if !matches!(
        kind,
        Kind::Float
            | Kind::Double
            | Kind::Half
            | Kind::BFloat16
            | Kind::Float8e5m2
            | Kind::Float8e4m3fn
            | Kind::Float8e5m2fnuz
            | Kind::Float8e4m3fnuz
    ) {
        return Err(refuse("not a floating-point type".into()));
    }
    run_decoder_ops(device, kind).map_err(|e| refuse(first_line(&e.to_string())))
}

/// [`check_dtype`] for a placement.
pub fn check_placement(place: Placement) -> Result<()> {
    check_dtype(place.device, place.kind)
}

/// One of each operation the decoder runs, on a few elements; the final host read waits for the device, so an
/// asynchronous kernel failure surfaces here too.
fn run_decoder_ops(device: Device, kind: Kind) -> std::result::Result<(), tch::TchError> {
    let _guard = tch::no_grad_guard();
    let opts = (kind, device);
    let x = Tensor::f_ones([2, 8], opts)?;
    let w = Tensor::f_ones([4, 8], opts)?;
    let y = x.f_matmul(&w.f_tr()?)?;
    let norm = y.f_rms_norm([4], Some(&Tensor::f_ones([4], opts)?), 1e-5)?;
    let q = Tensor::f_ones([1, 2, 3, 4], opts)?;
    let att = Tensor::f_scaled_dot_product_attention(&q, &q, &q, None::<Tensor>, 0.0, true, None, false)?;
    let total = norm.f_silu()?.f_sum(Kind::Float)?.f_add(&att.f_sum(Kind::Float)?)?;
    let value = total.f_to_device(Device::Cpu)?.f_double_value(&[])?;
    if !value.is_finite() {
        return Err(tch::TchError::Kind(format!("the test operations gave a non-finite value ({value})")));
    }
    Ok(())
}

/// libtorch's messages carry a C++ backtrace after the first line; the first line is the reason.
fn first_line(message: &str) -> String {
    message.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("libtorch refused the operation").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_runs_the_three_decoder_dtypes() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            check_dtype(Device::Cpu, kind).unwrap_or_else(|e| panic!("{}: {e}", dtype_name(kind)));
        }
    }

    #[test]
    fn what_the_cpu_cannot_run_is_refused_by_name() {
        // libtorch 2.11's CPU kernels have no 8-bit float matrix product.
        let e = check_dtype(Device::Cpu, Kind::Float8e4m3fn).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ModelError::UnsupportedDtype { .. }), "{msg}");
        assert!(msg.starts_with("dtype float8_e4m3fn cannot run on cpu: "), "{msg}");
        assert!(!msg.contains('\n'), "one line, no backtrace: {msg}");
        let e = check_dtype(Device::Cpu, Kind::Int64).unwrap_err().to_string();
        assert_eq!(e, "dtype int64 cannot run on cpu: not a floating-point type");
    }

    #[test]
    fn a_cuda_device_that_is_not_there_is_refused_by_name() {
        let n = tch::Cuda::device_count() as usize;
        let e = check_placement(Placement { device: Device::Cuda(n), kind: Kind::Float }).unwrap_err();
        assert!(e.to_string().contains(&format!("device cuda:{n} is not available")), "{e}");
    }
}
