//! Integers a graph computes from the shapes of its values (Shape, Gather, Unsqueeze, Concat,
//! Cast, Slice and arithmetic, before a Reshape or Slice): kept as expressions over the values'
//! dimensions ([`Piece`], [`Dim`]), folded where constant, worked out as the network runs.

use super::{err, Attrs, Builder, Const, NodeProto, Result, Step, Val};
use crate::network::{Dim, IntOp, Piece};

impl Builder {
    /// An integer list: a constant, or integers computed from shapes. None for anything else.
    pub(super) fn int_pieces(&self, name: &str) -> Option<Vec<Piece>> {
        match self.vals.get(name)? {
            Val::Const(Const::I64(d, _)) => Some(d.iter().map(|&i| Piece::One(Dim::Const(i))).collect()),
            Val::Ints(p) => Some(p.clone()),
            _ => None,
        }
    }
    /// Whether `name` is integers computed from shapes.
    pub(super) fn is_ints(&self, name: &str) -> bool {
        matches!(self.vals.get(name), Some(Val::Ints(_)))
    }
    /// An integer list of known length, each entry a constant or computed from shapes.
    pub(super) fn int_list(&self, name: &str, what: &str) -> Result<Vec<Dim>> {
        let pieces = self.int_pieces(name).ok_or_else(|| err(format!("{what} '{name}' is not a list of integers")))?;
        let mut out = Vec::new();
        for p in pieces {
            match p {
                Piece::One(d) => out.push(d),
                // Dimensions from both ends' same side (Shape with start 0 and end 1, or the
                // last two): as many as the bounds say, whatever the rank.
                Piece::Run { of, start, end } => match (start, end) {
                    (s, Some(e)) if s >= 0 && e >= s => out.extend((s..e).map(|a| Dim::Of(of, a))),
                    (s, Some(e)) if s < 0 && (s..=0).contains(&e) => out.extend((s..e).map(|a| Dim::Of(of, a))),
                    (s, None) if s < 0 => out.extend((s..0).map(|a| Dim::Of(of, a))),
                    _ => return Err(err(format!("{what} '{name}' holds a whole shape, whose length Stride does not know before the network runs"))),
                },
            }
        }
        Ok(out)
    }
    /// Stores integers: folded to a constant when none depends on a shape.
    pub(super) fn set_ints(&mut self, node: &NodeProto, pieces: Vec<Piece>) -> Result<()> {
        let consts: Option<Vec<i64>> = pieces.iter().map(|p| if let Piece::One(Dim::Const(c)) = p { Some(*c) } else { None }).collect();
        let v = match consts {
            Some(c) => {
                let n = c.len();
                Val::Const(Const::I64(c, vec![n]))
            }
            None => Val::Ints(pieces),
        };
        let out = node.output.first().ok_or_else(|| err("the node has no output"))?;
        self.vals.insert(out.clone(), v);
        Ok(())
    }

    /// Shape, Gather, Unsqueeze, Squeeze, Concat, Cast, Slice and integer arithmetic on a
    /// graph's shapes. Returns false when `node` is not such an operation.
    pub(super) fn shape_node(&mut self, node: &NodeProto, ins: &[&str], a: &mut Attrs) -> Result<bool> {
        let op = node.op_type.as_deref().unwrap_or("");
        let first = ins.first().copied().unwrap_or("");
        let pieces: Vec<Piece> = match op {
            "Shape" => {
                let (start, end) = (a.int("start", 0)?, a.take("end").map(|e| e.i.unwrap_or(0)));
                match self.vals.get(first) {
                    Some(Val::Runtime(id)) => vec![Piece::Run { of: *id, start, end }],
                    Some(Val::Const(Const::F32(t))) => {
                        let dims = t.shape();
                        dims[crate::network::dims_range(dims.len(), start, end)].iter().map(|&d| Piece::One(Dim::Const(d as i64))).collect()
                    }
                    _ => return Err(err(format!("Shape of '{first}': Stride takes the shape of float values"))),
                }
            }
            "Gather" if self.int_pieces(first).is_some() => {
                if a.int("axis", 0)? != 0 {
                    return Err(err("Gather from a shape along an axis other than 0"));
                }
                let idx = self.const_ints(ins.get(1).copied().unwrap_or(""), "indices")?;
                let from = self.int_pieces(first).unwrap_or_default();
                let known: Option<Vec<Dim>> = from.iter().map(|p| if let Piece::One(d) = p { Some(d.clone()) } else { None }).collect();
                idx.iter()
                    .map(|&i| {
                        let d = match (&known, &from[..]) {
                            (Some(k), _) => {
                                let n = k.len() as i64;
                                let j = if i < 0 { i + n } else { i };
                                k.get(usize::try_from(j).unwrap_or(usize::MAX)).cloned()
                            }
                            (None, [Piece::Run { of, start, end: None }]) if *start >= 0 && i >= 0 => start.checked_add(i).map(|a| Dim::Of(*of, a)),
                            (None, [Piece::Run { of, start: 0, end: None }]) => Some(Dim::Of(*of, i)),
                            _ => None,
                        };
                        d.map(Piece::One)
                            .ok_or_else(|| err(format!("index {i} of '{first}' is out of its range or not known before the network runs")))
                    })
                    .collect::<Result<_>>()?
            }
            "Unsqueeze" | "Squeeze" if self.int_pieces(first).is_some() => {
                // A scalar made a 1-element list and back: the integers stay as they are.
                a.take("axes");
                self.int_pieces(first).unwrap_or_default()
            }
            "Concat" if ins.iter().any(|n| self.is_ints(n)) => {
                let ax = a.int("axis", 0)?;
                if ax != 0 && ax != -1 {
                    return Err(err(format!("Concat of shapes along axis {ax}")));
                }
                let mut all = Vec::new();
                for n in ins.iter().filter(|n| !n.is_empty()) {
                    all.extend(self.int_pieces(n).ok_or_else(|| err(format!("Concat of shape '{first}' with '{n}', which is not integers")))?);
                }
                all
            }
            "Cast" if self.int_pieces(first).is_some() => {
                let to = a.int("to", 0)?;
                a.take("saturate");
                let pieces = self.int_pieces(first).unwrap_or_default();
                if to == 1 {
                    // Dimensions as float data, worked out as the network runs (attention's
                    // 1 / sqrt(head size) from the shape of the keys).
                    let id = self.push(Step::Floats(pieces));
                    self.set_output(node, id)?;
                    return Ok(true);
                }
                if to != 6 && to != 7 {
                    return Err(err(format!(
                        "Cast of integers to {}: Stride keeps shapes as integers or float32",
                        crate::tensor::type_name(to as i32)
                    )));
                }
                pieces
            }
            "Add" | "Sub" | "Mul" | "Div" | "Mod" if ins.len() == 2 && self.int_pieces(ins[0]).is_some() && self.int_pieces(ins[1]).is_some() => {
                let (x, y) = (self.int_list(ins[0], "operand")?, self.int_list(ins[1], "operand")?);
                let n = x.len().max(y.len());
                if !(x.len() == n || x.len() == 1) || !(y.len() == n || y.len() == 1) {
                    return Err(err(format!("{op} of {} and {} integers", x.len(), y.len())));
                }
                let iop = IntOp::of(op, a.int("fmod", 0)? != 0).ok_or_else(|| err(format!("{op} is not integer arithmetic")))?;
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    let (p, q) = (x[if x.len() == 1 { 0 } else { i }].clone(), y[if y.len() == 1 { 0 } else { i }].clone());
                    out.push(Piece::One(match (&p, &q) {
                        (Dim::Const(u), Dim::Const(v)) => {
                            Dim::Const(iop.apply(*u, *v).ok_or_else(|| err(format!("{op} of {u} and {v} has no int64 result")))?)
                        }
                        _ => Dim::Bin(iop, Box::new(p), Box::new(q)),
                    }));
                }
                out
            }
            "Slice" if self.int_pieces(first).is_some() => {
                let (starts, ends) =
                    (self.const_ints(ins.get(1).copied().unwrap_or(""), "starts")?, self.const_ints(ins.get(2).copied().unwrap_or(""), "ends")?);
                let from = self.int_pieces(first).unwrap_or_default();
                if starts.len() != 1
                    || ends.len() != 1
                    || ins.get(4).is_some_and(|n| !n.is_empty() && self.const_ints(n, "steps").ok() != Some(vec![1]))
                {
                    return Err(err("Slice of a shape: one start and end, step 1"));
                }
                let (s, e) = (starts[0], ends[0]);
                match &from[..] {
                    [Piece::Run { of, start: 0, end: None }] => vec![Piece::Run { of: *of, start: s, end: (e < i64::MAX / 2).then_some(e) }],
                    _ => {
                        let known = self.int_list(first, "data")?;
                        known[crate::network::dims_range(known.len(), s, Some(e))].iter().cloned().map(Piece::One).collect()
                    }
                }
            }
            _ => return Ok(false),
        };
        self.set_ints(node, pieces)?;
        Ok(true)
    }
}
