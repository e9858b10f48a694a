//! Convolution on the GPU: through cuDNN where it can (`dnn.rs`), else the image lowered to
//! columns [C*R*S, N*P*Q] by a kernel, one cuBLAS product per group, and the adjoint (columns
//! gathered back into an image) for the input gradient and for transposed convolution. Each
//! pass chooses on its own, so a pass cuDNN refuses still has the other two on cuDNN.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use stride_kernels::conv::{Conv2dOptions, ConvGeom};
use stride_tensor::{Result, Tensor};

use super::dnn::{DnnShape, Pass};
use super::{check_bias, grid, int, Args14, CudaBackend, Mm};

impl CudaBackend {
    /// One pass of the convolution `g` on cuDNN into a fresh buffer of `len` elements: `None`
    /// when cuDNN is off or cannot run it (the caller lowers to columns instead).
    fn on_dnn(&self, g: &ConvGeom, pass: Pass, a: &CudaSlice<f32>, b: &CudaSlice<f32>, len: usize) -> Result<Option<CudaSlice<f32>>> {
        let (Some(dnn), Some(s)) = (&self.dnn, DnnShape::of(g)) else {
            return Ok(None);
        };
        // cuDNN writes every element (beta 0).
        let mut out = self.fresh(len)?;
        Ok(dnn.run(&s, pass, a, b, &mut out)?.then_some(out))
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

    /// The convolution's product per group: out[K, NPQ] = W[K, CgRS] x cols[C*R*S, NPQ].
    fn conv_product(&self, g: &ConvGeom, w: &CudaSlice<f32>, cols: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (kg, crs, npq) = (g.k / g.groups, g.c / g.groups * g.r * g.s, g.n * g.p * g.q);
        let mut out = self.product_out(g.k * npq, crs)?;
        for gi in 0..g.groups {
            let wv: CudaView<f32> = w.slice(gi * kg * crs..(gi + 1) * kg * crs);
            let cv: CudaView<f32> = cols.slice(gi * crs * npq..(gi + 1) * crs * npq);
            let mut ov: CudaViewMut<f32> = out.slice_mut(gi * kg * npq..(gi + 1) * kg * npq);
            self.gemm(Mm { m: kg, n: npq, k: crs, ta: false, tb: false, beta: 0.0 }, &wv, &cv, &mut ov)?;
        }
        Ok(out)
    }

    /// The convolution's adjoint product per group: cols[C*R*S, NPQ] = W^T x t[K, NPQ].
    fn conv_product_t(&self, g: &ConvGeom, w: &CudaSlice<f32>, t: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (kg, crs, npq) = (g.k / g.groups, g.c / g.groups * g.r * g.s, g.n * g.p * g.q);
        let mut cols = self.product_out(g.c * g.r * g.s * npq, kg)?;
        for gi in 0..g.groups {
            let wv = w.slice(gi * kg * crs..(gi + 1) * kg * crs);
            let tv = t.slice(gi * kg * npq..(gi + 1) * kg * npq);
            let mut cv = cols.slice_mut(gi * crs * npq..(gi + 1) * crs * npq);
            self.gemm(Mm { m: crs, n: npq, k: kg, ta: true, tb: false, beta: 0.0 }, &wv, &tv, &mut cv)?;
        }
        Ok(cols)
    }

    /// The filter gradient per group: dW[K, CgRS] = t[K, NPQ] x cols^T.
    fn conv_filter_grad(&self, g: &ConvGeom, t: &CudaSlice<f32>, cols: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let (kg, crs, npq) = (g.k / g.groups, g.c / g.groups * g.r * g.s, g.n * g.p * g.q);
        let mut dw = self.product_out(g.k * crs, npq)?;
        for gi in 0..g.groups {
            let tv = t.slice(gi * kg * npq..(gi + 1) * kg * npq);
            let cv = cols.slice(gi * crs * npq..(gi + 1) * crs * npq);
            let mut dv = dw.slice_mut(gi * kg * crs..(gi + 1) * kg * crs);
            self.gemm(Mm { m: kg, n: crs, k: npq, ta: false, tb: true, beta: 0.0 }, &tv, &cv, &mut dv)?;
        }
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
        if let Some(mut y) = self.on_dnn(&g, Pass::Forward, self.slice(&x[0])?, self.slice(&x[1])?, total)? {
            if let Some(b) = x.get(2) {
                self.add_bias("conv2d", &mut y, b, g.k, g.p * g.q, total)?;
            }
            return self.wrap(y, &g.small_shape());
        }
        let cols = self.im2col(&g, self.slice(&x[0])?)?;
        let t = self.conv_product(&g, self.slice(&x[1])?, &cols)?;
        let bias = x.get(2).map(|b| self.slice(b)).transpose()?;
        let y = self.knl_to_nkl(&t, bias, g.n, g.k, g.p * g.q)?;
        self.wrap(y, &g.small_shape())
    }

    pub(super) fn conv2d_backward(&self, opts: &Conv2dOptions, gy: &Tensor<f32>, x: &[Tensor<f32>]) -> Result<Vec<Option<Tensor<f32>>>> {
        let g = ConvGeom::conv2d(x[0].shape(), x[1].shape(), opts)?;
        let (sx, sw, sg) = (self.slice(&x[0])?, self.slice(&x[1])?, self.slice(gy)?);
        let dx = self.on_dnn(&g, Pass::Data, sw, sg, g.n * g.c * g.h * g.w)?;
        let dw = self.on_dnn(&g, Pass::Filter, sx, sg, g.k * g.cg() * g.r * g.s)?;
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
                    None => self.col2im(&g, &self.conv_product_t(&g, sw, &t)?)?,
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

    /// Transposed convolution: the adjoint of the convolution with geometry `g` (whose small
    /// side is this op's input).
    pub(super) fn conv_transpose2d(&self, x: &[Tensor<f32>], opts: &Conv2dOptions) -> Result<Tensor<f32>> {
        let g = ConvGeom::conv_transpose2d(x[0].shape(), x[1].shape(), opts)?;
        check_bias("conv_transpose2d", x.get(2), g.c)?;
        let (sx, sw) = (self.slice(&x[0])?, self.slice(&x[1])?);
        let total = g.n * g.c * g.h * g.w;
        let mut y = match self.on_dnn(&g, Pass::Data, sw, sx, total)? {
            Some(y) => y,
            None => {
                let t = self.nkl_to_knl(sx, g.n, g.k, g.p * g.q)?;
                self.col2im(&g, &self.conv_product_t(&g, sw, &t)?)?
            }
        };
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
        let dx = self.on_dnn(&g, Pass::Forward, sg, sw, g.n * g.k * g.p * g.q)?;
        let dw = self.on_dnn(&g, Pass::Filter, sg, sx, g.k * g.cg() * g.r * g.s)?;
        let (dx, dw) = match (dx, dw) {
            (Some(dx), Some(dw)) => (dx, dw),
            (dx, dw) => {
                let cols = self.im2col(&g, sg)?;
                let dx = match dx {
                    Some(dx) => dx,
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
