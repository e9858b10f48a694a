//! Reductions: sum, mean (composite), max; argmax carries no gradient.

use stride_tensor::{Elem, Result, Tensor};

use crate::device::{route, Prim};
use crate::op::Op;
use crate::Var;

impl<T: Elem> Var<T> {
    /// Sum over `axes` (see [`Var::sum_all`] for every axis).
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Var<T>> {
        if let Some(y) = route(|| Prim::Sum { axes: axes.to_vec(), keepdim }, &[self])? {
            return Ok(y);
        }
        let v = self.value_ref().sum_axes(axes, keepdim)?;
        Ok(Var::from_op(v, Op::Sum { axes: axes.to_vec(), keepdim }, &[self]))
    }
    /// Sum of every element, as a rank-0 value.
    pub fn sum_all(&self) -> Result<Var<T>> {
        let axes: Vec<usize> = (0..self.value_ref().rank()).collect();
        self.sum(&axes, false)
    }
    /// Mean over `axes` (composite: sum then scale).
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Var<T>> {
        let shape = self.shape();
        let count: usize = axes.iter().filter_map(|&a| shape.get(a)).product();
        if count == 0 {
            stride_tensor::bail!(shape, "mean", "mean over axes {axes:?} of shape {shape:?} has no elements");
        }
        self.sum(axes, keepdim)?.mul_scalar(1.0 / count as f64)
    }
    /// Mean of every element.
    pub fn mean_all(&self) -> Result<Var<T>> {
        let axes: Vec<usize> = (0..self.value_ref().rank()).collect();
        self.mean(&axes, false)
    }
    /// Maximum along `axis`; the gradient flows to the first maximal element.
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Var<T>> {
        if let Some(y) = route(|| Prim::Max { axis, keepdim }, &[self])? {
            return Ok(y);
        }
        let (v, argmax) = self.value_ref().max_axis(axis, keepdim)?;
        Ok(Var::from_op(v, Op::Max { axis, argmax }, &[self]))
    }
    /// Index of the maximum along `axis` (no gradient).
    pub fn argmax(&self, axis: usize) -> Result<Vec<usize>> {
        self.value_ref().argmax(axis)
    }
}

pub(crate) fn sum_backward<T: Elem>(g: &Tensor<T>, in_shape: &[usize], axes: &[usize], keepdim: bool) -> Result<Tensor<T>> {
    let kept: Vec<usize> = in_shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let g = if keepdim { g.clone() } else { g.reshape(&kept)? };
    g.broadcast_to(in_shape)
}

pub(crate) fn max_backward<T: Elem>(g: &Tensor<T>, in_shape: &[usize], axis: usize, argmax: &[usize]) -> Result<Tensor<T>> {
    let dim = in_shape[axis];
    let inner: usize = in_shape[axis + 1..].iter().product();
    let mut dx = vec![T::zero(); in_shape.iter().product()];
    for (j, (&gv, &k)) in g.data().iter().zip(argmax).enumerate() {
        let (o, i) = (j / inner.max(1), j % inner.max(1));
        dx[(o * dim + k) * inner + i] += gv;
    }
    Tensor::from_vec(dx, in_shape)
}
