//! Convolution for planned execution (`stride_autograd::plan`): weights prepared once, the
//! output written into the caller's buffer, and bias, residual and activation applied to each
//! piece of output while it is still in cache, instead of in passes of their own.
//!
//! It also runs in the **batch-blocked** layout `[N/b][C][b][H][W]`: the batch cut into blocks
//! of `b` images, each block channel-major. One block's convolution is then one wide product,
//! W [K, C·R·S] x col [C·R·S, b·P·Q], instead of `b` thin ones of P·Q columns each (81 for
//! LeNet's second layer), and a 1x1 convolution needs no lowering at all. `b = 1` is NCHW.
//! Pooling and element-wise functions work plane by plane, so they run unchanged on it.

use std::borrow::Cow;

use std::sync::Mutex;

use rayon::prelude::*;
use stride_tensor::Elem;

use super::{depthwise, im2col, taps, winograd, Algo, ConvGeom, Pass};
use crate::gemm::{matmul, MatRef, Panels};
use crate::pool::PoolGeom;
use crate::simd::{as_f32, as_f32_mut};
use crate::unary::Unary;

/// Work done on each piece of output after the product: `y = act(y + bias + residual)`.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a, T> {
    /// One value per output channel.
    pub bias: Option<&'a [T]>,
    /// A tensor of the output's shape and layout (a ResNet shortcut).
    pub residual: Option<&'a [T]>,
    pub act: Option<Unary>,
}

impl<T> Default for Epilogue<'_, T> {
    fn default() -> Self {
        Epilogue { bias: None, residual: None, act: None }
    }
}

/// Memory layout of a 4-D activation [N, C, H, W] inside a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Row-major [N, C, H, W], what every public API speaks.
    Nchw,
    /// `[ceil(N/b)][C][b][H][W]`; the last block may hold fewer images.
    Blocked(usize),
}

impl Layout {
    /// Whether an [n, c, ..] tensor lies in the same order in both layouts (one channel, or
    /// one image: a block of images is then just the images one after another).
    pub fn same_memory(self, other: Layout, n: usize, c: usize) -> bool {
        self == other || c <= 1 || n <= 1
    }
    /// The block size (1 for NCHW).
    pub fn block(self) -> usize {
        match self {
            Layout::Nchw => 1,
            Layout::Blocked(b) => b.max(1),
        }
    }
    /// Walks an [n, c, l] tensor in this layout as ordinary [images, c, plane] tensors, so
    /// per-channel kernels written for NCHW serve it: `f(offset, images, plane)` once for NCHW,
    /// once per block when blocked (a block of b images is [1, c, b*l]).
    pub fn pieces(self, n: usize, c: usize, l: usize, mut f: impl FnMut(usize, usize, usize)) {
        match self {
            Layout::Nchw => f(0, n, l),
            Layout::Blocked(b) => {
                for first in (0..n).step_by(b.max(1)) {
                    f(first * c * l, 1, b.min(n - first) * l);
                }
            }
        }
    }
    /// Walks the planes of an [n, c, plane] tensor in memory order: `f(channel, planes)` for
    /// each run of consecutive planes of one channel (one plane in NCHW, a block's images
    /// when blocked).
    pub fn channel_runs(self, n: usize, c: usize, mut f: impl FnMut(usize, usize)) {
        let b = self.block();
        for first in (0..n).step_by(b) {
            let bj = b.min(n - first);
            (0..c).for_each(|ch| f(ch, bj));
        }
    }
}

/// Copies `x` ([n, c, plane] in layout `from`) into `y` in layout `to`.
pub fn relayout<T: Elem>(x: &[T], from: Layout, y: &mut [T], to: Layout, n: usize, c: usize, plane: usize) {
    assert!(x.len() == n * c * plane && y.len() == x.len(), "relayout: lengths");
    if from.same_memory(to, n, c) || plane == 0 {
        y.copy_from_slice(x);
        return;
    }
    // Offset of plane (image i, channel 0) in layout `l`, and the step from one channel's
    // plane to the next (worked out once per image: the divisions cost more than the copies
    // of small planes).
    let at = |l: Layout, i: usize| {
        let b = l.block();
        let (j, r) = (i / b, i % b);
        let bj = b.min(n - j * b);
        ((j * b * c + r) * plane, bj * plane)
    };
    // Tasks of whole destination blocks of images, at least 16K values each (LeNet's last
    // conversion back to NCHW, 64 images of 50 planes of 16 values, took 55 us as 64 tasks).
    let b = to.block();
    let per = (1usize << 14).div_ceil(b * c * plane);
    y.par_chunks_mut(b * c * plane).enumerate().with_min_len(per).for_each(|(j, yb)| {
        let bj = yb.len() / (c * plane);
        for r in 0..bj {
            let (src, src_step) = at(from, j * b + r);
            let (dst, dst_step) = at(to, j * b + r);
            let dst = dst - j * b * c * plane;
            for ch in 0..c {
                let (s, d) = (src + ch * src_step, dst + ch * dst_step);
                yb[d..d + plane].copy_from_slice(&x[s..s + plane]);
            }
        }
    });
}

/// Gathers channels of [n, c, plane] sources into `y` [n, picks.len(), plane], all in one
/// `layout`: output channel `k` is channel `picks[k].1` of source `picks[k].0` (each source
/// given with its channel count). Concatenation, channel splits and ShuffleNet's channel
/// shuffle are such gathers; in a blocked layout a channel of a block is one run of its
/// images' planes, so each pick copies one run and none of them needs NCHW.
pub fn pick_channels<T: Elem>(srcs: &[(&[T], usize)], picks: &[(usize, usize)], layout: Layout, n: usize, plane: usize, y: &mut [T]) {
    let c = picks.len();
    assert!(y.len() == n * c * plane, "pick_channels: output length");
    for &(x, cs) in srcs {
        assert!(x.len() == n * cs * plane, "pick_channels: source length");
    }
    assert!(picks.iter().all(|&(s, ch)| s < srcs.len() && ch < srcs[s].1), "pick_channels: picks");
    if y.is_empty() {
        return;
    }
    // Tasks of whole destination blocks, at least 16K values each.
    let b = layout.block();
    let per = (1usize << 14).div_ceil(b * c * plane);
    y.par_chunks_mut(b * c * plane).enumerate().with_min_len(per).for_each(|(j, yb)| {
        let run = yb.len() / c;
        for (o, &(s, ch)) in yb.chunks_exact_mut(run).zip(picks) {
            let (x, cs) = srcs[s];
            let at = j * b * cs * plane + ch * run;
            o.copy_from_slice(&x[at..at + run]);
        }
    });
}

/// Filters prepared for a geometry: borrowed as given for the products, transformed once for
/// Winograd, tap-major for `Taps` (which otherwise copies them so on every call: 9.4 MB for a
/// 512-channel 3x3 layer, most of its time at batch 1), as its products' matrices for a
/// depthwise layer of small planes. A plan keeps them ([`Prepared::into_owned`]); a training
/// step borrows the parameter's current values.
#[derive(Clone, Debug)]
pub struct Prepared<'a, T: Clone> {
    algo: Algo,
    w: Cow<'a, [T]>,
    /// A layer lowered to products (1x1 or columns) in a plan whose batch has at most
    /// [`PANEL_POSITIONS`] positions, against large weights: the weights in panels (and `w`
    /// empty).
    panels: Option<Panels<T>>,
}

impl<'a, T: Elem> Prepared<'a, T> {
    pub fn new(g: &ConvGeom, w: &'a [T]) -> Self {
        let prepared = Self::with_algo(g, inference_algo::<T>(g), w);
        let crs = g.c * g.r * g.s;
        let lowered = matches!(prepared.algo, Algo::Pointwise | Algo::Im2col) && g.groups == 1 && !single_channel(g);
        if lowered && g.n * g.p * g.q <= PANEL_POSITIONS && crate::gemm::panels_pay(g.n * g.p * g.q, crs, g.k) {
            return Prepared { algo: prepared.algo, w: Cow::Owned(Vec::new()), panels: Some(Panels::new(w, g.k, crs)) };
        }
        prepared
    }
    /// For one call (a training step, whose weights change before the next): a layer that a
    /// plan would run by Winograd is lowered to columns instead where the batch has too few
    /// tiles to repay transforming the filters ([`Algo::for_pass`]). It runs in NCHW, as
    /// Winograd would.
    pub fn for_step(g: &ConvGeom, w: &'a [T]) -> Self {
        let algo = match plan_algo(g) {
            Algo::Winograd if Algo::for_pass(g, Pass::Forward) != Algo::Winograd => Algo::Im2col,
            algo => algo,
        };
        Self::with_algo(g, algo, w)
    }
    fn with_algo(g: &ConvGeom, algo: Algo, w: &'a [T]) -> Self {
        let w = match algo {
            Algo::Winograd => Cow::Owned(winograd::filters_forward(g, w)),
            Algo::Taps => Cow::Owned(taps::filters_by_tap(g, w)),
            Algo::Depthwise if g.takes_small() => Cow::Owned(depthwise::small_matrices(g, w)),
            Algo::Depthwise if g.takes_lanes() => Cow::Owned(depthwise::lanes_taps(g, w)),
            Algo::Direct => Cow::Owned(super::direct::pack_filters(g, w)),
            Algo::Grouped => Cow::Owned(super::grouped::pack_filters(g, w)),
            _ => Cow::Borrowed(w),
        };
        Prepared { algo, w, panels: None }
    }
    pub fn into_owned(self) -> Prepared<'static, T> {
        Prepared { algo: self.algo, w: Cow::Owned(self.w.into_owned()), panels: self.panels }
    }
    pub fn algo(&self) -> Algo {
        self.algo
    }
    /// Whether the weights are laid out in panels: a layer lowered to products in a plan whose
    /// batch has at most four positions (one image on a 2x2 map) against weights too large for
    /// the cache.
    pub fn in_panels(&self) -> bool {
        self.panels.is_some()
    }
}

/// Positions of a plan's batch up to which a layer lowered to products reads large weights in
/// panels. Sixteen (one image on a 4x4 map) were slower on ResNet-18's 3x3 layers at 64x64
/// (columns turned into 16 rows of 2,304: 0.10-0.15 -> 0.17-0.22 ms) than the matrix library's
/// product split by filters.
const PANEL_POSITIONS: usize = 4;

/// The block size for a batch of `n`: one block per thread of the pool, so each thread's
/// share of a convolution is one wide product (1, plain NCHW, when there are no more images
/// than threads: then the threads split each product instead).
pub fn block_for(n: usize) -> usize {
    super::share(n)
}

/// Whether `forward_into` and `backward_into` can run `g` in a blocked layout: ungrouped
/// products (im2col or 1x1). Winograd and depthwise convolutions work image by image, in NCHW.
pub fn blocks(g: &ConvGeom) -> bool {
    g.groups == 1 && matches!(plan_algo(g), Algo::Im2col | Algo::Pointwise)
}

/// Whether `forward_into` (inference) can run `g` in a blocked layout: what [`blocks`] takes,
/// and depthwise layers, plane by plane in the blocks.
pub fn blocks_forward(g: &ConvGeom) -> bool {
    blocks(g) || plan_algo(g) == Algo::Depthwise
}

/// The algorithm inside a plan: [`Algo::choose`], except that a single-channel input (see
/// [`single_channel`]) is planned as im2col, so that it runs in the blocked layout and needs
/// no relayout before the next layer; inside each block it still runs the direct kernel.
/// Strided layers (eager: `Algo::Direct`) are lowered in their blocks as well, and so is a
/// Winograd layer whose batch has too few tiles to repay reading its transformed filters
/// ([`Pass::Planned`]). A 1x1 convolution of a 1x1 map (a squeeze-excitation block's dense
/// layers) is a product per block like any 1x1 layer, so it stays in the blocks around it
/// instead of taking `Dense`'s one product over an NCHW batch and two relayouts.
fn plan_algo(g: &ConvGeom) -> Algo {
    match Algo::choose(g) {
        _ if single_channel(g) => Algo::Im2col,
        Algo::Dense if g.is_pointwise() => Algo::Pointwise,
        Algo::Direct => Algo::Im2col,
        Algo::Winograd => Algo::for_pass(g, Pass::Planned),
        algo => algo,
    }
}

/// The algorithm of an inference plan's layer: [`plan_algo`]'s, except that one image's f32
/// layers that the direct kernel fits take it (`Algo::Direct`), in NCHW, which one image's
/// blocks are. Strided ones: lowering one image to columns is a copy as large as the product
/// is thin (YOLO's 3 -> 16 stem at 320 x 320: 27 rows of 25,600 columns for 16 filters).
/// Stride-1 ones, which eager mode gives Winograd: see `direct::fits` (ResNet-18 at 224 x 224,
/// one image, 26.7-28.3 -> 19.0-19.6 ms a pass; ResNet-50 54-63 -> 43-46).
fn inference_algo<T: Elem>(g: &ConvGeom) -> Algo {
    match plan_algo(g) {
        Algo::Im2col | Algo::Winograd if g.n == 1 && as_f32(&[T::zero()]).is_some() && super::direct::fits(g) => Algo::Direct,
        Algo::Im2col | Algo::Pointwise if as_f32(&[T::zero()]).is_some() && super::grouped::fits(g) => Algo::Grouped,
        algo => algo,
    }
}

/// An ungrouped convolution of a single-channel input (LeNet's first layer), which eager mode
/// runs with the direct kernels: the plan runs them image by image inside a block rather than
/// a lowering of R*S rows, whose thin product mostly moves data.
fn single_channel(g: &ConvGeom) -> bool {
    g.groups == 1 && Algo::choose(g) == Algo::Depthwise
}

/// Elements of one block's column matrix held at once: about 512 KiB of f32, so the lowered
/// images, and the `gemm` crate's packed copy of them, stay in the second-level cache while
/// the product reads them. Twice as many (6 of LeNet's second-layer images a piece instead of
/// 3) ran its products at 154 against 163-173 GFLOP/s a thread forward; lenet_train
/// interleaved, four rounds: 12,465-13,253 -> 12,760-13,972 images/s, lenet_infer 39,967-43,047
/// -> 42,284-47,831, resnet18_infer and _train within the noise.
const COLUMN_ELEMENTS: usize = 1 << 17;

/// y = act(conv(x, w) + bias + residual), `x` and `y` (and the residual) in `layout`, which
/// must be NCHW unless [`blocks`] says otherwise. `y` is overwritten.
pub fn forward_into<T: Elem>(g: &ConvGeom, layout: Layout, x: &[T], w: &Prepared<T>, epi: Epilogue<T>, y: &mut [T]) {
    forward_with(g, layout, x, w, epi, None, None, y);
}

/// Buffers the blocked convolutions lower into, one pair per thread of the pool, kept by a
/// caller that runs many (a plan) so that its steady state neither allocates nor zeroes
/// them: at most about 1 MiB per thread (see `COLUMN_ELEMENTS`).
pub struct Scratch<T> {
    per_thread: Vec<Mutex<(Vec<T>, Vec<T>)>>,
}

impl<T> Scratch<T> {
    /// Empty buffers for each thread of the current pool.
    pub fn for_pool() -> Self {
        Scratch { per_thread: (0..rayon::current_num_threads()).map(|_| Mutex::new((Vec::new(), Vec::new()))).collect() }
    }
}

/// Whether [`forward_pool_into`] can run `g` followed by the pooling `pool`: a convolution
/// [`blocks`] allows, and 2x2 average pooling at stride 2 of its whole output.
pub fn fuses_pool(g: &ConvGeom, pool: &PoolGeom) -> bool {
    blocks(g) && pool.is_2x2() && (pool.n, pool.c, pool.h, pool.w) == (g.n, g.k, g.p, g.q)
}

/// `y = avg_pool_2x2(act(conv(x, w) + bias + residual))` (see [`fuses_pool`]): each piece of
/// the convolution's output is pooled by the thread that made it while it is in cache, and the
/// full-size output is never stored. `y` ([N, K, P/2, Q/2] in `layout`) is overwritten.
pub fn forward_pool_into<T: Elem>(g: &ConvGeom, layout: Layout, x: &[T], w: &Prepared<T>, epi: Epilogue<T>, pool: &PoolGeom, y: &mut [T]) {
    forward_with(g, layout, x, w, epi, Some(pool), None, y);
}

/// [`forward_into`], or [`forward_pool_into`] when `pool` is given, lowering into `scratch`
/// when given (a plan's, kept from run to run) or into new buffers.
#[allow(clippy::too_many_arguments)]
pub fn forward_with<T: Elem>(
    g: &ConvGeom,
    layout: Layout,
    x: &[T],
    w: &Prepared<T>,
    epi: Epilogue<T>,
    pool: Option<&PoolGeom>,
    scratch: Option<&Scratch<T>>,
    y: &mut [T],
) {
    if let Some(pg) = pool {
        assert!(fuses_pool(g, pg), "forward_with: {pg:?} does not fuse with {g:?}");
    }
    let out_plane = pool.map_or(g.p * g.q, |pg| pg.p * pg.q);
    assert_eq!(x.len(), g.n * g.c * g.h * g.w, "forward_into: input length");
    assert_eq!(y.len(), g.n * g.k * out_plane, "forward_into: output length");
    assert!(layout == Layout::Nchw || blocks_forward(g), "forward_into: {:?} cannot run blocked", w.algo);
    if let Some(r) = epi.residual {
        assert_eq!(r.len(), g.n * g.k * g.p * g.q, "forward_into: residual length (the convolution's output)");
    }
    match w.algo {
        Algo::Winograd => {
            winograd::forward_into(g, x, &w.w, epi, y);
            return;
        }
        Algo::Depthwise => {
            // Residual and activation on each task's planes as they are made.
            let finish = |at: usize, piece: &mut [T]| finish_row(piece, T::zero(), epi.residual.map(|r| &r[at..at + piece.len()]), epi.act);
            // Layers of small planes were prepared as their products' matrices.
            let filters = if g.takes_small() {
                depthwise::Filters::Small(&w.w)
            } else if g.takes_lanes() {
                depthwise::Filters::Lanes(&w.w)
            } else {
                depthwise::Filters::Given(&w.w)
            };
            match layout {
                Layout::Nchw => depthwise::forward_into(g, x, filters, epi.bias, y, finish),
                Layout::Blocked(b) => depthwise::forward_blocked_into(g, b.max(1), x, filters, epi.bias, y, finish),
            }
            return;
        }
        Algo::Taps => {
            y.copy_from_slice(&taps::forward_by_tap(g, x, &w.w, epi.bias));
            finish_nchw(g, y, Epilogue { bias: None, ..epi });
            return;
        }
        // Only f32 plans take `Direct` (`plan_algo`), its filters packed by `with_algo`.
        Algo::Direct => {
            let (Some(xf), Some(wf), Some(yf)) = (as_f32(x), as_f32(&w.w), as_f32_mut(y)) else {
                unreachable!("forward_into: the direct kernel is planned for f32 only")
            };
            let bias = epi.bias.and_then(as_f32);
            let Some(pg) = pool else {
                // Residual and activation on each task's rows as it finishes them.
                let (residual, act) = (epi.residual.and_then(as_f32), epi.act);
                let finish = |at: usize, run: &mut [f32]| finish_row(run, 0.0, residual.map(|r| &r[at..at + run.len()]), act);
                let finish: Option<super::direct::Finish> = (residual.is_some() || act.is_some()).then_some(&finish);
                super::direct::forward_packed_into(g, xf, wf, bias, finish, yf);
                return;
            };
            // Pooled ([`fuses_pool`] goes by the layer, not by this plan's batch of one): the
            // whole output, then each plane pooled.
            let mut full = vec![T::zero(); g.n * g.k * g.p * g.q];
            let Some(ff) = as_f32_mut(&mut full) else { unreachable!("f32 above") };
            super::direct::forward_packed_into(g, xf, wf, bias, None, ff);
            finish_nchw(g, &mut full, Epilogue { bias: None, ..epi });
            for (plane, out) in full.chunks_exact(g.p * g.q).zip(y.chunks_exact_mut(out_plane)) {
                crate::pool::avg_2x2(pg, plane, out);
            }
            return;
        }
        Algo::Grouped => {
            let (Some(xf), Some(wf), Some(yf)) = (as_f32(x), as_f32(&w.w), as_f32_mut(y)) else {
                unreachable!("forward_into: the grouped kernel is planned for f32 only")
            };
            // Residual and activation on each output row as its task writes it.
            let (residual, act) = (epi.residual.and_then(as_f32), epi.act);
            let finish = |at: usize, run: &mut [f32]| finish_row(run, 0.0, residual.map(|r| &r[at..at + run.len()]), act);
            let finish: Option<super::direct::Finish> = (residual.is_some() || act.is_some()).then_some(&finish);
            super::grouped::forward_into(g, xf, wf, epi.bias.and_then(as_f32), finish, yf);
            return;
        }
        Algo::Dense => {
            y.copy_from_slice(&super::forward(g, x, &w.w, epi.bias));
            finish_nchw(g, y, Epilogue { bias: None, ..epi });
            return;
        }
        Algo::Im2col | Algo::Pointwise => {}
    }
    if g.groups > 1 {
        y.copy_from_slice(&super::gemm_forward(g, w.algo, x, &w.w, epi.bias));
        finish_nchw(g, y, Epilogue { bias: None, ..epi });
        return;
    }
    let b = layout.block();
    let (pq, hw, crs) = (g.p * g.q, g.h * g.w, g.c * g.r * g.s);
    let blocks = g.n.div_ceil(b);
    // Fewer blocks than threads: the threads split each product, unless it is too small to
    // repay waking them (as `auto_threads` decides for other products).
    let threads = |m: usize| if blocks >= rayon::current_num_threads() { 1 } else { crate::gemm::auto_threads(g.k, crs, m * pq) };
    let block_out = (g.k * b * out_plane).max(1);
    let direct = single_channel(g);
    y.par_chunks_mut(block_out).enumerate().for_each_init(
        // This thread's buffers from `scratch` (unless a task of this thread that waits on
        // a split product holds them), else new ones.
        || scratch.and_then(|s| s.per_thread.get(rayon::current_thread_index()?)?.try_lock().ok()).ok_or_else(|| (Vec::new(), Vec::new())),
        |bufs, (j, yb)| {
            let (col, piece) = match bufs {
                Ok(guard) => {
                    let (col, piece) = &mut **guard;
                    (col, piece)
                }
                Err((col, piece)) => (col, piece),
            };
            let bj = yb.len() / (g.k * out_plane).max(1);
            let x0 = j * b * g.c * hw;
            let xb = &x[x0..x0 + g.c * bj * hw];
            let ld = bj * pq;
            let res = epi.residual.map(|r| &r[j * g.k * b * pq..j * g.k * b * pq + g.k * ld]);
            // Pooled, the piece of output is held too (and outweighs the columns when there are
            // more filters than rows of columns, as in LeNet's first layer: 20 vs 9).
            let held = if pool.is_some() { crs.max(g.k) } else { crs };
            let per = (COLUMN_ELEMENTS / (held * pq).max(1)).clamp(1, bj.max(1));
            for first in (0..bj).step_by(per) {
                let m = per.min(bj - first);
                let cols = first * pq..(first + m) * pq;
                let wm = MatRef::rows(&w.w, g.k, crs);
                // The product into `out` (rows `out_ld` apart): the block's own rows, or (pooled)
                // a piece of m images.
                let mut product = |out: &mut [T], out_ld: usize| {
                    if direct {
                        // The bordered plane (a few KiB) in its own buffer: `col` keeps its size.
                        let mut border = Vec::new();
                        for i in 0..m {
                            let x = &xb[(first + i) * hw..(first + i + 1) * hw];
                            depthwise::plane_outputs(g, x, &w.w, None, &mut border, &mut out[i * pq..], out_ld);
                        }
                    } else if w.algo == Algo::Pointwise && (w.panels.is_some() || crate::gemm::skinny_pays(m * pq, g.c, g.k)) {
                        // A few positions (one image of a small map): as rows [positions, C],
                        // against the weights read once (in panels, or [K, C] as stored).
                        let rows = grown(col, m * pq * g.c);
                        for (c, src) in xb.chunks(bj * hw).enumerate() {
                            for (p, &v) in src[first * hw..(first + m) * hw].iter().enumerate() {
                                rows[p * g.c + c] = v;
                            }
                        }
                        match &w.panels {
                            Some(panels) => crate::gemm::panels_into(rows, m * pq, panels, out, (1, out_ld), false),
                            None => crate::gemm::skinny_into(rows, m * pq, &w.w, out, (1, out_ld), false),
                        }
                    } else if let (Algo::Im2col, Some(panels)) = (w.algo, &w.panels) {
                        // A few positions against large weights (a strided 1x1 layer into a 2x2
                        // map): the columns turned into rows [positions, C*R*S] for the panels.
                        let (len, rows) = (crs * m * pq, m * pq);
                        let col = grown(col, 2 * len);
                        let (lowered, turned) = col.split_at_mut(len);
                        lower(g, xb, bj * hw, first..first + m, lowered, 1);
                        taps::positions_major(lowered, crs, rows, turned);
                        crate::gemm::panels_into(turned, rows, panels, out, (1, out_ld), false);
                    } else if w.algo == Algo::Pointwise {
                        // 1x1, stride 1: channel c of the block is already row c of the columns.
                        let xm = MatRef { data: &xb[first * hw..], rows: g.c, cols: m * pq, rs: bj * hw, cs: 1 };
                        matmul(wm, xm, out, out_ld, false, threads(m));
                    } else if m == 1 && threads(m) > 1 && g.k <= pq && g.r * g.s > 1 && by_rows_fits(g, threads(m)) {
                        let per = rows_per_task(g, threads(m));
                        let scratch = grown(col, (crs + g.k) * per * g.q * g.p.div_ceil(per));
                        by_rows(g, &xb[first * hw..], bj * hw, wm, out, out_ld, per, scratch);
                    } else {
                        let col = grown(col, crs * m * pq);
                        let threads = threads(m);
                        lower(g, xb, bj * hw, first..first + m, col, threads);
                        matmul(wm, MatRef::rows(col, crs, m * pq), out, out_ld, false, threads);
                    }
                };
                // Bias, residual and activation in one pass over the piece, still in cache; pooled,
                // each channel's m planes then go into the block's output.
                let bias = |k: usize| epi.bias.map_or(T::zero(), |b| b[k]);
                let residual = |k: usize| res.map(|r| &r[k * ld + cols.start..k * ld + cols.end]);
                if let Some(pg) = pool {
                    let piece = grown(piece, g.k * m * pq);
                    product(piece, m * pq);
                    for (k, row) in piece.chunks_exact_mut(m * pq).enumerate() {
                        finish_row(row, bias(k), residual(k), epi.act);
                        let dst = (k * bj + first) * out_plane;
                        crate::pool::avg_2x2(pg, row, &mut yb[dst..dst + m * out_plane]);
                    }
                } else {
                    product(&mut yb[cols.start..], ld);
                    // Rows of a few values (small maps, one image) that are one run: an activation
                    // other than ReLU once over the piece, not a call per row (a 1x1 layer on a
                    // 2x2 map with HardSwish, 576 rows of 4: 33 -> 16 us).
                    let once = ld < SHORT_ROWS && cols.len() == ld && !matches!(epi.act, None | Some(Unary::Relu));
                    let row_act = if once { None } else { epi.act };
                    let finish = |(k, row): (usize, &mut [T])| finish_row(&mut row[cols.clone()], bias(k), residual(k), row_act);
                    // Fewer blocks than threads (one image): the threads that split the product
                    // share its rows' epilogue as well.
                    if blocks < rayon::current_num_threads() && g.k * cols.len() >= EPILOGUE_PIECE {
                        yb[..g.k * ld].par_chunks_mut(ld).enumerate().for_each(finish);
                    } else {
                        yb[..g.k * ld].chunks_mut(ld).enumerate().for_each(finish);
                    }
                    if let (true, Some(act)) = (once, epi.act) {
                        act.apply_in_place(&mut yb[..g.k * ld]);
                    }
                }
            }
        },
    );
}

/// The columns of images `images` of a block ([C*R*S, images * P*Q], an image's channel `c`
/// at `x[c * cs..]`), split by channels over `threads` (a product that the threads split too:
/// one image at a time). One image of ResNet-18's 64-channel 16x16 layers lowers 590 KB.
fn lower<T: Elem>(g: &ConvGeom, x: &[T], cs: usize, images: std::ops::Range<usize>, col: &mut [T], threads: usize) {
    let (hw, pq, rs) = (g.h * g.w, g.p * g.q, g.r * g.s);
    let ld = images.len() * pq;
    let per = g.c.div_ceil(crate::tasks_for(threads.max(1))).max(1);
    let run = |c0: usize, part: &mut [T]| {
        let sub = ConvGeom { c: part.len() / (rs * ld).max(1), ..*g };
        for (i, image) in images.clone().enumerate() {
            im2col::im2col_channels(&sub, &x[c0 * cs + image * hw..], cs, &mut part[i * pq..], ld);
        }
    };
    if per >= g.c {
        run(0, col);
    } else {
        col[..g.c * rs * ld].par_chunks_mut(per * rs * ld).enumerate().for_each(|(j, part)| run(j * per, part));
    }
}

/// The output rows `rows` of one image's convolution as a convolution of its own: the input
/// rows their windows start from (those before are skipped, the top padding shrinks to what is
/// left of it), and how many input rows are skipped.
fn rows_geometry(g: &ConvGeom, rows: std::ops::Range<usize>) -> (ConvGeom, usize) {
    let top = rows.start * g.stride.0;
    let (skip, pad_top) = if top >= g.pad.0 { (top - g.pad.0, 0) } else { (0, g.pad.0 - top) };
    (ConvGeom { p: rows.len(), h: g.h - skip.min(g.h), pad: (pad_top, g.pad.1, g.pad.2, g.pad.3), ..*g }, skip.min(g.h))
}

/// Output rows per task of [`by_rows`] among `threads`.
fn rows_per_task(g: &ConvGeom, threads: usize) -> usize {
    g.p.div_ceil(crate::tasks_for(threads.max(1))).max(1)
}

/// Whether [`by_rows`] can split `g`'s output rows among `threads`: every task's windows start
/// inside the image or its top padding (not wholly in the bottom padding).
fn by_rows_fits(g: &ConvGeom, threads: usize) -> bool {
    let per = rows_per_task(g, threads);
    g.p >= threads && ((g.p - 1) / per * per * g.stride.0).saturating_sub(g.pad.0) < g.h
}

/// One image's convolution as products split by output rows: each task lowers the columns of
/// its rows (in its own cache) and multiplies all the filters into them, where lowering every
/// column by channels and then splitting the product by columns passed the columns between
/// the threads and waited for all of them twice. For layers with no more filters than
/// positions (ResNet's 64-channel 16x16 layers and its 7x7 stem at batch 1), and a window of
/// more than one tap: a strided 1x1 layer's columns are a quarter of its input, cheaper to
/// lower once than its products are to run in pieces and copy back (ResNet-50's 256 -> 512
/// shortcut at 56 x 56, one image: medians of six interleaved rounds 80 -> 128 GFLOP/s;
/// ResNet-18's 64 -> 128, 44 -> 59). `x`: the image, channel `c` at `x[c * cs..]`; `out`:
/// [K, P*Q], rows `out_ld` apart; `per` output rows a task.
#[allow(clippy::too_many_arguments)]
fn by_rows<T: Elem>(g: &ConvGeom, x: &[T], cs: usize, wm: MatRef<T>, out: &mut [T], out_ld: usize, per: usize, scratch: &mut [T]) {
    let crs = g.c * g.r * g.s;
    // Each task's columns and products in its own part of `scratch` (kept by a plan).
    let task = (crs + g.k) * per * g.q;
    scratch[..task * g.p.div_ceil(per)].par_chunks_mut(task).enumerate().for_each(|(t, mine)| {
        let (sub, skip) = rows_geometry(g, t * per..((t + 1) * per).min(g.p));
        let cols = sub.p * sub.q;
        let (col, part) = mine.split_at_mut(crs * per * g.q);
        im2col::im2col_channels(&sub, &x[skip * g.w..], cs, col, cols);
        matmul(wm, MatRef::rows(&col[..crs * cols], crs, cols), part, cols, false, 1);
    });
    for (t, mine) in scratch.chunks_exact(task).take(g.p.div_ceil(per)).enumerate() {
        let (at, cols) = (t * per * g.q, (per.min(g.p - t * per)) * g.q);
        for (k, row) in mine[crs * per * g.q..].chunks_exact(cols).take(g.k).enumerate() {
            out[k * out_ld + at..k * out_ld + at + cols].copy_from_slice(row);
        }
    }
}

/// Rows of output shorter than this take their activation in one pass over the piece.
const SHORT_ROWS: usize = 64;

/// The first `n` values of `v`, grown (zeroed) if it is shorter but never shrunk, so that
/// buffers reused for pieces of different sizes are not zeroed again each time they grow.
fn grown<T: Elem>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::zero());
    }
    &mut v[..n]
}

crate::multiversion! {
    /// `row = act((residual + bias) + row)`, in that order of additions (what adding the
    /// product into a buffer that holds residual + bias gives), ReLU without a per-element
    /// call so that the loop vectorises.
    fn finish_row<T: Elem>(row: &mut [T], bias: T, residual: Option<&[T]>, act: Option<Unary>) {
        let zero = T::zero();
        match (residual, act) {
            (None, Some(Unary::Relu)) => row.iter_mut().for_each(|v| {
                let t = bias + *v;
                *v = if t > zero { t } else { zero };
            }),
            (Some(r), Some(Unary::Relu)) => row.iter_mut().zip(r).for_each(|(v, &r)| {
                let t = (r + bias) + *v;
                *v = if t > zero { t } else { zero };
            }),
            (None, act) => {
                if bias != zero {
                    row.iter_mut().for_each(|v| *v = bias + *v);
                }
                if let Some(act) = act {
                    act.apply_in_place(row);
                }
            }
            (Some(r), act) => {
                row.iter_mut().zip(r).for_each(|(v, &r)| *v = (r + bias) + *v);
                if let Some(act) = act {
                    act.apply_in_place(row);
                }
            }
        }
    }
}

/// Residual and activation over an NCHW output whose bias is already in.
fn finish_nchw<T: Elem>(g: &ConvGeom, y: &mut [T], epi: Epilogue<T>) {
    debug_assert_eq!(y.len(), g.n * g.k * g.p * g.q);
    if epi.residual.is_none() && epi.act.is_none() {
        return;
    }
    // Pieces of a few per thread, so that one image's values are shared out too.
    let piece = y.len().div_ceil(4 * rayon::current_num_threads()).max(EPILOGUE_PIECE);
    y.par_chunks_mut(piece).enumerate().for_each(|(i, yi)| {
        if let Some(r) = epi.residual {
            let len = yi.len();
            yi.iter_mut().zip(&r[i * piece..i * piece + len]).for_each(|(o, &v)| *o += v);
        }
        if let Some(act) = epi.act {
            act.apply_in_place(yi);
        }
    });
}

/// Values of `y` a task of [`finish_nchw`] takes at least.
const EPILOGUE_PIECE: usize = 1 << 14;

/// The gradients of [`forward_into`]'s convolution (its epilogue's gradient is the caller's):
/// `dx` (overwritten, when wanted), `dw` and `db` (overwritten) from `x`, `w` and `dy`, all
/// activations in `layout`.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Elem>(g: &ConvGeom, layout: Layout, x: &[T], w: &[T], dy: &[T], dx: Option<&mut [T]>, dw: &mut [T], db: Option<&mut [T]>) {
    backward_with(g, layout, x, w, dy, None, dx, dw, db)
}

/// [`backward_into`] for a convolution whose epilogue ended in a ReLU: `y` holds the ReLU's
/// output and `dy` the gradient after it; `y` is overwritten with the gradient before it (`dy`
/// where `y > 0`, else 0), block by block by the thread that then uses that block, so the
/// masked gradient is read from that thread's cache rather than the other core's.
#[allow(clippy::too_many_arguments)]
pub fn backward_relu_into<T: Elem>(
    g: &ConvGeom,
    layout: Layout,
    x: &[T],
    w: &[T],
    y: &mut [T],
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    assert_eq!(y.len(), dy.len(), "backward_relu_into: y length");
    backward_with(g, layout, x, w, dy, Some(y), dx, dw, db)
}

/// The body of [`backward_into`] and [`backward_relu_into`] (`relu_out`: see the latter).
#[allow(clippy::too_many_arguments)]
fn backward_with<T: Elem>(
    g: &ConvGeom,
    layout: Layout,
    x: &[T],
    w: &[T],
    dy: &[T],
    relu_out: Option<&mut [T]>,
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    assert_eq!(dy.len(), g.n * g.k * g.p * g.q, "backward_into: dy length");
    assert_eq!(dw.len(), w.len(), "backward_into: dw length");
    let b = layout.block();
    if layout == Layout::Nchw || !blocks(g) {
        assert!(layout == Layout::Nchw, "backward_into: {:?} cannot run blocked", Algo::choose(g));
        let dy: &[T] = match relu_out {
            Some(z) => {
                crate::unary::relu_grad_over_output(z, dy);
                z
            }
            None => dy,
        };
        if let Some(db) = db {
            db.copy_from_slice(&super::channel_sums(dy, g.n, g.k, g.p * g.q));
        }
        dw.copy_from_slice(&super::backward_filter(g, x, dy));
        if let Some(dx) = dx {
            super::backward_data_into(g, dy, w, dx);
        }
        return;
    }
    let (pq, hw, crs) = (g.p * g.q, g.h * g.w, g.c * g.r * g.s);
    let algo = plan_algo(g);
    let per_for = |bj: usize| (COLUMN_ELEMENTS / (crs * pq).max(1)).clamp(1, bj.max(1));
    let block_in = g.c * b * hw;
    let block_out = g.k * b * pq;
    let wm = MatRef::rows(w, g.k, crs);
    let with_bias = db.is_some();
    // Filter and bias gradients: block j's partial sums from its output gradient `dyb` (one
    // block per task), added at the end; as dw^T [CRS, K] where that pays
    // (`super::sum_transposed`): LeNet's second layer (K = 50, CRS = 500, 486 columns a piece)
    // ran 136 -> 170 GFLOP/s a thread that way round (an output written transposed straight
    // into dw ran 138).
    let transposed = super::sum_transposed(g, crs, g.k);
    let partial = |j: usize, dyb: &[T], col: &mut Vec<T>| -> (Vec<T>, Vec<T>) {
        let mut dwj = vec![T::zero(); g.k * crs];
        let bj = b.min(g.n - j * b);
        let xb = &x[j * block_in..j * block_in + g.c * bj * hw];
        let ld = bj * pq;
        // A block's channel k is one run of bj planes.
        let dbj = if with_bias { dyb.chunks_exact(ld.max(1)).map(crate::simd::sum).collect() } else { Vec::new() };
        let per = per_for(bj);
        for first in (0..bj).step_by(per) {
            let m = per.min(bj - first);
            let dym = MatRef { data: &dyb[first * pq..], rows: g.k, cols: m * pq, rs: ld, cs: 1 };
            let colm = if algo == Algo::Pointwise {
                MatRef { data: &xb[first * hw..], rows: g.c, cols: m * pq, rs: bj * hw, cs: 1 }
            } else {
                col.resize(crs * m * pq, T::zero());
                for i in 0..m {
                    im2col::im2col_channels(g, &xb[(first + i) * hw..], bj * hw, &mut col[i * pq..], m * pq);
                }
                MatRef::rows(col, crs, m * pq)
            };
            if transposed {
                // dw^T [CRS, K] += col [CRS, cols] x dy^T [cols, K]
                matmul(colm, dym.t(), &mut dwj, g.k, true, 1);
            } else {
                // dw [K, CRS] += dy [K, cols] x col^T [cols, CRS]
                matmul(dym, colm.t(), &mut dwj, crs, true, 1);
            }
        }
        (dwj, dbj)
    };
    let mut parts: Vec<(Vec<T>, Vec<T>)> = Vec::new();
    let dy: &[T] = match relu_out {
        Some(z) => {
            z.par_chunks_mut(block_out.max(1))
                .zip(dy.par_chunks(block_out.max(1)))
                .enumerate()
                .map_init(Vec::new, |col, (j, (zb, dyb))| {
                    crate::unary::relu_mask(zb, dyb);
                    partial(j, zb, col)
                })
                .collect_into_vec(&mut parts);
            z
        }
        None => {
            dy.par_chunks(block_out.max(1)).enumerate().map_init(Vec::new, |col, (j, dyb)| partial(j, dyb, col)).collect_into_vec(&mut parts);
            dy
        }
    };
    dw.fill(T::zero());
    for (p, _) in &parts {
        dw.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
    }
    if transposed {
        // The sums were dw^T [CRS, K].
        let turned = super::transposed_sums(dw, crs, g.k);
        dw.copy_from_slice(&turned);
    }
    if let Some(db) = db {
        db.fill(T::zero());
        for (_, p) in &parts {
            db.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
        }
    }
    // Data gradient: per block, col = W^T [CRS, K] x dy [K, cols], scattered back.
    if let Some(dx) = dx {
        assert_eq!(dx.len(), x.len(), "backward_into: dx length");
        dx.par_chunks_mut(block_in.max(1)).enumerate().for_each_init(Vec::new, |col, (j, dxb)| {
            let bj = dxb.len() / (g.c * hw).max(1);
            let dyb = &dy[j * block_out..j * block_out + g.k * bj * pq];
            let ld = bj * pq;
            let per = per_for(bj);
            if algo != Algo::Pointwise {
                dxb.fill(T::zero());
            }
            for first in (0..bj).step_by(per) {
                let m = per.min(bj - first);
                let dym = MatRef { data: &dyb[first * pq..], rows: g.k, cols: m * pq, rs: ld, cs: 1 };
                if algo == Algo::Pointwise {
                    matmul(wm.t(), dym, &mut dxb[first * hw..], bj * hw, false, 1);
                } else {
                    col.resize(crs * m * pq, T::zero());
                    matmul(wm.t(), dym, col, m * pq, false, 1);
                    for i in 0..m {
                        im2col::col2im_channels(g, &col[i * pq..], m * pq, &mut dxb[(first + i) * hw..], bj * hw);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{Conv2dOptions, Padding};

    #[test]
    fn output_rows_start_where_their_windows_do() {
        // 9 rows, stride 2, padding 3: rows 0..4 start in the top padding (3 rows of it), rows
        // 4..9 at input row 5 with no padding left.
        let o = Conv2dOptions::default().padding(Padding::uniform(3)).stride(2);
        let g = ConvGeom::conv2d(&[1, 4, 16, 16], &[8, 4, 5, 5], &o).unwrap();
        assert_eq!(g.p, 9);
        let (top, skip) = rows_geometry(&g, 0..4);
        assert_eq!((top.p, top.h, top.pad.0, skip), (4, 16, 3, 0));
        let (rest, skip) = rows_geometry(&g, 4..9);
        assert_eq!((rest.p, rest.h, rest.pad, skip), (5, 11, (0, 3, 3, 3), 5));
        assert!(by_rows_fits(&g, 2));
        // A bottom padding so deep that the last tasks' windows would start below the image
        // (16 rows in tasks of 2 for two threads); one task of all 16 starts inside it.
        let deep = Conv2dOptions::default().padding(Padding::Explicit { top: 0, bottom: 10, left: 1, right: 1 });
        let g = ConvGeom::conv2d(&[1, 4, 8, 8], &[8, 4, 3, 3], &deep).unwrap();
        assert_eq!(g.p, 16);
        assert!(!by_rows_fits(&g, 2) && by_rows_fits(&g, 1));
    }
}
