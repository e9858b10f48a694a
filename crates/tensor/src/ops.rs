//! Element-wise maps with NumPy broadcasting, and reductions over axes.

use crate::shape::{self, numel};
use crate::tensor::gather_strided;
use crate::{Elem, Result, Tensor};

impl<T: Elem> Tensor<T> {
    /// `f` applied to every element.
    pub fn map(&self, f: impl Fn(T) -> T) -> Self {
        Tensor::from_parts(self.data().iter().map(|&x| f(x)).collect(), self.shape().to_vec())
    }

    /// `f(a, b)` element by element, broadcasting the two shapes against each other.
    pub fn zip_map(&self, other: &Tensor<T>, op: &'static str, f: impl Fn(T, T) -> T) -> Result<Self> {
        if self.shape() == other.shape() {
            let data = self.data().iter().zip(other.data()).map(|(&a, &b)| f(a, b)).collect();
            return Ok(Tensor::from_parts(data, self.shape().to_vec()));
        }
        let out = shape::broadcast_shape(op, self.shape(), other.shape())?;
        numel(op, &out)?;
        let a = self.expand(&out);
        let b = other.expand(&out);
        let data = a.iter().zip(b.iter()).map(|(&a, &b)| f(a, b)).collect();
        Ok(Tensor::from_parts(data, out))
    }

    /// The values broadcast to `to`: borrowed when the shape is already `to`.
    fn expand(&self, to: &[usize]) -> std::borrow::Cow<'_, [T]> {
        if self.shape() == to {
            return std::borrow::Cow::Borrowed(self.data());
        }
        std::borrow::Cow::Owned(gather_strided(self.data(), to, &shape::broadcast_strides(self.shape(), to), 0))
    }

    pub fn add(&self, o: &Tensor<T>) -> Result<Self> {
        self.zip_map(o, "add", |a, b| a + b)
    }
    pub fn sub(&self, o: &Tensor<T>) -> Result<Self> {
        self.zip_map(o, "sub", |a, b| a - b)
    }
    pub fn mul(&self, o: &Tensor<T>) -> Result<Self> {
        self.zip_map(o, "mul", |a, b| a * b)
    }
    pub fn div(&self, o: &Tensor<T>) -> Result<Self> {
        self.zip_map(o, "div", |a, b| a / b)
    }
    pub fn scale(&self, s: T) -> Self {
        self.map(|x| x * s)
    }

    /// Adds `other` (same shape) into `self` in place.
    pub fn add_assign(&mut self, other: &Tensor<T>) -> Result<()> {
        if self.shape() != other.shape() {
            crate::bail!(shape, "add_assign", "shape {:?} vs {:?}", self.shape(), other.shape());
        }
        for (a, &b) in self.data_mut().iter_mut().zip(other.data()) {
            *a += b;
        }
        Ok(())
    }

    /// Sum over `axes`; kept as size-1 axes when `keepdim`.
    pub fn sum_axes(&self, axes: &[usize], keepdim: bool) -> Result<Self> {
        for &a in axes {
            shape::check_axis("sum", a, self.shape())?;
        }
        let keep_shape: Vec<usize> = self.shape().iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
        let mut out = vec![T::zero(); keep_shape.iter().product()];
        // Read the input in order, a block at a time: the trailing axes that are all reduced
        // (each block sums into one output) or all kept (each block adds into a run of the
        // output), each block's output position found from the axes before them. Element by
        // element through an index map, a loss's sum over 32K values was one serial chain of
        // additions (63 us) and a bias gradient's sum over the batch no faster.
        let dims = self.shape();
        let st = shape::broadcast_strides(&keep_shape, dims);
        let r = dims.len();
        let reduced = r > 0 && st[r - 1] == 0;
        let mut t = 0;
        let mut block = 1;
        while t < r && if reduced { st[r - 1 - t] == 0 } else { st[r - 1 - t] == block } {
            block *= dims[r - 1 - t];
            t += 1;
        }
        if self.numel() > 0 {
            let starts = gather_strided(&(0..out.len()).collect::<Vec<usize>>(), &dims[..r - t], &st[..r - t], 0);
            for (x, &o) in self.data().chunks_exact(block).zip(&starts) {
                if reduced {
                    out[o] += block_sum(x);
                } else {
                    out[o..o + block].iter_mut().zip(x).for_each(|(o, &v)| *o += v);
                }
            }
        }
        let shape = if keepdim { keep_shape } else { drop_axes(self.shape(), axes) };
        Ok(Tensor::from_parts(out, shape))
    }

    /// Sum of all elements, as a rank-0 tensor.
    pub fn sum_all(&self) -> Self {
        Tensor::scalar(self.data().iter().copied().sum())
    }

    /// Mean over `axes`.
    pub fn mean_axes(&self, axes: &[usize], keepdim: bool) -> Result<Self> {
        let count: usize = axes.iter().filter_map(|&a| self.shape().get(a)).product();
        let s = self.sum_axes(axes, keepdim)?;
        Ok(s.scale(T::one() / T::c(count.max(1) as f64)))
    }

    /// Reduces a gradient of broadcast shape back to `shape` (the adjoint of broadcasting).
    pub fn sum_to(&self, shape: &[usize]) -> Result<Self> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let r = self.rank();
        if shape.len() > r {
            crate::bail!(shape, "sum_to", "cannot reduce {:?} to the larger rank {shape:?}", self.shape());
        }
        let off = r - shape.len();
        let axes: Vec<usize> = (0..r).filter(|&i| i < off || (shape[i - off] == 1 && self.shape()[i] != 1)).collect();
        let s = self.sum_axes(&axes, true)?;
        s.reshape(shape)
    }

    /// Maximum along `axis` and the index where it occurs (the first, on ties).
    pub fn max_axis(&self, axis: usize, keepdim: bool) -> Result<(Self, Vec<usize>)> {
        shape::check_axis("max", axis, self.shape())?;
        let dim = self.shape()[axis];
        if dim == 0 {
            crate::bail!(shape, "max", "axis {axis} of shape {:?} is empty", self.shape());
        }
        let outer: usize = self.shape()[..axis].iter().product();
        let inner: usize = self.shape()[axis + 1..].iter().product();
        let mut vals = Vec::with_capacity(outer * inner);
        let mut idx = Vec::with_capacity(outer * inner);
        let d = self.data();
        for o in 0..outer {
            for i in 0..inner {
                let mut best = 0;
                let mut bv = d[o * dim * inner + i];
                for k in 1..dim {
                    let v = d[(o * dim + k) * inner + i];
                    // NaN wins, so a NaN is never hidden by a max.
                    if v > bv || (v.is_nan() && !bv.is_nan()) {
                        bv = v;
                        best = k;
                    }
                }
                vals.push(bv);
                idx.push(best);
            }
        }
        let mut shape = self.shape().to_vec();
        if keepdim {
            shape[axis] = 1;
        } else {
            shape.remove(axis);
        }
        Ok((Tensor::from_parts(vals, shape), idx))
    }

    /// Index of the maximum along `axis`.
    pub fn argmax(&self, axis: usize) -> Result<Vec<usize>> {
        Ok(self.max_axis(axis, false)?.1)
    }

    /// Largest absolute difference to `other` (same shape), for tests and checks.
    pub fn max_abs_diff(&self, other: &Tensor<T>) -> Result<f64> {
        if self.shape() != other.shape() {
            crate::bail!(shape, "max_abs_diff", "shape {:?} vs {:?}", self.shape(), other.shape());
        }
        Ok(self.data().iter().zip(other.data()).map(|(a, b)| (a.as_f64() - b.as_f64()).abs()).fold(0.0, f64::max))
    }
}

fn drop_axes(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
}

/// The sum of `x` over eight running partial sums (the additions of one chain wait on each
/// other; eight chains fill the pipeline and vectorise). Inlined, so that a caller compiled for
/// wider vectors (the kernels' `multiversion!` loops) sums with them.
#[inline(always)]
pub fn block_sum<T: Elem>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let tail = chunks.remainder().iter().fold(T::zero(), |a, &v| a + v);
    acc.iter().fold(tail, |a, &v| a + v)
}
