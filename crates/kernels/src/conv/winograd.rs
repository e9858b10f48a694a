//! Winograd's minimal filtering F(4x4, 3x3) for 3x3, stride-1 convolutions (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! Each 4x4 block of outputs (a *tile*) is read from a 6x6 window of the input. In the
//! transformed domain the 3x3 correlation becomes an element-wise product of 6x6 arrays, and
//! summing over input channels turns the 36 element positions into 36 independent matrix
//! products: M[e] (K x T) = U[e] (K x C) * V[e] (C x T), for T tiles at once. That is 36
//! multiplies per tile and channel pair where direct convolution needs 144: 4x fewer.
//!
//! - filter transform U = G g G^T (6x6 from 3x3), for every (k, c);
//! - input transform V = B^T d B (6x6 window d), for every (c, tile);
//! - output transform Y = A^T M A (4x4 from 6x6), for every (k, tile), then cropped to P x Q.
//!
//! The one-dimensional transforms below are written out; the two-dimensional ones apply them
//! to columns and then rows, over all tiles of a chunk at once so the loops vectorise.
//!
//! The input gradient of such a convolution is again a 3x3 stride-1 convolution (of dy with
//! the flipped, transposed filters, padded by 2 - pad), so the same code serves it. The filter
//! gradient is the adjoint of the same algebra: dL/dU[e] (K x C) sums (A dY A^T)[e] times
//! V[e] over every tile of the batch (36 more products), and dw = G^T dL/dU G.

use rayon::prelude::*;
use stride_tensor::Elem;

use super::planned::Epilogue;
use super::ConvGeom;
use crate::gemm::{matmul, MatRef};
use crate::multiversion;

/// Element positions of a transformed tile.
const E: usize = 36;
/// Tiles of whole images gathered into one chunk before its 36 products run: enough columns
/// for the packed products to reach full speed without the chunk outgrowing the caches.
const CHUNK_TILES: usize = 128;
/// Channel counts below which the transforms cost more than the products save.
const MIN_CHANNELS: usize = 16;
/// Output pixels per plane below which im2col is used. Even ResNet-18's last stage (4x4
/// maps, one tile per image) gains: inference 168 -> 179 images/s at batch 32.
const MIN_OUTPUTS: usize = 16;

/// One Winograd pass: a 3x3 stride-1 correlation of `cin`-channel `h x w` images into
/// `cout`-channel `p x q` images, reading input row `4i + a - top` for output tile row `i`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    p: usize,
    q: usize,
    top: usize,
    left: usize,
}

impl Plan {
    /// Whether the forward pass of `g` (and so its input gradient) runs through Winograd.
    pub(crate) fn applies(g: &ConvGeom) -> bool {
        let (t, b, l, r) = g.pad;
        g.r == 3
            && g.s == 3
            && g.stride == (1, 1)
            && g.dilation == (1, 1)
            && g.groups == 1
            && g.c >= MIN_CHANNELS
            && g.k >= MIN_CHANNELS
            && t.max(b).max(l).max(r) <= 2
            && g.p + 2 == g.h + t + b
            && g.q + 2 == g.w + l + r
            && g.p * g.q >= MIN_OUTPUTS
    }

    pub(crate) fn forward(g: &ConvGeom) -> Plan {
        Plan { n: g.n, cin: g.c, cout: g.k, h: g.h, w: g.w, p: g.p, q: g.q, top: g.pad.0, left: g.pad.2 }
    }

    /// dx = dy correlated with the flipped filters, channels swapped, padding 2 - pad.
    pub(crate) fn backward_data(g: &ConvGeom) -> Plan {
        Plan { n: g.n, cin: g.k, cout: g.c, h: g.p, w: g.q, p: g.h, q: g.w, top: 2 - g.pad.0, left: 2 - g.pad.2 }
    }

    fn tiles_h(&self) -> usize {
        self.p.div_ceil(4)
    }
    fn tiles_w(&self) -> usize {
        self.q.div_ceil(4)
    }
    fn tiles(&self) -> usize {
        self.tiles_h() * self.tiles_w()
    }
    /// Whole images per chunk.
    fn chunk_images(&self) -> usize {
        CHUNK_TILES.div_ceil(self.tiles()).max(1)
    }
    /// Images each thread's group holds, and the threads each product may use.
    fn split(&self) -> (usize, usize) {
        let (by_image, threads) = super::split(self.n);
        (if by_image { self.n.div_ceil(rayon::current_num_threads()) } else { self.n }, threads)
    }
    /// Scratch elements of one thread's group: for one chunk the transformed inputs, the
    /// products and two staging arrays.
    fn scratch_for(&self, images: usize) -> usize {
        let t = self.tiles() * images.min(self.chunk_images());
        (E * (self.cin + self.cout) + 2 * E) * t
    }
    /// The transformed filters (shared) and each thread's chunk buffers.
    pub(crate) fn workspace(&self) -> super::Workspace {
        super::Workspace {
            shared: (E * self.cin * self.cout) as u64,
            per_thread: 0,
            per_held_image: self.scratch_for(1) as u64,
            held_images: self.chunk_images() as u64,
        }
    }
}

/// G applied along the lanes: three input rows to six output rows.
#[inline(always)]
fn filter_1d<T: Elem>(g: [&[T]; 3], o: [&mut [T]; 6]) {
    let len = o[0].len();
    let [g0, g1, g2] = g.map(|s| &s[..len]);
    let [o0, o1, o2, o3, o4, o5] = o.map(|s| &mut s[..len]);
    let (quarter, sixth, twelfth, twentyfourth) = (T::c(0.25), T::c(1.0 / 6.0), T::c(1.0 / 12.0), T::c(1.0 / 24.0));
    for i in 0..len {
        let (a, b, c) = (g0[i], g1[i], g2[i]);
        let (ac, q) = (twentyfourth * a + sixth * c, twelfth * b);
        o0[i] = quarter * a;
        o1[i] = -sixth * (a + b + c);
        o2[i] = -sixth * (a - b + c);
        o3[i] = ac + q;
        o4[i] = ac - q;
        o5[i] = c;
    }
}

/// B^T applied along the lanes: six input rows to six output rows (each `len` long).
#[inline(always)]
fn input_1d<T: Elem>(d: [&[T]; 6], o: [&mut [T]; 6]) {
    let len = o[0].len();
    let [d0, d1, d2, d3, d4, d5] = d.map(|s| &s[..len]);
    let [o0, o1, o2, o3, o4, o5] = o.map(|s| &mut s[..len]);
    let (two, four, five) = (T::c(2.0), T::c(4.0), T::c(5.0));
    for i in 0..len {
        let (a0, a1, a2, a3, a4, a5) = (d0[i], d1[i], d2[i], d3[i], d4[i], d5[i]);
        o0[i] = four * a0 - five * a2 + a4;
        o1[i] = a3 + a4 - four * (a1 + a2);
        o2[i] = four * (a1 - a2) + a4 - a3;
        o3[i] = two * (a3 - a1) + a4 - a2;
        o4[i] = two * (a1 - a3) + a4 - a2;
        o5[i] = four * a1 - five * a3 + a5;
    }
}

/// A^T applied along the lanes: six input rows to four output rows.
#[inline(always)]
fn output_1d<T: Elem>(m: [&[T]; 6], o: [&mut [T]; 4]) {
    let len = o[0].len();
    let [m0, m1, m2, m3, m4, m5] = m.map(|s| &s[..len]);
    let [o0, o1, o2, o3] = o.map(|s| &mut s[..len]);
    let (two, four, eight) = (T::c(2.0), T::c(4.0), T::c(8.0));
    for i in 0..len {
        let (s12, d12, s34, d34) = (m1[i] + m2[i], m1[i] - m2[i], m3[i] + m4[i], m3[i] - m4[i]);
        o0[i] = m0[i] + s12 + s34;
        o1[i] = d12 + two * d34;
        o2[i] = s12 + four * s34;
        o3[i] = d12 + eight * d34 + m5[i];
    }
}

/// A applied along the lanes (the adjoint of `output_1d`): four rows to six.
#[inline(always)]
fn grad_1d<T: Elem>(d: [&[T]; 4], o: [&mut [T]; 6]) {
    let len = o[0].len();
    let [d0, d1, d2, d3] = d.map(|s| &s[..len]);
    let [o0, o1, o2, o3, o4, o5] = o.map(|s| &mut s[..len]);
    let (two, four, eight) = (T::c(2.0), T::c(4.0), T::c(8.0));
    for i in 0..len {
        let (e02, e13) = (d0[i] + d2[i], d1[i] + d3[i]);
        let (f02, f13) = (d0[i] + four * d2[i], two * d1[i] + eight * d3[i]);
        o0[i] = d0[i];
        o1[i] = e02 + e13;
        o2[i] = e02 - e13;
        o3[i] = f02 + f13;
        o4[i] = f02 - f13;
        o5[i] = d3[i];
    }
}

/// G^T applied along the lanes (the adjoint of `filter_1d`): six rows to three.
#[inline(always)]
fn filter_grad_1d<T: Elem>(z: [&[T]; 6], o: [&mut [T]; 3]) {
    let len = o[0].len();
    let [z0, z1, z2, z3, z4, z5] = z.map(|s| &s[..len]);
    let [o0, o1, o2] = o.map(|s| &mut s[..len]);
    let (quarter, sixth, twelfth, twentyfourth) = (T::c(0.25), T::c(1.0 / 6.0), T::c(1.0 / 12.0), T::c(1.0 / 24.0));
    for i in 0..len {
        let (s12, s34) = (z1[i] + z2[i], z3[i] + z4[i]);
        o0[i] = quarter * z0[i] - sixth * s12 + twentyfourth * s34;
        o1[i] = sixth * (z2[i] - z1[i]) + twelfth * (z3[i] - z4[i]);
        o2[i] = sixth * (s34 - s12) + z5[i];
    }
}

/// `N` disjoint rows of length `len` from `buf`, rows `first + k * step`.
fn rows_mut<T, const N: usize>(buf: &mut [T], len: usize, first: usize, step: usize) -> [&mut [T]; N] {
    let mut rest = &mut buf[first * len..];
    std::array::from_fn(|k| {
        let skip = if k == 0 { 0 } else { (step - 1) * len };
        let tail = std::mem::take(&mut rest);
        let (row, after) = tail[skip..].split_at_mut(len);
        rest = after;
        row
    })
}

fn rows<T, const N: usize>(buf: &[T], len: usize, first: usize, step: usize) -> [&[T]; N] {
    std::array::from_fn(|k| &buf[(first + k * step) * len..(first + k * step + 1) * len])
}

/// `out[r][j] = row[4j + r - left]` for the four phases r, zero where that leaves the row.
#[inline(always)]
fn deinterleave<T: Elem>(row: &[T], left: usize, out: [&mut [T]; 4]) {
    let len = out[0].len();
    let w = row.len();
    // Quads lying wholly inside the row: j_lo..j_hi; the (at most two) others one by one.
    let j_lo = left.div_ceil(4).min(len);
    let j_hi = ((w + left) / 4).clamp(j_lo, len);
    let [o0, o1, o2, o3] = out;
    if j_lo < j_hi {
        let quads = row[4 * j_lo - left..].chunks_exact(4);
        let lanes = o0[j_lo..j_hi].iter_mut().zip(&mut o1[j_lo..j_hi]).zip(&mut o2[j_lo..j_hi]).zip(&mut o3[j_lo..j_hi]);
        for (quad, (((v0, v1), v2), v3)) in quads.zip(lanes) {
            (*v0, *v1, *v2, *v3) = (quad[0], quad[1], quad[2], quad[3]);
        }
    }
    let at = |u: usize| if u >= left && u - left < w { row[u - left] } else { T::zero() };
    for j in (0..j_lo).chain(j_hi..len) {
        (o0[j], o1[j], o2[j], o3[j]) = (at(4 * j), at(4 * j + 1), at(4 * j + 2), at(4 * j + 3));
    }
}

/// Copies the `win x win` window of every tile of one `h x w` plane (tile (i, j) starts at
/// row 4i - top, column 4j - left) into `d[(a*win + b) * t + first + i*tw + j]`, with zeros
/// where a window leaves the plane. Window columns 0..4 of a row are its four phases (a
/// deinterleave, vectorised where rows hold eight or more whole quads); columns 4 and 5
/// (`win` 6) are columns 0 and 1 one tile on.
#[inline(always)]
fn gather<T: Elem>(pl: &Plan, plane: &[T], (h, w): (usize, usize), (top, left): (usize, usize), win: usize, (first, t): (usize, usize), d: &mut [T]) {
    let tw = pl.tiles_w();
    for i in 0..pl.tiles_h() {
        let base = first + i * tw;
        for a in 0..win {
            let y = (4 * i + a) as isize - top as isize;
            // Six rows of d from window row a (for `win` 4 the last two belong to the next
            // window row and stay untouched; d holds E rows, so they exist).
            let mut dst: [&mut [T]; 6] = rows_mut(d, t, a * win, 1).map(|r| &mut r[base..base + tw]);
            if y < 0 || y as usize >= h {
                dst.iter_mut().take(win).for_each(|r| r.fill(T::zero()));
                continue;
            }
            let row = &plane[y as usize * w..(y as usize + 1) * w];
            let [d0, d1, d2, d3, d4, d5] = dst;
            deinterleave(row, left, [d0, d1, d2, d3]);
            if win == 6 {
                let last = 4 * tw - left;
                for (j, (v4, v5)) in d4.iter_mut().zip(d5.iter_mut()).enumerate() {
                    (*v4, *v5) = if j + 1 < tw {
                        (d0[j + 1], d1[j + 1])
                    } else {
                        (row.get(last).copied().unwrap_or(T::zero()), row.get(last + 1).copied().unwrap_or(T::zero()))
                    };
                }
            }
        }
    }
}

multiversion! {
    /// V[e][c][..] for every channel of a chunk of `images` images starting at `x`
    /// ([images, cin, h, w]); `d` and `tmp` are two staging arrays of E x t.
    fn transform_inputs<T: Elem>(pl: &Plan, x: &[T], images: usize, v: &mut [T], d: &mut [T], tmp: &mut [T]) {
        let tiles = pl.tiles();
        let t = images * tiles;
        for c in 0..pl.cin {
            // Gather every tile's 6x6 window: d[a*6 + b][tile].
            for (img, xi) in x.chunks_exact(pl.cin * pl.h * pl.w).take(images).enumerate() {
                let plane = &xi[c * pl.h * pl.w..(c + 1) * pl.h * pl.w];
                gather(pl, plane, (pl.h, pl.w), (pl.top, pl.left), 6, (img * tiles, t), d);
            }
            // Columns: tmp[a'*6 + b] = sum_a B^T[a'][a] d[a*6 + b].
            for b in 0..6 {
                input_1d(rows(d, t, b, 6), rows_mut(tmp, t, b, 6));
            }
            // Rows: V[a'*6 + b'][c] = sum_b tmp[a'*6 + b] B[b][b'].
            for a in 0..6 {
                input_1d(rows(tmp, t, a * 6, 1), rows_mut(v, t, (a * 6) * pl.cin + c, pl.cin));
            }
        }
    }
}

multiversion! {
    /// y[img][k] (+ bias) from the products M[e][k][tile] of a chunk; `tmp` and `o` stage.
    fn transform_outputs<T: Elem>(pl: &Plan, m: &[T], images: usize, bias: Option<&[T]>, y: &mut [T], tmp: &mut [T], o: &mut [T]) {
        let (tw, tiles) = (pl.tiles_w(), pl.tiles());
        let t = images * tiles;
        for k in 0..pl.cout {
            // Columns: tmp[a'*6 + b] = sum_a A^T[a'][a] M[a*6 + b][k], a' < 4.
            for b in 0..6 {
                output_1d(rows(m, t, b * pl.cout + k, 6 * pl.cout), rows_mut(tmp, t, b, 6));
            }
            // Rows: o[a'*4 + b'] = sum_b tmp[a'*6 + b] A[b][b'].
            for a in 0..4 {
                output_1d(rows(tmp, t, a * 6, 1), rows_mut(o, t, a * 4, 1));
            }
            let add = bias.map_or(T::zero(), |b| b[k]);
            for (img, yi) in y.chunks_exact_mut(pl.cout * pl.p * pl.q).take(images).enumerate() {
                let plane = &mut yi[k * pl.p * pl.q..(k + 1) * pl.p * pl.q];
                for (row, out) in plane.chunks_exact_mut(pl.q).enumerate() {
                    let (i, a) = (row / 4, row % 4);
                    let first = img * tiles + i * tw;
                    let [l0, l1, l2, l3] = rows::<T, 4>(o, t, a * 4, 1).map(|l| &l[first..first + tw]);
                    // Whole tiles as interleaved quads, then the cropped last tile.
                    let last = out.len() / 4;
                    let mut quads = out.chunks_exact_mut(4);
                    for ((((quad, &m0), &m1), &m2), &m3) in (&mut quads).zip(l0).zip(l1).zip(l2).zip(l3) {
                        quad.copy_from_slice(&[m0 + add, m1 + add, m2 + add, m3 + add]);
                    }
                    for (v, lane) in quads.into_remainder().iter_mut().zip([l0, l1, l2]) {
                        *v = lane[last] + add;
                    }
                }
            }
        }
    }
}

multiversion! {
    /// U for groups of `lanes` filters: `u` is [groups][E][lanes]; group `o`, lane `l` is the
    /// 3x3 kernel at `w[o * so + l * sl..][..9]`, read back to front when `flip`. `d` and
    /// `tmp` stage (9 x lanes and 18 x lanes).
    fn transform_filters<T: Elem>(u: &mut [T], lanes: usize, w: &[T], layout: (usize, usize, bool), d: &mut [T], tmp: &mut [T]) {
        let (so, sl, flip) = layout;
        for (o, uo) in u.chunks_exact_mut(E * lanes).enumerate() {
            for (t, row) in d.chunks_exact_mut(lanes).enumerate() {
                let tap = if flip { 8 - t } else { t };
                for (l, v) in row.iter_mut().enumerate() {
                    *v = w[o * so + l * sl + tap];
                }
            }
            // Columns: tmp[i*3 + s] = sum_r G[i][r] g[r*3 + s].
            for s in 0..3 {
                filter_1d(rows(d, lanes, s, 3), rows_mut(tmp, lanes, s, 3));
            }
            // Rows: U[i*6 + j] = sum_s tmp[i*3 + s] G[j][s].
            for i in 0..6 {
                filter_1d(rows(tmp, lanes, i * 3, 1), rows_mut(uo, lanes, i * 6, 1));
            }
        }
    }
}

/// The transformed filters ([outer][E][lanes]) of `outer` groups of `lanes` kernels laid out
/// as `transform_filters` reads them, the groups split over the thread pool.
fn filters<T: Elem>(w: &[T], outer: usize, lanes: usize, layout: (usize, usize, bool)) -> Vec<T> {
    let per = outer.div_ceil(rayon::current_num_threads()).max(1);
    crate::simd::par_filled(outer * E * lanes, per * E * lanes, |i, part| {
        let (mut d, mut tmp) = (vec![T::zero(); 9 * lanes], vec![T::zero(); 18 * lanes]);
        transform_filters(part, lanes, &w[i * per * layout.0..], layout, &mut d, &mut tmp);
    })
}

multiversion! {
    /// A dY A^T for every output tile of a chunk: `mg[e][k][tile]` from dy ([images, cout,
    /// p, q]); outputs past the edge count as zero. `d` and `tmp` stage.
    fn transform_grads<T: Elem>(pl: &Plan, dy: &[T], images: usize, mg: &mut [T], d: &mut [T], tmp: &mut [T]) {
        let tiles = pl.tiles();
        let t = images * tiles;
        for k in 0..pl.cout {
            for (img, di) in dy.chunks_exact(pl.cout * pl.p * pl.q).take(images).enumerate() {
                let plane = &di[k * pl.p * pl.q..(k + 1) * pl.p * pl.q];
                gather(pl, plane, (pl.p, pl.q), (0, 0), 4, (img * tiles, t), d);
            }
            // Columns: tmp[a'*4 + b] = sum_a A[a'][a] d[a*4 + b]; rows into mg[a'*6 + b'][k].
            for b in 0..4 {
                grad_1d(rows(d, t, b, 4), rows_mut(tmp, t, b, 4));
            }
            for a in 0..6 {
                grad_1d(rows(tmp, t, a * 4, 1), rows_mut(mg, t, (a * 6) * pl.cout + k, pl.cout));
            }
        }
    }
}

multiversion! {
    /// G^T Z G for `lanes` 6x6 arrays (`z` is [E][lanes]) into `out` ([9][lanes]); `tmp`
    /// stages 18 x lanes.
    fn transform_filter_grads<T: Elem>(z: &[T], lanes: usize, tmp: &mut [T], out: &mut [T]) {
        for j in 0..6 {
            filter_grad_1d(rows(z, lanes, j, 6), rows_mut(tmp, lanes, j, 6));
        }
        for r in 0..3 {
            filter_grad_1d(rows(tmp, lanes, r * 6, 1), rows_mut(out, lanes, r * 3, 1));
        }
    }
}

/// Runs `body(first, count, v, m, s1, s2)` over the chunks of a thread's `images` images:
/// images `first..first + count`, with the chunk buffers cut from one allocation (`v`:
/// E x cin x t, `m`: E x cout x t, two staging arrays of E x t; t = count x tiles).
fn for_each_chunk<T: Elem>(pl: &Plan, images: usize, mut body: impl FnMut(usize, usize, &mut [T], &mut [T], &mut [T], &mut [T])) {
    let mut buf = vec![T::zero(); pl.scratch_for(images)];
    let chunk = pl.chunk_images().min(images).max(1);
    let cap = chunk * pl.tiles();
    let (v, rest) = buf.split_at_mut(E * pl.cin * cap);
    let (m, rest) = rest.split_at_mut(E * pl.cout * cap);
    let (s1, s2) = rest.split_at_mut(E * cap);
    for first in (0..images).step_by(chunk) {
        let count = chunk.min(images - first);
        let t = count * pl.tiles();
        body(first, count, &mut v[..E * pl.cin * t], &mut m[..E * pl.cout * t], &mut s1[..E * t], &mut s2[..E * t]);
    }
}

/// Runs `pl` over `x` ([n, cin, h, w]) into `y` ([n, cout, p, q], overwritten) with the
/// transformed filters `u` ([cout][E][cin]).
fn run<T: Elem>(pl: &Plan, x: &[T], u: &[T], epi: Epilogue<T>, y: &mut [T]) {
    let (per, y_img) = (pl.split().0, pl.cout * pl.p * pl.q);
    if y.is_empty() {
        return;
    }
    y.par_chunks_mut(per * y_img).enumerate().for_each(|(group, yg)| run_group(pl, x, u, epi, group, yg));
}

/// [`run`] into a new buffer, each thread's share zeroed by the thread that writes it.
fn run_new<T: Elem>(pl: &Plan, x: &[T], u: &[T], epi: Epilogue<T>) -> Vec<T> {
    let (per, y_img) = (pl.split().0, pl.cout * pl.p * pl.q);
    crate::simd::par_filled(pl.n * y_img, (per * y_img).max(1), |group, yg| run_group(pl, x, u, epi, group, yg))
}

/// One thread's share of [`run`]: images `group * per..` into `yg`.
fn run_group<T: Elem>(pl: &Plan, x: &[T], u: &[T], epi: Epilogue<T>, group: usize, yg: &mut [T]) {
    let (per, threads) = pl.split();
    let (x_img, y_img) = (pl.cin * pl.h * pl.w, pl.cout * pl.p * pl.q);
    for_each_chunk(pl, yg.len() / y_img, |first, count, v, m, s1, s2| {
        let t = count * pl.tiles();
        transform_inputs(pl, &x[(group * per + first) * x_img..], count, v, s1, s2);
        for e in 0..E {
            let ue = MatRef { data: &u[e * pl.cin..], rows: pl.cout, cols: pl.cin, rs: E * pl.cin, cs: 1 };
            let ve = MatRef::rows(&v[e * pl.cin * t..(e + 1) * pl.cin * t], pl.cin, t);
            matmul(ue, ve, &mut m[e * pl.cout * t..(e + 1) * pl.cout * t], t, false, threads);
        }
        let out = &mut yg[first * y_img..(first + count) * y_img];
        transform_outputs(pl, m, count, epi.bias, out, s1, s2);
        epilogue_chunk(out, y_img, group * per + first, epi.residual, epi.act);
    });
}

/// y = conv(x, w) + bias for a geometry [`Plan::applies`] to.
pub(crate) fn forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let u = filters_forward(g, w);
    run_new(&Plan::forward(g), x, &u, Epilogue { bias, ..Epilogue::default() })
}

/// The forward pass's transformed filters ([K][E][C]), made once by a plan.
pub(crate) fn filters_forward<T: Elem>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    filters(w, g.k, g.c, (g.c * 9, 9, false))
}

/// The forward pass with filters from [`filters_forward`], residual and activation applied
/// to each chunk of images as it is finished.
pub(crate) fn forward_into<T: Elem>(g: &ConvGeom, x: &[T], u: &[T], epi: Epilogue<T>, y: &mut [T]) {
    run(&Plan::forward(g), x, u, epi, y);
}

/// `y = act(y + residual)` over `y`'s whole images, the first being image `first`: serial,
/// as it runs inside a thread's share.
fn epilogue_chunk<T: Elem>(y: &mut [T], image: usize, first: usize, residual: Option<&[T]>, act: Option<crate::unary::Unary>) {
    if let Some(r) = residual {
        let r = &r[first * image..first * image + y.len()];
        y.iter_mut().zip(r).for_each(|(o, &v)| *o += v);
    }
    if let Some(act) = act {
        act.apply_in_place(y);
    }
}

/// dx from dy for a geometry [`Plan::applies`] to: filters flipped, channels swapped.
pub(crate) fn backward_data<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T]) -> Vec<T> {
    let u = filters(w, g.c, g.k, (9, g.c * 9, true));
    run_new(&Plan::backward_data(g), dy, &u, Epilogue::default())
}

/// [`backward_data`] into `dx` (overwritten).
pub(crate) fn backward_data_into<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T], dx: &mut [T]) {
    let u = filters(w, g.c, g.k, (9, g.c * 9, true));
    run(&Plan::backward_data(g), dy, &u, Epilogue::default(), dx);
}

/// dw from x and dy for a geometry [`Plan::applies`] to: dL/dU = sum over tiles of
/// (A dY A^T) * (B^T d B), 36 products summed over every tile of the batch, then
/// dw = G^T (dL/dU) G.
pub(crate) fn backward_filter<T: Elem>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
    let pl = Plan::forward(g);
    let (x_img, y_img, kc) = (g.c * g.h * g.w, g.k * g.p * g.q, g.k * g.c);
    // Each share of images sums into its own E x K x C partial. Past 256 x 256 channels
    // those partials outweigh the rest of the pass (36 MiB each at 512 x 512), so one share
    // runs with the products split over the threads instead (B3's c4, 256 x 256, is 25%
    // slower that way).
    let (per, threads) = if kc <= 256 * 256 { pl.split() } else { (g.n, rayon::current_num_threads()) };
    let partial = |group: usize| -> Vec<T> {
        let start = group * per;
        let mut z = vec![T::zero(); E * kc];
        for_each_chunk(&pl, per.min(g.n - start), |first, count, v, m, s1, s2| {
            let t = count * pl.tiles();
            transform_inputs(&pl, &x[(start + first) * x_img..], count, v, s1, s2);
            transform_grads(&pl, &dy[(start + first) * y_img..], count, m, s1, s2);
            for e in 0..E {
                let me = MatRef::rows(&m[e * g.k * t..(e + 1) * g.k * t], g.k, t);
                let ve = MatRef::rows(&v[e * g.c * t..(e + 1) * g.c * t], g.c, t).t();
                matmul(me, ve, &mut z[e * kc..(e + 1) * kc], g.c, true, threads);
            }
        });
        z
    };
    let groups = if g.n == 0 { 0 } else { g.n.div_ceil(per) };
    let z = (0..groups).into_par_iter().map(partial).reduce_with(|mut a, b| {
        a.iter_mut().zip(b).for_each(|(s, v)| *s += v);
        a
    });
    let z = z.unwrap_or_else(|| vec![T::zero(); E * kc]);
    // dw = G^T Z G, a block of filters at a time so the staging stays small.
    const BLOCK: usize = 1024;
    let mut dw = vec![T::zero(); 9 * kc];
    let (mut zb, mut tmp, mut taps) = (vec![T::zero(); E * BLOCK], vec![T::zero(); 18 * BLOCK], vec![T::zero(); 9 * BLOCK]);
    for f0 in (0..kc).step_by(BLOCK) {
        let lanes = BLOCK.min(kc - f0);
        for (e, row) in zb.chunks_exact_mut(lanes).take(E).enumerate() {
            row.copy_from_slice(&z[e * kc + f0..e * kc + f0 + lanes]);
        }
        transform_filter_grads(&zb[..E * lanes], lanes, &mut tmp[..18 * lanes], &mut taps[..9 * lanes]);
        for (f, out) in dw[9 * f0..9 * (f0 + lanes)].chunks_exact_mut(9).enumerate() {
            for (tap, o) in out.iter_mut().enumerate() {
                *o = taps[tap * lanes + f];
            }
        }
    }
    dw
}
