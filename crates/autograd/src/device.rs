//! The device seam: where the 26 primitives are sent when their inputs are not on the CPU.
//!
//! Every primitive's forward starts with `route`: inputs on the CPU run the CPU kernels that
//! follow it (the default, unchanged path); inputs on another device go to that device's
//! [`Backend`], and the result is recorded as `Op::Device`, whose backward pass
//! goes to the same backend. Nothing above this crate knows which device runs: layers, losses
//! and optimizers call the same ops. A backend (the CUDA one lives in `stride-cuda`) registers
//! itself with [`register`]; [`ToDevice::to`] moves tensors, `Var::to` leaves.

use std::any::{Any, TypeId};
use std::sync::{Arc, RwLock};

use stride_kernels::conv::Conv2dOptions;
use stride_kernels::pool::Pool2dOptions;
use stride_kernels::unary::Unary;
use stride_tensor::{Device, DeviceBuffer, Elem, Error, Result, Tensor};

use crate::ops::norm::BatchNormOptions;
use crate::Var;

/// A primitive with the arguments of its forward pass: what a backend is asked to run. The
/// tensors come separately, in the order of the op's signature (conv: x, weight[, bias];
/// batch norm: x, weight, bias, running mean, running variance).
#[derive(Clone, Debug, PartialEq)]
pub enum Prim {
    Add,
    Sub,
    Mul,
    Div,
    Unary(Unary),
    Sum { axes: Vec<usize>, keepdim: bool },
    Max { axis: usize, keepdim: bool },
    Permute { perm: Vec<usize> },
    Narrow { axis: usize, start: usize, len: usize },
    Pad { pads: Vec<(usize, usize)>, value: f64 },
    Concat { axis: usize },
    UpsampleNearest { scale: (usize, usize) },
    MatMul { transpose_b: bool },
    Conv2d { opts: Conv2dOptions },
    ConvTranspose2d { opts: Conv2dOptions },
    MaxPool2d { opts: Pool2dOptions },
    AvgPool2d { opts: Pool2dOptions },
    LpPool2d { p: f64, opts: Pool2dOptions },
    AdaptiveAvgPool2d { out: (usize, usize) },
    AdaptiveMaxPool2d { out: (usize, usize) },
    ChannelMaxPool { depth: usize, stride: usize },
    BatchNorm { training: bool, opts: BatchNormOptions },
    Softmax { axis: usize },
    LogSoftmax { axis: usize },
    Nll { targets: Vec<usize> },
}

impl Prim {
    /// The name in [`crate::PRIMITIVES`].
    pub fn name(&self) -> &'static str {
        match self {
            Prim::Add => "add",
            Prim::Sub => "sub",
            Prim::Mul => "mul",
            Prim::Div => "div",
            Prim::Unary(_) => "unary",
            Prim::Sum { .. } => "sum",
            Prim::Max { .. } => "max",
            Prim::Permute { .. } => "permute",
            Prim::Narrow { .. } => "narrow",
            Prim::Pad { .. } => "pad",
            Prim::Concat { .. } => "concat",
            Prim::UpsampleNearest { .. } => "upsample_nearest2d",
            Prim::MatMul { .. } => "matmul",
            Prim::Conv2d { .. } => "conv2d",
            Prim::ConvTranspose2d { .. } => "conv_transpose2d",
            Prim::MaxPool2d { .. } => "max_pool2d",
            Prim::AvgPool2d { .. } => "avg_pool2d",
            Prim::LpPool2d { .. } => "lp_pool2d",
            Prim::AdaptiveAvgPool2d { .. } => "adaptive_avg_pool2d",
            Prim::AdaptiveMaxPool2d { .. } => "adaptive_max_pool2d",
            Prim::ChannelMaxPool { .. } => "channel_max_pool",
            Prim::BatchNorm { .. } => "batch_norm",
            Prim::Softmax { .. } => "softmax",
            Prim::LogSoftmax { .. } => "log_softmax",
            Prim::Nll { .. } => "nll_loss",
        }
    }
}

/// What a backend's forward pass returns.
pub struct Forward<T: Elem> {
    pub y: Tensor<T>,
    /// Tensors the op updates besides its output: batch norm's new running mean and variance
    /// in training (empty otherwise).
    pub state: Vec<Tensor<T>>,
    /// Whatever the backward pass needs (argmax indices, batch statistics, ...).
    pub saved: Box<dyn Any>,
}

/// A device's implementation of the primitives. Inputs handed to it are all on its device;
/// what it returns must be too.
pub trait Backend<T: Elem>: Send + Sync {
    fn device(&self) -> Device;
    /// One line for `stride devices`: the device's name and what runs it.
    fn describe(&self) -> String;
    /// Copies host elements to the device.
    fn upload(&self, host: &[T]) -> Result<Arc<dyn DeviceBuffer<T>>>;
    fn forward(&self, prim: &Prim, x: &[Tensor<T>]) -> Result<Forward<T>>;
    /// Gradients for each input of `forward` (None where the input gets none), given the output
    /// gradient `g`, the inputs `x`, the output `y` and what `forward` saved.
    fn backward(&self, prim: &Prim, saved: &dyn Any, g: &Tensor<T>, x: &[Tensor<T>], y: &Tensor<T>) -> Result<Vec<Option<Tensor<T>>>>;
    /// A tensor of `shape` with every element `value`, made where it lives (by default
    /// uploaded from the host; a GPU backend fills it there, so a training step's seed
    /// gradient is no copy from the host).
    fn full(&self, shape: &[usize], value: T) -> Result<Tensor<T>> {
        let host = Tensor::full(shape, value)?;
        Tensor::from_device(self.upload(host.data())?, shape)
    }
    /// Waits until the work queued so far is done (for timing; reading a value back waits too).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// An optimizer's update of one parameter `w` with gradient `g` and the rule's state
    /// tensors: the new weight and state. By default on the host (a round trip); a GPU backend
    /// runs it where the tensors are.
    fn update(&self, rule: &Update, w: &Tensor<T>, g: &Tensor<T>, state: &[Tensor<T>]) -> Result<(Tensor<T>, Vec<Tensor<T>>)> {
        let (wh, st) = rule.on_host(w, g, state)?;
        let up = |t: &Tensor<T>| Tensor::from_device(self.upload(t.data())?, t.shape());
        Ok((up(&wh)?, st.iter().map(up).collect::<Result<_>>()?))
    }
    /// [`Backend::update`] of several parameters by one rule (an optimizer's step): by default
    /// one at a time; a GPU backend updates a list of them per launch.
    fn update_many(&self, rule: &Update, items: &[UpdateItem<'_, T>]) -> Result<Vec<Updated<T>>> {
        items.iter().map(|(w, g, state)| self.update(rule, w, g, state)).collect()
    }
}

/// A parameter for [`Backend::update_many`]: its weight, gradient and the rule's state tensors.
pub type UpdateItem<'a, T> = (&'a Tensor<T>, &'a Tensor<T>, &'a [Tensor<T>]);

/// A parameter's new weight and state, from [`Backend::update_many`].
pub type Updated<T> = (Tensor<T>, Vec<Tensor<T>>);

/// One optimizer step's rule for a parameter, element by element, as PyTorch computes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Update {
    /// SGD: d = g + weight_decay * w; with momentum the state is one buffer, b = d on the first
    /// step and momentum * b + d after, and d becomes b (or d + momentum * b with Nesterov);
    /// then w -= lr * d. In the element type.
    Sgd { lr: f64, momentum: f64, nesterov: bool, weight_decay: f64, first: bool },
    /// Adam (L2 decay added to g) or AdamW (`decoupled`: w shrunk by lr * weight_decay); the
    /// state is the two moments; c1, c2 are the bias corrections 1 - beta^t. In the element type.
    Adam { lr: f64, betas: (f64, f64), c1: f64, c2: f64, eps: f64, weight_decay: f64, decoupled: bool },
    /// RMSprop (not centered), PyTorch's single-tensor formula: g += weight_decay * w;
    /// v = alpha v + (1 - alpha) g^2; the step is g / (sqrt(v) + eps), through a momentum
    /// buffer b = momentum * b + step when momentum > 0; w -= lr * step. The state is v, then b
    /// with momentum. In the element type.
    RmsProp { lr: f64, alpha: f64, eps: f64, momentum: f64, weight_decay: f64 },
}

impl Update {
    /// How many state tensors (each the parameter's size) the rule keeps.
    pub fn state_len(&self) -> usize {
        match self {
            Update::Sgd { momentum, .. } => usize::from(*momentum > 0.0),
            Update::Adam { .. } => 2,
            Update::RmsProp { momentum, .. } => 1 + usize::from(*momentum > 0.0),
        }
    }

    /// The rule on host copies of the tensors: the new weight and state, on the CPU.
    pub fn on_host<T: Elem>(&self, w: &Tensor<T>, g: &Tensor<T>, state: &[Tensor<T>]) -> Result<(Tensor<T>, Vec<Tensor<T>>)> {
        let (mut w, g) = (w.to_host()?, g.to_host()?);
        let mut st = state.iter().map(|s| s.to_host()).collect::<Result<Vec<_>>>()?;
        let mut slices: Vec<&mut [T]> = st.iter_mut().map(|t| t.data_mut()).collect();
        self.apply(w.data_mut(), g.data(), &mut slices);
        Ok((w, st))
    }

    /// The rule on host elements: `state` holds `state_len()` slices of `w`'s length. Element
    /// by element, so chunks on several threads give the bits of one pass.
    pub fn apply<T: Elem>(&self, w: &mut [T], g: &[T], state: &mut [&mut [T]]) {
        match *self {
            Update::Sgd { lr, momentum, nesterov, weight_decay, first } => {
                let (lr, mu, wd) = (T::c(lr), T::c(momentum), T::c(weight_decay));
                match state.first_mut() {
                    Some(b) => sgd_momentum_into(w, b, g, [lr, mu, wd], first, nesterov),
                    None => sgd_into(w, g, [lr, wd]),
                }
            }
            Update::Adam { lr, betas: (b1, b2), c1, c2, eps, weight_decay: wd, decoupled } => {
                let [m, v] = state else { return };
                // PyTorch's single-tensor Adam in the element type: m += (1 - b1)(g - m),
                // v = b2 v + (1 - b2) g^2, w -= (lr / c1) m / (sqrt(v) / sqrt(c2) + eps).
                let (one_b1, b2, one_b2) = (T::c(1.0 - b1), T::c(b2), T::c(1.0 - b2));
                let (step, sqrt_c2, eps) = (T::c(lr / c1), T::c(c2.sqrt()), T::c(eps));
                let (shrink, wd) = (T::c(1.0 - lr * wd), T::c(wd));
                adam_into(w, m, v, g, [one_b1, b2, one_b2, step, sqrt_c2, eps, shrink, wd], decoupled);
            }
            Update::RmsProp { lr, alpha, eps, momentum, weight_decay } => {
                let k = [T::c(lr), T::c(alpha), T::c(1.0 - alpha), T::c(eps), T::c(momentum), T::c(weight_decay)];
                match state {
                    [v] => rmsprop_into(w, v, &mut [], g, k),
                    [v, b] => rmsprop_into(w, v, b, g, k),
                    _ => {}
                }
            }
        }
    }
}

stride_kernels::multiversion! {
    /// Plain SGD's loop over elements (see [`Update::apply`]), for AVX2 as [`adam_into`].
    /// `k` holds lr and the weight decay.
    fn sgd_into<T: Elem>(w: &mut [T], g: &[T], k: [T; 2]) {
        let [lr, wd] = k;
        for (w, &g) in w.iter_mut().zip(g) {
            *w -= lr * (g + wd * *w);
        }
    }
}

stride_kernels::multiversion! {
    /// SGD with a momentum buffer `b`, as [`sgd_into`]; `k` holds lr, momentum and the
    /// weight decay.
    fn sgd_momentum_into<T: Elem>(w: &mut [T], b: &mut [T], g: &[T], k: [T; 3], first: bool, nesterov: bool) {
        let [lr, mu, wd] = k;
        for ((w, b), &g) in w.iter_mut().zip(b.iter_mut()).zip(g) {
            let d = g + wd * *w;
            *b = if first { d } else { mu * *b + d };
            *w -= lr * if nesterov { d + mu * *b } else { *b };
        }
    }
}

stride_kernels::multiversion! {
    /// Adam's loop over elements (see [`Update::apply`]), compiled for AVX2 where the CPU has
    /// it: 8 lanes for its square root and division instead of the baseline's 4. `k` holds
    /// 1 - b1, b2, 1 - b2, lr / c1, sqrt(c2), eps, 1 - lr * wd and wd.
    fn adam_into<T: Elem>(w: &mut [T], m: &mut [T], v: &mut [T], g: &[T], k: [T; 8], decoupled: bool) {
        let [one_b1, b2, one_b2, step, sqrt_c2, eps, shrink, wd] = k;
        // Zipped, not indexed: without bounds checks the loop vectorises.
        for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = if decoupled {
                *w *= shrink;
                g
            } else {
                g + wd * *w
            };
            *m = *m + one_b1 * (g - *m);
            *v = b2 * *v + one_b2 * g * g;
            *w -= step * (*m / (v.sqrt() / sqrt_c2 + eps));
        }
    }
}

stride_kernels::multiversion! {
    /// RMSprop's loop over elements (see [`Update::apply`]), for AVX2 as [`adam_into`]. `b` is
    /// the momentum buffer, or empty without momentum; `k` holds lr, alpha, 1 - alpha, eps,
    /// momentum and the weight decay.
    fn rmsprop_into<T: Elem>(w: &mut [T], v: &mut [T], b: &mut [T], g: &[T], k: [T; 6]) {
        let [lr, alpha, one_alpha, eps, mu, wd] = k;
        if b.is_empty() {
            for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
                let g = g + wd * *w;
                *v = alpha * *v + one_alpha * g * g;
                *w -= lr * (g / (v.sqrt() + eps));
            }
        } else {
            for (((w, v), b), &g) in w.iter_mut().zip(v.iter_mut()).zip(b.iter_mut()).zip(g) {
                let g = g + wd * *w;
                *v = alpha * *v + one_alpha * g * g;
                *b = mu * *b + g / (v.sqrt() + eps);
                *w -= lr * *b;
            }
        }
    }
}

/// Runs an optimizer's `rule` on a parameter on `device` (see [`Backend::update`]).
pub fn update<T: Elem>(device: Device, rule: &Update, w: &Tensor<T>, g: &Tensor<T>, state: &[Tensor<T>]) -> Result<(Tensor<T>, Vec<Tensor<T>>)> {
    let mut out = update_many(device, rule, &[(w, g, state)])?;
    out.pop().ok_or_else(|| Error::device("update", "the backend returned no update"))
}

/// Runs an optimizer's `rule` on several parameters on `device` (see [`Backend::update_many`]):
/// the new weight and state of each, in order.
pub fn update_many<T: Elem>(device: Device, rule: &Update, items: &[UpdateItem<'_, T>]) -> Result<Vec<Updated<T>>> {
    for &(w, g, state) in items {
        if state.len() != rule.state_len() || state.iter().any(|s| s.shape() != w.shape()) || g.shape() != w.shape() {
            return Err(Error::arg(
                "update",
                format!("{rule:?} takes a gradient and {} state tensors of the weight's shape {:?}", rule.state_len(), w.shape()),
            ));
        }
        let mut all = vec![w, g];
        all.extend(state);
        let on = common_device("update", &all)?;
        if on != device {
            return Err(Error::device("update", format!("the tensors are on {on}, not {device}")));
        }
    }
    if device.is_cpu() {
        return items.iter().map(|(w, g, state)| rule.on_host(w, g, state)).collect();
    }
    let out = backend::<T>(device)?.update_many(rule, items)?;
    if out.len() != items.len() {
        return Err(Error::device("update", format!("the backend returned {} updates for {} parameters", out.len(), items.len())));
    }
    Ok(out)
}

type Entry = (TypeId, Device, Arc<dyn Any + Send + Sync>);
static BACKENDS: RwLock<Vec<Entry>> = RwLock::new(Vec::new());

/// Makes `backend` the one that runs primitives on its device for element type `T`
/// (replacing an earlier one for the same device).
pub fn register<T: Elem>(backend: Arc<dyn Backend<T>>) {
    let device = backend.device();
    let mut all = BACKENDS.write().unwrap_or_else(|p| p.into_inner());
    all.retain(|(t, d, _)| !(*t == TypeId::of::<T>() && *d == device));
    all.push((TypeId::of::<T>(), device, Arc::new(backend)));
}

/// The backend registered for `device`, or an error that says how to get one.
pub fn backend<T: Elem>(device: Device) -> Result<Arc<dyn Backend<T>>> {
    let all = BACKENDS.read().unwrap_or_else(|p| p.into_inner());
    all.iter()
        .find(|(t, d, _)| *t == TypeId::of::<T>() && *d == device)
        .and_then(|(_, _, b)| b.downcast_ref::<Arc<dyn Backend<T>>>().cloned())
        .ok_or_else(|| {
            Error::device(
                "device",
                format!("no {} backend for {device} is set up (the CLI's --device does it; a program calls stride_cuda::init first)", T::NAME),
            )
        })
}

/// Waits for `device`'s queued work (nothing to wait for on the CPU).
pub fn synchronize<T: Elem>(device: Device) -> Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    backend::<T>(device)?.synchronize()
}

/// Moving a tensor between devices (PyTorch's `tensor.to(device)`).
pub trait ToDevice: Sized {
    fn to(&self, device: Device) -> Result<Self>;
}

impl<T: Elem> ToDevice for Tensor<T> {
    fn to(&self, device: Device) -> Result<Self> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let host = self.to_host()?;
        if device.is_cpu() {
            return Ok(host);
        }
        let buf = backend::<T>(device)?.upload(host.data())?;
        Tensor::from_device(buf, host.shape())
    }
}

/// The one device of an op's inputs, or an error naming the op and the devices it was given.
pub(crate) fn common_device<T: Elem>(op: &'static str, values: &[&Tensor<T>]) -> Result<Device> {
    let first = values.first().map_or(Device::Cpu, |v| v.device());
    if let Some(other) = values.iter().map(|v| v.device()).find(|d| *d != first) {
        return Err(Error::device(op, format!("expects all its inputs on one device, got {first} and {other} (move them with .to(device))")));
    }
    Ok(first)
}

/// The routing step at the top of every primitive: `None` when the inputs are on the CPU (the
/// caller runs its CPU kernels); otherwise the result of the inputs' device's backend, recorded
/// for the backward pass.
pub(crate) fn route<T: Elem>(prim: impl FnOnce() -> Prim, parents: &[&Var<T>]) -> Result<Option<Var<T>>> {
    Ok(route_with(prim, parents, &[])?.map(|(y, _)| y))
}

/// An op's recorded result and the new values of the tensors it updates outside the graph.
pub(crate) type Routed<T> = (Var<T>, Vec<Tensor<T>>);

/// [`route`] for an op that also reads tensors outside the graph (`extra`, after the parents'
/// values) and gets their new values back (batch norm's running statistics).
pub(crate) fn route_with<T: Elem>(prim: impl FnOnce() -> Prim, parents: &[&Var<T>], extra: &[&Tensor<T>]) -> Result<Option<Routed<T>>> {
    // The CPU path asks for nothing but each input's device.
    if parents.iter().all(|p| p.value_ref().device().is_cpu()) && extra.iter().all(|t| t.device().is_cpu()) {
        return Ok(None);
    }
    let mut values: Vec<Tensor<T>> = parents.iter().map(|p| p.value()).collect();
    values.extend(extra.iter().map(|&t| t.clone()));
    let prim = prim();
    let device = common_device(prim.name(), &values.iter().collect::<Vec<_>>())?;
    let backend = backend::<T>(device)?;
    let out = backend.forward(&prim, &values)?;
    check_output(&*backend, &prim, &out.y)?;
    for s in &out.state {
        check_output(&*backend, &prim, s)?;
    }
    let y = Var::from_op(out.y, crate::op::Op::Device { prim, backend, saved: out.saved }, parents);
    Ok(Some((y, out.state)))
}

/// A backend must answer on its own device.
pub(crate) fn check_output<T: Elem>(backend: &dyn Backend<T>, prim: &Prim, y: &Tensor<T>) -> Result<()> {
    if y.device() != backend.device() {
        return Err(Error::device(prim.name(), format!("the {} backend returned a tensor on {}", backend.device(), y.device())));
    }
    Ok(())
}

/// `acc += g` on whatever device they are on (gradient accumulation).
pub(crate) fn accumulate<T: Elem>(acc: &mut Tensor<T>, g: &Tensor<T>) -> Result<()> {
    let device = common_device("backward", &[acc, g])?;
    if device.is_cpu() {
        return acc.add_assign(g);
    }
    let sum = backend::<T>(device)?.forward(&Prim::Add, &[acc.clone(), g.clone()])?;
    *acc = sum.y;
    Ok(())
}

/// [`cpu_forward`]'s output, the tensors the op updated (batch norm's running statistics in
/// training) and what its backward pass needs.
pub type CpuRun<T> = (Tensor<T>, Vec<Tensor<T>>, CpuSaved<T>);

/// What [`cpu_forward`] keeps for [`cpu_backward`]: the little CPU graph it ran.
pub struct CpuSaved<T: Elem> {
    inputs: Vec<Var<T>>,
    out: Var<T>,
}

/// Runs `prim` on host tensors with the CPU kernels, recording it so that [`cpu_backward`]
/// can differentiate it. The reference every backend is checked against, and the fallback a
/// backend may use for a primitive it has no kernel for (copying its inputs to the host).
pub fn cpu_forward<T: Elem>(prim: &Prim, x: &[Tensor<T>]) -> Result<CpuRun<T>> {
    if let Some(t) = x.iter().find(|t| !t.device().is_cpu()) {
        return Err(Error::device(prim.name(), format!("cpu_forward takes host tensors, got one on {}", t.device())));
    }
    let arity = |n: &[usize]| -> Result<()> {
        if !n.contains(&x.len()) {
            return Err(Error::arg(prim.name(), format!("takes {n:?} tensors, got {}", x.len())));
        }
        Ok(())
    };
    crate::with_grad(|| {
        let mut state = Vec::new();
        let (inputs, out) = match prim {
            Prim::BatchNorm { training, opts } => {
                arity(&[5])?;
                let v: Vec<Var<T>> = x[..3].iter().map(|t| Var::parameter(t.clone())).collect();
                let (mut rm, mut rv) = (x[3].clone(), x[4].clone());
                let y = crate::batch_norm(&v[0], &v[1], &v[2], &mut rm, &mut rv, *training, *opts)?;
                if *training {
                    state = vec![rm, rv];
                }
                (v, y)
            }
            _ => {
                let v: Vec<Var<T>> = x.iter().map(|t| Var::parameter(t.clone())).collect();
                let y = apply(prim, &v, &arity)?;
                (v, y)
            }
        };
        Ok((out.value(), state, CpuSaved { inputs, out }))
    })
}

/// The input gradients of a [`cpu_forward`] given the output gradient (a host tensor).
pub fn cpu_backward<T: Elem>(saved: &CpuSaved<T>, g: &Tensor<T>) -> Result<Vec<Option<Tensor<T>>>> {
    for v in &saved.inputs {
        v.zero_grad();
    }
    saved.out.backward_with(g.clone())?;
    Ok(saved.inputs.iter().map(|v| v.grad()).collect())
}

fn apply<T: Elem>(prim: &Prim, v: &[Var<T>], arity: &dyn Fn(&[usize]) -> Result<()>) -> Result<Var<T>> {
    use crate::ops;
    let one = |f: &dyn Fn(&Var<T>) -> Result<Var<T>>| -> Result<Var<T>> {
        arity(&[1])?;
        f(&v[0])
    };
    type Binary<'a, T> = &'a dyn Fn(&Var<T>, &Var<T>) -> Result<Var<T>>;
    let two = |f: Binary<T>| -> Result<Var<T>> {
        arity(&[2])?;
        f(&v[0], &v[1])
    };
    match prim {
        Prim::Add => two(&|a, b| a.add(b)),
        Prim::Sub => two(&|a, b| a.sub(b)),
        Prim::Mul => two(&|a, b| a.mul(b)),
        Prim::Div => two(&|a, b| a.div(b)),
        Prim::Unary(u) => one(&|a| ops::arith::unary(a, *u)),
        Prim::Sum { axes, keepdim } => one(&|a| a.sum(axes, *keepdim)),
        Prim::Max { axis, keepdim } => one(&|a| a.max(*axis, *keepdim)),
        Prim::Permute { perm } => one(&|a| a.permute(perm)),
        Prim::Narrow { axis, start, len } => one(&|a| a.narrow(*axis, *start, *len)),
        Prim::Pad { pads, value } => one(&|a| a.pad(pads, *value)),
        Prim::Concat { axis } => crate::concat(&v.iter().collect::<Vec<_>>(), *axis),
        Prim::UpsampleNearest { scale } => one(&|a| a.upsample_nearest2d(*scale)),
        Prim::MatMul { transpose_b: false } => two(&|a, b| a.matmul(b)),
        Prim::MatMul { transpose_b: true } => two(&|a, b| a.matmul_t(b)),
        Prim::Conv2d { opts } => {
            arity(&[2, 3])?;
            crate::conv2d(&v[0], &v[1], v.get(2), opts)
        }
        Prim::ConvTranspose2d { opts } => {
            arity(&[2, 3])?;
            crate::conv_transpose2d(&v[0], &v[1], v.get(2), opts)
        }
        Prim::MaxPool2d { opts } => one(&|a| crate::max_pool2d(a, opts)),
        Prim::AvgPool2d { opts } => one(&|a| crate::avg_pool2d(a, opts)),
        Prim::LpPool2d { p, opts } => one(&|a| crate::lp_pool2d(a, *p, opts)),
        Prim::AdaptiveAvgPool2d { out } => one(&|a| crate::adaptive_avg_pool2d(a, *out)),
        Prim::AdaptiveMaxPool2d { out } => one(&|a| crate::adaptive_max_pool2d(a, *out)),
        Prim::ChannelMaxPool { depth, stride } => one(&|a| crate::channel_max_pool(a, *depth, *stride)),
        Prim::Softmax { axis } => one(&|a| crate::softmax(a, *axis)),
        Prim::LogSoftmax { axis } => one(&|a| crate::log_softmax(a, *axis)),
        Prim::Nll { targets } => one(&|a| crate::nll_loss(a, targets)),
        Prim::BatchNorm { .. } => Err(Error::arg("batch_norm", "takes its running statistics by cpu_forward")),
    }
}

impl<T: Elem> Var<T> {
    /// The device the value lives on.
    pub fn device(&self) -> Device {
        self.0.value.borrow().device()
    }
    /// Moves a leaf (a parameter or constant) to `device`, keeping it the same node so the
    /// modules and optimizers that hold it follow (`model.to(device)`). Its gradient, if any,
    /// moves too.
    pub fn to_device(&self, device: Device) -> Result<()> {
        if !self.is_leaf() {
            stride_tensor::bail!(arg, "to_device", "only leaves (parameters, constants) move; an op's result is on its inputs' device");
        }
        let moved = self.value_ref().to(device)?;
        *self.0.value.borrow_mut() = moved;
        let grad = self.0.grad.borrow().as_ref().map(|g| g.to(device)).transpose()?;
        *self.0.grad.borrow_mut() = grad;
        Ok(())
    }
}

/// A backend that keeps its buffers apart from CPU tensors and runs every primitive with the
/// CPU kernels on copies ([`cpu_forward`], [`cpu_backward`]). It stands in for a device in
/// tests: code that runs on it without a device error, and gives the CPU's results bit for
/// bit, reaches every primitive through the seam and never computes on a device tensor's
/// elements behind the backend's back. It counts the calls per primitive.
pub struct HostMirror {
    device: Device,
    calls: std::sync::Mutex<std::collections::BTreeMap<&'static str, (usize, usize)>>,
}

struct MirrorBuffer<T> {
    device: Device,
    data: Vec<T>,
}

thread_local! {
    /// Mirror buffers read back to the host by this thread (see [`HostMirror::reads`]).
    static MIRROR_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl<T: Elem> DeviceBuffer<T> for MirrorBuffer<T> {
    fn device(&self) -> Device {
        self.device
    }
    fn len(&self) -> usize {
        self.data.len()
    }
    fn read(&self) -> Result<Vec<T>> {
        MIRROR_READS.with(|r| r.set(r.get() + 1));
        Ok(self.data.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl HostMirror {
    /// How many times this thread has read a mirror tensor's elements back to the host (what on
    /// a GPU waits for all the work queued before it): a training step should not, but for its
    /// loss.
    pub fn reads() -> usize {
        MIRROR_READS.with(|r| r.get())
    }
    pub fn new(device: Device) -> Self {
        HostMirror { device, calls: Default::default() }
    }
    /// (forward, backward) calls per primitive name so far.
    pub fn calls(&self) -> std::collections::BTreeMap<&'static str, (usize, usize)> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn count(&self, prim: &Prim, backward: bool) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let c = calls.entry(prim.name()).or_default();
        if backward {
            c.1 += 1;
        } else {
            c.0 += 1;
        }
    }
    fn mirror<T: Elem>(&self, t: &Tensor<T>) -> Result<Tensor<T>> {
        Tensor::from_device(Arc::new(MirrorBuffer { device: self.device, data: t.to_host()?.into_vec() }), t.shape())
    }
    fn host<T: Elem>(&self, t: &Tensor<T>) -> Result<Tensor<T>> {
        let buf = t.device_buffer().and_then(|b| b.as_any().downcast_ref::<MirrorBuffer<T>>());
        match buf {
            Some(b) if b.device == self.device => Tensor::from_vec(b.data.clone(), t.shape()),
            _ => Err(Error::device("mirror", format!("got a tensor on {}, not one of this backend's {} buffers", t.device(), self.device))),
        }
    }
}

impl<T: Elem> Backend<T> for HostMirror {
    fn device(&self) -> Device {
        self.device
    }
    fn describe(&self) -> String {
        format!("{}: host mirror (CPU kernels behind the device seam)", self.device)
    }
    fn upload(&self, host: &[T]) -> Result<Arc<dyn DeviceBuffer<T>>> {
        Ok(Arc::new(MirrorBuffer { device: self.device, data: host.to_vec() }))
    }
    fn forward(&self, prim: &Prim, x: &[Tensor<T>]) -> Result<Forward<T>> {
        self.count(prim, false);
        let host = x.iter().map(|t| self.host(t)).collect::<Result<Vec<_>>>()?;
        let (y, state, saved) = cpu_forward(prim, &host)?;
        let state = state.iter().map(|s| self.mirror(s)).collect::<Result<Vec<_>>>()?;
        Ok(Forward { y: self.mirror(&y)?, state, saved: Box::new(saved) })
    }
    fn backward(&self, prim: &Prim, saved: &dyn Any, g: &Tensor<T>, _x: &[Tensor<T>], _y: &Tensor<T>) -> Result<Vec<Option<Tensor<T>>>> {
        self.count(prim, true);
        let saved = saved.downcast_ref::<CpuSaved<T>>().ok_or_else(|| Error::device(prim.name(), "saved state of another backend"))?;
        let grads = cpu_backward(saved, &self.host(g)?)?;
        grads.iter().map(|d| d.as_ref().map(|d| self.mirror(d)).transpose()).collect()
    }
    /// On the mirror's own buffers, as a GPU backend updates in place of the tensors: no read
    /// back to the host.
    fn update(&self, rule: &Update, w: &Tensor<T>, g: &Tensor<T>, state: &[Tensor<T>]) -> Result<(Tensor<T>, Vec<Tensor<T>>)> {
        let state = state.iter().map(|s| self.host(s)).collect::<Result<Vec<_>>>()?;
        let (w, state) = rule.on_host(&self.host(w)?, &self.host(g)?, &state)?;
        Ok((self.mirror(&w)?, state.iter().map(|s| self.mirror(s)).collect::<Result<_>>()?))
    }
}
