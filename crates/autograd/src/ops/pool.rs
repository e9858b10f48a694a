//! Pooling: max, average, Lp, adaptive and global (composite), channel max.

use stride_kernels::pool::{self as k, Pool2dOptions, PoolGeom};
use stride_tensor::{Elem, Result, Tensor};

use crate::device::{route, Prim};
use crate::op::Op;
use crate::Var;

pub fn max_pool2d<T: Elem>(x: &Var<T>, opts: &Pool2dOptions) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::MaxPool2d { opts: *opts }, &[x])? {
        return Ok(y);
    }
    let geom = PoolGeom::new("max_pool2d", &x.shape(), opts)?;
    let (y, argmax) = k::max_forward(&geom, x.value_ref().data());
    Ok(Var::from_op(Tensor::from_vec(y, &geom.out_shape())?, Op::MaxPool2d { geom, argmax }, &[x]))
}

pub(crate) fn max_pool_backward<T: Elem>(geom: &PoolGeom, g: &Tensor<T>, argmax: &[u32]) -> Result<Tensor<T>> {
    let dx = k::scatter_planes(g.data(), argmax, geom.n * geom.c, geom.p * geom.q, geom.h * geom.w);
    Tensor::from_vec(dx, &[geom.n, geom.c, geom.h, geom.w])
}

pub fn avg_pool2d<T: Elem>(x: &Var<T>, opts: &Pool2dOptions) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::AvgPool2d { opts: *opts }, &[x])? {
        return Ok(y);
    }
    let geom = PoolGeom::new("avg_pool2d", &x.shape(), opts)?;
    let y = k::avg_forward(&geom, x.value_ref().data());
    Ok(Var::from_op(Tensor::from_vec(y, &geom.out_shape())?, Op::AvgPool2d { geom }, &[x]))
}

pub(crate) fn avg_pool_backward<T: Elem>(geom: &PoolGeom, g: &Tensor<T>) -> Result<Tensor<T>> {
    Tensor::from_vec(k::avg_backward(geom, g.data()), &[geom.n, geom.c, geom.h, geom.w])
}

/// Power-average pooling: (sum over the window of |x|^p)^(1/p), p >= 1. For even p this is
/// PyTorch's `LPPool2d`; for odd p PyTorch sums x^p without the absolute value.
pub fn lp_pool2d<T: Elem>(x: &Var<T>, p: f64, opts: &Pool2dOptions) -> Result<Var<T>> {
    if !(p >= 1.0 && p.is_finite()) {
        stride_tensor::bail!(arg, "lp_pool2d", "norm p must be finite and at least 1, got {p}");
    }
    if let Some(y) = route(|| Prim::LpPool2d { p, opts: *opts }, &[x])? {
        return Ok(y);
    }
    let geom = PoolGeom::new("lp_pool2d", &x.shape(), opts)?;
    let y = k::lp_forward(&geom, x.value_ref().data(), T::c(p));
    Ok(Var::from_op(Tensor::from_vec(y, &geom.out_shape())?, Op::LpPool2d { geom, p }, &[x]))
}

pub(crate) fn lp_pool_backward<T: Elem>(geom: &PoolGeom, g: &Tensor<T>, x: &Tensor<T>, y: &Tensor<T>, p: f64) -> Result<Tensor<T>> {
    Tensor::from_vec(k::lp_backward(geom, x.data(), y.data(), g.data(), T::c(p)), x.shape())
}

pub fn adaptive_avg_pool2d<T: Elem>(x: &Var<T>, out: (usize, usize)) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::AdaptiveAvgPool2d { out }, &[x])? {
        return Ok(y);
    }
    let d = k::adaptive_check("adaptive_avg_pool2d", &x.shape(), out)?;
    let y = k::adaptive_avg_forward(x.value_ref().data(), d, out);
    Ok(Var::from_op(Tensor::from_vec(y, &[d[0], d[1], out.0, out.1])?, Op::AdaptiveAvgPool2d { out }, &[x]))
}

pub(crate) fn adaptive_avg_backward<T: Elem>(g: &Tensor<T>, in_shape: &[usize], out: (usize, usize)) -> Result<Tensor<T>> {
    let d = [in_shape[0], in_shape[1], in_shape[2], in_shape[3]];
    Tensor::from_vec(k::adaptive_avg_backward(g.data(), d, out), in_shape)
}

pub fn adaptive_max_pool2d<T: Elem>(x: &Var<T>, out: (usize, usize)) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::AdaptiveMaxPool2d { out }, &[x])? {
        return Ok(y);
    }
    let d = k::adaptive_check("adaptive_max_pool2d", &x.shape(), out)?;
    let (y, argmax) = k::adaptive_max_forward(x.value_ref().data(), d, out);
    Ok(Var::from_op(Tensor::from_vec(y, &[d[0], d[1], out.0, out.1])?, Op::AdaptiveMaxPool2d { argmax }, &[x]))
}

pub(crate) fn scatter_backward<T: Elem>(g: &Tensor<T>, in_shape: &[usize], idx: &[u32]) -> Result<Tensor<T>> {
    let gs = g.shape();
    let dx = k::scatter_planes(g.data(), idx, gs[0] * gs[1], gs[2] * gs[3], in_shape[2] * in_shape[3]);
    Tensor::from_vec(dx, in_shape)
}

/// Global average pooling: [N, C, H, W] -> [N, C, 1, 1] (composite).
pub fn global_avg_pool2d<T: Elem>(x: &Var<T>) -> Result<Var<T>> {
    adaptive_avg_pool2d(x, (1, 1))
}

/// Global max pooling: [N, C, H, W] -> [N, C, 1, 1] (composite).
pub fn global_max_pool2d<T: Elem>(x: &Var<T>) -> Result<Var<T>> {
    adaptive_max_pool2d(x, (1, 1))
}

/// Max over windows of `depth` channels moving by `stride` channels (TensorFlow's depthwise
/// max pooling): [N, C, H, W] -> [N, (C - depth)/stride + 1, H, W].
pub fn channel_max_pool<T: Elem>(x: &Var<T>, depth: usize, stride: usize) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::ChannelMaxPool { depth, stride }, &[x])? {
        return Ok(y);
    }
    let (d, co) = k::channel_max_check("channel_max_pool", &x.shape(), depth, stride)?;
    let (y, argmax) = k::channel_max_forward(x.value_ref().data(), d, depth, stride);
    Ok(Var::from_op(Tensor::from_vec(y, &[d[0], co, d[2], d[3]])?, Op::ChannelMaxPool { argmax }, &[x]))
}

pub(crate) fn channel_max_backward<T: Elem>(g: &Tensor<T>, in_shape: &[usize], idx: &[u32]) -> Result<Tensor<T>> {
    let d = [in_shape[0], in_shape[1], in_shape[2], in_shape[3]];
    Tensor::from_vec(k::channel_max_backward(g.data(), idx, d, g.shape()[1]), in_shape)
}
