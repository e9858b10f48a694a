//! `gemm::skinny_into` (a few rows of activations against a large weight matrix, batch 1)
//! against a naive f64 product: rows 1 to 16 (in groups of four and the rest), depths that
//! are and are not multiples of its sixteen lanes, strided and accumulated outputs, products
//! run in one task and split over the pool.

use stride_kernels::gemm::{skinny_into, skinny_pays};
use stride_tensor::Rng;

#[test]
fn skinny_matches_naive_product() {
    let mut rng = Rng::seed(8);
    for (m, k, n) in [(1, 16, 16), (3, 37, 50), (4, 64, 1500), (7, 100, 700), (16, 129, 33), (5, 1024, 1024)] {
        let a = rng.normal::<f32>(&[m * k], 0.0, 1.0).unwrap();
        let w = rng.normal::<f32>(&[n * k], 0.0, 1.0).unwrap();
        let want: Vec<f64> = (0..m * n).map(|t| (0..k).map(|l| a.data()[t / n * k + l] as f64 * w.data()[t % n * k + l] as f64).sum()).collect();
        // Row-major [m, n], then transposed [n, m] and accumulated onto ones.
        let mut y = vec![f32::NAN; m * n];
        skinny_into(a.data(), m, w.data(), &mut y, (n, 1), false);
        let mut yt = vec![1.0f32; m * n];
        skinny_into(a.data(), m, w.data(), &mut yt, (1, m), true);
        for t in 0..m * n {
            let (i, j, e) = (t / n, t % n, want[t]);
            let tol = 1e-5 * (k as f64).sqrt() * (1.0 + e.abs());
            assert!((y[t] as f64 - e).abs() <= tol, "{m}x{k}x{n} [{i}, {j}]: {} vs {e}", y[t]);
            assert!((yt[j * m + i] as f64 - (e + 1.0)).abs() <= tol, "{m}x{k}x{n} transposed [{i}, {j}]");
        }
    }
    assert!(skinny_pays(1, 1024, 1024) && !skinny_pays(17, 1024, 1024) && !skinny_pays(4, 96, 576));
    // More than four rows only against weights too large to stay in cache.
    assert!(skinny_pays(16, 384, 1536) && !skinny_pays(16, 112, 672) && skinny_pays(4, 112, 672));
}
