//! Pooling over NCHW planes: max, average, Lp, adaptive, and channel (depth-window) max.

use rayon::prelude::*;
use stride_tensor::{block_sum, Elem, Error, Result};

use crate::conv::{resolve_padding, Padding};

/// Options of max/avg/Lp pooling, with PyTorch's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dOptions {
    pub kernel: (usize, usize),
    /// Defaults to the kernel size.
    pub stride: Option<(usize, usize)>,
    /// Explicit padding must be at most half the kernel on each side (PyTorch's rule), so every
    /// window holds at least one real element. `Same` is TensorFlow's rule.
    pub padding: Padding,
    /// Round the output size up, so a partial window at the end still yields an output.
    pub ceil_mode: bool,
    /// Average pooling only: count padded positions in the divisor (PyTorch's default; use
    /// `false` for TensorFlow's "same" average pooling).
    pub count_include_pad: bool,
}

impl Pool2dOptions {
    pub fn new(k: usize) -> Self {
        Pool2dOptions { kernel: (k, k), stride: None, padding: Padding::Valid, ceil_mode: false, count_include_pad: true }
    }
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = Some((s, s));
        self
    }
    pub fn padding(mut self, p: Padding) -> Self {
        self.padding = p;
        self
    }
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }
    pub fn count_include_pad(mut self, on: bool) -> Self {
        self.count_include_pad = on;
        self
    }
}

/// Geometry of one pooling call: [N, C, H, W] -> [N, C, P, Q].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub p: usize,
    pub q: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    /// (top, bottom, left, right)
    pub pad: (usize, usize, usize, usize),
    pub count_include_pad: bool,
}

/// Checks a 4-D NCHW shape.
pub fn nchw(op: &'static str, shape: &[usize]) -> Result<[usize; 4]> {
    match *shape {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(Error::shape(op, format!("expects a 4-D [N, C, H, W] input, got shape {shape:?}"))),
    }
}

fn pool_axis(op: &'static str, axis: &str, input: usize, k: usize, s: usize, pad: (usize, usize), ceil: bool) -> Result<usize> {
    let padded = input + pad.0 + pad.1;
    if k == 0 || s == 0 {
        return Err(Error::arg(op, format!("kernel {k} and stride {s} must be at least 1")));
    }
    // PyTorch: in ceil mode a window may hang over the end, even when the kernel is larger
    // than the padded input, as long as it starts inside.
    let reach = if ceil { padded + s - 1 } else { padded };
    if reach < k {
        return Err(Error::geometry(
            op,
            format!("kernel {k} is larger than the padded input {padded} along {axis} (input {input} + padding {}+{})", pad.0, pad.1),
        ));
    }
    let mut out = (reach - k) / s + 1;
    // PyTorch: the last window must start inside the input or the left padding.
    if ceil && (out - 1) * s >= input + pad.0 {
        out -= 1;
    }
    Ok(out)
}

impl PoolGeom {
    pub fn new(op: &'static str, x: &[usize], o: &Pool2dOptions) -> Result<Self> {
        let [n, c, h, w] = nchw(op, x)?;
        let (kh, kw) = o.kernel;
        let (sh, sw) = o.stride.unwrap_or(o.kernel);
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 {
            return Err(Error::arg(op, format!("kernel {:?} and stride {:?} must be at least 1", o.kernel, (sh, sw))));
        }
        let ph = resolve_padding(o.padding, true, h, kh, sh);
        let pw = resolve_padding(o.padding, false, w, kw, sw);
        if let Padding::Explicit { .. } = o.padding {
            if ph.0.max(ph.1) > kh / 2 || pw.0.max(pw.1) > kw / 2 {
                return Err(Error::arg(op, format!("padding {:?} must be at most half the kernel {:?}", (ph.0, ph.1, pw.0, pw.1), o.kernel)));
            }
        }
        let ceil = o.ceil_mode && !matches!(o.padding, Padding::Same | Padding::SameLower);
        let p = pool_axis(op, "height", h, kh, sh, ph, ceil)?;
        let q = pool_axis(op, "width", w, kw, sw, pw, ceil)?;
        Ok(PoolGeom { n, c, h, w, p, q, kernel: (kh, kw), stride: (sh, sw), pad: (ph.0, ph.1, pw.0, pw.1), count_include_pad: o.count_include_pad })
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.p, self.q]
    }

    /// Window of output (i, j): input rows and columns (clipped to the image) and the
    /// window's size counting padding, as PyTorch computes it.
    #[inline]
    fn window(&self, i: usize, j: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>, usize) {
        let hs = (i * self.stride.0) as isize - self.pad.0 as isize;
        let ws = (j * self.stride.1) as isize - self.pad.2 as isize;
        let he = (hs + self.kernel.0 as isize).min((self.h + self.pad.1) as isize);
        let we = (ws + self.kernel.1 as isize).min((self.w + self.pad.3) as isize);
        let size = ((he - hs) * (we - ws)) as usize;
        let clip = |a: isize, hi: usize| a.clamp(0, hi as isize) as usize;
        (clip(hs, self.h)..clip(he, self.h), clip(ws, self.w)..clip(we, self.w), size)
    }
}

/// How many planes of these sizes (in elements) one task takes: about 16 K elements' worth, so
/// small planes are not one task each.
fn planes_per_task(in_plane: usize, out_plane: usize) -> usize {
    (1usize << 14).div_ceil(in_plane + out_plane)
}

/// Runs `f(output plane, input plane)` over all N*C planes in parallel, several small planes
/// to a task.
pub(crate) fn planes<T: Elem, U: Send>(x: &[T], in_plane: usize, out: &mut [U], out_plane: usize, f: impl Fn(&mut [U], &[T]) + Sync + Send) {
    if out_plane == 0 || in_plane == 0 {
        return;
    }
    let per_task = planes_per_task(in_plane, out_plane);
    out.par_chunks_mut(out_plane).zip(x.par_chunks(in_plane)).with_min_len(per_task).for_each(|(o, i)| f(o, i));
}

/// Max pooling; also returns, per output, the flat index in its input plane of the maximum.
/// A NaN in a window wins (so it is never hidden).
pub fn max_forward<T: Elem>(g: &PoolGeom, x: &[T]) -> (Vec<T>, Vec<u32>) {
    let pq = g.p * g.q;
    let mut y = vec![T::zero(); g.n * g.c * pq];
    let mut idx = vec![0u32; g.n * g.c * pq];
    max_forward_into(g, x, &mut y, &mut idx);
    (y, idx)
}

/// [`max_forward`] into the caller's buffers (planned execution), both of the output's length.
pub fn max_forward_into<T: Elem>(g: &PoolGeom, x: &[T], y: &mut [T], idx: &mut [u32]) {
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    assert!(x.len() == g.n * g.c * hw && y.len() == g.n * g.c * pq && idx.len() == y.len(), "max_forward_into: lengths");
    if hw == 0 || pq == 0 {
        return;
    }
    let fast = g.is_2x2();
    let per_task = planes_per_task(hw, 2 * pq);
    y.par_chunks_mut(pq).zip(idx.par_chunks_mut(pq)).zip(x.par_chunks(hw)).with_min_len(per_task).for_each(|((out, arg), xp)| {
        if fast {
            max_2x2(g, xp, out, arg)
        } else if !x86::max_window(g, xp, out, arg) {
            max_window(g, xp, out, arg)
        }
    });
}

#[inline(always)]
fn better<T: Elem>(v: T, best: T) -> bool {
    // `|` and `&`, not `||` and `&&`: no short circuit, so no branch on the data.
    (v > best) | (v.is_nan() & !best.is_nan())
}

/// The general window loop.
fn max_window<T: Elem>(g: &PoolGeom, xp: &[T], out: &mut [T], arg: &mut [u32]) {
    for i in 0..g.p {
        for j in 0..g.q {
            let (rows, cols, _) = g.window(i, j);
            let (mut bv, mut bi) = (T::neg_infinity(), rows.start * g.w + cols.start);
            for r in rows {
                for c in cols.clone() {
                    let v = xp[r * g.w + c];
                    if better(v, bv) {
                        (bv, bi) = (v, r * g.w + c);
                    }
                }
            }
            out[i * g.q + j] = bv;
            arg[i * g.q + j] = bi as u32;
        }
    }
}

/// 2x2 windows, stride 2, no padding: the common case, two input rows at a time, in the order
/// of [`max_window`]: the first of equal maxima, a NaN over any number. f32 on AVX2 machines
/// takes eight windows at a time with vector compares and blends (`x86::max_2x2`): which way a
/// comparison goes is data, and written as scalar selects the compiler still made branches of
/// them, mispredicted on real activations (random ones ran 4-5x slower than patterned ones).
fn max_2x2<T: Elem>(g: &PoolGeom, xp: &[T], out: &mut [T], arg: &mut [u32]) {
    let done = x86::max_2x2(g, xp, out, arg);
    if done < g.q {
        max_2x2_portable(g, xp, out, arg, done);
    }
}

crate::multiversion! {
    /// [`max_2x2`] for any element type, from output column `from` of every row on (the
    /// columns before it are done).
    fn max_2x2_portable<T: Elem>(g: &PoolGeom, xp: &[T], out: &mut [T], arg: &mut [u32], from: usize) {
        #[inline(always)]
        fn pick<T: Elem>(v: T, at: u32, bv: &mut T, bi: &mut u32) {
            let take = better(v, *bv);
            *bv = if take { v } else { *bv };
            *bi = if take { at } else { *bi };
        }
        let w = g.w as u32;
        for (i, (o, a)) in out.chunks_exact_mut(g.q).zip(arg.chunks_exact_mut(g.q)).enumerate().take(g.p) {
            let (r0, r1) = (&xp[2 * i * g.w..2 * i * g.w + 2 * g.q], &xp[(2 * i + 1) * g.w..(2 * i + 1) * g.w + 2 * g.q]);
            let row = (2 * i * g.w) as u32;
            for (j, (((o, a), p0), p1)) in o.iter_mut().zip(a.iter_mut()).zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)).enumerate().skip(from) {
                let at = row + 2 * j as u32;
                let (mut bv, mut bi) = (p0[0], at);
                pick(p0[1], at + 1, &mut bv, &mut bi);
                pick(p1[0], at + w, &mut bv, &mut bi);
                pick(p1[1], at + w + 1, &mut bv, &mut bi);
                *o = bv;
                *a = bi;
            }
        }
    }
}

fn avg_divisor(g: &PoolGeom, rows: &std::ops::Range<usize>, cols: &std::ops::Range<usize>, size: usize) -> usize {
    if g.count_include_pad {
        size
    } else {
        rows.len() * cols.len()
    }
}

impl PoolGeom {
    /// 2x2 windows at stride 2 with no padding: every window is whole, so the pooling
    /// kernels take loops without window arithmetic.
    pub fn is_2x2(&self) -> bool {
        self.kernel == (2, 2) && self.stride == (2, 2) && self.pad == (0, 0, 0, 0) && 2 * self.p <= self.h && 2 * self.q <= self.w
    }
}

/// Average of 2x2 windows at stride 2 over whole planes (`x` holds as many input planes as
/// `y` output planes): one call per task, so small planes cost no call each; f32 on AVX2
/// machines by the shuffles of `x86`.
pub(crate) fn avg_2x2<T: Elem>(g: &PoolGeom, x: &[T], y: &mut [T]) {
    if !x86::avg_2x2(g, x, y) {
        avg_2x2_portable(g, x, y);
    }
}

crate::multiversion! {
    /// [`avg_2x2`] for any element type.
    fn avg_2x2_portable<T: Elem>(g: &PoolGeom, x: &[T], y: &mut [T]) {
        let quarter = T::c(0.25);
        for (out, xp) in y.chunks_exact_mut(g.p * g.q).zip(x.chunks_exact(g.h * g.w)) {
            for (i, o) in out.chunks_exact_mut(g.q).enumerate() {
                let (r0, r1) = (&xp[2 * i * g.w..2 * i * g.w + 2 * g.q], &xp[(2 * i + 1) * g.w..(2 * i + 1) * g.w + 2 * g.q]);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = (r0[2 * j] + r0[2 * j + 1] + r1[2 * j] + r1[2 * j + 1]) * quarter;
                }
            }
        }
    }
}

/// Hand-vectorised 2x2 average and max pooling (f32 on AVX2 machines).
mod x86 {
    use super::PoolGeom;
    use stride_tensor::Elem;

    /// [`super::max_window`] over one plane when `T` is f32, the CPU has AVX2 and windows
    /// step 1 or 2 columns (ResNet's and GoogLeNet's 3x3 pools, at stride 2 and 1): eight
    /// outputs of a row at a time, every tap of their windows a (masked) load; taps in the
    /// padding read as -inf, which never wins, so the windows are the scalar loop's, in its
    /// order. False (nothing written) otherwise.
    pub(super) fn max_window<T: Elem>(g: &PoolGeom, x: &[T], y: &mut [T], arg: &mut [u32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let (Some(x), Some(y)) = (crate::simd::as_f32(x), crate::simd::as_f32_mut(y)) {
            if crate::simd::has_avx2() && matches!(g.stride.1, 1 | 2) && g.h * g.w + 2 * g.kernel.1 < 1 << 31 && g.q * g.stride.1 < 1 << 30 {
                // SAFETY: the CPU has AVX2 (checked just above).
                unsafe { max_window_avx2(g, x, y, arg) };
                return true;
            }
        }
        let _ = (g, x, y, arg);
        false
    }

    /// The even and the odd lanes of two 8-wide loads `a`, `b` (16 neighbouring columns), in
    /// order: shuffled within 128-bit lanes, then the middle quads put in place.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    fn even_odd(a: std::arch::x86_64::__m256, b: std::arch::x86_64::__m256) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        let even = _mm256_castps_pd(_mm256_shuffle_ps::<0b10_00_10_00>(a, b));
        let odd = _mm256_castps_pd(_mm256_shuffle_ps::<0b11_01_11_01>(a, b));
        (_mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(even)), _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(odd)))
    }

    /// Lane by lane, `v` (at input index `at`) replaces the best so far (`bv` at `bi`) if it
    /// is greater, or a NaN over a number: `better` of the scalar loop.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    fn keep_better(
        bv: &mut std::arch::x86_64::__m256,
        bi: &mut std::arch::x86_64::__m256i,
        v: std::arch::x86_64::__m256,
        at: std::arch::x86_64::__m256i,
    ) {
        use std::arch::x86_64::*;
        let nan_over = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(*bv, *bv), _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let take = _mm256_or_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, *bv), nan_over);
        *bv = _mm256_blendv_ps(*bv, v, take);
        *bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(*bi), _mm256_castsi256_ps(at), take));
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn max_window_avx2(g: &PoolGeom, xp: &[f32], out: &mut [f32], arg: &mut [u32]) {
        use std::arch::x86_64::*;
        let (s, kw, w) = (g.stride.1, g.kernel.1, g.w);
        assert!(xp.len() >= g.h * w && out.len() >= g.p * g.q && arg.len() >= g.p * g.q, "max_window: lengths");
        // SAFETY: rows are inside the image (`g.window` clips them); a plain load reads
        // columns c0..c0 + 8s within 0..w of its row; any other load is masked to lanes whose
        // column is inside 0..w, so masked-off lanes, whose addresses may lie outside the plane
        // (hence `wrapping_offset`), touch no memory; every store is masked to outputs
        // j0..j0 + n <= q of row i < p.
        unsafe {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let inside =
                |col: __m256i| _mm256_and_si256(_mm256_cmpgt_epi32(col, _mm256_set1_epi32(-1)), _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), col));
            let none = _mm256_set1_ps(f32::NEG_INFINITY);
            for i in 0..g.p {
                let (rows, _, _) = g.window(i, 0);
                for j0 in (0..g.q).step_by(8) {
                    let live = _mm256_cmpgt_epi32(_mm256_set1_epi32((g.q - j0).min(8) as i32), lanes);
                    // Each lane's first tap column (its window's left edge, maybe in the padding).
                    let first = (j0 * s) as isize - g.pad.2 as isize;
                    let left = _mm256_add_epi32(_mm256_set1_epi32(first as i32), _mm256_mullo_epi32(lanes, _mm256_set1_epi32(s as i32)));
                    let mut bv = none;
                    let mut bi = _mm256_add_epi32(_mm256_set1_epi32((rows.start * w) as i32), _mm256_max_epi32(left, _mm256_setzero_si256()));
                    for r in rows.clone() {
                        let row = xp.as_ptr().add(r * w);
                        let row_at = _mm256_set1_epi32((r * w) as i32);
                        for dc in 0..kw {
                            let col = _mm256_add_epi32(left, _mm256_set1_epi32(dc as i32));
                            let ok = _mm256_and_si256(inside(col), live);
                            let c0 = first + dc as isize;
                            // Inside the row (most of a wide image): plain loads.
                            let plain = c0 >= 0 && c0 as usize + 8 * s <= w;
                            let v = if plain && s == 1 {
                                _mm256_loadu_ps(row.offset(c0))
                            } else if plain {
                                even_odd(_mm256_loadu_ps(row.offset(c0)), _mm256_loadu_ps(row.offset(c0 + 8))).0
                            } else if s == 1 {
                                _mm256_maskload_ps(row.wrapping_offset(c0), ok)
                            } else {
                                // Sixteen neighbouring columns, masked to the image; the even
                                // ones are the eight windows' taps.
                                let raw = |from: isize| {
                                    let cols = _mm256_add_epi32(_mm256_set1_epi32(from as i32), lanes);
                                    _mm256_maskload_ps(row.wrapping_offset(from), inside(cols))
                                };
                                even_odd(raw(c0), raw(c0 + 8)).0
                            };
                            let v = _mm256_blendv_ps(none, v, _mm256_castsi256_ps(ok));
                            keep_better(&mut bv, &mut bi, v, _mm256_add_epi32(row_at, col));
                        }
                    }
                    let o = i * g.q + j0;
                    _mm256_maskstore_ps(out.as_mut_ptr().add(o), live, bv);
                    _mm256_maskstore_epi32(arg.as_mut_ptr().add(o).cast(), live, bi);
                }
            }
        }
    }

    /// [`super::max_2x2`] when `T` is f32 and the CPU has AVX2: how many columns of every row
    /// it wrote (all, or 0 when it did nothing).
    pub(super) fn max_2x2<T: Elem>(g: &PoolGeom, x: &[T], y: &mut [T], arg: &mut [u32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if let (Some(x), Some(y)) = (crate::simd::as_f32(x), crate::simd::as_f32_mut(y)) {
            // Indices are i32 lanes: planes of up to 2^31 values.
            if crate::simd::has_avx2() && g.h * g.w < 1 << 31 {
                // SAFETY: the CPU has AVX2 (checked just above).
                unsafe { max_2x2_avx2(g, x, y, arg) };
                return g.q;
            }
        }
        let _ = (g, x, y, arg);
        0
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn max_2x2_avx2(g: &PoolGeom, xp: &[f32], out: &mut [f32], arg: &mut [u32]) {
        use std::arch::x86_64::*;
        let (groups, rest) = (g.q / 8, g.q % 8);
        assert!(xp.len() >= g.h * g.w && out.len() >= g.p * g.q && arg.len() >= g.p * g.q && 2 * g.p <= g.h && 2 * g.q <= g.w, "max_2x2: lengths");
        // SAFETY: output row i, group k reads input columns 16k..16k + 16 <= 2q <= w of rows
        // 2i and 2i + 1 < h (asserted), and writes outputs i*q + 8k..i*q + 8k + 8 <= p*q; the
        // last, partial group loads and stores only the lanes of columns below 2q and outputs
        // below q (masked: the other lanes touch no memory).
        unsafe {
            // Lanes below `n` (0..=8) on: a mask for the masked loads and stores.
            let below = |n: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let (load_a, load_b, store) = (below((2 * rest).min(8)), below((2 * rest).saturating_sub(8)), below(rest));
            let lanes = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
            let (one, w) = (_mm256_set1_epi32(1), _mm256_set1_epi32(g.w as i32));
            for i in 0..g.p {
                let (r0, r1) = (xp.as_ptr().add(2 * i * g.w), xp.as_ptr().add((2 * i + 1) * g.w));
                for k in 0..groups + usize::from(rest > 0) {
                    let c = 16 * k;
                    let whole = k < groups;
                    let load = |r: *const f32| {
                        if whole {
                            (_mm256_loadu_ps(r.add(c)), _mm256_loadu_ps(r.add(c + 8)))
                        } else {
                            (_mm256_maskload_ps(r.add(c), load_a), _mm256_maskload_ps(r.add(c + 8), load_b))
                        }
                    };
                    let ((a0, b0), (a1, b1)) = (load(r0), load(r1));
                    let ((p00, p01), (p10, p11)) = (even_odd(a0, b0), even_odd(a1, b1));
                    let at = _mm256_add_epi32(_mm256_set1_epi32((2 * i * g.w + c) as i32), lanes);
                    let (mut bv, mut bi) = (p00, at);
                    keep_better(&mut bv, &mut bi, p01, _mm256_add_epi32(at, one));
                    keep_better(&mut bv, &mut bi, p10, _mm256_add_epi32(at, w));
                    keep_better(&mut bv, &mut bi, p11, _mm256_add_epi32(_mm256_add_epi32(at, w), one));
                    let o = i * g.q + 8 * k;
                    if whole {
                        _mm256_storeu_ps(out.as_mut_ptr().add(o), bv);
                        _mm256_storeu_si256(arg.as_mut_ptr().add(o).cast(), bi);
                    } else {
                        _mm256_maskstore_ps(out.as_mut_ptr().add(o), store, bv);
                        _mm256_maskstore_epi32(arg.as_mut_ptr().add(o).cast(), store, bi);
                    }
                }
            }
        }
    }

    /// [`super::avg_2x2`] when `T` is f32 and the CPU has AVX2; false (nothing written)
    /// otherwise.
    pub(super) fn avg_2x2<T: Elem>(g: &PoolGeom, x: &[T], y: &mut [T]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let (Some(x), Some(y)) = (crate::simd::as_f32(x), crate::simd::as_f32_mut(y)) {
            if crate::simd::has_avx2() {
                // SAFETY: the CPU has AVX2 (checked just above).
                unsafe { avg_2x2_avx2(g, x, y) };
                return true;
            }
        }
        let _ = (g, x, y);
        false
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avg_2x2_avx2(g: &PoolGeom, x: &[f32], y: &mut [f32]) {
        for (out, xp) in y.chunks_exact_mut(g.p * g.q).zip(x.chunks_exact(g.h * g.w)) {
            for (i, o) in out.chunks_exact_mut(g.q).enumerate() {
                let (r0, r1) = (&xp[2 * i * g.w..2 * i * g.w + 2 * g.q], &xp[(2 * i + 1) * g.w..(2 * i + 1) * g.w + 2 * g.q]);
                row(r0, r1, o);
            }
        }
    }

    /// `out[j] = (r0[2j] + r0[2j+1] + r1[2j] + r1[2j+1]) / 4`, `r0` and `r1` twice as long
    /// as `out`: groups of eight outputs, then one of four, then one by one.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn row(r0: &[f32], r1: &[f32], out: &mut [f32]) {
        use std::arch::x86_64::*;
        assert!(r0.len() == 2 * out.len() && r1.len() == r0.len(), "avg_2x2 row: lengths");
        let groups = out.len() / 8;
        // SAFETY (both blocks): the CPU has AVX2 (the caller's target feature); group g reads
        // values 16g..16g + 16 < 2 * 8 * groups <= r0.len() = r1.len() and writes outputs
        // 8g..8g + 8 <= out.len(); the group of four reads 2 * at..2 * at + 8 <= r0.len()
        // and writes at..at + 4 <= out.len() (checked before it).
        unsafe {
            let quarter = _mm256_set1_ps(0.25);
            for g in 0..groups {
                let x = 16 * g;
                let s0 = _mm256_add_ps(_mm256_loadu_ps(r0.as_ptr().add(x)), _mm256_loadu_ps(r1.as_ptr().add(x)));
                let s1 = _mm256_add_ps(_mm256_loadu_ps(r0.as_ptr().add(x + 8)), _mm256_loadu_ps(r1.as_ptr().add(x + 8)));
                // Pair sums per 128-bit lane: s0 01 23, s1 01 23 | s0 45 67, s1 45 67; then the
                // middle two quads swap places to put them in order.
                let pairs = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(_mm256_hadd_ps(s0, s1)));
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * g), _mm256_mul_ps(_mm256_castpd_ps(pairs), quarter));
            }
        }
        let mut at = 8 * groups;
        if out.len() - at >= 4 {
            // SAFETY: see above.
            unsafe {
                let s = _mm256_add_ps(_mm256_loadu_ps(r0.as_ptr().add(2 * at)), _mm256_loadu_ps(r1.as_ptr().add(2 * at)));
                // s 01 23 01 23 | s 45 67 45 67: quads 0 and 2 are the four sums in order.
                let pairs = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(_mm256_hadd_ps(s, s)));
                let four = _mm256_castps256_ps128(_mm256_castpd_ps(pairs));
                _mm_storeu_ps(out.as_mut_ptr().add(at), _mm_mul_ps(four, _mm_set1_ps(0.25)));
            }
            at += 4;
        }
        for j in at..out.len() {
            out[j] = (r0[2 * j] + r0[2 * j + 1] + r1[2 * j] + r1[2 * j + 1]) * 0.25;
        }
    }
}

crate::multiversion! {
    /// The input gradient of [`avg_2x2`] over one plane: a quarter of each output's gradient
    /// to each of its four inputs (rows and columns past the last window get none).
    fn avg_2x2_backward<T: Elem>(g: &PoolGeom, dyp: &[T], dxp: &mut [T]) {
        let quarter = T::c(0.25);
        for (i, d) in dyp.chunks_exact(g.q).enumerate() {
            for r in 2 * i..2 * i + 2 {
                let row = &mut dxp[r * g.w..r * g.w + 2 * g.q];
                for (j, &v) in d.iter().enumerate() {
                    row[2 * j] = v * quarter;
                    row[2 * j + 1] = v * quarter;
                }
            }
        }
    }
}

pub fn avg_forward<T: Elem>(g: &PoolGeom, x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); g.n * g.c * g.p * g.q];
    avg_forward_into(g, x, &mut y);
    y
}

/// [`avg_forward`] into the caller's buffer (planned execution).
pub fn avg_forward_into<T: Elem>(g: &PoolGeom, x: &[T], y: &mut [T]) {
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    assert!(x.len() == g.n * g.c * hw && y.len() == g.n * g.c * pq, "avg_forward_into: lengths");
    if g.is_2x2() {
        if hw > 0 && pq > 0 {
            let per = planes_per_task(hw, pq);
            y.par_chunks_mut(per * pq).zip(x.par_chunks(per * hw)).for_each(|(out, xs)| avg_2x2(g, xs, out));
        }
        return;
    }
    planes(x, hw, y, pq, |out, xp| {
        for i in 0..g.p {
            for j in 0..g.q {
                let (rows, cols, size) = g.window(i, j);
                let div = avg_divisor(g, &rows, &cols, size);
                let mut acc = T::zero();
                for r in rows {
                    acc += xp[r * g.w + cols.start..r * g.w + cols.end].iter().copied().sum::<T>();
                }
                out[i * g.q + j] = acc / T::c(div as f64);
            }
        }
    });
}

pub fn avg_backward<T: Elem>(g: &PoolGeom, dy: &[T]) -> Vec<T> {
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    if g.is_2x2() && hw > 0 && pq > 0 {
        // Each task's planes zeroed by the thread that writes them (see `simd::par_filled`).
        let per = planes_per_task(pq, hw);
        return crate::simd::par_filled(g.n * g.c * hw, per * hw, |i, dxs| {
            for (dxp, dyp) in dxs.chunks_mut(hw).zip(dy[i * per * pq..].chunks(pq)) {
                avg_2x2_backward(g, dyp, dxp);
            }
        });
    }
    let mut dx = vec![T::zero(); g.n * g.c * hw];
    avg_backward_adding(g, dy, &mut dx);
    dx
}

/// [`avg_backward`] into the caller's `dx` (overwritten; a plan's buffer), with no allocation.
pub fn avg_backward_into<T: Elem>(g: &PoolGeom, dy: &[T], dx: &mut [T]) {
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    assert!(dy.len() == g.n * g.c * pq && dx.len() == g.n * g.c * hw, "avg_backward_into: lengths");
    if g.is_2x2() && hw > 0 && pq > 0 {
        // Rows and columns past the last window get no gradient: zeroed where there are any.
        let whole = g.h == 2 * g.p && g.w == 2 * g.q;
        let per = planes_per_task(pq, hw);
        dx.par_chunks_mut(per * hw).zip(dy.par_chunks(per * pq)).for_each(|(dxs, dys)| {
            for (dxp, dyp) in dxs.chunks_mut(hw).zip(dys.chunks(pq)) {
                if !whole {
                    dxp.fill(T::zero());
                }
                avg_2x2_backward(g, dyp, dxp);
            }
        });
        return;
    }
    dx.fill(T::zero());
    avg_backward_adding(g, dy, dx);
}

/// Adds each window's share of its output gradient to `dx` (any window, padding, divisor).
fn avg_backward_adding<T: Elem>(g: &PoolGeom, dy: &[T], dx: &mut [T]) {
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    planes(dy, pq, dx, hw, |dxp, dyp| {
        for i in 0..g.p {
            for j in 0..g.q {
                let (rows, cols, size) = g.window(i, j);
                let v = dyp[i * g.q + j] / T::c(avg_divisor(g, &rows, &cols, size) as f64);
                for r in rows {
                    for d in &mut dxp[r * g.w + cols.start..r * g.w + cols.end] {
                        *d += v;
                    }
                }
            }
        }
    });
}

/// Lp (power-average) pooling: y = (sum over the window of |x|^p)^(1/p); padding adds 0.
pub fn lp_forward<T: Elem>(g: &PoolGeom, x: &[T], p: T) -> Vec<T> {
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    let mut y = vec![T::zero(); g.n * g.c * pq];
    planes(x, hw, &mut y, pq, |out, xp| {
        for i in 0..g.p {
            for j in 0..g.q {
                let (rows, cols, _) = g.window(i, j);
                let mut acc = T::zero();
                for r in rows {
                    for &v in &xp[r * g.w + cols.start..r * g.w + cols.end] {
                        acc += v.abs().powf(p);
                    }
                }
                out[i * g.q + j] = acc.powf(T::one() / p);
            }
        }
    });
    y
}

/// dx = dy * sign(x) |x|^(p-1) / y^(p-1); zero where the window's norm is zero.
pub fn lp_backward<T: Elem>(g: &PoolGeom, x: &[T], y: &[T], dy: &[T], p: T) -> Vec<T> {
    let (hw, pq) = (g.h * g.w, g.p * g.q);
    let mut dx = vec![T::zero(); g.n * g.c * hw];
    if hw == 0 || pq == 0 {
        return dx;
    }
    let pm1 = p - T::one();
    dx.par_chunks_mut(hw).zip(x.par_chunks(hw)).zip(y.par_chunks(pq).zip(dy.par_chunks(pq))).for_each(|((dxp, xp), (yp, dyp))| {
        for i in 0..g.p {
            for j in 0..g.q {
                let yv = yp[i * g.q + j];
                if yv == T::zero() {
                    continue;
                }
                let scale = dyp[i * g.q + j] / yv.powf(pm1);
                let (rows, cols, _) = g.window(i, j);
                for r in rows {
                    for c in cols.clone() {
                        let v = xp[r * g.w + c];
                        dxp[r * g.w + c] += scale * v.signum() * v.abs().powf(pm1);
                    }
                }
            }
        }
    });
    dx
}

/// Adaptive pooling bins: output i covers [floor(i*H/P), ceil((i+1)*H/P)).
#[inline]
pub fn adaptive_bin(i: usize, input: usize, out: usize) -> std::ops::Range<usize> {
    (i * input / out)..((i + 1) * input).div_ceil(out)
}

/// Checks the target size of an adaptive pool.
pub fn adaptive_check(op: &'static str, x: &[usize], out: (usize, usize)) -> Result<[usize; 4]> {
    let d = nchw(op, x)?;
    if out.0 == 0 || out.1 == 0 || d[2] == 0 || d[3] == 0 {
        return Err(Error::arg(op, format!("output size {out:?} and input size {:?} must be non-zero", (d[2], d[3]))));
    }
    Ok(d)
}

/// Adaptive average pooling of [N, C, H, W] to [N, C, P, Q].
pub fn adaptive_avg_forward<T: Elem>(x: &[T], d: [usize; 4], out: (usize, usize)) -> Vec<T> {
    let [n, c, _, _] = d;
    let mut y = vec![T::zero(); n * c * out.0 * out.1];
    adaptive_avg_forward_into(x, d, out, &mut y);
    y
}

/// [`adaptive_avg_forward`] into the caller's buffer (planned execution), which it overwrites.
/// Plane by plane, so it runs unchanged on a plan's batch-blocked layout.
pub fn adaptive_avg_forward_into<T: Elem>(x: &[T], d: [usize; 4], out: (usize, usize), y: &mut [T]) {
    let [n, c, h, w] = d;
    let (p, q) = out;
    assert!(x.len() == n * c * h * w && y.len() == n * c * p * q, "adaptive_avg_forward_into: lengths");
    if (p, q) == (1, 1) && h * w > 0 {
        // Global pooling: each plane's mean, many planes to a call.
        let per = planes_per_task(h * w, 1);
        y.par_chunks_mut(per).zip(x.par_chunks(per * h * w)).for_each(|(o, xs)| plane_means(xs, h * w, o));
        return;
    }
    planes(x, h * w, y, p * q, |o, xp| {
        for i in 0..p {
            let rows = adaptive_bin(i, h, p);
            for j in 0..q {
                let cols = adaptive_bin(j, w, q);
                let cnt = T::c((rows.len() * cols.len()) as f64);
                // Whole rows are one run of memory (global pooling: the whole plane).
                let s: T = if cols.len() == w {
                    block_sum(&xp[rows.start * w..rows.end * w])
                } else {
                    rows.clone().map(|r| block_sum(&xp[r * w + cols.start..r * w + cols.end])).sum()
                };
                o[i * q + j] = s / cnt;
            }
        }
    });
}

crate::multiversion! {
    /// `out[i]` = the mean of plane `i` of `x` (planes of `hw` values), summed by [`block_sum`].
    fn plane_means<T: Elem>(x: &[T], hw: usize, out: &mut [T]) {
        let cnt = T::c(hw as f64);
        for (o, plane) in out.iter_mut().zip(x.chunks_exact(hw)) {
            *o = block_sum(plane) / cnt;
        }
    }
}

pub fn adaptive_avg_backward<T: Elem>(dy: &[T], d: [usize; 4], out: (usize, usize)) -> Vec<T> {
    let [n, c, h, w] = d;
    let (p, q) = out;
    let mut dx = vec![T::zero(); n * c * h * w];
    planes(dy, p * q, &mut dx, h * w, |dxp, dyp| {
        for i in 0..p {
            let rows = adaptive_bin(i, h, p);
            for j in 0..q {
                let cols = adaptive_bin(j, w, q);
                let v = dyp[i * q + j] / T::c((rows.len() * cols.len()) as f64);
                for r in rows.clone() {
                    for dd in &mut dxp[r * w + cols.start..r * w + cols.end] {
                        *dd += v;
                    }
                }
            }
        }
    });
    dx
}

/// Adaptive max pooling; returns the values and each maximum's flat index in its plane.
pub fn adaptive_max_forward<T: Elem>(x: &[T], d: [usize; 4], out: (usize, usize)) -> (Vec<T>, Vec<u32>) {
    let [n, c, h, w] = d;
    let (p, q) = out;
    let mut y = vec![(T::zero(), 0u32); n * c * p * q];
    planes(x, h * w, &mut y, p * q, |o, xp| {
        for i in 0..p {
            let rows = adaptive_bin(i, h, p);
            for j in 0..q {
                let cols = adaptive_bin(j, w, q);
                let mut best = (T::neg_infinity(), (rows.start * w + cols.start) as u32);
                for r in rows.clone() {
                    for cc in cols.clone() {
                        let v = xp[r * w + cc];
                        if v > best.0 || (v.is_nan() && !best.0.is_nan()) {
                            best = (v, (r * w + cc) as u32);
                        }
                    }
                }
                o[i * q + j] = best;
            }
        }
    });
    y.into_iter().unzip()
}

/// Scatters output gradients to the recorded positions: [N*C planes of `pq`] -> planes of `hw`.
/// Each task zeroes its planes just before it scatters into them, on its own thread, rather
/// than the caller zeroing the whole buffer first in one serial pass.
pub fn scatter_planes<T: Elem>(dy: &[T], idx: &[u32], planes: usize, pq: usize, hw: usize) -> Vec<T> {
    if hw == 0 || pq == 0 {
        return vec![T::zero(); planes * hw];
    }
    let per = planes_per_task(hw, pq);
    crate::simd::par_filled(planes * hw, per * hw, |task, dxs| scatter_chunk(dxs, &dy[task * per * pq..], &idx[task * per * pq..], pq, hw))
}

/// [`scatter_planes`] into `dx` (overwritten: a plan's buffer), with no allocation.
pub fn scatter_planes_into<T: Elem>(dy: &[T], idx: &[u32], planes: usize, pq: usize, hw: usize, dx: &mut [T]) {
    assert!(dy.len() == planes * pq && idx.len() == dy.len() && dx.len() == planes * hw, "scatter_planes_into: lengths");
    if hw == 0 || pq == 0 {
        dx.fill(T::zero());
        return;
    }
    let per = planes_per_task(hw, pq);
    dx.par_chunks_mut(per * hw).zip(dy.par_chunks(per * pq).zip(idx.par_chunks(per * pq))).for_each(|(dxs, (dys, is))| {
        dxs.fill(T::zero());
        scatter_chunk(dxs, dys, is, pq, hw);
    });
}

/// Adds each plane's output gradients `dys` into the input positions `is` of its plane of
/// `dxs` (windows may share inputs).
fn scatter_chunk<T: Elem>(dxs: &mut [T], dys: &[T], is: &[u32], pq: usize, hw: usize) {
    for (dxp, (dyp, ip)) in dxs.chunks_mut(hw).zip(dys.chunks(pq).zip(is.chunks(pq))) {
        for (&d, &i) in dyp.iter().zip(ip) {
            dxp[i as usize] += d;
        }
    }
}

/// Checks channel max pooling of `shape` with a window of `depth` channels moved by `stride`:
/// the input as [N, C, H, W] and the number of output channels.
pub fn channel_max_check(op: &'static str, shape: &[usize], depth: usize, stride: usize) -> Result<([usize; 4], usize)> {
    let d = nchw(op, shape)?;
    if depth == 0 || stride == 0 {
        return Err(Error::arg(op, format!("depth {depth} and stride {stride} must be at least 1")));
    }
    if depth > d[1] {
        return Err(Error::geometry(op, format!("depth window {depth} is larger than the {} channels", d[1])));
    }
    Ok((d, (d[1] - depth) / stride + 1))
}

/// Channel (depth-window) max pooling, TensorFlow's `max_pool` with a window over channels:
/// output channel j is the maximum of input channels j*stride .. j*stride + depth.
/// Returns the values and the winning channel of each output.
pub fn channel_max_forward<T: Elem>(x: &[T], d: [usize; 4], depth: usize, stride: usize) -> (Vec<T>, Vec<u32>) {
    let [n, c, h, w] = d;
    let hw = h * w;
    let co = (c - depth) / stride + 1;
    let mut vals = vec![T::zero(); n * co * hw];
    let mut idx = vec![0u32; n * co * hw];
    for b in 0..n {
        for j in 0..co {
            let o = (b * co + j) * hw;
            let first = (b * c + j * stride) * hw;
            vals[o..o + hw].copy_from_slice(&x[first..first + hw]);
            idx[o..o + hw].fill((j * stride) as u32);
            for ch in j * stride + 1..j * stride + depth {
                let src = &x[(b * c + ch) * hw..(b * c + ch + 1) * hw];
                for ((v, i), &s) in vals[o..o + hw].iter_mut().zip(&mut idx[o..o + hw]).zip(src) {
                    if s > *v || (s.is_nan() && !v.is_nan()) {
                        *v = s;
                        *i = ch as u32;
                    }
                }
            }
        }
    }
    (vals, idx)
}

pub fn channel_max_backward<T: Elem>(dy: &[T], idx: &[u32], d: [usize; 4], co: usize) -> Vec<T> {
    let [n, c, h, w] = d;
    let hw = h * w;
    let mut dx = vec![T::zero(); n * c * hw];
    for b in 0..n {
        for j in 0..co {
            for pix in 0..hw {
                let o = (b * co + j) * hw + pix;
                dx[(b * c + idx[o] as usize) * hw + pix] += dy[o];
            }
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plane of `len` values that a max pool finds hard to get right: ties (small integers),
    /// -inf and, for every third seed, NaNs.
    fn awkward(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let r = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 24;
                match r % 17 {
                    0 if seed.is_multiple_of(3) => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    _ => (r % 4) as f32 - 1.0,
                }
            })
            .collect()
    }

    /// The vector window loop (f32, AVX2: column strides 1 and 2) against the scalar one over
    /// kernels, strides, paddings and ceil mode, with ties, -inf and NaNs: the same values and
    /// indices.
    #[test]
    fn the_vector_window_loop_equals_the_scalar_one() {
        let mut cases = 0;
        for (k, s, pad, ceil) in [
            (3, 2, 1, false),
            (3, 2, 0, true),
            (3, 1, 1, false),
            (2, 1, 0, false),
            (3, 2, 0, false),
            (4, 2, 2, true),
            (1, 2, 0, false),
            (3, 3, 1, false),
            (2, 2, 1, false),
        ] {
            for (h, w) in [(7, 7), (12, 9), (5, 23), (3, 40), (8, 17)] {
                let o = Pool2dOptions::new(k).stride(s).padding(Padding::Explicit { top: pad, bottom: pad, left: pad, right: pad }).ceil_mode(ceil);
                let Ok(g) = PoolGeom::new("max_pool2d", &[1, 1, h, w], &o) else { continue };
                for seed in 0..6u32 {
                    let x = awkward(h * w, seed);
                    let pq = g.p * g.q;
                    let (mut fast, mut slow) = (vec![0.0f32; pq], vec![0.0f32; pq]);
                    let (mut fa, mut sa) = (vec![0u32; pq], vec![0u32; pq]);
                    max_window(&g, &x, &mut slow, &mut sa);
                    if !x86::max_window(&g, &x, &mut fast, &mut fa) {
                        assert!(s > 2 || !crate::simd::has_avx2(), "stride {s} took the scalar loop");
                        continue;
                    }
                    cases += 1;
                    assert_eq!(fa, sa, "k{k} s{s} pad {pad} ceil {ceil} {h}x{w} seed {seed}: indices");
                    assert!(fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()), "k{k} s{s} pad {pad} {h}x{w} seed {seed}: values");
                }
            }
        }
        assert!(cases > 0 || !crate::simd::has_avx2());
    }

    /// The 2x2 fast path against the general window loop: ties (small integers), NaNs and
    /// odd sizes (a last row or column no window covers) give the same values and indices.
    #[test]
    fn max_2x2_equals_the_window_loop_with_ties_and_nans() {
        for (h, w) in [(2, 2), (4, 6), (5, 7), (28, 28), (14, 15), (3, 33), (4, 16), (3, 35), (6, 66)] {
            let g = PoolGeom::new("max_pool2d", &[1, 1, h, w], &Pool2dOptions::new(2)).unwrap();
            assert!(g.is_2x2());
            for seed in 0..20u32 {
                let x = awkward(h * w, seed);
                let (pq, mut fast, mut slow) = (g.p * g.q, Vec::new(), Vec::new());
                let (mut fa, mut sa) = (vec![0u32; pq], vec![0u32; pq]);
                fast.resize(pq, 0.0f32);
                slow.resize(pq, 0.0f32);
                max_window(&g, &x, &mut slow, &mut sa);
                // The vector path (on AVX2 machines, rows of 8 windows or more) and the
                // portable one alone.
                for vector in [true, false] {
                    if vector {
                        max_2x2(&g, &x, &mut fast, &mut fa);
                    } else {
                        max_2x2_portable(&g, &x, &mut fast, &mut fa, 0);
                    }
                    assert_eq!(fa, sa, "{h}x{w} seed {seed} (vector {vector}): indices");
                    assert!(fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()), "{h}x{w} seed {seed} (vector {vector}): values");
                }
            }
        }
    }
}
