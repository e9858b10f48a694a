//! AVX2 + FMA kernels for the common direct layers: a 3x3 or 5x5 window, stride and dilation
//! 1, f32, over maps at least 8 wide (MobileNet's and Xception's depthwise layers, B3's c6 and
//! c1, LeNet's first layer). The portable kernels of `depthwise.rs` serve every other case;
//! the compiler did not keep their accumulators in registers for these (it spilled and
//! shuffled), so the register tiles are written out.
//!
//! Both kernels read a zero-bordered plane `src` of row length `width >= cols + k - 1` with at
//! least `rows + k - 1` rows and 7 values of slack after the last: output (i, j) reads
//! `src[(i + r) * width + j + s]` for r, s < k.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Window sizes with a kernel here.
pub(super) fn handles(k: usize) -> bool {
    k == 3 || k == 5
}

/// Whether the kernels below run on this CPU.
pub(super) fn available() -> bool {
    crate::simd::has_avx2_fma()
}

/// The checks that make every pointer access below stay inside `src`, `other` and `out`.
fn check(k: usize, rows: usize, cols: usize, src: &[f32], width: usize, other: usize, out: usize) {
    assert!(handles(k), "direct tiles: no kernel for a {k}x{k} window");
    assert!(cols >= 8 && width >= cols + k - 1, "{k}x{k} tiles need cols >= 8 and width >= cols + {}, got {cols}, {width}", k - 1);
    // The last tile of a row may read up to 7 values past the row (masked off afterwards).
    assert!(
        rows == 0 || src.len() >= (rows + k - 2) * width + cols + k - 1 + 7,
        "{k}x{k} tiles: bordered plane of {} values is too short",
        src.len()
    );
    assert!(other >= rows * cols && out >= rows * cols, "{k}x{k} tiles: planes shorter than {rows} x {cols}");
}

/// out[i, j] = bias + sum_{r,s} taps[r, s] * src[(i + r) * width + j + s] for a `k` x `k`
/// window ([`handles`]), added to what `out` holds when `accumulate`. `None` when the CPU
/// lacks AVX2 or FMA.
#[allow(clippy::too_many_arguments)]
pub(super) fn correlate(
    k: usize,
    rows: usize,
    cols: usize,
    src: &[f32],
    width: usize,
    taps: &[f32],
    bias: f32,
    accumulate: bool,
    out: &mut [f32],
) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        check(k, rows, cols, src, width, out.len(), out.len());
        assert_eq!(taps.len(), k * k, "direct tiles: taps");
        // SAFETY: the CPU has AVX2 and FMA (checked above), and `check` bounds every access.
        unsafe {
            let (src, out) = (src.as_ptr(), out.as_mut_ptr());
            match (k, accumulate) {
                (3, false) => x86::correlate::<3, false>(rows, cols, src, width, taps, bias, out),
                (3, true) => x86::correlate::<3, true>(rows, cols, src, width, taps, bias, out),
                (_, false) => x86::correlate::<5, false>(rows, cols, src, width, taps, bias, out),
                (_, true) => x86::correlate::<5, true>(rows, cols, src, width, taps, bias, out),
            }
        }
        return Some(());
    }
    None
}

/// dw[r, s] += sum_{i,j} dy[i, j] * src[(i + r) * width + j + s]. `None` when the CPU lacks
/// AVX2 or FMA.
pub(super) fn filter_grad(k: usize, rows: usize, cols: usize, dy: &[f32], src: &[f32], width: usize, dw: &mut [f32]) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        check(k, rows, cols, src, width, dy.len(), dy.len());
        assert_eq!(dw.len(), k * k, "direct tiles: filter gradient");
        // SAFETY: as above.
        unsafe {
            match k {
                3 => x86::filter_grad::<3, 3>(0, rows, cols, dy.as_ptr(), src.as_ptr(), width, dw),
                _ => {
                    // Two filter rows per pass (ten sums in registers), then the fifth.
                    x86::filter_grad::<5, 2>(0, rows, cols, dy.as_ptr(), src.as_ptr(), width, dw);
                    x86::filter_grad::<5, 2>(2, rows, cols, dy.as_ptr(), src.as_ptr(), width, dw);
                    x86::filter_grad::<5, 1>(4, rows, cols, dy.as_ptr(), src.as_ptr(), width, dw);
                }
            }
        }
        return Some(());
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// What every tile of one correlation shares: the input's row length, the taps broadcast
    /// (the first K*K of 25), the bias and the output's row length.
    #[derive(Clone, Copy)]
    struct Pass<'a> {
        width: usize,
        w: &'a [__m256; 25],
        bias: __m256,
        cols: usize,
    }

    /// `ROWS` output rows by `V` vectors of 8 columns of a `K` x `K` window, from `src` (input
    /// at the tile's first output) to `out`, added to `out` when `ACC`, only the lanes of
    /// `mask` when `MASKED` (V = 1): each input vector is loaded once per column shift and
    /// serves every output row it reaches. `w` holds the taps broadcast (the first K*K); for
    /// 3x3 they all stay in registers, for 5x5 most are read as memory operands.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const K: usize, const ROWS: usize, const V: usize, const ACC: bool, const MASKED: bool>(
        src: *const f32,
        out: *mut f32,
        p: &Pass,
        mask: __m256i,
    ) {
        let Pass { width, w, bias, cols } = *p;
        // SAFETY (all loads and stores here): within the planes and the slack, see `check`;
        // masked lanes are neither read nor written in `out`.
        let mut acc = [[bias; V]; ROWS];
        if ACC {
            for (t, a) in acc.iter_mut().enumerate() {
                for (v, a) in a.iter_mut().enumerate() {
                    let o = unsafe { out.add(t * cols + 8 * v) };
                    let old = if MASKED { unsafe { _mm256_maskload_ps(o, mask) } } else { unsafe { _mm256_loadu_ps(o) } };
                    *a = _mm256_add_ps(*a, old);
                }
            }
        }
        for u in 0..ROWS + K - 1 {
            for s in 0..K {
                for v in 0..V {
                    let x = unsafe { _mm256_loadu_ps(src.add(u * width + s + 8 * v)) };
                    for (t, a) in acc.iter_mut().enumerate() {
                        // Input row u meets output row t through filter row u - t.
                        if u >= t && u - t < K {
                            a[v] = _mm256_fmadd_ps(w[(u - t) * K + s], x, a[v]);
                        }
                    }
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            for (v, &a) in a.iter().enumerate() {
                let o = unsafe { out.add(t * cols + 8 * v) };
                if MASKED {
                    unsafe { _mm256_maskstore_ps(o, mask, a) };
                } else {
                    unsafe { _mm256_storeu_ps(o, a) };
                }
            }
        }
    }

    /// One band of `ROWS` output rows: tiles 16 columns wide, then 8, then a masked one for
    /// the last `cols % 8`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn band<const K: usize, const ROWS: usize, const ACC: bool>(src: *const f32, out: *mut f32, p: &Pass) {
        let (none, cols) = (_mm256_setzero_si256(), p.cols);
        let mut j = 0;
        while j + 16 <= cols {
            unsafe { tile::<K, ROWS, 2, ACC, false>(src.add(j), out.add(j), p, none) };
            j += 16;
        }
        if j + 8 <= cols {
            unsafe { tile::<K, ROWS, 1, ACC, false>(src.add(j), out.add(j), p, none) };
            j += 8;
        }
        if j < cols {
            unsafe { tile::<K, ROWS, 1, ACC, true>(src.add(j), out.add(j), p, first_lanes(cols - j)) };
        }
    }

    /// A mask with lanes `0..n` on.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn first_lanes(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn correlate<const K: usize, const ACC: bool>(
        rows: usize,
        cols: usize,
        src: *const f32,
        width: usize,
        taps: &[f32],
        bias: f32,
        out: *mut f32,
    ) {
        let w: [__m256; 25] = std::array::from_fn(|t| _mm256_set1_ps(taps.get(t).copied().unwrap_or(0.0)));
        let p = Pass { width, w: &w, bias: _mm256_set1_ps(bias), cols };
        let mut i = 0;
        while i + 2 <= rows {
            unsafe { band::<K, 2, ACC>(src.add(i * width), out.add(i * cols), &p) };
            i += 2;
        }
        if i < rows {
            unsafe { band::<K, 1, ACC>(src.add(i * width), out.add(i * cols), &p) };
        }
    }

    /// The sum of a vector's eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Filter rows `r0..r0 + RG` of the gradient: RG*K vector sums in registers, each fed by
    /// one load of dy and one of the input.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn filter_grad<const K: usize, const RG: usize>(
        r0: usize,
        rows: usize,
        cols: usize,
        dy: *const f32,
        src: *const f32,
        width: usize,
        dw: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); K]; RG];
        // The last `cols % 8` columns: dy read through a mask (zeros past the row), the input
        // unmasked (the slack covers it); the zero lanes add nothing.
        let mask = first_lanes(cols % 8);
        for i in 0..rows {
            // SAFETY (all reads here): within the planes and the slack, see `check`; masked
            // lanes of dy are not read.
            let (d, x) = unsafe { (dy.add(i * cols), src.add((i + r0) * width)) };
            let mut j = 0;
            while j < cols {
                let dv = if j + 8 <= cols { unsafe { _mm256_loadu_ps(d.add(j)) } } else { unsafe { _mm256_maskload_ps(d.add(j), mask) } };
                for (r, a) in acc.iter_mut().enumerate() {
                    for (s, a) in a.iter_mut().enumerate() {
                        let xv = unsafe { _mm256_loadu_ps(x.add(r * width + j + s)) };
                        *a = _mm256_fmadd_ps(dv, xv, *a);
                    }
                }
                j += 8;
            }
        }
        for r in 0..RG {
            for s in 0..K {
                dw[(r0 + r) * K + s] += hsum(acc[r][s]);
            }
        }
    }
}
