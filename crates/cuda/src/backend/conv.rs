//! Convolution on the GPU: through cuDNN where it can (`dnn.rs`; padding that differs between
//! the sides of an axis added to the image first, as cuDNN pads both sides alike), else the
//! image lowered to columns [C*R*S, N*P*Q] by a kernel and multiplied by cuBLAS (one call: a
//! product per image written straight into NCHW, or per group), and the adjoint (columns
//! gathered back into an image) for the input gradient and for transposed convolution. Each
//! pass chooses on its own, so a pass cuDNN refuses still has the other two on cuDNN.

use std::borrow::Cow;

use cudarc::driver::{CudaSlice, PushKernelArg};
use stride_kernels::conv::{Conv2dOptions, ConvGeom};
use stride_tensor::{Result, Tensor};

use super::dnn::{DnnShape, Pass};
use super::{check_bias, grid, int, Args14, Batch, CudaBackend, Mm};

/// How cuDNN runs a convolution: its form, the geometry that form describes and, when the
/// large side is padded first, the rows and columns added before and after.
struct DnnForm {
    shape: DnnShape,
    geom: ConvGeom,
    extra: Option<[(usize, usize); 2]>,
}

/// The geometry `g` is on cuDNN, if cuDNN can run it: `g` itself, or, where `g`'s padding differs
/// between the two sides of an axis in a way that changes the output (cuDNN pads both sides
/// alike), the same convolution over the large side padded by the difference first, with the
/// smaller padding on both sides.
fn dnn_form(g: &ConvGeom) -> Option<DnnForm> {
    if let Some(shape) = DnnShape::of(g) {
        return Some(DnnForm { shape, geom: *g, extra: None });
    }
    let (top, bottom, left, right) = g.pad;
    let (ph, pw) = (top.min(bottom), left.min(right));
    let extra = [(top - ph, bottom - ph), (left - pw, right - pw)];
    let mut e = *g;
    e.h = g.h.checked_add(extra[0].0 + extra[0].1)?;
    e.w = g.w.checked_add(extra[1].0 + extra[1].1)?;
    e.pad = (ph, ph, pw, pw);
    Some(DnnForm { shape: DnnShape::of(&e)?, geom: e, extra: Some(extra) })
}

impl CudaBackend {
    /// How cuDNN runs `g`: `None` when it is off or cannot.
    fn dnn_form(&self, g: &ConvGeom) -> Option<DnnForm> {
        self.dnn.as_ref().and(dnn_form(g))
    }

    /// One pass of the convolution `s` on cuDNN into a fresh buffer of `len` elements: `None`
    /// when cuDNN offers no algorithm for it (the caller lowers to columns instead).
    fn on_dnn(&self, s: &DnnShape, pass: Pass, a: &CudaSlice<f32>, b: &CudaSlice<f32>, len: usize) -> Result<Option<CudaSlice<f32>>> {
        let Some(dnn) = &self.dnn else {
            return Ok(None);
        };
        // cuDNN writes every element (beta 0).
        let mut out = self.fresh(len)?;
        Ok(dnn.run(s, pass, a, b, &mut out)?.then_some(out))
    }

    /// The large side `x` [N, C, H, W] as cuDNN's form reads it: padded first where it must be.
    fn dnn_input<'a>(&self, f: &DnnForm, x: &'a Tensor<f32>) -> Result<Cow<'a, Tensor<f32>>> {
        Ok(match f.extra {
            Some(pads) => Cow::Owned(self.pad(x, &pads, 0.0)?),
            None => Cow::Borrowed(x),
        })
    }

    /// The large side cuDNN wrote in its form (`big`, with `bias` added when given) as the
    /// geometry `g`'s [N, C, H, W]: the padded rows and columns cut off where there are any.
    fn dnn_output(&self, f: &DnnForm, g: &ConvGeom, mut big: CudaSlice<f32>, bias: Option<&Tensor<f32>>) -> Result<Tensor<f32>> {
        let e = &f.geom;
        if let Some(b) = bias {
            self.add_bias("conv_transpose2d", &mut big, b, e.c, e.h * e.w, e.n * e.c * e.h * e.w)?;
        }
        let big = self.wrap(big, &[e.n, e.c, e.h, e.w])?;
        match f.extra {
            Some(pads) => self.pad_backward(&big, &[g.n, g.c, g.h, g.w], &pads),
            None => Ok(big),
        }
    }

    /// Adds `bias[c]` to every element of channel c of `y` [N, C, HW].
    fn add_bias(&self, op: &'static str, y: &mut CudaSlice<f32>, bias: &Tensor<f32>, c: usize, hw: usize, total: usize) -> Result<()> {
        if total > 0 {
            launch!(self, "add_channel_bias", grid(total), y, self.slice(bias)?, &int(op, c)?, &(hw as i64), &(total as i64));
        }
        Ok(())
    }

    /// Columns [C*R*S, N*P*Q] of the image `x` [N, C, H, W] for geometry `g`.
    fn im2col(&self, g: &ConvGeom, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let n = g.c * g.r * g.s * g.n * g.p * g.q;
        let mut cols = self.fresh(n)?;
        let a = self.geom_args(g)?;
        if n > 0 {
            launch!(self, "im2col", grid(n), x, &mut cols, &a);
        }
        Ok(cols)
    }

    /// The image [N, C, H, W] whose columns add up to `cols` (im2col's adjoint).
    fn col2im(&self, g: &ConvGeom, cols: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let n = g.n * g.c * g.h * g.w;
        let mut x = self.fresh(n)?;
        let a = self.geom_args(g)?;
        if n > 0 {
            launch!(self, "col2im", grid(n), cols, &mut x, &a);
        }
        Ok(x)
    }

    fn geom_args(&self, g: &ConvGeom) -> Result<Args14> {
        Args14::new("conv2d", [g.n, g.c, g.h, g.w, g.p, g.q, g.r, g.s, g.stride.0, g.stride.1, g.dilation.0, g.dilation.1, g.pad.0, g.pad.2])
    }

    /// [N, K, L] -> [K, N*L].
    fn nkl_to_knl(&self, y: &CudaSlice<f32>, n: usize, k: usize, l: usize) -> Result<CudaSlice<f32>> {
        let mut t = self.fresh(n * k * l)?;
        if n * k * l > 0 {
            launch!(self, "nkl_to_knl", grid(n * k * l), y, &mut t, &int("conv", n)?, &int("conv", k)?, &(l as i64));
        }
        Ok(t)
    }

    /// [K, N*L] -> [N, K, L] plus an optional bias per k.
    fn knl_to_nkl(&self, t: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, n: usize, k: usize, l: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.fresh(n * k * l)?;
        if n * k * l > 0 {
            let has = bias.is_some() as i32;
            launch!(self, "knl_to_nkl", grid(n * k * l), t, bias.unwrap_or(t), &has, &mut y, &int("conv", n)?, &int("conv", k)?, &(l as i64));
        }
        Ok(y)
    }

    /// The convolution's product per group, in one call: out[K, NPQ] = W[K, CgRS] x cols[C*R*S,
    /// NPQ], group g's rows of W and out and its rows of cols.
    fn conv_product(&self, g: &ConvGeom, w: &CudaSlice<f32>, cols: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (kg, crs, npq) = (g.k / g.groups, g.c / g.groups * g.r * g.s, g.n * g.p * g.q);
        let mut out = self.product_out(g.k * npq, crs)?;
        let batch = Batch { count: g.groups, stride_a: kg * crs, stride_b: crs * npq, stride_c: kg * npq, ld_b: None, ld_c: None };
        self.gemm_batched(Mm { m: kg, n: npq, k: crs, ta: false, tb: false, beta: 0.0 }, batch, w, cols, &mut out)?;
        Ok(out)
    }

    /// A one-group convolution's product written straight into NCHW, one product per image in
    /// one call: y_n [K, PQ] = W [K, CRS] x the image's PQ columns of `cols` (whose rows are
    /// N*P*Q apart), rather than y^T [K, NPQ] and a transposing copy.
    fn product_to_nchw(&self, g: &ConvGeom, w: &CudaSlice<f32>, cols: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (pq, crs) = (g.p * g.q, g.c * g.r * g.s);
        let mut y = self.product_out(g.n * g.k * pq, crs)?;
        let batch = Batch { count: g.n, stride_a: 0, stride_b: pq, stride_c: g.k * pq, ld_b: Some(g.n * pq), ld_c: None };
        self.gemm_batched(Mm { m: g.k, n: pq, k: crs, ta: false, tb: false, beta: 0.0 }, batch, w, cols, &mut y)?;
        Ok(y)
    }

    /// The convolution's adjoint product per group: cols[C*R*S, NPQ] = W^T x t[K, NPQ].
    fn conv_product_t(&self, g: &ConvGeom, w: &CudaSlice<f32>, t: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (kg, crs, npq) = (g.k / g.groups, g.c / g.groups * g.r * g.s, g.n * g.p * g.q);
        let mut cols = self.product_out(g.c * g.r * g.s * npq, kg)?;
        let batch = Batch { count: g.groups, stride_a: kg * crs, stride_b: kg * npq, stride_c: crs * npq, ld_b: None, ld_c: None };
        self.gemm_batched(Mm { m: crs, n: npq, k: kg, ta: true, tb: false, beta: 0.0 }, batch, w, t, &mut cols)?;
        Ok(cols)
    }

    /// The filter gradient per group: dW[K, CgRS] = t[K, NPQ] x cols^T.
    fn conv_filter_grad(&self, g: &ConvGeom, t: &CudaSlice<f32>, cols: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (kg, crs, npq) = (g.k / g.groups, g.c / g.groups * g.r * g.s, g.n * g.p * g.q);
        let mut dw = self.product_out(g.k * crs, npq)?;
        let batch = Batch { count: g.groups, stride_a: kg * npq, stride_b: crs * npq, stride_c: kg * crs, ld_b: None, ld_c: None };
        self.gemm_batched(Mm { m: kg, n: crs, k: npq, ta: false, tb: true, beta: 0.0 }, batch, t, cols, &mut dw)?;
        Ok(dw)
    }

    /// Sum over every axis but 1 of [N, C, ...]: a bias's gradient.
    fn channel_sums(&self, g: &Tensor<f32>) -> Result<Tensor<f32>> {
        let keep: Vec<bool> = (0..g.rank()).map(|d| d == 1).collect();
        self.reduce(g, &keep, &[g.shape()[1]])
    }

    pub(super) fn conv2d(&self, x: &[Tensor<f32>], opts: &Conv2dOptions) -> Result<Tensor<f32>> {
        let g = ConvGeom::conv2d(x[0].shape(), x[1].shape(), opts)?;
        check_bias("conv2d", x.get(2), g.k)?;
        let total = g.n * g.k * g.p * g.q;
        if let Some(f) = self.dnn_form(&g) {
            let x0 = self.dnn_input(&f, &x[0])?;
            if let Some(mut y) = self.on_dnn(&f.shape, Pass::Forward, self.slice(&x0)?, self.slice(&x[1])?, total)? {
                if let Some(b) = x.get(2) {
                    self.add_bias("conv2d", &mut y, b, g.k, g.p * g.q, total)?;
                }
                return self.wrap(y, &g.small_shape());
            }
        }
        let cols = self.im2col(&g, self.slice(&x[0])?)?;
        if g.groups == 1 {
            let mut y = self.product_to_nchw(&g, self.slice(&x[1])?, &cols)?;
            if let Some(b) = x.get(2) {
                self.add_bias("conv2d", &mut y, b, g.k, g.p * g.q, total)?;
            }
            return self.wrap(y, &g.small_shape());
        }
        let t = self.conv_product(&g, self.slice(&x[1])?, &cols)?;
        let bias = x.get(2).map(|b| self.slice(b)).transpose()?;
        let y = self.knl_to_nkl(&t, bias, g.n, g.k, g.p * g.q)?;
        self.wrap(y, &g.small_shape())
    }

    pub(super) fn conv2d_backward(&self, opts: &Conv2dOptions, gy: &Tensor<f32>, x: &[Tensor<f32>]) -> Result<Vec<Option<Tensor<f32>>>> {
        let g = ConvGeom::conv2d(x[0].shape(), x[1].shape(), opts)?;
        let (sx, sw, sg) = (self.slice(&x[0])?, self.slice(&x[1])?, self.slice(gy)?);
        let (mut dx, mut dw) = (None, None);
        if let Some(f) = self.dnn_form(&g) {
            let e = &f.geom;
            if let Some(big) = self.on_dnn(&f.shape, Pass::Data, sw, sg, e.n * e.c * e.h * e.w)? {
                dx = Some(self.dnn_output(&f, &g, big, None)?);
            }
            let x0 = self.dnn_input(&f, &x[0])?;
            dw = self.on_dnn(&f.shape, Pass::Filter, self.slice(&x0)?, sg, g.k * g.cg() * g.r * g.s)?;
        }
        let (dx, dw) = match (dx, dw) {
            (Some(dx), Some(dw)) => (dx, dw),
            (dx, dw) => {
                let t = self.nkl_to_knl(sg, g.n, g.k, g.p * g.q)?;
                let dw = match dw {
                    Some(dw) => dw,
                    None => self.conv_filter_grad(&g, &t, &self.im2col(&g, sx)?)?,
                };
                let dx = match dx {
                    Some(dx) => dx,
                    None => self.wrap(self.col2im(&g, &self.conv_product_t(&g, sw, &t)?)?, x[0].shape())?,
                };
                (dx, dw)
            }
        };
        let mut out = vec![Some(dx), Some(self.wrap(dw, x[1].shape())?)];
        if x.len() > 2 {
            out.push(Some(self.channel_sums(gy)?));
        }
        Ok(out)
    }

    /// Transposed convolution: the adjoint of the convolution with geometry `g` (whose small
    /// side is this op's input).
    pub(super) fn conv_transpose2d(&self, x: &[Tensor<f32>], opts: &Conv2dOptions) -> Result<Tensor<f32>> {
        let g = ConvGeom::conv_transpose2d(x[0].shape(), x[1].shape(), opts)?;
        check_bias("conv_transpose2d", x.get(2), g.c)?;
        let (sx, sw) = (self.slice(&x[0])?, self.slice(&x[1])?);
        if let Some(f) = self.dnn_form(&g) {
            let e = &f.geom;
            if let Some(big) = self.on_dnn(&f.shape, Pass::Data, sw, sx, e.n * e.c * e.h * e.w)? {
                return self.dnn_output(&f, &g, big, x.get(2));
            }
        }
        let cols = if g.groups == 1 {
            // One product per image read straight from NCHW, into the image's block of
            // columns: cols_n [CRS, PQ] (rows N*P*Q apart) = W^T [CRS, K] x x_n [K, PQ].
            let (pq, crs) = (g.p * g.q, g.c * g.r * g.s);
            let mut cols = self.product_out(crs * g.n * pq, g.k)?;
            let batch = Batch { count: g.n, stride_a: 0, stride_b: g.k * pq, stride_c: pq, ld_b: None, ld_c: Some(g.n * pq) };
            self.gemm_batched(Mm { m: crs, n: pq, k: g.k, ta: true, tb: false, beta: 0.0 }, batch, sw, sx, &mut cols)?;
            cols
        } else {
            self.conv_product_t(&g, sw, &self.nkl_to_knl(sx, g.n, g.k, g.p * g.q)?)?
        };
        let mut y = self.col2im(&g, &cols)?;
        let total = g.n * g.c * g.h * g.w;
        if let Some(b) = x.get(2) {
            self.add_bias("conv_transpose2d", &mut y, b, g.c, g.h * g.w, total)?;
        }
        self.wrap(y, &[g.n, g.c, g.h, g.w])
    }

    pub(super) fn conv_transpose2d_backward(&self, opts: &Conv2dOptions, gy: &Tensor<f32>, x: &[Tensor<f32>]) -> Result<Vec<Option<Tensor<f32>>>> {
        let g = ConvGeom::conv_transpose2d(x[0].shape(), x[1].shape(), opts)?;
        // The input's gradient is the convolution of gy; the filter's pairs gy with x, as a
        // convolution's filter gradient pairs its input with its output's gradient.
        let (sx, sw, sg) = (self.slice(&x[0])?, self.slice(&x[1])?, self.slice(gy)?);
        let (mut dx, mut dw) = (None, None);
        if let Some(f) = self.dnn_form(&g) {
            let gy0 = self.dnn_input(&f, gy)?;
            dx = self.on_dnn(&f.shape, Pass::Forward, self.slice(&gy0)?, sw, g.n * g.k * g.p * g.q)?;
            dw = self.on_dnn(&f.shape, Pass::Filter, self.slice(&gy0)?, sx, g.k * g.cg() * g.r * g.s)?;
        }
        let (dx, dw) = match (dx, dw) {
            (Some(dx), Some(dw)) => (dx, dw),
            (dx, dw) => {
                let cols = self.im2col(&g, sg)?;
                let dx = match dx {
                    Some(dx) => dx,
                    None if g.groups == 1 => self.product_to_nchw(&g, sw, &cols)?,
                    None => self.knl_to_nkl(&self.conv_product(&g, sw, &cols)?, None, g.n, g.k, g.p * g.q)?,
                };
                let dw = match dw {
                    Some(dw) => dw,
                    None => self.conv_filter_grad(&g, &self.nkl_to_knl(sx, g.n, g.k, g.p * g.q)?, &cols)?,
                };
                (dx, dw)
            }
        };
        let mut out = vec![Some(self.wrap(dx, x[0].shape())?), Some(self.wrap(dw, x[1].shape())?)];
        if x.len() > 2 {
            out.push(Some(self.channel_sums(gy)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_kernels::conv::Padding;

    fn conv(x: [usize; 4], w: [usize; 4], stride: usize, padding: Padding) -> ConvGeom {
        let o = Conv2dOptions { stride: (stride, stride), padding, dilation: (1, 1), groups: 1, output_padding: (0, 0) };
        ConvGeom::conv2d(&x, &w, &o).unwrap()
    }

    #[test]
    fn padding_cudnn_cannot_express_is_added_to_the_image_first() {
        // Symmetric padding: cuDNN's own form, nothing added.
        let f = dnn_form(&conv([2, 3, 8, 8], [4, 3, 3, 3], 1, Padding::uniform(1))).unwrap();
        assert_eq!(f.extra, None);
        // "Same" with an even kernel pads (1, 2): one more row and column at the end, then 1
        // on both sides; 6 outputs either way.
        let g = conv([1, 2, 6, 6], [2, 2, 4, 4], 1, Padding::Same);
        assert_eq!((g.pad, g.p), ((1, 2, 1, 2), 6));
        let f = dnn_form(&g).unwrap();
        assert_eq!((f.extra, f.geom.h, f.geom.w, f.geom.pad, f.geom.p), (Some([(0, 1), (0, 1)]), 7, 7, (1, 1, 1, 1), 6));
        // "Same" at stride 2 on an even size pads (0, 1).
        let f = dnn_form(&conv([1, 4, 8, 8], [4, 4, 3, 3], 2, Padding::Same)).unwrap();
        assert_eq!((f.extra, f.geom.h, f.geom.pad), (Some([(0, 1), (0, 1)]), 9, (0, 0, 0, 0)));
        // More at the top than the bottom: the difference goes before.
        let g = conv([1, 2, 6, 6], [2, 2, 3, 3], 1, Padding::Explicit { top: 2, bottom: 0, left: 1, right: 1 });
        let f = dnn_form(&g).unwrap();
        assert_eq!((f.extra, f.geom.h, f.geom.w, f.geom.pad), (Some([(2, 0), (0, 0)]), 8, 6, (0, 0, 1, 1)));
        // What cuDNN cannot take at all stays on columns: an empty batch.
        assert!(dnn_form(&conv([0, 2, 6, 6], [2, 2, 4, 4], 1, Padding::Same)).is_none());
    }
}
