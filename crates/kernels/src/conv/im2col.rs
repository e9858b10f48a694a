//! Lowering a convolution to matrix products: im2col (gather patches into columns) and its
//! adjoint col2im (scatter-add columns back into an image).
//!
//! The column matrix of one image and group is [C/g * R * S, P * Q], row (c, r, s), column
//! (p, q): element = x[c, p*stride_h - pad_top + r*dil_h, q*stride_w - pad_left + s*dil_w],
//! zero where that lands in the padding.

use stride_tensor::Elem;

use super::ConvGeom;
use crate::simd::copy_short;

/// For output column q, the input column is q*stride + offset. Returns the range of q for
/// which it lies inside [0, w): the padding-free interior, so inner loops need no checks.
#[inline]
pub(crate) fn valid_range(len_out: usize, stride: usize, offset: isize, w: usize) -> (usize, usize) {
    // Smallest q with q*stride + offset >= 0.
    let lo = if offset >= 0 { 0 } else { ((-offset) as usize).div_ceil(stride) };
    // Largest q with q*stride + offset <= w - 1, plus one.
    let hi = if (w as isize) - 1 - offset < 0 { 0 } else { (((w as isize) - 1 - offset) as usize) / stride + 1 };
    (lo.min(len_out), hi.min(len_out).max(lo.min(len_out)))
}

/// Fills `col` ([C/g*R*S, P*Q]) from `x` (the C/g channels of one image and group, [C/g, H, W]).
pub(crate) fn im2col<T: Elem>(g: &ConvGeom, x: &[T], col: &mut [T]) {
    im2col_strided(g, x, col, g.p * g.q)
}

/// [`im2col`] into a wider matrix: row i of this image's columns starts at `col[i * ld]`
/// (several images side by side, each `P*Q` columns).
pub(crate) fn im2col_strided<T: Elem>(g: &ConvGeom, x: &[T], col: &mut [T], ld: usize) {
    debug_assert_eq!(x.len(), g.cg() * g.h * g.w);
    im2col_channels(g, x, g.h * g.w, col, ld)
}

crate::multiversion! {
    /// [`im2col_strided`] from an image whose channel `c` starts at `x[c * cs]` (the batch-blocked
    /// layout of planned execution puts the other images of the block between two channels).
    pub(crate) fn im2col_channels<T: Elem>(g: &ConvGeom, x: &[T], cs: usize, col: &mut [T], ld: usize) {
        let (h, w, p, q) = (g.h, g.w, g.p, g.q);
        let (sh, sw) = g.stride;
        let (dh, dw) = g.dilation;
        debug_assert!(g.cg() == 0 || x.len() >= (g.cg() - 1) * cs + h * w);
        debug_assert!(col.len() >= (g.cg() * g.r * g.s - 1) * ld + p * q);
        if g.pad == (0, 0, 0, 0) && (sh, sw) == (1, 1) && (dh, dw) == (1, 1) {
            // Every window inside the image (LeNet's layers): row (c, r, s) is P runs of Q values
            // starting at x[c, r, s], with no bounds to check.
            if let (Some(xf), Some(colf)) = (crate::simd::as_f32(x), crate::simd::as_f32_mut(col)) {
                if avx512::gather(g, xf, cs, colf, ld).is_some() {
                    return;
                }
            }
            let mut at = 0;
            for c in 0..g.cg() {
                for r in 0..g.r {
                    for s in 0..g.s {
                        let src = &x[c * cs + r * w + s..];
                        let row = &mut col[at..at + p * q];
                        for (op, dst) in row.chunks_exact_mut(q.max(1)).enumerate() {
                            copy_short(dst, &src[op * w..op * w + q]);
                        }
                        at += ld;
                    }
                }
            }
            return;
        }
        // With a column stride, each tap reads every sw-th value of a row. When the taps overlap
        // (R*S*P*Q input reads for H*W values), the rows are first split into their sw phases, so
        // every read below is a contiguous copy and the strided access happens once per value.
        let phased = sw > 1 && by_phases(g);
        let wp = w.div_ceil(sw);
        let mut phases = if phased { vec![T::zero(); sw * h * wp] } else { Vec::new() };
        let mut rows = (0..).map(|i| i * ld);
        for c in 0..g.cg() {
            let xc = &x[c * cs..c * cs + h * w];
            if phased {
                for ih in 0..h {
                    split_phases(&xc[ih * w..(ih + 1) * w], sw, wp, h, &mut phases[ih * wp..]);
                }
            }
            for r in 0..g.r {
                for s in 0..g.s {
                    let at = rows.next().expect("endless");
                    let row = &mut col[at..at + p * q];
                    let off_w = (s * dw) as isize - g.pad.2 as isize;
                    let (q0, q1) = valid_range(q, sw, off_w, w);
                    for op in 0..p {
                        let dst = &mut row[op * q..(op + 1) * q];
                        let ih = (op * sh + r * dh) as isize - g.pad.0 as isize;
                        if ih < 0 || ih >= h as isize || q0 == q1 {
                            dst.fill(T::zero());
                            continue;
                        }
                        let ih = ih as usize;
                        dst[..q0].fill(T::zero());
                        dst[q1..].fill(T::zero());
                        let start = (q0 as isize * sw as isize + off_w) as usize;
                        if sw == 1 {
                            copy_short(&mut dst[q0..q1], &xc[ih * w + start..ih * w + start + (q1 - q0)]);
                        } else if phased {
                            // Column start + i*sw is value start/sw + i of phase start % sw.
                            let from = ((start % sw) * h + ih) * wp + start / sw;
                            copy_short(&mut dst[q0..q1], &phases[from..from + (q1 - q0)]);
                        } else {
                            let src = &xc[ih * w..(ih + 1) * w];
                            for (i, d) in dst[q0..q1].iter_mut().enumerate() {
                                *d = src[start + i * sw];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The unpadded stride-1 case of im2col and col2im in f32 with AVX-512: each run of Q values
/// is moved by 16-lane loads and stores, the last one masked, so a run of 9 (LeNet's second
/// layer) is one load and one store instead of two overlapping pairs. B3's c2 lowered six
/// images at a time, one thread: 9.8 us an image through `copy_short` (AVX2), 7.1 us here.
mod avx512 {
    use super::ConvGeom;

    /// col = im2col(x); `None` when the CPU lacks AVX-512F.
    pub(super) fn gather(g: &ConvGeom, x: &[f32], cs: usize, col: &mut [f32], ld: usize) -> Option<()> {
        check(g, x.len(), cs, col.len(), ld)?;
        // SAFETY: the CPU has AVX-512F and `check` bounds every access.
        unsafe { x86::gather(g.cg(), (g.r, g.s), (g.w, g.p, g.q), x.as_ptr(), cs, col.as_mut_ptr(), ld) };
        Some(())
    }

    /// x += col2im(col) for image rows of at most 16 values; `None` when the CPU lacks
    /// AVX-512F or the rows are wider.
    pub(super) fn scatter_add(g: &ConvGeom, col: &[f32], ld: usize, x: &mut [f32], cs: usize) -> Option<()> {
        if g.w > 16 {
            return None;
        }
        check(g, x.len(), cs, col.len(), ld)?;
        // SAFETY: as above; the columns are only read.
        unsafe { x86::add_rows(g.cg(), (g.r, g.s), (g.h, g.w, g.p, g.q), x.as_mut_ptr(), cs, col.as_ptr(), ld) };
        Some(())
    }

    /// Whether the kernels run here, after the checks that keep every access inside an image
    /// of `x_len` values (channel c at c * cs) and columns of `col_len` (row i at i * ld).
    fn check(g: &ConvGeom, x_len: usize, cs: usize, col_len: usize, ld: usize) -> Option<()> {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() {
            let (h, w, p, q, cg) = (g.h, g.w, g.p, g.q, g.cg());
            // Channel c is touched up to x[c * cs + (P - 1 + R - 1) * W + S - 1 + Q - 1], row
            // i of the columns up to col[i * ld + P * Q - 1].
            assert!(p + g.r - 1 <= h && q + g.s - 1 <= w, "im2col runs: windows outside the image");
            assert!(cg == 0 || x_len >= (cg - 1) * cs + h * w, "im2col runs: image too short");
            assert!(cg == 0 || col_len >= (cg * g.r * g.s - 1) * ld + p * q, "im2col runs: columns too short");
            return Some(());
        }
        None
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// For every row (c, r, s) of the columns and output row `op`: the run of Q values at
        /// x[c, op + r, s..] is copied to the columns.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn gather(
            cg: usize,
            (r, s): (usize, usize),
            (w, p, q): (usize, usize, usize),
            x: *const f32,
            cs: usize,
            col: *mut f32,
            ld: usize,
        ) {
            let whole = q / 16;
            let last: __mmask16 = ((1u32 << (q % 16)) - 1) as __mmask16;
            let mut row = col;
            for c in 0..cg {
                for rr in 0..r {
                    for ss in 0..s {
                        // SAFETY (every access): inside the slices, see `check`; masked-off
                        // lanes are neither read nor written.
                        let img = unsafe { x.add(c * cs + rr * w + ss) };
                        for op in 0..p {
                            let (from, to) = unsafe { (img.add(op * w), row.add(op * q)) };
                            for v in 0..whole {
                                unsafe { _mm512_storeu_ps(to.add(16 * v), _mm512_loadu_ps(from.add(16 * v))) };
                            }
                            if last != 0 {
                                let (from, to) = unsafe { (from.add(16 * whole), to.add(16 * whole)) };
                                unsafe { _mm512_mask_storeu_ps(to, last, _mm512_maskz_loadu_ps(last, from)) };
                            }
                        }
                        row = row.wrapping_add(ld);
                    }
                }
            }
        }

        /// The adjoint of [`gather`] for rows of W <= 16: each image row x[c, ih, ..] is one
        /// register that takes every run landing in it (filter row r of output row ih - r,
        /// shifted right by s lanes through a masked load), then one store. Adding run by run
        /// in memory instead stalled on each store before the overlapping next run's load.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn add_rows(
            cg: usize,
            (r, s): (usize, usize),
            (h, w, p, q): (usize, usize, usize, usize),
            x: *mut f32,
            cs: usize,
            col: *const f32,
            ld: usize,
        ) {
            let row_mask: __mmask16 = ((1u32 << w) - 1) as __mmask16;
            let run: u32 = (1u32 << q) - 1;
            for c in 0..cg {
                for ih in 0..h {
                    // SAFETY (every access): inside the slices, see `check`: lanes past the
                    // row or outside a run are masked off, and the run pointers moved s lanes
                    // back are only read at lanes s.. (their own values).
                    let dst = unsafe { x.add(c * cs + ih * w) };
                    let mut acc = unsafe { _mm512_maskz_loadu_ps(row_mask, dst) };
                    for rr in 0..r.min(ih + 1) {
                        let op = ih - rr;
                        if op >= p {
                            continue;
                        }
                        for ss in 0..s {
                            let src = col.wrapping_add(((c * r + rr) * s + ss) * ld + op * q).wrapping_sub(ss);
                            let v = unsafe { _mm512_maskz_loadu_ps((run << ss) as __mmask16, src) };
                            acc = _mm512_add_ps(acc, v);
                        }
                    }
                    unsafe { _mm512_mask_storeu_ps(dst, row_mask, acc) };
                }
            }
        }
    }
}

/// Whether a strided lowering goes through the rows' phases: when the windows read each input
/// value at least twice on average (B3's c7, 3x3 stride 2: 2.25 times), so that one strided
/// pass over the values replaces several.
fn by_phases(g: &ConvGeom) -> bool {
    g.r * g.s * g.p * g.q >= 2 * g.h * g.w
}

/// `out[(ph * planes) * wp + j] = row[j * sw + ph]`: the row's sw phases, each `wp` long (the
/// phases after the first may end one value early; the rest of their slot is left as is). The
/// phases of one row lie `planes * wp` apart, so the rows of a plane interleave with them.
#[inline]
fn split_phases<T: Elem>(row: &[T], sw: usize, wp: usize, planes: usize, out: &mut [T]) {
    let gap = planes * wp;
    let whole = row.len() / sw;
    if sw == 2 {
        let (a, b) = out.split_at_mut(gap);
        for (pair, (x0, x1)) in row.chunks_exact(2).zip(a[..whole].iter_mut().zip(&mut b[..whole])) {
            (*x0, *x1) = (pair[0], pair[1]);
        }
    } else {
        for (j, group) in row.chunks_exact(sw).enumerate() {
            for (ph, &v) in group.iter().enumerate() {
                out[ph * gap + j] = v;
            }
        }
    }
    for (ph, &v) in row[whole * sw..].iter().enumerate() {
        out[ph * gap + whole] = v;
    }
}

/// The adjoint of [`split_phases`]: `row[j * sw + ph] += phases[(ph * planes) * wp + j]`.
#[inline]
fn merge_phases<T: Elem>(phases: &[T], sw: usize, wp: usize, planes: usize, row: &mut [T]) {
    let gap = planes * wp;
    let whole = row.len() / sw;
    if sw == 2 {
        let (a, b) = (&phases[..whole], &phases[gap..gap + whole]);
        for (pair, (&x0, &x1)) in row.chunks_exact_mut(2).zip(a.iter().zip(b)) {
            pair[0] += x0;
            pair[1] += x1;
        }
    } else {
        for (j, group) in row.chunks_exact_mut(sw).enumerate() {
            for (ph, v) in group.iter_mut().enumerate() {
                *v += phases[ph * gap + j];
            }
        }
    }
    for (ph, v) in row[whole * sw..].iter_mut().enumerate() {
        *v += phases[ph * gap + whole];
    }
}

/// Adds the columns of `col` back into `x` ([C/g, H, W]); the adjoint of [`im2col`].
pub(crate) fn col2im<T: Elem>(g: &ConvGeom, col: &[T], x: &mut [T]) {
    debug_assert_eq!(x.len(), g.cg() * g.h * g.w);
    col2im_channels(g, col, g.p * g.q, x, g.h * g.w)
}

crate::multiversion! {
    /// [`col2im`] from columns whose row i starts at `col[i * ld]` into an image whose channel `c`
    /// starts at `x[c * cs]`; the adjoint of [`im2col_channels`].
    pub(crate) fn col2im_channels<T: Elem>(g: &ConvGeom, col: &[T], ld: usize, x: &mut [T], cs: usize) {
        let (h, w, p, q) = (g.h, g.w, g.p, g.q);
        let (sh, sw) = g.stride;
        let (dh, dw) = g.dilation;
        if g.pad == (0, 0, 0, 0) && (sh, sw) == (1, 1) && (dh, dw) == (1, 1) {
            if let (Some(colf), Some(xf)) = (crate::simd::as_f32(col), crate::simd::as_f32_mut(x)) {
                if avx512::scatter_add(g, colf, ld, xf, cs).is_some() {
                    return;
                }
            }
        }
        // The adjoint of im2col's phases: the strided adds go into each row's phases
        // (contiguous), which are added back into the image once per channel.
        let phased = sw > 1 && by_phases(g);
        let wp = w.div_ceil(sw);
        let mut phases = if phased { vec![T::zero(); sw * h * wp] } else { Vec::new() };
        let mut rows = (0..).map(|i| &col[i * ld..i * ld + p * q]);
        for c in 0..g.cg() {
            let xc = &mut x[c * cs..c * cs + h * w];
            phases.fill(T::zero());
            for r in 0..g.r {
                for s in 0..g.s {
                    let row = rows.next().expect("col has C/g*R*S rows");
                    let off_w = (s * dw) as isize - g.pad.2 as isize;
                    let (q0, q1) = valid_range(q, sw, off_w, w);
                    if q0 == q1 {
                        continue;
                    }
                    for op in 0..p {
                        let ih = (op * sh + r * dh) as isize - g.pad.0 as isize;
                        if ih < 0 || ih >= h as isize {
                            continue;
                        }
                        let ih = ih as usize;
                        let src = &row[op * q + q0..op * q + q1];
                        let start = (q0 as isize * sw as isize + off_w) as usize;
                        let dst = if sw == 1 {
                            &mut xc[ih * w + start..ih * w + start + src.len()]
                        } else if phased {
                            let from = ((start % sw) * h + ih) * wp + start / sw;
                            &mut phases[from..from + src.len()]
                        } else {
                            let dst = &mut xc[ih * w..(ih + 1) * w];
                            for (i, &v) in src.iter().enumerate() {
                                dst[start + i * sw] += v;
                            }
                            continue;
                        };
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                }
            }
            if phased {
                for ih in 0..h {
                    merge_phases(&phases[ih * wp..], sw, wp, h, &mut xc[ih * w..(ih + 1) * w]);
                }
            }
        }
    }
}
