//! Direct convolution for strided layers in f32 with AVX-512 (B3's c7, ResNet's 3x3 stride-2
//! downsamples), and for every layer it fits in a plan of one image (see [`fits`]), forward
//! only: no im2col copy, whose strided gather of 576 x 784 values an image cost a third as
//! much as the product on c7, and whose columns the `gemm` crate then packed again.
//!
//! The filters are repacked a group of 32 output channels at a time, [K/32][C][R][S][32]. An
//! output tile is `W` positions of one output row by `16 * B` output channels, `W * B`
//! accumulators held in registers; each step broadcasts one input value per position and
//! multiplies it into `B` filter vectors (one 128-byte run), over a chunk of 16 input
//! channels and every tap, the sums kept between chunks (`CHUNK`). The input is read from a
//! zero-bordered copy of the image, one per thread (tiles of their own for the border
//! positions, with only their valid taps, cost more: a one-position tile runs at a fraction
//! of the wide tile's rate). The column stride is a constant of the compiled tile (1 or 2), so
//! the `W` broadcasts of a step are fixed offsets from one pointer.
//!
//! Measured on B3's c7 (8 x 64 -> 128, 56 x 56, 3 x 3, stride 2), 2 threads: 209 GFLOP/s
//! through im2col, 280-300 here on a quiet machine over all channels at once and 325-355 in
//! chunks; one thread 140-150 (chunks: 165-175), about 65-75% of the FMA units' peak (205-230
//! with a loop of independent multiply-adds).

use super::{ConvGeom, Out};

/// Output channels in a tile, in vectors of 16, and positions in a tile: 14 x 2 = 28
/// accumulators, 2 filter vectors and a broadcast in 32 registers (7 x 4 needs 33, and
/// the compiler spilled one accumulator; 6 x 4 measured the same as 14 x 2).
const B_MAIN: usize = 2;
/// Input channels per pass over a task's tiles: the pass's filters (16 x R x S x 32 values,
/// 18 KB on c7) stay in the first-level cache across its tiles, where a tile over all 64
/// channels streamed 74 KB of them from the second level; the tiles' sums wait in a buffer
/// between passes. c7 with 2 threads, interleaved: 309-339 -> 325-355 GFLOP/s (medians 320 ->
/// 331); chunks of 8 measured the same, of 32 slower.
const CHUNK: usize = 16;
const W_MAIN: usize = 14;
// The tiles compiled in `tile`: 1 or 2 blocks of 16 channels, 1 to 14 positions.
const _: () = assert!(B_MAIN == 2 && W_MAIN <= 14);

/// Whether the direct kernel takes this convolution: ungrouped, strided with a column stride
/// of at most 2 (stride-1 3x3 goes to Winograd), a window of more than one tap, output
/// channels a multiple of 16, rows of at least 8 outputs (see [`flat`] for stride 1), on a
/// CPU with AVX-512F. Narrower rows make narrow tiles, and a 1x1 window few steps per tile:
/// on ResNet-18's layers (batch 32) the 3x3 stride-2 layers with rows of 16 and 8 ran 214 ->
/// 244 and 229 -> 252 GFLOP/s here, but with rows of 4 231 -> 117, and the 1x1 stride-2
/// shortcuts 135-190 -> 127-142.
pub(super) fn applies(g: &ConvGeom) -> bool {
    g.stride != (1, 1) && fits(g)
}

/// Whether the kernel can run `g` well, at any stride: [`applies`] without its rule that
/// stride-1 layers go to Winograd. A plan of one image runs its stride-1 3x3 layers here
/// (`planned::inference_algo`): Winograd's transforms of a lone image run on one thread, and
/// columns copy the image nine times, where this kernel's tiles split over the threads by
/// output rows and channels (ResNet-18's 64 x 56 x 56 layers 1.7-2.2 -> 1.0-1.1 ms).
pub(super) fn fits(g: &ConvGeom) -> bool {
    g.groups == 1 && g.k.is_multiple_of(16) && g.k > 0 && g.stride.1 <= 2 && g.r * g.s > 1 && (g.q >= 8 || flat(g)) && available()
}

/// Whether the tiles run along the bordered image's rows instead of the output's (stride 1,
/// rows of fewer than 8 outputs, maps of at least 16 positions): output (p, q) is then flat
/// position p * Wp + q of the bordered width Wp, whose input for each tap is the same offset
/// from it, so a tile of `W_MAIN` flat positions spans rows (the `Wp - Q` positions past the
/// end of each row are computed and not written). A 256-channel 4 x 4 layer, one image: the
/// columns' 193-248 us -> 132-135 (minima of 200 calls, interleaved); ResNet's 512-channel
/// 7 x 7 layers the same either way (1.2-1.3 ms, about the time their 9.4 MB of filters take
/// to stream in).
fn flat(g: &ConvGeom) -> bool {
    g.stride == (1, 1) && g.q < 8 && g.p * g.q >= 16
}

/// AVX-512F, unless `STRIDE_NO_AVX512` turns it off ([`crate::simd::has_avx512`]), so that
/// the switch shows what a CPU without it runs. An AVX2 build of the tile (16 channels by 6
/// positions, 12 accumulators) was tried and not kept: ResNet-18 at one image 0.75-0.88x of
/// the AVX2 paths it replaced (Winograd, columns), its layers at 60-100 GFLOP/s on two threads
/// against the matrix library's 125.
fn available() -> bool {
    crate::simd::has_avx512()
}

/// The repacked filters (shared), and per thread one bordered image and the tiles' partial sums.
pub(super) fn workspace(g: &ConvGeom) -> super::Workspace {
    let per_thread = bordered_len(g) + partial_sums(g);
    super::Workspace { shared: (g.k * g.c * g.r * g.s) as u64, per_thread: per_thread as u64, ..super::Workspace::default() }
}

/// Values of a task's partial sums between chunks of input channels: every tile of an output
/// plane, [P][Q / W_MAIN rounded up][W_MAIN][16 * B_MAIN].
fn partial_sums(g: &ConvGeom) -> usize {
    let tiles = if flat(g) { (g.p * g.bordered_size().1).div_ceil(W_MAIN) + 1 } else { g.p * g.q.div_ceil(W_MAIN) };
    tiles * W_MAIN * 16 * B_MAIN
}

/// Values of a thread's bordered rows at most ([`pad_rows`]): [C][Hp * Wp] when a task's rows
/// read the whole image, and the `Wp` values after them that the last [`flat`] tile's window
/// reaches past its last row (values that only positions past the end of a row read).
fn bordered_len(g: &ConvGeom) -> usize {
    let (hp, wp) = g.bordered_size();
    g.c * hp * wp + wp
}

/// The filters [K, C, R, S] as [K/32][C*R*S][32]: each group of 16 * B_MAIN output channels
/// (fewer in the last) with a step's filter vectors side by side.
pub(crate) fn pack_filters<T: Copy>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let crs = g.c * g.r * g.s;
    // Every value is overwritten below (the packing is a permutation).
    let mut packed = w.to_vec();
    for (gi, group) in packed.chunks_mut(16 * B_MAIN * crs).enumerate() {
        let lanes = group.len() / crs;
        for (i, step) in group.chunks_exact_mut(lanes).enumerate() {
            for (l, v) in step.iter_mut().enumerate() {
                *v = w[(gi * 16 * B_MAIN + l) * crs + i];
            }
        }
    }
    packed
}

/// The rows of the bordered image that output rows `ps` read: from the first one's first tap
/// to past the last one's last.
fn bordered_rows(g: &ConvGeom, ps: &std::ops::Range<usize>) -> std::ops::Range<usize> {
    let hp = g.bordered_size().0;
    let end = if ps.is_empty() { ps.start * g.stride.0 } else { (ps.end - 1) * g.stride.0 + (g.r - 1) * g.dilation.0 + 1 };
    (ps.start * g.stride.0).min(end)..end.min(hp)
}

/// Rows `rows` of image `xn` with its zero border copied into `buf`: [C][rows.len()][Wp], then
/// `Wp` zeros (read only by [`flat`] positions past a row's end). Every value is written, the
/// border as zeros: `buf` is a thread's buffer kept from call to call (see [`BUFFERS`]), which
/// an earlier layer left holding its own values. A task copies only the rows its outputs
/// read: each thread copying the whole image cost a third of a one-image layer such as
/// YOLO's 16 -> 32 at 160 x 160, stride 2.
fn pad_rows(g: &ConvGeom, xn: &[f32], rows: std::ops::Range<usize>, buf: &mut Vec<f32>) {
    let wp = g.bordered_size().1;
    let plane = rows.len() * wp;
    let len = g.c * plane + wp;
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let (top, left) = (g.pad.0, g.pad.2);
    for (src, dst) in xn.chunks_exact(g.h * g.w).zip(buf.chunks_exact_mut(plane.max(1))) {
        for (i, d) in rows.clone().zip(dst.chunks_exact_mut(wp)) {
            let Some(y) = i.checked_sub(top).filter(|&y| y < g.h) else {
                d.fill(0.0);
                continue;
            };
            d[..left].fill(0.0);
            d[left..left + g.w].copy_from_slice(&src[y * g.w..(y + 1) * g.w]);
            d[left + g.w..].fill(0.0);
        }
    }
    buf[g.c * plane..len].fill(0.0);
}

thread_local! {
    /// Each thread's bordered image and partial sums, kept between calls: made afresh per
    /// call (and zeroed: 0.86 + 0.4 MB a thread on ResNet's 64 x 56 x 56 layers) they cost
    /// about a tenth of such a layer at one image. At most the largest layer's, per thread.
    static BUFFERS: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// A thread's [`BUFFERS`], taken for one pool task and given back when it ends (a task that
/// found them taken, which no nesting here causes, would work in new ones); `held` says which
/// image's rows `bordered` holds.
struct Buffers {
    held: Option<(usize, std::ops::Range<usize>)>,
    bordered: Vec<f32>,
    sums: Vec<f32>,
}

impl Buffers {
    fn take() -> Self {
        let (bordered, sums) = BUFFERS.take();
        Buffers { held: None, bordered, sums }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        BUFFERS.set((std::mem::take(&mut self.bordered), std::mem::take(&mut self.sums)));
    }
}

/// What a caller does to each finished run of output values before the kernel moves on:
/// called with the run's offset in `y` and the run, a row range of one output plane, while
/// it is still in cache (a plan's residual and activation).
pub(crate) type Finish<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// y = conv(x, w) + bias for f32 with [`fits`] true.
pub(super) fn forward(g: &ConvGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    assert!(w.len() == g.k * g.c * g.r * g.s, "direct convolution: weight size");
    let len = g.n * g.k * g.p * g.q;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: `y` has room for `len` values, which `forward_raw` all writes.
    unsafe {
        forward_raw(g, x, &pack_filters(g, w), bias, None, y.as_mut_ptr(), len);
        y.set_len(len);
    }
    y
}

/// [`forward`] into `y` (overwritten) with filters packed once by [`pack_filters`] (a plan's),
/// each run of values then passed to `finish`.
pub(crate) fn forward_packed_into(g: &ConvGeom, x: &[f32], packed: &[f32], bias: Option<&[f32]>, finish: Option<Finish>, y: &mut [f32]) {
    assert_eq!(y.len(), g.n * g.k * g.p * g.q, "direct convolution: output size");
    // SAFETY: `y` is `len` values long.
    unsafe { forward_raw(g, x, packed, bias, finish, y.as_mut_ptr(), y.len()) }
}

/// Tasks a thread should have at least, so that a layer of few images and few groups of
/// output channels (one image through a 3 -> 16 stem) still keeps every thread busy: such
/// layers are split by output rows as well.
const TASKS_PER_THREAD: usize = 4;

/// Writes all `len` values of y = conv(x, packed) + bias at `y`, then `finish` over them.
///
/// # Safety
/// `y` must be valid for writes of `len` values, `len` the output's size.
unsafe fn forward_raw(g: &ConvGeom, x: &[f32], packed: &[f32], bias: Option<&[f32]>, finish: Option<Finish>, y: *mut f32, len: usize) {
    use rayon::prelude::*;
    assert!(fits(g), "direct convolution: does not apply to {g:?}");
    let (pq, chw, crs, rs) = (g.p * g.q, g.c * g.h * g.w, g.c * g.r * g.s, g.r * g.s);
    assert!(x.len() == g.n * chw && packed.len() == g.k * crs, "direct convolution: operand sizes");
    assert!(bias.is_none_or(|b| b.len() == g.k), "direct convolution: bias size");
    assert_eq!(len, g.n * g.k * pq, "direct convolution: output size");
    if super::stem::handles(g) {
        // A few images' stem (three input channels): vectorised over positions instead.
        // SAFETY: as this function's.
        unsafe { super::stem::forward(g, x, packed, bias, y) };
        if let Some(finish) = finish {
            // SAFETY: `y` holds the `len` values just written, and nothing else refers to them.
            let y = unsafe { std::slice::from_raw_parts_mut(y, len) };
            y.par_chunks_mut(g.p * g.q).enumerate().for_each(|(i, plane)| finish(i * g.p * g.q, plane));
        }
        return;
    }
    let wp = g.bordered_size().1;
    // Tap (r, s) of output (p, q) reads the bordered plane at (p * sh + r * dh, q * sw + s * dw).
    let taps: Vec<usize> = (0..rs).map(|t| (t / g.s) * g.dilation.0 * wp + (t % g.s) * g.dilation.1).collect();
    // A task: one image's output rows `rows(task)` for a group of 16 * B_MAIN channels (fewer
    // in the last). Tasks are image-major, then by rows (a thread's consecutive tasks share
    // their rows of the bordered image).
    let group = 16 * B_MAIN;
    let groups = g.k.div_ceil(group);
    let wanted = TASKS_PER_THREAD * rayon::current_num_threads();
    let splits = wanted.div_ceil(g.n * groups).clamp(1, g.p.max(1));
    let tasks = g.n * groups * splits;
    let rows = |task: usize| {
        let s = task / groups % splits;
        s * g.p / splits..(s + 1) * g.p / splits
    };
    let channels = |task: usize| (task % groups) * group..((task % groups + 1) * group).min(g.k);
    let out = Out(y);
    (0..tasks).into_par_iter().with_min_len(super::share(tasks).max(1)).for_each_init(Buffers::take, |Buffers { held, bordered, sums }, t| {
        let (ks, ps, n) = (channels(t), rows(t), t / (splits * groups));
        if ps.is_empty() {
            return;
        }
        // This task's rows of the bordered image, `first_row` on, planes `cs` apart.
        let window = bordered_rows(g, &ps);
        let (first_row, cs) = (window.start, window.len() * wp);
        if held.as_ref() != Some(&(n, window.clone())) {
            pad_rows(g, &x[n * chw..(n + 1) * chw], window.clone(), bordered);
            *held = Some((n, window));
        }
        // The group's filters, packed [C*R*S][16 * b] (`pack_filters`).
        let b = ks.len() / 16;
        let filters = &packed[ks.start * crs..ks.end * crs];
        // This task's channels of image n start at value (n * K + ks.start) * PQ.
        let base = (n * g.k + ks.start) * pq;
        // The input channels a chunk at a time (`CHUNK`), each tile's sums kept in `sums`
        // from one chunk to the next and written out after the last.
        let row_tiles = g.q.div_ceil(W_MAIN);
        sums.resize(partial_sums(g), 0f32);
        for c0 in (0..g.c).step_by(CHUNK) {
            let cn = CHUNK.min(g.c - c0);
            let (first, last) = (c0 == 0, c0 + cn == g.c);
            if flat(g) {
                // Tiles of flat positions over this task's rows, their sums always left in
                // `sums` and, after the last chunk, written out for the positions that are
                // outputs.
                let span = ps.start * wp..ps.end * wp;
                // Stride 1: the window starts at the task's first row.
                debug_assert_eq!(first_row, ps.start);
                for (ti, f0) in span.clone().step_by(W_MAIN).enumerate() {
                    let width = W_MAIN.min(span.end - f0);
                    let part = &mut sums[ti * W_MAIN * 16 * B_MAIN..][..W_MAIN * 16 * B_MAIN];
                    // SAFETY: as below; the tile writes no output (`last` false), its reads
                    // stay inside `bordered` (`pad_rows`'s row of zeros after the planes).
                    unsafe {
                        tile(
                            (width, b),
                            &bordered[c0 * cs + f0 - first_row * wp..],
                            &taps,
                            (cn, cs, 1),
                            &filters[c0 * rs * 16 * b..],
                            None,
                            (out.at(base), len - base, part, first, false),
                            pq,
                        )
                    };
                    if last {
                        for (j, lanes) in part.chunks_exact(16 * b).take(width).enumerate() {
                            let (p, q) = ((f0 + j) / wp, (f0 + j) % wp);
                            if q >= g.q {
                                continue;
                            }
                            for (ch, &v) in lanes.iter().enumerate() {
                                let add = bias.map_or(0.0, |bs| bs[ks.start + ch]);
                                // SAFETY: channel ks.start + ch of image n at row p of this
                                // task's rows (f0 + j lies in `span`), column q < Q: one of
                                // this task's values, inside y.
                                unsafe { *out.at(base + ch * pq + p * g.q + q) = v + add };
                            }
                        }
                    }
                }
                continue;
            }
            for p in ps.clone() {
                for (ti, q0) in (0..g.q).step_by(W_MAIN).enumerate() {
                    let width = W_MAIN.min(g.q - q0);
                    let part = &mut sums[(p * row_tiles + ti) * W_MAIN * 16 * B_MAIN..][..W_MAIN * 16 * B_MAIN];
                    let at = base + p * g.q + q0;
                    // SAFETY: the CPU has AVX-512F (`fits`); `tile` checks every bound
                    // against the `len - at` values from `at` on. Tasks write disjoint
                    // values: channels `ks` of image n in rows `ps`.
                    unsafe {
                        tile(
                            (width, b),
                            &bordered[c0 * cs + (p * g.stride.0 - first_row) * wp + q0 * g.stride.1..],
                            &taps,
                            (cn, cs, g.stride.1),
                            &filters[c0 * rs * 16 * b..],
                            bias.map(|bs| &bs[ks.clone()]),
                            (out.at(at), len - at, part, first, last),
                            pq,
                        )
                    };
                }
            }
        }
        if let Some(finish) = finish {
            for k in ks {
                let at = (n * g.k + k) * pq + ps.start * g.q;
                // SAFETY: this task's values (channel k of image n, rows `ps`), all
                // written by the last chunk's tiles above; no other task refers to them.
                finish(at, unsafe { std::slice::from_raw_parts_mut(out.at(at), ps.len() * g.q) });
            }
        }
    });
    // Every value is written: each task writes all of its channels (16 * b, K being a
    // multiple of 16) in each of its rows, whose tiles cover positions 0..Q, and the tasks'
    // rows cover 0..P.
}

/// One tile of `width` positions by `16 * b` channels (see the module's comment) over `c`
/// input channels, its sums started from `part` ([width][b][16]) unless `first`, and left
/// there unless `last`, when they are written with the bias to `out[(16 * bi + l) * ld + j]`
/// for channel `16 * bi + l` and position `j`.
///
/// # Safety
/// The CPU must have AVX-512F, and `out` must be valid for writes of `room` values.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    (width, b): (usize, usize),
    x: &[f32],
    taps: &[usize],
    (c, cs, sw): (usize, usize, usize),
    packed: &[f32],
    bias: Option<&[f32]>,
    (out, room, part, first, last): (*mut f32, usize, &mut [f32], bool, bool),
    ld: usize,
) {
    assert!(part.len() >= width * 16 * b, "direct tile: partial sums too short");
    // Every input value read is x[ci * cs + taps[t] + j * sw] for ci < c, j < width; every
    // filter vector packed[((ci * taps.len() + t) * b + bi) * 16..][..16]; every output
    // out[(16 * bi + l) * ld + j].
    let max_off = taps.iter().copied().max().unwrap_or(0);
    let crs = c * taps.len();
    assert!(sw <= 2 && bias.is_none_or(|bs| bs.len() >= 16 * b), "direct tile: stride or bias");
    assert!(taps.is_empty() || c == 0 || x.len() > (c - 1) * cs + max_off + (width - 1) * sw, "direct tile: input too short");
    assert!(b >= 1 && packed.len() >= b * 16 * crs, "direct tile: filters too short");
    assert!(room >= (16 * b - 1) * ld + width, "direct tile: output too short");
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! widths {
            ($b:literal; $($w:literal)*) => {
                match width {
                    $($w => match sw {
                        1 => unsafe { x86::tile::<$w, $b, 1>(x.as_ptr(), taps, c, cs, packed.as_ptr(), bias, (out, part.as_mut_ptr(), first, last), ld) },
                        _ => unsafe { x86::tile::<$w, $b, 2>(x.as_ptr(), taps, c, cs, packed.as_ptr(), bias, (out, part.as_mut_ptr(), first, last), ld) },
                    },)*
                    _ => unreachable!("direct tile: width {width}"),
                }
            };
        }
        match b {
            2 => widths!(2; 1 2 3 4 5 6 7 8 9 10 11 12 13 14),
            _ => widths!(1; 1 2 3 4 5 6 7 8 9 10 11 12 13 14),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("direct tile: no kernel for this architecture (`fits` is false)");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// See [`super::tile`], whose checks bound every access here.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<const W: usize, const B: usize, const SW: usize>(
        x: *const f32,
        taps: &[usize],
        c: usize,
        cs: usize,
        packed: *const f32,
        bias: Option<&[f32]>,
        (out, part, first, last): (*mut f32, *mut f32, bool, bool),
        ld: usize,
    ) {
        let rs = taps.len();
        let mut acc = [[_mm512_setzero_ps(); B]; W];
        if !first {
            for (j, row) in acc.iter_mut().enumerate() {
                for (bi, a) in row.iter_mut().enumerate() {
                    *a = unsafe { _mm512_loadu_ps(part.add((j * B + bi) * 16)) };
                }
            }
        }
        for ci in 0..c {
            // SAFETY (every access): see `super::tile`'s checks.
            let xc = unsafe { x.add(ci * cs) };
            let wc = unsafe { packed.add(ci * rs * 16 * B) };
            for (t, &off) in taps.iter().enumerate() {
                let xp = unsafe { xc.add(off) };
                let wt = unsafe { wc.add(t * 16 * B) };
                let wv: [__m512; B] = std::array::from_fn(|bi| unsafe { _mm512_loadu_ps(wt.add(bi * 16)) });
                for (j, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(unsafe { *xp.add(j * SW) });
                    for (a, &wvb) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(wvb, xv, *a);
                    }
                }
            }
        }
        if !last {
            for (j, row) in acc.iter().enumerate() {
                for (bi, a) in row.iter().enumerate() {
                    unsafe { _mm512_storeu_ps(part.add((j * B + bi) * 16), *a) };
                }
            }
            return;
        }
        // Channel 16 * bi + l of position j goes to out[(16 * bi + l) * ld + j].
        for bi in 0..B {
            let add = bias.map_or(_mm512_setzero_ps(), |bs| unsafe { _mm512_loadu_ps(bs.as_ptr().add(16 * bi)) });
            let mut lanes = [[0f32; 16]; W];
            for (v, row) in lanes.iter_mut().zip(&acc) {
                unsafe { _mm512_storeu_ps(v.as_mut_ptr(), _mm512_add_ps(row[bi], add)) };
            }
            for l in 0..16 {
                let row = unsafe { out.add((16 * bi + l) * ld) };
                for (j, v) in lanes.iter().enumerate() {
                    unsafe { *row.add(j) = v[l] };
                }
            }
        }
    }
}
