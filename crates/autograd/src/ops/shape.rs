//! Data movement: reshape, permute, narrow (slice), pad, concat, split, flatten, channel
//! shuffle, nearest upsampling.

use stride_tensor::{Elem, Error, Result, Tensor};

use crate::device::{route, Prim};
use crate::op::Op;
use crate::Var;

impl<T: Elem> Var<T> {
    pub fn reshape(&self, shape: &[usize]) -> Result<Var<T>> {
        let v = self.value_ref().reshape(shape)?;
        Ok(Var::from_op(v, Op::Reshape, &[self]))
    }
    /// Keeps axis 0 and flattens the rest: [N, C, H, W] -> [N, C*H*W].
    pub fn flatten(&self) -> Result<Var<T>> {
        let s = self.shape();
        if s.is_empty() {
            stride_tensor::bail!(shape, "flatten", "needs at least one axis, got a scalar");
        }
        self.reshape(&[s[0], s[1..].iter().product()])
    }
    pub fn permute(&self, perm: &[usize]) -> Result<Var<T>> {
        if let Some(y) = route(|| Prim::Permute { perm: perm.to_vec() }, &[self])? {
            return Ok(y);
        }
        let v = self.value_ref().permute(perm)?;
        Ok(Var::from_op(v, Op::Permute { perm: perm.to_vec() }, &[self]))
    }
    /// Entries `start..start+len` of `axis`.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Var<T>> {
        if let Some(y) = route(|| Prim::Narrow { axis, start, len }, &[self])? {
            return Ok(y);
        }
        let v = self.value_ref().narrow(axis, start, len)?;
        Ok(Var::from_op(v, Op::Narrow { axis, start }, &[self]))
    }
    /// Constant padding, `pads[i] = (before, after)` for the last `pads.len()` axes in order.
    pub fn pad(&self, pads: &[(usize, usize)], value: f64) -> Result<Var<T>> {
        if let Some(y) = route(|| Prim::Pad { pads: pads.to_vec(), value }, &[self])? {
            return Ok(y);
        }
        let v = self.value_ref().pad(pads, T::c(value))?;
        Ok(Var::from_op(v, Op::Pad { pads: pads.to_vec(), value }, &[self]))
    }
    /// Pieces of `axis` with the given sizes (composite: narrows).
    pub fn split(&self, axis: usize, sizes: &[usize]) -> Result<Vec<Var<T>>> {
        let dim = *self.shape().get(axis).ok_or_else(|| Error::arg("split", format!("axis {axis} out of range for shape {:?}", self.shape())))?;
        if sizes.iter().sum::<usize>() != dim {
            stride_tensor::bail!(arg, "split", "sizes {sizes:?} do not add up to axis {axis} of size {dim}");
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                start += len;
                self.narrow(axis, start - len, len)
            })
            .collect()
    }
    /// ShuffleNet's channel shuffle: [N, g*c, H, W] viewed as [N, g, c, H, W], transposed to
    /// [N, c, g, H, W] and flattened back (composite).
    pub fn channel_shuffle(&self, groups: usize) -> Result<Var<T>> {
        let s = self.shape();
        let [n, c, h, w] = s[..] else {
            stride_tensor::bail!(shape, "channel_shuffle", "expects [N, C, H, W], got {s:?}");
        };
        if groups == 0 || c % groups != 0 {
            stride_tensor::bail!(arg, "channel_shuffle", "groups {groups} must divide the {c} channels");
        }
        self.reshape(&[n, groups, c / groups, h, w])?.permute(&[0, 2, 1, 3, 4])?.reshape(&[n, c, h, w])
    }
    /// Nearest-neighbour upsampling of [N, C, H, W] by integer factors.
    pub fn upsample_nearest2d(&self, scale: (usize, usize)) -> Result<Var<T>> {
        if let Some(y) = route(|| Prim::UpsampleNearest { scale }, &[self])? {
            return Ok(y);
        }
        let s = self.shape();
        let [n, c, h, w] = s[..] else {
            stride_tensor::bail!(shape, "upsample_nearest2d", "expects [N, C, H, W], got {s:?}");
        };
        if scale.0 == 0 || scale.1 == 0 {
            stride_tensor::bail!(arg, "upsample_nearest2d", "scale factors must be at least 1, got {scale:?}");
        }
        let (oh, ow) = (h * scale.0, w * scale.1);
        let out_shape = [n, c, oh, ow];
        stride_tensor::shape::numel("upsample_nearest2d", &out_shape)?;
        let v = Tensor::from_vec(stride_kernels::resample::upsample_nearest(self.value().data(), h, w, scale), &out_shape)?;
        Ok(Var::from_op(v, Op::UpsampleNearest { scale }, &[self]))
    }
}

/// Joins values along `axis`.
pub fn concat<T: Elem>(parts: &[&Var<T>], axis: usize) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::Concat { axis }, parts)? {
        return Ok(y);
    }
    let values: Vec<Tensor<T>> = parts.iter().map(|p| p.value()).collect();
    let refs: Vec<&Tensor<T>> = values.iter().collect();
    let v = Tensor::concat(&refs, axis)?;
    let sizes = values.iter().map(|t| t.shape()[axis]).collect();
    Ok(Var::from_op(v, Op::Concat { axis, sizes }, parts))
}

pub(crate) fn permute_backward<T: Elem>(g: &Tensor<T>, perm: &[usize]) -> Result<Tensor<T>> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    g.permute(&inv)
}

pub(crate) fn narrow_backward<T: Elem>(g: &Tensor<T>, in_shape: &[usize], axis: usize, start: usize) -> Result<Tensor<T>> {
    let mut pads = vec![(0, 0); in_shape.len()];
    pads[axis] = (start, in_shape[axis] - start - g.shape()[axis]);
    g.pad(&pads, T::zero())
}

pub(crate) fn upsample_backward<T: Elem>(g: &Tensor<T>, in_shape: &[usize], scale: (usize, usize)) -> Result<Tensor<T>> {
    Tensor::from_vec(stride_kernels::resample::upsample_nearest_backward(g.data(), in_shape[2], in_shape[3], scale), in_shape)
}
