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

/// Mean and variance per channel over N and L.
pub fn batch_stats<T: Elem>(x: &[T], n: usize, c: usize, l: usize, eps: f64) -> BatchStats<T> {
    let m = (n * l) as f64;
    let per: Vec<(T, T, T)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let plane = |b: usize| &x[(b * c + ch) * l..(b * c + ch + 1) * l];
            let sum: f64 = (0..n)
                .map(|b| plane(b).iter().map(|v| v.as_f64()).sum::<f64>())
                .sum();
            let mean = sum / m;
            let ss: f64 = (0..n)
                .map(|b| {
                    plane(b)
                        .iter()
                        .map(|v| (v.as_f64() - mean).powi(2))
                        .sum::<f64>()
                })
                .sum();
            let var = ss / m;
            let unbiased = if m > 1.0 { ss / (m - 1.0) } else { var };
            (T::c(mean), T::c(1.0 / (var + eps).sqrt()), T::c(unbiased))
        })
        .collect();
    BatchStats {
        mean: per.iter().map(|p| p.0).collect(),
        invstd: per.iter().map(|p| p.1).collect(),
        var_unbiased: per.iter().map(|p| p.2).collect(),
    }
}

/// y = gamma * (x - mean) * invstd + beta, per channel.
pub fn normalize<T: Elem>(
    x: &[T],
    c: usize,
    l: usize,
    mean: &[T],
    invstd: &[T],
    gamma: &[T],
    beta: &[T],
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    if l == 0 {
        return y;
    }
    y.par_chunks_mut(l)
        .zip(x.par_chunks(l))
        .enumerate()
        .for_each(|(i, (yp, xp))| {
            let ch = i % c;
            let a = gamma[ch] * invstd[ch];
            let b = beta[ch] - mean[ch] * a;
            for (o, &v) in yp.iter_mut().zip(xp) {
                *o = a * v + b;
            }
        });
    y
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
    let dbeta: Vec<T> = sums.iter().map(|s| s.0).collect();
    let dgamma: Vec<T> = sums.iter().map(|s| s.1).collect();
    let m = T::c((n * l) as f64);
    let mut dx = vec![T::zero(); x.len()];
    if l > 0 {
        dx.par_chunks_mut(l).enumerate().for_each(|(i, dxp)| {
            let ch = i % c;
            let base = i * l;
            let g = gamma[ch] * invstd[ch];
            for (j, o) in dxp.iter_mut().enumerate() {
                let d = dy[base + j];
                *o = if batch_stats {
                    let xhat = (x[base + j] - mean[ch]) * invstd[ch];
                    g * (d - dbeta[ch] / m - xhat * dgamma[ch] / m)
                } else {
                    g * d
                };
            }
        });
    }
    (dx, dgamma, dbeta)
}
