//! Planned training: a network's forward pass recorded once in training mode and compiled,
//! with its backward pass and a softmax cross-entropy head, into steps replayed for every batch
//! of the same shape (see `plan.rs` for the inference side and the ideas both share).
//!
//! What it keeps from inference planning: products batch-blocked, ReLU fused into the
//! convolution or matrix product before it, every buffer placed once by liveness (forward
//! values live until their backward step reads them, gradients from their first write to
//! their last read), so a step allocates no activation. What it cannot take: batch norm is not
//! folded (its statistics are the batch's), weights are read from the parameters at every step
//! (the optimizer changes them in between), and random draws (dropout) cannot be replayed, so a
//! network with them is refused, as are ops without a planned gradient.
//!
//! [`TrainPlan::step`] sets every parameter's gradient (as `zero_grad` + `backward` would) and
//! returns the mean loss; batch norm's batch statistics of the step are in
//! [`TrainPlan::batch_norm_stats`] for the caller to fold into the running ones
//! (`stride_nn::planned::TrainPlanned` does).

use std::collections::HashMap;

use stride_kernels::conv::planned::{self, Epilogue, Layout, Prepared};
use stride_kernels::conv::ConvGeom;
use stride_kernels::gemm::{auto_threads, matmul, MatRef};
use stride_kernels::norm;
use stride_kernels::pool::{self, PoolGeom};
use stride_kernels::unary::Unary;
use stride_tensor::{bail, Result, Tensor};

use crate::op::Op;
use crate::ops::norm::BatchNormOptions;
use crate::plan::{key, Recorded};
use crate::var::Node;
use crate::Var;

/// A slot: one reusable buffer of the plan.
type Slot = usize;

/// How a backward step delivers an input's gradient: the first contribution writes, later ones
/// (a value read by several steps) add.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Write,
    Add,
}

type Grad = Option<(Slot, Mode)>;

enum TStep {
    Relayout {
        x: Slot,
        y: Slot,
        from: Layout,
        to: Layout,
        dims: [usize; 3],
        dx: Grad,
        dy: Slot,
    },
    Conv {
        geom: ConvGeom,
        layout: Layout,
        w: usize,
        b: Option<usize>,
        relu: bool,
        x: Slot,
        y: Slot,
        dx: Grad,
        dy: Slot,
    },
    Pool {
        max: bool,
        geom: PoolGeom,
        argmax: Vec<u32>,
        x: Slot,
        y: Slot,
        dx: Grad,
        dy: Slot,
    },
    /// Adaptive average pooling to 1x1: the mean of each plane.
    GlobalAvg {
        planes: usize,
        hw: usize,
        x: Slot,
        y: Slot,
        dx: Grad,
        dy: Slot,
    },
    Unary {
        f: Unary,
        len: usize,
        x: Slot,
        y: Slot,
        dx: Grad,
        dy: Slot,
    },
    Add {
        len: usize,
        a: Slot,
        b: Slot,
        y: Slot,
        da: Grad,
        db: Grad,
        dy: Slot,
    },
    BatchNorm {
        gamma: usize,
        beta: usize,
        layout: Layout,
        dims: [usize; 3],
        opts: BatchNormOptions,
        stats: Stats,
        /// Followed by a ReLU (fused: `y` is the ReLU's output).
        relu: bool,
        x: Slot,
        y: Slot,
        dx: Grad,
        dy: Slot,
    },
    Linear {
        w: usize,
        b: Option<usize>,
        relu: bool,
        dims: [usize; 3],
        x: Slot,
        y: Slot,
        dx: Grad,
        dy: Slot,
    },
}

/// One batch norm step's statistics of the last batch.
#[derive(Clone, Debug, Default)]
struct Stats {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    var_unbiased: Vec<f32>,
}

/// A batch norm of the plan, for the caller's running statistics.
pub struct BatchNormStats<'a> {
    /// The layer's weight (gamma): which layer this is.
    pub weight: &'a Var<f32>,
    pub momentum: f64,
    /// The last step's batch mean and unbiased variance, per channel.
    pub mean: &'a [f32],
    pub var_unbiased: &'a [f32],
}

impl TStep {
    /// (slots read, slots written) forward and backward, for liveness.
    fn forward_use(&self) -> (Vec<Slot>, Slot) {
        match self {
            TStep::Relayout { x, y, .. }
            | TStep::Conv { x, y, .. }
            | TStep::Pool { x, y, .. }
            | TStep::GlobalAvg { x, y, .. }
            | TStep::Unary { x, y, .. }
            | TStep::BatchNorm { x, y, .. }
            | TStep::Linear { x, y, .. } => (vec![*x], *y),
            TStep::Add { a, b, y, .. } => (vec![*a, *b], *y),
        }
    }
    fn backward_use(&self) -> (Vec<Slot>, Vec<Slot>) {
        let g = |d: &Grad| d.map(|(s, _)| s);
        match self {
            TStep::Relayout { dx, dy, .. } => (vec![*dy], g(dx).into_iter().collect()),
            TStep::Conv { x, y, dx, dy, .. } => (vec![*x, *y, *dy], g(dx).into_iter().chain([*y]).collect()),
            TStep::Pool { dx, dy, .. } | TStep::GlobalAvg { dx, dy, .. } => (vec![*dy], g(dx).into_iter().collect()),
            TStep::Unary { x, y, dx, dy, .. } => (vec![*x, *y, *dy], g(dx).into_iter().collect()),
            TStep::Add { da, db, dy, .. } => (vec![*dy], g(da).into_iter().chain(g(db)).collect()),
            // With a ReLU, the gradient before it is written over its output, as for Conv.
            TStep::BatchNorm { relu: true, x, y, dx, dy, .. } => (vec![*x, *y, *dy], g(dx).into_iter().chain([*y]).collect()),
            TStep::BatchNorm { x, dx, dy, .. } => (vec![*x, *dy], g(dx).into_iter().collect()),
            TStep::Linear { x, y, dx, dy, .. } => (vec![*x, *y, *dy], g(dx).into_iter().chain([*y]).collect()),
        }
    }
}

/// A compiled training step for one input shape. See the module documentation.
pub struct TrainPlan {
    steps: Vec<TStep>,
    params: Vec<Var<f32>>,
    slots: Vec<Vec<f32>>,
    slot_len: Vec<usize>,
    input: (Slot, Vec<usize>),
    logits: (Slot, [usize; 2]),
    dlogits: Slot,
    /// Each parameter's gradient of the last step.
    grads: Vec<Vec<f32>>,
    /// The last step's logits.
    last_logits: Vec<f32>,
}

struct Val {
    slot: Slot,
    shape: Vec<usize>,
    layout: Layout,
}

/// Compile-time buffers: each value and each gradient is a buffer; slots are assigned after.
struct Compiler {
    rec: Recorded,
    vals: Vec<Option<Val>>,
    done: Vec<bool>,
    steps: Vec<TStep>,
    buf_len: Vec<usize>,
    /// Gradient buffer of each value buffer (aliases share it), made on first use.
    grad_of: HashMap<Slot, Slot>,
    /// Buffers that need no gradient (the input).
    no_grad: Vec<Slot>,
    params: Vec<Var<f32>>,
    param_index: HashMap<*const Node<f32>, usize>,
    relayouts: HashMap<(Slot, Layout), Slot>,
    block: usize,
}

impl Compiler {
    fn buffer(&mut self, len: usize) -> Slot {
        self.buf_len.push(len);
        self.buf_len.len() - 1
    }
    fn val(&self, i: usize) -> Result<&Val> {
        match &self.vals[i] {
            Some(v) => Ok(v),
            None => bail!(arg, "train plan", "a {} reads a constant where an activation was expected", self.rec.nodes[i].op_name()),
        }
    }
    fn param(&mut self, i: usize, what: &str) -> Result<usize> {
        let v = &self.rec.nodes[i];
        if !v.is_leaf() || !v.requires_grad() || self.vals[i].is_some() {
            bail!(arg, "train plan", "{what} must be a parameter (a leaf that needs a gradient)");
        }
        let k = key(v);
        if let Some(&p) = self.param_index.get(&k) {
            return Ok(p);
        }
        self.params.push(v.clone());
        self.param_index.insert(k, self.params.len() - 1);
        Ok(self.params.len() - 1)
    }
    /// The gradient buffer of value buffer `b` (`None` for the input).
    fn grad(&mut self, b: Slot) -> Option<Slot> {
        if self.no_grad.contains(&b) {
            return None;
        }
        if let Some(&g) = self.grad_of.get(&b) {
            return Some(g);
        }
        let g = self.buffer(self.buf_len[b]);
        self.grad_of.insert(b, g);
        Some(g)
    }
    fn operand(&mut self, p: usize, layout: Layout) -> Result<Slot> {
        let (slot, from, shape) = {
            let v = self.val(p)?;
            (v.slot, v.layout, v.shape.clone())
        };
        if from == layout {
            return Ok(slot);
        }
        if let Some(&s) = self.relayouts.get(&(slot, layout)) {
            return Ok(s);
        }
        let dims = [shape[0], shape[1], shape[2] * shape[3]];
        let y = self.buffer(self.buf_len[slot]);
        let dx = self.grad(slot).map(|g| (g, Mode::Write));
        let dy = self.grad(y).expect("not the input");
        self.steps.push(TStep::Relayout { x: slot, y, from, to: layout, dims, dx, dy });
        self.relayouts.insert((slot, layout), y);
        Ok(y)
    }
    fn define(&mut self, i: usize, shape: Vec<usize>, layout: Layout) -> Slot {
        let slot = self.buffer(shape.iter().product());
        self.vals[i] = Some(Val { slot, shape, layout });
        slot
    }
    fn layout_of(&self, i: usize) -> Layout {
        self.vals[i].as_ref().map_or(Layout::Nchw, |v| v.layout)
    }
    /// A ReLU that is the single consumer of `tail`: fused.
    fn take_relu(&mut self, tail: &mut usize) -> bool {
        if let Some(c) = self.rec.only_consumer(*tail) {
            if matches!(self.rec.nodes[c].0.op, Some(Op::Unary(Unary::Relu))) {
                self.done[c] = true;
                *tail = c;
                return true;
            }
        }
        false
    }
    fn dx(&mut self, x: Slot) -> Grad {
        self.grad(x).map(|g| (g, Mode::Write))
    }

    fn compile(&mut self, i: usize) -> Result<()> {
        let node = self.rec.nodes[i].clone();
        let op = node.0.op.as_ref().expect("leaves are not compiled");
        let shape = node.shape();
        let ps: Vec<usize> = node.0.parents.iter().map(|p| self.rec.idx(p)).collect();
        match op {
            Op::Conv2d { geom } => {
                let w = self.param(ps[1], "a convolution's weight")?;
                let b = ps.get(2).map(|&p| self.param(p, "a convolution's bias")).transpose()?;
                // Blocked where the input already is, or is the network's input: a blocked layer
                // between NCHW ones (ResNet-18's strided and 1x1 shortcut convolutions among
                // Winograd layers) paid two relayouts each way, 6 ms of a 410 ms step, more than
                // blocking saved.
                let at_input = self.rec.nodes[ps[0]].0.op.is_none();
                let blocked_in = at_input || self.layout_of(ps[0]) != Layout::Nchw;
                let layout = if self.block > 1 && planned::blocks(geom) && blocked_in { Layout::Blocked(self.block) } else { Layout::Nchw };
                let x = self.operand(ps[0], layout)?;
                let mut tail = i;
                let relu = self.take_relu(&mut tail);
                let y = self.define(tail, shape, layout);
                let (dx, dy) = (self.dx(x), self.grad(y).expect("not the input"));
                self.steps.push(TStep::Conv { geom: *geom, layout, w, b, relu, x, y, dx, dy });
            }
            Op::MaxPool2d { geom, .. } | Op::AvgPool2d { geom } => {
                let layout = self.layout_of(ps[0]);
                let x = self.operand(ps[0], layout)?;
                let y = self.define(i, shape, layout);
                let (dx, dy) = (self.dx(x), self.grad(y).expect("not the input"));
                let max = matches!(op, Op::MaxPool2d { .. });
                self.steps.push(TStep::Pool { max, geom: *geom, argmax: Vec::new(), x, y, dx, dy });
            }
            Op::AdaptiveAvgPool2d { out: (1, 1) } => {
                let layout = self.layout_of(ps[0]);
                let x = self.operand(ps[0], layout)?;
                let xs = self.rec.nodes[ps[0]].shape();
                let (planes, hw) = (xs[0] * xs[1], xs[2] * xs[3]);
                let y = self.define(i, shape, layout);
                let (dx, dy) = (self.dx(x), self.grad(y).expect("not the input"));
                self.steps.push(TStep::GlobalAvg { planes, hw, x, y, dx, dy });
            }
            Op::Unary(f) => {
                let layout = self.layout_of(ps[0]);
                let x = self.operand(ps[0], layout)?;
                let len = shape.iter().product();
                let y = self.define(i, shape, layout);
                let (dx, dy) = (self.dx(x), self.grad(y).expect("not the input"));
                self.steps.push(TStep::Unary { f: *f, len, x, y, dx, dy });
            }
            Op::Add if self.vals[ps[0]].is_some() && self.vals[ps[1]].is_some() && self.rec.nodes[ps[0]].shape() == self.rec.nodes[ps[1]].shape() => {
                let layout = self.layout_of(ps[0]);
                let (a, b) = (self.operand(ps[0], layout)?, self.operand(ps[1], layout)?);
                let len = shape.iter().product();
                let y = self.define(i, shape, layout);
                let (da, db, dy) = (self.dx(a), self.dx(b), self.grad(y).expect("not the input"));
                self.steps.push(TStep::Add { len, a, b, y, da, db, dy });
            }
            Op::BatchNorm { training, sync, opts, .. } => {
                if sync.is_some() {
                    bail!(arg, "train plan", "synchronised batch norm (--sync-bn) runs eagerly");
                }
                let (gamma, beta) = (self.param(ps[1], "batch norm's weight")?, self.param(ps[2], "batch norm's bias")?);
                if !training {
                    bail!(arg, "train plan", "batch_norm in evaluation mode: a training plan is recorded in training mode");
                }
                let layout = self.layout_of(ps[0]);
                let x = self.operand(ps[0], layout)?;
                let dims = [shape[0], shape[1], shape[2..].iter().product()];
                let mut tail = i;
                let relu = self.take_relu(&mut tail);
                let y = self.define(tail, shape, layout);
                let (dx, dy) = (self.dx(x), self.grad(y).expect("not the input"));
                self.steps.push(TStep::BatchNorm { gamma, beta, layout, dims, opts: *opts, stats: Stats::default(), relu, x, y, dx, dy });
            }
            Op::MatMul { transpose_b: true } if self.vals[ps[0]].is_some() && self.rec.nodes[ps[0]].shape().len() == 2 => {
                let w = self.param(ps[1], "a linear layer's weight")?;
                let (xs, ws) = (self.rec.nodes[ps[0]].shape(), self.rec.nodes[ps[1]].shape());
                let (m, k, n) = (xs[0], xs[1], ws[0]);
                let x = self.operand(ps[0], Layout::Nchw)?;
                let mut tail = i;
                let mut b = None;
                if let Some(c) = self.rec.only_consumer(i) {
                    let cn = self.rec.nodes[c].clone();
                    if matches!(cn.0.op, Some(Op::Add)) && cn.0.parents[0].same(&node) {
                        let other = self.rec.idx(&cn.0.parents[1]);
                        if self.rec.nodes[other].shape() == [n] {
                            b = Some(self.param(other, "a linear layer's bias")?);
                            self.done[c] = true;
                            tail = c;
                        }
                    }
                }
                let relu = self.take_relu(&mut tail);
                let y = self.define(tail, vec![m, n], Layout::Nchw);
                let (dx, dy) = (self.dx(x), self.grad(y).expect("not the input"));
                self.steps.push(TStep::Linear { w, b, relu, dims: [m, k, n], x, y, dx, dy });
            }
            Op::Reshape => {
                // A view: the same buffers for the value and its gradient.
                let slot = self.operand(ps[0], Layout::Nchw)?;
                self.vals[i] = Some(Val { slot, shape, layout: Layout::Nchw });
            }
            Op::Mul | Op::Add | Op::Sub | Op::Div if ps.iter().any(|&p| self.vals[p].is_none()) => {
                // A leaf operand: a parameter (a learned gate or scale) or a constant.
                if ps.iter().any(|&p| self.vals[p].is_none() && self.rec.nodes[p].requires_grad()) {
                    bail!(
                        arg,
                        "train plan",
                        "{} with a parameter operand (a learned scale?) has no planned gradient yet; this network trains eagerly",
                        op.name()
                    )
                }
                bail!(
                    arg,
                    "train plan",
                    "{} with a constant operand (a dropout mask?): random draws cannot be replayed; this network trains eagerly",
                    op.name()
                )
            }
            _ => bail!(arg, "train plan", "{} has no planned gradient yet; this network trains eagerly", op.name()),
        }
        Ok(())
    }
}

/// Assigns buffers to slots by liveness over the timeline (forward steps, the loss, backward
/// steps in reverse): a slot is reused once its occupant's last use has passed, and grows to
/// its largest occupant.
fn assign(events: &[(Vec<Slot>, Vec<Slot>)], lens: &[usize], first: &[Slot], keep: &[Slot]) -> (Vec<Slot>, Vec<usize>) {
    let n = lens.len();
    let (mut start, mut end) = (vec![usize::MAX; n], vec![0usize; n]);
    for &b in first {
        start[b] = 0;
    }
    for (t, (reads, writes)) in events.iter().enumerate() {
        for &b in reads.iter().chain(writes) {
            start[b] = start[b].min(t + 1);
            end[b] = end[b].max(t + 1);
        }
    }
    for &b in keep {
        end[b] = usize::MAX;
    }
    let mut order: Vec<Slot> = (0..n).filter(|&b| start[b] != usize::MAX).collect();
    order.sort_by_key(|&b| (start[b], b));
    let (mut slot_of, mut slot_len, mut slot_free_at) = (vec![usize::MAX; n], Vec::<usize>::new(), Vec::<usize>::new());
    for b in order {
        // A slot whose occupant ended before this buffer starts; the best fitting one.
        let free =
            (0..slot_len.len()).filter(|&s| slot_free_at[s] < start[b]).min_by_key(|&s| (slot_len[s] < lens[b], slot_len[s].abs_diff(lens[b])));
        let s = match free {
            Some(s) => s,
            None => {
                slot_len.push(0);
                slot_free_at.push(0);
                slot_len.len() - 1
            }
        };
        slot_len[s] = slot_len[s].max(lens[b]);
        slot_free_at[s] = end[b];
        slot_of[b] = s;
    }
    (slot_of, slot_len)
}

impl TrainPlan {
    /// Compiles the training step of the pass recorded from `input` (a [`Var::parameter`]) to
    /// `logits` ([N, classes]), in training mode with gradients enabled; the loss is softmax
    /// cross-entropy, averaged over the batch.
    pub fn compile(input: &Var<f32>, logits: &Var<f32>) -> Result<TrainPlan> {
        if !input.requires_grad() || !input.is_leaf() {
            bail!(arg, "train plan", "the input must be a parameter leaf (Var::parameter), so every op that reads it is recorded");
        }
        let ls = logits.shape();
        if ls.len() != 2 {
            bail!(shape, "train plan", "the network must end in logits [N, classes], got {ls:?}");
        }
        let rec = Recorded::walk(input, logits, "train plan")?;
        let count = rec.nodes.len();
        let mut c = Compiler {
            rec,
            vals: (0..count).map(|_| None).collect(),
            done: vec![false; count],
            steps: Vec::new(),
            buf_len: Vec::new(),
            grad_of: HashMap::new(),
            no_grad: Vec::new(),
            params: Vec::new(),
            param_index: HashMap::new(),
            relayouts: HashMap::new(),
            block: planned::block_for(input.shape()[0]),
        };
        let ii = c.rec.idx(input);
        let in_shape = input.shape();
        let in_slot = c.define(ii, in_shape.clone(), Layout::Nchw);
        c.no_grad.push(in_slot);
        for i in 0..count {
            if c.done[i] || c.vals[i].is_some() || c.rec.nodes[i].is_leaf() {
                continue;
            }
            c.compile(i)?;
        }
        let li = c.rec.idx(logits);
        let out = c.operand(li, Layout::Nchw)?;
        if out == in_slot {
            bail!(arg, "train plan", "the network is the identity: nothing to train");
        }
        let dlogits = c.grad(out).expect("not the input");
        // First contributions write, later ones add: decided in backward order.
        let mut written: Vec<Slot> = vec![dlogits];
        for step in c.steps.iter_mut().rev() {
            let mut mark = |d: &mut Grad| {
                if let Some((g, mode)) = d {
                    *mode = if written.contains(g) { Mode::Add } else { Mode::Write };
                    written.push(*g);
                }
            };
            match step {
                TStep::Add { da, db, .. } => {
                    mark(da);
                    mark(db);
                }
                TStep::Relayout { dx, .. }
                | TStep::Conv { dx, .. }
                | TStep::Pool { dx, .. }
                | TStep::GlobalAvg { dx, .. }
                | TStep::Unary { dx, .. }
                | TStep::BatchNorm { dx, .. }
                | TStep::Linear { dx, .. } => mark(dx),
            }
        }
        // A value whose gradient nobody writes (it does not reach the loss) gets zeros.
        let mut events: Vec<(Vec<Slot>, Vec<Slot>)> = c.steps.iter().map(|s| (s.forward_use().0, vec![s.forward_use().1])).collect();
        events.push((vec![out], vec![dlogits]));
        events.extend(c.steps.iter().rev().map(|s| s.backward_use()));
        for s in c.steps.iter().rev() {
            let dy = match s {
                TStep::Relayout { dy, .. }
                | TStep::Conv { dy, .. }
                | TStep::Pool { dy, .. }
                | TStep::GlobalAvg { dy, .. }
                | TStep::Unary { dy, .. }
                | TStep::Add { dy, .. }
                | TStep::BatchNorm { dy, .. }
                | TStep::Linear { dy, .. } => *dy,
            };
            if !written.contains(&dy) {
                bail!(arg, "train plan", "a value of the network does not reach the logits; this network trains eagerly");
            }
        }
        let (slot_of, slot_len) = assign(&events, &c.buf_len, &[in_slot], &[out]);
        let map = |b: Slot| slot_of[b];
        let steps = c.steps.into_iter().map(|s| remap(s, &map)).collect();
        let grads = c.params.iter().map(|p| vec![0.0; p.value_ref().numel()]).collect();
        Ok(TrainPlan {
            steps,
            params: c.params,
            slots: Vec::new(),
            slot_len,
            input: (map(in_slot), in_shape),
            logits: (map(out), [ls[0], ls[1]]),
            dlogits: map(dlogits),
            grads,
            last_logits: Vec::new(),
        })
    }

    /// The parameters the plan trains, in the order it found them.
    pub fn parameters(&self) -> &[Var<f32>] {
        &self.params
    }

    /// Elements of all slots together: the step's memory for activations and gradients.
    pub fn memory_len(&self) -> usize {
        self.slot_len.iter().sum()
    }

    /// Batch norm's statistics of the last step, one entry per batch norm.
    pub fn batch_norm_stats(&self) -> Vec<BatchNormStats<'_>> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                TStep::BatchNorm { gamma, opts, stats, .. } => Some(BatchNormStats {
                    weight: &self.params[*gamma],
                    momentum: opts.momentum,
                    mean: &stats.mean,
                    var_unbiased: &stats.var_unbiased,
                }),
                _ => None,
            })
            .collect()
    }

    /// The shape of the logits, [N, classes].
    pub fn logits_shape(&self) -> [usize; 2] {
        self.logits.1
    }

    /// The logits [N, classes] of the last step's forward pass (for its accuracy).
    pub fn logits(&self) -> Result<Tensor<f32>> {
        if self.last_logits.is_empty() {
            bail!(arg, "train plan", "no step has run yet, so there are no logits");
        }
        Tensor::from_vec(self.last_logits.clone(), &self.logits.1)
    }

    /// One training step on `x` with class `labels`: forward, softmax cross-entropy (mean over
    /// the batch), backward. Sets every parameter's gradient and returns the loss.
    pub fn step(&mut self, x: &Tensor<f32>, labels: &[usize]) -> Result<f32> {
        let [n, classes] = self.logits.1;
        if labels.len() != n {
            bail!(shape, "train plan", "{} labels for a batch of {n}", labels.len());
        }
        if let Some(&bad) = labels.iter().find(|&&l| l >= classes) {
            bail!(arg, "train plan", "label {bad} is outside the {classes} classes");
        }
        let mut mass = vec![0.0; n * classes];
        for (row, &t) in mass.chunks_exact_mut(classes).zip(labels) {
            row[t] = 1.0 / n as f32;
        }
        self.step_towards(x, &mass, 1.0, false)
    }

    /// One training step on `x` towards a target mass `m` [N, classes]: the loss is
    /// -sum_{n,c} m[n, c] log softmax(logits)[n, c], which covers cross-entropy (a one-hot row
    /// over N), label smoothing, class weights and blended targets (MixUp, CutMix) alike. The
    /// gradients are those of `scale` times the loss; with `accumulate` they are added to the
    /// parameters' gradients (gradient accumulation), else they replace them. Returns the loss.
    pub fn step_towards(&mut self, x: &Tensor<f32>, mass: &[f32], scale: f32, accumulate: bool) -> Result<f32> {
        if x.shape() != self.input.1.as_slice() {
            bail!(shape, "train plan", "compiled for input shape {:?}, got {:?}", self.input.1, x.shape());
        }
        let [n, classes] = self.logits.1;
        if mass.len() != n * classes {
            bail!(shape, "train plan", "a target mass of {} values for {n} x {classes} logits", mass.len());
        }
        if let Some(bad) = mass.iter().find(|m| !m.is_finite()) {
            bail!(arg, "train plan", "the target mass holds {bad}");
        }
        if self.slots.len() != self.slot_len.len() {
            self.slots = self.slot_len.iter().map(|&l| vec![0.0; l]).collect();
        }
        let weights: Vec<Tensor<f32>> = self.params.iter().map(|p| p.value()).collect();
        let mut prior = Vec::new();
        for (p, g) in self.params.iter().zip(self.grads.iter_mut()) {
            let numel = p.value_ref().numel();
            let held = p.take_grad().map(Tensor::into_vec).filter(|v| v.len() == numel);
            if accumulate {
                // Kept to be added to; the step writes into a buffer of its own.
                prior.push(held);
                if g.len() != numel {
                    *g = vec![0.0; numel];
                }
            } else if g.len() != numel {
                // Handed to the parameter by the last step: reused unless someone kept it.
                *g = held.unwrap_or_else(|| vec![0.0; numel]);
            }
        }
        self.slots[self.input.0][..x.numel()].copy_from_slice(x.data());
        for s in 0..self.steps.len() {
            forward(&mut self.steps[s], &mut self.slots, &weights)?;
        }
        let mut d = take(&mut self.slots, self.dlogits);
        let logits = &self.slots[self.logits.0][..n * classes];
        let loss = softmax_cross_entropy(logits, mass, classes, scale, &mut d[..n * classes]);
        // Kept: the backward pass may reuse the logits' buffer.
        self.last_logits.clear();
        self.last_logits.extend_from_slice(logits);
        put(&mut self.slots, self.dlogits, d);
        for s in (0..self.steps.len()).rev() {
            backward(&mut self.steps[s], &mut self.slots, &weights, &mut self.grads)?;
        }
        for (g, held) in self.grads.iter_mut().zip(prior) {
            if let Some(h) = held {
                g.iter_mut().zip(&h).for_each(|(g, h)| *g += h);
            }
        }
        // Each gradient buffer goes to its parameter without a copy; the next step takes it
        // back (every step that writes a gradient overwrites it whole).
        for (p, g) in self.params.iter().zip(self.grads.iter_mut()) {
            p.set_grad(Tensor::from_vec(std::mem::take(g), &p.shape())?)?;
        }
        Ok(loss)
    }
}

fn remap(s: TStep, m: &impl Fn(Slot) -> Slot) -> TStep {
    let g = |d: Grad| d.map(|(s, mode)| (m(s), mode));
    match s {
        TStep::Relayout { x, y, from, to, dims, dx, dy } => TStep::Relayout { x: m(x), y: m(y), from, to, dims, dx: g(dx), dy: m(dy) },
        TStep::Conv { geom, layout, w, b, relu, x, y, dx, dy } => TStep::Conv { geom, layout, w, b, relu, x: m(x), y: m(y), dx: g(dx), dy: m(dy) },
        TStep::Pool { max, geom, argmax, x, y, dx, dy } => TStep::Pool { max, geom, argmax, x: m(x), y: m(y), dx: g(dx), dy: m(dy) },
        TStep::GlobalAvg { planes, hw, x, y, dx, dy } => TStep::GlobalAvg { planes, hw, x: m(x), y: m(y), dx: g(dx), dy: m(dy) },
        TStep::Unary { f, len, x, y, dx, dy } => TStep::Unary { f, len, x: m(x), y: m(y), dx: g(dx), dy: m(dy) },
        TStep::Add { len, a, b, y, da, db, dy } => TStep::Add { len, a: m(a), b: m(b), y: m(y), da: g(da), db: g(db), dy: m(dy) },
        TStep::BatchNorm { gamma, beta, layout, dims, opts, stats, relu, x, y, dx, dy } => {
            TStep::BatchNorm { gamma, beta, layout, dims, opts, stats, relu, x: m(x), y: m(y), dx: g(dx), dy: m(dy) }
        }
        TStep::Linear { w, b, relu, dims, x, y, dx, dy } => TStep::Linear { w, b, relu, dims, x: m(x), y: m(y), dx: g(dx), dy: m(dy) },
    }
}

/// The cross-entropy of `logits` [n, classes] towards the target mass `m`,
/// -sum m log softmax(logits), and `scale` times its gradient, softmax x (the row's mass) - m,
/// into `d`.
fn softmax_cross_entropy(logits: &[f32], mass: &[f32], classes: usize, scale: f32, d: &mut [f32]) -> f32 {
    let mut loss = 0.0f64;
    for ((row, m), drow) in logits.chunks_exact(classes).zip(mass.chunks_exact(classes)).zip(d.chunks_exact_mut(classes)) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
        let log_sum = sum.ln();
        let total: f32 = m.iter().sum();
        for ((o, &v), &mc) in drow.iter_mut().zip(row).zip(m) {
            if mc != 0.0 {
                loss -= (mc * ((v - max) - log_sum)) as f64;
            }
            let p = (v - max).exp() / sum;
            *o = scale * (p * total - mc);
        }
    }
    loss as f32
}

/// Takes slot `w` out to write it while the others are read; put back by [`put`].
fn take(slots: &mut [Vec<f32>], w: Slot) -> Vec<f32> {
    std::mem::take(&mut slots[w])
}

fn put(slots: &mut [Vec<f32>], w: Slot, v: Vec<f32>) {
    slots[w] = v;
}

fn forward(step: &mut TStep, slots: &mut [Vec<f32>], weights: &[Tensor<f32>]) -> Result<()> {
    match step {
        TStep::Relayout { x, y, from, to, dims: [n, c, p], .. } => {
            let mut out = take(slots, *y);
            let len = *n * *c * *p;
            planned::relayout(&slots[*x][..len], *from, &mut out[..len], *to, *n, *c, *p);
            put(slots, *y, out);
        }
        TStep::Conv { geom, layout, w, b, relu, x, y, .. } => {
            let mut out = take(slots, *y);
            let prep = Prepared::for_step(geom, weights[*w].data());
            let epi = Epilogue { bias: b.map(|b| weights[b].data()), residual: None, act: relu.then_some(Unary::Relu) };
            let (xl, yl) = (geom.n * geom.c * geom.h * geom.w, geom.n * geom.k * geom.p * geom.q);
            planned::forward_into(geom, *layout, &slots[*x][..xl], &prep, epi, &mut out[..yl]);
            put(slots, *y, out);
        }
        TStep::Pool { max, geom, argmax, x, y, .. } => {
            let mut out = take(slots, *y);
            let (xl, yl) = (geom.n * geom.c * geom.h * geom.w, geom.n * geom.c * geom.p * geom.q);
            if *max {
                argmax.resize(yl, 0);
                pool::max_forward_into(geom, &slots[*x][..xl], &mut out[..yl], argmax);
            } else {
                pool::avg_forward_into(geom, &slots[*x][..xl], &mut out[..yl]);
            }
            put(slots, *y, out);
        }
        TStep::GlobalAvg { planes, hw, x, y, .. } => {
            let mut out = take(slots, *y);
            let scale = 1.0 / (*hw).max(1) as f32;
            for (o, xp) in out[..*planes].iter_mut().zip(slots[*x][..*planes * *hw].chunks_exact((*hw).max(1))) {
                *o = xp.iter().sum::<f32>() * scale;
            }
            put(slots, *y, out);
        }
        TStep::Unary { f, len, x, y, .. } => {
            let (mut out, len) = (take(slots, *y), *len);
            f.apply_slice(&slots[*x][..len], &mut out[..len]);
            put(slots, *y, out);
        }
        TStep::Add { len, a, b, y, .. } => {
            let (mut out, len) = (take(slots, *y), *len);
            out[..len].iter_mut().zip(slots[*a][..len].iter().zip(&slots[*b][..len])).for_each(|(o, (&p, &q))| *o = p + q);
            put(slots, *y, out);
        }
        TStep::BatchNorm { gamma, beta, layout, dims: [n, c, l], opts, stats, relu, x, y, .. } => {
            let mut out = take(slots, *y);
            let (n, c, l) = (*n, *c, *l);
            let xs = &slots[*x][..n * c * l];
            let m = (n * l) as f64;
            if m <= 1.0 {
                bail!(shape, "batch_norm", "training needs more than one value per channel, got {m}");
            }
            // Sums per channel over the layout's pieces (each an [images, C, plane] tensor).
            let mut sums = vec![(0f64, 0f64); c];
            layout.pieces(n, c, l, |at, pn, pl| {
                for (s, v) in sums.iter_mut().zip(norm::channel_sums(&xs[at..at + pn * c * pl], pn, c, pl)) {
                    s.0 += v.0;
                    s.1 += v.1;
                }
            });
            stats.mean = sums.iter().map(|s| (s.0 / m) as f32).collect();
            let var: Vec<f64> = sums.iter().map(|s| (s.1 / m - (s.0 / m).powi(2)).max(0.0)).collect();
            stats.invstd = var.iter().map(|v| (1.0 / (v + opts.eps).sqrt()) as f32).collect();
            stats.var_unbiased = var.iter().map(|v| (v * m / (m - 1.0)) as f32).collect();
            let (g, bt) = (weights[*gamma].data(), weights[*beta].data());
            layout.pieces(n, c, l, |at, pn, pl| {
                let r = at..at + pn * c * pl;
                let normalize = if *relu { norm::normalize_relu_into } else { norm::normalize_into };
                normalize(&xs[r.clone()], c, pl, &stats.mean, &stats.invstd, g, bt, &mut out[r]);
            });
            put(slots, *y, out);
        }
        TStep::Linear { w, b, relu, dims: [m, k, n], x, y, .. } => {
            let mut out = take(slots, *y);
            let o = &mut out[..*m * *n];
            if let Some(b) = b {
                o.chunks_exact_mut(*n).for_each(|row| row.copy_from_slice(weights[*b].data()));
            }
            let wm = MatRef::rows(weights[*w].data(), *n, *k).t();
            matmul(MatRef::rows(&slots[*x][..*m * *k], *m, *k), wm, o, *n, b.is_some(), auto_threads(*m, *k, *n));
            if *relu {
                Unary::Relu.apply_in_place(o);
            }
            put(slots, *y, out);
        }
    }
    Ok(())
}

/// `dst (=|+=) src` by mode.
fn deliver(dst: &mut [f32], mode: Mode, src: &[f32]) {
    match mode {
        Mode::Write => dst.copy_from_slice(src),
        Mode::Add => stride_kernels::simd::par_add_assign(dst, src),
    }
}

fn backward(step: &mut TStep, slots: &mut [Vec<f32>], weights: &[Tensor<f32>], grads: &mut [Vec<f32>]) -> Result<()> {
    match step {
        TStep::Relayout { from, to, dims: [n, c, p], dx, dy, .. } => {
            if let Some((g, mode)) = *dx {
                let len = *n * *c * *p;
                let mut out = take(slots, g);
                if mode == Mode::Write {
                    planned::relayout(&slots[*dy][..len], *to, &mut out[..len], *from, *n, *c, *p);
                } else {
                    let mut tmp = vec![0.0; len];
                    planned::relayout(&slots[*dy][..len], *to, &mut tmp, *from, *n, *c, *p);
                    deliver(&mut out[..len], mode, &tmp);
                }
                put(slots, g, out);
            }
        }
        TStep::Conv { geom, layout, w, b, relu, x, y, dx, dy } => {
            let (xl, yl) = (geom.n * geom.c * geom.h * geom.w, geom.n * geom.k * geom.p * geom.q);
            let mut db = b.map(|b| std::mem::take(&mut grads[b]));
            let mut dw = std::mem::take(&mut grads[*w]);
            // The input's gradient: into its buffer, or beside it to be added.
            let mut out = dx.map(|(g, mode)| if mode == Mode::Write { take(slots, g) } else { vec![0.0; xl] });
            // With a ReLU, the gradient before it is written over its output (no later step
            // reads it); without one, the output's gradient is read where it lies.
            let mut z = relu.then(|| take(slots, *y));
            let (xs, ws, dxs) = (&slots[*x][..xl], weights[*w].data(), out.as_mut().map(|o| &mut o[..xl]));
            match z.as_mut() {
                Some(z) => planned::backward_relu_into(geom, *layout, xs, ws, &mut z[..yl], &slots[*dy][..yl], dxs, &mut dw, db.as_deref_mut()),
                None => planned::backward_into(geom, *layout, xs, ws, &slots[*dy][..yl], dxs, &mut dw, db.as_deref_mut()),
            }
            if let Some(z) = z {
                put(slots, *y, z);
            }
            match (*dx, out) {
                (Some((g, Mode::Write)), Some(out)) => put(slots, g, out),
                (Some((g, Mode::Add)), Some(tmp)) => {
                    let mut out = take(slots, g);
                    deliver(&mut out[..xl], Mode::Add, &tmp);
                    put(slots, g, out);
                }
                _ => {}
            }
            grads[*w] = dw;
            if let (Some(b), Some(db)) = (b, db) {
                grads[*b] = db;
            }
        }
        TStep::Pool { max, geom, argmax, dx, dy, .. } => {
            if let Some((g, mode)) = *dx {
                let (hw, pq, planes) = (geom.h * geom.w, geom.p * geom.q, geom.n * geom.c);
                let mut out = take(slots, g);
                if !*max && mode == Mode::Write {
                    pool::avg_backward_into(geom, &slots[*dy][..planes * pq], &mut out[..planes * hw]);
                } else if mode == Mode::Write {
                    pool::scatter_planes_into(&slots[*dy][..planes * pq], argmax, planes, pq, hw, &mut out[..planes * hw]);
                } else {
                    let d = if *max {
                        pool::scatter_planes(&slots[*dy][..planes * pq], argmax, planes, pq, hw)
                    } else {
                        pool::avg_backward(geom, &slots[*dy][..planes * pq])
                    };
                    deliver(&mut out[..planes * hw], mode, &d);
                }
                put(slots, g, out);
            }
        }
        TStep::GlobalAvg { planes, hw, dx, dy, .. } => {
            if let Some((g, mode)) = *dx {
                let mut out = take(slots, g);
                let scale = 1.0 / (*hw).max(1) as f32;
                for (dxp, &d) in out[..*planes * *hw].chunks_exact_mut((*hw).max(1)).zip(&slots[*dy][..*planes]) {
                    match mode {
                        Mode::Write => dxp.fill(d * scale),
                        Mode::Add => dxp.iter_mut().for_each(|v| *v += d * scale),
                    }
                }
                put(slots, g, out);
            }
        }
        TStep::Unary { f, len, x, y, dx, dy } => {
            if let Some((g, mode)) = *dx {
                let (mut out, len) = (take(slots, g), *len);
                if mode == Mode::Write {
                    f.grad_slice(&slots[*dy][..len], &slots[*x][..len], &slots[*y][..len], &mut out[..len]);
                } else {
                    let mut tmp = vec![0.0; len];
                    f.grad_slice(&slots[*dy][..len], &slots[*x][..len], &slots[*y][..len], &mut tmp);
                    deliver(&mut out[..len], mode, &tmp);
                }
                put(slots, g, out);
            }
        }
        TStep::Add { len, da, db, dy, .. } => {
            for (g, mode) in [*da, *db].into_iter().flatten() {
                let (mut out, len) = (take(slots, g), *len);
                deliver(&mut out[..len], mode, &slots[*dy][..len]);
                put(slots, g, out);
            }
        }
        TStep::BatchNorm { gamma, beta, layout, dims: [n, c, l], stats, relu, x, y, dx, dy, .. } => {
            let (n, c, l) = (*n, *c, *l);
            // With a ReLU, its gradient is written over its output and read from there.
            let z = relu.then(|| {
                let mut z = take(slots, *y);
                stride_kernels::unary::relu_grad_over_output(&mut z[..n * c * l], &slots[*dy][..n * c * l]);
                z
            });
            // The input gradient's buffer is taken first, so x and dy are borrowed once for
            // both passes.
            let mut out = dx.map(|(g, mode)| (g, mode, take(slots, g)));
            let dys: &[f32] = match &z {
                Some(z) => &z[..n * c * l],
                None => &slots[*dy][..n * c * l],
            };
            let xs = &slots[*x][..n * c * l];
            let (mut dg, mut dbt) = (vec![0f32; c], vec![0f32; c]);
            layout.pieces(n, c, l, |at, pn, pl| {
                let r = at..at + pn * c * pl;
                let (g, b) = norm::backward_sums(&dys[r.clone()], &xs[r], pn, c, pl, &stats.mean, &stats.invstd);
                dg.iter_mut().zip(g).for_each(|(o, v)| *o += v);
                dbt.iter_mut().zip(b).for_each(|(o, v)| *o += v);
            });
            if let Some((_, mode, out)) = out.as_mut() {
                let gm = weights[*gamma].data();
                layout.pieces(n, c, l, |at, pn, pl| {
                    let r = at..at + pn * c * pl;
                    let batch = Some((&dg[..], &dbt[..], (n * l) as f64));
                    if *mode == Mode::Write {
                        let terms = norm::DxTerms { mean: &stats.mean, invstd: &stats.invstd, gamma: gm, batch };
                        norm::backward_dx_into(&dys[r.clone()], &xs[r.clone()], c, pl, &terms, &mut out[r]);
                    } else {
                        let d = norm::backward_dx(&dys[r.clone()], &xs[r.clone()], c, pl, &stats.mean, &stats.invstd, gm, batch);
                        deliver(&mut out[r], *mode, &d);
                    }
                });
            }
            if let Some((g, _, out)) = out {
                put(slots, g, out);
            }
            if let Some(z) = z {
                put(slots, *y, z);
            }
            grads[*gamma].copy_from_slice(&dg);
            grads[*beta].copy_from_slice(&dbt);
        }
        TStep::Linear { w, b, relu, dims: [m, k, n], x, y, dx, dy } => {
            let (m, k, n) = (*m, *k, *n);
            // As for convolutions: with a ReLU, the gradient before it is written over its
            // output; without one, the output's gradient is read where it lies.
            let z = relu.then(|| {
                let mut z = take(slots, *y);
                stride_kernels::unary::relu_grad_over_output(&mut z[..m * n], &slots[*dy][..m * n]);
                z
            });
            let out = dx.map(|(g, _)| take(slots, g));
            let dz = &z.as_deref().unwrap_or(&slots[*dy][..])[..m * n];
            let dzm = MatRef::rows(dz, m, n);
            // dW [n, k] = dz^T [n, m] x x [m, k]; db = column sums of dz.
            matmul(dzm.t(), MatRef::rows(&slots[*x][..m * k], m, k), &mut grads[*w], k, false, auto_threads(n, m, k));
            if let Some(b) = b {
                let db = &mut grads[*b];
                db.fill(0.0);
                dz.chunks_exact(n).for_each(|row| db.iter_mut().zip(row).for_each(|(o, &v)| *o += v));
            }
            if let (Some((g, mode)), Some(mut out)) = (*dx, out) {
                // dx [m, k] = dz [m, n] x W [n, k]
                let wm = MatRef::rows(weights[*w].data(), n, k);
                matmul(dzm, wm, &mut out[..m * k], k, mode == Mode::Add, auto_threads(m, n, k));
                put(slots, g, out);
            }
            if let Some(z) = z {
                put(slots, *y, z);
            }
        }
    }
    Ok(())
}
