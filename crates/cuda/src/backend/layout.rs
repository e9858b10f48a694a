//! Data movement on the GPU: permute, narrow, pad and concat as strided gathers and scatters
//! (one kernel each way), nearest upsampling; each with its gradient.

use cudarc::driver::{CudaSlice, PushKernelArg};
use stride_tensor::{shape, Error, Result, Tensor};

use super::{grid, int, CudaBackend};

/// Kernel metadata: rank, shape, strides, offset (see `strided` in kernels.cu).
fn meta(shape: &[usize], strides: &[usize], offset: usize) -> Vec<i64> {
    let mut m = vec![shape.len() as i64];
    m.extend(shape.iter().map(|&d| d as i64));
    m.extend(strides.iter().map(|&d| d as i64));
    m.push(offset as i64);
    m
}

/// `pads` right-aligned over `rank` axes, as `Tensor::pad` takes them.
fn full_pads(op: &'static str, pads: &[(usize, usize)], shape: &[usize]) -> Result<Vec<(usize, usize)>> {
    if pads.len() > shape.len() {
        stride_tensor::bail!(arg, op, "{} padding pairs for a rank-{} tensor {shape:?}", pads.len(), shape.len());
    }
    let off = shape.len() - pads.len();
    Ok((0..shape.len()).map(|i| if i < off { (0, 0) } else { pads[i - off] }).collect())
}

impl CudaBackend {
    /// A new tensor of `out` whose element i is `x[offset + sum_d i_d * strides[d]]`.
    fn gather(&self, x: &Tensor<f32>, out: &[usize], strides: &[usize], offset: usize) -> Result<Tensor<f32>> {
        let n = shape::numel("gather", out)?;
        // gather_strided writes every element.
        let mut y = self.fresh(n)?;
        if n > 0 {
            let m = self.table(meta(out, strides, offset))?;
            launch!(self, "gather_strided", grid(n), self.slice(x)?, &mut y, &(n as i64), &*m);
        }
        self.wrap(y, out)
    }

    /// Writes `x` into `y` at `offset + sum_d i_d * strides[d]` (distinct places).
    fn scatter(&self, x: &Tensor<f32>, y: &mut CudaSlice<f32>, strides: &[usize], offset: usize) -> Result<()> {
        let n = x.numel();
        if n > 0 {
            let m = self.table(meta(x.shape(), strides, offset))?;
            launch!(self, "scatter_strided", grid(n), self.slice(x)?, y, &(n as i64), &*m);
        }
        Ok(())
    }

    /// A buffer of `n` copies of `v`: cleared, or written whole by one `fill` launch.
    pub(super) fn filled(&self, n: usize, v: f32) -> Result<CudaSlice<f32>> {
        if n == 0 || v == 0.0 {
            return self.zeros(n);
        }
        let mut y = self.fresh(n)?;
        launch!(self, "fill", grid(n), &mut y, &v, &(n as i64));
        Ok(y)
    }

    pub(super) fn permute(&self, x: &Tensor<f32>, perm: &[usize]) -> Result<Tensor<f32>> {
        let r = x.rank();
        let mut seen = vec![false; r];
        if perm.len() != r || perm.iter().any(|&p| p >= r || std::mem::replace(&mut seen[p], true)) {
            stride_tensor::bail!(arg, "permute", "{perm:?} is not a permutation of the {r} axes of {:?}", x.shape());
        }
        let st = shape::strides(x.shape());
        let out: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
        let read: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        self.gather(x, &out, &read, 0)
    }

    pub(super) fn permute_backward(&self, g: &Tensor<f32>, perm: &[usize]) -> Result<Tensor<f32>> {
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        self.permute(g, &inverse)
    }

    pub(super) fn narrow(&self, x: &Tensor<f32>, axis: usize, start: usize, len: usize) -> Result<Tensor<f32>> {
        shape::check_axis("narrow", axis, x.shape())?;
        let dim = x.shape()[axis];
        if start.checked_add(len).is_none_or(|end| end > dim) {
            stride_tensor::bail!(
                arg,
                "narrow",
                "range {start}..{} is outside axis {axis} of size {dim} (shape {:?})",
                start.saturating_add(len),
                x.shape()
            );
        }
        let st = shape::strides(x.shape());
        let mut out = x.shape().to_vec();
        out[axis] = len;
        self.gather(x, &out, &st, start * st[axis])
    }

    /// Zeros of `shape` with `g` at `start` along `axis`.
    pub(super) fn narrow_backward(&self, g: &Tensor<f32>, shape: &[usize], axis: usize, start: usize) -> Result<Tensor<f32>> {
        let st = shape::strides(shape);
        let mut dx = self.zeros(shape::numel("narrow", shape)?)?;
        self.scatter(g, &mut dx, &st, start * st[axis])?;
        self.wrap(dx, shape)
    }

    pub(super) fn pad(&self, x: &Tensor<f32>, pads: &[(usize, usize)], value: f64) -> Result<Tensor<f32>> {
        let full = full_pads("pad", pads, x.shape())?;
        let mut out = Vec::with_capacity(x.rank());
        for (d, &(b, a)) in x.shape().iter().zip(&full) {
            out.push(d.checked_add(b).and_then(|v| v.checked_add(a)).ok_or_else(|| Error::arg("pad", "padding overflows"))?);
        }
        let st = shape::strides(&out);
        let offset = full.iter().zip(&st).map(|(&(b, _), s)| b * s).sum();
        let mut y = self.filled(shape::numel("pad", &out)?, value as f32)?;
        self.scatter(x, &mut y, &st, offset)?;
        self.wrap(y, &out)
    }

    /// The part of `g` that the padding did not add.
    pub(super) fn pad_backward(&self, g: &Tensor<f32>, shape: &[usize], pads: &[(usize, usize)]) -> Result<Tensor<f32>> {
        let full = full_pads("pad", pads, shape)?;
        let st = shape::strides(g.shape());
        let offset = full.iter().zip(&st).map(|(&(b, _), s)| b * s).sum();
        self.gather(g, shape, &st, offset)
    }

    pub(super) fn concat(&self, parts: &[Tensor<f32>], axis: usize) -> Result<Tensor<f32>> {
        let first = parts.first().ok_or_else(|| Error::arg("concat", "needs at least one tensor"))?;
        shape::check_axis("concat", axis, first.shape())?;
        for (i, p) in parts.iter().enumerate() {
            let same = p.rank() == first.rank() && p.shape().iter().zip(first.shape()).enumerate().all(|(a, (x, y))| a == axis || x == y);
            if !same {
                stride_tensor::bail!(
                    shape,
                    "concat",
                    "tensor {i} has shape {:?}, which does not match {:?} outside axis {axis}",
                    p.shape(),
                    first.shape()
                );
            }
        }
        let mut out = first.shape().to_vec();
        out[axis] = parts.iter().map(|p| p.shape()[axis]).sum();
        let st = shape::strides(&out);
        // The parts' scatters write every element between them.
        let mut y = self.fresh(shape::numel("concat", &out)?)?;
        let mut start = 0;
        for p in parts {
            self.scatter(p, &mut y, &st, start * st[axis])?;
            start += p.shape()[axis];
        }
        self.wrap(y, &out)
    }

    /// `g` cut along `axis` into the parts' sizes.
    pub(super) fn concat_backward(&self, g: &Tensor<f32>, parts: &[Tensor<f32>], axis: usize) -> Result<Vec<Option<Tensor<f32>>>> {
        let mut start = 0;
        parts
            .iter()
            .map(|p| {
                let d = self.narrow(g, axis, start, p.shape()[axis])?;
                start += p.shape()[axis];
                Ok(Some(d))
            })
            .collect()
    }

    fn upsample_dims(x: &[usize], scale: (usize, usize)) -> Result<[usize; 4]> {
        let [n, c, h, w] = x[..] else {
            stride_tensor::bail!(shape, "upsample_nearest2d", "expects [N, C, H, W], got {x:?}");
        };
        if scale.0 == 0 || scale.1 == 0 {
            stride_tensor::bail!(arg, "upsample_nearest2d", "scale factors must be at least 1, got {scale:?}");
        }
        Ok([n, c, h, w])
    }

    pub(super) fn upsample(&self, x: &Tensor<f32>, scale: (usize, usize)) -> Result<Tensor<f32>> {
        let [n, c, h, w] = Self::upsample_dims(x.shape(), scale)?;
        let out = [n, c, h * scale.0, w * scale.1];
        let total = shape::numel("upsample_nearest2d", &out)?;
        let mut y = self.fresh(total)?;
        if total > 0 {
            let (hi, wi, si, sj) = (int("upsample", h)?, int("upsample", w)?, int("upsample", scale.0)?, int("upsample", scale.1)?);
            launch!(self, "upsample_fwd", grid(total), self.slice(x)?, &mut y, &((n * c) as i64), &hi, &wi, &si, &sj);
        }
        self.wrap(y, &out)
    }

    pub(super) fn upsample_backward(&self, g: &Tensor<f32>, x_shape: &[usize], scale: (usize, usize)) -> Result<Tensor<f32>> {
        let [n, c, h, w] = Self::upsample_dims(x_shape, scale)?;
        let total = n * c * h * w;
        let mut dx = self.fresh(total)?;
        if total > 0 {
            let (hi, wi, si, sj) = (int("upsample", h)?, int("upsample", w)?, int("upsample", scale.0)?, int("upsample", scale.1)?);
            launch!(self, "upsample_bwd", grid(total), self.slice(g)?, &mut dx, &((n * c) as i64), &hi, &wi, &si, &sj);
        }
        self.wrap(dx, x_shape)
    }
}
