//! Shared test helpers: random tensors and the finite-difference gradient check.
#![allow(dead_code)]

use stride_autograd::{no_grad, Result, Rng, Tensor, Var};

pub fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor<f64> {
    rng.normal(shape, 0.0, 1.0).unwrap()
}

/// Checks the gradients of `f` at `inputs` against central finite differences in f64.
/// The output is reduced with fixed random weights so every output element matters.
/// Returns an error message naming the input, element and both values on a mismatch.
pub fn grad_check(inputs: &[Tensor<f64>], f: impl Fn(&[Var<f64>]) -> Result<Var<f64>>) -> std::result::Result<(), String> {
    grad_check_tol(inputs, 1e-5, f)
}

pub fn grad_check_tol(inputs: &[Tensor<f64>], tol: f64, f: impl Fn(&[Var<f64>]) -> Result<Var<f64>>) -> std::result::Result<(), String> {
    let vars: Vec<Var<f64>> = inputs.iter().map(|t| Var::parameter(t.clone())).collect();
    let out = f(&vars).map_err(|e| format!("forward failed: {e}"))?;
    let mut rng = Rng::seed(99);
    let weights = rng.normal::<f64>(&out.shape(), 0.0, 1.0).unwrap();
    let project = |o: &Var<f64>| -> f64 { o.value().data().iter().zip(weights.data()).map(|(a, b)| a * b).sum() };
    out.backward_with(weights.clone()).map_err(|e| format!("backward failed: {e}"))?;
    let h = 1e-6;
    for (i, input) in inputs.iter().enumerate() {
        let analytic = vars[i].grad().unwrap_or_else(|| Tensor::zeros(input.shape()).unwrap());
        if analytic.shape() != input.shape() {
            return Err(format!("input {i}: gradient shape {:?} vs input {:?}", analytic.shape(), input.shape()));
        }
        // Check at most 40 elements per input, spread over the tensor.
        let n = input.numel();
        let step = (n / 40).max(1);
        for j in (0..n).step_by(step) {
            let eval = |delta: f64| -> std::result::Result<f64, String> {
                let args: Vec<Var<f64>> = inputs
                    .iter()
                    .enumerate()
                    .map(|(k, t)| {
                        let mut t = t.clone();
                        if k == i {
                            t.data_mut()[j] += delta;
                        }
                        Var::constant(t)
                    })
                    .collect();
                no_grad(|| f(&args)).map(|o| project(&o)).map_err(|e| format!("{e}"))
            };
            let numeric = (eval(h)? - eval(-h)?) / (2.0 * h);
            let a = analytic.data()[j];
            if (a - numeric).abs() > tol * (1.0 + a.abs().max(numeric.abs())) {
                return Err(format!("input {i} element {j}: analytic {a} vs numeric {numeric}"));
            }
        }
    }
    Ok(())
}

/// Asserts two slices agree to a relative tolerance, naming the first differing element.
pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}
