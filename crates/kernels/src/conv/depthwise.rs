//! Direct kernels for one input channel per group (depthwise convolution, and single-channel
//! inputs such as MNIST's first layer). Each output plane is a sum of R*S shifted, scaled
//! copies of one input plane: no lowering and no zeros multiplied.
//!
//! The input plane is first copied into a zero-bordered buffer, so the hot loops have no
//! bounds logic; outputs are then computed eight at a time with every tap accumulated in
//! registers (vectorised through `multiversion!`). The most common layers, 3x3 and 5x5 with
//! stride 1 in f32, go to the hand-tiled AVX2 kernels of `depthwise_avx2.rs` instead, and
//! depthwise layers of whole blocks of eight channels on other maps (small, strided) take
//! eight channels at a time ([`lanes_task`]). Planes of at most 64 values in and out (the last
//! stages of mobile networks) are each one small product instead ([`Small`]).

use std::borrow::Cow;

use rayon::prelude::*;
use stride_tensor::Elem;

use super::{depthwise_avx2 as avx2, depthwise_s2 as s2, ConvGeom};
use crate::simd::{as_f32, as_f32_mut};
use crate::{multiversion, simd};

/// `out = bias + correlate(src, taps)` by the AVX2 tiles when they apply (f32, a CPU with
/// AVX2 and FMA); false when the caller must use the portable kernel.
#[allow(clippy::too_many_arguments)]
fn correlate_tiles<T: Elem>(
    k: usize,
    rows: usize,
    cols: usize,
    src: &[T],
    width: usize,
    taps: &[T],
    bias: T,
    accumulate: bool,
    out: &mut [T],
) -> bool {
    let (Some(src), Some(taps), Some(out)) = (as_f32(src), as_f32(taps), as_f32_mut(out)) else { return false };
    avx2::correlate(k, rows, cols, src, width, taps, bias.to_f32().unwrap_or(0.0), accumulate, out).is_some()
}

/// Every output plane that reads the plane `x` (`taps` and `bias` for each, planes `ld`
/// apart in `out`) at stride 2 by the AVX-512 kernel of `depthwise_s2.rs` (`x` split into its
/// even and odd columns in `buf` once) when it applies ([`ConvGeom::fits_stride_2`], f32);
/// false when the caller must use another.
#[allow(clippy::ptr_arg)] // the scratch grows: a Vec, taken as Vec<f32> where T is f32
fn correlate_stride_2<T: Elem>(g: &ConvGeom, x: &[T], taps: &[T], bias: Option<&[T]>, buf: &mut Vec<T>, (out, ld): (&mut [T], usize)) -> bool {
    let (Some(x), Some(taps), Some(out)) = (as_f32(x), as_f32(taps), as_f32_mut(out)) else { return false };
    // `buf` holds f32 when `T` is f32; the kernel takes it as such.
    let Some(buf) = (buf as &mut dyn std::any::Any).downcast_mut::<Vec<f32>>() else { return false };
    s2::correlate(&s2::Plane::of(g), x, taps, bias.and_then(as_f32), buf, (out, ld)).is_some()
}

/// `dw += filter gradient` by the AVX2 tiles when they apply, as [`correlate_tiles`].
fn filter_grad_tiles<T: Elem>(k: usize, rows: usize, cols: usize, dy: &[T], src: &[T], width: usize, dw: &mut [T]) -> bool {
    let (Some(dy), Some(src), Some(dw)) = (as_f32(dy), as_f32(src), as_f32_mut(dw)) else { return false };
    avx2::filter_grad(k, rows, cols, dy, src, width, dw).is_some()
}

/// A plane copied into a zero buffer of `rows x cols` at offset (`top`, `left`). Only the
/// border is zeroed (the buffer is reused plane after plane), and rows are copied without a
/// call to `memcpy`, whose fixed cost dominated rows of a few dozen values.
/// Seven values of slack follow the plane, which the AVX2 tiles' last vector of a row may read.
fn bordered<T: Elem>(src: &[T], (h, w): (usize, usize), (top, left): (usize, usize), (rows, cols): (usize, usize), buf: &mut Vec<T>) {
    buf.resize(rows * cols + SLACK, T::zero());
    let (left, n) = (left.min(cols), w.min(cols.saturating_sub(left)));
    for (i, row) in buf.chunks_exact_mut(cols.max(1)).enumerate() {
        match i.checked_sub(top).filter(|&i| i < h) {
            Some(i) => {
                let (pad, rest) = row.split_at_mut(left);
                pad.fill(T::zero());
                simd::copy_short(&mut rest[..n], &src[i * w..i * w + n]);
                rest[n..].fill(T::zero());
            }
            None => row.fill(T::zero()),
        }
    }
}

/// Values after a bordered plane (see [`bordered`]).
const SLACK: usize = 7;

/// The strides, dilations and output size of one correlation pass over a bordered plane.
#[derive(Clone, Copy)]
struct Pass {
    rows: usize,
    cols: usize,
    stride: (usize, usize),
    dil: (usize, usize),
    r: usize,
    s: usize,
}

/// Accumulates `B` consecutive outputs of row `i` starting at column `j`, every tap in
/// registers (B/8 independent vector accumulators hide the add latency).
#[inline(always)]
fn block<T: Elem, const B: usize>(p: &Pass, src: &[T], width: usize, taps: &[T], i: usize, j: usize, orow: &mut [T]) {
    let (sh, sw) = p.stride;
    let (dh, dw) = p.dil;
    let mut acc = [T::zero(); B];
    acc.copy_from_slice(&orow[j..j + B]);
    for r in 0..p.r {
        let row = &src[(i * sh + r * dh) * width..];
        for s in 0..p.s {
            let wv = taps[r * p.s + s];
            let base = j * sw + s * dw;
            if sw == 1 {
                let x: &[T; B] = row[base..base + B].try_into().expect("B elements");
                for l in 0..B {
                    acc[l] += wv * x[l];
                }
            } else {
                for (l, a) in acc.iter_mut().enumerate() {
                    *a += wv * row[base + l * sw];
                }
            }
        }
    }
    orow[j..j + B].copy_from_slice(&acc);
}

multiversion! {
    /// out[i, j] += sum_{r,s} taps[r, s] * src[(i*sh + r*dh) * width + j*sw + s*dw]
    fn correlate<T: Elem>(p: Pass, src: &[T], width: usize, taps: &[T], out: &mut [T]) {
        for i in 0..p.rows {
            let orow = &mut out[i * p.cols..(i + 1) * p.cols];
            let mut j = 0;
            while j + 32 <= p.cols {
                block::<T, 32>(&p, src, width, taps, i, j, orow);
                j += 32;
            }
            if j + 16 <= p.cols {
                block::<T, 16>(&p, src, width, taps, i, j, orow);
                j += 16;
            }
            while j + 8 <= p.cols {
                block::<T, 8>(&p, src, width, taps, i, j, orow);
                j += 8;
            }
            while j < p.cols {
                block::<T, 1>(&p, src, width, taps, i, j, orow);
                j += 1;
            }
        }
    }
}

multiversion! {
    /// dst[(i*sh + r*dh) * width + j*sw + s*dw] += taps[r, s] * dy[i, j]: the scatter form of
    /// the input gradient, for strides above one.
    fn scatter<T: Elem>(p: Pass, dy: &[T], taps: &[T], width: usize, dst: &mut [T]) {
        let (sh, sw) = p.stride;
        let (dh, dw) = p.dil;
        for i in 0..p.rows {
            let drow = &dy[i * p.cols..(i + 1) * p.cols];
            for r in 0..p.r {
                for s in 0..p.s {
                    let start = (i * sh + r * dh) * width + s * dw;
                    simd::scatter_axpy(taps[r * p.s + s], drow, sw, &mut dst[start..]);
                }
            }
        }
    }
}

multiversion! {
    /// dw[r, s] += sum_{i,j} dy[i, j] * src[(i*sh + r*dh) * width + j*sw + s*dw]
    fn filter_grad<T: Elem>(p: Pass, dy: &[T], src: &[T], width: usize, dw_out: &mut [T]) {
        let (sh, sw) = p.stride;
        let (dh, dwl) = p.dil;
        for r in 0..p.r {
            for s in 0..p.s {
                let mut acc = T::zero();
                for i in 0..p.rows {
                    let row = &src[(i * sh + r * dh) * width + s * dwl..];
                    acc += simd::dot_strided(&dy[i * p.cols..(i + 1) * p.cols], row, sw);
                }
                dw_out[r * p.s + s] += acc;
            }
        }
    }
}

impl ConvGeom {
    /// The bordered input plane's size: the padded image, grown if needed to cover every
    /// window (transposed geometry can ask for rows past the bottom padding).
    pub(crate) fn bordered_size(&self) -> (usize, usize) {
        let need_h = (self.p - 1) * self.stride.0 + (self.r - 1) * self.dilation.0 + 1;
        let need_w = (self.q - 1) * self.stride.1 + (self.s - 1) * self.dilation.1 + 1;
        ((self.h + self.pad.0 + self.pad.1).max(need_h), (self.w + self.pad.2 + self.pad.3).max(need_w))
    }
    /// A square window that the AVX2 tiles handle, stride and dilation 1, maps at least 8
    /// wide.
    pub(crate) fn fits_tiles(&self) -> bool {
        self.r == self.s && avx2::handles(self.r) && (self.stride, self.dilation) == ((1, 1), (1, 1)) && self.q >= 8 && self.w >= 8
    }
    /// Whether the forward pass goes eight channels at a time ([`lanes_task`]): one output
    /// channel per input channel, whole blocks of eight, and planes the per-plane AVX2 tiles
    /// do not take (narrower than 8 outputs, strided, dilated, other windows).
    pub(crate) fn takes_lanes(&self) -> bool {
        self.kg() == 1 && self.c.is_multiple_of(LANES) && self.c > 0 && (self.stride.1 > 1 || !self.fits_tiles()) && !self.fits_stride_2()
    }
    /// A square window of stride 2 (dilation 1) that the AVX-512 kernel of `depthwise_s2.rs`
    /// takes plane by plane (in f32; other types run such planes through the portable kernel).
    pub(crate) fn fits_stride_2(&self) -> bool {
        self.r == self.s && self.stride == (2, 2) && self.dilation == (1, 1) && s2::handles(self.r, self.q, self.pad.2)
    }
    /// Whether the forward pass takes each plane as one small product ([`Small`]): one output
    /// channel per input channel, at most 64 outputs and 64 inputs a plane, and the product at
    /// most three times the multiply-adds of the taps (the last stages of mobile networks: 2x2
    /// and 4x4 maps, 8x8 ones under 5x5 windows).
    pub(crate) fn takes_small(&self) -> bool {
        let (pq, hw) = (self.p * self.q, self.h * self.w);
        self.kg() == 1
            && pq > 0
            && pq <= SMALL
            && hw <= SMALL
            && hw * small_width(pq) <= 3 * pq * self.r * self.s
            && self.k * hw * small_width(pq) <= SMALL_VALUES
    }
    fn pass(&self) -> Pass {
        Pass { rows: self.p, cols: self.q, stride: self.stride, dil: self.dilation, r: self.r, s: self.s }
    }
}

/// Channels a lane pass takes at once (eight f32 values: one AVX2 register).
const LANES: usize = 8;

/// The largest planes [`Small`] takes: outputs and inputs.
const SMALL: usize = 64;

/// The most values a layer's [`Small`] matrices may hold together (1 MiB of f32, a core's
/// second-level cache here): every image reads all of them.
const SMALL_VALUES: usize = 1 << 18;

/// The outputs a row of [`Small`]'s matrix holds: `pq` rounded up to 4, 8, 16, 32 or 64.
fn small_width(pq: usize) -> usize {
    pq.next_power_of_two().max(4)
}

/// Each task's scratch: the bordered plane(s), and for lanes the sums.
type Bufs<T> = (Vec<T>, Vec<T>);

/// A depthwise layer's filters as a forward pass takes them: as given ([K, 1, R, S]), or, for a
/// layer of small planes, the matrices of its products made beforehand by [`small_matrices`]
/// (a plan makes them once: at batch 1 making them was most of such a layer's time).
#[derive(Clone, Copy)]
pub(crate) enum Filters<'a, T> {
    Given(&'a [T]),
    Small(&'a [T]),
    /// A lanes layer's taps interleaved by [`lanes_taps`].
    Lanes(&'a [T]),
}

impl<'a, T> Filters<'a, T> {
    /// The filters as given, for the per-plane kernels (empty when prepared for another).
    fn given(self) -> &'a [T] {
        match self {
            Filters::Given(w) => w,
            Filters::Small(_) | Filters::Lanes(_) => &[],
        }
    }
}

/// y[n, k] = bias[k] + sum_{r,s} w[k, 0, r, s] * shifted x[n, k / (K/groups)].
pub(crate) fn forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (chunk, task) = forward_tasks(g, x, Filters::Given(w), bias);
    crate::simd::par_filled_init(g.n * g.k * g.p * g.q, chunk, Bufs::default, task)
}

/// [`forward`] into `y` (overwritten), calling `finish(offset, piece)` on each task's piece of
/// output (whole planes, starting at `offset` in `y`) while it is still in cache: a plan's
/// residual and activation.
pub(crate) fn forward_into<T: Elem>(g: &ConvGeom, x: &[T], w: Filters<T>, bias: Option<&[T]>, y: &mut [T], finish: impl Fn(usize, &mut [T]) + Sync) {
    assert_eq!(y.len(), g.n * g.k * g.p * g.q, "depthwise forward_into: output length");
    let (chunk, task) = forward_tasks(g, x, w, bias);
    y.par_chunks_mut(chunk).enumerate().for_each_init(Bufs::default, |bufs, (i, piece)| {
        task(bufs, i, piece);
        finish(i * chunk, piece);
    });
}

/// How the forward pass is cut up: the output's chunk length, and task `i`'s work into its
/// chunk (every value written). Eight channels at a time where [`ConvGeom::takes_lanes`]
/// ([`lanes_task`]), else input planes (each for all the output channels that read it, so
/// that its bordered copy is made once), several a task where they are small (about 8K
/// outputs a task, as lanes and small planes take).
#[allow(clippy::type_complexity)]
fn forward_tasks<'a, T: Elem>(
    g: &'a ConvGeom,
    x: &'a [T],
    w: Filters<'a, T>,
    bias: Option<&'a [T]>,
) -> (usize, impl Fn(&mut Bufs<T>, usize, &mut [T]) + Sync + 'a) {
    let (pq, hw, rs, kg) = (g.p * g.q, g.h * g.w, g.r * g.s, g.kg());
    let small = g.takes_small();
    let lanes = !small && g.takes_lanes();
    // Lanes and small planes: several per task (about 8K outputs), so the pool's cost per task
    // does not outweigh the work; they run on across images (K is a multiple of eight).
    let per_task = if small {
        (8192 / pq).clamp(1, g.c * g.n)
    } else if lanes {
        (8192 / (LANES * pq).max(1)).clamp(1, (g.c / LANES * g.n).max(1))
    } else {
        (8192 / (kg * pq).max(1)).clamp(1, (g.c * g.n).max(1))
    };
    let chunk = if small {
        per_task * pq
    } else if lanes {
        per_task * LANES * pq
    } else {
        per_task * kg * pq
    };
    let lanes_plan = if lanes { Lanes::new(g, w) } else { Lanes::default() };
    let small_plan = if small { Small::new(g, w, bias) } else { Small::default() };
    let w = if small { &[][..] } else { w.given() };
    let task = move |(buf, acc): &mut Bufs<T>, i: usize, out: &mut [T]| {
        if small {
            // Planes i * per_task.. in NCHW order: runs of consecutive channels of one image.
            let mut plane = i * per_task;
            let mut out = out;
            while !out.is_empty() {
                let c = plane % g.c;
                let run = (g.c - c).min(out.len() / pq);
                let (head, rest) = out.split_at_mut(run * pq);
                small_plan.run(c, 1, &x[plane * hw..(plane + run) * hw], head);
                (plane, out) = (plane + run, rest);
            }
        } else if lanes {
            let blocks = g.c / LANES;
            for (k, out) in out.chunks_exact_mut(LANES * pq).enumerate() {
                let block = i * per_task + k;
                let (n, c0) = (block / blocks, (block % blocks) * LANES);
                lanes_task(g, (x, (n * g.c + c0) * hw, hw), c0, &lanes_plan, bias, (buf, acc), (out, pq));
            }
        } else {
            // Input planes i * per_task.. (NCHW order), each with its kg output planes.
            for (k, out) in out.chunks_mut(kg * pq).enumerate() {
                let plane = i * per_task + k;
                let c = plane % g.c;
                let (ks, taps) = (c * kg..(c + 1) * kg, &w[c * kg * rs..(c + 1) * kg * rs]);
                plane_outputs(g, &x[plane * hw..(plane + 1) * hw], taps, bias.map(|b| &b[ks]), buf, out, pq);
            }
        }
    };
    (chunk.max(1), task)
}

/// Depthwise layers on small planes as products: output plane = M x + bias, with M [P·Q, H·W]
/// each channel's taps placed where they land (zero where a tap reads border), built once per
/// call. A plane is then H·W broadcast multiply-adds into a few vectors of outputs, where
/// the lanes kernel ([`lanes_task`]) spent most of its time interleaving eight planes of four
/// values and skipping border taps (EfficientNet-B0's 2x2 maps under 5x5 windows).
#[derive(Default)]
struct Small<'a, T: Clone> {
    /// `[channel][input][width]`: row `q` of channel `c` holds the weight of input `q` in each
    /// output (zero past P·Q).
    m: Cow<'a, [T]>,
    bias: Vec<T>,
    /// Outputs a row of `m` holds ([`small_width`]).
    width: usize,
    hw: usize,
    pq: usize,
}

/// Small planes' product matrices ([`Small`]) from a layer's filters, for [`Filters::Small`].
pub(crate) fn small_matrices<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (hw, rs, width) = (g.h * g.w, g.r * g.s, small_width(g.p * g.q));
    // Where each tap lands, worked out once for every channel: (input, output, tap).
    let mut lands = Vec::new();
    for (i, j) in (0..g.p).flat_map(|i| (0..g.q).map(move |j| (i, j))) {
        for (r, s) in (0..g.r).flat_map(|r| (0..g.s).map(move |s| (r, s))) {
            let row = (i * g.stride.0 + r * g.dilation.0).checked_sub(g.pad.0).filter(|&v| v < g.h);
            let col = (j * g.stride.1 + s * g.dilation.1).checked_sub(g.pad.2).filter(|&v| v < g.w);
            if let (Some(row), Some(col)) = (row, col) {
                lands.push(((row * g.w + col) * width + i * g.q + j, r * g.s + s));
            }
        }
    }
    let mut m = vec![T::zero(); g.c * hw * width];
    for (c, mc) in m.chunks_exact_mut(hw * width).enumerate() {
        for &(at, tap) in &lands {
            mc[at] += w[c * rs + tap];
        }
    }
    m
}

impl<'a, T: Elem> Small<'a, T> {
    fn new(g: &ConvGeom, w: Filters<'a, T>, bias: Option<&[T]>) -> Self {
        let m = match w {
            Filters::Small(m) => Cow::Borrowed(m),
            Filters::Given(w) => Cow::Owned(small_matrices(g, w)),
            Filters::Lanes(_) => unreachable!("depthwise: a lanes layer is not run as small planes"),
        };
        assert_eq!(m.len(), g.c * g.h * g.w * small_width(g.p * g.q), "depthwise: small planes' matrices");
        let bias = bias.map_or_else(|| vec![T::zero(); g.c], <[T]>::to_vec);
        Small { m, bias, width: small_width(g.p * g.q), hw: g.h * g.w, pq: g.p * g.q }
    }
    /// Planes `x` (H·W each) into `out` (P·Q each): plane k of channel `c + k * step`.
    fn run(&self, c: usize, step: usize, x: &[T], out: &mut [T]) {
        let sizes = SmallSizes { hw: self.hw, pq: self.pq, width: self.width, step };
        small_planes(sizes, &self.m[c * self.hw * self.width..], &self.bias[c..], x, out);
    }
}

/// The sizes of a [`Small`] call, and how many channels apart its planes are (0: one channel).
#[derive(Clone, Copy)]
struct SmallSizes {
    hw: usize,
    pq: usize,
    width: usize,
    step: usize,
}

crate::multiversion_wide! {
    /// out plane k = m_k x_k + bias_k for each plane of `out`, `m_k` and `bias_k` those of the
    /// k·step-th channel from the first.
    fn small_planes<T: Elem>(z: SmallSizes, m: &[T], bias: &[T], x: &[T], out: &mut [T]) {
        match z.width {
            4 => small_body::<T, 4>(z, m, bias, x, out),
            8 => small_body::<T, 8>(z, m, bias, x, out),
            16 => small_body::<T, 16>(z, m, bias, x, out),
            32 => small_body::<T, 32>(z, m, bias, x, out),
            _ => small_body::<T, 64>(z, m, bias, x, out),
        }
    }
}

/// [`small_planes`] with `P` outputs in registers.
#[inline(always)]
fn small_body<T: Elem, const P: usize>(z: SmallSizes, m: &[T], bias: &[T], x: &[T], out: &mut [T]) {
    for (k, (o, xk)) in out.chunks_exact_mut(z.pq).zip(x.chunks_exact(z.hw)).enumerate() {
        let mk = &m[k * z.step * z.hw * P..][..z.hw * P];
        let mut acc = [bias[k * z.step]; P];
        for (row, &v) in mk.chunks_exact(P).zip(xk) {
            for p in 0..P {
                acc[p] += row[p] * v;
            }
        }
        o.copy_from_slice(&acc[..z.pq]);
    }
}

/// What every lane task of a layer shares: each block of eight channels' taps interleaved
/// (`[block][tap][lane]`, by a plan once: [`Filters::Lanes`]), and the taps that land inside
/// the image for each output row and each run of output columns ([`taps_inside`]; on small
/// maps most of a window reads border).
#[derive(Default)]
struct Lanes<'a, T: Clone> {
    taps: Cow<'a, [T]>,
    rows: Vec<std::ops::Range<usize>>,
    /// Runs of four output columns, then single columns: (first column, columns, taps).
    cols: Vec<(usize, usize, std::ops::Range<usize>)>,
}

/// A lanes layer's taps ([K, 1, R, S]) interleaved `[block of eight][tap][lane]`, for
/// [`Filters::Lanes`]: EfficientNet-B0's interleaving took 2% of its pass at one image, made
/// anew by every call.
pub(crate) fn lanes_taps<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let rs = g.r * g.s;
    (0..g.c * rs).map(|t| w[(t / (rs * LANES) * LANES + t % LANES) * rs + t / LANES % rs]).collect()
}

impl<'a, T: Elem> Lanes<'a, T> {
    fn new(g: &ConvGeom, w: Filters<'a, T>) -> Self {
        let taps = match w {
            Filters::Lanes(t) => Cow::Borrowed(t),
            Filters::Given(w) => Cow::Owned(lanes_taps(g, w)),
            Filters::Small(_) => unreachable!("depthwise: a layer of small planes is not run in lanes"),
        };
        assert_eq!(taps.len(), g.c * g.r * g.s, "depthwise: a lanes layer's taps");
        let ((sh, sw), (dh, dw)) = (g.stride, g.dilation);
        let rows = (0..g.p).map(|i| taps_inside(i * sh, g.pad.0, g.h, dh, g.r)).collect();
        // The taps of outputs j..j + n: those inside for any of them (a tap inside for one and
        // not another reads zeros for the other).
        let run = |j: usize, n: usize| {
            let (first, last) = (taps_inside(j * sw, g.pad.2, g.w, dw, g.s), taps_inside((j + n - 1) * sw, g.pad.2, g.w, dw, g.s));
            (j, n, last.start..first.end.max(last.start))
        };
        let fours = g.q / 4 * 4;
        let cols = (0..fours).step_by(4).map(|j| run(j, 4)).chain((fours..g.q).map(|j| run(j, 1))).collect();
        Lanes { taps, rows, cols }
    }
}

/// [`forward_into`] in a plan's batch-blocked layout (`[N/b][C][b][H][W]`, `x` and `y`), so
/// that a mobile network's depthwise layers need no relayout between the 1x1 products around
/// them. A task is one input channel (or a block of eight, [`lanes_task`]) for every image of
/// a block: its outputs are one run of memory, handed to `finish(offset, piece)`.
pub(crate) fn forward_blocked_into<T: Elem>(
    g: &ConvGeom,
    b: usize,
    x: &[T],
    w: Filters<T>,
    bias: Option<&[T]>,
    y: &mut [T],
    finish: impl Fn(usize, &mut [T]) + Sync,
) {
    let (pq, hw, rs, kg) = (g.p * g.q, g.h * g.w, g.r * g.s, g.kg());
    assert!(x.len() == g.n * g.c * hw && y.len() == g.n * g.k * pq, "depthwise forward_blocked_into: lengths");
    if y.is_empty() || hw == 0 {
        return;
    }
    let small = g.takes_small();
    let lanes = !small && g.takes_lanes();
    let lanes_plan = if lanes { Lanes::new(g, w) } else { Lanes::default() };
    let small_plan = if small { Small::new(g, w, bias) } else { Small::default() };
    let w = if small { &[][..] } else { w.given() };
    let group = if lanes { LANES } else { 1 };
    let (x_block, y_block) = (b * g.c * hw, b * g.k * pq);
    y.par_chunks_mut(y_block).zip(x.par_chunks(x_block)).enumerate().for_each(|(j, (yb, xb))| {
        let bj = yb.len() / (g.k * pq);
        let chunk = group * kg * bj * pq;
        yb.par_chunks_mut(chunk).enumerate().for_each_init(Bufs::default, |(buf, acc), (t, out)| {
            let c0 = t * group;
            if small {
                // The channel's planes of every image of the block, one after another.
                small_plan.run(c0, 0, &xb[c0 * bj * hw..(c0 + 1) * bj * hw], out);
                finish(j * y_block + t * chunk, out);
                return;
            }
            for r in 0..bj {
                if lanes {
                    lanes_task(g, (xb, (c0 * bj + r) * hw, bj * hw), c0, &lanes_plan, bias, (buf, acc), (&mut out[r * pq..], bj * pq));
                } else {
                    let plane = &xb[(c0 * bj + r) * hw..][..hw];
                    let ks = c0 * kg..(c0 + 1) * kg;
                    plane_outputs(g, plane, &w[ks.start * rs..ks.end * rs], bias.map(|b| &b[ks]), buf, &mut out[r * pq..], bj * pq);
                }
            }
            finish(j * y_block + t * chunk, out);
        });
    });
}

/// Depthwise forward of one block of eight channels of one image, into `out` (its eight
/// planes): the eight planes interleaved into one bordered buffer (`[row][column][channel]`),
/// so every tap is one vector multiply-add for eight outputs whatever the plane's width or
/// stride. The per-plane kernels run rows of a few values on the small maps of mobile
/// networks (4x4 and 2x2 under 5x5 windows), and gather across strided columns: there they
/// did 2-5 multiply-adds per nanosecond.
///
/// The eight input planes are `x[first + l * step..]` and the eight output planes
/// `out[l * ld..]` (NCHW: `step` one plane, `ld` one output plane; blocked, a block's images
/// apart), channels `c0..c0 + 8`.
fn lanes_task<T: Elem>(
    g: &ConvGeom,
    (x, first, step): (&[T], usize, usize),
    c0: usize,
    lanes: &Lanes<'_, T>,
    bias: Option<&[T]>,
    (buf, acc): (&mut Vec<T>, &mut Vec<T>),
    (out, ld): (&mut [T], usize),
) {
    let (pq, rs) = (g.p * g.q, g.r * g.s);
    let (bh, bw) = g.bordered_size();
    // The bordered, interleaved planes: border zero, inside the eight planes' values. Every
    // block writes the same inside, so the border stays zero from block to block.
    if buf.len() != bh * bw * LANES {
        buf.clear();
        buf.resize(bh * bw * LANES, T::zero());
    }
    interleave(x, first, step, (g.h, g.w), &mut buf[(g.pad.0 * bw + g.pad.2) * LANES..], bw * LANES);
    let taps = &lanes.taps[c0 * rs..(c0 + LANES) * rs];
    // Every sum is written (each output of each row once).
    acc.resize(pq * LANES, T::zero());
    let b: [T; LANES] = std::array::from_fn(|l| bias.map_or(T::zero(), |b| b[c0 + l]));
    correlate_lanes(g.pass(), lanes, buf, bw, taps, b, acc);
    for (o, v) in acc.chunks_exact(LANES).enumerate() {
        for (l, v) in v.iter().enumerate() {
            out[l * ld + o] = *v;
        }
    }
}

/// The taps `t` of `0..k` whose source `pos + t * dil` lies in `lo..lo + len`: the others read
/// the zero border.
fn taps_inside(pos: usize, lo: usize, len: usize, dil: usize, k: usize) -> std::ops::Range<usize> {
    if len == 0 {
        return 0..0;
    }
    let dil = dil.max(1);
    let first = lo.saturating_sub(pos).div_ceil(dil);
    let last = lo + len - 1;
    let end = if pos > last { 0 } else { ((last - pos) / dil + 1).min(k) };
    first.min(end)..end
}

multiversion! {
    /// The eight planes `x[first + l * step..]` (h x w) into `dst` interleaved, `dst[i * ld +
    /// j * 8 + l]`: eight values of one position gathered and stored together, a row of each
    /// plane at a time (plane by plane, the stores eight apart ran at one value a cycle).
    fn interleave<T: Elem>(x: &[T], first: usize, step: usize, hw: (usize, usize), dst: &mut [T], ld: usize) {
        let (h, w) = hw;
        for i in 0..h {
            let rows: [&[T]; LANES] = std::array::from_fn(|l| &x[first + l * step + i * w..][..w]);
            let out = &mut dst[i * ld..][..w * LANES];
            for (j, o) in out.chunks_exact_mut(LANES).enumerate() {
                for l in 0..LANES {
                    o[l] = rows[l][j];
                }
            }
        }
    }
}

multiversion! {
    /// acc[(i, j)][l] = b[l] + sum_{r,s} taps[(r, s)][l] * src[(i*sh + r*dh, j*sw + s*dw)][l]
    /// over interleaved lanes of eight channels, skipping the taps that read only border
    /// (most of them on small maps: a 2x2 map under a 5x5 window has 9 of 25 inside), as
    /// `lanes` lists them for each output row and run of columns.
    fn correlate_lanes<T: Elem>(
        p: Pass,
        lanes: &Lanes<T>,
        src: &[T],
        width: usize,
        taps: &[T],
        b: [T; LANES],
        acc: &mut [T],
    ) {
        for (i, rows) in lanes.rows.iter().enumerate() {
            for (j, n, cols) in &lanes.cols {
                if *n == 4 {
                    lanes_block::<T, 4>(&p, src, width, taps, b, (i, *j), (rows.clone(), cols.clone()), acc);
                } else {
                    lanes_block::<T, 1>(&p, src, width, taps, b, (i, *j), (rows.clone(), cols.clone()), acc);
                }
            }
        }
    }
}

/// `B` consecutive outputs of row `i` from column `j` for [`correlate_lanes`], over the taps
/// `rows` x `cols`: B independent accumulators, so the multiply-adds of one output do not
/// wait on each other's results.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lanes_block<T: Elem, const B: usize>(
    p: &Pass,
    src: &[T],
    width: usize,
    taps: &[T],
    b: [T; LANES],
    (i, j): (usize, usize),
    (rows, cols): (std::ops::Range<usize>, std::ops::Range<usize>),
    acc: &mut [T],
) {
    let (sh, sw) = p.stride;
    let (dh, dw) = p.dil;
    let mut a = [b; B];
    for r in rows {
        let row = (i * sh + r * dh) * width + j * sw;
        for s in cols.clone() {
            let t: &[T; LANES] = taps[(r * p.s + s) * LANES..][..LANES].try_into().expect("eight lanes");
            for (u, a) in a.iter_mut().enumerate() {
                let x: &[T; LANES] = src[(row + u * sw + s * dw) * LANES..][..LANES].try_into().expect("eight lanes");
                for l in 0..LANES {
                    a[l] += t[l] * x[l];
                }
            }
        }
    }
    for (u, a) in a.iter().enumerate() {
        acc[(i * p.cols + j + u) * LANES..][..LANES].copy_from_slice(a);
    }
}

/// The output planes that read one input plane `x`: plane j (taps `w[j * R*S..]`, plus
/// `bias[j]`) into `out[j * ld..][..P*Q]`, for every j of `w`. `buf` holds the bordered plane.
pub(crate) fn plane_outputs<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>, buf: &mut Vec<T>, out: &mut [T], ld: usize) {
    let (pq, rs) = (g.p * g.q, g.r * g.s);
    let (bh, bw) = g.bordered_size();
    // Stride 2 in f32 splits the plane's columns by phase instead, for every output plane.
    if g.fits_stride_2() && correlate_stride_2(g, x, w, bias, buf, (out, ld)) {
        return;
    }
    bordered(x, (g.h, g.w), (g.pad.0, g.pad.2), (bh, bw), buf);
    for (j, taps) in w.chunks_exact(rs.max(1)).enumerate() {
        let (b, o) = (bias.map_or(T::zero(), |b| b[j]), &mut out[j * ld..j * ld + pq]);
        if !(g.fits_tiles() && correlate_tiles(g.r, g.p, g.q, buf, bw, taps, b, false, o)) {
            o.fill(b);
            correlate(g.pass(), buf, bw, taps, o);
        }
    }
}

/// dx[n, c] = sum over the K/groups output channels of group c of the taps scattered back.
pub(crate) fn backward_data<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T]) -> Vec<T> {
    let (pq, hw, rs, kg) = (g.p * g.q, g.h * g.w, g.r * g.s, g.kg());
    let (a, b) = ((g.r - 1) * g.dilation.0, (g.s - 1) * g.dilation.1);
    // Stride 1 with padding inside the kernel's reach: a correlation of the bordered dy with
    // the flipped kernel (gathers, registers). Otherwise: scatter into a bordered dx and crop.
    let gather = g.stride == (1, 1) && g.pad.0 <= a && g.pad.2 <= b;
    crate::simd::par_filled_init(
        g.n * g.c * hw,
        hw.max(1),
        || (Vec::new(), Vec::new()),
        |(buf, flipped), plane, out| {
            let (n, c) = (plane / g.c, plane % g.c);
            for k in c * kg..(c + 1) * kg {
                let dyk = &dy[(n * g.k + k) * pq..(n * g.k + k + 1) * pq];
                let wk = &w[k * rs..(k + 1) * rs];
                if gather {
                    // dx[i, j] = sum_{r',s'} wflip[r', s'] * dyb[i + pt + r'*dh, j + pl + s'*dw],
                    // with dy placed at (a, b) in the bordered buffer dyb.
                    let (rows, cols) = ((g.h + g.pad.0 + a).max(a + g.p), (g.w + g.pad.2 + b).max(b + g.q));
                    bordered(dyk, (g.p, g.q), (a, b), (rows, cols), buf);
                    flipped.clear();
                    flipped.extend(wk.iter().rev().copied());
                    let p = Pass { rows: g.h, cols: g.w, stride: (1, 1), dil: g.dilation, r: g.r, s: g.s };
                    let off = g.pad.0 * cols + g.pad.2;
                    let fast = g.fits_tiles() && correlate_tiles(g.r, g.h, g.w, &buf[off..], cols, flipped, T::zero(), true, out);
                    if !fast {
                        correlate(p, &buf[off..], cols, flipped, out);
                    }
                } else {
                    let (bh, bw) = g.bordered_size();
                    buf.clear();
                    buf.resize(bh * bw, T::zero());
                    scatter(g.pass(), dyk, wk, bw, buf);
                    for i in 0..g.h {
                        let src = &buf[(i + g.pad.0) * bw + g.pad.2..(i + g.pad.0) * bw + g.pad.2 + g.w];
                        for (o, &v) in out[i * g.w..(i + 1) * g.w].iter_mut().zip(src) {
                            *o += v;
                        }
                    }
                }
            }
        },
    )
}

/// dw[k, 0, r, s] = sum_n sum_{p,q} dy[n, k, p, q] * x[n, c(k), p*sh + r*dh - pt, q*sw + s*dw - pl].
pub(crate) fn backward_filter<T: Elem>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
    let (pq, hw, rs, kg) = (g.p * g.q, g.h * g.w, g.r * g.s, g.kg());
    let (bh, bw) = g.bordered_size();
    // One task per input channel and range of images: each bordered plane serves all K/groups
    // filters that read it. With fewer channels than threads (a single-channel input) the
    // images are split too, into partial sums added at the end in a fixed order.
    let threads = rayon::current_num_threads();
    let splits = if g.c >= threads { 1 } else { threads.div_ceil(g.c.max(1)).min(g.n).max(1) };
    let parts: Vec<Vec<T>> = (0..g.c * splits)
        .into_par_iter()
        .map_init(Vec::new, |buf, task| {
            let (c, part) = (task / splits, task % splits);
            let mut out = vec![T::zero(); kg * rs];
            for n in part * g.n / splits..(part + 1) * g.n / splits {
                bordered(&x[(n * g.c + c) * hw..(n * g.c + c + 1) * hw], (g.h, g.w), (g.pad.0, g.pad.2), (bh, bw), buf);
                for j in 0..kg {
                    let k = c * kg + j;
                    let (dyk, dwk) = (&dy[(n * g.k + k) * pq..(n * g.k + k + 1) * pq], &mut out[j * rs..(j + 1) * rs]);
                    if !(g.fits_tiles() && filter_grad_tiles(g.r, g.p, g.q, dyk, buf, bw, dwk)) {
                        filter_grad(g.pass(), dyk, buf, bw, dwk);
                    }
                }
            }
            out
        })
        .collect();
    let mut dw = vec![T::zero(); g.k * rs];
    for (task, part) in parts.iter().enumerate() {
        let c = task / splits;
        for (d, &v) in dw[c * kg * rs..(c + 1) * kg * rs].iter_mut().zip(part) {
            *d += v;
        }
    }
    dw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{Conv2dOptions, Padding};

    /// Which kernel each of `tests/planned_conv.rs`'s depthwise cases runs, so that those cases
    /// cover the small products, the lanes and the per-plane kernels.
    #[test]
    fn small_maps_take_products_and_larger_ones_lanes() {
        let d = Conv2dOptions::default();
        let geom = |x: [usize; 4], w: [usize; 4], o: Conv2dOptions| ConvGeom::conv2d(&x, &w, &o).unwrap();
        // EfficientNet's last stage (2x2 under 5x5), a strided 7x7 -> 4x4, 8x8 under 5x5.
        for g in [
            geom([3, 16, 2, 2], [16, 1, 5, 5], d.groups(16).padding(Padding::Same)),
            geom([3, 24, 7, 7], [24, 1, 5, 5], d.groups(24).padding(Padding::uniform(2)).stride(2)),
            geom([2, 8, 8, 8], [8, 1, 5, 5], d.groups(8).padding(Padding::Same)),
        ] {
            assert!(g.takes_small(), "{g:?}");
        }
        // 9x9 strided to 5x5 (81 inputs), and 8x8 under 3x3 strided to 4x4 (the product would
        // multiply seven times the taps' values): eight channels at a time.
        for g in [
            geom([3, 16, 9, 9], [16, 1, 3, 3], d.groups(16).padding(Padding::uniform(1)).stride(2)),
            geom([2, 8, 8, 8], [8, 1, 3, 3], d.groups(8).padding(Padding::uniform(1)).stride(2)),
        ] {
            assert!(!g.takes_small() && g.takes_lanes(), "{g:?}");
        }
        // Two filters per channel: plane by plane.
        assert!(!geom([2, 4, 4, 4], [8, 1, 3, 3], d.groups(4)).takes_small());
        // LR-ASPP's dilated 5x5 layers on 8x8 maps, 960 channels: 15 MB of matrices, read by
        // every image, where the taps read 96 KB of filters. Eight channels at a time.
        let wide = geom([1, 960, 8, 8], [960, 1, 5, 5], d.groups(960).padding(Padding::uniform(4)).dilation(2));
        assert!(!wide.takes_small() && wide.takes_lanes(), "{wide:?}");
        assert!(geom([1, 64, 8, 8], [64, 1, 5, 5], d.groups(64).padding(Padding::uniform(4)).dilation(2)).takes_small());
    }
}
