//! Batch normalisation over [N, C, L] (L = H*W for images, 1 for features), forward and
//! backward side by side.

use rayon::prelude::*;
use stride_tensor::Elem;

/// Per-channel statistics of a training-mode forward pass, kept for the backward pass.
#[derive(Clone, Debug)]
pub struct BatchStats<T> {
    pub mean: Vec<T>,
    /// 1 / sqrt(biased variance + eps)
    pub invstd: Vec<T>,
    /// Unbiased variance (for the running estimate, as PyTorch).
    pub var_unbiased: Vec<T>,
}

/// Sum and sum of squares of a slice in f64, four lanes at a time so it vectorises.
#[inline(always)]
fn sums<T: Elem>(x: &[T], shift: f64) -> (f64, f64) {
    let (mut s, mut q) = ([0f64; 4], [0f64; 4]);
    let chunks = x.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..4 {
            let v = c[l].as_f64() - shift;
            s[l] += v;
            q[l] += v * v;
        }
    }
    let (mut s1, mut q1) = (s.iter().sum::<f64>(), q.iter().sum::<f64>());
    for v in rest {
        let v = v.as_f64() - shift;
        s1 += v;
        q1 += v * v;
    }
    (s1, q1)
}

crate::multiversion! {
    /// Mean and biased variance of one channel, shifted by its first value for accuracy.
    fn channel_moments<T: Elem>(x: &[T], n: usize, c: usize, l: usize, ch: usize) -> (f64, f64) {
        let shift = x[ch * l].as_f64();
        let (mut s, mut q) = (0.0, 0.0);
        for b in 0..n {
            let (s1, q1) = sums(&x[(b * c + ch) * l..(b * c + ch + 1) * l], shift);
            s += s1;
            q += q1;
        }
        let m = (n * l) as f64;
        let mean_shifted = s / m;
        (shift + mean_shifted, (q / m - mean_shifted * mean_shifted).max(0.0))
    }
}

/// Per channel: the sum and the sum of squares of its values over N and L, in f64 (what ranks
/// add up for synchronised batch norm).
pub fn channel_sums<T: Elem>(x: &[T], n: usize, c: usize, l: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| (0..n).map(|b| sums(&x[(b * c + ch) * l..(b * c + ch + 1) * l], 0.0)).fold((0.0, 0.0), |a, v| (a.0 + v.0, a.1 + v.1)))
        .collect()
}

/// Mean and variance per channel over N and L.
pub fn batch_stats<T: Elem>(x: &[T], n: usize, c: usize, l: usize, eps: f64) -> BatchStats<T> {
    let m = (n * l) as f64;
    let per: Vec<(T, T, T)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mean, var) = if n * l == 0 { (0.0, 0.0) } else { channel_moments(x, n, c, l, ch) };
            let unbiased = if m > 1.0 { var * m / (m - 1.0) } else { var };
            (T::c(mean), T::c(1.0 / (var + eps).sqrt()), T::c(unbiased))
        })
        .collect();
    BatchStats { mean: per.iter().map(|p| p.0).collect(), invstd: per.iter().map(|p| p.1).collect(), var_unbiased: per.iter().map(|p| p.2).collect() }
}

crate::multiversion! {
    /// out = a*u + b*v + k, element-wise.
    fn affine2<T: Elem>(out: &mut [T], u: &[T], v: &[T], a: T, b: T, k: T) {
        for ((o, &p), &q) in out.iter_mut().zip(u).zip(v) {
            *o = a * p + b * q + k;
        }
    }
}

/// y = gamma * (x - mean) * invstd + beta, per channel.
pub fn normalize<T: Elem>(x: &[T], c: usize, l: usize, mean: &[T], invstd: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
    if l == 0 {
        return vec![T::zero(); x.len()];
    }
    // Whole planes per task, each task's part zeroed by its thread (see `simd::par_filled`).
    let per = PLANE_VALUES.div_ceil(l);
    crate::simd::par_filled(x.len(), per * l, |t, ys| {
        for (j, (yp, xp)) in ys.chunks_mut(l).zip(x[t * per * l..].chunks(l)).enumerate() {
            let ch = (t * per + j) % c;
            let a = gamma[ch] * invstd[ch];
            affine2(yp, xp, xp, a, T::zero(), beta[ch] - mean[ch] * a);
        }
    })
}

/// Values per task when a new buffer is filled plane by plane.
const PLANE_VALUES: usize = 1 << 14;

/// [`normalize`] into `y` (overwritten), of `x`'s length.
#[allow(clippy::too_many_arguments)]
pub fn normalize_into<T: Elem>(x: &[T], c: usize, l: usize, mean: &[T], invstd: &[T], gamma: &[T], beta: &[T], y: &mut [T]) {
    normalize_planes(x, c, l, mean, invstd, gamma, beta, y, false)
}

/// [`normalize_into`] followed by a ReLU in the same pass over each plane, while it is in
/// cache (a training plan's batch norm whose only consumer is a ReLU).
#[allow(clippy::too_many_arguments)]
pub fn normalize_relu_into<T: Elem>(x: &[T], c: usize, l: usize, mean: &[T], invstd: &[T], gamma: &[T], beta: &[T], y: &mut [T]) {
    normalize_planes(x, c, l, mean, invstd, gamma, beta, y, true)
}

#[allow(clippy::too_many_arguments)]
fn normalize_planes<T: Elem>(x: &[T], c: usize, l: usize, mean: &[T], invstd: &[T], gamma: &[T], beta: &[T], y: &mut [T], relu: bool) {
    assert_eq!(x.len(), y.len(), "normalize_into: lengths");
    if l == 0 {
        return;
    }
    y.par_chunks_mut(l).zip(x.par_chunks(l)).enumerate().for_each(|(i, (yp, xp))| {
        let ch = i % c;
        let a = gamma[ch] * invstd[ch];
        affine2(yp, xp, xp, a, T::zero(), beta[ch] - mean[ch] * a);
        if relu {
            crate::unary::relu_in_place(yp);
        }
    });
}

/// Gradients of [`normalize`]. With `batch_stats` the mean and invstd are functions of x
/// (training mode); without, they are constants (evaluation mode).
/// Returns (dx, dgamma, dbeta).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Elem>(
    dy: &[T],
    x: &[T],
    n: usize,
    c: usize,
    l: usize,
    mean: &[T],
    invstd: &[T],
    gamma: &[T],
    batch_stats: bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (dgamma, dbeta) = backward_sums(dy, x, n, c, l, mean, invstd);
    let dx = backward_dx(dy, x, c, l, mean, invstd, gamma, batch_stats.then_some((&dgamma[..], &dbeta[..], (n * l) as f64)));
    (dx, dgamma, dbeta)
}

/// Per channel: sum(dy * xhat) (gamma's gradient) and sum(dy) (beta's).
pub fn backward_sums<T: Elem>(dy: &[T], x: &[T], n: usize, c: usize, l: usize, mean: &[T], invstd: &[T]) -> (Vec<T>, Vec<T>) {
    let sums: Vec<(T, T)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sdy, mut sdyx) = (T::zero(), T::zero());
            for b in 0..n {
                let r = (b * c + ch) * l..(b * c + ch + 1) * l;
                for (&d, &v) in dy[r.clone()].iter().zip(&x[r]) {
                    sdy += d;
                    sdyx += d * (v - mean[ch]) * invstd[ch];
                }
            }
            (sdy, sdyx)
        })
        .collect();
    (sums.iter().map(|s| s.1).collect(), sums.iter().map(|s| s.0).collect())
}

/// The input's gradient. With `batch`, the statistics were the batch's: `(sum(dy * xhat),
/// sum(dy), m)` over the m values per channel that made them (all ranks' when synchronised).
#[allow(clippy::too_many_arguments)]
pub fn backward_dx<T: Elem>(
    dy: &[T],
    x: &[T],
    c: usize,
    l: usize,
    mean: &[T],
    invstd: &[T],
    gamma: &[T],
    batch: Option<(&[T], &[T], f64)>,
) -> Vec<T> {
    if l == 0 {
        return vec![T::zero(); x.len()];
    }
    let per = PLANE_VALUES.div_ceil(l);
    let terms = DxTerms { mean, invstd, gamma, batch };
    crate::simd::par_filled(x.len(), per * l, |t, dxs| dx_planes(t * per, dxs, dy, x, c, l, &terms))
}

/// The per-channel terms of the input's gradient (see [`backward_dx`]).
#[derive(Clone, Copy, Debug)]
pub struct DxTerms<'a, T> {
    pub mean: &'a [T],
    pub invstd: &'a [T],
    pub gamma: &'a [T],
    /// `(sum(dy * xhat), sum(dy), m)` when the statistics were the batch's.
    pub batch: Option<(&'a [T], &'a [T], f64)>,
}

/// [`backward_dx`] into the caller's `dx` (overwritten; a plan's buffer), with no allocation.
pub fn backward_dx_into<T: Elem>(dy: &[T], x: &[T], c: usize, l: usize, terms: &DxTerms<T>, dx: &mut [T]) {
    assert!(dy.len() == x.len() && dx.len() == x.len(), "backward_dx_into: lengths");
    if l == 0 {
        return;
    }
    let per = PLANE_VALUES.div_ceil(l);
    dx.par_chunks_mut(per * l).enumerate().for_each(|(t, dxs)| dx_planes(t * per, dxs, dy, x, c, l, terms));
}

/// The input gradient of the planes `first..` that `dxs` holds.
fn dx_planes<T: Elem>(first: usize, dxs: &mut [T], dy: &[T], x: &[T], c: usize, l: usize, terms: &DxTerms<T>) {
    let DxTerms { mean, invstd, gamma, batch } = *terms;
    let at = first * l;
    for (j, (dxp, (dyp, xp))) in dxs.chunks_mut(l).zip(dy[at..].chunks(l).zip(x[at..].chunks(l))).enumerate() {
        let ch = (first + j) % c;
        let g = gamma[ch] * invstd[ch];
        // dx = g * (dy - dbeta/m - xhat * dgamma/m) = a*dy + b*x + k, per channel.
        let (a, b, k) = match batch {
            Some((dgamma, dbeta, m)) => {
                let m = T::c(m);
                let b = -g * invstd[ch] * dgamma[ch] / m;
                (g, b, -g * dbeta[ch] / m - b * mean[ch])
            }
            None => (g, T::zero(), T::zero()),
        };
        affine2(dxp, dyp, xp, a, b, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gradient_into_a_buffer_equals_the_allocating_one() {
        let (n, c, l) = (2, 3, 7000);
        let v = |s: usize| -> Vec<f32> { (0..n * c * l).map(|i| ((i * s) % 101) as f32 / 50.0 - 1.0).collect() };
        let (x, dy) = (v(13), v(29));
        let (mean, invstd, gamma, dg, db) = ([0.1f32, -0.2, 0.3], [1.5f32, 0.5, 2.0], [0.9f32, 1.1, -0.7], [0.4f32, -0.1, 0.2], [1.0f32, 2.0, -3.0]);
        for batch in [None, Some((&dg[..], &db[..], (n * l) as f64))] {
            let want = backward_dx(&dy, &x, c, l, &mean, &invstd, &gamma, batch);
            let mut got = vec![f32::NAN; x.len()];
            backward_dx_into(&dy, &x, c, l, &DxTerms { mean: &mean, invstd: &invstd, gamma: &gamma, batch }, &mut got);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "batch statistics: {}", batch.is_some());
        }
    }

    #[test]
    fn many_tasks_of_planes_keep_each_planes_channel() {
        // 3 images x 5 channels x 3,000 values: tasks of six planes, which start mid-image,
        // against per-value arithmetic (the channel of value i is (i / l) % c).
        let (n, c, l) = (3, 5, 3000);
        let x: Vec<f64> = (0..n * c * l).map(|i| ((i * 7919) % 1013) as f64 / 100.0 - 5.0).collect();
        let dy: Vec<f64> = (0..n * c * l).map(|i| ((i * 104729) % 997) as f64 / 50.0 - 10.0).collect();
        let mean: Vec<f64> = (0..c).map(|k| k as f64 * 0.3 - 0.5).collect();
        let invstd: Vec<f64> = (0..c).map(|k| 1.0 + k as f64 * 0.25).collect();
        let gamma: Vec<f64> = (0..c).map(|k| 0.5 + k as f64).collect();
        let beta: Vec<f64> = (0..c).map(|k| k as f64 - 2.0).collect();
        let (dgamma, dbeta) = (vec![0.7, -1.1, 2.0, 0.1, -0.4], vec![1.5, 0.2, -0.9, 3.0, -2.2]);
        let m = (n * l) as f64;
        let y = normalize(&x, c, l, &mean, &invstd, &gamma, &beta);
        let dx = backward_dx(&dy, &x, c, l, &mean, &invstd, &gamma, Some((&dgamma[..], &dbeta[..], m)));
        for i in 0..x.len() {
            let k = (i / l) % c;
            let want = gamma[k] * (x[i] - mean[k]) * invstd[k] + beta[k];
            assert!((y[i] - want).abs() < 1e-9 * (1.0 + want.abs()), "y[{i}] {} vs {want}", y[i]);
            let xhat = (x[i] - mean[k]) * invstd[k];
            let want = gamma[k] * invstd[k] * (dy[i] - dbeta[k] / m - xhat * dgamma[k] / m);
            assert!((dx[i] - want).abs() < 1e-9 * (1.0 + want.abs()), "dx[{i}] {} vs {want}", dx[i]);
        }
    }
}
