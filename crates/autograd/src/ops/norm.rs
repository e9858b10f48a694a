//! Batch normalisation (primitive), layer normalisation and dropout (composites).

use stride_kernels::norm;
use stride_tensor::{Elem, Result, Rng, Tensor};

use crate::device::{route_with, Prim, ToDevice};
use crate::op::Op;
use crate::Var;

/// Options of [`batch_norm`] with PyTorch's defaults (momentum 0.1, eps 1e-5).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormOptions {
    pub momentum: f64,
    pub eps: f64,
}

impl Default for BatchNormOptions {
    fn default() -> Self {
        BatchNormOptions { momentum: 0.1, eps: 1e-5 }
    }
}

/// How synchronised batch norm adds up its per-channel sums over all processes: element-wise
/// sum in place, called by every process at the same point (an all-reduce).
#[derive(Clone)]
pub struct SyncStats(pub std::rc::Rc<SumOver>);

/// Sums a buffer element-wise over all processes, in place.
pub type SumOver = dyn Fn(&mut [f64]) -> Result<()>;

impl std::fmt::Debug for SyncStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncStats")
    }
}

/// Batch norm over axis 1 of x ([N, C] or [N, C, H, W]; any trailing axes).
/// Training: normalises with the batch's statistics and moves the running ones towards them
/// (`running = (1 - momentum) * running + momentum * batch`, with the unbiased variance, as
/// PyTorch). Evaluation: normalises with the running statistics and changes nothing.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm<T: Elem>(
    x: &Var<T>,
    gamma: &Var<T>,
    beta: &Var<T>,
    running_mean: &mut Tensor<T>,
    running_var: &mut Tensor<T>,
    training: bool,
    opts: BatchNormOptions,
) -> Result<Var<T>> {
    batch_norm_sync(x, gamma, beta, running_mean, running_var, training, opts, None)
}

/// [`batch_norm`] whose training statistics are those of every process's batch together
/// (PyTorch's SyncBatchNorm) when `sync` is given: the forward pass adds up each channel's sum,
/// sum of squares and count over the processes, the backward pass the sums of dy and dy * xhat.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_sync<T: Elem>(
    x: &Var<T>,
    gamma: &Var<T>,
    beta: &Var<T>,
    running_mean: &mut Tensor<T>,
    running_var: &mut Tensor<T>,
    training: bool,
    opts: BatchNormOptions,
    sync: Option<&SyncStats>,
) -> Result<Var<T>> {
    let sync = sync.filter(|_| training);
    const OP: &str = "batch_norm";
    if let (Some(sync), false) = (sync, x.device().is_cpu()) {
        return batch_norm_sync_device(x, gamma, beta, running_mean, running_var, opts, sync);
    }
    if let Some((y, state)) = route_with(|| Prim::BatchNorm { training, opts }, &[x, gamma, beta], &[running_mean, running_var])? {
        if let [m, v] = &state[..] {
            (*running_mean, *running_var) = (m.clone(), v.clone());
        }
        return Ok(y);
    }
    let s = x.shape();
    let (n, c, l) = check_inputs(&s, gamma, beta, running_mean, running_var, opts)?;
    let xv = x.value();
    let (mean, invstd) = if training {
        let st = match sync {
            Some(sync) => {
                // Sums of every process: [sum per channel, sum of squares per channel, count].
                let mut buf: Vec<f64> = norm::channel_sums(xv.data(), n, c, l).into_iter().flat_map(|(a, b)| [a, b]).collect();
                buf.push((n * l) as f64);
                (sync.0)(&mut buf)?;
                let m = buf[2 * c];
                if m <= 1.0 {
                    stride_tensor::bail!(shape, OP, "training needs more than one value per channel over all processes, got {m}");
                }
                let per: Vec<(f64, f64)> = (0..c).map(|ch| (buf[2 * ch] / m, (buf[2 * ch + 1] / m - (buf[2 * ch] / m).powi(2)).max(0.0))).collect();
                norm::BatchStats {
                    mean: per.iter().map(|p| T::c(p.0)).collect(),
                    invstd: per.iter().map(|p| T::c(1.0 / (p.1 + opts.eps).sqrt())).collect(),
                    var_unbiased: per.iter().map(|p| T::c(p.1 * m / (m - 1.0))).collect(),
                }
            }
            None => {
                if n * l <= 1 {
                    stride_tensor::bail!(shape, OP, "training needs more than one value per channel, got input {s:?}");
                }
                norm::batch_stats(xv.data(), n, c, l, opts.eps)
            }
        };
        let m = T::c(opts.momentum);
        for (r, &b) in running_mean.data_mut().iter_mut().zip(&st.mean) {
            *r = (T::one() - m) * *r + m * b;
        }
        for (r, &b) in running_var.data_mut().iter_mut().zip(&st.var_unbiased) {
            *r = (T::one() - m) * *r + m * b;
        }
        (st.mean, st.invstd)
    } else {
        let inv = running_var.data().iter().map(|&v| T::one() / (v + T::c(opts.eps)).sqrt()).collect();
        (running_mean.data().to_vec(), inv)
    };
    let y = norm::normalize(xv.data(), c, l, &mean, &invstd, gamma.value_ref().data(), beta.value_ref().data());
    let y = Tensor::from_vec(y, &s)?;
    Ok(Var::from_op(y, Op::BatchNorm { mean, invstd, training, sync: sync.cloned(), opts }, &[x, gamma, beta]))
}

/// [N, C, L] of batch norm's input `s` (L the product of the axes after C), once the weight,
/// bias and running statistics have C values each and eps and momentum are in range.
fn check_inputs<T: Elem>(
    s: &[usize],
    gamma: &Var<T>,
    beta: &Var<T>,
    rm: &Tensor<T>,
    rv: &Tensor<T>,
    opts: BatchNormOptions,
) -> Result<(usize, usize, usize)> {
    const OP: &str = "batch_norm";
    if s.len() < 2 {
        stride_tensor::bail!(shape, OP, "expects at least [N, C], got shape {s:?}");
    }
    let (n, c, l) = (s[0], s[1], s[2..].iter().product::<usize>());
    for (name, t) in [("weight", gamma.shape()), ("bias", beta.shape()), ("running_mean", rm.shape().to_vec()), ("running_var", rv.shape().to_vec())]
    {
        if t != [c] {
            stride_tensor::bail!(shape, OP, "{name} has shape {t:?} but the input has {c} channels (input {s:?})");
        }
    }
    if opts.eps.is_nan() || opts.eps <= 0.0 || !(0.0..=1.0).contains(&opts.momentum) {
        stride_tensor::bail!(arg, OP, "eps must be positive and momentum in [0, 1], got eps {} momentum {}", opts.eps, opts.momentum);
    }
    Ok((n, c, l))
}

/// Synchronised batch norm in training on a device: composed of the device's primitives and
/// [`all_sum`], so only the per-channel sums cross to the host (2C values forward, and again
/// backward through `all_sum`'s gradient); autograd differentiates the composition, which gives
/// SyncBatchNorm's gradient. The variance is E[x^2] - mean^2 from the device's sums.
fn batch_norm_sync_device<T: Elem>(
    x: &Var<T>,
    gamma: &Var<T>,
    beta: &Var<T>,
    running_mean: &mut Tensor<T>,
    running_var: &mut Tensor<T>,
    opts: BatchNormOptions,
    sync: &SyncStats,
) -> Result<Var<T>> {
    const OP: &str = "batch_norm";
    let s = x.shape();
    let (n, c, l) = check_inputs(&s, gamma, beta, running_mean, running_var, opts)?;
    let mut count = [(n * l) as f64];
    (sync.0)(&mut count)?;
    let m = count[0];
    if m <= 1.0 {
        stride_tensor::bail!(shape, OP, "training needs more than one value per channel over all processes, got {m}");
    }
    let axes: Vec<usize> = (0..s.len()).filter(|&a| a != 1).collect();
    let per_channel: Vec<usize> = s.iter().enumerate().map(|(a, &d)| if a == 1 { d } else { 1 }).collect();
    let sums = all_sum(&crate::ops::shape::concat(&[&x.sum(&axes, false)?, &x.square()?.sum(&axes, false)?], 0)?, sync)?;
    let mean = sums.narrow(0, 0, c)?.mul_scalar(1.0 / m)?;
    let var = sums.narrow(0, c, c)?.mul_scalar(1.0 / m)?.sub(&mean.square()?)?.relu()?;
    let scale = var.add_scalar(opts.eps)?.powf(-0.5)?.mul(gamma)?;
    let y = x.sub(&mean.reshape(&per_channel)?)?.mul(&scale.reshape(&per_channel)?)?.add(&beta.reshape(&per_channel)?)?;
    // running = (1 - momentum) * running + momentum * batch, with the unbiased variance.
    crate::no_grad(|| -> Result<()> {
        let mom = opts.momentum;
        let blend = |r: &Tensor<T>, b: &Var<T>| Var::constant(r.clone()).mul_scalar(1.0 - mom)?.add(&b.detach().mul_scalar(mom)?);
        let new_mean = blend(running_mean, &mean)?.value();
        let new_var = blend(running_var, &var.mul_scalar(m / (m - 1.0))?)?.value();
        (*running_mean, *running_var) = (new_mean, new_var);
        Ok(())
    })?;
    Ok(y)
}

/// `t` summed element-wise over every process by `sum` (in f64, on the host), back where `t`
/// lives.
pub(crate) fn all_sum_tensor<T: Elem>(t: &Tensor<T>, sum: &SyncStats) -> Result<Tensor<T>> {
    let mut buf: Vec<f64> = t.to_host()?.data().iter().map(|v| v.as_f64()).collect();
    (sum.0)(&mut buf)?;
    let host = Tensor::from_vec(buf.into_iter().map(T::c).collect(), t.shape())?;
    host.to(t.device())
}

/// `x` summed element-wise over every process (an all-reduce), differentiably: the gradient of
/// every process's loss with respect to the sum reaches each process's `x` as the sum of the
/// processes' gradients.
pub(crate) fn all_sum<T: Elem>(x: &Var<T>, sum: &SyncStats) -> Result<Var<T>> {
    let y = all_sum_tensor(&x.value(), sum)?;
    Ok(Var::from_op(y, Op::AllSum { sum: sum.clone() }, &[x]))
}

pub(crate) fn batch_norm_backward<T: Elem>(
    g: &Tensor<T>,
    x: &[Tensor<T>],
    mean: &[T],
    invstd: &[T],
    training: bool,
    sync: Option<&SyncStats>,
) -> Result<Vec<Option<Tensor<T>>>> {
    let s = x[0].shape();
    let (n, c, l) = (s[0], s[1], s[2..].iter().product::<usize>());
    let (dx, dg, db) = match sync {
        Some(sync) => {
            // gamma's and beta's gradients stay this process's (they are summed with the other
            // gradients); the input's needs every process's sums.
            let (dg, db) = norm::backward_sums(g.data(), x[0].data(), n, c, l, mean, invstd);
            let mut buf: Vec<f64> = dg.iter().chain(&db).map(|v| v.as_f64()).collect();
            buf.push((n * l) as f64);
            (sync.0)(&mut buf)?;
            let (sdg, sdb): (Vec<T>, Vec<T>) = ((0..c).map(|i| T::c(buf[i])).collect(), (0..c).map(|i| T::c(buf[c + i])).collect());
            let dx = norm::backward_dx(g.data(), x[0].data(), c, l, mean, invstd, x[1].data(), Some((&sdg, &sdb, buf[2 * c])));
            (dx, dg, db)
        }
        None => norm::backward(g.data(), x[0].data(), n, c, l, mean, invstd, x[1].data(), training),
    };
    Ok(vec![Some(Tensor::from_vec(dx, s)?), Some(Tensor::from_vec(dg, &[c])?), Some(Tensor::from_vec(db, &[c])?)])
}

/// Inverted dropout: in training, zeroes each element with probability `p` and scales the
/// rest by 1/(1-p); in evaluation, the identity (composite: a product with a constant mask).
pub fn dropout<T: Elem>(x: &Var<T>, p: f64, training: bool, rng: &mut Rng) -> Result<Var<T>> {
    if !(0.0..=1.0).contains(&p) {
        stride_tensor::bail!(arg, "dropout", "probability must be in [0, 1], got {p}");
    }
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    let keep = if p >= 1.0 { 0.0 } else { 1.0 / (1.0 - p) };
    let shape = x.shape();
    let mask = Tensor::from_fn(&shape, |_| T::c(if rng.uniform01() >= p { keep } else { 0.0 }))?;
    x.mul(&Var::constant(mask.to(x.device())?))
}

/// Dropout2d: zeroes whole channels of [N, C, H, W] with probability `p` (composite).
pub fn dropout2d<T: Elem>(x: &Var<T>, p: f64, training: bool, rng: &mut Rng) -> Result<Var<T>> {
    if !(0.0..=1.0).contains(&p) {
        stride_tensor::bail!(arg, "dropout2d", "probability must be in [0, 1], got {p}");
    }
    let s = x.shape();
    if s.len() != 4 {
        stride_tensor::bail!(shape, "dropout2d", "expects [N, C, H, W], got {s:?}");
    }
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    let keep = if p >= 1.0 { 0.0 } else { 1.0 / (1.0 - p) };
    let mask = Tensor::from_fn(&[s[0], s[1], 1, 1], |_| T::c(if rng.uniform01() >= p { keep } else { 0.0 }))?;
    x.mul(&Var::constant(mask.to(x.device())?))
}

/// Layer normalisation over the trailing axes the weight's shape covers (PyTorch's
/// `F.layer_norm(x, weight.shape, weight, bias, eps)`): each sample's values there shifted to
/// mean 0 and scaled to variance 1 (the biased variance, plus `eps`), times `weight`, plus
/// `bias` (composite, so its gradient and every device come from the ops it is made of).
pub fn layer_norm<T: Elem>(x: &Var<T>, weight: &Var<T>, bias: Option<&Var<T>>, eps: f64) -> Result<Var<T>> {
    let (s, w) = (x.shape(), weight.shape());
    let rank = s.len();
    if w.is_empty() || rank < w.len() || s[rank - w.len()..] != w[..] {
        stride_tensor::bail!(shape, "layer_norm", "normalises over trailing axes {w:?}; the input is {s:?}");
    }
    if let Some(b) = bias.filter(|b| b.shape() != w) {
        stride_tensor::bail!(shape, "layer_norm", "bias of shape {:?} for a weight of shape {w:?}", b.shape());
    }
    let axes: Vec<usize> = (rank - w.len()..rank).collect();
    let centred = x.sub(&x.mean(&axes, true)?)?;
    let inv_std = centred.square()?.mean(&axes, true)?.add_scalar(eps)?.powf(-0.5)?;
    let y = centred.mul(&inv_std)?.mul(weight)?;
    match bias {
        Some(b) => y.add(b),
        None => Ok(y),
    }
}
