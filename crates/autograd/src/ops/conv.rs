//! Convolution and transposed convolution. Backprop is convolution again: the input
//! gradient of a convolution is a transposed convolution with the same weights, and the other
//! way round.

use stride_kernels::conv::{self as k, Conv2dOptions, ConvGeom, Workspace};
use stride_tensor::{Elem, Result, Tensor};

use crate::device::{route, Prim};
use crate::op::Op;
use crate::Var;

fn check_bias<T: Elem>(op: &'static str, bias: Option<&Var<T>>, channels: usize) -> Result<()> {
    if let Some(b) = bias {
        if b.shape() != [channels] {
            stride_tensor::bail!(shape, op, "bias has shape {:?}, expected [{channels}] (one per output channel)", b.shape());
        }
    }
    Ok(())
}

fn parents<'a, T: Elem>(x: &'a Var<T>, w: &'a Var<T>, b: Option<&'a Var<T>>) -> Vec<&'a Var<T>> {
    let mut p = vec![x, w];
    p.extend(b);
    p
}

/// 2-D convolution (cross-correlation, as every framework): x `[N, C, H, W]`, weight
/// `[K, C/groups, R, S]`, bias `[K]` -> `[N, K, P, Q]`.
pub fn conv2d<T: Elem>(x: &Var<T>, weight: &Var<T>, bias: Option<&Var<T>>, opts: &Conv2dOptions) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::Conv2d { opts: *opts }, &parents(x, weight, bias))? {
        return Ok(y);
    }
    let geom = ConvGeom::conv2d(&x.shape(), &weight.shape(), opts)?;
    check_bias("conv2d", bias, geom.k)?;
    let bv = bias.map(|b| b.value());
    let y = k::forward(&geom, x.value_ref().data(), weight.value_ref().data(), bv.as_ref().map(|b| b.data()));
    let y = Tensor::from_vec(y, &geom.small_shape())?;
    Ok(Var::from_op(y, Op::Conv2d { geom }, &parents(x, weight, bias)))
}

/// The working memory (bytes, f32) `conv2d` holds besides input and output for `x_shape`.
pub fn conv2d_workspace(x_shape: &[usize], w_shape: &[usize], opts: &Conv2dOptions) -> Result<Workspace> {
    let geom = ConvGeom::conv2d(x_shape, w_shape, opts)?;
    Ok(k::forward_workspace(&geom).scale(std::mem::size_of::<f32>() as u64))
}

/// The working memory (bytes, f32) `conv_transpose2d` holds besides input and output.
pub fn conv_transpose2d_workspace(x_shape: &[usize], w_shape: &[usize], opts: &Conv2dOptions) -> Result<Workspace> {
    let geom = ConvGeom::conv_transpose2d(x_shape, w_shape, opts)?;
    Ok(k::backward_data_workspace(&geom).scale(std::mem::size_of::<f32>() as u64))
}

/// The input, weight (and bias) gradients of `conv2d`, each only where `needs` asks for it
/// (the first layer's input gradient costs as much as its forward pass and goes unused).
pub(crate) fn conv2d_backward<T: Elem>(geom: &ConvGeom, g: &Tensor<T>, x: &[Tensor<T>], needs: &[bool]) -> Result<Vec<Option<Tensor<T>>>> {
    let need = |i: usize| needs.get(i).copied().unwrap_or(true);
    let dx = if need(0) { Some(Tensor::from_vec(k::backward_data(geom, g.data(), x[1].data()), &geom.large_shape())?) } else { None };
    let dw = if need(1) { Some(Tensor::from_vec(k::backward_filter(geom, x[0].data(), g.data()), &geom.weight_shape())?) } else { None };
    let mut out = vec![dx, dw];
    if x.len() > 2 {
        out.push(Some(Tensor::from_vec(k::backward_bias(geom, g.data()), &[geom.k])?));
    }
    Ok(out)
}

/// Transposed convolution (the adjoint of `conv2d`, "deconvolution"): x `[N, Cin, H, W]`,
/// weight `[Cin, Cout/groups, R, S]` (PyTorch's layout), bias `[Cout]` -> `[N, Cout, Hout, Wout]`,
/// Hout = (H-1)*stride - pad_top - pad_bottom + dilation*(R-1) + output_padding + 1.
pub fn conv_transpose2d<T: Elem>(x: &Var<T>, weight: &Var<T>, bias: Option<&Var<T>>, opts: &Conv2dOptions) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::ConvTranspose2d { opts: *opts }, &parents(x, weight, bias))? {
        return Ok(y);
    }
    let geom = ConvGeom::conv_transpose2d(&x.shape(), &weight.shape(), opts)?;
    check_bias("conv_transpose2d", bias, geom.c)?;
    let mut y = k::backward_data(&geom, x.value_ref().data(), weight.value_ref().data());
    if let Some(b) = bias {
        let b = b.value();
        let plane = geom.h * geom.w;
        for (i, chunk) in y.chunks_exact_mut(plane.max(1)).enumerate() {
            let bc = b.data()[i % geom.c];
            chunk.iter_mut().for_each(|v| *v += bc);
        }
    }
    let y = Tensor::from_vec(y, &geom.large_shape())?;
    Ok(Var::from_op(y, Op::ConvTranspose2d { geom }, &parents(x, weight, bias)))
}

pub(crate) fn conv_transpose2d_backward<T: Elem>(geom: &ConvGeom, g: &Tensor<T>, x: &[Tensor<T>]) -> Result<Vec<Option<Tensor<T>>>> {
    let dx = Tensor::from_vec(k::forward(geom, g.data(), x[1].data(), None), &geom.small_shape())?;
    let dw = Tensor::from_vec(k::backward_filter(geom, g.data(), x[0].data()), &geom.weight_shape())?;
    let mut out = vec![Some(dx), Some(dw)];
    if x.len() > 2 {
        out.push(Some(Tensor::from_vec(k::channel_sums(g.data(), geom.n, geom.c, geom.h * geom.w), &[geom.c])?));
    }
    Ok(out)
}
