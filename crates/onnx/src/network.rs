//! An imported graph as a Stride module: existing layers wired by value, plus the few steps
//! between layers that ONNX graphs have (add, multiply, concat, reshape, transpose, split,
//! slice, softmax, a product of two values, gathering by computed indices).
//!
//! Shapes a graph computes from its values (PyTorch's `x.view(x.size(0), -1)`: Shape, Gather,
//! Unsqueeze, Concat, then Reshape) are kept as expressions over the values' dimensions
//! ([`Piece`], [`Dim`]) and worked out when the network runs, so the batch stays free.

use stride_autograd::{self as ag, Var};
use stride_nn::{call, join, Ctx, Module, Result, Slot};

use crate::cumsum::cumsum;
use crate::indices::{gather, gather_nd, IntTensor};
use crate::matmul::matmul;
use crate::norm::normalize;
use crate::pad::{pad, PadMode};
use crate::resize::{resize, Coord, Sample};
use crate::select::{broadcast, select, widen, within};

/// Where a step reads from: 0 is the network's input, i + 1 the output of step i.
pub(crate) type ValueId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// ONNX's reductions over chosen axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reduce {
    Mean,
    Sum,
    Max,
    Min,
    /// Sum of magnitudes.
    L1,
    /// Square root of the sum of squares.
    L2,
    SumSquare,
}

/// The output size of a Resize: H and W times factors, or sizes worked out as the network runs
/// (all four axes, N and C as they are, or H and W).
#[derive(Clone, Debug)]
pub(crate) enum ResizeTo {
    Scales(f64, f64),
    Sizes(Vec<Piece>),
}

/// Integer arithmetic on dimensions (ONNX's Add, Sub, Mul, Div and Mod of int64 values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntOp {
    Add,
    Sub,
    Mul,
    /// Toward zero, as ONNX Runtime divides integers.
    Div,
    /// ONNX's Mod with fmod 0: the remainder takes the divisor's sign (Python's %, as a
    /// window attention's padding `(w - h % w) % w` is traced).
    Mod,
    /// ONNX's Mod with fmod 1: the remainder takes the dividend's sign (C's fmod).
    Rem,
}

impl IntOp {
    /// ONNX's operator of that name (`fmod` for Mod); None for any other.
    pub(crate) fn of(op: &str, fmod: bool) -> Option<IntOp> {
        Some(match op {
            "Add" => IntOp::Add,
            "Sub" => IntOp::Sub,
            "Mul" => IntOp::Mul,
            "Div" => IntOp::Div,
            "Mod" if fmod => IntOp::Rem,
            "Mod" => IntOp::Mod,
            _ => return None,
        })
    }

    /// `a op b`; None where int64 has no result (overflow, a zero divisor).
    pub(crate) fn apply(self, a: i64, b: i64) -> Option<i64> {
        match self {
            IntOp::Add => a.checked_add(b),
            IntOp::Sub => a.checked_sub(b),
            IntOp::Mul => a.checked_mul(b),
            IntOp::Div => a.checked_div(b),
            IntOp::Rem => a.checked_rem(b),
            IntOp::Mod => a.checked_rem(b).map(|r| if r != 0 && (r < 0) != (b < 0) { r + b } else { r }),
        }
    }
}

/// One integer of a shape computed in the graph.
#[derive(Clone, Debug)]
pub(crate) enum Dim {
    Const(i64),
    /// Dimension `axis` of a value (negative: from the end).
    Of(ValueId, i64),
    Bin(IntOp, Box<Dim>, Box<Dim>),
}

/// Part of an integer list computed in the graph.
#[derive(Clone, Debug)]
pub(crate) enum Piece {
    One(Dim),
    /// Dimensions `start..end` of a value (ONNX's Shape; negative from the end, None to the end).
    Run {
        of: ValueId,
        start: i64,
        end: Option<i64>,
    },
}

/// The dimensions `start..end` of `shape` with ONNX's Shape rule (negative counts from the end,
/// both clamped to the rank).
pub(crate) fn dims_range(rank: usize, start: i64, end: Option<i64>) -> std::ops::Range<usize> {
    let r = rank as i64;
    let clamp = |i: i64| (if i < 0 { i + r } else { i }).clamp(0, r) as usize;
    let (s, e) = (clamp(start), clamp(end.unwrap_or(r)));
    s..e.max(s)
}

impl Dim {
    /// The values whose shapes this integer reads.
    pub(crate) fn refs(&self, out: &mut Vec<ValueId>) {
        match self {
            Dim::Const(_) => {}
            Dim::Of(v, _) => out.push(*v),
            Dim::Bin(_, a, b) => {
                a.refs(out);
                b.refs(out);
            }
        }
    }

    pub(crate) fn eval(&self, shapes: &[Vec<usize>]) -> ag::Result<i64> {
        Ok(match self {
            Dim::Const(c) => *c,
            Dim::Of(v, a) => {
                let s = &shapes[*v];
                let i = axis("Shape", *a, s.len())?;
                s[i] as i64
            }
            Dim::Bin(op, a, b) => {
                let (a, b) = (a.eval(shapes)?, b.eval(shapes)?);
                op.apply(a, b).ok_or_else(|| ag::Error::arg("shape", format!("{a} {op:?} {b} has no int64 result")))?
            }
        })
    }
}

/// The integers `pieces` stand for, given every value's shape so far.
pub(crate) fn eval_ints(pieces: &[Piece], shapes: &[Vec<usize>]) -> ag::Result<Vec<i64>> {
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        match p {
            Piece::One(d) => out.push(d.eval(shapes)?),
            Piece::Run { of, start, end } => {
                let s = &shapes[*of];
                out.extend(s[dims_range(s.len(), *start, *end)].iter().map(|&d| d as i64));
            }
        }
    }
    Ok(out)
}

pub(crate) enum Step {
    /// A Stride layer, its parameters under `name`.
    Layer {
        name: String,
        module: Box<dyn Module>,
        input: ValueId,
    },
    /// A constant (not trained).
    Const(Var),
    Binary(BinOp, ValueId, ValueId),
    Concat(Vec<ValueId>, i64),
    /// ONNX's Reshape: 0 copies the input's dimension, -1 takes what is left. With allowzero (the
    /// bool) a 0 would mean an empty tensor, which Stride does not make.
    Reshape(ValueId, Vec<Piece>, bool),
    /// ONNX's Flatten: to [product of axes before `axis`, product of the rest].
    Flatten(ValueId, i64),
    /// Axes permuted; without a permutation, reversed (ONNX's default).
    Transpose(ValueId, Option<Vec<usize>>),
    /// One piece of a split: `len` entries from `start` along `axis`.
    Narrow {
        input: ValueId,
        axis: i64,
        start: usize,
        len: usize,
    },
    /// Piece `index` of `parts` nearly equal ones along `axis` (ONNX's Split by num_outputs:
    /// each ceil(n / parts) long, the last what is left).
    Chunk {
        input: ValueId,
        axis: i64,
        index: usize,
        parts: usize,
    },
    /// ONNX's Slice forwards: every `steps[i]`-th entry of `starts[i]..ends[i]` along `axes[i]`
    /// (negative from the end, clamped to the dimension).
    Slice {
        input: ValueId,
        axes: Vec<i64>,
        starts: Vec<Dim>,
        ends: Vec<Dim>,
        steps: Vec<usize>,
    },
    /// New axes of length 1 at `axes` of the output (negative: from its end).
    Unsqueeze(ValueId, Vec<i64>),
    /// Axes of length 1 removed: those listed, or all.
    Squeeze(ValueId, Option<Vec<i64>>),
    /// (Log-)softmax along `axis`; `coerce` is opset < 13's rule (over all axes from `axis` on).
    Softmax {
        input: ValueId,
        axis: i64,
        log: bool,
        coerce: bool,
    },
    MatMul(ValueId, ValueId),
    /// A reduction over `axes` (negative from the end; None: all), keeping them as 1s or not.
    Reduce {
        input: ValueId,
        how: Reduce,
        axes: Option<Vec<i64>>,
        keep: bool,
    },
    /// ONNX's Expand: broadcast to a shape computed as the network runs (NumPy's rule).
    Expand(ValueId, Vec<Piece>),
    /// ONNX's Resize of [N, C, H, W] (H and W only), to scaled or given sizes.
    Resize {
        input: ValueId,
        to: ResizeTo,
        coord: Coord,
        sample: Sample,
    },
    /// ONNX's GatherND (batch_dims 0) by integers worked out as it runs.
    GatherNd {
        input: ValueId,
        indices: IntTensor,
    },
    /// ONNX's Gather along `axis` (negative from the end) by integers worked out as it runs.
    Gather {
        input: ValueId,
        axis: i64,
        indices: IntTensor,
    },
    /// ONNX's Where with a constant condition (of dimensions `dims`): `x` where it holds, `y`
    /// elsewhere, the three broadcast together.
    Where {
        cond: Vec<bool>,
        dims: Vec<usize>,
        x: ValueId,
        y: ValueId,
    },
    /// ONNX's InstanceNormalization (GroupNorm as PyTorch exports it), or with `over_batch`
    /// BatchNormalization in training mode (the statistics of the values at hand).
    Normalize {
        input: ValueId,
        over_batch: bool,
        scale: Var,
        bias: Var,
        eps: f64,
    },
    /// Integers computed from shapes as float data ([len]): ONNX's Cast of them to float.
    Floats(Vec<Piece>),
    /// ONNX's CumSum: running sums along `axis` (negative from the end).
    CumSum {
        input: ValueId,
        axis: i64,
        exclusive: bool,
        reverse: bool,
    },
    /// Padding of every axis, (before, after), by a constant or the value's own entries.
    Pad {
        input: ValueId,
        pads: Vec<(usize, usize)>,
        mode: PadMode,
    },
}

/// An imported ONNX graph.
pub struct Network {
    pub(crate) steps: Vec<Step>,
    /// The graph's outputs, in its order (a value may be given twice).
    pub(crate) outputs: Vec<ValueId>,
    /// Their names in the file.
    pub output_names: Vec<String>,
    /// For each value, the last step that reads it (so inference frees values early).
    pub(crate) last_use: Vec<usize>,
    /// Each step's inputs, found once.
    reads: Vec<Vec<ValueId>>,
    /// Whether each value leads to the output: steps whose value nothing reads (what a fused
    /// pattern left behind) are skipped.
    live: Vec<bool>,
    /// The input shape the file declares, batch first (None where symbolic).
    pub input_shape: Vec<Option<usize>>,
    /// The first output's shape as the file declares it.
    pub output_shape: Vec<Option<usize>>,
}

impl Network {
    pub(crate) fn new(steps: Vec<Step>, outputs: Vec<(String, ValueId)>, input_shape: Vec<Option<usize>>, output_shape: Vec<Option<usize>>) -> Self {
        let (output_names, outputs): (Vec<String>, Vec<ValueId>) = outputs.into_iter().unzip();
        let reads: Vec<Vec<ValueId>> = steps.iter().map(inputs).collect();
        let mut live = vec![false; steps.len() + 1];
        live[0] = true;
        for &o in &outputs {
            live[o] = true;
        }
        for i in (0..steps.len()).rev() {
            if live[i + 1] {
                for v in reads[i].iter().copied().chain(shape_refs(&steps[i])) {
                    live[v] = true;
                }
            }
        }
        let mut last_use = vec![0; steps.len() + 1];
        for (i, r) in reads.iter().enumerate().filter(|(i, _)| live[i + 1]) {
            for &v in r {
                last_use[v] = i;
            }
        }
        for &o in &outputs {
            last_use[o] = usize::MAX;
        }
        Network { steps, outputs, output_names, last_use, reads, live, input_shape, output_shape }
    }

    /// Every output of the graph with its name, in the file's order. A network with several
    /// outputs (a detector's boxes and masks) gives the first as a [`Module`]: commands that
    /// read one output (eval, predict, train) take that one.
    pub fn forward_all(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Vec<(String, Var)>> {
        let values = self.run(x, ctx)?;
        Ok(self.output_names.iter().cloned().zip(values).collect())
    }

    fn run(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Vec<Var>> {
        let mut vals: Vec<Option<Var>> = vec![None; self.steps.len() + 1];
        // Every value's shape, kept after its data is freed: computed shapes read them.
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(self.steps.len() + 1);
        shapes.push(x.shape());
        vals[0] = Some(x.clone());
        for i in 0..self.steps.len() {
            if !self.live[i + 1] {
                shapes.push(Vec::new());
                continue;
            }
            let y = run_step(&mut self.steps[i], &vals, &shapes, ctx)?;
            shapes.push(y.shape());
            vals[i + 1] = Some(y);
            // Inference keeps only what later steps read.
            for &v in &self.reads[i] {
                if self.last_use[v] == i {
                    vals[v] = None;
                }
            }
        }
        Ok(self.outputs.iter().map(|&o| vals[o].clone().expect("the outputs are kept")).collect())
    }

    /// A declared shape as text: `Nx3x224x224`, N where the file leaves a dimension free.
    pub fn dims_text(dims: &[Option<usize>]) -> String {
        dims.iter().map(|v| v.map_or("N".to_string(), |v| v.to_string())).collect::<Vec<_>>().join("x")
    }

    /// How many layers (steps with a Stride layer) the graph became.
    pub fn layers(&self) -> usize {
        self.steps.iter().zip(&self.live[1..]).filter(|(s, &live)| live && matches!(s, Step::Layer { .. })).count()
    }

    /// The layers the network runs, in order: name and kind (`Conv2d(3, 64, k7x7, ...)`,
    /// `gelu`). Steps a fused pattern left unread are not among them.
    pub fn layer_kinds(&self) -> Vec<(String, String)> {
        self.steps
            .iter()
            .zip(&self.live[1..])
            .filter_map(|(s, &live)| match s {
                Step::Layer { name, module, .. } if live => Some((name.clone(), module.describe())),
                _ => None,
            })
            .collect()
    }
}

/// The values whose shapes a step's computed shape reads.
pub(crate) fn shape_refs(s: &Step) -> Vec<ValueId> {
    let mut out = Vec::new();
    match s {
        Step::Reshape(_, pieces, _) | Step::Expand(_, pieces) | Step::Floats(pieces) | Step::Resize { to: ResizeTo::Sizes(pieces), .. } => {
            for p in pieces {
                match p {
                    Piece::One(d) => d.refs(&mut out),
                    Piece::Run { of, .. } => out.push(*of),
                }
            }
        }
        Step::Slice { starts, ends, .. } => starts.iter().chain(ends).for_each(|d| d.refs(&mut out)),
        Step::Gather { indices, .. } | Step::GatherNd { indices, .. } => indices.refs(&mut out),
        _ => {}
    }
    out
}

pub(crate) fn inputs(s: &Step) -> Vec<ValueId> {
    match s {
        Step::Layer { input, .. }
        | Step::Reshape(input, ..)
        | Step::Flatten(input, _)
        | Step::Transpose(input, _)
        | Step::Narrow { input, .. }
        | Step::Chunk { input, .. }
        | Step::Unsqueeze(input, _)
        | Step::Squeeze(input, _)
        | Step::Slice { input, .. }
        | Step::Softmax { input, .. }
        | Step::Gather { input, .. }
        | Step::GatherNd { input, .. }
        | Step::Resize { input, .. }
        | Step::Reduce { input, .. }
        | Step::Expand(input, _)
        | Step::Normalize { input, .. }
        | Step::CumSum { input, .. }
        | Step::Pad { input, .. } => vec![*input],
        Step::Const(_) | Step::Floats(_) => vec![],
        Step::Binary(_, a, b) | Step::MatMul(a, b) | Step::Where { x: a, y: b, .. } => vec![*a, *b],
        Step::Concat(v, _) => v.clone(),
    }
}

/// Every `step`-th entry of `x` along `axis`, from the first: a view of the axis as [len / step,
/// step] where the step divides it, else the entries gathered.
fn every(x: &Var, axis: usize, step: usize) -> ag::Result<Var> {
    let s = x.shape();
    let (len, kept) = (s[axis], s[axis].div_ceil(step));
    if len % step == 0 {
        let split: Vec<usize> = s[..axis].iter().chain(&[kept, step]).chain(&s[axis + 1..]).copied().collect();
        let mut out = s.clone();
        out[axis] = kept;
        return x.reshape(&split)?.narrow(axis + 1, 0, 1)?.reshape(&out);
    }
    let at: Vec<i64> = (0..kept).map(|k| (k * step) as i64).collect();
    gather(x, axis, &at, &[kept])
}

/// A possibly negative axis of a rank-`rank` value.
fn axis(op: &'static str, a: i64, rank: usize) -> ag::Result<usize> {
    let r = rank as i64;
    if a < -r || a >= r.max(1) {
        return Err(ag::Error::arg(op, format!("axis {a} is out of range for a {rank}-d value")));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

/// ONNX's Reshape rule for `shape` applied to a value of `dims`.
pub(crate) fn reshape_dims(dims: &[usize], shape: &[i64]) -> ag::Result<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            0 => out
                .push(*dims.get(i).ok_or_else(|| ag::Error::shape("Reshape", format!("0 at position {i} copies a dimension that {dims:?} lacks")))?),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            _ => return Err(ag::Error::shape("Reshape", format!("shape {shape:?} has {s} at position {i}"))),
        }
    }
    let known =
        out.iter().try_fold(1usize, |p, &d| p.checked_mul(d)).ok_or_else(|| ag::Error::shape("Reshape", format!("shape {shape:?} is too large")))?;
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(ag::Error::shape("Reshape", format!("cannot reshape {dims:?} ({total} values) to {shape:?}")));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(ag::Error::shape("Reshape", format!("cannot reshape {dims:?} ({total} values) to {shape:?} ({known} values)")));
    }
    Ok(out)
}

/// `how` over `axes` (sorted, distinct) of `x`. Max and Min take one axis at a time (the
/// gradient goes to the first extreme element of each).
fn reduce<T: ag::Elem>(x: &Var<T>, how: Reduce, axes: &[usize], keep: bool) -> ag::Result<Var<T>> {
    match how {
        Reduce::Mean => return x.mean(axes, keep),
        Reduce::Sum => return x.sum(axes, keep),
        Reduce::SumSquare => return x.mul(x)?.sum(axes, keep),
        Reduce::L1 => return x.abs()?.sum(axes, keep),
        Reduce::L2 => {
            // sqrt(s) spelt s / sqrt(max(s, tiny)): the same value (0 at 0), and at an all-zero
            // vector a gradient of 0 (as PyTorch's norm) where sqrt's own is 0 * inf = NaN.
            let s = x.mul(x)?.sum(axes, keep)?;
            return s.div(&s.clamp(f64::from(f32::MIN_POSITIVE), f64::INFINITY)?.sqrt()?);
        }
        Reduce::Max | Reduce::Min => {}
    }
    let mut y = if how == Reduce::Min { x.neg()? } else { x.clone() };
    for &a in axes {
        y = y.max(a, true)?;
    }
    if how == Reduce::Min {
        y = y.neg()?;
    }
    if keep {
        return Ok(y);
    }
    let s = y.shape();
    y.reshape(&(0..s.len()).filter(|i| !axes.contains(i)).map(|i| s[i]).collect::<Vec<_>>())
}

/// The shape `dims` broadcast to `target` by NumPy's rule (ONNX's Expand: either may be longer,
/// a 1 on either side takes the other's size).
fn expanded(dims: &[usize], target: &[i64]) -> ag::Result<Vec<usize>> {
    if let Some(&t) = target.iter().find(|&&t| t < 0) {
        return Err(ag::Error::shape("Expand", format!("shape {target:?} has {t}")));
    }
    broadcast("Expand", dims, &target.iter().map(|&t| t as usize).collect::<Vec<_>>())
}

pub(crate) fn run_step(step: &mut Step, vals: &[Option<Var>], shapes: &[Vec<usize>], ctx: &mut Ctx) -> Result<Var> {
    let v = |i: &ValueId| vals[*i].clone().expect("a value is read before its last use");
    Ok(match step {
        Step::Layer { name, module, input } => return call(module.as_mut(), name, &v(input), ctx),
        Step::Const(c) => c.clone(),
        Step::Binary(op, a, b) => {
            let (a, b) = (v(a), v(b));
            match op {
                BinOp::Add => a.add(&b)?,
                BinOp::Sub => a.sub(&b)?,
                BinOp::Mul => a.mul(&b)?,
                BinOp::Div => a.div(&b)?,
            }
        }
        Step::Concat(ids, ax) => {
            let parts: Vec<Var> = ids.iter().map(v).collect();
            let refs: Vec<&Var> = parts.iter().collect();
            let ax = axis("Concat", *ax, parts[0].shape().len())?;
            ag::concat(&refs, ax)?
        }
        Step::Reshape(input, shape, allowzero) => {
            let x = v(input);
            let shape = eval_ints(shape, shapes)?;
            if *allowzero && shape.contains(&0) {
                return Err(
                    ag::Error::shape("Reshape", format!("shape {shape:?} with allowzero 1 makes an empty tensor, which Stride does not")).into()
                );
            }
            x.reshape(&reshape_dims(&x.shape(), &shape)?)?
        }
        Step::Flatten(input, ax) => {
            let x = v(input);
            let s = x.shape();
            let a = if *ax == s.len() as i64 { s.len() } else { axis("Flatten", *ax, s.len())? };
            x.reshape(&[s[..a].iter().product(), s[a..].iter().product()])?
        }
        Step::Transpose(input, perm) => {
            let x = v(input);
            match perm {
                Some(p) => x.permute(p)?,
                None => x.permute(&(0..x.shape().len()).rev().collect::<Vec<_>>())?,
            }
        }
        Step::Narrow { input, axis: ax, start, len } => {
            let x = v(input);
            let a = axis("Split", *ax, x.shape().len())?;
            x.narrow(a, *start, *len)?
        }
        Step::Chunk { input, axis: ax, index, parts } => {
            let x = v(input);
            let a = axis("Split", *ax, x.shape().len())?;
            let n = x.shape()[a];
            let each = n.div_ceil(*parts);
            let start = (each * *index).min(n);
            x.narrow(a, start, each.min(n - start))?
        }
        Step::Slice { input, axes, starts, ends, steps } => {
            let mut x = v(input);
            for (i, ax) in axes.iter().enumerate() {
                let a = axis("Slice", *ax, x.shape().len())?;
                let n = x.shape()[a] as i64;
                let clamp = |i: i64| (if i < 0 { i.saturating_add(n) } else { i }).clamp(0, n) as usize;
                let (s, e) = (clamp(starts[i].eval(shapes)?), clamp(ends[i].eval(shapes)?));
                x = x.narrow(a, s, e.max(s) - s)?;
                if steps[i] > 1 && e > s + 1 {
                    x = every(&x, a, steps[i])?;
                }
            }
            x
        }
        Step::Unsqueeze(input, axes) => {
            let x = v(input);
            let rank = x.shape().len() + axes.len();
            let mut new = axes.iter().map(|&a| axis("Unsqueeze", a, rank)).collect::<ag::Result<Vec<_>>>()?;
            new.sort_unstable();
            if new.windows(2).any(|w| w[0] == w[1]) {
                return Err(ag::Error::arg("Unsqueeze", format!("axes {axes:?} repeat an axis")).into());
            }
            let mut dims = x.shape().into_iter();
            let shape: Vec<usize> = (0..rank).map(|i| if new.contains(&i) { 1 } else { dims.next().unwrap_or(1) }).collect();
            x.reshape(&shape)?
        }
        Step::Squeeze(input, axes) => {
            let x = v(input);
            let s = x.shape();
            let gone = match axes {
                Some(axes) => axes.iter().map(|&a| axis("Squeeze", a, s.len())).collect::<ag::Result<Vec<_>>>()?,
                None => (0..s.len()).filter(|&i| s[i] == 1).collect(),
            };
            if let Some(&i) = gone.iter().find(|&&i| s[i] != 1) {
                return Err(ag::Error::shape("Squeeze", format!("axis {i} of {s:?} is not 1 long")).into());
            }
            let shape: Vec<usize> = (0..s.len()).filter(|i| !gone.contains(i)).map(|i| s[i]).collect();
            x.reshape(&shape)?
        }
        Step::Softmax { input, axis: ax, log, coerce } => {
            let x = v(input);
            let s = x.shape();
            let a = axis("Softmax", *ax, s.len())?;
            let f = |x: &Var, a: usize| if *log { ag::log_softmax(x, a) } else { ag::softmax(x, a) };
            if *coerce && a + 1 < s.len() {
                let flat = x.reshape(&[s[..a].iter().product(), s[a..].iter().product()])?;
                f(&flat, 1)?.reshape(&s)?
            } else {
                f(&x, a)?
            }
        }
        Step::MatMul(a, b) => matmul(&v(a), &v(b))?,
        Step::Reduce { input, how, axes, keep } => {
            let x = v(input);
            let rank = x.shape().len();
            let mut ax = match axes {
                Some(list) => list.iter().map(|&a| axis("Reduce", a, rank)).collect::<ag::Result<Vec<_>>>()?,
                None => (0..rank).collect(),
            };
            ax.sort_unstable();
            if ax.windows(2).any(|w| w[0] == w[1]) {
                return Err(ag::Error::arg("Reduce", format!("axes {axes:?} repeat an axis")).into());
            }
            reduce(&x, *how, &ax, *keep)?
        }
        Step::Expand(input, shape) => {
            let x = v(input);
            let target = eval_ints(shape, shapes)?;
            let dims = expanded(&x.shape(), &target)?;
            let most = shapes.iter().map(|s| s.iter().product::<usize>()).max().unwrap_or(0);
            within("Expand", "to", &dims, most)?;
            widen(&x, &dims)?
        }
        Step::Normalize { input, over_batch, scale, bias, eps } => normalize(&v(input), *over_batch, scale, bias, *eps)?,
        Step::Floats(pieces) => {
            let v: Vec<f32> = eval_ints(pieces, shapes)?.into_iter().map(|d| d as f32).collect();
            let n = v.len();
            Var::constant(ag::Tensor::from_vec(v, &[n])?)
        }
        Step::CumSum { input, axis: ax, exclusive, reverse } => {
            let x = v(input);
            let a = axis("CumSum", *ax, x.shape().len())?;
            cumsum(&x, a, *exclusive, *reverse)?
        }
        Step::Where { cond, dims, x, y } => {
            let most = shapes.iter().map(|s| s.iter().product::<usize>()).max().unwrap_or(0);
            select(cond, dims, &v(x), &v(y), most)?
        }
        Step::Resize { input, to, coord, sample } => {
            let x = v(input);
            let s = x.shape();
            if s.len() != 4 {
                return Err(ag::Error::shape("Resize", format!("Stride resizes [N, C, H, W] values; got {s:?}")).into());
            }
            let (size, scales) = match to {
                ResizeTo::Scales(sh, sw) => (((s[2] as f64 * *sh).floor() as usize, (s[3] as f64 * *sw).floor() as usize), Some((*sh, *sw))),
                ResizeTo::Sizes(pieces) => {
                    let sizes = eval_ints(pieces, shapes)?;
                    let dim = |v: i64| usize::try_from(v).ok();
                    match sizes[..] {
                        [n, c, h, w] if dim(n) == Some(s[0]) && dim(c) == Some(s[1]) => ((dim(h).unwrap_or(0), dim(w).unwrap_or(0)), None),
                        [h, w] => ((dim(h).unwrap_or(0), dim(w).unwrap_or(0)), None),
                        _ => {
                            let why = format!("sizes {sizes:?} for a value of shape {s:?}: Stride resizes H and W (N and C as they are)");
                            return Err(ag::Error::shape("Resize", why).into());
                        }
                    }
                }
            };
            let most = shapes.iter().map(|s| s.iter().product::<usize>()).max().unwrap_or(0);
            resize(&x, size, scales, *coord, *sample, most)?
        }
        Step::GatherNd { input, indices } => {
            let (idx, dims) = indices.eval(shapes)?;
            gather_nd(&v(input), &idx, &dims)?
        }
        Step::Gather { input, axis: ax, indices } => {
            let x = v(input);
            let a = axis("Gather", *ax, x.shape().len())?;
            let (idx, dims) = indices.eval(shapes)?;
            gather(&x, a, &idx, &dims)?
        }
        Step::Pad { input, pads, mode } => pad(&v(input), pads, *mode)?,
    })
}

impl Module for Network {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        Ok(self.run(x, ctx)?.swap_remove(0))
    }
    fn is_container(&self) -> bool {
        true
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        for s in &mut self.steps {
            if let Step::Layer { name, module, .. } = s {
                module.visit(&join(prefix, name), f);
            }
        }
    }
    fn describe(&self) -> String {
        format!("OnnxGraph({} steps, {} layers)", self.steps.len(), self.layers())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_autograd::{gradcheck, Rng, Tensor};

    /// `how` over `axes` of a [3, 4, 5] tensor by loops, for comparison.
    fn naive(x: &Tensor<f64>, how: Reduce, axes: &[usize]) -> Vec<f64> {
        let s = x.shape();
        let mut out = std::collections::BTreeMap::<Vec<usize>, Vec<f64>>::new();
        for i in 0..s[0] {
            for j in 0..s[1] {
                for k in 0..s[2] {
                    let key: Vec<usize> = [i, j, k].iter().enumerate().filter(|(a, _)| !axes.contains(a)).map(|(_, &v)| v).collect();
                    out.entry(key).or_default().push(x.data()[(i * s[1] + j) * s[2] + k]);
                }
            }
        }
        out.values()
            .map(|v| match how {
                Reduce::Mean => v.iter().sum::<f64>() / v.len() as f64,
                Reduce::Sum => v.iter().sum(),
                Reduce::Max => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                Reduce::Min => v.iter().copied().fold(f64::INFINITY, f64::min),
                Reduce::L1 => v.iter().map(|a| a.abs()).sum(),
                Reduce::L2 => v.iter().map(|a| a * a).sum::<f64>().sqrt(),
                Reduce::SumSquare => v.iter().map(|a| a * a).sum(),
            })
            .collect()
    }

    #[test]
    fn reductions_agree_with_loops_and_their_gradients_with_finite_differences() {
        let x = Rng::seed(8).normal::<f64>(&[3, 4, 5], 0.0, 1.0).unwrap();
        let all = [Reduce::Mean, Reduce::Sum, Reduce::Max, Reduce::Min, Reduce::L1, Reduce::L2, Reduce::SumSquare];
        for how in all {
            for axes in [&[1][..], &[0, 2], &[0, 1, 2]] {
                for keep in [true, false] {
                    let y = reduce(&Var::constant(x.clone()), how, axes, keep).unwrap();
                    let want: Vec<usize> =
                        (0..3).filter(|a| !axes.contains(a) || keep).map(|a| if axes.contains(&a) { 1 } else { x.shape()[a] }).collect();
                    assert_eq!(y.shape(), want, "{how:?} over {axes:?}");
                    let want = naive(&x, how, axes);
                    assert!(y.value().data().iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-12 * (1.0 + b.abs())), "{how:?} over {axes:?}");
                    gradcheck(std::slice::from_ref(&x), 1e-6, |v| reduce(&v[0], how, axes, keep))
                        .unwrap_or_else(|e| panic!("{how:?} over {axes:?}: {e}"));
                }
            }
        }
    }

    #[test]
    fn the_l2_norm_of_a_zero_vector_is_zero_with_a_zero_gradient() {
        let x = Tensor::from_vec(vec![0.0f32, 0.0, 0.0, 3.0, 4.0, 0.0], &[2, 3]).unwrap();
        let v = Var::parameter(x);
        let y = reduce(&v, Reduce::L2, &[1], false).unwrap();
        assert_eq!(y.value().data(), [0.0, 5.0]);
        let g = y.sum(&[0], false).unwrap().gradients(&[&v]).unwrap().remove(0).unwrap();
        assert_eq!(g.data(), [0.0, 0.0, 0.0, 0.6, 0.8, 0.0]);
    }

    #[test]
    fn expand_broadcasts_as_numpy_either_way_round() {
        assert_eq!(expanded(&[3, 1], &[2, 1, 6]).unwrap(), [2, 3, 6]);
        assert_eq!(expanded(&[2, 3, 6], &[3, 1]).unwrap(), [2, 3, 6]);
        assert_eq!(expanded(&[1, 4], &[]).unwrap(), [1, 4]);
        let e = expanded(&[3, 2], &[3, 4]).unwrap_err().to_string();
        assert!(e.contains("axis 1: 2 against 4"), "{e}");
        assert!(expanded(&[3], &[-1]).unwrap_err().to_string().contains("-1"));
    }
}
