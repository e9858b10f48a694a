//! The fused layer norm (`norm::layer_norm_into`, a plan's form of `layer_norm`'s recorded
//! ops) against a naive f64 reference: runs shorter and longer than its eight lanes, with and
//! without a bias, and more runs than one task takes.

use stride_kernels::norm::{layer_norm_into, LayerAffine};
use stride_tensor::Rng;

fn reference(x: &[f64], eps: f64, w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    x.chunks(w.len())
        .flat_map(|run| {
            let mean = run.iter().sum::<f64>() / run.len() as f64;
            let var = run.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / run.len() as f64;
            let inv = 1.0 / (var + eps).sqrt();
            run.iter().enumerate().map(move |(i, v)| (v - mean) * inv * w[i] + b.map_or(0.0, |b| b[i])).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn layer_norm_matches_reference() {
    let mut rng = Rng::seed(7);
    for (runs, len, eps) in [(3, 5, 1e-5), (40, 96, 1e-6), (2000, 19, 0.5), (1, 1, 1e-5)] {
        let x = rng.normal::<f32>(&[runs * len], 1.5, 2.0).unwrap();
        let w = rng.normal::<f32>(&[len], 1.0, 0.5).unwrap();
        let b = rng.normal::<f32>(&[len], 0.0, 1.0).unwrap();
        let f = |t: &[f32]| t.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        for bias in [None, Some(b.data())] {
            let mut y = vec![f32::NAN; runs * len];
            layer_norm_into(x.data(), &mut y, eps as f32, LayerAffine { weight: w.data(), bias });
            let want = reference(&f(x.data()), eps, &f(w.data()), bias.map(f).as_deref());
            for (i, (a, e)) in y.iter().zip(&want).enumerate() {
                assert!((*a as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()), "runs {runs} of {len}, bias {}: [{i}] {a} vs {e}", bias.is_some());
            }
        }
    }
}
