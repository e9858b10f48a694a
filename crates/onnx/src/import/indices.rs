//! Integer tensors (Range, arithmetic, Unsqueeze, Squeeze, Reshape and Cast of integers that are
//! not a shape list) and Gather of the data flowing through by them: kept as [`IntTensor`]
//! expressions, folded to constants where they read no value's shape.

use super::{err, Attrs, Builder, Const, NodeProto, Result, Val};
use crate::indices::IntTensor;
use crate::network::{Dim, IntOp, Step};

impl Builder {
    /// `name` as an integer tensor: a constant, a computed one, or a shape list (1-d).
    fn int_tensor(&self, name: &str) -> Option<IntTensor> {
        match self.vals.get(name)? {
            Val::Const(Const::I64(data, dims)) => Some(IntTensor::Const { data: data.clone(), dims: dims.clone() }),
            Val::Indices(t) => Some(t.clone()),
            Val::Ints(_) => Some(IntTensor::Dims(self.int_list(name, "integers").ok()?)),
            _ => None,
        }
    }

    /// One integer for Range: a one-value constant or a dimension computed from shapes.
    fn scalar(&self, name: &str, what: &str) -> Result<Dim> {
        if matches!(self.vals.get(name), Some(Val::Const(Const::F32(_)) | Val::Runtime(_))) {
            return Err(err(format!("Range's {what} '{name}' is float data: Stride computes Range over integers, for indices")));
        }
        match &self.int_list(name, what)?[..] {
            [d] => Ok(d.clone()),
            l => Err(err(format!("Range's {what} '{name}' holds {} integers, not one", l.len()))),
        }
    }

    /// Stores `t` as `node`'s output, folded to a constant when it reads no value's shape.
    fn set_int_tensor(&mut self, node: &NodeProto, t: IntTensor) -> Result<()> {
        let mut refs = Vec::new();
        t.refs(&mut refs);
        let v = if refs.is_empty() {
            let (data, dims) = t.eval(&[])?;
            Val::Const(Const::I64(data, dims))
        } else {
            Val::Indices(t)
        };
        let out = node.output.first().ok_or_else(|| err("the node has no output"))?;
        self.vals.insert(out.clone(), v);
        Ok(())
    }

    /// Range; Gather and GatherND of a runtime value by integer indices; and arithmetic,
    /// Unsqueeze, Squeeze, Reshape and Cast where an operand is a computed integer tensor or every
    /// operand a constant one. Returns false for anything else (shape lists go to `shape_node`).
    pub(super) fn index_node(&mut self, node: &NodeProto, ins: &[&str], a: &mut Attrs) -> Result<bool> {
        let op = node.op_type.as_deref().unwrap_or("");
        let first = ins.first().copied().unwrap_or("");
        let computed = |b: &Builder, n: &str| matches!(b.vals.get(n), Some(Val::Indices(_)));
        let constant = |b: &Builder, n: &str| matches!(b.vals.get(n), Some(Val::Const(Const::I64(..))));
        let t = match op {
            "Range" => {
                let [start, limit, delta] = ins[..] else {
                    return Err(err(format!("Range takes 3 inputs (start, limit, delta); got {}", ins.len())));
                };
                IntTensor::Range { start: self.scalar(start, "start")?, limit: self.scalar(limit, "limit")?, delta: self.scalar(delta, "delta")? }
            }
            "Gather" | "GatherND" if matches!(self.vals.get(first), Some(Val::Runtime(_))) => {
                let x = self.runtime(first)?;
                let name = ins.get(1).copied().unwrap_or("");
                let indices = self.int_tensor(name).ok_or_else(|| err(format!("indices '{name}' are not integers")))?;
                let step = if op == "Gather" {
                    Step::Gather { input: x, axis: a.int("axis", 0)?, indices }
                } else {
                    let batch_dims = a.int("batch_dims", 0)?;
                    if batch_dims != 0 {
                        return Err(err(format!("batch_dims {batch_dims} is not supported: Stride's GatherND indexes from the first axis")));
                    }
                    Step::GatherNd { input: x, indices }
                };
                let id = self.push(step);
                self.set_output(node, id)?;
                return Ok(true);
            }
            "Add" | "Sub" | "Mul" | "Div" | "Mod"
                if ins.len() == 2 && (ins.iter().any(|n| computed(self, n)) || ins.iter().all(|n| constant(self, n))) =>
            {
                let (Some(x), Some(y)) = (self.int_tensor(ins[0]), self.int_tensor(ins[1])) else {
                    return Ok(false);
                };
                let iop = IntOp::of(op, a.int("fmod", 0)? != 0).ok_or_else(|| err(format!("{op} is not integer arithmetic")))?;
                IntTensor::Bin(iop, Box::new(x), Box::new(y))
            }
            "Unsqueeze" | "Squeeze" | "Reshape" | "Cast" if computed(self, first) || constant(self, first) => {
                let t = self.int_tensor(first).ok_or_else(|| err(format!("'{first}' is not integers")))?;
                let rank = t.rank() as i64;
                let axes = match ins.get(1).copied().filter(|n| !n.is_empty()) {
                    Some(n) => Some(self.const_ints(n, if op == "Reshape" { "shape" } else { "axes" })?),
                    None => a.ints(if op == "Reshape" { "shape" } else { "axes" }),
                };
                // Axes (negative from the end) of a value of `rank`, sorted; repeats refused.
                let positions = |axes: &[i64], rank: i64| -> Result<Vec<usize>> {
                    let mut p = Vec::with_capacity(axes.len());
                    for &x in axes {
                        if x < -rank || x >= rank {
                            return Err(err(format!("axis {x} is out of range for {rank}-d integers")));
                        }
                        p.push((if x < 0 { x + rank } else { x }) as usize);
                    }
                    p.sort_unstable();
                    if p.windows(2).any(|w| w[0] == w[1]) {
                        return Err(err(format!("axes {axes:?} repeat an axis")));
                    }
                    Ok(p)
                };
                match op {
                    "Unsqueeze" => {
                        let axes = axes.ok_or_else(|| err("Unsqueeze needs axes"))?;
                        IntTensor::Unsqueeze(Box::new(t), positions(&axes, rank + axes.len() as i64)?)
                    }
                    "Squeeze" => {
                        let axes = match (axes, &t) {
                            (Some(axes), _) => positions(&axes, rank)?,
                            (None, IntTensor::Const { dims, .. }) => (0..dims.len()).filter(|&i| dims[i] == 1).collect(),
                            (None, _) => return Err(err("Squeeze without axes of integers computed from shapes: Stride needs the axes")),
                        };
                        IntTensor::Squeeze(Box::new(t), axes)
                    }
                    "Reshape" => {
                        a.take("allowzero");
                        IntTensor::Reshape(Box::new(t), axes.ok_or_else(|| err("the shape is missing"))?)
                    }
                    _ => {
                        let to = a.int("to", 0)?;
                        a.take("saturate");
                        if to != 6 && to != 7 {
                            return Err(err(format!(
                                "Cast of integers to {}: Stride keeps indices as integers",
                                crate::tensor::type_name(to as i32)
                            )));
                        }
                        t
                    }
                }
            }
            _ => return Ok(false),
        };
        self.set_int_tensor(node, t)?;
        Ok(true)
    }
}
