//! Matrix product (through the `gemm` crate) and the linear layer's function.

use stride_kernels::gemm::{auto_threads, matmul_new, MatRef};
use stride_tensor::{Elem, Result, Tensor};

use crate::device::{route, Prim};
use crate::op::Op;
use crate::Var;

fn dims2(op: &'static str, what: &str, s: &[usize]) -> Result<(usize, usize)> {
    match *s {
        [a, b] => Ok((a, b)),
        _ => Err(stride_tensor::Error::shape(op, format!("{what} must be 2-D, got shape {s:?}"))),
    }
}

/// [m, k] x [k, n] of plain tensors; `ta`/`tb` read the stored matrices transposed.
pub fn matmul_tensors<T: Elem>(a: &Tensor<T>, ta: bool, b: &Tensor<T>, tb: bool) -> Result<Tensor<T>> {
    let (ar, ac) = dims2("matmul", "left operand", a.shape())?;
    let (br, bc) = dims2("matmul", "right operand", b.shape())?;
    let mut av = MatRef::rows(a.data(), ar, ac);
    let mut bv = MatRef::rows(b.data(), br, bc);
    if ta {
        av = av.t();
    }
    if tb {
        bv = bv.t();
    }
    if av.cols != bv.rows {
        stride_tensor::bail!(shape, "matmul", "inner dimensions differ: [{}, {}] x [{}, {}]", av.rows, av.cols, bv.rows, bv.cols);
    }
    let (m, k, n) = (av.rows, av.cols, bv.cols);
    stride_tensor::shape::numel("matmul", &[m, n])?;
    Tensor::from_vec(matmul_new(av, bv, auto_threads(m, k, n)), &[m, n])
}

impl<T: Elem> Var<T> {
    /// Matrix product of 2-D values: [m, k] x [k, n] -> [m, n].
    pub fn matmul(&self, other: &Var<T>) -> Result<Var<T>> {
        if let Some(y) = route(|| Prim::MatMul { transpose_b: false }, &[self, other])? {
            return Ok(y);
        }
        let v = matmul_tensors(&self.value(), false, &other.value(), false)?;
        Ok(Var::from_op(v, Op::MatMul { transpose_b: false }, &[self, other]))
    }
    /// self [m, k] x other^T with other stored [n, k]: no transposed copy is made.
    pub fn matmul_t(&self, other: &Var<T>) -> Result<Var<T>> {
        if let Some(y) = route(|| Prim::MatMul { transpose_b: true }, &[self, other])? {
            return Ok(y);
        }
        let v = matmul_tensors(&self.value(), false, &other.value(), true)?;
        Ok(Var::from_op(v, Op::MatMul { transpose_b: true }, &[self, other]))
    }
}

/// The gradients of both factors, each only where `needs` asks for it: a dense layer's input
/// is often the data itself (the VAE's first layer, 1024 x 500, whose input gradient would be
/// a third of that layer's backward work).
pub(crate) fn matmul_backward<T: Elem>(
    g: &Tensor<T>,
    a: &Tensor<T>,
    b: &Tensor<T>,
    transpose_b: bool,
    needs: &[bool],
) -> Result<Vec<Option<Tensor<T>>>> {
    let need = |i: usize| needs.get(i).copied().unwrap_or(true);
    // C = A B^T: dA = G B, dB = G^T A; C = A B: dA = G B^T, dB = A^T G.
    let da = need(0).then(|| matmul_tensors(g, false, b, !transpose_b)).transpose()?;
    let db = need(1).then(|| if transpose_b { matmul_tensors(g, true, a, false) } else { matmul_tensors(a, true, g, false) }).transpose()?;
    Ok(vec![da, db])
}

/// y = x W^T + b, PyTorch's `F.linear`: x `[N, in]`, weight `[out, in]`, bias `[out]` (composite).
/// An input of more axes, `[..., in]`, is taken as rows of its last axis, as PyTorch does:
/// the output is `[..., out]`.
pub fn linear<T: Elem>(x: &Var<T>, weight: &Var<T>, bias: Option<&Var<T>>) -> Result<Var<T>> {
    let xs = x.shape();
    if xs.len() > 2 {
        let fin = xs[xs.len() - 1];
        let rows = xs[..xs.len() - 1].iter().product();
        let y = linear(&x.reshape(&[rows, fin])?, weight, bias)?;
        let mut out = xs[..xs.len() - 1].to_vec();
        out.push(y.shape()[1]);
        return y.reshape(&out);
    }
    let ws = weight.shape();
    let (_, fin) = dims2("linear", "input", &xs)?;
    let (fout, win) = dims2("linear", "weight", &ws)?;
    if fin != win {
        stride_tensor::bail!(shape, "linear", "input has {fin} features but the weight expects {win} (weight [{fout}, {win}])");
    }
    let y = x.matmul_t(weight)?;
    match bias {
        Some(b) => {
            if b.shape() != [fout] {
                stride_tensor::bail!(shape, "linear", "bias has shape {:?}, expected [{fout}]", b.shape());
            }
            y.add(b)
        }
        None => Ok(y),
    }
}
