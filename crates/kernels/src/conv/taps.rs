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

/// Where a tap's positions sit in a stack of position-major images ([images][plane][ch]):
/// position (i, j) of the rectangle is row `(row0 + i * step.0) * width + col0 + j * step.1`
/// of its image.
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
    /// Calls `f(matrix offset, image offset, length)` for runs of elements contiguous on both
    /// sides that cover the [images * rows * cols, ch] matrix of the window's rows, taken from
    /// `images` position-major images of `ch` channels. A run is a whole row of the window
    /// (`cols * ch` values) unless the columns are strided.
    fn runs(&self, ch: usize, images: usize, mut f: impl FnMut(usize, usize, usize)) {
        let count = self.rows * self.cols;
        for n in 0..images {
            let image = n * self.plane;
            for i in 0..self.rows {
                let at = (n * count + i * self.cols) * ch;
                let from = (image + (self.row0 + i * self.step.0) * self.width + self.col0) * ch;
                if self.step.1 == 1 {
                    f(at, from, self.cols * ch);
                } else {
                    for j in 0..self.cols {
                        f(at + j * ch, from + j * self.step.1 * ch, ch);
                    }
                }
            }
        }
    }
}

fn gather<T: Elem>(win: &Window, ch: usize, images: usize, src: &[T], dst: &mut [T]) {
    win.runs(ch, images, |d, s, len| dst[d..d + len].copy_from_slice(&src[s..s + len]));
}

fn scatter_add<T: Elem>(win: &Window, ch: usize, images: usize, src: &[T], dst: &mut [T]) {
    win.runs(ch, images, |s, d, len| dst[d..d + len].iter_mut().zip(&src[s..s + len]).for_each(|(o, &v)| *o += v));
}

/// `out` [images][plane][ch] from `x` [images][ch][plane]: the taps' gathers and scatters
/// then move whole rows of channels, where in NCHW they moved a few values per plane (the VAE
/// generator's 4x4 maps gave runs of 3 and 4, 12% of vae_train in the copies' calls).
pub(super) fn positions_major<T: Elem>(x: &[T], ch: usize, plane: usize, out: &mut [T]) {
    for (xi, oi) in x.chunks_exact(ch * plane).zip(out.chunks_exact_mut(ch * plane)) {
        for (p, row) in oi.chunks_exact_mut(ch).enumerate() {
            for (c, o) in row.iter_mut().enumerate() {
                *o = xi[c * plane + p];
            }
        }
    }
}

/// [`positions_major`] of a whole batch, a run of images per task.
fn all_positions_major<T: Elem>(x: &[T], ch: usize, plane: usize) -> Vec<T> {
    let image = (ch * plane).max(1);
    let per = x.len().div_ceil(image).div_ceil(rayon::current_num_threads().max(1)).max(1);
    crate::simd::par_filled(x.len(), per * image, |j, out| positions_major(&x[j * per * image..][..out.len()], ch, plane, out))
}

/// `out` [images][ch][plane] from `x` [images][plane][ch], the inverse of [`positions_major`].
fn channels_major<T: Elem>(x: &[T], ch: usize, plane: usize, out: &mut [T]) {
    for (xi, oi) in x.chunks_exact(ch * plane).zip(out.chunks_exact_mut(ch * plane)) {
        for (c, row) in oi.chunks_exact_mut(plane).enumerate() {
            for (p, o) in row.iter_mut().enumerate() {
                *o = xi[p * ch + c];
            }
        }
    }
}

/// The filters tap-major, [R*S][K][C]: each tap's [K, C] matrix contiguous, which the
/// products pack faster than the strided view into [K, C, R, S] (107 against 65 us for a tap
/// of the VAE generator's 256 x 128 x 4 x 4 layer). A task per thread takes a run of taps and
/// walks the filters in blocks of B, whose values it reads from B cache lines: a task per tap
/// reading the whole tensor at a stride of R*S values took 290 us a pass on that layer.
fn by_tap<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (rs, kc) = (g.r * g.s, g.k * g.c);
    let per = rs.div_ceil(rayon::current_num_threads().max(1)).max(1);
    const B: usize = 16;
    crate::simd::par_filled(w.len(), (per * kc).max(1), |j, out| {
        let (first, taps) = (j * per, out.len() / kc.max(1));
        // Blocks of B filters: B lines read, then B values written per tap.
        let whole = kc / B * B;
        for i in (0..whole).step_by(B) {
            let block = &w[i * rs..(i + B) * rs];
            for t in 0..taps {
                for (f, d) in out[t * kc + i..][..B].iter_mut().enumerate() {
                    *d = block[f * rs + first + t];
                }
            }
        }
        for i in whole..kc {
            for t in 0..taps {
                out[t * kc + i] = w[i * rs + first + t];
            }
        }
    })
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

/// One share's pass: its images position-major in `from` ([images][from_plane][from_ch]); for
/// each tap, the rows under the tap's `from` window gathered, multiplied by the tap's filter
/// matrix (`filter(t)`, [from_ch, to_ch]), and added into the rows of the `to` window of the
/// position-major result [images][to_plane][to_ch].
struct Pass<'a, T> {
    from: (&'a [T], usize),
    to: (&'a mut [T], usize),
    images: usize,
    threads: usize,
}

impl<T: Elem> Pass<'_, T> {
    fn run<'w>(self, taps: &[Tap], windows: impl Fn(&Tap) -> (Window, Window), filter: impl Fn(&Tap) -> MatRef<'w, T>)
    where
        T: 'w,
    {
        let ((from, from_ch), (to, to_ch), images) = (self.from, self.to, self.images);
        let (mut rows, mut prod) = (Vec::new(), Vec::new());
        for t in taps {
            let ld = images * t.positions();
            rows.resize(ld * from_ch, T::zero());
            prod.resize(ld * to_ch, T::zero());
            let (src, dst) = windows(t);
            gather(&src, from_ch, images, from, &mut rows);
            matmul(MatRef::rows(&rows, ld, from_ch), filter(t), &mut prod, to_ch, false, self.threads);
            scatter_add(&dst, to_ch, images, &prod, to);
        }
    }
}

/// y [N, K, P, Q] = conv(x, w) + bias.
pub(crate) fn forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    forward_by_tap(g, x, &by_tap(g, w), bias)
}

/// The filters as [`forward_by_tap`] reads them (a plan's, made once).
pub(crate) fn filters_by_tap<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    by_tap(g, w)
}

/// [`forward`] with the filters already tap-major ([`filters_by_tap`]).
pub(crate) fn forward_by_tap<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (chw, hw, pq) = (g.c * g.h * g.w, g.h * g.w, g.p * g.q);
    let taps = taps(g);
    let (per, threads) = shares(g.n);
    if threads > 1 && g.k >= 2 * FILTER_RUN {
        return forward_by_filters(g, x, w, bias, &taps, threads);
    }
    crate::simd::par_filled(g.n * g.k * pq, per * g.k * pq, |j, ys| {
        let images = ys.len() / (g.k * pq).max(1);
        let (mut xs, mut acc) = (vec![T::zero(); images * chw], vec![T::zero(); ys.len()]);
        positions_major(&x[j * per * chw..][..images * chw], g.c, hw, &mut xs);
        if let Some(b) = bias {
            acc.chunks_exact_mut(g.k).for_each(|row| row.copy_from_slice(b));
        }
        // Y_t [positions, K] += X_t [positions, C] W_t^T
        let pass = Pass { from: (&xs, g.c), to: (&mut acc, g.k), images, threads };
        pass.run(&taps, |t| (Window::input(g, t), Window::output(g, t)), |t| tap_filter(g, w, t).t());
        channels_major(&acc, g.k, pq, ys);
    })
}

/// Filters a thread takes at least in [`forward_by_filters`] (a whole number of sixteen-lane
/// dot-product blocks).
const FILTER_RUN: usize = 16;

/// [`forward_by_tap`] for fewer images than threads (one image): each thread takes a run of
/// the filters through every tap, so the filters (9.4 MB on ResNet-18's 512-channel layers,
/// read for four outputs a channel on a 2x2 map) stream through both cores in one pass
/// instead of a split product per tap.
fn forward_by_filters<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>, taps: &[Tap], threads: usize) -> Vec<T> {
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    let mut xs = vec![T::zero(); x.len()];
    positions_major(x, g.c, hw, &mut xs);
    let run = g.k.div_ceil(crate::tasks_for(threads)).next_multiple_of(FILTER_RUN).min(g.k);
    // Each run's outputs position-major, [images][positions][its filters].
    let parts: Vec<(usize, Vec<T>)> = (0..g.k)
        .into_par_iter()
        .step_by(run)
        .map(|k0| {
            let kc = run.min(g.k - k0);
            let mut acc = vec![T::zero(); g.n * pq * kc];
            if let Some(b) = bias {
                acc.chunks_exact_mut(kc).for_each(|row| row.copy_from_slice(&b[k0..k0 + kc]));
            }
            let pass = Pass { from: (&xs, g.c), to: (&mut acc, kc), images: g.n, threads: 1 };
            let filter = |t: &Tap| {
                let at = (t.r * g.s + t.s) * g.k * g.c + k0 * g.c;
                MatRef::rows(&w[at..at + kc * g.c], kc, g.c).t()
            };
            pass.run(taps, |t| (Window::input(g, t), Window::output(g, t)), filter);
            (k0, acc)
        })
        .collect();
    let mut y = vec![T::zero(); g.n * g.k * pq];
    for (k0, acc) in &parts {
        let kc = acc.len() / (g.n * pq).max(1);
        for (image, rows) in acc.chunks_exact((pq * kc).max(1)).enumerate() {
            channels_major(rows, kc, pq, &mut y[(image * g.k + k0) * pq..(image * g.k + k0 + kc) * pq]);
        }
    }
    y
}

/// dx [N, C, H, W] (overwritten) from dy and w.
pub(crate) fn backward_data_into<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T], dx: &mut [T]) {
    let (chw, hw, pq) = (g.c * g.h * g.w, g.h * g.w, g.p * g.q);
    let (taps, w) = (taps(g), by_tap(g, w));
    let (per, threads) = shares(g.n);
    dx.par_chunks_mut((per * chw).max(1)).enumerate().for_each(|(j, dxs)| {
        let images = dxs.len() / chw.max(1);
        let (mut dys, mut acc) = (vec![T::zero(); images * g.k * pq], vec![T::zero(); dxs.len()]);
        positions_major(&dy[j * per * g.k * pq..][..images * g.k * pq], g.k, pq, &mut dys);
        // dX_t [positions, C] += dY_t [positions, K] W_t
        let pass = Pass { from: (&dys, g.k), to: (&mut acc, g.c), images, threads };
        pass.run(&taps, |t| (Window::output(g, t), Window::input(g, t)), |t| tap_filter(g, &w, t));
        channels_major(&acc, g.c, hw, dxs);
    });
}

/// dw [K, C, R, S] from x and dy, summed over the batch (one partial sum per share, each
/// tap-major as [`by_tap`] lays out filters).
pub(crate) fn backward_filter<T: Elem>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
    let (hw, pq, rs, kc) = (g.h * g.w, g.p * g.q, g.r * g.s, g.k * g.c);
    let taps = taps(g);
    // Both operands position-major, then a task per tap over the whole batch: each tap's
    // [K, C] block is one product summing over every image's positions, so there are no
    // per-thread partial sums to zero and add up (two 2 MB buffers on the VAE generator).
    let (xs, dys) = rayon::join(|| all_positions_major(x, g.c, hw), || all_positions_major(dy, g.k, pq));
    let mut index = vec![None; rs];
    for t in &taps {
        index[t.r * g.s + t.s] = Some(t);
    }
    let tap_major = crate::simd::par_filled_init(
        kc * rs,
        kc.max(1),
        || (Vec::new(), Vec::new()),
        |(xt, dyt), tap, dw| {
            // A tap that never lands inside the image keeps its zeros.
            let Some(t) = index[tap] else { return };
            let ld = g.n * t.positions();
            xt.resize(ld * g.c, T::zero());
            dyt.resize(ld * g.k, T::zero());
            gather(&Window::input(g, t), g.c, g.n, &xs, xt);
            gather(&Window::output(g, t), g.k, g.n, &dys, dyt);
            // dw_t [K, C] = dy_t^T [K, ld] x x_t [ld, C]
            matmul(MatRef::rows(dyt, ld, g.k).t(), MatRef::rows(xt, ld, g.c), dw, g.c, false, 1);
        },
    );
    // Tap-major [R*S][K*C] into [K*C][R*S], a block of filters per task.
    super::transposed_sums(&tap_major, rs, kc)
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
