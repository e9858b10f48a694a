//! An AVX-512 kernel for depthwise layers of stride 2 (mobile networks' downsampling 3x3 and
//! 5x5 layers: MobileNetV2's 96 channels from 112x112 to 56x56, EfficientNet's), f32, one
//! plane at a time, sixteen outputs of a row in a vector.
//!
//! Output column j reads input columns 2j + s - left: every other column, one phase (even or
//! odd) per tap. Each input row is first split into its two phases, `phase_b[u] = x[2u + b]`,
//! in a scratch row with zeros around it (two loads, two permutes and two stores for 32
//! values), so that tap s of outputs j..j + 16 is one plain load from a phase at j + a (the
//! column's half, `2a + b = s - left`) and one multiply-add. The padding is the scratch's
//! zeros: no masks in the loop. These layers went eight channels at a time through
//! `depthwise.rs`'s lanes, whose copy of eight large planes into one interleaved buffer, and
//! back, value by value, cost more than their multiply-adds (96 x 112 x 112 -> 56 x 56, 3x3,
//! one image: 0.28-0.32 ms, 17-19.5 GFLOP/s). Reading the plane in place through masked
//! loads that picked the even values (vpermt2ps) instead was slower still: the mask loads
//! and masked loads ran at about one instruction a cycle.

/// The largest window with a kernel here.
pub(super) const MAX_K: usize = 7;

/// Zeros before each phase of a scratch row: a phase is read from a - 1 .. with a >= -left/2,
/// so this covers padding up to 2 * LEAD on the left.
pub(super) const LEAD: usize = 8;

/// Output vectors of a row in flight at once (independent sums).
const TILES: usize = 4;

/// Whether the kernel runs on this CPU (AVX-512F, unless `STRIDE_NO_AVX512` turns it off:
/// [`crate::simd::has_avx512`]).
pub(super) fn available() -> bool {
    crate::simd::has_avx512()
}

/// The shape of one plane's pass: the input plane (`h` x `w`), the padding above and to the
/// left, the output plane (`rows` x `cols`) and the window (`k` x `k`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Plane {
    pub h: usize,
    pub w: usize,
    pub top: usize,
    pub left: usize,
    pub rows: usize,
    pub cols: usize,
    pub k: usize,
}

/// Whether the kernel takes a square `k` x `k` window of stride 2 (dilation 1) into rows of
/// `cols` outputs with `left` columns of padding: windows of 2 to 7, rows of at least
/// [`MIN_COLS`], padding up to 2 * LEAD.
pub(super) fn handles(k: usize, cols: usize, left: usize) -> bool {
    (2..=MAX_K).contains(&k) && cols >= MIN_COLS && left <= 2 * LEAD && available()
}

/// The narrowest output rows the kernel takes; narrower ones stay in `depthwise.rs`'s lanes,
/// whose vectors of eight channels are full on any map. EfficientNet-B0 at 64x64, batch 64
/// (one layer of 16-wide rows), was 2-3% slower through this kernel (2,395 -> 2,340
/// images/s), and 3% slower again with the 8-wide one as well.
const MIN_COLS: usize = 24;

impl Plane {
    /// The plane of one channel of `g` (a square window: `r` is its side).
    pub(super) fn of(g: &super::ConvGeom) -> Plane {
        Plane { h: g.h, w: g.w, top: g.pad.0, left: g.pad.2, rows: g.p, cols: g.q, k: g.r }
    }
    /// Values of one phase of a scratch row: the zeros before, every output vector's reads
    /// (the last vector's whole 16, up to (k - 1 - left) / 2 + 1 past it), and the phase's
    /// own values.
    pub(super) fn phase_len(&self) -> usize {
        let reach = self.cols.div_ceil(16) * 16 + (self.k / 2 + 1);
        LEAD + reach.max(self.w.div_ceil(32) * 16)
    }
}

/// For each output plane j that reads the input plane `x` (a channel multiplier's; `taps`
/// holds k x k for each): out[j * ld + i * cols + c] = bias[j] + sum_{r,s} taps[j][r, s] *
/// x[2i + r - top, 2c + s - left] (zero outside the plane) for i < rows, c < cols. `x` is split
/// once into `scratch` for all of them. `None` when the kernel does not handle this
/// ([`handles`]).
pub(super) fn correlate(
    p: &Plane,
    x: &[f32],
    taps: &[f32],
    bias: Option<&[f32]>,
    scratch: &mut Vec<f32>,
    (out, ld): (&mut [f32], usize),
) -> Option<()> {
    if !handles(p.k, p.cols, p.left) {
        return None;
    }
    let (kk, planes) = (p.k * p.k, taps.len() / (p.k * p.k));
    assert!(taps.len() == planes * kk && bias.is_none_or(|b| b.len() == planes), "stride-2 depthwise: taps or bias");
    assert_eq!(x.len(), p.h * p.w, "stride-2 depthwise: input plane");
    assert!(ld >= p.rows * p.cols && (planes == 0 || out.len() >= (planes - 1) * ld + p.rows * p.cols), "stride-2 depthwise: output too short");
    let len = p.phase_len();
    scratch.clear();
    scratch.resize(2 * len * p.h, 0.0);
    split_plane(p, x, scratch);
    for (j, taps) in taps.chunks_exact(kk).enumerate() {
        let (b, o) = (bias.map_or(0.0, |b| b[j]), &mut out[j * ld..j * ld + p.rows * p.cols]);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (`handles`); `x86::plane` reads each phase from LEAD + a
        // >= LEAD - left / 2 >= 0 (left <= 2 LEAD) to LEAD + 16 * vectors + a_max <= len (see
        // `phase_len`), and writes outputs j < cols of rows i < rows of `o`.
        unsafe {
            x86::plane(p, scratch, len, taps, b, o.as_mut_ptr());
        }
    }
    Some(())
}

/// The plane `x` (h x w) split into `phases`, zeroed by the caller (2 * phase_len() * h
/// values): row i's even columns at `phases[2i * len + LEAD..]`, its odd ones at
/// `phases[(2i + 1) * len + LEAD..]`, zeros around them. Needs AVX-512F ([`available`]).
pub(super) fn split_plane(p: &Plane, x: &[f32], phases: &mut [f32]) {
    let len = p.phase_len();
    assert!(available() && x.len() == p.h * p.w && phases.len() == 2 * len * p.h, "stride-2 split: sizes");
    #[cfg(target_arch = "x86_64")]
    for (row, phases) in x.chunks_exact(p.w).zip(phases.chunks_exact_mut(2 * len)) {
        // SAFETY: AVX-512F (asserted); `split` writes LEAD + 16 * w.div_ceil(32) <= len values
        // of each phase (`phase_len`).
        unsafe { x86::split(row, phases.as_mut_ptr().add(LEAD), phases.as_mut_ptr().add(len + LEAD)) };
    }
}

/// Where tap column s (of `k`) of output column j reads a split row: at `offsets[s] + j`
/// from the row's start (phase b of 2a + b = s - left, at LEAD + a).
pub(super) fn tap_offsets(k: usize, left: usize, len: usize) -> [usize; MAX_K] {
    let mut cols = [0usize; MAX_K];
    for (s, c) in cols.iter_mut().enumerate().take(k) {
        let d = s as isize - left as isize;
        let (a, b) = (d.div_euclid(2), d.rem_euclid(2) as usize);
        *c = (b * len + LEAD).wrapping_add_signed(a);
    }
    cols
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Plane, MAX_K, TILES};

    /// `even[u] = row[2u]`, `odd[u] = row[2u + 1]` for u < 16 * w.div_ceil(32), zero past the
    /// row.
    ///
    /// # Safety
    /// AVX-512F; `even` and `odd` writable for `16 * row.len().div_ceil(32)` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn split(row: &[f32], even: *mut f32, odd: *mut f32) {
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let w = row.len();
        let (full, x) = (w / 32, row.as_ptr());
        for t in 0..full {
            // SAFETY: columns 32t..32t + 32 lie in the row.
            let (lo, hi) = unsafe { (_mm512_loadu_ps(x.add(32 * t)), _mm512_loadu_ps(x.add(32 * t + 16))) };
            unsafe {
                _mm512_storeu_ps(even.add(16 * t), _mm512_permutex2var_ps(lo, evens, hi));
                _mm512_storeu_ps(odd.add(16 * t), _mm512_permutex2var_ps(lo, odds, hi));
            }
        }
        let n = w % 32;
        if n > 0 {
            let lo_m = if n >= 16 { u16::MAX } else { ((1u32 << n) - 1) as u16 };
            let hi_m = if n > 16 { ((1u32 << (n - 16)) - 1) as u16 } else { 0 };
            // SAFETY: the masks keep columns 32 full..w.
            let at = x.wrapping_add(32 * full);
            let (lo, hi) = unsafe { (_mm512_maskz_loadu_ps(lo_m, at), _mm512_maskz_loadu_ps(hi_m, at.wrapping_add(16))) };
            unsafe {
                _mm512_storeu_ps(even.add(16 * full), _mm512_permutex2var_ps(lo, evens, hi));
                _mm512_storeu_ps(odd.add(16 * full), _mm512_permutex2var_ps(lo, odds, hi));
            }
        }
    }

    /// Every output row from the split rows in `scratch` (two phases of `len` a row).
    ///
    /// # Safety
    /// AVX-512F; `scratch` split by `split` as `super::correlate` lays it out; `out` writable
    /// for `p.rows * p.cols` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane(p: &Plane, scratch: &[f32], len: usize, taps: &[f32], bias: f32, out: *mut f32) {
        // 3x3 and 5x5 with the window's loops unrolled; other sizes as they come.
        match p.k {
            3 => unsafe { plane_k::<3>(p, scratch, len, taps, bias, out) },
            5 => unsafe { plane_k::<5>(p, scratch, len, taps, bias, out) },
            _ => unsafe { plane_k::<0>(p, scratch, len, taps, bias, out) },
        }
    }

    /// [`plane`] for a window of `K` (0: `p.k`). Output rows whose window lies inside the
    /// plane go two at a time (rows of a few vectors: the sums of two rows in flight, and a
    /// pair's fixed costs shared); rows at the top and bottom edges skip the input rows
    /// outside the plane.
    ///
    /// # Safety
    /// As [`plane`]'s.
    #[target_feature(enable = "avx512f")]
    unsafe fn plane_k<const K: usize>(p: &Plane, scratch: &[f32], len: usize, taps: &[f32], bias: f32, out: *mut f32) {
        let k = if K > 0 { K } else { p.k };
        let mut w = [_mm512_setzero_ps(); MAX_K * MAX_K];
        for (v, &t) in w.iter_mut().zip(taps) {
            *v = _mm512_set1_ps(t);
        }
        let cols = super::tap_offsets(k, p.left, len);
        let vectors = p.cols.div_ceil(16);
        let bias = _mm512_set1_ps(bias);
        let row_len = 2 * len;
        let inside = |i: usize| 2 * i >= p.top && 2 * i + k <= p.top + p.h;
        let mut i = 0;
        while i < p.rows {
            if i + 1 < p.rows && inside(i) && inside(i + 1) {
                // SAFETY: both windows' input rows lie inside the plane.
                let first = unsafe { scratch.as_ptr().add((2 * i - p.top) * row_len) };
                let pair = Pair { k, w: &w, cols: &cols, row_len, first, bias, n: p.cols };
                let out = unsafe { out.add(i * p.cols) };
                let mut v = 0;
                while v + 2 <= vectors {
                    unsafe { pair_tiles::<K, 2>(&pair, v, out) };
                    v += 2;
                }
                if v < vectors {
                    unsafe { pair_tiles::<K, 1>(&pair, v, out) };
                }
                i += 2;
                continue;
            }
            // The input rows the window reads that lie inside the plane.
            let mut lines = [(0usize, std::ptr::null::<f32>()); MAX_K];
            let mut n_lines = 0;
            for r in (0..k).filter(|&r| (p.top..p.top + p.h).contains(&(2 * i + r))) {
                lines[n_lines] = (r, scratch[(2 * i + r - p.top) * row_len..].as_ptr());
                n_lines += 1;
            }
            let row = Row { k, w: &w, cols: &cols, lines: &lines[..n_lines], bias, n: p.cols };
            let out = unsafe { out.add(i * p.cols) };
            let mut v = 0;
            while v + TILES <= vectors {
                unsafe { tiles::<TILES>(&row, v, out) };
                v += TILES;
            }
            match vectors - v {
                3 => unsafe { tiles::<3>(&row, v, out) },
                2 => unsafe { tiles::<2>(&row, v, out) },
                1 => unsafe { tiles::<1>(&row, v, out) },
                _ => {}
            }
            i += 1;
        }
    }

    /// Two output rows whose windows lie inside the plane: the first's input rows start at
    /// `first`, the second's two input rows further.
    struct Pair<'a> {
        k: usize,
        w: &'a [__m512; MAX_K * MAX_K],
        cols: &'a [usize; MAX_K],
        row_len: usize,
        first: *const f32,
        bias: __m512,
        n: usize,
    }

    /// `N` vectors of sixteen outputs from vector `v0` in each row of a pair, the rows' last
    /// vectors masked to the outputs they hold.
    ///
    /// # Safety
    /// As [`plane`]'s, for vectors `v0..v0 + N` of rows whose windows lie inside the plane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pair_tiles<const K: usize, const N: usize>(c: &Pair, v0: usize, out: *mut f32) {
        let k = if K > 0 { K } else { c.k };
        let mut acc = [[c.bias; N]; 2];
        let second = 2 * c.row_len;
        for r in 0..k {
            let line = unsafe { c.first.add(r * c.row_len + 16 * v0) };
            for s in 0..k {
                let wv = c.w[r * k + s];
                let at = unsafe { line.add(c.cols[s]) };
                let [one, two] = &mut acc;
                for (t, (a, b)) in one.iter_mut().zip(two.iter_mut()).enumerate() {
                    *a = _mm512_fmadd_ps(wv, unsafe { _mm512_loadu_ps(at.add(16 * t)) }, *a);
                    *b = _mm512_fmadd_ps(wv, unsafe { _mm512_loadu_ps(at.add(second + 16 * t)) }, *b);
                }
            }
        }
        for (row, acc) in acc.iter().enumerate() {
            for (t, a) in acc.iter().enumerate() {
                let j0 = 16 * (v0 + t);
                let n = 16.min(c.n - j0);
                unsafe { _mm512_mask_storeu_ps(out.add(row * c.n + j0), ((1u32 << n) - 1) as u16, *a) };
            }
        }
    }

    /// What the vectors of one output row share.
    struct Row<'a> {
        k: usize,
        w: &'a [__m512; MAX_K * MAX_K],
        /// Each tap column's offset into a row's scratch.
        cols: &'a [usize; MAX_K],
        /// Tap row and its input row's scratch, for each tap row inside the plane.
        lines: &'a [(usize, *const f32)],
        bias: __m512,
        /// Outputs in the row.
        n: usize,
    }

    /// `N` vectors of sixteen outputs from vector `v0`, the row's last masked to the outputs
    /// it holds.
    ///
    /// # Safety
    /// As [`plane`]'s, for vectors `v0..v0 + N` of the row.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tiles<const N: usize>(c: &Row, v0: usize, out: *mut f32) {
        let mut acc = [c.bias; N];
        for &(r, line) in c.lines {
            for s in 0..c.k {
                let wv = c.w[r * c.k + s];
                let at = unsafe { line.add(c.cols[s] + 16 * v0) };
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(wv, unsafe { _mm512_loadu_ps(at.add(16 * t)) }, *a);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            let j0 = 16 * (v0 + t);
            let n = 16.min(c.n - j0);
            unsafe { _mm512_mask_storeu_ps(out.add(j0), ((1u32 << n) - 1) as u16, *a) };
        }
    }
}
