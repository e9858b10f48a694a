//! AVX2 + FMA kernels for the common depthwise layer: a 3x3 window, stride and dilation 1,
//! f32, over maps at least 8 wide (MobileNet, Xception, B3's c6). The portable kernels of
//! `depthwise.rs` serve every other case; the compiler did not keep their accumulators in
//! registers for this one (it spilled and shuffled), so the register tiles are written out.
//!
//! Both kernels read a zero-bordered plane `src` of row length `width >= cols + 2` with at
//! least `rows + 2` rows: output (i, j) reads `src[(i + r) * width + j + s]` for r, s < 3.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the kernels below run on this CPU.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The checks that make every pointer access below stay inside `src`, `other` and `out`.
fn check(rows: usize, cols: usize, src: &[f32], width: usize, other: usize, out: usize) {
    assert!(cols >= 8 && width >= cols + 2, "3x3 tiles need cols >= 8 and width >= cols + 2, got {cols}, {width}");
    assert!(src.len() >= (rows + 1) * width + cols + 2, "3x3 tiles: bordered plane of {} values is too short", src.len());
    assert!(other >= rows * cols && out >= rows * cols, "3x3 tiles: planes shorter than {rows} x {cols}");
}

/// out[i, j] = bias + sum_{r,s} taps[r, s] * src[(i + r) * width + j + s], every output
/// written (not accumulated). `None` when the CPU lacks AVX2 or FMA.
pub(super) fn correlate3x3(rows: usize, cols: usize, src: &[f32], width: usize, taps: &[f32; 9], bias: f32, out: &mut [f32]) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        check(rows, cols, src, width, out.len(), out.len());
        // SAFETY: the CPU has AVX2 and FMA (checked above), and `check` bounds every access.
        unsafe { x86::correlate3x3(rows, cols, src.as_ptr(), width, taps, bias, out.as_mut_ptr()) };
        return Some(());
    }
    None
}

/// dw[r, s] += sum_{i,j} dy[i, j] * src[(i + r) * width + j + s]. `None` when the CPU lacks
/// AVX2 or FMA.
pub(super) fn filter_grad3x3(rows: usize, cols: usize, dy: &[f32], src: &[f32], width: usize, dw: &mut [f32; 9]) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        check(rows, cols, src, width, dy.len(), dy.len());
        // SAFETY: as above.
        unsafe { x86::filter_grad3x3(rows, cols, dy.as_ptr(), src.as_ptr(), width, dw) };
        return Some(());
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// `ROWS` output rows by `V` vectors of 8 columns, from `src` (input at the tile's first
    /// output) to `out`: each input vector is loaded once per column shift and serves every
    /// output row it reaches; the nine taps and all accumulators stay in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const ROWS: usize, const V: usize>(src: *const f32, width: usize, w: &[__m256; 9], bias: __m256, out: *mut f32, cols: usize) {
        let mut acc = [[bias; V]; ROWS];
        for u in 0..ROWS + 2 {
            for s in 0..3 {
                for v in 0..V {
                    // SAFETY (all loads and stores here): within the planes, see `check`.
                    let x = unsafe { _mm256_loadu_ps(src.add(u * width + s + 8 * v)) };
                    for (t, a) in acc.iter_mut().enumerate() {
                        // Input row u meets output row t through filter row u - t.
                        if u >= t && u - t < 3 {
                            a[v] = _mm256_fmadd_ps(w[(u - t) * 3 + s], x, a[v]);
                        }
                    }
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            for (v, &a) in a.iter().enumerate() {
                unsafe { _mm256_storeu_ps(out.add(t * cols + 8 * v), a) };
            }
        }
    }

    /// One band of `ROWS` output rows: tiles 16 columns wide, then 8, then one 8 wide that
    /// ends at the last column (overlapping its neighbour: recomputed outputs are equal).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn band<const ROWS: usize>(src: *const f32, width: usize, w: &[__m256; 9], bias: __m256, out: *mut f32, cols: usize) {
        let mut j = 0;
        while j + 16 <= cols {
            unsafe { tile::<ROWS, 2>(src.add(j), width, w, bias, out.add(j), cols) };
            j += 16;
        }
        if j + 8 <= cols {
            unsafe { tile::<ROWS, 1>(src.add(j), width, w, bias, out.add(j), cols) };
            j += 8;
        }
        if j < cols {
            unsafe { tile::<ROWS, 1>(src.add(cols - 8), width, w, bias, out.add(cols - 8), cols) };
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn correlate3x3(rows: usize, cols: usize, src: *const f32, width: usize, taps: &[f32; 9], bias: f32, out: *mut f32) {
        let w: [__m256; 9] = std::array::from_fn(|t| _mm256_set1_ps(taps[t]));
        let bias = _mm256_set1_ps(bias);
        let mut i = 0;
        while i + 2 <= rows {
            unsafe { band::<2>(src.add(i * width), width, &w, bias, out.add(i * cols), cols) };
            i += 2;
        }
        if i < rows {
            unsafe { band::<1>(src.add(i * width), width, &w, bias, out.add(i * cols), cols) };
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

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn filter_grad3x3(rows: usize, cols: usize, dy: *const f32, src: *const f32, width: usize, dw: &mut [f32; 9]) {
        // Nine vector sums, one per tap, each fed by one load of dy and one of the input.
        let mut acc = [_mm256_setzero_ps(); 9];
        let mut tail = [0f32; 9];
        for i in 0..rows {
            // SAFETY (all reads here): within the planes, see `check`.
            let (d, x) = unsafe { (dy.add(i * cols), src.add(i * width)) };
            let mut j = 0;
            while j + 8 <= cols {
                let dv = unsafe { _mm256_loadu_ps(d.add(j)) };
                for r in 0..3 {
                    for s in 0..3 {
                        let xv = unsafe { _mm256_loadu_ps(x.add(r * width + j + s)) };
                        acc[r * 3 + s] = _mm256_fmadd_ps(dv, xv, acc[r * 3 + s]);
                    }
                }
                j += 8;
            }
            for jj in j..cols {
                let v = unsafe { *d.add(jj) };
                for r in 0..3 {
                    for s in 0..3 {
                        tail[r * 3 + s] += v * unsafe { *x.add(r * width + jj + s) };
                    }
                }
            }
        }
        for t in 0..9 {
            dw[t] += hsum(acc[t]) + tail[t];
        }
    }
}
