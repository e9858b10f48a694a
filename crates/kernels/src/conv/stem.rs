//! An AVX-512 kernel for the stems of image networks at a few images: a strided (2, 2)
//! convolution of few input channels (RGB) into many (MobileNet's and EfficientNet's 3 -> 16
//! or 32 under 3x3, YOLO's 3 -> 16, ResNet's 3 -> 64 under 7x7), f32, forward.
//!
//! The direct kernel (`direct.rs`) vectorises over output channels and broadcasts one input
//! value per position: with three input channels a tile has 27 steps, and its output, written
//! channel by channel, is a scatter of single values (49-64 GFLOP/s on those stems). Here
//! positions are the vector: each input row is split into its even and odd columns
//! (`depthwise_s2::split_plane`), so a tap of sixteen outputs is one load, multiplied into
//! eight output channels' sums (eight broadcast weights), three vectors of positions at once
//! (24 sums in registers), stored as whole rows of the output planes.

use rayon::prelude::*;

use super::depthwise_s2::{self as s2, Plane, MAX_K};
use super::{ConvGeom, Out};

/// Output channels of a tile.
const KT: usize = 8;
/// Vectors of sixteen positions of a tile.
const NV: usize = 3;
/// The most input channels the kernel takes (an image's colours, perhaps with alpha).
const MAX_C: usize = 4;
/// The most images: their split planes are held at once.
const MAX_N: usize = 4;
/// The narrowest output rows (as `depthwise_s2`'s).
const MIN_COLS: usize = 24;

/// Whether the kernel takes `g`: ungrouped, at most [`MAX_C`] input channels and [`MAX_N`]
/// images, a square window of 2 to 7 at stride 2 (dilation 1), output channels a multiple of
/// 16 (as the direct kernel's filters are packed), rows of at least [`MIN_COLS`] outputs, left
/// padding the split rows cover.
pub(super) fn handles(g: &ConvGeom) -> bool {
    g.groups == 1
        && (1..=MAX_C).contains(&g.c)
        && (1..=MAX_N).contains(&g.n)
        && g.stride == (2, 2)
        && g.dilation == (1, 1)
        && g.r == g.s
        && g.k.is_multiple_of(16)
        && g.k > 0
        && s2::handles(g.r, g.q, g.pad.2)
        && g.q >= MIN_COLS
}

/// Tasks a thread should have at least (each is output rows of one image).
const TASKS_PER_THREAD: usize = 4;

/// Writes all `g.n * g.k * g.p * g.q` values of y = conv(x, w) + bias at `y`, the filters
/// packed by `direct::pack_filters` ([K/32][C*R*S][32], the last group narrower).
///
/// # Safety
/// [`handles`] must be true, and `y` valid for writes of the output's size.
pub(super) unsafe fn forward(g: &ConvGeom, x: &[f32], packed: &[f32], bias: Option<&[f32]>, y: *mut f32) {
    assert!(handles(g), "stem kernel: does not take {g:?}");
    let (hw, pq, crs) = (g.h * g.w, g.p * g.q, g.c * g.r * g.s);
    assert!(x.len() == g.n * g.c * hw && packed.len() == g.k * crs && bias.is_none_or(|b| b.len() == g.k), "stem kernel: sizes");
    let p = Plane::of(g);
    let len = p.phase_len();
    let split = 2 * len * g.h;
    let mut phases = vec![0f32; g.n * g.c * split];
    phases.par_chunks_mut(split).zip(x.par_chunks(hw)).for_each(|(ph, xp)| s2::split_plane(&p, xp, ph));
    let splits = (TASKS_PER_THREAD * rayon::current_num_threads()).div_ceil(g.n).clamp(1, g.p.max(1));
    let out = Out(y);
    (0..g.n * splits).into_par_iter().for_each(|t| {
        let (n, part) = (t / splits, t % splits);
        let rows = part * g.p / splits..(part + 1) * g.p / splits;
        let image = &phases[n * g.c * split..(n + 1) * g.c * split];
        for k0 in (0..g.k).step_by(KT) {
            // The filters of channels k0..k0 + 8 sit side by side in their group of 32.
            let (group, lane) = (k0 / 32, k0 % 32);
            let lanes = 32.min(g.k - 32 * group);
            let w = &packed[32 * group * crs + lane..];
            let b = bias.map(|b| &b[k0..k0 + KT]);
            for i in rows.clone() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F (`handles`); `row` reads the split rows of `image` inside
                // the plane at the tap offsets `phase_len` covers, weights `w[(c, r, s) *
                // lanes + 0..8]` (lane + 8 <= lanes), and writes row i of output channels
                // k0..k0 + 8 of image n, this task's.
                unsafe {
                    x86::row(&p, (g.c, len, split), image, i, (w, lanes), b, out.at(((n * g.k + k0) * pq) + i * g.q), pq)
                };
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{s2, Plane, KT, MAX_K, NV};

    /// What the vectors of one output row share.
    struct Row<'a> {
        k: usize,
        /// Each input channel's input rows inside the plane: (tap row, split row), up to k.
        lines: &'a [[(usize, *const f32); MAX_K]],
        n_lines: usize,
        cols: [usize; MAX_K],
        w: *const f32,
        lanes: usize,
        bias: [__m512; KT],
        out: *mut f32,
        plane: usize,
        q: usize,
    }

    /// Output row `i` of eight output channels (at `out`, planes `plane` apart).
    ///
    /// # Safety
    /// See `super::forward`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn row(
        p: &Plane,
        (c, len, split): (usize, usize, usize),
        image: &[f32],
        i: usize,
        (w, lanes): (&[f32], usize),
        bias: Option<&[f32]>,
        out: *mut f32,
        plane: usize,
    ) {
        let k = p.k;
        assert!(c <= super::MAX_C && image.len() == c * split && w.len() >= (c * k * k - 1) * lanes + KT, "stem kernel: row");
        let mut lines = [[(0usize, std::ptr::null::<f32>()); MAX_K]; super::MAX_C];
        let mut n_lines = 0;
        for r in (0..k).filter(|&r| (p.top..p.top + p.h).contains(&(2 * i + r))) {
            for (ci, l) in lines.iter_mut().enumerate().take(c) {
                l[n_lines] = (r, image[ci * split + (2 * i + r - p.top) * 2 * len..].as_ptr());
            }
            n_lines += 1;
        }
        let bias: [__m512; KT] = std::array::from_fn(|kk| _mm512_set1_ps(bias.map_or(0.0, |b| b[kk])));
        let ctx = Row { k, lines: &lines[..c], n_lines, cols: s2::tap_offsets(k, p.left, len), w: w.as_ptr(), lanes, bias, out, plane, q: p.cols };
        let vectors = p.cols.div_ceil(16);
        let mut v = 0;
        while v + NV <= vectors {
            unsafe { tile::<NV>(&ctx, v) };
            v += NV;
        }
        match vectors - v {
            2 => unsafe { tile::<2>(&ctx, v) },
            1 => unsafe { tile::<1>(&ctx, v) },
            _ => {}
        }
    }

    /// `V` vectors of sixteen outputs from vector `v0` for the eight channels, the row's last
    /// masked to the outputs it holds.
    ///
    /// # Safety
    /// See `super::forward`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const V: usize>(t: &Row, v0: usize) {
        let mut acc = [[_mm512_setzero_ps(); V]; KT];
        for (a, &b) in acc.iter_mut().zip(&t.bias) {
            *a = [b; V];
        }
        for (ci, lines) in t.lines.iter().enumerate() {
            for &(r, line) in &lines[..t.n_lines] {
                for s in 0..t.k {
                    let at = unsafe { line.add(t.cols[s] + 16 * v0) };
                    let xv: [__m512; V] = std::array::from_fn(|v| unsafe { _mm512_loadu_ps(at.add(16 * v)) });
                    let wt = unsafe { t.w.add(((ci * t.k + r) * t.k + s) * t.lanes) };
                    for (kk, a) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(unsafe { *wt.add(kk) });
                        for (a, &x) in a.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(wv, x, *a);
                        }
                    }
                }
            }
        }
        for (kk, a) in acc.iter().enumerate() {
            for (v, &a) in a.iter().enumerate() {
                let j0 = 16 * (v0 + v);
                let n = 16.min(t.q - j0);
                unsafe { _mm512_mask_storeu_ps(t.out.add(kk * t.plane + j0), ((1u32 << n) - 1) as u16, a) };
            }
        }
    }
}
