//! Grouped convolutions of a few channels a group (RegNet's groups of 8, ResNeXt's of 4 to
//! 32), f32 with AVX-512 or AVX2, forward only, in inference plans (`planned::inference_algo`).
//!
//! Lowered, each group is its own small product (RegNetY-400MF's 440 channels in 55 groups on
//! 7x7 maps: 55 products of 8 x 72 by 72 x 49), which the matrix library ran at 4-16 GFLOP/s,
//! half of that network's pass at one image. Here sixteen output positions are one vector:
//! a task (one image, one group, a range of output rows) first splits each of the group's
//! input channels into its `stride x stride` phases
//! (`phase[a][b][i][j] = bordered[stride * i + a][stride * j + b]`), rows `WQ` apart with zeros
//! around them, in a buffer of its thread, so that tap (r, s) of output (p, q) reads phase
//! (r % stride, s % stride) at (p + r / stride) * WQ + q + s / stride: the same offset from
//! the flat position p * WQ + q for every output. A tile is up to 48 flat positions (three vectors) by 8 output channels of
//! a group, 24 sums; each step loads the three input vectors of one channel and tap and
//! multiplies each into 8 broadcast filter values. The flat positions past the end of a row
//! (`WQ - Q` of them) are computed and dropped when the tile's rows are copied out.

use super::{ConvGeom, Out};

/// Output channels of a tile (a group's channels go eight at a time, the last padded).
const KT: usize = 8;
/// Vectors of sixteen flat positions in the widest tile.
const VECS: usize = 3;
/// Flat positions past a phase's last row that a tile may read (its widest overshoot).
const SLACK: usize = 16 * VECS;

/// Whether the kernel takes `g`: grouped with at least two input channels a group (depthwise
/// layers have their own kernels), at most 64 (wider groups are large enough products),
/// stride 1 or 2 both ways, no dilation, f32 on a CPU with AVX-512F or AVX2. Batches too: 8 images,
/// medians of 200 calls in three interleaved rounds, GFLOP/s lowered against here: 48 channels
/// from 112x112 in groups of 8 24-26 -> 29-36, 104 from 56x56 20-22 -> 23-30, 440 from 14x14
/// 6.4-6.5 -> 10-16 (a first version, which split the whole image's phases before its tasks,
/// was slower than the columns on the first: 17).
pub(super) fn fits(g: &ConvGeom) -> bool {
    g.groups > 1
        && (2..=64).contains(&g.cg())
        && g.kg() > 0
        && matches!(g.stride, (1, 1) | (2, 2))
        && g.dilation == (1, 1)
        && g.p * g.q > 0
        && available()
}

/// AVX-512F (unless `STRIDE_NO_AVX512` turns it off: [`crate::simd::has_avx512`]), else AVX2
/// with FMA.
fn available() -> bool {
    crate::simd::has_avx512() || crate::simd::has_avx2_fma()
}

/// Tasks a thread should have at least (as the direct kernel's).
const TASKS_PER_THREAD: usize = 4;

/// Values apart of the phase planes' rows: the bordered width over the stride.
fn pitch(g: &ConvGeom) -> usize {
    g.bordered_size().1.div_ceil(g.stride.0)
}

/// Rows of the phase planes a task of `rows` output rows reads: its rows, the window's reach
/// below them, and one more for a tile's overshoot past a row's end.
fn phase_rows(g: &ConvGeom, rows: usize) -> usize {
    rows + (g.r - 1) / g.stride.0 + 1
}

/// The filters [K, Cg, R, S] as [G][Kg / 8 rounded up][Cg * R * S][8]: a tile's step reads its
/// 8 channels' values side by side (zeros past the group's last channel).
pub(crate) fn pack_filters<T: stride_tensor::Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (kg, crs) = (g.kg(), g.cg() * g.r * g.s);
    let chunks = kg.div_ceil(KT);
    let mut packed = vec![T::zero(); g.groups * chunks * crs * KT];
    for (k, filter) in w.chunks_exact(crs).enumerate() {
        let (gi, kk) = (k / kg, k % kg);
        let at = (gi * chunks + kk / KT) * crs * KT + kk % KT;
        for (i, &v) in filter.iter().enumerate() {
            packed[at + i * KT] = v;
        }
    }
    packed
}

/// Values of each thread's buffers: a task's phase planes (at most the whole map's rows) and
/// its tile rows' flat outputs.
pub(super) fn workspace(g: &ConvGeom) -> super::Workspace {
    let (wq, st) = (pitch(g), g.stride.0);
    let len = phase_rows(g, g.p) * wq + SLACK;
    super::Workspace {
        shared: (g.groups * g.kg().div_ceil(KT) * KT * g.cg() * g.r * g.s) as u64,
        per_thread: (g.cg() * st * st * len + KT * (g.p * wq + SLACK)) as u64,
        ..super::Workspace::default()
    }
}

/// y = conv(x, w) + bias for `fits(g)`, the filters packed by [`pack_filters`]; `y` ([N, K,
/// P, Q]) is overwritten, each output row then passed to `finish` (with its offset in `y`)
/// while it is in the task's cache.
pub(crate) fn forward_into(g: &ConvGeom, x: &[f32], packed: &[f32], bias: Option<&[f32]>, finish: Option<super::direct::Finish>, y: &mut [f32]) {
    use rayon::prelude::*;
    assert!(fits(g), "grouped convolution: does not apply to {g:?}");
    let (kg, cg, crs) = (g.kg(), g.cg(), g.cg() * g.r * g.s);
    let chunks = kg.div_ceil(KT);
    assert_eq!(x.len(), g.n * g.c * g.h * g.w, "grouped convolution: input size");
    assert_eq!(packed.len(), g.groups * chunks * crs * KT, "grouped convolution: filter size");
    assert!(bias.is_none_or(|b| b.len() == g.k), "grouped convolution: bias size");
    assert_eq!(y.len(), g.n * g.k * g.p * g.q, "grouped convolution: output size");
    let (st, wq) = (g.stride.0, pitch(g));
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    // Tap t = (r, s): its phase plane and its offset from a flat position.
    let taps: Vec<(usize, usize)> = (0..g.r * g.s).map(|t| ((t / g.s % st) * st + t % g.s % st, (t / g.s / st) * wq + t % g.s / st)).collect();
    // A task: one image, one group (its channels' phases made once for all its filters), a
    // range of output rows (more than one range only where there are few groups).
    let wanted = TASKS_PER_THREAD * rayon::current_num_threads();
    let splits = wanted.div_ceil(g.n * g.groups).clamp(1, g.p);
    let out = Out(y.as_mut_ptr());
    (0..g.n * g.groups * splits).into_par_iter().for_each(|t| {
        let (n, gi, s) = (t / (g.groups * splits), t / splits % g.groups, t % splits);
        let rows = s * g.p / splits..(s + 1) * g.p / splits;
        if rows.is_empty() {
            return;
        }
        // This thread's buffers (a nested call, which nothing here makes, would find them
        // taken and make its own).
        let (mut planes, mut flat) = BUFFERS.take();
        let len = phase_rows(g, rows.len()) * wq + SLACK;
        planes.resize(cg * st * st * len, 0.0);
        let first = (n * g.c + gi * cg) * hw;
        for (src, dst) in x[first..first + cg * hw].chunks_exact(hw).zip(planes.chunks_exact_mut(st * st * len)) {
            split_phases(g, src, (wq, rows.start, len), dst);
        }
        let span = rows.len() * wq;
        let ld = span + SLACK;
        flat.resize(KT * ld, 0.0);
        for kc in 0..chunks {
            let chunk = gi * chunks + kc;
            let filters = &packed[chunk * crs * KT..(chunk + 1) * crs * KT];
            let mut f0 = 0;
            while f0 < span {
                let vecs = (span - f0).div_ceil(16).min(VECS);
                // SAFETY: the CPU has AVX-512F or AVX2 (`fits`); `tile` checks its bounds.
                unsafe { tile(vecs, &planes, (cg, st * st * len, len), &taps, f0, filters, &mut flat[f0..], ld) };
                f0 += 16 * vecs;
            }
            // The tile rows' outputs (q < Q of each row) with the bias, into y, then finished.
            for k in 0..KT.min(kg - kc * KT) {
                let ch = gi * kg + kc * KT + k;
                let add = bias.map_or(0.0, |b| b[ch]);
                for p in rows.clone() {
                    let src = &flat[k * ld + (p - rows.start) * wq..][..g.q];
                    let at = (n * g.k + ch) * pq + p * g.q;
                    // SAFETY: channel `ch` of image n, row p: this task's values (its group's
                    // channels and its rows), inside y (asserted above).
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.at(at), g.q) };
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = v + add;
                    }
                    if let Some(finish) = finish {
                        finish(at, dst);
                    }
                }
            }
        }
        BUFFERS.set((planes, flat));
    });
}

/// One input channel's `stride x stride` phases of its bordered plane into `dst` (phase (a,
/// b) at `(a * stride + b) * len`), from phase row `row0` on, rows `wq` apart, as many as fit
/// before the last [`SLACK`] values: every value written once, the border and the slack as
/// zeros (`dst` is a buffer kept from call to call). Input rows past them are read by none of
/// the task's outputs.
fn split_phases(g: &ConvGeom, src: &[f32], (wq, row0, len): (usize, usize, usize), dst: &mut [f32]) {
    let st = g.stride.0;
    let (top, left) = (g.pad.0, g.pad.2);
    for (ph, plane) in dst.chunks_exact_mut(len).enumerate() {
        let (a, b) = (ph / st, ph % st);
        // Phase column pc holds bordered column st * pc + b, input column st * pc + b - left:
        // inside the image for pc in first..end.
        let first = left.saturating_sub(b).div_ceil(st);
        let end = (g.w + left).saturating_sub(b).div_ceil(st).clamp(first, wq);
        let (body, slack) = plane.split_at_mut(len - SLACK);
        slack.fill(0.0);
        for (i, row) in body.chunks_exact_mut(wq).enumerate() {
            let Some(y) = (st * (row0 + i) + a).checked_sub(top).filter(|&y| y < g.h) else {
                row.fill(0.0);
                continue;
            };
            let line = &src[y * g.w..(y + 1) * g.w];
            row[..first].fill(0.0);
            let x0 = st * first + b - left;
            if st == 1 {
                row[first..end].copy_from_slice(&line[x0..x0 + end - first]);
            } else if end > first {
                // Every other value (st is 2), indexed: `step_by` compiled to a loop of compares.
                let from = &line[x0..=x0 + 2 * (end - first - 1)];
                for (k, d) in row[first..end].iter_mut().enumerate() {
                    *d = from[2 * k];
                }
            }
            row[end..].fill(0.0);
        }
    }
}

thread_local! {
    /// Each thread's phase planes and tile rows, kept between calls (made and zeroed per call
    /// they cost as much as the arithmetic of RegNet's 48-channel 112x112 layer).
    static BUFFERS: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// One tile: `vecs` vectors of flat positions from `f0`, 8 output channels, over the group's
/// `c` channels (phase planes `cs` apart, phases `len` apart) and every tap, into `out[k * ld +
/// j]` for channel k and position f0 + j.
///
/// # Safety
/// The CPU must have AVX-512F, or AVX2 and FMA (`available`).
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    vecs: usize,
    planes: &[f32],
    (c, cs, len): (usize, usize, usize),
    taps: &[(usize, usize)],
    f0: usize,
    filters: &[f32],
    out: &mut [f32],
    ld: usize,
) {
    let max_off = taps.iter().map(|&(ph, off)| ph * len + off).max().unwrap_or(0);
    assert!(c == 0 || planes.len() >= (c - 1) * cs + max_off + f0 + 16 * vecs, "grouped tile: input too short");
    assert!(filters.len() >= c * taps.len() * KT, "grouped tile: filters too short");
    assert!(out.len() >= (KT - 1) * ld + 16 * vecs, "grouped tile: output too short");
    #[cfg(target_arch = "x86_64")]
    if !crate::simd::has_avx512() {
        // AVX2 (`available`): eight positions (one vector) by the 8 filters at a time, 8
        // accumulators, the filter values broadcast.
        for v in 0..2 * vecs {
            let args = (planes.as_ptr(), c, cs, len, taps, f0 + 8 * v, filters.as_ptr(), out[8 * v..].as_mut_ptr(), ld);
            // SAFETY: the CPU has AVX2 and FMA (`available`); a vector's reads and writes are
            // among the tile's, which the checks above bound.
            unsafe { x86::tile_avx2(args) };
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let args = (planes.as_ptr(), c, cs, len, taps, f0, filters.as_ptr(), out.as_mut_ptr(), ld);
        // SAFETY: the checks above bound every access.
        match vecs {
            3 => unsafe { x86::tile::<3>(args) },
            2 => unsafe { x86::tile::<2>(args) },
            _ => unsafe { x86::tile::<1>(args) },
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("grouped tile: no kernel for this architecture (`fits` is false)");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::KT;
    use std::arch::x86_64::*;

    type Args<'a> = (*const f32, usize, usize, usize, &'a [(usize, usize)], usize, *const f32, *mut f32, usize);

    /// The AVX2 tile: 8 flat positions by [`KT`] filters. See [`super::tile`], whose checks
    /// bound every access here.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2((planes, c, cs, len, taps, f0, filters, out, ld): Args) {
        let mut acc = [_mm256_setzero_ps(); KT];
        let mut w = filters;
        for ci in 0..c {
            // SAFETY (every access): see `super::tile`'s checks.
            let xc = unsafe { planes.add(ci * cs + f0) };
            for &(ph, off) in taps {
                let xv = unsafe { _mm256_loadu_ps(xc.add(ph * len + off)) };
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(unsafe { *w.add(k) }), xv, *a);
                }
                w = unsafe { w.add(KT) };
            }
        }
        for (k, a) in acc.iter().enumerate() {
            unsafe { _mm256_storeu_ps(out.add(k * ld), *a) };
        }
    }

    /// See [`super::tile`], whose checks bound every access here.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const V: usize>((planes, c, cs, len, taps, f0, filters, out, ld): Args) {
        let mut acc = [[_mm512_setzero_ps(); V]; KT];
        let mut w = filters;
        for ci in 0..c {
            // SAFETY (every access): see `super::tile`'s checks.
            let xc = unsafe { planes.add(ci * cs + f0) };
            for &(ph, off) in taps {
                let xp = unsafe { xc.add(ph * len + off) };
                let xv: [__m512; V] = std::array::from_fn(|v| unsafe { _mm512_loadu_ps(xp.add(16 * v)) });
                for (k, row) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(unsafe { *w.add(k) });
                    for (a, &x) in row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(wv, x, *a);
                    }
                }
                w = unsafe { w.add(KT) };
            }
        }
        for (k, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                unsafe { _mm512_storeu_ps(out.add(k * ld + 16 * v), *a) };
            }
        }
    }
}
