//! The closed list of primitive ops: the one dispatch point of Stride. Everything else
//! (linear layers, losses, dropout, channel shuffle, global pooling, ...) is composed from
//! these. A new backend (a GPU) implements exactly these forwards and backwards.

use stride_kernels::conv::ConvGeom;
use stride_kernels::pool::PoolGeom;
use stride_kernels::unary::Unary;
use stride_tensor::{Elem, Result, Tensor};

use std::any::Any;
use std::sync::Arc;

use crate::device::{Backend, Prim};
use crate::ops;

/// A recorded primitive with what its backward pass needs beyond the input and output values.
pub(crate) enum Op<T: Elem> {
    Add,
    Sub,
    Mul,
    Div,
    Unary(Unary),
    Sum {
        axes: Vec<usize>,
        keepdim: bool,
    },
    Max {
        axis: usize,
        argmax: Vec<usize>,
    },
    Reshape,
    Permute {
        perm: Vec<usize>,
    },
    Narrow {
        axis: usize,
        start: usize,
    },
    Pad {
        pads: Vec<(usize, usize)>,
        value: f64,
    },
    Concat {
        axis: usize,
        sizes: Vec<usize>,
    },
    UpsampleNearest {
        scale: (usize, usize),
    },
    /// a [m, k] x b [k, n], or x b^T with b stored [n, k] when `transpose_b` (linear layers).
    MatMul {
        transpose_b: bool,
    },
    Conv2d {
        geom: ConvGeom,
    },
    ConvTranspose2d {
        geom: ConvGeom,
    },
    MaxPool2d {
        geom: PoolGeom,
        argmax: Vec<u32>,
    },
    AvgPool2d {
        geom: PoolGeom,
    },
    LpPool2d {
        geom: PoolGeom,
        p: f64,
    },
    AdaptiveAvgPool2d {
        out: (usize, usize),
    },
    AdaptiveMaxPool2d {
        argmax: Vec<u32>,
    },
    ChannelMaxPool {
        argmax: Vec<u32>,
    },
    BatchNorm {
        mean: Vec<T>,
        invstd: Vec<T>,
        training: bool,
        /// Synchronised over processes (training only).
        sync: Option<ops::norm::SyncStats>,
        /// The options the statistics were made with (a training plan recomputes them).
        opts: ops::norm::BatchNormOptions,
    },
    Softmax {
        axis: usize,
    },
    LogSoftmax {
        axis: usize,
    },
    Nll {
        targets: Vec<usize>,
    },
    /// Summed element-wise over every process, on the host (synchronised batch norm's
    /// statistics on a device); its gradient is the same sum of the gradients.
    AllSum {
        sum: ops::norm::SyncStats,
    },
    /// Any primitive run by a device backend (inputs not on the CPU): its backward pass goes to
    /// the same backend with what its forward saved.
    Device {
        prim: Prim,
        backend: Arc<dyn Backend<T>>,
        saved: Box<dyn Any>,
    },
}

impl<T: Elem> Op<T> {
    /// Bytes the op keeps for its backward pass beyond the tensors on the tape.
    pub(crate) fn saved_bytes(&self) -> usize {
        match self {
            Op::Max { argmax, .. } => argmax.len() * std::mem::size_of::<usize>(),
            Op::MaxPool2d { argmax, .. } | Op::AdaptiveMaxPool2d { argmax } | Op::ChannelMaxPool { argmax } => argmax.len() * 4,
            Op::BatchNorm { mean, invstd, .. } => (mean.len() + invstd.len()) * std::mem::size_of::<T>(),
            Op::Nll { targets } => targets.len() * std::mem::size_of::<usize>(),
            _ => 0,
        }
    }
}

/// Names of every primitive, in declaration order: the count a backend has to implement.
pub const PRIMITIVES: [&str; 26] = [
    "add",
    "sub",
    "mul",
    "div",
    "unary",
    "sum",
    "max",
    "reshape",
    "permute",
    "narrow",
    "pad",
    "concat",
    "upsample_nearest2d",
    "matmul",
    "conv2d",
    "conv_transpose2d",
    "max_pool2d",
    "avg_pool2d",
    "lp_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "channel_max_pool",
    "batch_norm",
    "softmax",
    "log_softmax",
    "nll_loss",
];

impl<T: Elem> Op<T> {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Device { prim, .. } => return prim.name(),
            Op::AllSum { .. } => return "all_sum",
            _ => {}
        }
        PRIMITIVES[self.index()]
    }

    fn index(&self) -> usize {
        match self {
            Op::Add => 0,
            Op::Sub => 1,
            Op::Mul => 2,
            Op::Div => 3,
            Op::Unary(_) => 4,
            Op::Sum { .. } => 5,
            Op::Max { .. } => 6,
            Op::Reshape => 7,
            Op::Permute { .. } => 8,
            Op::Narrow { .. } => 9,
            Op::Pad { .. } => 10,
            Op::Concat { .. } => 11,
            Op::UpsampleNearest { .. } => 12,
            Op::MatMul { .. } => 13,
            Op::Conv2d { .. } => 14,
            Op::ConvTranspose2d { .. } => 15,
            Op::MaxPool2d { .. } => 16,
            Op::AvgPool2d { .. } => 17,
            Op::LpPool2d { .. } => 18,
            Op::AdaptiveAvgPool2d { .. } => 19,
            Op::AdaptiveMaxPool2d { .. } => 20,
            Op::ChannelMaxPool { .. } => 21,
            Op::BatchNorm { .. } => 22,
            Op::Softmax { .. } => 23,
            Op::LogSoftmax { .. } => 24,
            Op::Nll { .. } => 25,
            Op::Device { .. } | Op::AllSum { .. } => unreachable!("named without an index"),
        }
    }

    /// Gradients for each input, given the output gradient `g`, the input values and the
    /// output value. `None` for an input that gets no gradient (targets, running stats); an
    /// op may also return `None` where `needs` is false instead of computing a gradient that
    /// nothing uses.
    pub(crate) fn backward(&self, g: &Tensor<T>, x: &[Tensor<T>], y: &Tensor<T>, needs: &[bool]) -> Result<Vec<Option<Tensor<T>>>> {
        use ops::*;
        let some = |v: Vec<Tensor<T>>| v.into_iter().map(Some).collect();
        Ok(match self {
            Op::Add | Op::Sub | Op::Mul | Op::Div => arith::binary_backward(self, g, &x[0], &x[1], needs)?,
            Op::Unary(u) => vec![Some(arith::unary_backward(*u, g, &x[0], y)?)],
            Op::Sum { axes, keepdim } => {
                vec![Some(reduce::sum_backward(g, x[0].shape(), axes, *keepdim)?)]
            }
            Op::Max { axis, argmax } => {
                vec![Some(reduce::max_backward(g, x[0].shape(), *axis, argmax)?)]
            }
            Op::Reshape => vec![Some(g.reshape(x[0].shape())?)],
            Op::Permute { perm } => vec![Some(shape::permute_backward(g, perm)?)],
            Op::Narrow { axis, start } => vec![Some(shape::narrow_backward(g, x[0].shape(), *axis, *start)?)],
            Op::Pad { pads, .. } => vec![Some(g.unpad(pads)?)],
            Op::Concat { axis, sizes } => some(g.split(*axis, sizes)?),
            Op::UpsampleNearest { scale } => {
                vec![Some(shape::upsample_backward(g, x[0].shape(), *scale)?)]
            }
            Op::MatMul { transpose_b } => linalg::matmul_backward(g, &x[0], &x[1], *transpose_b, needs)?,
            Op::Conv2d { geom } => conv::conv2d_backward(geom, g, x, needs)?,
            Op::ConvTranspose2d { geom } => conv::conv_transpose2d_backward(geom, g, x)?,
            Op::MaxPool2d { geom, argmax } => vec![Some(pool::max_pool_backward(geom, g, argmax)?)],
            Op::AvgPool2d { geom } => vec![Some(pool::avg_pool_backward(geom, g)?)],
            Op::LpPool2d { geom, p } => vec![Some(pool::lp_pool_backward(geom, g, &x[0], y, *p)?)],
            Op::AdaptiveAvgPool2d { out } => {
                vec![Some(pool::adaptive_avg_backward(g, x[0].shape(), *out)?)]
            }
            Op::AdaptiveMaxPool2d { argmax } => {
                vec![Some(pool::scatter_backward(g, x[0].shape(), argmax)?)]
            }
            Op::ChannelMaxPool { argmax } => {
                vec![Some(pool::channel_max_backward(g, x[0].shape(), argmax)?)]
            }
            Op::BatchNorm { mean, invstd, training, sync, .. } => norm::batch_norm_backward(g, x, mean, invstd, *training, sync.as_ref())?,
            Op::Softmax { axis } => vec![Some(loss::softmax_backward(g, y, *axis, false)?)],
            Op::LogSoftmax { axis } => vec![Some(loss::softmax_backward(g, y, *axis, true)?)],
            Op::Nll { targets } => vec![Some(loss::nll_backward(g, x[0].shape(), targets)?)],
            Op::AllSum { sum } => vec![Some(norm::all_sum_tensor(g, sum)?)],
            Op::Device { prim, backend, saved } => {
                let grads = backend.backward(prim, saved.as_ref(), g, x, y)?;
                for d in grads.iter().flatten() {
                    crate::device::check_output(&**backend, prim, d)?;
                }
                grads
            }
        })
    }
}
