//! Seeded random numbers. The generator (xoshiro256++) is fixed, so a seed gives the same
//! tensors on every machine and every release.

use rand::{RngExt, SeedableRng};
use rand_distr::{Beta, Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::shape::numel;
use crate::{Elem, Error, Result, Tensor};

/// A seeded random generator for initialisation, dropout masks and data shuffling.
#[derive(Clone, Debug)]
pub struct Rng(Xoshiro256PlusPlus);

impl Rng {
    pub fn seed(seed: u64) -> Self {
        Rng(Xoshiro256PlusPlus::seed_from_u64(seed))
    }
    /// Uniform in [0, 1).
    pub fn uniform01(&mut self) -> f64 {
        self.0.random::<f64>()
    }
    /// Uniform integer in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform01() * n as f64) as usize % n.max(1)
    }
    /// A draw from the Beta(a, b) distribution, in [0, 1] (a, b finite and > 0).
    pub fn beta(&mut self, a: f64, b: f64) -> Result<f64> {
        let dist = Beta::new(a, b).map_err(|e| Error::arg("beta", format!("a {a}, b {b}: {e}")))?;
        Ok(dist.sample(&mut self.0))
    }
    /// Puts `items` in a random order (Fisher-Yates): the same seed gives the same order.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }

    /// Elements drawn uniformly from [lo, hi).
    pub fn uniform<T: Elem>(&mut self, shape: &[usize], lo: f64, hi: f64) -> Result<Tensor<T>> {
        if !lo.is_finite() || !hi.is_finite() || lo >= hi {
            crate::bail!(arg, "uniform", "needs finite lo < hi, got [{lo}, {hi})");
        }
        let n = numel("uniform", shape)?;
        let data = (0..n).map(|_| T::c(lo + (hi - lo) * self.uniform01())).collect();
        Tensor::from_vec(data, shape)
    }

    /// Elements drawn from a normal distribution N(mean, std^2).
    pub fn normal<T: Elem>(&mut self, shape: &[usize], mean: f64, std: f64) -> Result<Tensor<T>> {
        if !std.is_finite() || !mean.is_finite() || std < 0.0 {
            crate::bail!(arg, "normal", "needs a finite mean and a finite std >= 0, got mean {mean}, std {std}");
        }
        let dist = Normal::new(mean, std).map_err(|e| Error::arg("normal", format!("mean {mean}, std {std}: {e}")))?;
        let n = numel("normal", shape)?;
        let data = (0..n).map(|_| T::c(dist.sample(&mut self.0))).collect();
        Tensor::from_vec(data, shape)
    }
}
