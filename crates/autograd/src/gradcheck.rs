//! Gradients checked against finite differences (PyTorch's `torch.autograd.gradcheck`): for a
//! layer or loss written from Stride's ops, whether `backward` gives the derivative of what its
//! forward pass computes. Stride's own ops are tested this way (crates/autograd/tests).

use stride_tensor::{bail, Result, Rng, Tensor};

use crate::{no_grad, Var};

/// Elements checked per input, spread evenly over it.
const CHECKED: usize = 40;
/// The finite-difference step.
const STEP: f64 = 1e-6;

/// Checks `f`'s gradients at `inputs` against central differences, in f64. The output is
/// reduced to a number with fixed random weights, so every element of it counts; up to 40
/// elements of each input, spread over it, are moved by ±1e-6 and the change of that number
/// compared with what `backward` gave: they agree when they differ by at most `tol` × (1 + the
/// larger magnitude). 1e-5 suits smooth functions; kinks (ReLU at 0, max pooling's ties) need
/// inputs away from them. The error names the input, the element and both values.
///
/// ```
/// use stride_autograd::{gradcheck, Rng, Var};
/// // Mish, x * tanh(softplus(x)), from Stride's ops:
/// let mish = |v: &[Var<f64>]| v[0].mul(&v[0].softplus()?.tanh()?);
/// gradcheck(&[Rng::seed(0).normal(&[2, 3], 0.0, 1.0)?], 1e-5, mish)?;
/// // A wrong derivative is caught: a "square" whose backward pass gives x instead of 2x.
/// let wrong = |v: &[Var<f64>]| v[0].detach().mul(&v[0]);
/// let e = gradcheck(&[Rng::seed(0).normal(&[4], 0.0, 1.0)?], 1e-5, wrong).unwrap_err();
/// assert!(e.to_string().contains("backward gives"));
/// # Ok::<(), stride_autograd::Error>(())
/// ```
pub fn gradcheck(inputs: &[Tensor<f64>], tol: f64, f: impl Fn(&[Var<f64>]) -> Result<Var<f64>>) -> Result<()> {
    if !(tol > 0.0 && tol.is_finite()) {
        bail!(arg, "gradcheck", "the tolerance must be finite and > 0, got {tol}");
    }
    let vars: Vec<Var<f64>> = inputs.iter().map(|t| Var::parameter(t.clone())).collect();
    let out = f(&vars)?;
    let weights = Rng::seed(99).normal::<f64>(&out.shape(), 0.0, 1.0)?;
    let project = |o: &Var<f64>| -> f64 { o.value().data().iter().zip(weights.data()).map(|(a, b)| a * b).sum() };
    out.backward_with(weights.clone())?;
    for (i, input) in inputs.iter().enumerate() {
        let analytic = match vars[i].grad() {
            Some(g) => g,
            None => Tensor::zeros(input.shape())?,
        };
        if analytic.shape() != input.shape() {
            bail!(shape, "gradcheck", "input {i}: the gradient has shape {:?}, the input {:?}", analytic.shape(), input.shape());
        }
        let n = input.numel();
        for j in (0..n).step_by((n / CHECKED).max(1)) {
            let moved = |delta: f64| -> Result<f64> {
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
                no_grad(|| f(&args)).map(|o| project(&o))
            };
            let numeric = (moved(STEP)? - moved(-STEP)?) / (2.0 * STEP);
            let a = analytic.data()[j];
            // Written so that a NaN on either side is a mismatch.
            let close = (a - numeric).abs() <= tol * (1.0 + a.abs().max(numeric.abs()));
            if !close {
                bail!(
                    arg,
                    "gradcheck",
                    "input {i} (shape {:?}) element {j}: backward gives {a}, finite differences {numeric} (tolerance {tol})",
                    input.shape()
                );
            }
        }
    }
    Ok(())
}
