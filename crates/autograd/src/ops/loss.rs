//! Softmax, log-softmax and the losses. Softmax, log-softmax and NLL are primitives; every
//! loss is composed from primitives.

use stride_kernels::softmax as k;
use stride_tensor::{Elem, Result, Tensor};

use crate::device::{route, Prim, ToDevice};
use crate::op::Op;
use crate::Var;

fn split_axis(op: &'static str, shape: &[usize], axis: usize) -> Result<(usize, usize, usize)> {
    stride_tensor::shape::check_axis(op, axis, shape)?;
    if shape[axis] == 0 {
        stride_tensor::bail!(shape, op, "axis {axis} of shape {shape:?} is empty");
    }
    Ok((shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product()))
}

/// Softmax along `axis`.
pub fn softmax<T: Elem>(x: &Var<T>, axis: usize) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::Softmax { axis }, &[x])? {
        return Ok(y);
    }
    let (o, d, i) = split_axis("softmax", &x.shape(), axis)?;
    let y = Tensor::from_vec(k::softmax(x.value_ref().data(), o, d, i), &x.shape())?;
    Ok(Var::from_op(y, Op::Softmax { axis }, &[x]))
}

/// Log-softmax along `axis` (stable: the maximum is subtracted first).
pub fn log_softmax<T: Elem>(x: &Var<T>, axis: usize) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::LogSoftmax { axis }, &[x])? {
        return Ok(y);
    }
    let (o, d, i) = split_axis("log_softmax", &x.shape(), axis)?;
    let y = Tensor::from_vec(k::log_softmax(x.value_ref().data(), o, d, i), &x.shape())?;
    Ok(Var::from_op(y, Op::LogSoftmax { axis }, &[x]))
}

pub(crate) fn softmax_backward<T: Elem>(g: &Tensor<T>, y: &Tensor<T>, axis: usize, log: bool) -> Result<Tensor<T>> {
    let (o, d, i) = split_axis("softmax", y.shape(), axis)?;
    let dx = if log { k::log_softmax_backward(y.data(), g.data(), o, d, i) } else { k::softmax_backward(y.data(), g.data(), o, d, i) };
    Tensor::from_vec(dx, y.shape())
}

fn check_targets(op: &'static str, shape: &[usize], targets: &[usize]) -> Result<(usize, usize)> {
    let [n, c] = shape[..] else {
        stride_tensor::bail!(shape, op, "expects [N, C] scores, got shape {shape:?}");
    };
    if targets.len() != n {
        stride_tensor::bail!(shape, op, "{} targets for a batch of {n}", targets.len());
    }
    if let Some((i, &t)) = targets.iter().enumerate().find(|(_, &t)| t >= c) {
        stride_tensor::bail!(arg, op, "target {t} at position {i} is not a class index below {c}");
    }
    if n == 0 {
        stride_tensor::bail!(shape, op, "the batch is empty");
    }
    Ok((n, c))
}

/// Negative log-likelihood of log-probabilities [N, C] at class indices, batch mean.
pub fn nll_loss<T: Elem>(logp: &Var<T>, targets: &[usize]) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::Nll { targets: targets.to_vec() }, &[logp])? {
        return Ok(y);
    }
    let (n, c) = check_targets("nll_loss", &logp.shape(), targets)?;
    let v = logp.value();
    let total: f64 = targets.iter().enumerate().map(|(i, &t)| v.data()[i * c + t].as_f64()).sum();
    let loss = Tensor::scalar(T::c(-total / n as f64));
    Ok(Var::from_op(loss, Op::Nll { targets: targets.to_vec() }, &[logp]))
}

pub(crate) fn nll_backward<T: Elem>(g: &Tensor<T>, shape: &[usize], targets: &[usize]) -> Result<Tensor<T>> {
    let (n, c) = (shape[0], shape[1]);
    let gv = g.item()? / T::c(n as f64);
    let mut dx = vec![T::zero(); n * c];
    for (i, &t) in targets.iter().enumerate() {
        dx[i * c + t] = -gv;
    }
    Tensor::from_vec(dx, shape)
}

/// Softmax cross-entropy of logits [N, C] against class indices, batch mean, with optional
/// label smoothing ε: the target puts 1-ε on the class and ε/C on every class (PyTorch's rule).
pub fn cross_entropy<T: Elem>(logits: &Var<T>, targets: &[usize], label_smoothing: f64) -> Result<Var<T>> {
    if !(0.0..=1.0).contains(&label_smoothing) {
        stride_tensor::bail!(arg, "cross_entropy", "label_smoothing must be in [0, 1], got {label_smoothing}");
    }
    check_targets("cross_entropy", &logits.shape(), targets)?;
    let logp = log_softmax(logits, 1)?;
    let nll = nll_loss(&logp, targets)?;
    if label_smoothing == 0.0 {
        return Ok(nll);
    }
    // The smoothing term: -(1/N) sum_n (1/C) sum_c logp[n, c], which is -mean(logp).
    let uniform = logp.mean_all()?.mul_scalar(-1.0)?;
    nll.mul_scalar(1.0 - label_smoothing)?.add(&uniform.mul_scalar(label_smoothing)?)
}

/// [`cross_entropy`] with a weight per class, as PyTorch's `cross_entropy(weight=w,
/// label_smoothing=ε)` (Keras's `class_weight`): image n counts `w[y_n]` times, the smoothing
/// term weighs class c by `w[c]`, and the sum is divided by the batch's total weight
/// `sum_n w[y_n]`.
/// Weights must be finite and >= 0, one per class, with a positive total for the batch.
pub fn weighted_cross_entropy<T: Elem>(logits: &Var<T>, targets: &[usize], weight: &[f64], label_smoothing: f64) -> Result<Var<T>> {
    if !(0.0..=1.0).contains(&label_smoothing) {
        stride_tensor::bail!(arg, "weighted_cross_entropy", "label_smoothing must be in [0, 1], got {label_smoothing}");
    }
    let (n, c) = check_targets("weighted_cross_entropy", &logits.shape(), targets)?;
    if weight.len() != c {
        stride_tensor::bail!(shape, "weighted_cross_entropy", "{} class weights for {c} classes", weight.len());
    }
    if let Some((k, w)) = weight.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
        stride_tensor::bail!(arg, "weighted_cross_entropy", "class {k}'s weight {w} is not a finite number >= 0");
    }
    let total: f64 = targets.iter().map(|&t| weight[t]).sum();
    if total <= 0.0 {
        stride_tensor::bail!(arg, "weighted_cross_entropy", "the batch's classes all have weight 0, so its loss is undefined");
    }
    // loss = -sum_{n,c} logp[n, c] * m[n, c], with m the weighted target over the total.
    let smooth = label_smoothing / c as f64;
    let mut m = vec![T::zero(); n * c];
    for (row, &t) in m.chunks_exact_mut(c).zip(targets) {
        for (k, v) in row.iter_mut().enumerate() {
            let on = if k == t { (1.0 - label_smoothing) * weight[t] } else { 0.0 };
            *v = T::c(-(on + smooth * weight[k]) / total);
        }
    }
    let device = logits.value_ref().device();
    let m = Var::constant(Tensor::from_vec(m, &[n, c])?.to(device)?);
    log_softmax(logits, 1)?.mul(&m)?.sum_all()
}

/// How an element-wise loss is reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Keep the per-element losses.
    None,
    #[default]
    Mean,
    Sum,
}

fn reduce<T: Elem>(v: Var<T>, r: Reduction) -> Result<Var<T>> {
    match r {
        Reduction::None => Ok(v),
        Reduction::Mean => v.mean_all(),
        Reduction::Sum => v.sum_all(),
    }
}

fn same_shape<T: Elem>(op: &'static str, a: &Var<T>, b: &Var<T>) -> Result<()> {
    if a.shape() != b.shape() {
        stride_tensor::bail!(shape, op, "prediction has shape {:?} but the target has {:?}", a.shape(), b.shape());
    }
    Ok(())
}

/// Binary cross-entropy on probabilities: -(y log p + (1-y) log(1-p)), each log floored at
/// -100 as PyTorch's `BCELoss`, so p = 0 or 1 gives a finite loss.
pub fn binary_cross_entropy<T: Elem>(p: &Var<T>, y: &Var<T>, r: Reduction) -> Result<Var<T>> {
    same_shape("binary_cross_entropy", p, y)?;
    let log_p = p.ln()?.clamp(-100.0, f64::INFINITY)?;
    let log_1mp = p.mul_scalar(-1.0)?.add_scalar(1.0)?.ln()?.clamp(-100.0, f64::INFINITY)?;
    let one_minus_y = y.mul_scalar(-1.0)?.add_scalar(1.0)?;
    let l = y.mul(&log_p)?.add(&one_minus_y.mul(&log_1mp)?)?.neg()?;
    reduce(l, r)
}

/// Binary cross-entropy on logits, stable for any x: softplus(x) - x*y.
pub fn binary_cross_entropy_with_logits<T: Elem>(x: &Var<T>, y: &Var<T>, r: Reduction) -> Result<Var<T>> {
    same_shape("binary_cross_entropy_with_logits", x, y)?;
    reduce(x.softplus()?.sub(&x.mul(y)?)?, r)
}

/// Mean squared error (or its sum / per-element values).
pub fn mse_loss<T: Elem>(a: &Var<T>, b: &Var<T>, r: Reduction) -> Result<Var<T>> {
    same_shape("mse_loss", a, b)?;
    reduce(a.sub(b)?.square()?, r)
}

/// Mean absolute error.
pub fn l1_loss<T: Elem>(a: &Var<T>, b: &Var<T>, r: Reduction) -> Result<Var<T>> {
    same_shape("l1_loss", a, b)?;
    reduce(a.sub(b)?.abs()?, r)
}

/// The KL divergence of N(mu, sigma^2) from N(0, 1) in a VAE, summed over the latent axis and
/// averaged over the batch: mean_n 0.5 * sum_d (mu^2 + sigma^2 - log(1e-8 + sigma^2) - 1).
pub fn gaussian_kl<T: Elem>(mu: &Var<T>, sigma: &Var<T>) -> Result<Var<T>> {
    same_shape("gaussian_kl", mu, sigma)?;
    let s = mu.shape();
    if s.len() != 2 || s[0] == 0 {
        stride_tensor::bail!(shape, "gaussian_kl", "expects non-empty [N, D] mu and sigma, got {s:?}");
    }
    let s2 = sigma.square()?;
    let inner = mu.square()?.add(&s2)?.sub(&s2.add_scalar(1e-8)?.ln()?)?.add_scalar(-1.0)?;
    inner.sum_all()?.mul_scalar(0.5 / s[0] as f64)
}
