//! Max and average pooling through cuDNN, forward and backward, when cuDNN can describe the
//! windows ([`PoolShape::of`]); anything else (windows that hang past the padded image, padding
//! that differs between sides where it changes the windows) stays on the backend's kernels.
//! Max pooling here keeps no argmax: cuDNN's backward pass finds each window's maximum again
//! from x and y.

use std::collections::hash_map::Entry;
use std::ffi::{c_int, c_void};

use cudarc::cudnn::{result, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use stride_kernels::pool::PoolGeom;
use stride_tensor::Result;

use super::{dnn_err, fits_c_int, Dnn};

/// What a pooling computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PoolMode {
    Max,
    /// The divisor counts the padded positions a window covers (PyTorch's default).
    AverageWithPadding,
    /// The divisor counts only the window's positions inside the image.
    AverageWithoutPadding,
}

/// One pooling as cuDNN sees it: x [N, C, H, W], y [N, C, P, Q], the window, its stride and the
/// padding on each side of an axis (the same on both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolShape {
    x: [c_int; 4],
    y: [c_int; 4],
    window: [c_int; 2],
    pad: [c_int; 2],
    stride: [c_int; 2],
    mode: PoolMode,
}

impl PoolShape {
    /// The cuDNN form of `g` (max pooling when `max`, else average), if there is one: no empty
    /// side, sizes within 32-bit ints, padding smaller than the window, cuDNN's output size
    /// with the top (left) padding on both sides equal to `g`'s, and, for an average that counts
    /// padding, every window inside the padded image (where one hangs past it, as in ceil mode,
    /// `g` divides by less than the window's size and cuDNN would not).
    pub(crate) fn of(g: &PoolGeom, max: bool) -> Option<PoolShape> {
        let i = |v: usize| c_int::try_from(v).ok().filter(|&v| v > 0);
        let (x, y) = ([g.n, g.c, g.h, g.w], [g.n, g.c, g.p, g.q]);
        if !(fits_c_int(x) && fits_c_int(y)) {
            return None;
        }
        let include_pad = !max && g.count_include_pad;
        let axis = |size: usize, (lo, hi): (usize, usize), k: usize, s: usize, out: usize| {
            let cudnn_out = (size + 2 * lo).checked_sub(k).map(|room| room / s + 1);
            lo < k && out > 0 && cudnn_out == Some(out) && (!include_pad || (out - 1) * s + k <= size + lo + hi)
        };
        let (pt, pb, pl, pr) = g.pad;
        if !axis(g.h, (pt, pb), g.kernel.0, g.stride.0, g.p) || !axis(g.w, (pl, pr), g.kernel.1, g.stride.1, g.q) {
            return None;
        }
        let four = |d: [usize; 4]| Some([i(d[0])?, i(d[1])?, i(d[2])?, i(d[3])?]);
        let mode = match (max, include_pad) {
            (true, _) => PoolMode::Max,
            (false, true) => PoolMode::AverageWithPadding,
            (false, false) => PoolMode::AverageWithoutPadding,
        };
        Some(PoolShape {
            x: four(x)?,
            y: four(y)?,
            window: [i(g.kernel.0)?, i(g.kernel.1)?],
            pad: [c_int::try_from(pt).ok()?, c_int::try_from(pl).ok()?],
            stride: [i(g.stride.0)?, i(g.stride.1)?],
            mode,
        })
    }

    fn count(dims: [c_int; 4]) -> usize {
        dims.iter().map(|&d| d as usize).product()
    }
}

/// A pooling's descriptors: x, y and the pooling itself.
pub(super) struct PoolDescs {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    pool: sys::cudnnPoolingDescriptor_t,
}

impl Drop for PoolDescs {
    fn drop(&mut self) {
        // SAFETY: created by `PoolDescs::new` (null if never created), destroyed once, here.
        unsafe {
            for d in [self.x, self.y] {
                if !d.is_null() {
                    let _ = result::destroy_tensor_descriptor(d);
                }
            }
            if !self.pool.is_null() {
                let _ = sys::cudnnDestroyPoolingDescriptor(self.pool);
            }
        }
    }
}

impl PoolDescs {
    fn new(s: &PoolShape) -> std::result::Result<PoolDescs, result::CudnnError> {
        use sys::cudnnDataType_t::CUDNN_DATA_FLOAT as F32;
        use sys::cudnnPoolingMode_t as M;
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let mut d = PoolDescs { x: std::ptr::null_mut(), y: std::ptr::null_mut(), pool: std::ptr::null_mut() };
        d.x = result::create_tensor_descriptor()?;
        d.y = result::create_tensor_descriptor()?;
        d.pool = result::create_pooling_descriptor()?;
        // Max pooling as the kernels do it: deterministic, and a NaN in a window is its maximum.
        let mode = match s.mode {
            PoolMode::Max => M::CUDNN_POOLING_MAX_DETERMINISTIC,
            PoolMode::AverageWithPadding => M::CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING,
            PoolMode::AverageWithoutPadding => M::CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING,
        };
        // SAFETY: the descriptors were just created and live until `d` drops.
        unsafe {
            result::set_tensor4d_descriptor(d.x, NCHW, F32, s.x)?;
            result::set_tensor4d_descriptor(d.y, NCHW, F32, s.y)?;
            let ([wh, ww], [ph, pw], [sh, sw]) = (s.window, s.pad, s.stride);
            sys::cudnnSetPooling2dDescriptor(d.pool, mode, sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN, wh, ww, ph, pw, sh, sw).result()?;
        }
        Ok(d)
    }
}

impl Dnn {
    /// y = the pooling `s` of x, every element written.
    pub(crate) fn pool_forward(&self, s: &PoolShape, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        check_len(s, x.len(), PoolShape::count(s.x), y.len(), PoolShape::count(s.y))?;
        self.with_pool(s, |handle, d, stream| {
            let (px, _gx) = x.device_ptr(stream);
            let (py, _gy) = y.device_ptr_mut(stream);
            let (one, zero) = (1.0f32, 0.0f32);
            // SAFETY: a live handle and descriptors of these buffers' shapes (checked above);
            // host scalars that outlive the call.
            unsafe {
                sys::cudnnPoolingForward(
                    handle,
                    d.pool,
                    (&one as *const f32).cast(),
                    d.x,
                    px as *const c_void,
                    (&zero as *const f32).cast(),
                    d.y,
                    py as *mut c_void,
                )
            }
            .result()
            .map_err(|e| dnn_err(&format!("pooling of {s:?}"), e))
        })
    }

    /// dx = the gradient of the pooling `s` from dy, given its input x and output y; every
    /// element of dx written.
    pub(crate) fn pool_backward(
        &self,
        s: &PoolShape,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (nx, ny) = (PoolShape::count(s.x), PoolShape::count(s.y));
        check_len(s, x.len().min(dx.len()), nx, y.len().min(dy.len()), ny)?;
        self.with_pool(s, |handle, d, stream| {
            let (px, _gx) = x.device_ptr(stream);
            let (py, _gy) = y.device_ptr(stream);
            let (pdy, _gdy) = dy.device_ptr(stream);
            let (pdx, _gdx) = dx.device_ptr_mut(stream);
            let (one, zero) = (1.0f32, 0.0f32);
            // SAFETY: as in `pool_forward`; dy has y's shape and dx has x's.
            unsafe {
                sys::cudnnPoolingBackward(
                    handle,
                    d.pool,
                    (&one as *const f32).cast(),
                    d.y,
                    py as *const c_void,
                    d.y,
                    pdy as *const c_void,
                    d.x,
                    px as *const c_void,
                    (&zero as *const f32).cast(),
                    d.x,
                    pdx as *mut c_void,
                )
            }
            .result()
            .map_err(|e| dnn_err(&format!("pooling's gradient of {s:?}"), e))
        })
    }

    /// Runs `f` with the handle (held), the descriptors of `s` (made once) and the stream.
    fn with_pool<R>(&self, s: &PoolShape, f: impl FnOnce(sys::cudnnHandle_t, &PoolDescs, &cudarc::driver::CudaStream) -> Result<R>) -> Result<R> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.stream.context().bind_to_thread().map_err(|e| crate::err("binding the context", e))?;
        let handle = st.handle;
        let d = match st.pools.entry(*s) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(PoolDescs::new(s).map_err(|e| dnn_err("pooling descriptors", e))?),
        };
        f(handle, d, &self.stream)
    }
}

/// That the buffers hold at least the elements the descriptors say.
fn check_len(s: &PoolShape, x_len: usize, x_needs: usize, y_len: usize, y_needs: usize) -> Result<()> {
    if x_len < x_needs || y_len < y_needs {
        return Err(dnn_err("pooling", format!("buffers of {x_len} and {y_len} elements for {s:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_kernels::conv::Padding;
    use stride_kernels::pool::Pool2dOptions;

    fn geom(x: [usize; 4], k: usize, stride: usize, padding: Padding, ceil: bool) -> PoolGeom {
        let o = Pool2dOptions::new(k).stride(stride).padding(padding).ceil_mode(ceil);
        PoolGeom::new("pool", &x, &o).unwrap()
    }

    #[test]
    fn poolings_cudnn_can_describe() {
        // ResNet's stem pool: 3x3 stride 2 padding 1 on 112x112.
        let g = geom([8, 64, 112, 112], 3, 2, Padding::uniform(1), false);
        let s = PoolShape::of(&g, true).unwrap();
        assert_eq!((s.x, s.y, s.window, s.pad, s.stride, s.mode), ([8, 64, 112, 112], [8, 64, 56, 56], [3, 3], [1, 1], [2, 2], PoolMode::Max));
        // LeNet's 2x2 average, counting padding or not (there is none).
        let g = geom([64, 20, 26, 26], 2, 2, Padding::Valid, false);
        assert_eq!(PoolShape::of(&g, false).unwrap().mode, PoolMode::AverageWithPadding);
        let mut g = geom([64, 20, 26, 26], 2, 2, Padding::Valid, false);
        g.count_include_pad = false;
        assert_eq!(PoolShape::of(&g, false).unwrap().mode, PoolMode::AverageWithoutPadding);
        // Ceil mode whose last window still ends inside the padded image: the same windows.
        let g = geom([1, 1, 7, 7], 3, 2, Padding::uniform(1), true);
        assert_eq!(g.p, 4);
        assert!(PoolShape::of(&g, false).is_some());
    }

    #[test]
    fn poolings_cudnn_cannot_describe_stay_on_the_kernels() {
        // Ceil mode with a last window hanging past the image: one output more than cuDNN's.
        let g = geom([1, 1, 6, 6], 3, 2, Padding::Valid, true);
        assert_eq!(g.p, 3);
        assert_eq!(PoolShape::of(&g, true), None);
        // Ceil mode with as many outputs as cuDNN's (padding 1 at the top, none at the bottom),
        // but a last window past the padded image: max pooling is the same, and so is an
        // average over the image's positions, but one that counts padding divides by less.
        let padding = Padding::Explicit { top: 1, bottom: 0, left: 1, right: 0 };
        let mut g = geom([1, 1, 7, 7], 3, 2, padding, true);
        assert_eq!(g.p, 4);
        assert!(PoolShape::of(&g, true).is_some());
        assert_eq!(PoolShape::of(&g, false), None);
        g.count_include_pad = false;
        assert_eq!(PoolShape::of(&g, false).unwrap().mode, PoolMode::AverageWithoutPadding);
        // "Same" padding (0, 1) that adds an output: cuDNN pads alike on both sides.
        let g = geom([1, 1, 8, 8], 3, 2, Padding::Same, false);
        assert_eq!((g.pad, g.p), ((0, 1, 0, 1), 4));
        assert_eq!(PoolShape::of(&g, true), None);
        // An empty batch, and a tensor past 2^31 elements.
        assert_eq!(PoolShape::of(&geom([0, 1, 4, 4], 2, 2, Padding::Valid, false), true), None);
        assert_eq!(PoolShape::of(&geom([1 << 12, 8, 256, 256], 2, 2, Padding::Valid, false), true), None);
    }
}
