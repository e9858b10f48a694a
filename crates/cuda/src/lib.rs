//! Stride's CUDA backend: the primitives of `stride_autograd` on an NVIDIA GPU.
//!
//! Products run on cuBLAS; convolution is lowered to columns on the GPU and multiplied by
//! cuBLAS, or runs on cuDNN with `STRIDE_CUDNN=1` (FP32) or `=tf32`, as does training-mode
//! batch norm (not yet run on a GPU, so not the default); element-wise functions, reductions
//! and max, data movement (permute, narrow, pad, concat, upsampling), every pooling, batch
//! norm, softmax, the NLL loss and the optimizers' updates are NVRTC-compiled kernels
//! (`kernels.cu`). No primitive goes back to the CPU.
//!
//! Everything CUDA is loaded when first asked for ([`init`]), so a machine without a GPU
//! builds and runs Stride; [`probe`] tells what is there without loading anything that is not.

mod backend;

use std::sync::{Arc, Mutex};

use stride_autograd::device;
use stride_tensor::{Device, Error, Result};

pub use backend::{compile_kernels, CudaBackend};

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
    present("libcuda.so.1")?;
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| err("counting devices", e))?;
    (0..count.max(0) as usize)
        .map(|ordinal| {
            let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| err("opening the device", e))?;
            Ok(GpuInfo {
                ordinal,
                name: ctx.name().map_err(|e| err("device name", e))?,
                memory_bytes: ctx.total_mem().map_err(|e| err("device memory", e))?,
                compute_capability: ctx.compute_capability().map_err(|e| err("compute capability", e))?,
            })
        })
        .collect()
}

/// Sets up the backend for `device` (once; later calls return the same one) and registers it,
/// so tensors and models can move there with `.to(device)`.
pub fn init(device: Device) -> Result<Arc<CudaBackend>> {
    static READY: Mutex<Vec<Arc<CudaBackend>>> = Mutex::new(Vec::new());
    let Device::Cuda(ordinal) = device else {
        return Err(Error::device("--device", format!("{device} is not a CUDA device")));
    };
    let mut ready = READY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = ready.iter().find(|b| b.ordinal() == ordinal) {
        return Ok(b.clone());
    }
    let gpus = probe()?;
    if ordinal >= gpus.len() {
        return Err(Error::device("--device", format!("cuda:{ordinal} asked for, the driver sees {} GPU(s)", gpus.len())));
    }
    present("libcublas.so.13")?;
    present("libnvrtc.so.13")?;
    let backend = Arc::new(CudaBackend::new(ordinal, &gpus[ordinal])?);
    device::register::<f32>(backend.clone());
    ready.push(backend.clone());
    Ok(backend)
}
