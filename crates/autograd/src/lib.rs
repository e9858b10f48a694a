//! Reverse-mode automatic differentiation for Stride, define-by-run.
//!
//! Ops on [`Var`]s run at once and, while gradients are enabled, record the primitive that
//! made each result. [`Var::backward`] from a scalar walks the record backwards and adds
//! gradients into the parameters. Under [`no_grad`] nothing is recorded (inference).
//!
//! The primitives are a closed list ([`PRIMITIVES`]); every other op is composed from them.
#![forbid(unsafe_code)]

mod backward;
pub mod conformance;
pub mod device;
mod gradcheck;
mod op;
pub mod ops;
pub mod plan;
pub mod train_plan;
mod var;

pub use device::{Backend, Prim, ToDevice, Update};
pub use gradcheck::gradcheck;
pub use op::PRIMITIVES;
pub use ops::conv::{conv2d, conv2d_workspace, conv_transpose2d, conv_transpose2d_workspace};
pub use ops::linalg::{linear, matmul_tensors};
pub use ops::loss::{
    binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy, gaussian_kl, l1_loss, log_softmax, mse_loss, nll_loss, softmax,
    weighted_cross_entropy, Reduction,
};
pub use ops::norm::{batch_norm, batch_norm_sync, dropout, dropout2d, layer_norm, BatchNormOptions, SyncStats};
pub use ops::pool::{
    adaptive_avg_pool2d, adaptive_max_pool2d, avg_pool2d, channel_max_pool, global_avg_pool2d, global_max_pool2d, lp_pool2d, max_pool2d,
};
pub use ops::shape::concat;
pub use plan::Plan;
pub use stride_kernels::conv::{Conv2dOptions, Padding, Workspace};
pub use stride_kernels::pool::Pool2dOptions;
pub use stride_kernels::unary::Unary;
pub use stride_tensor::{Device, DeviceBuffer, Elem, Error, ErrorKind, Result, Rng, Tensor};
pub use train_plan::TrainPlan;
pub use var::{is_grad_enabled, no_grad, tape_bytes, with_grad, NoGradGuard, Var};
