//! Weight initialisers, with PyTorch's defaults per layer.

use stride_autograd::{Rng, Tensor};

use crate::Result;

/// Fan-in and fan-out of a weight [out, in, ...kernel] as PyTorch computes them.
pub fn fans(shape: &[usize]) -> (usize, usize) {
    let receptive: usize = shape.iter().skip(2).product();
    let fan_in = shape.get(1).copied().unwrap_or(1) * receptive;
    let fan_out = shape.first().copied().unwrap_or(1) * receptive;
    (fan_in.max(1), fan_out.max(1))
}

/// Kaiming/He uniform with gain sqrt(2 / (1 + a^2)): bound = gain * sqrt(3 / fan_in).
pub fn kaiming_uniform(rng: &mut Rng, shape: &[usize], a: f64) -> Result<Tensor<f32>> {
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let bound = gain * (3.0 / fans(shape).0 as f64).sqrt();
    Ok(rng.uniform(shape, -bound, bound)?)
}

/// Kaiming/He normal for relu: std = sqrt(2 / fan_in).
pub fn kaiming_normal(rng: &mut Rng, shape: &[usize]) -> Result<Tensor<f32>> {
    Ok(rng.normal(shape, 0.0, (2.0 / fans(shape).0 as f64).sqrt())?)
}

/// Xavier/Glorot uniform: bound = sqrt(6 / (fan_in + fan_out)).
pub fn xavier_uniform(rng: &mut Rng, shape: &[usize]) -> Result<Tensor<f32>> {
    let (i, o) = fans(shape);
    let bound = (6.0 / (i + o) as f64).sqrt();
    Ok(rng.uniform(shape, -bound, bound)?)
}

/// Xavier/Glorot normal: std = sqrt(2 / (fan_in + fan_out)).
pub fn xavier_normal(rng: &mut Rng, shape: &[usize]) -> Result<Tensor<f32>> {
    let (i, o) = fans(shape);
    Ok(rng.normal(shape, 0.0, (2.0 / (i + o) as f64).sqrt())?)
}

/// PyTorch's default for Conv and Linear weights: kaiming_uniform(a = sqrt(5)), which is
/// uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)); biases use the same bound.
pub fn torch_default(rng: &mut Rng, weight: &[usize]) -> Result<(Tensor<f32>, Tensor<f32>)> {
    let w = kaiming_uniform(rng, weight, 5f64.sqrt())?;
    let bound = 1.0 / (fans(weight).0 as f64).sqrt();
    let b = rng.uniform(&[weight[0]], -bound, bound)?;
    Ok((w, b))
}
