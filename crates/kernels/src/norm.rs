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

/// Running lanes of [`add_sums`]: two 256-bit vectors of f64 per sum, so each addition waits
/// on the one two back.
const LANES: usize = 8;

/// Adds the values of `x` (less `shift`) and their squares into running lanes, in f64, so it
/// vectorises; the lanes carry from call to call (one channel's planes), and what does not
/// fill a lane goes into `tail`.
#[inline(always)]
fn add_sums<T: Elem>(x: &[T], shift: f64, s: &mut [f64; LANES], q: &mut [f64; LANES], tail: &mut (f64, f64)) {
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l].as_f64() - shift;
            s[l] += v;
            q[l] += v * v;
        }
    }
    for v in rest {
        let v = v.as_f64() - shift;
        tail.0 += v;
        tail.1 += v * v;
    }
}

/// Sum and sum of squares of `x` less `shift`, in f64.
#[inline(always)]
fn sums<T: Elem>(x: &[T], shift: f64) -> (f64, f64) {
    let (mut s, mut q, mut tail) = ([0f64; LANES], [0f64; LANES], (0.0, 0.0));
    add_sums(x, shift, &mut s, &mut q, &mut tail);
    (tail.0 + s.iter().sum::<f64>(), tail.1 + q.iter().sum::<f64>())
}

crate::multiversion! {
    /// Mean and biased variance of one channel, shifted by its first value for accuracy. The
    /// lanes run over all the channel's planes and are added up once (per plane, the adding
    /// up cost as much as the sums on the VAE generator's 4x4 maps).
    fn channel_moments<T: Elem>(x: &[T], n: usize, c: usize, l: usize, ch: usize) -> (f64, f64) {
        let shift = x[ch * l].as_f64();
        let (mut s, mut q, mut tail) = ([0f64; LANES], [0f64; LANES], (0.0, 0.0));
        for b in 0..n {
            add_sums(&x[(b * c + ch) * l..(b * c + ch + 1) * l], shift, &mut s, &mut q, &mut tail);
        }
        let (s, q) = (tail.0 + s.iter().sum::<f64>(), tail.1 + q.iter().sum::<f64>());
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
    /// Plane by plane (planes of `l` values, the first plane `first`): out = a*u + b*v + k
    /// with the (a, b, k) of the plane's channel, `coef[(first + j) % coef.len()]`; then a
    /// ReLU when `relu`. The loop over planes sits inside the compiled kernel: a call per
    /// plane cost more than its arithmetic on 4x4 maps.
    fn affine_planes<T: Elem>(out: &mut [T], u: &[T], v: &[T], l: usize, first: usize, coef: &[[T; 3]], relu: bool) {
        // The channel steps with the plane and wraps (a division per plane cost a third of
        // the pass on 4x4 maps).
        let mut ch = first % coef.len().max(1);
        for ((o, u), v) in out.chunks_mut(l).zip(u.chunks(l)).zip(v.chunks(l)) {
            let [a, b, k] = coef[ch];
            ch = if ch + 1 == coef.len() { 0 } else { ch + 1 };
            for ((o, &p), &q) in o.iter_mut().zip(u).zip(v) {
                *o = a * p + b * q + k;
            }
            if relu {
                for o in o.iter_mut() {
                    *o = if *o > T::zero() { *o } else { T::zero() };
                }
            }
        }
    }
}

/// Per channel, the (a, 0, k) that normalise: a = gamma * invstd, k = beta - mean * a.
fn normalize_coefs<T: Elem>(mean: &[T], invstd: &[T], gamma: &[T], beta: &[T]) -> Vec<[T; 3]> {
    (0..mean.len())
        .map(|ch| {
            let a = gamma[ch] * invstd[ch];
            [a, T::zero(), beta[ch] - mean[ch] * a]
        })
        .collect()
}

/// y = gamma * (x - mean) * invstd + beta, per channel.
pub fn normalize<T: Elem>(x: &[T], c: usize, l: usize, mean: &[T], invstd: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
    if l == 0 {
        return vec![T::zero(); x.len()];
    }
    // Whole planes per task, each task's part zeroed by its thread (see `simd::par_filled`).
    let per = PLANE_VALUES.div_ceil(l);
    let coef = normalize_coefs(&mean[..c], invstd, gamma, beta);
    crate::simd::par_filled(x.len(), per * l, |t, ys| {
        let xs = &x[t * per * l..][..ys.len()];
        affine_planes(ys, xs, xs, l, t * per, &coef, false)
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
    let per = PLANE_VALUES.div_ceil(l);
    let coef = normalize_coefs(&mean[..c], invstd, gamma, beta);
    y.par_chunks_mut(per * l).zip(x.par_chunks(per * l)).enumerate().for_each(|(t, (ys, xs))| affine_planes(ys, xs, xs, l, t * per, &coef, relu));
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
    let sums: Vec<(T, T)> = (0..c).into_par_iter().map(|ch| channel_backward_sums(dy, x, n, c, l, ch, mean[ch], invstd[ch])).collect();
    (sums.iter().map(|s| s.1).collect(), sums.iter().map(|s| s.0).collect())
}

crate::multiversion! {
    /// One channel's sum(dy) and sum(dy * xhat), in eight running lanes each (one chain of
    /// additions waited on itself: 49 us for the VAE generator's 256-channel 4x4 layer).
    #[allow(clippy::too_many_arguments)]
    fn channel_backward_sums<T: Elem>(dy: &[T], x: &[T], n: usize, c: usize, l: usize, ch: usize, mean: T, invstd: T) -> (T, T) {
        let (mut s, mut p) = ([T::zero(); 8], [T::zero(); 8]);
        let (mut ts, mut tp) = (T::zero(), T::zero());
        for b in 0..n {
            let r = (b * c + ch) * l..(b * c + ch + 1) * l;
            let (d, v) = (dy[r.clone()].chunks_exact(8), x[r].chunks_exact(8));
            for (&dd, &vv) in d.remainder().iter().zip(v.remainder()) {
                ts += dd;
                tp += dd * (vv - mean) * invstd;
            }
            for (dd, vv) in d.zip(v) {
                for i in 0..8 {
                    s[i] += dd[i];
                    p[i] += dd[i] * (vv[i] - mean) * invstd;
                }
            }
        }
        (s.iter().fold(ts, |a, &v| a + v), p.iter().fold(tp, |a, &v| a + v))
    }
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
    let coef = dx_coefs(c, &terms);
    crate::simd::par_filled(x.len(), per * l, |t, dxs| dx_planes(t * per, dxs, dy, x, l, &coef))
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
    let coef = dx_coefs(c, terms);
    dx.par_chunks_mut(per * l).enumerate().for_each(|(t, dxs)| dx_planes(t * per, dxs, dy, x, l, &coef));
}

/// The input gradient of the planes `first..` that `dxs` holds.
fn dx_planes<T: Elem>(first: usize, dxs: &mut [T], dy: &[T], x: &[T], l: usize, coef: &[[T; 3]]) {
    let at = first * l;
    let n = dxs.len();
    affine_planes(dxs, &dy[at..at + n], &x[at..at + n], l, first, coef, false);
}

/// Per channel, the (a, b, k) of the input's gradient: dx = g * (dy - dbeta/m - xhat *
/// dgamma/m) = a*dy + b*x + k with g = gamma * invstd.
fn dx_coefs<T: Elem>(c: usize, terms: &DxTerms<T>) -> Vec<[T; 3]> {
    let DxTerms { mean, invstd, gamma, batch } = *terms;
    (0..c)
        .map(|ch| {
            let g = gamma[ch] * invstd[ch];
            match batch {
                Some((dgamma, dbeta, m)) => {
                    let m = T::c(m);
                    let b = -g * invstd[ch] * dgamma[ch] / m;
                    [g, b, -g * dbeta[ch] / m - b * mean[ch]]
                }
                None => [g, T::zero(), T::zero()],
            }
        })
        .collect()
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
    fn statistics_and_sums_match_per_value_arithmetic_on_ragged_planes() {
        // Planes that fill no lane, part of one, several with a remainder; more than one task
        // of planes (tasks starting mid-image); the fused ReLU against a ReLU after.
        for (n, c, l) in [(4, 3, 1), (3, 2, 5), (2, 3, 16), (300, 3, 19)] {
            let x: Vec<f32> = (0..n * c * l).map(|i| ((i * 7919) % 1013) as f32 / 100.0 - 3.0).collect();
            let dy: Vec<f32> = (0..n * c * l).map(|i| ((i * 104729) % 997) as f32 / 50.0 - 10.0).collect();
            let at = |b: usize, ch: usize, i: usize| (b * c + ch) * l + i;
            let st = batch_stats(&x, n, c, l, 1e-5);
            let (dgamma, dbeta) = backward_sums(&dy, &x, n, c, l, &st.mean, &st.invstd);
            let m = (n * l) as f64;
            for ch in 0..c {
                let vals: Vec<usize> = (0..n).flat_map(|b| (0..l).map(move |i| at(b, ch, i))).collect();
                let mean = vals.iter().map(|&i| x[i] as f64).sum::<f64>() / m;
                let var = vals.iter().map(|&i| (x[i] as f64 - mean).powi(2)).sum::<f64>() / m;
                assert!((st.mean[ch] as f64 - mean).abs() < 1e-5, "({n},{c},{l}) mean[{ch}] {} vs {mean}", st.mean[ch]);
                let invstd = 1.0 / (var + 1e-5).sqrt();
                assert!((st.invstd[ch] as f64 - invstd).abs() < 1e-5 * invstd, "({n},{c},{l}) invstd[{ch}] {} vs {invstd}", st.invstd[ch]);
                let sdy: f64 = vals.iter().map(|&i| dy[i] as f64).sum();
                let (mu, is) = (st.mean[ch] as f64, st.invstd[ch] as f64);
                let sdyx: f64 = vals.iter().map(|&i| dy[i] as f64 * (x[i] as f64 - mu) * is).sum();
                assert!((dbeta[ch] as f64 - sdy).abs() < 1e-3 * (1.0 + sdy.abs()), "({n},{c},{l}) dbeta[{ch}] {} vs {sdy}", dbeta[ch]);
                assert!((dgamma[ch] as f64 - sdyx).abs() < 1e-3 * (1.0 + sdyx.abs()), "({n},{c},{l}) dgamma[{ch}] {} vs {sdyx}", dgamma[ch]);
            }
            let (gamma, beta): (Vec<f32>, Vec<f32>) = ((0..c).map(|k| 0.5 + k as f32).collect(), (0..c).map(|k| k as f32 - 1.0).collect());
            let y = normalize(&x, c, l, &st.mean, &st.invstd, &gamma, &beta);
            let mut fused = vec![f32::NAN; x.len()];
            normalize_relu_into(&x, c, l, &st.mean, &st.invstd, &gamma, &beta, &mut fused);
            for (i, (&f, &v)) in fused.iter().zip(&y).enumerate() {
                let k = (i / l) % c;
                let a = gamma[k] * st.invstd[k];
                assert_eq!(v.to_bits(), (a * x[i] + 0.0 * x[i] + (beta[k] - st.mean[k] * a)).to_bits(), "({n},{c},{l}) y[{i}]");
                assert_eq!(f.to_bits(), v.max(0.0).to_bits(), "({n},{c},{l}) relu y[{i}]");
            }
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

/// The scale and shift of a layer norm: one weight and one optional bias per position of a run.
#[derive(Clone, Copy, Debug)]
pub struct LayerAffine<'a, T> {
    pub weight: &'a [T],
    pub bias: Option<&'a [T]>,
}

/// Layer norm of each run of `weight.len()` values of `x` into `y`, on all cores:
/// `(v - mean) * (mean square of the centred run + eps)^-1/2 * weight + bias`, the order in
/// which `layer_norm`'s recorded ops compute it (a plan's fused form of them).
pub fn layer_norm_into<T: Elem>(x: &[T], y: &mut [T], eps: T, affine: LayerAffine<T>) {
    let len = affine.weight.len().max(1);
    assert!(x.len() == y.len() && x.len().is_multiple_of(len), "layer_norm_into: lengths");
    assert!(affine.bias.is_none_or(|b| b.len() == affine.weight.len()), "layer_norm_into: bias length");
    let per = ((1 << 14) / len).max(1) * len;
    y.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(y, x)| layer_norm_runs(x, y, eps, affine));
}

crate::multiversion! {
    fn layer_norm_runs<T: Elem>(x: &[T], y: &mut [T], eps: T, affine: LayerAffine<T>) {
        let len = affine.weight.len().max(1);
        let inv_len = T::c(1.0 / len as f64);
        for (y, x) in y.chunks_exact_mut(len).zip(x.chunks_exact(len)) {
            let mean = crate::simd::sum(x) * inv_len;
            y.iter_mut().zip(x).for_each(|(o, &v)| *o = v - mean);
            let sq = crate::simd::dot_strided(y, y, 1);
            let inv = (sq * inv_len + eps).powf(T::c(-0.5));
            match affine.bias {
                Some(b) => y.iter_mut().zip(affine.weight).zip(b).for_each(|((o, &w), &b)| *o = *o * inv * w + b),
                None => y.iter_mut().zip(affine.weight).for_each(|(o, &w)| *o = *o * inv * w),
            }
        }
    }
}
