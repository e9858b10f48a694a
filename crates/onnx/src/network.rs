//! An imported graph as a Stride module: existing layers wired by value, plus the few steps
//! between layers that ONNX graphs have (add, multiply, concat, reshape, transpose, split,
//! softmax, a product of two values).

use stride_autograd::{self as ag, Var};
use stride_nn::{call, join, Ctx, Module, Result, Slot};

/// Where a step reads from: 0 is the network's input, i + 1 the output of step i.
pub(crate) type ValueId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
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
    /// ONNX's Reshape: 0 copies the input's dimension, -1 takes what is left.
    Reshape(ValueId, Vec<i64>),
    /// ONNX's Flatten: to [product of axes before `axis`, product of the rest].
    Flatten(ValueId, i64),
    Transpose(ValueId, Vec<usize>),
    /// One piece of a split: `len` entries from `start` along `axis`.
    Narrow {
        input: ValueId,
        axis: i64,
        start: usize,
        len: usize,
    },
    /// (Log-)softmax along `axis`; `coerce` is opset < 13's rule (over all axes from `axis` on).
    Softmax {
        input: ValueId,
        axis: i64,
        log: bool,
        coerce: bool,
    },
    MatMul(ValueId, ValueId),
    /// Constant padding of every axis: (before, after).
    Pad {
        input: ValueId,
        pads: Vec<(usize, usize)>,
        value: f64,
    },
}

/// An imported ONNX graph.
pub struct Network {
    pub(crate) steps: Vec<Step>,
    pub(crate) output: ValueId,
    /// For each value, the last step that reads it (so inference frees values early).
    pub(crate) last_use: Vec<usize>,
    /// Each step's inputs, found once.
    reads: Vec<Vec<ValueId>>,
    /// The input shape the file declares, batch first (None where symbolic).
    pub input_shape: Vec<Option<usize>>,
    /// The output shape the file declares.
    pub output_shape: Vec<Option<usize>>,
}

impl Network {
    pub(crate) fn new(steps: Vec<Step>, output: ValueId, input_shape: Vec<Option<usize>>, output_shape: Vec<Option<usize>>) -> Self {
        let reads: Vec<Vec<ValueId>> = steps.iter().map(inputs).collect();
        let mut last_use = vec![0; steps.len() + 1];
        for (i, r) in reads.iter().enumerate() {
            for &v in r {
                last_use[v] = i;
            }
        }
        last_use[output] = usize::MAX;
        Network { steps, output, last_use, reads, input_shape, output_shape }
    }

    /// How many layers (steps with a Stride layer) the graph became.
    pub fn layers(&self) -> usize {
        self.steps.iter().filter(|s| matches!(s, Step::Layer { .. })).count()
    }
}

fn inputs(s: &Step) -> Vec<ValueId> {
    match s {
        Step::Layer { input, .. }
        | Step::Reshape(input, _)
        | Step::Flatten(input, _)
        | Step::Transpose(input, _)
        | Step::Narrow { input, .. }
        | Step::Softmax { input, .. }
        | Step::Pad { input, .. } => vec![*input],
        Step::Const(_) => vec![],
        Step::Binary(_, a, b) | Step::MatMul(a, b) => vec![*a, *b],
        Step::Concat(v, _) => v.clone(),
    }
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

/// Matrix product with NumPy's rules for 1-d and 2-d operands.
fn matmul(a: &Var, b: &Var) -> ag::Result<Var> {
    let (sa, sb) = (a.shape(), b.shape());
    let a2 = if sa.len() == 1 { a.reshape(&[1, sa[0]])? } else { a.clone() };
    let b2 = if sb.len() == 1 { b.reshape(&[sb[0], 1])? } else { b.clone() };
    if a2.shape().len() != 2 || b2.shape().len() != 2 {
        return Err(ag::Error::shape("MatMul", format!("Stride multiplies 1-d and 2-d values; got {sa:?} and {sb:?}")));
    }
    let y = a2.matmul(&b2)?;
    let mut out: Vec<usize> = Vec::new();
    if sa.len() == 2 {
        out.push(sa[0]);
    }
    if sb.len() == 2 {
        out.push(sb[1]);
    }
    y.reshape(&out)
}

fn run_step(step: &mut Step, vals: &[Option<Var>], ctx: &mut Ctx) -> Result<Var> {
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
        Step::Reshape(input, shape) => {
            let x = v(input);
            x.reshape(&reshape_dims(&x.shape(), shape)?)?
        }
        Step::Flatten(input, ax) => {
            let x = v(input);
            let s = x.shape();
            let a = if *ax == s.len() as i64 { s.len() } else { axis("Flatten", *ax, s.len())? };
            x.reshape(&[s[..a].iter().product(), s[a..].iter().product()])?
        }
        Step::Transpose(input, perm) => v(input).permute(perm)?,
        Step::Narrow { input, axis: ax, start, len } => {
            let x = v(input);
            let a = axis("Split", *ax, x.shape().len())?;
            x.narrow(a, *start, *len)?
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
        Step::Pad { input, pads, value } => {
            let x = v(input);
            if pads.len() != x.shape().len() {
                return Err(ag::Error::shape("Pad", format!("{} pads for a {}-d value", pads.len(), x.shape().len())).into());
            }
            // Var::pad pads the last axes it is given: leading unpadded axes are left out.
            let first = pads.iter().position(|&p| p != (0, 0)).unwrap_or(pads.len());
            if first == pads.len() {
                x
            } else {
                x.pad(&pads[first..], *value)?
            }
        }
    })
}

impl Module for Network {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let mut vals: Vec<Option<Var>> = vec![None; self.steps.len() + 1];
        vals[0] = Some(x.clone());
        for i in 0..self.steps.len() {
            let y = run_step(&mut self.steps[i], &vals, ctx)?;
            vals[i + 1] = Some(y);
            // Inference keeps only what later steps read.
            for &v in &self.reads[i] {
                if self.last_use[v] == i {
                    vals[v] = None;
                }
            }
        }
        Ok(vals[self.output].take().expect("the output is kept"))
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
