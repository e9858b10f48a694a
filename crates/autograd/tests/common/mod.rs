//! Shared test helpers: random tensors and the finite-difference gradient check.
#![allow(dead_code)]

use stride_autograd::{Result, Rng, Tensor, Var};

pub fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor<f64> {
    rng.normal(shape, 0.0, 1.0).unwrap()
}

/// Checks the gradients of `f` at `inputs` against central finite differences in f64
/// ([`stride_autograd::gradcheck`]); the message names the input, element and both values.
pub fn grad_check(inputs: &[Tensor<f64>], f: impl Fn(&[Var<f64>]) -> Result<Var<f64>>) -> std::result::Result<(), String> {
    grad_check_tol(inputs, 1e-5, f)
}

pub fn grad_check_tol(inputs: &[Tensor<f64>], tol: f64, f: impl Fn(&[Var<f64>]) -> Result<Var<f64>>) -> std::result::Result<(), String> {
    stride_autograd::gradcheck(inputs, tol, f).map_err(|e| e.to_string())
}

/// Asserts two slices agree to a relative tolerance, naming the first differing element.
pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}
