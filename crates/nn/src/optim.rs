//! Optimizers: SGD (momentum, Nesterov, L2 weight decay), Adam, AdamW. Each follows PyTorch's
//! update rule exactly, so a run can be compared step for step.

use rayon::prelude::*;
use stride_autograd::{device, Tensor, ToDevice, Update, Var};

use crate::Result;

/// Updates parameters from their accumulated gradients.
pub trait Optimizer {
    /// One update of every parameter that has a gradient.
    fn step(&mut self, params: &[Var]) -> Result<()>;
    fn lr(&self) -> f64;
    fn set_lr(&mut self, lr: f64);
    /// The optimizer's state as named flat vectors (for checkpoints): `<slot>.<param index>`,
    /// plus `step` where the rule counts steps.
    fn state(&self) -> Vec<(String, Vec<f32>)>;
    /// Restores what [`Optimizer::state`] returned.
    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()>;
}

/// The slots named `name` as `<name>.<param index>` flat vectors, read back from whatever
/// device they live on (a device that fails to answer panics here, as `Tensor::data` does).
fn export_tensors(name: &str, slots: &[Option<Tensor<f32>>], out: &mut Vec<(String, Vec<f32>)>) {
    for (i, s) in slots.iter().enumerate() {
        if let Some(t) = s {
            out.push((format!("{name}.{i}"), t.data().to_vec()));
        }
    }
}

/// [`import`] into host tensors (moved to a parameter's device on its next step).
fn import_tensors(name: &str, state: &[(String, Vec<f32>)]) -> Result<Vec<Option<Tensor<f32>>>> {
    import(name, state)?
        .into_iter()
        .map(|s| {
            s.map(|v| {
                let n = v.len();
                Tensor::from_vec(v, &[n])
            })
            .transpose()
            .map_err(Into::into)
        })
        .collect()
}

/// Takes the state slot of parameter `i` (its weight is `w`) out for an update, on the
/// weight's device: zeros on first use; a slot restored from a checkpoint moves there. Taken,
/// not cloned, so the update owns the storage and writes it in place.
fn take_slot(state: &mut Vec<Option<Tensor<f32>>>, i: usize, w: &Tensor<f32>) -> Result<Tensor<f32>> {
    if state.len() <= i {
        state.resize(i + 1, None);
    }
    Ok(match state[i].take() {
        Some(t) if t.numel() == w.numel() => t.reshape(w.shape())?.to(w.device())?,
        Some(t) => {
            return Err(
                stride_autograd::Error::shape("optimizer state", format!("slot {i} holds {} values, the parameter {}", t.numel(), w.numel())).into()
            )
        }
        None => Tensor::zeros(w.shape())?.to(w.device())?,
    })
}

fn import(name: &str, state: &[(String, Vec<f32>)]) -> Result<Vec<Option<Vec<f32>>>> {
    let mut slots: Vec<Option<Vec<f32>>> = Vec::new();
    for (key, v) in state {
        let Some(rest) = key.strip_prefix(name).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        let i: usize = rest.parse().map_err(|_| stride_autograd::Error::arg("optimizer state", format!("bad entry name '{key}'")))?;
        if i > 1_000_000 {
            return Err(stride_autograd::Error::arg("optimizer state", format!("entry '{key}' names parameter {i}")).into());
        }
        if slots.len() <= i {
            slots.resize(i + 1, None);
        }
        slots[i] = Some(v.clone());
    }
    Ok(slots)
}

/// Clears the gradients of `params` (call before each backward pass).
pub fn zero_grad(params: &[Var]) {
    for p in params {
        p.zero_grad();
    }
}

fn check_hyper(name: &'static str, ok: bool, what: String) -> Result<()> {
    if !ok {
        return Err(stride_autograd::Error::arg(name, what).into());
    }
    Ok(())
}

/// Elements per task when an update runs on several threads.
const CHUNK: usize = 1 << 15;

/// Runs `rule` on parameter `i`, `p`, with its gradient `g` and `state` (tensors of the
/// parameter's shape): in place on the CPU, returning the new state; on another device it is
/// queued in `queue` (`None`), to run with the other parameters there.
fn apply_rule(i: usize, p: &Var, rule: &Update, g: Tensor<f32>, mut state: Vec<Tensor<f32>>, queue: &mut Queue) -> Result<Option<Vec<Tensor<f32>>>> {
    let w = p.value();
    if !w.device().is_cpu() {
        queue.items.push(Queued { i, p: p.clone(), rule: *rule, g, state });
        return Ok(None);
    }
    // The parameter's storage is updated in place once no other handle shares it.
    drop(w);
    let mut slices: Vec<&mut [f32]> = state.iter_mut().map(|t| t.data_mut()).collect();
    p.update_value(|w| rule.apply(w, g.data(), &mut slices))?;
    Ok(Some(state))
}

/// A parameter's update waiting in a [`Queue`].
struct Queued {
    i: usize,
    p: Var,
    rule: Update,
    g: Tensor<f32>,
    state: Vec<Tensor<f32>>,
}

/// The updates of parameters that live on a device, queued while an optimizer walks its
/// parameters and run together: one backend call per device and rule, where a GPU updates a
/// list of tensors per launch (rather than one launch per parameter).
#[derive(Default)]
struct Queue {
    items: Vec<Queued>,
}

/// Parameters' indices with their new state (or, where an update failed, their old one).
type States = Vec<(usize, Vec<Tensor<f32>>)>;

/// Elements a queue hands the backend at once at most: the old and new weights and state of a
/// call are all alive until it returns.
const QUEUE_ELEMENTS: usize = 1 << 26;

impl Queue {
    /// Runs the queued updates (consecutive ones on one device with one rule together), sets
    /// each parameter's new weight and returns each parameter's index with its new state. If
    /// the backend fails, the parameters not updated keep their weight and come back with their
    /// old state, beside the error: nothing is lost, and a later step can go on from there.
    fn run(self) -> (States, Result<()>) {
        let mut items = self.items;
        let mut out = Vec::with_capacity(items.len());
        let mut start = 0;
        while start < items.len() {
            let first = &items[start];
            let key = (first.g.device(), first.rule);
            let mut elements = 0;
            let n = items[start..]
                .iter()
                .take_while(|q| {
                    elements += q.g.numel();
                    (q.g.device(), q.rule) == key && (elements <= QUEUE_ELEMENTS || q.i == first.i)
                })
                .count();
            let group = &items[start..start + n];
            let weights: Vec<Tensor<f32>> = group.iter().map(|q| q.p.value()).collect();
            let args: Vec<device::UpdateItem<'_, f32>> = group.iter().zip(&weights).map(|(q, w)| (w, &q.g, &q.state[..])).collect();
            let updated = device::update_many(key.0, &key.1, &args);
            drop(args);
            drop(weights);
            let applied = updated.map_err(Into::into).and_then(|updated| {
                for (q, (w, state)) in group.iter().zip(updated) {
                    q.p.set_value(w)?;
                    out.push((q.i, state));
                    start += 1;
                }
                Ok(())
            });
            if let Err(e) = applied {
                out.extend(items.drain(start..).map(|q| (q.i, q.state)));
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }
}

/// Stochastic gradient descent, PyTorch's `torch.optim.SGD`.
#[derive(Clone, Debug)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    velocity: Vec<Option<Tensor<f32>>>,
}

impl Sgd {
    pub fn new(lr: f64, momentum: f64, nesterov: bool, weight_decay: f64) -> Result<Self> {
        check_hyper("Sgd", lr >= 0.0 && lr.is_finite(), format!("learning rate must be finite and >= 0, got {lr}"))?;
        check_hyper("Sgd", (0.0..1.0).contains(&momentum) || momentum == 0.0, format!("momentum must be in [0, 1), got {momentum}"))?;
        check_hyper("Sgd", !nesterov || momentum > 0.0, "Nesterov momentum needs momentum > 0".into())?;
        check_hyper("Sgd", weight_decay >= 0.0, format!("weight decay must be >= 0, got {weight_decay}"))?;
        Ok(Sgd { lr, momentum, nesterov, weight_decay, velocity: Vec::new() })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &[Var]) -> Result<()> {
        let mut queue = Queue::default();
        let mut done = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let Some(g) = p.grad() else { continue };
            let first = self.velocity.get(i).is_none_or(|s| s.is_none());
            let rule = Update::Sgd { lr: self.lr, momentum: self.momentum, nesterov: self.nesterov, weight_decay: self.weight_decay, first };
            let mut state = Vec::new();
            if self.momentum > 0.0 {
                state.push(take_slot(&mut self.velocity, i, &p.value())?);
            }
            done.extend(apply_rule(i, p, &rule, g, state, &mut queue)?.map(|s| (i, s)));
        }
        let (queued, result) = queue.run();
        for (i, mut state) in done.into_iter().chain(queued) {
            if let Some(b) = state.pop() {
                self.velocity[i] = Some(b);
            }
        }
        result
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        export_tensors("momentum_buffer", &self.velocity, &mut out);
        out
    }
    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        self.velocity = import_tensors("momentum_buffer", state)?;
        Ok(())
    }
}

/// Adam (`decoupled = false`, L2 weight decay added to the gradient) and AdamW
/// (`decoupled = true`, weights shrunk by lr * weight_decay before the update), as PyTorch.
#[derive(Clone, Debug)]
pub struct Adam {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub decoupled: bool,
    step: u64,
    m: Vec<Option<Tensor<f32>>>,
    v: Vec<Option<Tensor<f32>>>,
}

impl Adam {
    pub fn new(lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64, decoupled: bool) -> Result<Self> {
        check_hyper("Adam", lr >= 0.0 && lr.is_finite(), format!("learning rate must be finite and >= 0, got {lr}"))?;
        check_hyper("Adam", (0.0..1.0).contains(&betas.0) && (0.0..1.0).contains(&betas.1), format!("betas must be in [0, 1), got {betas:?}"))?;
        check_hyper("Adam", eps > 0.0, format!("eps must be > 0, got {eps}"))?;
        check_hyper("Adam", weight_decay >= 0.0, format!("weight decay must be >= 0, got {weight_decay}"))?;
        Ok(Adam { lr, betas, eps, weight_decay, decoupled, step: 0, m: Vec::new(), v: Vec::new() })
    }
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn default_with_lr(lr: f64) -> Result<Self> {
        Self::new(lr, (0.9, 0.999), 1e-8, 0.0, false)
    }
}

impl Optimizer for Adam {
    fn step(&mut self, params: &[Var]) -> Result<()> {
        // Counted once the step has gone through: a step that failed on a device (which gives
        // every parameter not updated its state back) can be taken again as the same step.
        let t = (self.step + 1) as i32;
        let (b1, b2) = self.betas;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let rule = Update::Adam { lr: self.lr, betas: (b1, b2), c1, c2, eps: self.eps, weight_decay: self.weight_decay, decoupled: self.decoupled };
        let mut queue = Queue::default();
        for (i, p) in params.iter().enumerate() {
            let Some(g) = p.grad() else { continue };
            let w = p.value();
            let mut m = take_slot(&mut self.m, i, &w)?;
            let mut v = take_slot(&mut self.v, i, &w)?;
            if !w.device().is_cpu() {
                queue.items.push(Queued { i, p: p.clone(), rule, g, state: vec![m, v] });
                continue;
            }
            drop(w);
            let (ms, vs) = (m.data_mut(), v.data_mut());
            p.update_value(|w| {
                w.par_chunks_mut(CHUNK)
                    .zip(ms.par_chunks_mut(CHUNK))
                    .zip(vs.par_chunks_mut(CHUNK))
                    .zip(g.data().par_chunks(CHUNK))
                    .for_each(|(((w, m), v), g)| rule.apply(w, g, &mut [m, v]))
            })?;
            (self.m[i], self.v[i]) = (Some(m), Some(v));
        }
        let (queued, result) = queue.run();
        for (i, state) in queued {
            let [m, v] =
                <[Tensor<f32>; 2]>::try_from(state).map_err(|_| stride_autograd::Error::device("Adam", "the backend returned other state"))?;
            (self.m[i], self.v[i]) = (Some(m), Some(v));
        }
        result?;
        self.step += 1;
        Ok(())
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Vec<(String, Vec<f32>)> {
        let mut out = vec![("step".to_string(), vec![self.step as f32])];
        export_tensors("exp_avg", &self.m, &mut out);
        export_tensors("exp_avg_sq", &self.v, &mut out);
        out
    }
    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        self.step = state.iter().find(|(k, _)| k == "step").and_then(|(_, v)| v.first()).map_or(0, |&s| s as u64);
        self.m = import_tensors("exp_avg", state)?;
        self.v = import_tensors("exp_avg_sq", state)?;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `params`.
pub fn grad_norm(params: &[Var]) -> f64 {
    params.iter().filter_map(|p| p.grad()).map(|g| g.data().iter().map(|&v| (v as f64).powi(2)).sum::<f64>()).sum::<f64>().sqrt()
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before.
/// `max_norm` must be finite and positive (a negative one would turn every step uphill).
pub fn clip_grad_norm(params: &[Var], max_norm: f64) -> Result<f64> {
    check_hyper("clip_grad_norm", max_norm > 0.0 && max_norm.is_finite(), format!("the largest norm must be finite and > 0, got {max_norm}"))?;
    let norm = grad_norm(params);
    if norm > max_norm && norm > 0.0 {
        let s = (max_norm / (norm + 1e-6)) as f32;
        for p in params {
            if let Some(g) = p.grad() {
                p.set_grad(g.scale(s))?;
            }
        }
    }
    Ok(norm)
}

/// RMSprop, PyTorch's `torch.optim.RMSprop` (not centered): v = alpha v + (1 - alpha) g^2,
/// then p -= lr g / (sqrt(v) + eps), with optional momentum on that step and L2 weight decay.
#[derive(Clone, Debug)]
pub struct RmsProp {
    pub lr: f64,
    pub alpha: f64,
    pub eps: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    square: Vec<Option<Tensor<f32>>>,
    velocity: Vec<Option<Tensor<f32>>>,
}

impl RmsProp {
    pub fn new(lr: f64, alpha: f64, eps: f64, momentum: f64, weight_decay: f64) -> Result<Self> {
        check_hyper("RmsProp", lr >= 0.0 && lr.is_finite(), format!("learning rate must be finite and >= 0, got {lr}"))?;
        check_hyper("RmsProp", (0.0..1.0).contains(&alpha), format!("alpha must be in [0, 1), got {alpha}"))?;
        check_hyper(
            "RmsProp",
            eps > 0.0 && momentum >= 0.0 && weight_decay >= 0.0,
            format!("eps {eps} must be > 0, momentum {momentum} and weight decay {weight_decay} >= 0"),
        )?;
        Ok(RmsProp { lr, alpha, eps, momentum, weight_decay, square: Vec::new(), velocity: Vec::new() })
    }
}

impl Optimizer for RmsProp {
    fn step(&mut self, params: &[Var]) -> Result<()> {
        let rule = Update::RmsProp { lr: self.lr, alpha: self.alpha, eps: self.eps, momentum: self.momentum, weight_decay: self.weight_decay };
        let mut queue = Queue::default();
        let mut done = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let Some(g) = p.grad() else { continue };
            let w = p.value();
            let mut state = vec![take_slot(&mut self.square, i, &w)?];
            if self.momentum > 0.0 {
                state.push(take_slot(&mut self.velocity, i, &w)?);
            }
            drop(w);
            done.extend(apply_rule(i, p, &rule, g, state, &mut queue)?.map(|s| (i, s)));
        }
        let (queued, result) = queue.run();
        for (i, state) in done.into_iter().chain(queued) {
            let mut state = state.into_iter();
            self.square[i] = state.next();
            if self.momentum > 0.0 {
                self.velocity[i] = state.next();
            }
        }
        result
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        export_tensors("square_avg", &self.square, &mut out);
        export_tensors("momentum_buffer", &self.velocity, &mut out);
        out
    }
    fn load_state(&mut self, state: &[(String, Vec<f32>)]) -> Result<()> {
        self.square = import_tensors("square_avg", state)?;
        self.velocity = import_tensors("momentum_buffer", state)?;
        Ok(())
    }
}

/// Limits every gradient element to [-limit, limit]; `limit` must be finite and >= 0.
pub fn clip_grad_value(params: &[Var], limit: f64) -> Result<()> {
    check_hyper("clip_grad_value", limit >= 0.0 && limit.is_finite(), format!("the limit must be finite and >= 0, got {limit}"))?;
    let l = limit as f32;
    for p in params {
        if let Some(g) = p.grad() {
            p.set_grad(g.map(|v| v.clamp(-l, l)))?;
        }
    }
    Ok(())
}
