//! The 2x2, stride-2 average pooling loops against the definition, on odd sizes (the last row
//! and column have no window) and on the general path (a 2x2 window at stride 1).

use stride_kernels::pool::{avg_backward, avg_backward_into, avg_forward, Pool2dOptions, PoolGeom};
use stride_tensor::Rng;

/// Mean of each window and, for the gradient, each input's share of the windows covering it.
fn naive(x: &[f64], dy: &[f64], [n, c, h, w]: [usize; 4], stride: usize) -> (Vec<f64>, Vec<f64>) {
    let (p, q) = ((h - 2) / stride + 1, (w - 2) / stride + 1);
    let (mut y, mut dx) = (vec![0.0; n * c * p * q], vec![0.0; n * c * h * w]);
    for plane in 0..n * c {
        for i in 0..p {
            for j in 0..q {
                for (r, s) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let at = plane * h * w + (i * stride + r) * w + j * stride + s;
                    y[(plane * p + i) * q + j] += x[at] / 4.0;
                    dx[at] += dy[(plane * p + i) * q + j] / 4.0;
                }
            }
        }
    }
    (y, dx)
}

#[test]
fn average_pooling_matches_the_definition() {
    let mut rng = Rng::seed(3);
    for (shape, stride) in [([2, 3, 6, 8], 2), ([1, 2, 7, 5], 2), ([3, 1, 13, 13], 2), ([2, 2, 5, 6], 1)] {
        let g = PoolGeom::new("avg_pool2d", &shape, &Pool2dOptions::new(2).stride(stride)).unwrap();
        let x = rng.normal::<f64>(&shape, 0.0, 1.0).unwrap();
        let dy = rng.normal::<f64>(&[g.n, g.c, g.p, g.q], 0.0, 1.0).unwrap();
        let (y, dx) = naive(x.data(), dy.data(), shape, stride);
        let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(u, v)| (u - v).abs() < 1e-12);
        assert!(close(&avg_forward(&g, x.data()), &y), "forward {shape:?} stride {stride}");
        assert!(close(&avg_backward(&g, dy.data()), &dx), "backward {shape:?} stride {stride}");
        // Into a plan's buffer, which holds the last step's values: every element overwritten.
        let mut into = vec![f64::NAN; dx.len()];
        avg_backward_into(&g, dy.data(), &mut into);
        assert!(close(&into, &dx), "backward into a buffer {shape:?} stride {stride}");
    }
}

/// The f32 forward pass (groups of eight outputs vectorised, the rest one by one) against
/// the f64 definition, on widths around the group sizes (eight, then four) and with an odd
/// last column.
#[test]
fn f32_average_pooling_matches_the_definition() {
    let mut rng = Rng::seed(4);
    for w in [2, 7, 8, 9, 15, 16, 17, 24, 26, 31, 33, 35, 48] {
        let shape = [2, 3, 5, w];
        let g = PoolGeom::new("avg_pool2d", &shape, &Pool2dOptions::new(2)).unwrap();
        let x = rng.normal::<f32>(&shape, 0.0, 1.0).unwrap();
        let wide: Vec<f64> = x.data().iter().map(|&v| v as f64).collect();
        let (want, _) = naive(&wide, &vec![0.0; g.n * g.c * g.p * g.q], shape, 2);
        let got = avg_forward(&g, x.data());
        assert_eq!(got.len(), want.len(), "width {w}");
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-6, "width {w}, output {k}: {a} vs {b}");
        }
    }
}
