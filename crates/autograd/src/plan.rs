//! Planned execution (inference): a recorded forward pass compiled once into a list of steps
//! over one arena, then replayed for every batch of the same shape.
//!
//! Compiling walks the tape from the output back to the input (the tape already is the op
//! sequence) and decides, once:
//! - **fusion**: a convolution takes the batch norm after it (folded into its weights and
//!   bias), a residual add and an activation into its output pass; a matrix product takes its
//!   bias and activation;
//! - **layouts**: products that gain from it run batch-blocked (`Layout::Blocked`, see
//!   `stride_kernels::conv::planned`), element-wise steps and pooling follow their input, every
//!   other step reads NCHW; a relayout is inserted only where two choices meet, and once per
//!   value and layout;
//! - **memory**: every value gets a place in one arena by liveness (first fit, a place reused
//!   once its last reader has run), so a replay allocates no activation and zeroes nothing.
//!
//! Steps are plain data (kernel, geometry, buffer ids); [`Plan::run`] is the CPU's interpreter
//! of them. Operations without a planned kernel run through a fallback step that calls the
//! eager forward on copies; operations that only make sense in training (losses, batch norm
//! with batch statistics) are refused with their name.
//!
//! A plan snapshots the weights it was compiled from (batch norm folded into them):
//! recompile after changing them.

use std::collections::HashMap;
use std::rc::Rc;

use rayon::prelude::*;

use stride_kernels::binary::{binary_into, BinOp};
use stride_kernels::conv::planned::{self, Epilogue, Layout, Prepared};
use stride_kernels::conv::ConvGeom;
use stride_kernels::gemm::{auto_threads, matmul, panels_into, panels_pay, skinny_into, skinny_pays, MatRef, Panels, PANEL_ROWS};
use stride_kernels::unary::Unary;
use stride_tensor::{bail, block_sum, gather_strided_into, Result, Tensor};

use crate::op::Op;
use crate::var::Node;
use crate::Var;

mod step;

use step::{place, Buf, Fallback, Src, Step};

/// Elements per task of a planned batch norm (whole planes, at least one).
const AFFINE_CHUNK: usize = 1 << 14;

/// A planned product with an activation goes in pieces of about this many outputs (and at
/// least `MATMUL_ROWS` rows), each finished while it is in cache.
const MATMUL_PIECE: usize = 1 << 17;
const MATMUL_ROWS: usize = 128;

/// A compiled forward pass for one input shape. See the module documentation.
pub struct Plan {
    steps: Vec<Step>,
    /// Arena offset and length of every buffer.
    bufs: Vec<(usize, usize)>,
    consts: Vec<Tensor<f32>>,
    arena: Vec<f32>,
    arena_len: usize,
    /// Scratch for max pooling's argmax, which inference does not keep.
    argmax: Vec<u32>,
    /// Each thread's lowering buffers, kept from run to run.
    scratch: planned::Scratch<f32>,
    input: (Buf, Vec<usize>),
    output: (Buf, Vec<usize>),
}

/// What compiling knows about a node's value.
#[derive(Clone, Debug)]
struct Val {
    buf: Buf,
    shape: Vec<usize>,
    layout: Layout,
}

struct Compiler {
    rec: Recorded,
    vals: Vec<Option<Val>>,
    done: Vec<bool>,
    steps: Vec<Step>,
    buf_len: Vec<usize>,
    consts: Vec<Tensor<f32>>,
    relayouts: HashMap<(Buf, Layout), Buf>,
    block: usize,
    /// Whether each node is computed from the input; the others (a position encoding made from
    /// the input's shape alone) are constants of the plan, as the weights are.
    varies: Vec<bool>,
}

/// A layer norm found in a recording ([`Compiler::layer_norm`]): its last node, the nodes
/// inside it, and its constants (a weight per position of the runs it normalises).
struct LayerNormMatch {
    tail: usize,
    inner: Vec<usize>,
    eps: f32,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
}

pub(crate) fn key(v: &Var<f32>) -> *const Node<f32> {
    Rc::as_ptr(&v.0)
}

/// The recorded pass from `input` to `output`: its nodes with every node after its parents,
/// where each node is, and which nodes read each one. Shared by inference and training plans.
pub(crate) struct Recorded {
    pub(crate) nodes: Vec<Var<f32>>,
    pub(crate) index: HashMap<*const Node<f32>, usize>,
    pub(crate) consumers: Vec<Vec<usize>>,
}

impl Recorded {
    pub(crate) fn walk(input: &Var<f32>, output: &Var<f32>, what: &'static str) -> Result<Recorded> {
        // Post-order DFS from the output (iterative: deep networks cannot overflow the stack).
        let (mut nodes, mut index) = (Vec::new(), HashMap::new());
        let mut stack = vec![(output.clone(), false)];
        while let Some((v, expanded)) = stack.pop() {
            if index.contains_key(&key(&v)) {
                continue;
            }
            if expanded || v.same(input) || v.is_leaf() {
                index.insert(key(&v), nodes.len());
                nodes.push(v);
                continue;
            }
            stack.push((v.clone(), true));
            for p in v.0.parents.iter().rev() {
                if !index.contains_key(&key(p)) {
                    stack.push((p.clone(), false));
                }
            }
        }
        if !index.contains_key(&key(input)) {
            bail!(arg, what, "the output does not depend on the input (was it recorded with gradients off?)");
        }
        let mut consumers = vec![Vec::new(); nodes.len()];
        for (i, v) in nodes.iter().enumerate() {
            if !v.is_leaf() {
                for p in &v.0.parents {
                    consumers[index[&key(p)]].push(i);
                }
            }
        }
        Ok(Recorded { nodes, index, consumers })
    }

    pub(crate) fn idx(&self, v: &Var<f32>) -> usize {
        self.index[&key(v)]
    }

    /// The single consumer of node `i`, if it has exactly one.
    pub(crate) fn only_consumer(&self, i: usize) -> Option<usize> {
        match self.consumers[i].as_slice() {
            [c] => Some(*c),
            _ => None,
        }
    }
}

fn dims4(shape: &[usize]) -> Option<[usize; 3]> {
    (shape.len() == 4).then(|| [shape[0], shape[1], shape[2] * shape[3]])
}

impl Compiler {
    fn new(input: &Var<f32>, output: &Var<f32>) -> Result<Self> {
        let rec = Recorded::walk(input, output, "plan")?;
        let n = rec.nodes.len();
        // Parents come before their consumers.
        let mut varies = vec![false; n];
        for (i, v) in rec.nodes.iter().enumerate() {
            varies[i] = v.same(input) || (!v.is_leaf() && v.0.parents.iter().any(|p| varies[rec.index[&key(p)]]));
        }
        let batch = input.shape().first().copied().unwrap_or(1);
        let block = planned::block_for(batch);
        Ok(Compiler {
            rec,
            vals: vec![None; n],
            done: vec![false; n],
            steps: Vec::new(),
            buf_len: Vec::new(),
            consts: Vec::new(),
            relayouts: HashMap::new(),
            block,
            varies,
        })
    }

    fn buffer(&mut self, len: usize) -> Buf {
        self.buf_len.push(len);
        self.buf_len.len() - 1
    }

    /// Node `p`'s value in the arena in `layout`, relayouting once if needed.
    fn operand(&mut self, p: usize, layout: Layout) -> Buf {
        let v = self.vals[p].clone().expect("parents are compiled before their consumers");
        let dims = dims4(&v.shape);
        if v.layout == layout || dims.is_some_and(|[n, c, _]| v.layout.same_memory(layout, n, c)) {
            return v.buf;
        }
        if let Some(&b) = self.relayouts.get(&(v.buf, layout)) {
            return b;
        }
        let dims = dims.expect("only 4-D values change layout");
        let dst = self.buffer(self.buf_len[v.buf]);
        self.steps.push(Step::Relayout { src: v.buf, dst, from: v.layout, to: layout, dims });
        self.relayouts.insert((v.buf, layout), dst);
        dst
    }

    /// A parent read as a generic operand: the arena (NCHW) or a captured constant.
    fn src(&mut self, p: usize) -> Src {
        if self.vals[p].is_some() {
            return Src::Buf(self.operand(p, Layout::Nchw));
        }
        self.consts.push(self.rec.nodes[p].value());
        Src::Const(self.consts.len() - 1)
    }

    /// Whether a parent is a weight, or computed from weights alone: not from the input.
    fn constant(&self, p: usize) -> bool {
        !self.varies[p]
    }

    fn define(&mut self, i: usize, shape: Vec<usize>, layout: Layout) -> Buf {
        let buf = self.buffer(shape.iter().product());
        self.vals[i] = Some(Val { buf, shape, layout });
        buf
    }

    /// Follows node `tail`'s single consumer if it is an activation: fuses it.
    fn take_act(&mut self, tail: &mut usize) -> Option<Unary> {
        let c = self.rec.only_consumer(*tail)?;
        if let Some(Op::Unary(f)) = self.rec.nodes[c].0.op {
            self.done[c] = true;
            *tail = c;
            return Some(f);
        }
        None
    }

    /// [`take_act`](Self::take_act), also through a reshape that only the activation reads (a
    /// dense layer on rows of a 4-D value: product, bias, reshape back, GELU). The value at the
    /// new tail is the activation's, of its own shape, and the reshape is a view of it.
    fn take_act_through_reshape(&mut self, tail: &mut usize) -> Option<Unary> {
        if let Some(f) = self.take_act(tail) {
            return Some(f);
        }
        let c = self.rec.only_consumer(*tail)?;
        if !matches!(self.rec.nodes[c].0.op, Some(Op::Reshape)) {
            return None;
        }
        let mut at = c;
        let f = self.take_act(&mut at)?;
        self.done[c] = true;
        *tail = at;
        Some(f)
    }

    fn compile(&mut self, i: usize) -> Result<()> {
        let node = self.rec.nodes[i].clone();
        let op = node.0.op.as_ref().expect("leaves are not compiled");
        let shape = node.shape();
        let ps: Vec<usize> = node.0.parents.iter().map(|p| self.rec.idx(p)).collect();
        // Patterns of several recorded ops that run as one step, found from their first op.
        if ps.first().is_some_and(|&p| self.vals[p].is_some()) {
            if let Some(ln) = self.layer_norm(i) {
                for &d in &ln.inner {
                    self.done[d] = true;
                }
                let src = self.operand(ps[0], Layout::Nchw);
                let dst = self.define(ln.tail, self.rec.nodes[ln.tail].shape(), Layout::Nchw);
                self.steps.push(Step::LayerNorm { eps: ln.eps, weight: ln.weight, bias: ln.bias, src, dst });
                return Ok(());
            }
            if let Some((tail, picks)) = self.channel_shuffle(i) {
                // The permutation between the two views is part of this gather.
                let permute = self.rec.only_consumer(i).expect("matched");
                self.done[permute] = true;
                let c = picks.len();
                self.gather(tail, "channel_shuffle", &[(ps[0], c)], picks, self.rec.nodes[tail].shape());
                return Ok(());
            }
        }
        match op {
            Op::Device { prim, .. } => {
                bail!(device, "plan", "{} ran on {}: plans run on the CPU (move the model with .to(Device::Cpu))", prim.name(), node.device())
            }
            Op::Conv2d { geom } => self.conv(i, geom, &ps)?,
            Op::BatchNorm { training: true, .. } => bail!(arg, "plan", "batch_norm in training mode: plans are for inference (Ctx::eval)"),
            Op::BatchNorm { mean, invstd, .. } => {
                if !(self.constant(ps[1]) && self.constant(ps[2])) || self.constant(ps[0]) {
                    return self.fallback(i, op.name(), &ps, shape);
                }
                let (gamma, beta) = (self.rec.nodes[ps[1]].value(), self.rec.nodes[ps[2]].value());
                let scale: Vec<f32> = gamma.data().iter().zip(invstd).map(|(&g, &s)| g * s).collect();
                let shift: Vec<f32> = beta.data().iter().zip(mean).zip(&scale).map(|((&b, &m), &s)| b - m * s).collect();
                let layout = self.vals[ps[0]].as_ref().map_or(Layout::Nchw, |v| v.layout);
                let dims = [shape[0], shape[1], shape[2..].iter().product()];
                let src = self.operand(ps[0], layout);
                let mut tail = i;
                let act = self.take_act(&mut tail);
                let dst = self.define(tail, shape, layout);
                self.steps.push(Step::Affine { scale, shift, layout, dims, act, src, dst });
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } if self.vals[ps[0]].is_some() => {
                let (axis, log) = (*axis, matches!(op, Op::LogSoftmax { .. }));
                let dims = [shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product()];
                let src = self.operand(ps[0], Layout::Nchw);
                let dst = self.define(i, shape, Layout::Nchw);
                self.steps.push(Step::Softmax { dims, log, src, dst });
            }
            // Plane by plane, in the input's layout (its planes lie in the same order).
            Op::UpsampleNearest { scale } if self.vals[ps[0]].is_some() && shape.len() == 4 => {
                let from = self.rec.nodes[ps[0]].shape();
                let layout = self.vals[ps[0]].as_ref().map_or(Layout::Nchw, |v| v.layout);
                let src = self.operand(ps[0], layout);
                let dst = self.define(i, shape, layout);
                self.steps.push(Step::Upsample { hw: (from[2], from[3]), scale: *scale, src, dst });
            }
            Op::MaxPool2d { geom, .. } | Op::AvgPool2d { geom } if self.vals[ps[0]].is_some() => {
                let layout = self.vals[ps[0]].as_ref().map_or(Layout::Nchw, |v| v.layout);
                let src = self.operand(ps[0], layout);
                let dst = self.define(i, shape, layout);
                let geom = *geom;
                self.steps.push(if matches!(op, Op::MaxPool2d { .. }) { Step::MaxPool { geom, src, dst } } else { Step::AvgPool { geom, src, dst } });
            }
            Op::AdaptiveAvgPool2d { out } if self.vals[ps[0]].is_some() => {
                // Plane by plane: in its input's layout.
                let from = self.rec.nodes[ps[0]].shape();
                let layout = self.vals[ps[0]].as_ref().map_or(Layout::Nchw, |v| v.layout);
                let src = self.operand(ps[0], layout);
                let dims = [from[0], from[1], from[2], from[3]];
                let dst = self.define(i, shape, layout);
                self.steps.push(Step::AdaptiveAvg { dims, out: *out, src, dst });
            }
            Op::Unary(f) if self.vals[ps[0]].is_some() => {
                let layout = self.vals[ps[0]].as_ref().map_or(Layout::Nchw, |v| v.layout);
                let src = self.operand(ps[0], layout);
                let dst = self.define(i, shape, layout);
                self.steps.push(Step::Unary { f: *f, src, dst });
            }
            Op::Add | Op::Sub | Op::Mul | Op::Div => {
                let op = match op {
                    Op::Add => BinOp::Add,
                    Op::Sub => BinOp::Sub,
                    Op::Mul => BinOp::Mul,
                    _ => BinOp::Div,
                };
                let shapes = Box::new([self.rec.nodes[ps[0]].shape(), self.rec.nodes[ps[1]].shape()]);
                // Both computed and of one shape, or one a value per plane of the other (a
                // squeeze-excitation gate [N, C, 1, 1]): both in the larger one's layout, where
                // the planes lie in the same order. Constants, and other broadcasts, are NCHW.
                let per_plane = |a: &[usize], b: &[usize]| a.len() == 4 && b.len() == 4 && a[..2] == b[..2] && b[2..] == [1, 1];
                let full = if shapes[0] == shapes[1] || per_plane(&shapes[0], &shapes[1]) {
                    Some(ps[0])
                } else if per_plane(&shapes[1], &shapes[0]) {
                    Some(ps[1])
                } else {
                    None
                };
                let both = ps.iter().all(|&p| self.vals[p].is_some());
                let layout = match full {
                    Some(f) if both => self.vals[f].as_ref().map_or(Layout::Nchw, |v| v.layout),
                    _ => Layout::Nchw,
                };
                let src = |c: &mut Self, p: usize| if c.vals[p].is_some() { Src::Buf(c.operand(p, layout)) } else { c.src(p) };
                let (a, b) = (src(self, ps[0]), src(self, ps[1]));
                let mut tail = i;
                let act = self.take_act(&mut tail);
                let dst = self.define(tail, shape, layout);
                self.steps.push(Step::Binary { op, a, b, shapes, act, dst });
            }
            Op::Permute { perm } if self.vals[ps[0]].is_some() && !shape.is_empty() => {
                let from = self.rec.nodes[ps[0]].shape();
                let strides = stride_tensor::shape::strides(&from);
                let read = perm.iter().map(|&p| strides[p]).collect();
                let src = self.operand(ps[0], Layout::Nchw);
                let dst = self.define(i, shape.clone(), Layout::Nchw);
                self.steps.push(Step::Permute { shape, read, src, dst });
            }
            // Channel splits and concatenations of 4-D values: gathers in their input's layout.
            Op::Narrow { axis: 1, start } if shape.len() == 4 && self.vals[ps[0]].is_some() => {
                let c = self.rec.nodes[ps[0]].shape()[1];
                let picks = (*start..start + shape[1]).map(|ch| (0, ch)).collect();
                self.gather(i, "narrow", &[(ps[0], c)], picks, shape);
            }
            Op::Concat { axis: 1, sizes } if shape.len() == 4 && ps.iter().all(|&p| self.vals[p].is_some()) => {
                let srcs: Vec<(usize, usize)> = ps.iter().copied().zip(sizes.iter().copied()).collect();
                let picks = sizes.iter().enumerate().flat_map(|(s, &c)| (0..c).map(move |ch| (s, ch))).collect();
                self.gather(i, "concat", &srcs, picks, shape);
            }
            Op::Narrow { axis, start } if self.vals[ps[0]].is_some() => {
                let from_shape = self.rec.nodes[ps[0]].shape();
                let inner: usize = from_shape[axis + 1..].iter().product();
                let (row, from, offset) = (shape[*axis] * inner, from_shape[*axis] * inner, start * inner);
                let src = self.operand(ps[0], Layout::Nchw);
                let dst = self.define(i, shape, Layout::Nchw);
                self.steps.push(Step::Narrow { row, from, offset, src, dst });
            }
            // The trailing axes, in order: each output sums one run of the input.
            Op::Sum { axes, .. }
                if self.vals[ps[0]].is_some() && {
                    let r = self.rec.nodes[ps[0]].shape().len();
                    axes.len() <= r && axes.iter().enumerate().all(|(k, &x)| x == r - axes.len() + k)
                } =>
            {
                let from = self.rec.nodes[ps[0]].shape();
                let len = from.iter().rev().take(axes.len()).product();
                let src = self.operand(ps[0], Layout::Nchw);
                let dst = self.define(i, shape, Layout::Nchw);
                self.steps.push(Step::SumRuns { len, src, dst });
            }
            Op::Reshape => {
                // A view: the same buffer, read as NCHW.
                let buf = self.operand(ps[0], Layout::Nchw);
                self.vals[i] = Some(Val { buf, shape, layout: Layout::Nchw });
            }
            Op::MatMul { transpose_b } => {
                let (xa, xb) = (self.rec.nodes[ps[0]].shape(), self.rec.nodes[ps[1]].shape());
                if xa.len() != 2 || xb.len() != 2 {
                    return self.fallback(i, op.name(), &ps, shape);
                }
                let (m, k) = (xa[0], xa[1]);
                let n = if *transpose_b { xb[0] } else { xb[1] };
                let (a, b) = (self.src(ps[0]), self.src(ps[1]));
                let mut tail = i;
                let mut bias = None;
                if let Some(c) = self.rec.only_consumer(i) {
                    let cn = &self.rec.nodes[c];
                    if matches!(cn.0.op, Some(Op::Add)) && cn.0.parents[0].same(&node) {
                        let other = self.rec.idx(&cn.0.parents[1].clone());
                        if self.constant(other) && self.rec.nodes[other].shape() == [n] {
                            bias = Some(self.rec.nodes[other].value().data().to_vec());
                            self.done[c] = true;
                            tail = c;
                        }
                    }
                }
                let act = self.take_act_through_reshape(&mut tail);
                let dst = self.define(tail, self.rec.nodes[tail].shape(), Layout::Nchw);
                // A few rows (one image) against a weight stored [n, k] too large for the cache.
                let panels =
                    (*transpose_b && self.constant(ps[1]) && panels_pay(m, k, n)).then(|| Panels::new(self.rec.nodes[ps[1]].value().data(), n, k));
                self.steps.push(Step::MatMul { a, b, dims: [m, k, n], transpose_b: *transpose_b, panels, bias, act, dst });
            }
            Op::Concat { axis, sizes } => {
                let inner: usize = shape[axis + 1..].iter().product();
                let outer: usize = shape[..*axis].iter().product();
                let srcs = ps.iter().map(|&p| self.src(p)).collect();
                let chunks = sizes.iter().map(|s| s * inner).collect();
                let dst = self.define(i, shape, Layout::Nchw);
                self.steps.push(Step::Concat { srcs, chunks, outer, dst });
            }
            Op::Nll { .. } => bail!(arg, "plan", "nll_loss is a loss: plan the network's forward pass, not its loss"),
            _ => self.fallback(i, op.name(), &ps, shape)?,
        }
        Ok(())
    }

    /// Layer norm over trailing axes as `ops::norm::layer_norm` records it, from its first
    /// sum (node `i`): mean, centred values, their mean square, (.. + eps)^-0.5, the product,
    /// the weight and an optional bias, with every intermediate read only inside the pattern.
    fn layer_norm(&self, i: usize) -> Option<LayerNormMatch> {
        let rec = &self.rec;
        let op = |n: usize| rec.nodes[n].0.op.as_ref();
        let parent = |n: usize, k: usize| rec.nodes[n].0.parents.get(k).map(|p| rec.idx(p));
        let Some(Op::Sum { axes, keepdim: true }) = op(i) else { return None };
        let x = parent(i, 0)?;
        let shape = rec.nodes[x].shape();
        let rank = shape.len();
        if axes.is_empty() || axes.iter().enumerate().any(|(k, &a)| a != rank - axes.len() + k) {
            return None;
        }
        let len: usize = shape[rank - axes.len()..].iter().product();
        let scale = |n: usize| matches!(op(n), Some(Op::Unary(Unary::MulScalar(s))) if (*s - 1.0 / len as f64).abs() <= 1e-12 / len as f64);
        let mean = rec.only_consumer(i).filter(|&n| scale(n))?;
        let centred = rec.only_consumer(mean).filter(|&n| matches!(op(n), Some(Op::Sub)) && parent(n, 0) == Some(x) && parent(n, 1) == Some(mean))?;
        let [a, b] = rec.consumers[centred][..] else { return None };
        let (square, prod) = if matches!(op(a), Some(Op::Unary(Unary::Square))) { (a, b) } else { (b, a) };
        if !matches!(op(square), Some(Op::Unary(Unary::Square))) {
            return None;
        }
        let sum2 = rec.only_consumer(square).filter(|&n| matches!(op(n), Some(Op::Sum { axes: a2, keepdim: true }) if a2 == axes))?;
        let var = rec.only_consumer(sum2).filter(|&n| scale(n))?;
        let plus = rec.only_consumer(var)?;
        let Some(Op::Unary(Unary::AddScalar(eps))) = op(plus) else { return None };
        let inv = rec.only_consumer(plus).filter(|&n| matches!(op(n), Some(Op::Unary(Unary::Pow(p))) if *p == -0.5))?;
        if rec.only_consumer(inv) != Some(prod)
            || !matches!(op(prod), Some(Op::Mul))
            || parent(prod, 0) != Some(centred)
            || parent(prod, 1) != Some(inv)
        {
            return None;
        }
        let trailing = &shape[rank - axes.len()..];
        let constant = |n: usize, k: usize| parent(n, k).filter(|&p| self.constant(p) && rec.nodes[p].shape() == trailing);
        let scaled = rec.only_consumer(prod).filter(|&n| matches!(op(n), Some(Op::Mul)) && parent(n, 0) == Some(prod))?;
        let weight = rec.nodes[constant(scaled, 1)?].value().data().to_vec();
        let mut inner = vec![mean, centred, square, sum2, var, plus, inv, prod];
        let (tail, bias) = match rec.only_consumer(scaled) {
            Some(n) if matches!(op(n), Some(Op::Add)) && parent(n, 0) == Some(scaled) && constant(n, 1).is_some() => {
                inner.push(scaled);
                (n, Some(rec.nodes[constant(n, 1)?].value().data().to_vec()))
            }
            _ => (scaled, None),
        };
        Some(LayerNormMatch { tail, inner, eps: *eps as f32, weight, bias })
    }

    /// A gather of channels from 4-D values `srcs` (node, channels) into node `i`'s value
    /// [N, picks.len(), H, W], blocked if a source is (the convolutions around it are).
    fn gather(&mut self, i: usize, what: &str, srcs: &[(usize, usize)], picks: Vec<(usize, usize)>, shape: Vec<usize>) {
        let layouts = srcs.iter().filter_map(|&(p, _)| self.vals[p].as_ref().map(|v| v.layout));
        let layout = layouts.max_by_key(|l| l.block()).unwrap_or(Layout::Nchw);
        let srcs = srcs.iter().map(|&(p, c)| (self.operand(p, layout), c)).collect();
        let dims = [shape[0], shape[2] * shape[3]];
        let dst = self.define(i, shape, layout);
        self.steps.push(Step::Channels { what: what.into(), srcs, picks, layout, dims, dst });
    }

    /// ShuffleNet's channel shuffle from reshape node `i`: [N, C, H, W] viewed as [N, g, C/g,
    /// H, W] (node `i`), its axes 1 and 2 swapped, viewed as [N, C, H, W] again, each only
    /// read by the next. The last node, and the input channel of each output channel.
    fn channel_shuffle(&self, i: usize) -> Option<(usize, Vec<(usize, usize)>)> {
        if !matches!(self.rec.nodes[i].0.op, Some(Op::Reshape)) {
            return None;
        }
        let from = self.rec.nodes[self.rec.idx(&self.rec.nodes[i].0.parents[0])].shape();
        let split = self.rec.nodes[i].shape();
        let [n, c, h, w] = from[..] else { return None };
        let [sn, g, cg, sh, sw] = split[..] else { return None };
        if (sn, sh, sw) != (n, h, w) || g * cg != c {
            return None;
        }
        let t = self.rec.only_consumer(i)?;
        if !matches!(&self.rec.nodes[t].0.op, Some(Op::Permute { perm }) if perm[..] == [0, 2, 1, 3, 4]) {
            return None;
        }
        let r = self.rec.only_consumer(t)?;
        if !matches!(self.rec.nodes[r].0.op, Some(Op::Reshape)) || self.rec.nodes[r].shape() != from {
            return None;
        }
        // Output channel j * g + k (after the swap: [N, C/g, g, ..]) is input channel k * C/g + j.
        let picks = (0..cg).flat_map(|j| (0..g).map(move |k| (0, k * cg + j))).collect();
        Some((r, picks))
    }

    fn conv(&mut self, i: usize, geom: &ConvGeom, ps: &[usize]) -> Result<()> {
        if !ps[1..].iter().all(|&p| self.constant(p)) {
            return self.fallback(i, "conv2d", ps, geom.small_shape().to_vec());
        }
        let mut w = self.rec.nodes[ps[1]].value().data().to_vec();
        let mut bias = ps.get(2).map(|&p| self.rec.nodes[p].value().data().to_vec());
        let mut tail = i;
        // Batch norm right after: fold it into the weights and bias.
        if let Some(c) = self.rec.only_consumer(tail) {
            let cn = self.rec.nodes[c].clone();
            if let Some(Op::BatchNorm { mean, invstd, training: false, .. }) = &cn.0.op {
                let (g, b) = (self.rec.idx(&cn.0.parents[1]), self.rec.idx(&cn.0.parents[2]));
                if self.constant(g) && self.constant(b) {
                    let (gamma, beta) = (self.rec.nodes[g].value(), self.rec.nodes[b].value());
                    let per = w.len() / geom.k.max(1);
                    let mut folded = vec![0.0; geom.k];
                    for k in 0..geom.k {
                        let s = gamma.data()[k] * invstd[k];
                        w[k * per..(k + 1) * per].iter_mut().for_each(|v| *v *= s);
                        let b0 = bias.as_ref().map_or(0.0, |b| b[k]);
                        folded[k] = (b0 - mean[k]) * s + beta.data()[k];
                    }
                    bias = Some(folded);
                    self.done[c] = true;
                    tail = c;
                }
            }
        }
        let layout = if self.block > 1 && planned::blocks_forward(geom) { Layout::Blocked(self.block) } else { Layout::Nchw };
        // A residual add whose other operand is already computed.
        let mut residual = None;
        if let Some(c) = self.rec.only_consumer(tail) {
            let cn = self.rec.nodes[c].clone();
            if matches!(cn.0.op, Some(Op::Add)) {
                let (a, b) = (self.rec.idx(&cn.0.parents[0]), self.rec.idx(&cn.0.parents[1]));
                let other = if a == tail { b } else { a };
                if other != tail && self.vals[other].is_some() && self.rec.nodes[other].shape() == geom.small_shape() {
                    residual = Some(self.operand(other, layout));
                    self.done[c] = true;
                    tail = c;
                }
            }
        }
        let act = self.take_act(&mut tail);
        // A 2x2 average pooling as the only consumer: pooled inside the convolution.
        let mut pool = None;
        let mut out_shape = geom.small_shape().to_vec();
        if let Some(c) = self.rec.only_consumer(tail) {
            if let Some(Op::AvgPool2d { geom: pg }) = self.rec.nodes[c].0.op {
                if planned::fuses_pool(geom, &pg) {
                    pool = Some(Box::new(pg));
                    out_shape = self.rec.nodes[c].shape();
                    self.done[c] = true;
                    tail = c;
                }
            }
        }
        let src = self.operand(ps[0], layout);
        let w = Prepared::new(geom, &w).into_owned();
        let dst = self.define(tail, out_shape, layout);
        self.steps.push(Step::Conv { geom: *geom, layout, w, bias, residual, act, pool, src, dst });
        Ok(())
    }

    /// A step that runs the eager forward of node `i`'s op on copies of its inputs.
    fn fallback(&mut self, i: usize, name: &'static str, ps: &[usize], shape: Vec<usize>) -> Result<()> {
        let node = self.rec.nodes[i].clone();
        let op = node.0.op.as_ref().expect("not a leaf");
        let out = shape.clone();
        let f: Fallback = match op {
            Op::Device { .. } => bail!(device, "plan", "{name} ran on {}: plans run on the CPU", node.device()),
            Op::Add => Box::new(|t| t[0].add(&t[1])),
            Op::Sub => Box::new(|t| t[0].sub(&t[1])),
            Op::Mul => Box::new(|t| t[0].mul(&t[1])),
            Op::Div => Box::new(|t| t[0].div(&t[1])),
            Op::Unary(f) => {
                let f = *f;
                Box::new(move |t| Ok(t[0].map(|v| f.apply(v))))
            }
            Op::Sum { axes, keepdim } => {
                let (axes, keepdim) = (axes.clone(), *keepdim);
                Box::new(move |t| t[0].sum_axes(&axes, keepdim))
            }
            Op::Max { axis, .. } => {
                let axis = *axis;
                Box::new(move |t| t[0].max_axis(axis, true)?.0.reshape(&out))
            }
            Op::Permute { perm } => {
                let perm = perm.clone();
                Box::new(move |t| t[0].permute(&perm))
            }
            Op::Narrow { axis, start } => {
                let (axis, start, len) = (*axis, *start, shape[*axis]);
                Box::new(move |t| t[0].narrow(axis, start, len))
            }
            Op::Pad { pads, value } => {
                let (pads, value) = (pads.clone(), *value as f32);
                Box::new(move |t| t[0].pad(&pads, value))
            }
            Op::UpsampleNearest { scale } => {
                let scale = *scale;
                Box::new(move |t| Ok(Var::constant(t[0].clone()).upsample_nearest2d(scale)?.value()))
            }
            Op::MatMul { transpose_b } => {
                let tb = *transpose_b;
                Box::new(move |t| crate::matmul_tensors(&t[0], false, &t[1], tb))
            }
            Op::Conv2d { geom } => {
                let geom = *geom;
                Box::new(move |t| {
                    let y = stride_kernels::conv::forward(&geom, t[0].data(), t[1].data(), t.get(2).map(|b| b.data()));
                    Tensor::from_vec(y, &geom.small_shape())
                })
            }
            Op::ConvTranspose2d { geom } => {
                let geom = *geom;
                Box::new(move |t| {
                    let mut y = stride_kernels::conv::backward_data(&geom, t[0].data(), t[1].data());
                    if let Some(b) = t.get(2) {
                        let plane = geom.h * geom.w;
                        for (i, v) in y.iter_mut().enumerate() {
                            *v += b.data()[(i / plane.max(1)) % geom.c];
                        }
                    }
                    Tensor::from_vec(y, &geom.large_shape())
                })
            }
            Op::MaxPool2d { geom, .. } => {
                let geom = *geom;
                Box::new(move |t| Tensor::from_vec(stride_kernels::pool::max_forward(&geom, t[0].data()).0, &out))
            }
            Op::AvgPool2d { geom } => {
                let geom = *geom;
                Box::new(move |t| Tensor::from_vec(stride_kernels::pool::avg_forward(&geom, t[0].data()), &out))
            }
            Op::LpPool2d { geom, p } => {
                let (geom, p) = (*geom, *p as f32);
                Box::new(move |t| Tensor::from_vec(stride_kernels::pool::lp_forward(&geom, t[0].data(), p), &out))
            }
            Op::AdaptiveAvgPool2d { out: o } => {
                let o = *o;
                Box::new(move |t| {
                    let d = stride_kernels::pool::nchw("adaptive_avg_pool2d", t[0].shape())?;
                    Tensor::from_vec(stride_kernels::pool::adaptive_avg_forward(t[0].data(), d, o), &out)
                })
            }
            Op::AdaptiveMaxPool2d { .. } => {
                let o = (shape[2], shape[3]);
                Box::new(move |t| {
                    let d = stride_kernels::pool::nchw("adaptive_max_pool2d", t[0].shape())?;
                    Tensor::from_vec(stride_kernels::pool::adaptive_max_forward(t[0].data(), d, o).0, &out)
                })
            }
            Op::BatchNorm { mean, invstd, .. } => {
                let (mean, invstd) = (mean.clone(), invstd.clone());
                Box::new(move |t| {
                    let s = t[0].shape();
                    let (c, l) = (s[1], s[2..].iter().product());
                    Tensor::from_vec(stride_kernels::norm::normalize(t[0].data(), c, l, &mean, &invstd, t[1].data(), t[2].data()), s)
                })
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } => {
                let (axis, log) = (*axis, matches!(op, Op::LogSoftmax { .. }));
                Box::new(move |t| {
                    let s = t[0].shape();
                    let (outer, dim, inner) = (s[..axis].iter().product(), s[axis], s[axis + 1..].iter().product());
                    let y = if log {
                        stride_kernels::softmax::log_softmax(t[0].data(), outer, dim, inner)
                    } else {
                        stride_kernels::softmax::softmax(t[0].data(), outer, dim, inner)
                    };
                    Tensor::from_vec(y, s)
                })
            }
            Op::Reshape => Box::new(move |t| t[0].reshape(&out)),
            Op::Concat { axis, .. } => {
                let axis = *axis;
                Box::new(move |t| Tensor::concat(&t.iter().collect::<Vec<_>>(), axis))
            }
            Op::ChannelMaxPool { .. } | Op::Nll { .. } | Op::AllSum { .. } => {
                bail!(arg, "plan", "{name} has no planned form yet; run the network eagerly")
            }
        };
        let srcs = ps.iter().map(|&p| (self.src(p), self.rec.nodes[p].shape())).collect();
        let dst = self.define(i, shape, Layout::Nchw);
        self.steps.push(Step::Fallback { name, f, srcs, dst });
        Ok(())
    }
}

impl Plan {
    /// Compiles the recorded forward pass from `input` to `output`. `input` must have been a
    /// [`Var::parameter`] (so every op that depends on it was recorded), and the pass run with
    /// gradients enabled, modules in evaluation mode.
    pub fn compile(input: &Var<f32>, output: &Var<f32>) -> Result<Plan> {
        if !input.requires_grad() || !input.is_leaf() {
            bail!(arg, "plan", "the input must be a parameter leaf (Var::parameter), so every op that reads it is recorded");
        }
        let mut c = Compiler::new(input, output)?;
        let in_shape = input.shape();
        let ii = c.rec.idx(input);
        c.define(ii, in_shape.clone(), Layout::Nchw);
        let in_buf = c.vals[ii].as_ref().map(|v| v.buf).expect("defined");
        for i in 0..c.rec.nodes.len() {
            if c.done[i] || c.vals[i].is_some() || !c.varies[i] {
                continue;
            }
            c.compile(i)?;
        }
        let oi = c.rec.idx(output);
        let Some(out) = c.vals[oi].clone() else {
            bail!(arg, "plan", "the output is a constant: it does not depend on the input");
        };
        let mut out_buf = c.operand(oi, Layout::Nchw);
        if out_buf == in_buf {
            // The identity network: still give the output its own buffer.
            let dst = c.buffer(c.buf_len[in_buf]);
            c.steps.push(Step::Unary { f: Unary::MulScalar(1.0), src: in_buf, dst });
            out_buf = dst;
        }
        step::merge_gathers(&mut c.steps, &[in_buf, out_buf]);
        let inside = step::place_gathers(&mut c.steps, &c.buf_len, &[in_buf, out_buf]);
        let (bufs, total) = place(&c.steps, &c.buf_len, &inside, in_buf, out_buf);
        let argmax = c.steps.iter().filter_map(|s| if let Step::MaxPool { dst, .. } = s { Some(c.buf_len[*dst]) } else { None }).max().unwrap_or(0);
        Ok(Plan {
            steps: c.steps,
            bufs,
            consts: c.consts,
            // Allocated by the first run, once the recording this was compiled from is freed.
            arena: Vec::new(),
            arena_len: total,
            argmax: vec![0; argmax],
            scratch: planned::Scratch::for_pool(),
            input: (in_buf, in_shape),
            output: (out_buf, out.shape),
        })
    }

    /// The input shape this plan was compiled for.
    pub fn input_shape(&self) -> &[usize] {
        &self.input.1
    }

    /// Elements of the arena: every activation of a pass, placed by liveness.
    pub fn arena_len(&self) -> usize {
        self.arena_len
    }

    /// One line per step: what runs, fused parts and layout.
    pub fn describe(&self) -> Vec<String> {
        self.steps.iter().map(|s| s.name()).collect()
    }

    /// Per step, in the order of [`Plan::describe`]: the shapes a convolution or matrix
    /// product works on and its floating-point operations; None for other steps.
    pub fn geometry(&self) -> Vec<Option<(String, f64)>> {
        self.steps.iter().map(|s| s.geometry()).collect()
    }

    /// Runs the plan on `x`, which must have the compiled input shape.
    pub fn run(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        self.run_with(x, None)
    }

    /// [`Plan::run`] that also times each step (seconds, in the order of [`Plan::describe`]).
    pub fn run_timed(&mut self, x: &Tensor<f32>) -> Result<(Tensor<f32>, Vec<f64>)> {
        let mut times = Vec::with_capacity(self.steps.len());
        let y = self.run_with(x, Some(&mut times))?;
        Ok((y, times))
    }

    fn run_with(&mut self, x: &Tensor<f32>, mut times: Option<&mut Vec<f64>>) -> Result<Tensor<f32>> {
        if x.shape() != self.input.1.as_slice() {
            bail!(shape, "plan", "compiled for input shape {:?}, got {:?}", self.input.1, x.shape());
        }
        if self.arena.len() != self.arena_len {
            self.arena = vec![0.0; self.arena_len];
        }
        let (o, l) = self.bufs[self.input.0];
        self.arena[o..o + l].copy_from_slice(x.data());
        for s in 0..self.steps.len() {
            let t = std::time::Instant::now();
            self.step(s)?;
            if let Some(times) = times.as_deref_mut() {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let (o, l) = self.bufs[self.output.0];
        Tensor::from_vec(self.arena[o..o + l].to_vec(), &self.output.1)
    }

    fn step(&mut self, s: usize) -> Result<()> {
        let step = &self.steps[s];
        let (o, l) = self.bufs[step.writes()];
        // The arena around the output, read-only; buffers never overlap the output.
        let (lo, rest) = self.arena.split_at_mut(o);
        let (dst, hi) = rest.split_at_mut(l);
        let (lo, hi): (&[f32], &[f32]) = (lo, hi);
        let (bufs, consts) = (&self.bufs, &self.consts);
        let buf = |b: Buf| -> &[f32] {
            let (bo, bl) = bufs[b];
            if bo + bl <= o {
                &lo[bo..bo + bl]
            } else {
                &hi[bo - o - l..bo - o - l + bl]
            }
        };
        let src = |s: Src| -> &[f32] {
            match s {
                Src::Buf(b) => buf(b),
                Src::Const(c) => consts[c].data(),
            }
        };
        match step {
            Step::Relayout { src, from, to, dims: [n, c, p], .. } => planned::relayout(buf(*src), *from, dst, *to, *n, *c, *p),
            Step::Conv { geom, layout, w, bias, residual, act, pool, src, .. } => {
                let epi = Epilogue { bias: bias.as_deref(), residual: residual.map(buf), act: *act };
                planned::forward_with(geom, *layout, buf(*src), w, epi, pool.as_deref(), Some(&self.scratch), dst);
            }
            Step::MaxPool { geom, src, .. } => {
                let idx = &mut self.argmax[..dst.len()];
                stride_kernels::pool::max_forward_into(geom, buf(*src), dst, idx);
            }
            Step::AvgPool { geom, src, .. } => stride_kernels::pool::avg_forward_into(geom, buf(*src), dst),
            Step::Softmax { dims: [outer, dim, inner], log, src, .. } => {
                if *log {
                    stride_kernels::softmax::log_softmax_into(buf(*src), *outer, *dim, *inner, dst);
                } else {
                    stride_kernels::softmax::softmax_into(buf(*src), *outer, *dim, *inner, dst);
                }
            }
            Step::Upsample { hw: (h, w), scale, src, .. } => stride_kernels::resample::upsample_nearest_into(buf(*src), *h, *w, *scale, dst),
            Step::AdaptiveAvg { dims, out, src, .. } => stride_kernels::pool::adaptive_avg_forward_into(buf(*src), *dims, *out, dst),
            Step::Permute { shape, read, src, .. } => {
                // A piece per index of the first output axis, at least 16K values to a task.
                let (x, piece) = (buf(*src), shape[1..].iter().product::<usize>());
                if piece == 0 || dst.is_empty() {
                    return Ok(());
                }
                let per = (1usize << 14).div_ceil(piece);
                dst.par_chunks_mut(piece)
                    .enumerate()
                    .with_min_len(per)
                    .for_each(|(i, o)| gather_strided_into(x, &shape[1..], &read[1..], i * read[0], o));
            }
            Step::Narrow { row, from, offset, src, .. } => {
                let x = buf(*src);
                if *row > 0 {
                    let per = (1usize << 14).div_ceil(*row);
                    dst.par_chunks_mut(*row)
                        .zip(x.par_chunks(*from))
                        .with_min_len(per)
                        .for_each(|(o, r)| o.copy_from_slice(&r[*offset..*offset + *row]));
                }
            }
            Step::SumRuns { len, src, .. } => {
                let x = buf(*src);
                if *len == 0 {
                    dst.fill(0.0);
                } else {
                    let per = (1usize << 14).div_ceil(*len);
                    dst.par_iter_mut().zip(x.par_chunks(*len)).with_min_len(per).for_each(|(o, run)| *o = block_sum(run));
                }
            }
            Step::Unary { f, src, .. } => f.apply_slice(buf(*src), dst),
            Step::Binary { op, a, b, shapes, act, .. } => {
                binary_into(*op, (src(*a), &shapes[0]), (src(*b), &shapes[1]), dst)?;
                if let Some(act) = act {
                    act.apply_slice_in_place(dst);
                }
            }
            Step::Affine { scale, shift, layout, dims: [n, c, p], act, src, .. } => {
                // The planes on all cores, each plane's channel worked out from its place in the
                // layout (a block of `bj` images holds each channel's `bj` planes together).
                let (b, plane) = (layout.block(), (*p).max(1));
                let channel = |k: usize| {
                    let j = k / (b * c);
                    (k - j * b * c) / b.min(n - j * b)
                };
                let per = (AFFINE_CHUNK / plane).max(1);
                let x = buf(*src);
                dst.par_chunks_mut(per * plane).zip(x.par_chunks(per * plane)).enumerate().for_each(|(i, (y, x))| {
                    for (k, (y, x)) in y.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
                        let ch = channel(i * per + k);
                        let (s, t) = (scale[ch], shift[ch]);
                        y.iter_mut().zip(x).for_each(|(o, &v)| *o = v * s + t);
                        if let Some(act) = act {
                            act.apply_in_place(y);
                        }
                    }
                });
            }
            Step::MatMul { a, b, dims: [m, k, n], transpose_b, panels, bias, act, .. } => {
                let (a, b, (m, k, n)) = (src(*a), src(*b), (*m, *k, *n));
                let bm = if *transpose_b { MatRef::rows(b, n, k).t() } else { MatRef::rows(b, k, n) };
                // Rows of the product, then bias and activation on them while they are in cache.
                let piece = |rows: std::ops::Range<usize>, out: &mut [f32], threads: Option<usize>| {
                    if let Some(bias) = bias {
                        out.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(bias));
                    }
                    let a = &a[rows.start * k..rows.end * k];
                    if let Some(panels) = panels.as_ref().filter(|_| rows.len() <= PANEL_ROWS) {
                        panels_into(a, rows.len(), panels, out, (n, 1), bias.is_some());
                    } else if *transpose_b && skinny_pays(rows.len(), k, n) {
                        // A few rows (one image) against weights stored [n, k]: each row of
                        // weights read once.
                        skinny_into(a, rows.len(), &b[..n * k], out, (n, 1), bias.is_some());
                    } else {
                        matmul(MatRef::rows(a, rows.len(), k), bm, out, n, bias.is_some(), threads.unwrap_or(1));
                    }
                    match (act, threads) {
                        (Some(act), None) => act.apply_in_place(out),
                        (Some(act), Some(_)) => act.apply_slice_in_place(out),
                        (None, _) => {}
                    }
                };
                // Pieces of at least MATMUL_ROWS rows and about MATMUL_PIECE outputs, one per
                // task (None: serially inside), where there are enough for every thread; else
                // one product split by the matrix library, then the activation on all cores.
                let rows = (MATMUL_PIECE / n.max(1)).max(MATMUL_ROWS);
                if act.is_some() && m >= 2 * rows * rayon::current_num_threads() {
                    dst.par_chunks_mut(rows * n).enumerate().for_each(|(i, out)| piece(i * rows..i * rows + out.len() / n, out, None));
                } else {
                    piece(0..m, dst, Some(auto_threads(m, k, n)));
                }
            }
            Step::Concat { srcs, chunks, outer, .. } => {
                let row: usize = chunks.iter().sum();
                for i in 0..*outer {
                    let mut at = i * row;
                    for (s, &len) in srcs.iter().zip(chunks) {
                        dst[at..at + len].copy_from_slice(&src(*s)[i * len..(i + 1) * len]);
                        at += len;
                    }
                }
            }
            Step::LayerNorm { eps, weight, bias, src, .. } => {
                stride_kernels::norm::layer_norm_into(buf(*src), dst, *eps, stride_kernels::norm::LayerAffine { weight, bias: bias.as_deref() });
            }
            Step::Channels { srcs, picks, layout, dims: [n, plane], .. } => {
                let srcs: Vec<(&[f32], usize)> = srcs.iter().map(|&(b, c)| (buf(b), c)).collect();
                planned::pick_channels(&srcs, picks, *layout, *n, *plane, dst);
            }
            Step::Fallback { f, srcs, .. } => {
                let inputs = srcs.iter().map(|(s, shape)| Tensor::from_vec(src(*s).to_vec(), shape)).collect::<Result<Vec<_>>>()?;
                let y = f(&inputs)?;
                dst.copy_from_slice(y.data());
            }
        }
        Ok(())
    }
}
