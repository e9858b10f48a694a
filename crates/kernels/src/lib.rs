//! Stride's CPU kernels over plain slices in NCHW order. All `unsafe` of the project lives
//! here (the one call into the `gemm` crate); every fast path has a portable reference kernel
//! beside it that the tests use as the oracle.

pub mod binary;
pub mod conv;
pub mod gemm;
pub mod norm;
pub mod pool;
pub mod simd;
pub mod softmax;
pub mod unary;
pub mod vmath;
