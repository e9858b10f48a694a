//! Softmax and log-softmax along one axis of a tensor viewed as [outer, dim, inner].

use rayon::prelude::*;
use stride_tensor::Elem;

use crate::unary::exp;

/// Calls `f(at)` once per softmax row, where `at(k)` is the flat index of the row's k-th entry.
fn each_row(outer: usize, dim: usize, inner: usize, mut f: impl FnMut(&dyn Fn(usize) -> usize)) {
    for o in 0..outer {
        for i in 0..inner {
            f(&|k| (o * dim + k) * inner + i);
        }
    }
}

/// log_softmax(x)_k = (x_k - max) - log(sum exp(x - max)). The difference to the maximum is
/// taken first: it is exact, where x_k - (max + log sum) would round to the spacing of large
/// logits (0.001 at 10,000).
pub fn log_softmax<T: Elem>(x: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    log_softmax_into(x, outer, dim, inner, &mut y);
    y
}

/// [`log_softmax`] into `y` (every value written), for a plan's step.
pub fn log_softmax_into<T: Elem>(x: &[T], outer: usize, dim: usize, inner: usize, y: &mut [T]) {
    assert!(x.len() == outer * dim * inner && y.len() == x.len(), "log_softmax_into: lengths");
    each_row(outer, dim, inner, |at| {
        let m = (0..dim).map(|k| x[at(k)]).fold(T::neg_infinity(), T::max);
        let log_sum = (0..dim).map(|k| (x[at(k)] - m).exp()).sum::<T>().ln();
        for k in 0..dim {
            let i = at(k);
            y[i] = (x[i] - m) - log_sum;
        }
    });
}

/// softmax(x)_k = exp(x_k - max) / sum exp(x - max), the exponential `vmath`'s in f32 (as the
/// Exp step's). Rows of contiguous values are vectorised, a softmax over an inner axis (YOLO's
/// distribution over 16 box offsets, a segmentation map's classes) runs over columns of
/// [dim, inner] blocks, and large tensors are split over the threads.
pub fn softmax<T: Elem>(x: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    softmax_into(x, outer, dim, inner, &mut y);
    y
}

/// [`softmax`] into `y` (every value written), for a plan's step.
pub fn softmax_into<T: Elem>(x: &[T], outer: usize, dim: usize, inner: usize, y: &mut [T]) {
    assert!(x.len() == outer * dim * inner && y.len() == x.len(), "softmax_into: lengths");
    drive(x, x, y, [outer, dim, inner], Kind { stats: softmax_stats, write: softmax_write, row: softmax_row });
}

/// dx = y * (dy - sum(dy * y)) for y = softmax(x).
pub fn softmax_backward<T: Elem>(y: &[T], dy: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    drive(dy, y, &mut dx, [outer, dim, inner], Kind { stats: backward_stats, write: backward_write, row: backward_row });
    dx
}

/// Columns of a [dim, inner] block one pass takes: their statistics stay in the first-level
/// cache while the block's rows stream past.
const COLS: usize = 256;
/// Tensors smaller than this (in values) stay on one thread.
const SERIAL: usize = 1 << 14;

/// One function over [outer, dim, inner] in three parts: `stats(a, b, dim, inner, c0, s, t)`
/// reduces columns c0.. of a block over its dim rows into `s` and `t`; `write(a_row, b_row, s,
/// t, out_row)` makes a row of those columns; `row(a, b, out)` does a whole contiguous row
/// (inner 1).
struct Kind<T> {
    stats: Stats<T>,
    write: Write<T>,
    row: fn(&[T], &[T], &mut [T]),
}

type Stats<T> = fn(&[T], &[T], usize, usize, usize, &mut [T], &mut [T]);
type Write<T> = fn(&[T], &[T], &[T], &[T], &mut [T]);

fn drive<T: Elem>(a: &[T], b: &[T], out: &mut [T], [outer, dim, inner]: [usize; 3], k: Kind<T>) {
    let block = dim * inner;
    if block == 0 || outer == 0 {
        return;
    }
    // One block: rows, or columns a piece at a time.
    let one = |a: &[T], b: &[T], out: &mut [T]| {
        if inner == 1 {
            return (k.row)(a, b, out);
        }
        let (mut s, mut t) = (vec![T::zero(); COLS.min(inner)], vec![T::zero(); COLS.min(inner)]);
        for c0 in (0..inner).step_by(COLS) {
            let n = COLS.min(inner - c0);
            (k.stats)(a, b, dim, inner, c0, &mut s[..n], &mut t[..n]);
            for r in 0..dim {
                let at = r * inner + c0..r * inner + c0 + n;
                (k.write)(&a[at.clone()], &b[at.clone()], &s[..n], &t[..n], &mut out[at]);
            }
        }
    };
    let threads = rayon::current_num_threads();
    if a.len() < SERIAL || threads == 1 {
        out.chunks_mut(block).zip(a.chunks(block).zip(b.chunks(block))).for_each(|(o, (a, b))| one(a, b, o));
    } else if outer >= 4 * threads || inner == 1 {
        let per_task = SERIAL.div_ceil(block);
        out.par_chunks_mut(block).zip(a.par_chunks(block).zip(b.par_chunks(block))).with_min_len(per_task).for_each(|(o, (a, b))| one(a, b, o));
    } else {
        // A few large blocks: each block's column statistics in parallel, then its rows.
        for (o, (a, b)) in out.chunks_mut(block).zip(a.chunks(block).zip(b.chunks(block))) {
            let (mut s, mut t) = (vec![T::zero(); inner], vec![T::zero(); inner]);
            s.par_chunks_mut(COLS).zip(t.par_chunks_mut(COLS)).enumerate().for_each(|(j, (s, t))| (k.stats)(a, b, dim, inner, j * COLS, s, t));
            o.par_chunks_mut(inner).zip(a.par_chunks(inner).zip(b.par_chunks(inner))).for_each(|(o, (a, b))| (k.write)(a, b, &s, &t, o));
        }
    }
}

crate::multiversion_wide! {
    /// The maximum of columns c0.. over the block's rows into `m`, and the inverse of the sum of
    /// exp(x - max) into `inv` (summed row by row).
    fn softmax_stats<T: Elem>(x: &[T], _b: &[T], dim: usize, inner: usize, c0: usize, m: &mut [T], inv: &mut [T]) {
        let n = m.len();
        m.fill(T::neg_infinity());
        for r in 0..dim {
            for (mc, &v) in m.iter_mut().zip(&x[r * inner + c0..r * inner + c0 + n]) {
                *mc = mc.max(v);
            }
        }
        inv.fill(T::zero());
        for r in 0..dim {
            for ((s, &mc), &v) in inv.iter_mut().zip(m.iter()).zip(&x[r * inner + c0..r * inner + c0 + n]) {
                *s += exp(v - mc);
            }
        }
        for s in inv.iter_mut() {
            *s = T::one() / *s;
        }
    }
}

crate::multiversion_wide! {
    fn softmax_write<T: Elem>(x: &[T], _b: &[T], m: &[T], inv: &[T], y: &mut [T]) {
        for (((o, &v), &mc), &s) in y.iter_mut().zip(x).zip(m).zip(inv) {
            *o = exp(v - mc) * s;
        }
    }
}

crate::multiversion_wide! {
    fn softmax_row<T: Elem>(x: &[T], _b: &[T], y: &mut [T]) {
        let m = x.iter().fold(T::neg_infinity(), |a, &v| a.max(v));
        for (o, &v) in y.iter_mut().zip(x) {
            *o = exp(v - m);
        }
        let mut sum = T::zero();
        for &v in y.iter() {
            sum += v;
        }
        let inv = T::one() / sum;
        for o in y.iter_mut() {
            *o *= inv;
        }
    }
}

crate::multiversion! {
    /// sum(dy * y) of columns c0.. over the block's rows into `dot`.
    fn backward_stats<T: Elem>(dy: &[T], y: &[T], dim: usize, inner: usize, c0: usize, dot: &mut [T], _t: &mut [T]) {
        let n = dot.len();
        dot.fill(T::zero());
        for r in 0..dim {
            let at = r * inner + c0..r * inner + c0 + n;
            for ((d, &g), &v) in dot.iter_mut().zip(&dy[at.clone()]).zip(&y[at]) {
                *d += g * v;
            }
        }
    }
}

crate::multiversion! {
    fn backward_write<T: Elem>(dy: &[T], y: &[T], dot: &[T], _t: &[T], dx: &mut [T]) {
        for (((o, &g), &v), &d) in dx.iter_mut().zip(dy).zip(y).zip(dot) {
            *o = v * (g - d);
        }
    }
}

crate::multiversion! {
    fn backward_row<T: Elem>(dy: &[T], y: &[T], dx: &mut [T]) {
        let mut dot = T::zero();
        for (&g, &v) in dy.iter().zip(y) {
            dot += g * v;
        }
        for ((o, &g), &v) in dx.iter_mut().zip(dy).zip(y) {
            *o = v * (g - dot);
        }
    }
}

/// dx = dy - softmax * sum(dy) for y = log_softmax(x).
pub fn log_softmax_backward<T: Elem>(y: &[T], dy: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    each_row(outer, dim, inner, |at| {
        let s: T = (0..dim).map(|k| dy[at(k)]).sum();
        for k in 0..dim {
            let i = at(k);
            dx[i] = dy[i] - y[i].exp() * s;
        }
    });
    dx
}

#[cfg(test)]
mod large_logits {
    /// Logits near 10,000 are spaced 0.001 apart in f32: the result must not round to that
    /// spacing (ONNX's test_softmax_large_number caught x - (max + log sum) doing so).
    #[test]
    fn softmax_and_log_softmax_keep_precision_for_large_logits() {
        let x = [10000.0f32, 10001.0, 10002.0, 10003.0];
        let exact: Vec<f64> = {
            let e: Vec<f64> = (0..4).map(|k| (k as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        let y = super::softmax(&x, 1, 4, 1);
        let ly = super::log_softmax(&x, 1, 4, 1);
        for k in 0..4 {
            assert!((y[k] as f64 - exact[k]).abs() < 1e-6 * exact[k], "softmax {k}: {} vs {}", y[k], exact[k]);
            assert!((ly[k] as f64 - exact[k].ln()).abs() < 1e-6, "log_softmax {k}: {} vs {}", ly[k], exact[k].ln());
        }
    }
}

#[cfg(test)]
mod paths {
    /// Element-by-element softmax and its gradient in f64.
    fn naive(x: &[f32], dy: &[f32], [outer, dim, inner]: [usize; 3]) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        for o in 0..outer {
            for i in 0..inner {
                let at = |k: usize| (o * dim + k) * inner + i;
                let m = (0..dim).map(|k| x[at(k)] as f64).fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = (0..dim).map(|k| (x[at(k)] as f64 - m).exp()).sum();
                (0..dim).for_each(|k| y[at(k)] = (x[at(k)] as f64 - m).exp() / s);
                let dot: f64 = (0..dim).map(|k| dy[at(k)] as f64 * y[at(k)]).sum();
                (0..dim).for_each(|k| dx[at(k)] = y[at(k)] * (dy[at(k)] as f64 - dot));
            }
        }
        (y, dx)
    }

    /// Rows (inner 1), columns in one piece and in several, on one thread, over blocks and
    /// with a few large blocks split by columns (the last three over 2^14 values).
    #[test]
    fn every_path_agrees_with_the_definition() {
        for shape in [[3, 5, 1], [2, 4, 7], [1, 3, 600], [300, 70, 1], [1, 16, 8400], [64, 10, 300], [2, 9, 5000]] {
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 97.0 - 5.0).collect();
            let dy: Vec<f32> = (0..n).map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0).collect();
            let (want_y, want_dx) = naive(&x, &dy, shape);
            let [outer, dim, inner] = shape;
            let y = super::softmax(&x, outer, dim, inner);
            for (i, (&a, &b)) in y.iter().zip(&want_y).enumerate() {
                assert!((a as f64 - b).abs() <= 1e-6 * b + 1e-12, "{shape:?} softmax {i}: {a} against {b}");
            }
            let dx = super::softmax_backward(&y, &dy, outer, dim, inner);
            for (i, (&a, &b)) in dx.iter().zip(&want_dx).enumerate() {
                assert!((a as f64 - b).abs() <= 1e-5 * b.abs() + 1e-7, "{shape:?} gradient {i}: {a} against {b}");
            }
        }
    }
}
