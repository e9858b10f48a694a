//! Where a tensor's elements live. The CPU is the default; any other device holds its elements
//! in a [`DeviceBuffer`] that a backend (registered with `stride-autograd`) made. This crate
//! knows nothing about CUDA: it only carries the buffer and can read it back.

use std::any::Any;
use std::fmt;

use crate::{Elem, Error, ErrorKind, Result};

/// A compute device: the CPU, or a CUDA GPU by ordinal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    pub fn is_cpu(self) -> bool {
        self == Device::Cpu
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    /// `cpu`, `cuda` (ordinal 0) or `cuda:N`, as PyTorch spells them.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::new(ErrorKind::Device, "device", format!("expected cpu, cuda or cuda:N, got {s:?}"));
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse::<usize>().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

/// Elements held by a device other than the CPU. A buffer never changes once made (tensors are
/// values; an op makes a new buffer), so a copy read back to the host stays valid.
pub trait DeviceBuffer<T: Elem>: Send + Sync + 'static {
    fn device(&self) -> Device;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements copied to host memory (waits for the device's pending work).
    fn read(&self) -> Result<Vec<T>>;
    /// For the backend that made it: its own buffer type.
    fn as_any(&self) -> &dyn Any;
}
