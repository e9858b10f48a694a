//! Convolution tap by tap: for each filter tap (r, s), one product over just the output
//! positions whose window puts that tap inside the image, so the padding's zeros are never
//! multiplied. Lowering by im2col multiplies them, and on small maps with padding they are
//! much of the work: the VAE generator's 4x4 "same" transposed convolution with a 4x4 kernel
//! spends 44% of its products on them.
//!
//! For tap (r, s) and the output rectangle `p x q` where it lands inside the image, with
//! `X_t` [C, n*|p|*|q|] the input values under the tap and `Y_t` [K, ...] the output values:
//!   forward          Y_t += W_t X_t       (W_t = w[:, :, r, s], [K, C], read in place)
//!   data gradient    dX_t += W_t^T dY_t
//!   filter gradient  dW_t  = dY_t X_t^T   (written in place into dw[:, :, r, s])
//! Each pass gathers its operands for the tap, runs one product, and adds the result back.

use std::ops::Range;

use rayon::prelude::*;
use stride_tensor::Elem;

use super::ConvGeom;
use crate::gemm::{matmul, MatRef};
use crate::simd::copy_short;

/// One tap and the output rectangle it touches inside the image.
struct Tap {
    r: usize,
    s: usize,
    p: Range<usize>,
    q: Range<usize>,
}

impl Tap {
    fn positions(&self) -> usize {
        self.p.len() * self.q.len()
    }
}

/// The output positions `0..len_out` whose input index `o * stride + offset` lies in `0..len_in`.
fn inside(len_out: usize, stride: usize, offset: isize, len_in: usize) -> Range<usize> {
    let (lo, hi) = super::im2col::valid_range(len_out, stride, offset, len_in);
    lo..hi
}

fn taps(g: &ConvGeom) -> Vec<Tap> {
    let mut all = Vec::with_capacity(g.r * g.s);
    for r in 0..g.r {
        let p = inside(g.p, g.stride.0, (r * g.dilation.0) as isize - g.pad.0 as isize, g.h);
        for s in 0..g.s {
            let q = inside(g.q, g.stride.1, (s * g.dilation.1) as isize - g.pad.2 as isize, g.w);
            let tap = Tap { r, s, p: p.clone(), q };
            if tap.positions() > 0 {
                all.push(tap);
            }
        }
    }
    all
}

/// The share of im2col's products that are not with padding.
fn useful(g: &ConvGeom) -> f64 {
    let all = g.r * g.s * g.p * g.q;
    taps(g).iter().map(Tap::positions).sum::<usize>() as f64 / all.max(1) as f64
}

/// Tap by tap pays where at least a quarter of im2col's products would be with padding and
/// both channel counts make deep enough products (ungrouped).
pub(crate) fn applies(g: &ConvGeom) -> bool {
    g.groups == 1 && g.c >= 16 && g.k >= 16 && g.r * g.s > 1 && useful(g) <= 0.75
}

/// Elements one image adds to a working thread's buffers: a tap's gathered input and output
/// values for the largest tap.
pub(crate) fn per_image_workspace(g: &ConvGeom) -> usize {
    let most = taps(g).iter().map(Tap::positions).max().unwrap_or(0);
    (g.c + g.k) * most
}

/// Where a tap's positions sit in a stack of planes: position (i, j) of the rectangle is
/// `plane[(row0 + i * step.0) * width + col0 + j * step.1]`.
#[derive(Clone, Copy)]
struct Window {
    row0: usize,
    col0: usize,
    rows: usize,
    cols: usize,
    step: (usize, usize),
    width: usize,
    plane: usize,
}

impl Window {
    /// The tap's positions in the output planes ([P, Q]).
    fn output(g: &ConvGeom, t: &Tap) -> Window {
        Window { row0: t.p.start, col0: t.q.start, rows: t.p.len(), cols: t.q.len(), step: (1, 1), width: g.q, plane: g.p * g.q }
    }
    /// The input values under the tap ([H, W]).
    fn input(g: &ConvGeom, t: &Tap) -> Window {
        let row0 = t.p.start * g.stride.0 + t.r * g.dilation.0 - g.pad.0;
        let col0 = t.q.start * g.stride.1 + t.s * g.dilation.1 - g.pad.2;
        Window { row0, col0, rows: t.p.len(), cols: t.q.len(), step: g.stride, width: g.w, plane: g.h * g.w }
    }
    /// Calls `f(matrix offset, plane offset, length)` for runs of elements contiguous on
    /// both sides (`length` 1 when the plane side is strided) covering `channels` rows of a
    /// [channels, images * rows * cols] matrix taken from `images` images of `channels` planes.
    fn runs(&self, channels: usize, images: usize, mut f: impl FnMut(usize, usize, usize)) {
        let count = self.rows * self.cols;
        let ld = images * count;
        let whole_rows = self.cols == self.width && self.step == (1, 1);
        for c in 0..channels {
            for n in 0..images {
                let plane = (n * channels + c) * self.plane + self.row0 * self.width + self.col0;
                let at = c * ld + n * count;
                if whole_rows {
                    f(at, plane, count);
                    continue;
                }
                for i in 0..self.rows {
                    let (at, from) = (at + i * self.cols, plane + i * self.step.0 * self.width);
                    if self.step.1 == 1 {
                        f(at, from, self.cols);
                    } else {
                        for j in 0..self.cols {
                            f(at + j, from + j * self.step.1, 1);
                        }
                    }
                }
            }
        }
    }
}

fn gather<T: Elem>(win: &Window, channels: usize, images: usize, src: &[T], dst: &mut [T]) {
    win.runs(channels, images, |d, s, len| copy_short(&mut dst[d..d + len], &src[s..s + len]));
}

fn scatter_add<T: Elem>(win: &Window, channels: usize, images: usize, src: &[T], dst: &mut [T]) {
    win.runs(channels, images, |s, d, len| dst[d..d + len].iter_mut().zip(&src[s..s + len]).for_each(|(o, &v)| *o += v));
}

/// The filters tap-major, [R*S][K][C]: each tap's [K, C] matrix contiguous, which the
/// products pack faster than the strided view into [K, C, R, S].
fn by_tap<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let rs = g.r * g.s;
    let mut out = vec![T::zero(); w.len()];
    out.par_chunks_mut((g.k * g.c).max(1)).enumerate().for_each(|(t, wt)| {
        for (o, &v) in wt.iter_mut().zip(w[t..].iter().step_by(rs)) {
            *o = v;
        }
    });
    out
}

/// Tap `t`'s [K, C] matrix of [`by_tap`]'s filters.
fn tap_filter<'a, T>(g: &ConvGeom, w: &'a [T], t: &Tap) -> MatRef<'a, T> {
    let at = (t.r * g.s + t.s) * g.k * g.c;
    MatRef::rows(&w[at..at + g.k * g.c], g.k, g.c)
}

/// Images per share and the threads inside each product: one share per thread when there
/// are enough images, else one share whose products use the whole pool.
fn shares(n: usize) -> (usize, usize) {
    let t = rayon::current_num_threads().max(1);
    if n >= t {
        (n.div_ceil(t), 1)
    } else {
        (n.max(1), t)
    }
}

/// y [N, K, P, Q] = conv(x, w) + bias.
pub(crate) fn forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (chw, pq) = (g.c * g.h * g.w, g.p * g.q);
    let mut y = vec![T::zero(); g.n * g.k * pq];
    let (taps, w) = (taps(g), by_tap(g, w));
    let (per, threads) = shares(g.n);
    y.par_chunks_mut((per * g.k * pq).max(1)).enumerate().for_each(|(j, ys)| {
        let images = ys.len() / (g.k * pq).max(1);
        let xs = &x[j * per * chw..][..images * chw];
        if let Some(b) = bias {
            for (plane, out) in ys.chunks_exact_mut(pq.max(1)).enumerate() {
                out.fill(b[plane % g.k]);
            }
        }
        let (mut cols, mut prod) = (Vec::new(), Vec::new());
        for t in &taps {
            let ld = images * t.positions();
            cols.resize(g.c * ld, T::zero());
            prod.resize(g.k * ld, T::zero());
            gather(&Window::input(g, t), g.c, images, xs, &mut cols);
            matmul(tap_filter(g, &w, t), MatRef::rows(&cols, g.c, ld), &mut prod, ld, false, threads);
            scatter_add(&Window::output(g, t), g.k, images, &prod, ys);
        }
    });
    y
}

/// dx [N, C, H, W] (overwritten) from dy and w.
pub(crate) fn backward_data_into<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T], dx: &mut [T]) {
    let (chw, pq) = (g.c * g.h * g.w, g.p * g.q);
    dx.fill(T::zero());
    let (taps, w) = (taps(g), by_tap(g, w));
    let (per, threads) = shares(g.n);
    dx.par_chunks_mut((per * chw).max(1)).enumerate().for_each(|(j, dxs)| {
        let images = dxs.len() / chw.max(1);
        let dys = &dy[j * per * g.k * pq..][..images * g.k * pq];
        let (mut cols, mut prod) = (Vec::new(), Vec::new());
        for t in &taps {
            let ld = images * t.positions();
            cols.resize(g.k * ld, T::zero());
            prod.resize(g.c * ld, T::zero());
            gather(&Window::output(g, t), g.k, images, dys, &mut cols);
            matmul(tap_filter(g, &w, t).t(), MatRef::rows(&cols, g.k, ld), &mut prod, ld, false, threads);
            scatter_add(&Window::input(g, t), g.c, images, &prod, dxs);
        }
    });
}

/// dw [K, C, R, S] from x and dy, summed over the batch (one partial sum per share, each
/// tap-major as [`by_tap`] lays out filters).
pub(crate) fn backward_filter<T: Elem>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
    let (chw, pq, rs) = (g.c * g.h * g.w, g.p * g.q, g.r * g.s);
    let taps = taps(g);
    let (per, threads) = shares(g.n);
    let partial = |first: usize| -> Vec<T> {
        let images = per.min(g.n - first);
        let (xs, dys) = (&x[first * chw..][..images * chw], &dy[first * g.k * pq..][..images * g.k * pq]);
        let mut dw = vec![T::zero(); g.k * g.c * rs];
        let (mut xt, mut dyt) = (Vec::new(), Vec::new());
        for t in &taps {
            let ld = images * t.positions();
            xt.resize(g.c * ld, T::zero());
            dyt.resize(g.k * ld, T::zero());
            gather(&Window::input(g, t), g.c, images, xs, &mut xt);
            gather(&Window::output(g, t), g.k, images, dys, &mut dyt);
            // dw_t [K, C] = dy_t [K, ld] x x_t^T [ld, C]
            let at = (t.r * g.s + t.s) * g.k * g.c;
            matmul(MatRef::rows(&dyt, g.k, ld), MatRef::rows(&xt, g.c, ld).t(), &mut dw[at..at + g.k * g.c], g.c, false, threads);
        }
        dw
    };
    let parts: Vec<Vec<T>> = (0..g.n).step_by(per.max(1)).collect::<Vec<_>>().into_par_iter().map(partial).collect();
    // The shares' sums, tap-major [R*S][K*C], into [K*C][R*S], a block of filters per task
    // so that each block's output lines are filled in cache (done serially, the strided
    // writes were 3.5% of vae_train).
    const BLOCK: usize = 1024;
    let kc = g.k * g.c;
    crate::simd::par_filled(kc * rs, BLOCK * rs.max(1), |b, out| {
        let first = b * BLOCK;
        for t in 0..rs {
            for (i, o) in out[t..].iter_mut().step_by(rs).enumerate() {
                let at = t * kc + first + i;
                *o = parts.iter().fold(T::zero(), |sum, p| sum + p[at]);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{Conv2dOptions, Padding};

    #[test]
    fn the_vae_generators_same_layer_wastes_what_im2col_would_multiply() {
        // 256 -> 128, k4, "same", 4x4 -> 4x4 as a transposed convolution.
        let o = Conv2dOptions::default().padding(Padding::Same);
        let g = ConvGeom::conv_transpose2d(&[2, 256, 4, 4], &[256, 128, 4, 4], &o).unwrap();
        assert!((useful(&g) - 144.0 / 256.0).abs() < 1e-12, "{}", useful(&g));
        assert!(applies(&g));
        // A 3x3 "same" layer on 56x56 maps is almost all inside.
        let g = ConvGeom::conv2d(&[1, 64, 56, 56], &[64, 64, 3, 3], &o).unwrap();
        assert!(useful(&g) > 0.97 && !applies(&g));
    }
}
