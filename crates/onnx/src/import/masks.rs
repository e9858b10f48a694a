//! Masks and running counts, as position encodings write them (`~zeros(b, h, w).bool()` then
//! `cumsum` in EdgeNeXt's and DETR's sine encodings):
//! - Cast to and from bool, and Not, of constants: worked out when the file is read;
//! - a tensor of one value whose shape the network computes (ConstantOfShape of a computed
//!   shape, a one-value constant Expanded to one): kept as its value and shape, cast and
//!   negated as such, and made (the value broadcast to the shape) where data reads it;
//! - CumSum of the data.

use super::{err, Attrs, Builder, Const, NodeProto, Result, Step, Val, ValueId, Var};
use crate::proto::tensor_proto::DataType;
use crate::tensor::read_const;
use stride_autograd::Tensor;

/// What a one-value tensor holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kind {
    Float,
    Int,
    Bool,
}

/// The kind ONNX's data type `to` casts to; None for types Stride does not hold.
fn kind_of(to: i64) -> Option<Kind> {
    match to {
        t if t == DataType::Float as i64 => Some(Kind::Float),
        t if t == DataType::Int64 as i64 || t == DataType::Int32 as i64 => Some(Kind::Int),
        t if t == DataType::Bool as i64 => Some(Kind::Bool),
        _ => None,
    }
}

/// `v` cast to `kind` (to integers toward zero, as NumPy's astype).
fn cast(v: f64, kind: Kind) -> f64 {
    match kind {
        Kind::Float => v as f32 as f64,
        Kind::Int => v.trunc(),
        Kind::Bool => f64::from(u8::from(v != 0.0)),
    }
}

impl Builder {
    /// Cast, Not, ConstantOfShape, Expand and CumSum in the forms above. Returns false for any
    /// other node or form.
    pub(super) fn mask_node(&mut self, node: &NodeProto, ins: &[&str], a: &mut Attrs) -> Result<bool> {
        let op = node.op_type.as_deref().unwrap_or("");
        let first = ins.first().copied().unwrap_or("");
        let val = match (op, self.vals.get(first)) {
            ("Cast", Some(Val::Fill(shape, v, _))) => {
                let (shape, v) = (shape.clone(), *v);
                let to = a.int("to", 0)?;
                a.take("saturate");
                let kind = kind_of(to).ok_or_else(|| err(format!("Cast to data type {to}: Stride holds float32, integers and booleans")))?;
                Val::Fill(shape, cast(v, kind), kind)
            }
            ("Cast", Some(Val::Const(c))) => {
                // Read without taking: the folding rules cast integers to integers.
                let to = cast_to(node).unwrap_or(0);
                let out = match (c, kind_of(to)) {
                    (Const::F32(t), Some(Kind::Bool)) => Const::Bool(t.data().iter().map(|&v| v != 0.0).collect(), t.shape().to_vec()),
                    (Const::I64(d, dims), Some(Kind::Bool)) => Const::Bool(d.iter().map(|&v| v != 0).collect(), dims.clone()),
                    (Const::Bool(d, dims), Some(Kind::Float)) => {
                        Const::F32(Tensor::from_vec(d.iter().map(|&b| f32::from(u8::from(b))).collect(), dims)?)
                    }
                    (Const::Bool(d, dims), Some(Kind::Int)) => Const::I64(d.iter().map(|&b| i64::from(b)).collect(), dims.clone()),
                    (Const::Bool(..), Some(Kind::Bool)) => c.clone(),
                    _ => return Ok(false),
                };
                a.take("to");
                a.take("saturate");
                Val::Const(out)
            }
            ("Not", Some(Val::Fill(shape, v, Kind::Bool))) => Val::Fill(shape.clone(), 1.0 - v, Kind::Bool),
            ("Not", Some(Val::Const(Const::Bool(d, dims)))) => Val::Const(Const::Bool(d.iter().map(|b| !b).collect(), dims.clone())),
            ("Not", _) => {
                return Err(err(format!("Not of '{first}': Stride negates booleans known when the file is read, or one value filling a shape")))
            }
            ("ConstantOfShape", _) => {
                let Some(shape) = self.is_ints(first).then(|| self.int_pieces(first)).flatten() else { return Ok(false) };
                let (v, kind) = match a.take("value").and_then(|v| v.t.as_ref()).map(read_const).transpose()? {
                    None => (0.0, Kind::Float),
                    Some(c) => one_value(&c).ok_or_else(|| err("ConstantOfShape's value must be one number"))?,
                };
                Val::Fill(shape, v, kind)
            }
            ("Expand", Some(Val::Const(c))) => {
                let shape_name = ins.get(1).copied().unwrap_or("");
                let (Some((v, kind)), true) = (one_value(c), self.is_ints(shape_name)) else { return Ok(false) };
                let Some(shape) = self.int_pieces(shape_name) else { return Ok(false) };
                // A one-value constant with axes may add them to the shape (NumPy's rule): that is
                // the Expand step's to work out.
                let rank = match c {
                    Const::F32(t) => t.shape().len(),
                    Const::I64(_, d) | Const::Bool(_, d) => d.len(),
                };
                if rank > 0 {
                    return Ok(false);
                }
                Val::Fill(shape, v, kind)
            }
            ("CumSum", _) => {
                self.make_fills(ins);
                let x = self.value(first)?;
                let axis = match self.const_ints(ins.get(1).copied().unwrap_or(""), "CumSum's axis")?[..] {
                    [axis] => axis,
                    ref v => return Err(err(format!("CumSum's axis is {v:?}; ONNX gives one"))),
                };
                let (exclusive, reverse) = (a.int("exclusive", 0)? != 0, a.int("reverse", 0)? != 0);
                Val::Runtime(self.push(Step::CumSum { input: x, axis, exclusive, reverse }))
            }
            _ => return Ok(false),
        };
        let out = node.output.first().ok_or_else(|| err(format!("{op} has no output")))?;
        self.vals.insert(out.clone(), val);
        Ok(true)
    }

    /// Makes each one-value tensor among `ins` into data (its value broadcast to its shape).
    pub(super) fn make_fills(&mut self, ins: &[&str]) {
        for &name in ins {
            if let Some(Val::Fill(shape, v, _)) = self.vals.get(name) {
                let (shape, v) = (shape.clone(), *v);
                let c = self.push(Step::Const(Var::constant(Tensor::scalar(v as f32))));
                let id: ValueId = self.push(Step::Expand(c, shape));
                self.vals.insert(name.to_string(), Val::Runtime(id));
            }
        }
    }
}

/// A Cast's target type (`to`), read without taking the attribute.
pub(super) fn cast_to(node: &NodeProto) -> Option<i64> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some("to")).and_then(|a| a.i)
}

/// The value of a one-value constant, and its kind.
fn one_value(c: &Const) -> Option<(f64, Kind)> {
    match c {
        Const::F32(t) if t.numel() == 1 => Some((t.data()[0] as f64, Kind::Float)),
        Const::I64(d, _) if d.len() == 1 => Some((d[0] as f64, Kind::Int)),
        Const::Bool(d, _) if d.len() == 1 => Some((f64::from(u8::from(d[0])), Kind::Bool)),
        _ => None,
    }
}
