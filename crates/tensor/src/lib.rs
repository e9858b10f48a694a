//! Stride's tensor: shape, storage, error type. No unsafe code and no kernels: the heavy math
//! lives in `stride-kernels`, which works on the slices this crate hands out.
#![forbid(unsafe_code)]

mod device;
mod elem;
mod error;
mod ops;
mod random;
pub mod shape;
mod tensor;

pub use device::{Device, DeviceBuffer};
pub use elem::Elem;
pub use error::{Error, ErrorKind, Result};
pub use ops::block_sum;
pub use random::Rng;
pub use tensor::{gather_strided_into, Tensor};
