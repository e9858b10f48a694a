//! 2-D convolution, NCHW, forward and both gradients. A transposed convolution is the same
//! three kernels with the roles of forward and data-gradient swapped (see `ConvGeom`).
//!
//! Algorithm choice lives in one place: [`Algo::choose`] by shape, and [`Algo::for_pass`] for
//! one call of one pass, which also weighs what the call pays to lay out its filters.

mod depthwise;
mod depthwise_avx2;
mod depthwise_s2;
mod direct;
mod geom;
mod grouped;
mod im2col;
pub mod planned;
pub mod reference;
mod stem;
mod taps;
mod winograd;

use rayon::prelude::*;
use stride_tensor::Elem;

pub use geom::{resolve_padding, window_out, Conv2dOptions, ConvGeom, Padding};

use crate::gemm::{matmul, MatRef};

/// The convolution algorithms, each a short function below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// 1x1, stride 1, no padding: the image already is the column matrix; one GEMM per image,
    /// or on small maps (under 128 positions) several images side by side in one GEMM, as
    /// im2col's forward does: MobileNetV3's 1x1 layers on 4x4 and 2x2 maps ran at 55-60
    /// GFLOP/s a product per image, 200-290 side by side.
    Pointwise,
    /// One input channel per group and several groups: direct shifted multiply-adds (3x3 with
    /// stride 1 in f32 through the AVX2 register tiles of `depthwise_avx2.rs`). Measured on
    /// B3's c6 (8x128x56x56, 3x3, groups 128): 18 GFLOP/s forward against 12 for im2col, whose
    /// per-group products are only matrix-vector products; the register tiles took it to ~30.
    Depthwise,
    /// 3x3, stride 1, at least 16 channels in and out, maps of 4x4 or more: Winograd's
    /// F(4x4, 3x3), four times fewer multiplies (see `winograd.rs`), for the forward pass and
    /// both gradients.
    Winograd,
    /// Ungrouped, unpadded, the window covering the whole input and one output position: a
    /// dense layer, one product for the whole batch (the VAE generator's first layer, a 1x1
    /// code to 4x4, whose per-image products were matrix-vector products).
    Dense,
    /// Ungrouped, at least 16 channels in and out, and at least a quarter of im2col's products
    /// with padding (small maps: the VAE generator's 4x4 "same" layer): one product per filter
    /// tap over only the positions where it lands inside the image (see `taps.rs`).
    Taps,
    /// Ungrouped and strided (column stride at most 2), output channels a multiple of 16, f32
    /// on a CPU with AVX-512F: a direct kernel with register tiles of output positions by
    /// output channels that reads the image in place, no im2col copy (see `direct.rs`;
    /// ResNet's 3x3 stride-2 downsamples, B3's c7: 209 -> 259 GFLOP/s forward). Forward only:
    /// both gradients, and other element types, are lowered as for `Im2col`. Inference plans
    /// take it for one image and lower batches in their blocks (`planned::Prepared::new`).
    Direct,
    /// Grouped with 2 to 64 input channels a group, stride 1 or 2, f32 on a CPU with AVX-512F or AVX2,
    /// in inference plans only: sixteen output positions a vector over each channel's stride
    /// phases, eight output channels of a group a tile (see `grouped.rs`), where lowering made
    /// a small product per group (RegNetY-400MF's groups of 8).
    Grouped,
    /// Everything else: im2col then a packed GEMM per image and group. This includes
    /// single-channel inputs (B3's c1, MNIST's first layer) unless the AVX2 tiles take their
    /// window (3x3 or 5x5, stride 1, maps at least 8 wide: then `Depthwise`): all K filters
    /// share one column matrix, and one GEMM (45 GFLOP/s forward) beat K portable direct
    /// passes (12).
    Im2col,
}

impl Algo {
    pub fn choose(g: &ConvGeom) -> Algo {
        if g.groups == 1 && (g.p, g.q, g.r, g.s) == (1, 1, g.h, g.w) && g.pad == (0, 0, 0, 0) {
            Algo::Dense
        } else if g.is_pointwise() {
            Algo::Pointwise
        } else if g.is_depthwise() && (g.groups > 1 || g.fits_tiles()) {
            Algo::Depthwise
        } else if winograd::Plan::applies(g) {
            Algo::Winograd
        } else if taps::applies(g) {
            Algo::Taps
        } else if direct::applies(g) {
            Algo::Direct
        } else {
            Algo::Im2col
        }
    }

    /// The algorithm one call of `pass` runs (eager passes, a training step's): [`Algo::choose`],
    /// with two exceptions for the gradients (the direct kernel is forward only, and a
    /// single-channel input's data gradient takes im2col's one product over all K filters
    /// instead of K direct passes added into each plane: B3's c1, ~35 GFLOP/s against ~29 for
    /// the whole backward pass), except where that is Winograd and the call is too small to
    /// repay it. Winograd lays out 36 transformed values per filter pair (K·C) at every call
    /// (weights change between steps; a plan of inference keeps them: [`Pass::Planned`]), and
    /// its filter gradient transforms 36·K·C sums back; taps lay out 9 per pair; im2col reads
    /// the filters where they are. With few 4x4 tiles of output in the call (images times
    /// tiles per image) those layouts cost more than Winograd's cheaper products save:
    /// ResNet-18's last stage (512 channels, 4x4 maps, one tile per image) at batch 32 spends
    /// 9.6 ms in taps' filter gradient against 17.4 in Winograd's (see `pass_cost`).
    pub fn for_pass(g: &ConvGeom, pass: Pass) -> Algo {
        let algo = match (pass, Algo::choose(g)) {
            (Pass::Data | Pass::Filter, Algo::Direct) => Algo::Im2col,
            (Pass::Data, Algo::Depthwise) if g.groups == 1 => Algo::Im2col,
            (_, algo) => algo,
        };
        if algo != Algo::Winograd {
            return algo;
        }
        let tiles = g.n * g.p.div_ceil(4) * g.q.div_ceil(4);
        // A single image is one share: Winograd's transforms run on one thread and its 36
        // products of a few tiles are split between the threads. Planned calls at batch 1
        // (ResNet-18's 3x3 layers, 64x64 to 224x224 inputs) put the crossover with columns at
        // about 30 tiles, where the fit below (made at batches whose images the threads share)
        // puts it at 8: 16 tiles took 0.18 ms by Winograd against 0.12 by columns (64
        // channels), 49 tiles 0.59 against 0.70 (128).
        let lone = if pass == Pass::Planned && g.n == 1 { LONE_IMAGE_WINOGRAD } else { 0.0 };
        let mut best = (Algo::Winograd, pass_cost(Algo::Winograd, pass, tiles) + lone);
        // A plan runs taps through the eager pass, which would choose again: columns only.
        let others: &[Algo] = if pass == Pass::Planned { &[Algo::Im2col] } else { &[Algo::Taps, Algo::Im2col] };
        for &other in others {
            let cost = pass_cost(other, pass, tiles);
            if (other != Algo::Taps || taps::applies(g)) && cost < best.1 {
                best = (other, cost);
            }
        }
        best.0
    }

    /// Whether this algorithm can run `pass` of `g`: the one [`Algo::for_pass`] gives, or one
    /// it weighs in its place (Winograd or taps where their shapes allow, im2col anywhere).
    pub fn runs(self, g: &ConvGeom, pass: Pass) -> bool {
        self == Algo::for_pass(g, pass)
            || self == Algo::Im2col
            || (self == Algo::Winograd && winograd::Plan::applies(g))
            || (self == Algo::Taps && taps::applies(g))
    }
}

/// A convolution's three passes, whose algorithms [`Algo::for_pass`] chooses apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    /// The input's gradient (a transposed convolution's forward pass).
    Data,
    /// The filters' gradient.
    Filter,
    /// The forward pass of a plan of inference, whose filters are laid out when it is
    /// compiled: Winograd's call then only reads its 36 values per filter pair, which still
    /// costs more than im2col's products save below about 8 tiles (one image on 512-channel
    /// 4x4 maps: 2.5 ms against 0.55).
    Planned,
}

/// What a planned Winograd call on a single image costs besides [`pass_cost`]'s fit, in
/// nanoseconds per filter pair (see [`Algo::for_pass`]).
const LONE_IMAGE_WINOGRAD: f64 = 27.0;

/// The time of one call of `pass` by `algo` on a 3x3 convolution that Winograd could run, in
/// nanoseconds per filter pair (K·C, which every term scales with): a part paid once per call
/// (laying out the filters) and a part per tile of 4x4 outputs (`tiles`: images times tiles
/// per image). Fitted to calls at batches 1 to 128 of ResNet-18's 3x3 layers (64 channels on
/// 32x32 maps to 512 on 4x4) on the 2-core reference machine (AVX-512, both threads):
/// Winograd wins from about 20 tiles forward, taps take the gradients of small calls (from
/// 7 tiles for the data, 3 for the filters) up to about 50 tiles for the data and 100 for
/// the filters, and im2col the rest of the small calls.
fn pass_cost(algo: Algo, pass: Pass, tiles: usize) -> f64 {
    let (once, per_tile) = match (algo, pass) {
        (Algo::Winograd, Pass::Forward) => (25.0, 0.45),
        (Algo::Winograd, Pass::Data) => (30.0, 0.49),
        (Algo::Winograd, Pass::Filter) => (36.0, 0.71),
        (Algo::Winograd, Pass::Planned) => (9.4, 0.45),
        (Algo::Taps, Pass::Forward) => (12.0, 1.2),
        (Algo::Taps, Pass::Data) => (3.5, 1.02),
        (Algo::Taps, Pass::Filter) => (3.0, 1.04),
        (_, Pass::Forward | Pass::Planned) => (0.0, 1.67),
        (_, Pass::Data) => (0.0, 1.54),
        (_, Pass::Filter) => (0.0, 2.2),
    };
    once + per_tile * tiles as f64
}

/// Working memory a convolution pass holds besides its input and output, in elements (or in
/// bytes after [`Workspace::scale`]), so memory can be predicted without running the pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Workspace {
    /// Held once for the call (Winograd's transformed filters).
    pub shared: u64,
    /// Held by each working thread (the im2col columns of one image).
    pub per_thread: u64,
    /// Held by each working thread for each image of its share it has in hand at once, up to
    /// `held_images` of them (a Winograd chunk).
    pub per_held_image: u64,
    pub held_images: u64,
}

impl Workspace {
    fn per_thread(elements: u64) -> Workspace {
        Workspace { per_thread: elements, ..Workspace::default() }
    }
    /// One image's (and group's) im2col columns per thread.
    fn im2col(g: &ConvGeom) -> Workspace {
        Workspace::per_thread((g.cg() * g.r * g.s * g.p * g.q) as u64)
    }
    /// The filters laid out tap by tap (shared) and a tap's gathered operands for every image
    /// of the thread's share.
    fn taps(g: &ConvGeom) -> Workspace {
        let shared = (g.k * g.c * g.r * g.s) as u64;
        Workspace { shared, per_held_image: taps::per_image_workspace(g) as u64, held_images: u64::MAX, ..Workspace::default() }
    }
    /// Every field times `unit` (the element size, for bytes).
    pub fn scale(self, unit: u64) -> Workspace {
        Workspace { shared: self.shared * unit, per_thread: self.per_thread * unit, per_held_image: self.per_held_image * unit, ..self }
    }
    /// Held at once over a batch of `n` images on `threads` threads, the images dealt out as
    /// the kernels deal them (one contiguous share per thread when there are enough images).
    pub fn total(&self, n: usize, threads: usize) -> u64 {
        let (by_image, _) = split_for(n, threads);
        let (share, shares) = if by_image {
            let per = n.div_ceil(threads.max(1));
            (per, n.div_ceil(per.max(1)))
        } else {
            (n, 1)
        };
        let held = (share as u64).min(self.held_images);
        self.shared + shares as u64 * (self.per_thread + held * self.per_held_image)
    }
}

/// The workspace of `forward` (and of a transposed convolution's input gradient).
pub fn forward_workspace(g: &ConvGeom) -> Workspace {
    match Algo::for_pass(g, Pass::Forward) {
        Algo::Pointwise | Algo::Dense => Workspace::default(),
        Algo::Depthwise => {
            let (bh, bw) = g.bordered_size();
            Workspace::per_thread((bh * bw) as u64)
        }
        Algo::Winograd => winograd::Plan::forward(g).workspace(),
        Algo::Taps => Workspace::taps(g),
        Algo::Direct => direct::workspace(g),
        Algo::Grouped => grouped::workspace(g),
        Algo::Im2col if data_side_by_side(g) > 1 => side_by_side_workspace(g),
        Algo::Im2col => Workspace::im2col(g),
    }
}

/// Images side by side (`data_side_by_side`): each held image's columns and its rows of the
/// wide product.
fn side_by_side_workspace(g: &ConvGeom) -> Workspace {
    let (pq, crs) = (g.p * g.q, g.cg() * g.r * g.s);
    Workspace { per_held_image: ((crs + g.kg()) * pq) as u64, held_images: data_side_by_side(g) as u64, ..Workspace::default() }
}

/// The workspace of `backward_data` (the forward pass of a transposed convolution).
pub fn backward_data_workspace(g: &ConvGeom) -> Workspace {
    match Algo::for_pass(g, Pass::Data) {
        Algo::Pointwise | Algo::Depthwise | Algo::Dense => Workspace::default(),
        Algo::Winograd => winograd::Plan::backward_data(g).workspace(),
        Algo::Taps => Workspace::taps(g),
        Algo::Im2col | Algo::Direct | Algo::Grouped if data_side_by_side(g) > 1 => side_by_side_workspace(g),
        Algo::Im2col | Algo::Direct | Algo::Grouped => Workspace::im2col(g),
    }
}

/// How to split a batch over the thread pool: by image when there are enough images,
/// otherwise inside each matrix product.
fn split(n: usize) -> (bool, usize) {
    split_for(n, rayon::current_num_threads())
}

/// An output that tasks of one kernel call write at disjoint values through raw pointers
/// (the direct, stem and depthwise kernels split outputs by rows across channel planes, which
/// no slice split expresses).
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: a kernel hands `Out` only to tasks that write disjoint values, and nothing reads
// them until the tasks are joined.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Value `i`'s place (a method, so that closures capture the whole `Out`); only formed,
    /// so in-bounds use is the writer's to ensure.
    pub(super) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Images in each thread's contiguous share of a batch of `n` when it is split by image.
pub(crate) fn share(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

fn split_for(n: usize, t: usize) -> (bool, usize) {
    if n >= t {
        (true, 1)
    } else {
        (false, t)
    }
}

/// A convolution whose window is the whole input: y [N, K] = x [N, C*H*W] w^T.
mod dense {
    use super::ConvGeom;
    use crate::gemm::{auto_threads, matmul, matmul_new, MatRef};
    use stride_tensor::Elem;

    pub(super) fn forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
        let crs = g.c * g.r * g.s;
        let mut y = vec![T::zero(); g.n * g.k];
        if let Some(b) = bias {
            y.chunks_exact_mut(g.k).for_each(|row| row.copy_from_slice(b));
        }
        let (xm, wm) = (MatRef::rows(x, g.n, crs), MatRef::rows(w, g.k, crs).t());
        matmul(xm, wm, &mut y, g.k, bias.is_some(), auto_threads(g.n, crs, g.k));
        y
    }

    /// dx [N, C*H*W] = dy [N, K] w [K, C*H*W], overwriting `dx`.
    pub(super) fn backward_data_into<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T], dx: &mut [T]) {
        let crs = g.c * g.r * g.s;
        matmul(MatRef::rows(dy, g.n, g.k), MatRef::rows(w, g.k, crs), dx, crs, false, auto_threads(g.n, g.k, crs));
    }

    /// dw [K, C*H*W] = dy^T [K, N] x [N, C*H*W].
    pub(super) fn backward_filter<T: Elem>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
        let crs = g.c * g.r * g.s;
        matmul_new(MatRef::rows(dy, g.n, g.k).t(), MatRef::rows(x, g.n, crs), auto_threads(g.k, g.n, crs))
    }
}

/// `y [N, K, P, Q] = conv(x [N, C, H, W], w [K, C/g, R, S]) + bias [K]`.
pub fn forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    forward_by(g, Algo::for_pass(g, Pass::Forward), x, w, bias)
}

/// [`forward`] by a given algorithm, one that [`Algo::runs`] `g` (tests and benchmarks).
pub fn forward_by<T: Elem>(g: &ConvGeom, algo: Algo, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    assert!(algo.runs(g, Pass::Forward), "forward_by: {algo:?} cannot run {g:?}");
    debug_assert_eq!(x.len(), g.n * g.c * g.h * g.w);
    debug_assert_eq!(w.len(), g.k * g.cg() * g.r * g.s);
    match algo {
        Algo::Depthwise => depthwise::forward(g, x, w, bias),
        Algo::Winograd => winograd::forward(g, x, w, bias),
        Algo::Taps => taps::forward(g, x, w, bias),
        Algo::Dense => dense::forward(g, x, w, bias),
        // `T` is f32 exactly when `x` reads as f32, and then so does the bias.
        Algo::Direct => match (crate::simd::as_f32(x), crate::simd::as_f32(w)) {
            (Some(xf), Some(wf)) => {
                let y = direct::forward(g, xf, wf, bias.and_then(crate::simd::as_f32));
                *(Box::new(y) as Box<dyn std::any::Any>).downcast::<Vec<T>>().expect("T is f32")
            }
            // Other element types (f64, for gradient checks) are lowered to products.
            _ => gemm_forward(g, Algo::Im2col, x, w, bias),
        },
        algo => gemm_forward(g, algo, x, w, bias),
    }
}

/// dx [N, C, H, W] from dy [N, K, P, Q]: the transposed convolution of dy with w.
pub fn backward_data<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T]) -> Vec<T> {
    backward_data_by(g, Algo::for_pass(g, Pass::Data), dy, w)
}

/// [`backward_data`] by a given algorithm, one that [`Algo::runs`] `g`.
pub fn backward_data_by<T: Elem>(g: &ConvGeom, algo: Algo, dy: &[T], w: &[T]) -> Vec<T> {
    assert!(algo.runs(g, Pass::Data), "backward_data_by: {algo:?} cannot run {g:?}");
    debug_assert_eq!(dy.len(), g.n * g.k * g.p * g.q);
    match algo {
        Algo::Depthwise => depthwise::backward_data(g, dy, w),
        Algo::Winograd => winograd::backward_data(g, dy, w),
        Algo::Taps => {
            let mut dx = vec![T::zero(); g.n * g.c * g.h * g.w];
            taps::backward_data_into(g, dy, w, &mut dx);
            dx
        }
        Algo::Dense => {
            let mut dx = vec![T::zero(); g.n * g.c * g.h * g.w];
            dense::backward_data_into(g, dy, w, &mut dx);
            dx
        }
        algo => gemm_backward_data(g, algo, dy, w),
    }
}

/// [`backward_data`] into the caller's `dx` (overwritten): no copy for Winograd and im2col,
/// whose passes write their output in place.
pub fn backward_data_into<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T], dx: &mut [T]) {
    assert_eq!(dx.len(), g.n * g.c * g.h * g.w, "backward_data_into: dx length");
    match Algo::for_pass(g, Pass::Data) {
        Algo::Winograd => winograd::backward_data_into(g, dy, w, dx),
        Algo::Depthwise => dx.copy_from_slice(&depthwise::backward_data(g, dy, w)),
        Algo::Taps => taps::backward_data_into(g, dy, w, dx),
        Algo::Dense => dense::backward_data_into(g, dy, w, dx),
        algo => gemm_backward_data_into(g, algo, dy, w, dx),
    }
}

/// dw [K, C/g, R, S] from x and dy (summed over the batch).
pub fn backward_filter<T: Elem>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
    backward_filter_by(g, Algo::for_pass(g, Pass::Filter), x, dy)
}

/// [`backward_filter`] by a given algorithm, one that [`Algo::runs`] `g`.
pub fn backward_filter_by<T: Elem>(g: &ConvGeom, algo: Algo, x: &[T], dy: &[T]) -> Vec<T> {
    assert!(algo.runs(g, Pass::Filter), "backward_filter_by: {algo:?} cannot run {g:?}");
    match algo {
        Algo::Depthwise => depthwise::backward_filter(g, x, dy),
        Algo::Winograd => winograd::backward_filter(g, x, dy),
        Algo::Taps => taps::backward_filter(g, x, dy),
        Algo::Dense => dense::backward_filter(g, x, dy),
        algo => gemm_backward_filter(g, algo, x, dy),
    }
}

/// `dbias [K]` = sum of dy over N, P, Q.
pub fn backward_bias<T: Elem>(g: &ConvGeom, dy: &[T]) -> Vec<T> {
    channel_sums(dy, g.n, g.k, g.p * g.q)
}

crate::multiversion! {
    /// Sum over N and the plane of an [N, C, plane] buffer.
    pub fn channel_sums<T: Elem>(x: &[T], n: usize, c: usize, plane: usize) -> Vec<T> {
        let mut out = vec![T::zero(); c];
        for i in 0..n {
            for (ch, o) in out.iter_mut().enumerate() {
                *o += crate::simd::sum(&x[(i * c + ch) * plane..(i * c + ch + 1) * plane]);
            }
        }
        out
    }
}

fn gemm_forward<T: Elem>(g: &ConvGeom, algo: Algo, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (pq, chw, crs, kg) = (g.p * g.q, g.c * g.h * g.w, g.cg() * g.r * g.s, g.kg());
    let (by_image, threads) = split(g.n);
    // `filled`: the image's output already holds its bias rows.
    let one = |(n, yn): (usize, &mut [T]), col: &mut Vec<T>, filled: bool| {
        if let (Some(b), false) = (bias, filled) {
            for (k, row) in yn.chunks_exact_mut(pq).enumerate() {
                row.fill(b[k]);
            }
        }
        for gi in 0..g.groups {
            let xg = &x[n * chw + gi * g.cg() * g.h * g.w..n * chw + (gi + 1) * g.cg() * g.h * g.w];
            let cols: &[T] = if algo == Algo::Pointwise {
                xg
            } else {
                col.resize(crs * pq, T::zero());
                im2col::im2col(g, xg, col);
                col
            };
            // y[n, group] [K/g, PQ] (+)= w[group] [K/g, C/g*R*S] x col [C/g*R*S, PQ]
            let wg = MatRef::rows(&w[gi * kg * crs..(gi + 1) * kg * crs], kg, crs);
            matmul(wg, MatRef::rows(cols, crs, pq), &mut yn[gi * kg * pq..(gi + 1) * kg * pq], pq, bias.is_some(), threads);
        }
    };
    let chunk = (g.k * pq).max(1);
    let nb_max = if matches!(algo, Algo::Im2col | Algo::Pointwise) { data_side_by_side(g) } else { 1 };
    if nb_max > 1 {
        // Small maps: several images' columns side by side in one product (a product per
        // image would have only P*Q columns, 16 for B3's t1 backward, and run the library's
        // narrow kernel), then each image's rows copied out of the wide result.
        let part = |first: usize, ys: &mut [T], threads: usize| {
            let (mut col, mut wide) = (Vec::new(), Vec::new());
            for (b, yb) in ys.chunks_mut(chunk * nb_max).enumerate() {
                let (first, nb) = (first + b * nb_max, yb.len() / chunk);
                let ld = nb * pq;
                col.resize(crs * ld, T::zero());
                for j in 0..nb {
                    im2col::im2col_strided(g, &x[(first + j) * chw..(first + j + 1) * chw], &mut col[j * pq..], ld);
                }
                wide.resize(g.k * ld, T::zero());
                matmul(MatRef::rows(w, g.k, crs), MatRef::rows(&col, crs, ld), &mut wide, ld, false, threads);
                for (j, yn) in yb.chunks_exact_mut(chunk).enumerate() {
                    for (k, row) in yn.chunks_exact_mut(pq).enumerate() {
                        let b = bias.map_or(T::zero(), |b| b[k]);
                        for (o, &v) in row.iter_mut().zip(&wide[k * ld + j * pq..k * ld + (j + 1) * pq]) {
                            *o = v + b;
                        }
                    }
                }
            }
        };
        if !by_image {
            let mut y = vec![T::zero(); g.n * g.k * pq];
            part(0, &mut y, threads);
            return y;
        }
        let per = share(g.n);
        return crate::simd::par_filled(g.n * g.k * pq, chunk * per, |group, ys| part(group * per, ys, 1));
    }
    if !by_image {
        let mut y = vec![T::zero(); g.n * g.k * pq];
        for_each_image(&mut y, chunk, false, |item, col| one(item, col, false));
        return y;
    }
    let per = share(g.n);
    if let Some(b) = bias {
        // Each image's output written first with its bias rows, by the thread that then adds
        // the product into it, and never zeroed: with 1x1 filters (k = 64) the output passes
        // cost as much as the product (B3's c5 writes 3.2 MB per image).
        let fill = |group: usize, part: &mut [std::mem::MaybeUninit<T>]| {
            let mut col = Vec::new();
            for (j, o) in part.chunks_mut(chunk).enumerate() {
                for (row, &bk) in o.chunks_mut(pq.max(1)).zip(b) {
                    crate::simd::filled(row, bk);
                }
                // SAFETY: the loop above wrote every element of `o` (K rows of P*Q values,
                // the whole image), and `MaybeUninit<T>` has the layout of `T`.
                let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
                one((group * per + j, o), &mut col, true);
            }
        };
        // SAFETY: `fill` writes every element of each chunk (each image's bias rows).
        return unsafe { crate::simd::par_written(g.n * g.k * pq, chunk * per, fill) };
    }
    // Each thread's images zeroed by the thread that writes them (see `simd::par_filled`).
    crate::simd::par_filled(g.n * g.k * pq, chunk * per, |group, part| {
        let mut col = Vec::new();
        for (j, o) in part.chunks_mut(chunk).enumerate() {
            one((group * per + j, o), &mut col, false);
        }
    })
}

/// Runs `one((image, its part of out), scratch)` for every image of `out` (parts of `chunk`).
/// In parallel, the images are dealt out in one contiguous group per thread and each group
/// reuses one scratch buffer: at most one buffer per thread is alive, which is what
/// `stride summary` predicts (work stealing over per-image tasks could hold more).
fn for_each_image<T: Elem>(out: &mut [T], chunk: usize, parallel: bool, one: impl Fn((usize, &mut [T]), &mut Vec<T>) + Sync) {
    if parallel {
        let images = out.len() / chunk;
        let per = share(images);
        out.par_chunks_mut(chunk * per).enumerate().for_each(|(group, part)| {
            let mut col = Vec::new();
            for (j, o) in part.chunks_mut(chunk).enumerate() {
                one((group * per + j, o), &mut col);
            }
        });
    } else {
        let mut col = Vec::new();
        out.chunks_mut(chunk).enumerate().for_each(|item| one(item, &mut col));
    }
}

fn gemm_backward_data<T: Elem>(g: &ConvGeom, algo: Algo, dy: &[T], w: &[T]) -> Vec<T> {
    let (by_image, _) = split(g.n);
    let image = g.c * g.h * g.w;
    if !by_image || image == 0 {
        let mut dx = vec![T::zero(); g.n * image];
        gemm_backward_data_into(g, algo, dy, w, &mut dx);
        return dx;
    }
    // Each thread's images zeroed by that thread (see `simd::par_filled`).
    let per = share(g.n);
    crate::simd::par_filled(g.n * image, per * image, |t, part| data_part(g, algo, dy, w, t * per, part, 1))
}

/// The data gradient into `dx`, which is overwritten.
fn gemm_backward_data_into<T: Elem>(g: &ConvGeom, algo: Algo, dy: &[T], w: &[T], dx: &mut [T]) {
    let (by_image, threads) = split(g.n);
    let image = (g.c * g.h * g.w).max(1);
    if by_image {
        // One contiguous share of images per thread, as `for_each_image` deals them.
        let per = share(g.n);
        dx.par_chunks_mut(per * image).enumerate().for_each(|(t, part)| data_part(g, algo, dy, w, t * per, part, 1));
    } else {
        data_part(g, algo, dy, w, 0, dx, threads);
    }
}

/// The data gradient of the images `first..` that `dxs` holds (overwritten; zeroed here
/// first where col2im adds), with `threads` inside each product.
fn data_part<T: Elem>(g: &ConvGeom, algo: Algo, dy: &[T], w: &[T], first: usize, dxs: &mut [T], threads: usize) {
    let (pq, hw, crs, kg) = (g.p * g.q, g.h * g.w, g.cg() * g.r * g.s, g.kg());
    if algo != Algo::Pointwise {
        dxs.fill(T::zero());
    }
    let mut col = Vec::new();
    if algo == Algo::Im2col && data_side_by_side(g) > 1 {
        // Small maps: the columns of several images in one product, so the filters are read
        // once for the block instead of once per image (B3's t1: 16 columns an image).
        let nb_max = data_side_by_side(g);
        let mut dyb = Vec::new();
        for (b, dxb) in dxs.chunks_mut(nb_max * g.c * hw).enumerate() {
            let first = first + b * nb_max;
            let nb = dxb.len() / (g.c * hw);
            let ld = nb * pq;
            dyb.resize(kg * ld, T::zero());
            for j in 0..nb {
                place_side_by_side(&dy[(first + j) * g.k * pq..(first + j + 1) * g.k * pq], pq, j, ld, &mut dyb);
            }
            // col [C*R*S, nb*PQ] = w^T [C*R*S, K] x dy [K, nb*PQ]
            col.resize(crs * ld, T::zero());
            matmul(MatRef::rows(w, kg, crs).t(), MatRef::rows(&dyb, kg, ld), &mut col, ld, false, threads);
            for (j, dxn) in dxb.chunks_exact_mut(g.c * hw).enumerate() {
                im2col::col2im_channels(g, &col[j * pq..], ld, dxn, hw);
            }
        }
        return;
    }
    for (j, dxn) in dxs.chunks_mut((g.c * hw).max(1)).enumerate() {
        let n = first + j;
        for gi in 0..g.groups {
            let dyg = &dy[(n * g.k + gi * kg) * pq..(n * g.k + (gi + 1) * kg) * pq];
            let wg = MatRef::rows(&w[gi * kg * crs..(gi + 1) * kg * crs], kg, crs).t();
            let dxg = &mut dxn[gi * g.cg() * hw..(gi + 1) * g.cg() * hw];
            // col [C/g*R*S, PQ] = w[group]^T [C/g*R*S, K/g] x dy[n, group] [K/g, PQ]
            if algo == Algo::Pointwise {
                matmul(wg, MatRef::rows(dyg, kg, pq), dxg, pq, false, threads);
            } else {
                col.resize(crs * pq, T::zero());
                matmul(wg, MatRef::rows(dyg, kg, pq), &mut col, pq, false, threads);
                im2col::col2im(g, &col, dxg);
            }
        }
    }
}

/// Columns at least this wide make one filter-gradient or data-gradient product: with small
/// feature maps, a product per image sums over (or has) only P*Q columns (16 for the VAE's 4x4
/// maps), so several images go side by side.
const FILTER_GRAD_COLUMNS: usize = 256;

/// One image's rows of `pq` values (its channels) placed as image `j` of a matrix whose rows
/// hold `ld / pq` images side by side, for one product over several images.
fn place_side_by_side<T: Copy>(src: &[T], pq: usize, j: usize, ld: usize, dst: &mut [T]) {
    for (k, row) in src.chunks_exact(pq).enumerate() {
        dst[k * ld + j * pq..k * ld + (j + 1) * pq].copy_from_slice(row);
    }
}

/// Elements of the column matrix that images side by side fill at most, where that allows
/// 64 columns: 512 KiB of f32, so the columns (the forward's operand, the data gradient's
/// product) stay in the second-level cache beside the filters. B3's t1 (C*R*S = 2048, 16
/// columns an image) put 16 images side by side, 2 MiB of columns: its data gradient ran at
/// 166 GFLOP/s, with 8 images 199, with 4 202.
const SIDE_BY_SIDE_ELEMENTS: usize = 1 << 17;

/// How many images the im2col forward and data gradient put side by side: enough for 256
/// columns, fewer where that would pass [`SIDE_BY_SIDE_ELEMENTS`]; one where each image's P*Q
/// columns make a wide enough product on their own, or for grouped convolutions.
fn data_side_by_side(g: &ConvGeom) -> usize {
    let (pq, crs) = (g.p * g.q, g.cg() * g.r * g.s);
    if g.groups == 1 && pq > 0 && pq < FILTER_GRAD_COLUMNS / 2 {
        let columns = (SIDE_BY_SIDE_ELEMENTS / crs.max(1)).clamp(64, FILTER_GRAD_COLUMNS);
        columns.div_ceil(pq).min(share(g.n)).max(1)
    } else {
        1
    }
}

fn gemm_backward_filter<T: Elem>(g: &ConvGeom, algo: Algo, x: &[T], dy: &[T]) -> Vec<T> {
    let (pq, hw, crs, kg) = (g.p * g.q, g.h * g.w, g.cg() * g.r * g.s, g.kg());
    let (by_image, threads) = split(g.n);
    let side_by_side = if algo == Algo::Im2col && pq > 0 { FILTER_GRAD_COLUMNS.div_ceil(pq) } else { 1 };
    // Each group's sums as dw^T [C/g*R*S, K/g] where that pays (`sum_transposed`), turned
    // round at the end.
    let transposed = sum_transposed(g, crs, kg);
    // dw[group] (+)= dy [K/g, cols] x col^T [cols, C/g*R*S], or its transpose.
    let product = |dyg: MatRef<T>, cols: MatRef<T>, dwg: &mut [T]| {
        if transposed {
            matmul(cols, dyg.t(), dwg, kg, true, threads);
        } else {
            matmul(dyg, cols.t(), dwg, crs, true, threads);
        }
    };
    // Partial sums over a range of images; the ranges are summed at the end.
    let partial = |images: std::ops::Range<usize>| -> Vec<T> {
        let mut dw = vec![T::zero(); g.k * crs];
        let (mut col, mut dyb) = (Vec::new(), Vec::new());
        for first in images.clone().step_by(side_by_side) {
            let nb = side_by_side.min(images.end - first);
            for gi in 0..g.groups {
                let xg = |n: usize| &x[(n * g.c + gi * g.cg()) * hw..(n * g.c + (gi + 1) * g.cg()) * hw];
                let dyg = |n: usize| &dy[(n * g.k + gi * kg) * pq..(n * g.k + (gi + 1) * kg) * pq];
                let dwg = &mut dw[gi * kg * crs..(gi + 1) * kg * crs];
                if nb == 1 {
                    let cols: &[T] = if algo == Algo::Pointwise {
                        xg(first)
                    } else {
                        col.resize(crs * pq, T::zero());
                        im2col::im2col(g, xg(first), &mut col);
                        &col
                    };
                    product(MatRef::rows(dyg(first), kg, pq), MatRef::rows(cols, crs, pq), dwg);
                    continue;
                }
                // The same over nb images side by side: dy [K/g, nb*PQ] x col^T [nb*PQ, ...].
                let ld = nb * pq;
                col.resize(crs * ld, T::zero());
                dyb.resize(kg * ld, T::zero());
                for j in 0..nb {
                    im2col::im2col_strided(g, xg(first + j), &mut col[j * pq..], ld);
                    place_side_by_side(dyg(first + j), pq, j, ld, &mut dyb);
                }
                product(MatRef::rows(&dyb, kg, ld), MatRef::rows(&col, crs, ld), dwg);
            }
        }
        dw
    };
    let mut dw = if by_image {
        let t = rayon::current_num_threads().min(g.n).max(1);
        let parts: Vec<Vec<T>> = (0..t).into_par_iter().map(|i| partial(i * g.n / t..(i + 1) * g.n / t)).collect();
        let mut iter = parts.into_iter();
        let mut dw = iter.next().unwrap_or_else(|| vec![T::zero(); g.k * crs]);
        for p in iter {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        dw
    } else {
        partial(0..g.n)
    };
    if transposed {
        for sums in dw.chunks_exact_mut((kg * crs).max(1)) {
            let turned = transposed_sums(sums, crs, kg);
            sums.copy_from_slice(&turned);
        }
    }
    dw
}

/// Whether a lowered filter gradient with `crs` rows of columns and `kg` filters per group is
/// summed as dw^T = col x dy^T and turned round ([`transposed_sums`]) rather than as dw = dy x
/// col^T: with more rows of columns than filters the `gemm` crate runs the first faster,
/// single-threaded 132 -> 156 GFLOP/s for LeNet's second layer (K = 50, C*R*S = 500, 324
/// columns a product), 148 -> 194 for the VAE generator's 4x4 -> 7x7 layer (128, 1024, 256),
/// and with fewer the second (LeNet's first layer, 20 filters over 9 rows: 106 against 92).
/// The turn is a pass over dw, paid back only where each value sums over enough columns (N*P*Q):
/// interleaved call by call, whole filter gradients ran 1,106 -> 1,058 us (LeNet's second
/// layer, 5,184 columns), 3,458 -> 3,117 (B3's c7, 6,272), 5,020 -> 4,443 (ResNet-18's 32 x 32
/// -> 16 x 16 downsample, 8,192), but 648 -> 707 for the VAE layer and 5,160 -> 6,013 for
/// ResNet-18's 8 x 8 -> 4 x 4 (512 each).
pub(crate) fn sum_transposed(g: &ConvGeom, crs: usize, kg: usize) -> bool {
    crs > kg && g.n * g.p * g.q >= 2048
}

/// `sums` [rows][cols] transposed, [cols][rows]: a filter gradient summed as dw^T (see
/// [`sum_transposed`]).
///
/// A task per run of output rows (at most 1,024, one run per thread when there are fewer),
/// each transposed through tiles of 16 (`transpose_part`).
pub(crate) fn transposed_sums<T: Elem>(sums: &[T], rows: usize, cols: usize) -> Vec<T> {
    assert!(sums.len() >= rows * cols, "transposed_sums: {} values for {rows} x {cols}", sums.len());
    let per = cols.div_ceil(rayon::current_num_threads().max(1)).clamp(1, 1024);
    crate::simd::par_filled(rows * cols, (per * rows).max(1), |task, out| transpose_part(sums, rows, cols, task * per, out))
}

/// Rows `first..` of x^T into `out` ([out.len() / rows][rows]), for `x` [rows][cols]: tiles of
/// 16 columns, each read as `rows` runs of 16 values and written as 16 runs of `rows` (a
/// column at a time, with a stride of `rows` across the whole block, was a fifth of the
/// filter gradient of the VAE generator's 4x4 layer).
fn transpose_part<T: Elem>(x: &[T], rows: usize, cols: usize, first: usize, out: &mut [T]) {
    const B: usize = 16;
    let mut tile = vec![T::zero(); B * rows];
    for (j0, block) in out.chunks_mut(B * rows.max(1)).enumerate() {
        let (at, w) = (first + j0 * B, block.len() / rows.max(1));
        for r in 0..rows {
            for (j, &v) in x[r * cols + at..][..w].iter().enumerate() {
                tile[j * rows + r] = v;
            }
        }
        block.copy_from_slice(&tile[..block.len()]);
    }
}
