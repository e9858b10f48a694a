//! Integer tensors computed from constants alone, worked out when the file is read: the
//! TorchScript exporter writes `F.pad`'s pads as ConstantOfShape, Concat, Reshape to pairs, a
//! Slice that reverses them, Transpose, Reshape and Cast (timm's HGNetV2 stem, EfficientViT).
//! Any number of axes; at most 2^24 values.

use super::{err, Attrs, Builder, Const, NodeProto, Result, Step, Val, ValueId, Var};
use crate::indices::MAX_INDICES;
use crate::network::{inputs, run_step, shape_refs};
use crate::proto::tensor_proto::DataType;
use crate::tensor::read_const;
use stride_autograd::{no_grad, Tensor};

/// Integers and their dimensions.
type Ints = (Vec<i64>, Vec<usize>);

fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Whether every partial product of `dims` fits, zeros taken as ones (a file may give
/// [0, 2^40, 2^40]: no values, but strides past 2^64).
fn fits(dims: &[usize]) -> bool {
    dims.iter().try_fold(1usize, |p, &v| p.checked_mul(v.max(1))).is_some()
}

fn count(dims: &[usize]) -> Result<usize> {
    match dims.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) {
        Some(n) if n <= MAX_INDICES => Ok(n),
        _ => Err(err(format!("integers of dimensions {dims:?} are more than {MAX_INDICES}"))),
    }
}

/// A possibly negative axis of a rank-`rank` tensor.
fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if a < -r || a >= r {
        return Err(err(format!("axis {a} is out of range for {rank}-d integers")));
    }
    Ok(if a < 0 { a + r } else { a } as usize)
}

/// The element of `out` index `idx` (over `dims`) reads, by `at`.
fn gather_by(dims: &[usize], mut at: impl FnMut(&[usize]) -> i64) -> Result<Vec<i64>> {
    let n = count(dims)?;
    let mut idx = vec![0usize; dims.len()];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(at(&idx));
        for j in (0..idx.len()).rev() {
            idx[j] += 1;
            if idx[j] < dims[j] {
                break;
            }
            idx[j] = 0;
        }
    }
    Ok(out)
}

fn reshape((data, dims): &Ints, shape: &[i64], allowzero: bool) -> Result<Ints> {
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => out.push(*dims.get(i).ok_or_else(|| err(format!("shape {shape:?}: 0 at axis {i} of {dims:?}")))?),
            s if s >= 0 => out.push(s as usize),
            _ => return Err(err(format!("cannot reshape integers to {shape:?}"))),
        }
    }
    let known = out.iter().try_fold(1usize, |p, &d| p.checked_mul(d)).ok_or_else(|| err(format!("cannot reshape integers to {shape:?}")))?;
    if let Some(i) = infer {
        if known == 0 || data.len() % known != 0 {
            return Err(err(format!("cannot reshape {} integers to {shape:?}", data.len())));
        }
        out[i] = data.len() / known;
    }
    if out.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) != Some(data.len()) {
        return Err(err(format!("cannot reshape {} integers of {dims:?} to {shape:?}", data.len())));
    }
    Ok((data.clone(), out))
}

/// ONNX's Slice with any steps (negative ones walk back), bounds clamped as ONNX says.
fn slice((data, dims): &Ints, starts: &[i64], ends: &[i64], axes: Option<&[i64]>, steps: Option<&[i64]>) -> Result<Ints> {
    let rank = dims.len();
    let axes: Vec<i64> = axes.map_or_else(|| (0..starts.len() as i64).collect(), <[i64]>::to_vec);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.is_some_and(|s| s.len() != starts.len()) {
        return Err(err("Slice's starts, ends, axes and steps differ in length"));
    }
    // Per axis: first index and step, and the count taken.
    let mut from: Vec<(i64, i64)> = (0..rank).map(|_| (0, 1)).collect();
    let mut out = dims.clone();
    for (i, &a) in axes.iter().enumerate() {
        let ax = axis(a, rank)?;
        let (d, step) = (dims[ax] as i64, steps.map_or(1, |s| s[i]));
        if step == 0 {
            return Err(err("Slice with a step of 0"));
        }
        let norm = |v: i64| if v < 0 { v + d } else { v };
        let (s, e) = if step > 0 {
            (norm(starts[i]).clamp(0, d), norm(ends[i]).clamp(0, d))
        } else {
            (norm(starts[i]).clamp(-1, d - 1), norm(ends[i]).clamp(-1, d - 1))
        };
        let (span, by) = (if step > 0 { e - s } else { s - e }.max(0) as u64, step.unsigned_abs());
        let n = if span == 0 { 0 } else { (span - 1) / by + 1 };
        from[ax] = (s, step);
        out[ax] = n as usize;
    }
    let st = strides(dims);
    let data = gather_by(&out, |idx| {
        let flat: i64 = idx.iter().enumerate().map(|(j, &i)| (from[j].0 + i as i64 * from[j].1) * st[j] as i64).sum();
        data[flat as usize]
    })?;
    Ok((data, out))
}

fn transpose((data, dims): &Ints, perm: Option<Vec<i64>>) -> Result<Ints> {
    let rank = dims.len();
    let perm: Vec<usize> = match perm {
        Some(p) => p.iter().map(|&a| axis(a, rank)).collect::<Result<_>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
        return Err(err(format!("perm {perm:?} is not a permutation of {rank} axes")));
    }
    let out: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let st = strides(dims);
    let data = gather_by(&out, |idx| data[idx.iter().zip(&perm).map(|(&i, &p)| i * st[p]).sum::<usize>()])?;
    Ok((data, out))
}

fn concat(parts: &[Ints], a: i64) -> Result<Ints> {
    let first = &parts[0].1;
    let ax = axis(a, first.len())?;
    if parts.iter().any(|(_, d)| d.len() != first.len() || d.iter().enumerate().any(|(i, &v)| i != ax && v != first[i])) {
        return Err(err(format!("Concat of integers of dimensions {:?} along axis {a}", parts.iter().map(|p| &p.1).collect::<Vec<_>>())));
    }
    let mut out = first.clone();
    out[ax] = parts.iter().map(|(_, d)| d[ax]).sum();
    let (outer, inner): (usize, usize) = (first[..ax].iter().product(), first[ax + 1..].iter().product());
    count(&out)?;
    let mut data = Vec::new();
    for o in 0..outer {
        for (p, d) in parts {
            let run = d[ax] * inner;
            data.extend_from_slice(&p[o * run..(o + 1) * run]);
        }
    }
    Ok((data, out))
}

impl Builder {
    /// An integer constant whose every partial product of dimensions [`fits`].
    fn const_int_tensor(&self, name: &str) -> Option<Ints> {
        match self.vals.get(name)? {
            Val::Const(Const::I64(d, dims)) if fits(dims) => Some((d.clone(), dims.clone())),
            _ => None,
        }
    }

    /// ConstantOfShape, and Concat, Reshape, Slice, Transpose, Cast, Unsqueeze and Squeeze of
    /// integer constants, worked out now. Returns false for any other node (or inputs that are
    /// not all constants).
    pub(super) fn fold_node(&mut self, node: &NodeProto, ins: &[&str], a: &mut Attrs) -> Result<bool> {
        let op = node.op_type.as_deref().unwrap_or("");
        let given: Vec<&str> = ins.iter().copied().filter(|s| !s.is_empty()).collect();
        let all_ints = !given.is_empty() && given.iter().all(|n| self.const_int_tensor(n).is_some());
        let ints = |i: usize| -> Option<Ints> { ins.get(i).filter(|s| !s.is_empty()).and_then(|n| self.const_int_tensor(n)) };
        let list = |i: usize| ints(i).map(|(d, _)| d);
        let folded = match op {
            "ConstantOfShape" if all_ints => {
                let (shape, _) = ints(0).ok_or_else(|| err("ConstantOfShape needs its shape"))?;
                let dims = shape
                    .iter()
                    .map(|&d| usize::try_from(d).map_err(|_| err(format!("ConstantOfShape of {shape:?}"))))
                    .collect::<Result<Vec<_>>>()?;
                let n = count(&dims)?;
                let value = match a.take("value").and_then(|v| v.t.as_ref()) {
                    Some(t) => read_const(t)?,
                    None => Const::F32(Tensor::scalar(0.0)),
                };
                match value {
                    Const::I64(v, _) if v.len() == 1 => Const::I64(vec![v[0]; n], dims),
                    Const::F32(t) if t.numel() == 1 => Const::F32(Tensor::from_vec(vec![t.data()[0]; n], &dims)?),
                    _ => return Err(err("ConstantOfShape's value must be one integer or float")),
                }
            }
            "Concat" if all_ints => {
                let parts: Vec<Ints> = given.iter().filter_map(|n| self.const_int_tensor(n)).collect();
                let (d, dims) = concat(&parts, a.int("axis", 0)?)?;
                Const::I64(d, dims)
            }
            "Reshape" if all_ints => {
                let (d, dims) = reshape(&ints(0).unwrap_or_default(), &list(1).unwrap_or_default(), a.int("allowzero", 0)? != 0)?;
                Const::I64(d, dims)
            }
            "Slice" if all_ints && self.opset >= 10 => {
                let (starts, ends) = (list(1).ok_or_else(|| err("Slice needs starts"))?, list(2).ok_or_else(|| err("Slice needs ends"))?);
                let (d, dims) = slice(&ints(0).unwrap_or_default(), &starts, &ends, list(3).as_deref(), list(4).as_deref())?;
                Const::I64(d, dims)
            }
            "Transpose" if all_ints => {
                let (d, dims) = transpose(&ints(0).unwrap_or_default(), a.ints("perm"))?;
                Const::I64(d, dims)
            }
            "Cast" if all_ints => {
                let to = a.int("to", 0)?;
                a.take("saturate");
                let (d, dims) = ints(0).unwrap_or_default();
                match to {
                    t if t == DataType::Int64 as i64 || t == DataType::Int32 as i64 => Const::I64(d, dims),
                    t if t == DataType::Float as i64 => Const::F32(Tensor::from_vec(d.iter().map(|&v| v as f32).collect(), &dims)?),
                    _ => return Ok(false),
                }
            }
            "Unsqueeze" | "Squeeze" if all_ints && (self.opset >= 13 || given.len() == 1) => {
                let (d, dims) = ints(0).unwrap_or_default();
                let axes = list(1).or_else(|| a.ints("axes"));
                let out = if op == "Unsqueeze" {
                    let axes = axes.ok_or_else(|| err("Unsqueeze needs axes"))?;
                    let rank = dims.len() + axes.len();
                    let mut at = axes.iter().map(|&x| axis(x, rank)).collect::<Result<Vec<_>>>()?;
                    at.sort_unstable();
                    let mut out = dims.clone();
                    for p in at {
                        out.insert(p, 1);
                    }
                    out
                } else {
                    let drop = match axes {
                        Some(ax) => ax.iter().map(|&x| axis(x, dims.len())).collect::<Result<Vec<_>>>()?,
                        None => (0..dims.len()).filter(|&i| dims[i] == 1).collect(),
                    };
                    if drop.iter().any(|&i| dims[i] != 1) {
                        return Err(err(format!("Squeeze of axes {drop:?} of integers {dims:?}")));
                    }
                    dims.iter().enumerate().filter(|(i, _)| !drop.contains(i)).map(|(_, &v)| v).collect()
                };
                Const::I64(d, out)
            }
            _ => return Ok(false),
        };
        let dims = match &folded {
            Const::I64(_, d) | Const::Bool(_, d) => d.clone(),
            Const::F32(t) => t.shape().to_vec(),
        };
        if !fits(&dims) {
            return Err(err(format!("{op} makes a tensor of dimensions {dims:?}, too large to index")));
        }
        let out = node.output.first().ok_or_else(|| err(format!("{op} has no output")))?;
        self.vals.insert(out.clone(), Val::Const(folded));
        Ok(true)
    }
}

/// Float operations a graph may apply to constants alone (NFNet's weight standardisation: each
/// convolution's weight centred and scaled in the graph), worked out when the file is read.
const FLOAT_FOLDS: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Sqrt",
    "Neg",
    "Abs",
    "Exp",
    "Log",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Sin",
    "Cos",
    "Clip",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Concat",
    "Slice",
    "Expand",
    "Where",
    "Cast",
    "Identity",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Softmax",
    "CumSum",
    "Gather",
];

impl Builder {
    /// A node: when every input is a constant, one of them float, and the operation is one of
    /// [`FLOAT_FOLDS`], its output is worked out now and kept as a constant (so a convolution
    /// whose weight the graph computes from constants still has a constant weight).
    pub(super) fn node_or_fold(&mut self, node: &NodeProto) -> Result<()> {
        let op = node.op_type.as_deref().unwrap_or("");
        let given: Vec<&String> = node.input.iter().filter(|s| !s.is_empty()).collect();
        let floats: Vec<String> =
            given.iter().filter(|n| matches!(self.vals.get(n.as_str()), Some(Val::Const(Const::F32(_))))).map(|n| n.to_string()).collect();
        let constant = given.iter().all(|n| matches!(self.vals.get(n.as_str()), Some(Val::Const(_))));
        // A cast of floats to booleans or integers is the mask rules' (import/masks.rs).
        let to_other = op == "Cast" && super::masks::cast_to(node).is_some_and(|t| t != DataType::Float as i64);
        if !FLOAT_FOLDS.contains(&op)
            || to_other
            || !constant
            || floats.is_empty()
            || node.domain.as_deref().is_some_and(|d| !d.is_empty() && d != "ai.onnx")
        {
            return self.node(node);
        }
        // The data input, a float constant, as a step of its own, so the node's rule takes it
        // as the data flowing through (the others stay constants: a batch norm's scale).
        let before = self.steps.len();
        let mut saved = Vec::new();
        for name in floats.iter().filter(|n| node.input.first() == Some(*n)) {
            if let Some(Val::Const(Const::F32(t))) = self.vals.get(name).cloned() {
                let id = self.push(Step::Const(Var::constant(t.clone())));
                saved.push((name.clone(), self.vals.insert(name.clone(), Val::Runtime(id))));
            }
        }
        let made = self.node(node);
        for (name, old) in saved {
            if let Some(v) = old {
                self.vals.insert(name, v);
            }
        }
        made?;
        let out = node.output.first().cloned().unwrap_or_default();
        let id = match self.vals.get(&out) {
            Some(Val::Runtime(id)) if *id > before => *id,
            _ => return Ok(()),
        };
        // Every new step reads only the steps just made.
        let n = self.steps.len();
        let own = |v: &ValueId| *v > before;
        if (before..n).any(|i| !inputs(&self.steps[i]).iter().chain(&shape_refs(&self.steps[i])).all(own)) {
            return Ok(());
        }
        let mut vals: Vec<Option<Var>> = vec![None; n + 1];
        let mut shapes: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
        let mut ctx = stride_nn::Ctx::eval();
        for i in before..n {
            let y = no_grad(|| run_step(&mut self.steps[i], &vals, &shapes, &mut ctx))
                .map_err(|e| err(format!("working out '{out}' from constants: {e}")))?;
            shapes[i + 1] = y.shape();
            vals[i + 1] = Some(y);
        }
        let value = vals[id].take().expect("the node's output was computed").value();
        self.steps.truncate(before);
        self.sigmoid_of.retain(|&k, _| k <= before);
        self.bare_linear.retain(|&k, _| k <= before);
        self.value_name.retain(|&k, _| k <= before);
        self.vals.insert(out, Val::Const(Const::F32(value)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_transposes_and_concats_of_integers_follow_onnx() {
        // pads (0, 1, 0, 1) as the TorchScript exporter computes them for F.pad.
        let flat = concat(&[(vec![0, 1, 0, 1], vec![4]), (vec![0; 4], vec![4])], 0).unwrap();
        let pairs = reshape(&flat, &[-1, 2], false).unwrap();
        assert_eq!(pairs.1, [4, 2]);
        let reversed = slice(&pairs, &[-1], &[i64::MIN], Some(&[0]), Some(&[-1])).unwrap();
        assert_eq!(reversed, (vec![0, 0, 0, 0, 0, 1, 0, 1], vec![4, 2]));
        let t = transpose(&reversed, Some(vec![1, 0])).unwrap();
        assert_eq!(t, (vec![0, 0, 0, 0, 0, 0, 1, 1], vec![2, 4]));
        assert_eq!(slice(&(vec![0, 1, 2, 3, 4, 5, 6], vec![7]), &[1], &[6], None, Some(&[2])).unwrap().0, [1, 3, 5]);
        assert_eq!(slice(&(vec![0, 1, 2, 3, 4], vec![5]), &[10], &[-10], None, Some(&[-2])).unwrap().0, [4, 2, 0]);
        assert_eq!(slice(&(vec![0, 1, 2], vec![3]), &[i64::MAX], &[i64::MIN], None, Some(&[i64::MIN])).unwrap().0, [2]);
        assert!(transpose(&pairs, Some(vec![0, 0])).is_err());
        assert!(reshape(&pairs, &[3, -1], false).is_err());
        assert!(!fits(&[0, 1 << 40, 1 << 40]) && fits(&[0, 1 << 20, 1 << 20]));
        assert!(concat(&[(vec![1, 2], vec![1, 2]), (vec![1, 2, 3], vec![1, 3])], 0).is_err());
    }
}
