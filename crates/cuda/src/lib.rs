//! Stride's CUDA backend: the primitives of `stride_autograd` on an NVIDIA GPU.
//!
//! Products run on cuBLAS; convolution is lowered to columns on the GPU and multiplied by
//! cuBLAS, or runs on cuDNN when [`CudaOptions::cudnn`] asks for it (`stride --cudnn fp32` or
//! `tf32`), as do batch norm and max and average pooling (not yet run on a GPU, so not the
//! default); element-wise functions, reductions and max, data movement (permute, narrow, pad,
//! concat, upsampling), every pooling, batch norm, softmax, the NLL loss and the optimizers'
//! updates are NVRTC-compiled kernels (`kernels.cu`). No primitive goes back to the CPU.
//!
//! Everything CUDA is loaded when first asked for ([`init`]), so a machine without a GPU
//! builds and runs Stride; [`probe`] tells what is there without loading anything that is not.

mod backend;

use std::sync::{Arc, Mutex};

use stride_autograd::device;
use stride_tensor::{Device, Error, Result};

pub use backend::{compile_kernels, CudaBackend};

/// Whether cuDNN runs what it can (convolutions, batch norm, max and average pooling), and in
/// which arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cudnn {
    /// Convolutions lowered to columns and multiplied by cuBLAS; the rest on Stride's kernels.
    /// The default until cuDNN's route has passed `scripts/gpu-check.sh` on a GPU.
    #[default]
    Off,
    /// cuDNN held to FP32 (its FMA kernels): results within 1e-4 of the CPU's.
    Fp32,
    /// cuDNN may use tensor cores in TF32, as PyTorch does for convolutions by default.
    Tf32,
}

impl std::str::FromStr for Cudnn {
    type Err = Error;
    /// `off`, `fp32` or `tf32` (`0` and `1` too).
    fn from_str(s: &str) -> Result<Cudnn> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "0" => Ok(Cudnn::Off),
            "fp32" | "on" | "1" => Ok(Cudnn::Fp32),
            "tf32" => Ok(Cudnn::Tf32),
            _ => Err(Error::arg("--cudnn", format!("expected off, fp32 or tf32, got {s:?}"))),
        }
    }
}

impl std::fmt::Display for Cudnn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cudnn::Off => "off",
            Cudnn::Fp32 => "fp32",
            Cudnn::Tf32 => "tf32",
        })
    }
}

/// How a GPU's backend is set up ([`init_with`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    pub cudnn: Cudnn,
}

/// One GPU the driver reports.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: usize,
    pub compute_capability: (i32, i32),
}

pub(crate) fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::device("cuda", format!("{what}: {e:?}"))
}

/// Whether a shared library of cudarc's list can be opened. Looking first means a missing
/// library is an error here, never a panic inside cudarc.
fn present(lib: &str) -> Result<()> {
    // SAFETY: these only try to open the library by name (dlopen) and close it again.
    let found = unsafe {
        match lib {
            "libcuda.so.1" => cudarc::driver::sys::is_culib_present(),
            "libcublas.so.13" => cudarc::cublas::sys::is_culib_present(),
            _ => cudarc::nvrtc::sys::is_culib_present(),
        }
    };
    if !found {
        let hint = if lib == "libcuda.so.1" {
            "is an NVIDIA driver installed?"
        } else {
            "add the CUDA toolkit's (or PyTorch's nvidia/*/lib) directory to LD_LIBRARY_PATH"
        };
        return Err(Error::device(
            "--device cuda",
            format!("no CUDA {} found ({lib}); {hint}", if lib == "libcuda.so.1" { "driver" } else { "library" }),
        ));
    }
    Ok(())
}

/// The GPUs the CUDA driver sees. No driver gives
/// `--device cuda: no CUDA driver found (libcuda.so.1)`.
pub fn probe() -> Result<Vec<GpuInfo>> {
    (0..device_count()?).map(gpu_info).collect()
}

/// How many GPUs the CUDA driver sees (without opening any).
pub fn device_count() -> Result<usize> {
    present("libcuda.so.1")?;
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| err("counting devices", e))?;
    Ok(count.max(0) as usize)
}

/// What the driver says of GPU `ordinal` (opening it: a process that trains on one GPU of
/// several touches only its own).
fn gpu_info(ordinal: usize) -> Result<GpuInfo> {
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| err("opening the device", e))?;
    Ok(GpuInfo {
        ordinal,
        name: ctx.name().map_err(|e| err("device name", e))?,
        memory_bytes: ctx.total_mem().map_err(|e| err("device memory", e))?,
        compute_capability: ctx.compute_capability().map_err(|e| err("compute capability", e))?,
    })
}

/// The backend for `device`: the one already set up, or a new one with the default
/// [`CudaOptions`] (registered, so tensors and models can move there with `.to(device)`).
pub fn init(device: Device) -> Result<Arc<CudaBackend>> {
    setup(device, None)
}

/// Sets up the backend for `device` with `options` (once; later calls with the same options
/// return the same backend, and with others are an error: a device has one backend).
pub fn init_with(device: Device, options: CudaOptions) -> Result<Arc<CudaBackend>> {
    setup(device, Some(options))
}

fn setup(device: Device, options: Option<CudaOptions>) -> Result<Arc<CudaBackend>> {
    static READY: Mutex<Vec<Arc<CudaBackend>>> = Mutex::new(Vec::new());
    let Device::Cuda(ordinal) = device else {
        return Err(Error::device("--device", format!("{device} is not a CUDA device")));
    };
    let mut ready = READY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = ready.iter().find(|b| b.ordinal() == ordinal) {
        return match options {
            Some(o) if o != b.options() => {
                Err(Error::device("cuda", format!("{device} is already set up with {:?}; it cannot be set up again with {o:?}", b.options())))
            }
            _ => Ok(b.clone()),
        };
    }
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::device("--device", format!("cuda:{ordinal} asked for, the driver sees {count} GPU(s)")));
    }
    present("libcublas.so.13")?;
    present("libnvrtc.so.13")?;
    let backend = Arc::new(CudaBackend::new(ordinal, &gpu_info(ordinal)?, options.unwrap_or_default())?);
    device::register::<f32>(backend.clone());
    ready.push(backend.clone());
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cudnn_is_off_unless_asked_for() {
        // Off until the route has passed the GPU check.
        assert_eq!(CudaOptions::default().cudnn, Cudnn::Off);
        for (text, mode) in [("fp32", Cudnn::Fp32), ("1", Cudnn::Fp32), ("off", Cudnn::Off), ("0", Cudnn::Off), ("TF32", Cudnn::Tf32)] {
            assert_eq!(text.parse::<Cudnn>().unwrap(), mode, "{text}");
        }
        for mode in [Cudnn::Off, Cudnn::Fp32, Cudnn::Tf32] {
            assert_eq!(mode.to_string().parse::<Cudnn>().unwrap(), mode);
        }
        let e = "fast".parse::<Cudnn>().unwrap_err().to_string();
        assert!(e.contains("--cudnn") && e.contains("fast"), "{e}");
    }
}
