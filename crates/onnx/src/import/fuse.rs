//! Patterns exporters write op by op that run as one layer (x * sigmoid(x) as SiLU, PyTorch's
//! five-op GELUs, a MatMul's bias Add), taken only where the intermediate values have no other
//! reader.

use stride_autograd::{Unary, Var};
use stride_nn::layers::{Activation, Linear};

use super::{Builder, Const, NodeProto, Result, Val};
use crate::network::{BinOp, Step, ValueId};

impl Builder {
    /// Whether value `id` (a node's output) is read once, by the node being built (false for a
    /// value an Identity gave a second name).
    pub(super) fn read_once(&self, id: ValueId) -> bool {
        self.value_name.get(&id).and_then(|n| self.uses.get(n)) == Some(&1)
    }

    /// The value of a one-element constant step.
    pub(super) fn const_scalar(&self, id: ValueId) -> Option<f32> {
        match self.steps.get(id.checked_sub(1)?)? {
            Step::Const(v) if v.value().numel() == 1 => v.value().to_host().ok()?.data().first().copied(),
            _ => None,
        }
    }

    /// The operands of a binary step `op` as (runtime value, constant), either way round.
    pub(super) fn with_const(&self, id: ValueId, op: BinOp) -> Option<(ValueId, f32)> {
        let Some(Step::Binary(o, a, b)) = self.steps.get(id.checked_sub(1)?) else { return None };
        if *o != op {
            return None;
        }
        match (self.const_scalar(*a), self.const_scalar(*b)) {
            (None, Some(c)) => Some((*a, c)),
            (Some(c), None) if matches!(op, BinOp::Add | BinOp::Mul) => Some((*b, c)),
            _ => None,
        }
    }

    /// GELU as PyTorch exports it before opset 20: Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)),
    /// 0.5) as the TorchScript exporter writes it, or Mul(x, Mul(0.5, Add(Erf(Div(x, sqrt 2)),
    /// 1))) as the newer one does (any order of the products' operands, or x times 1/sqrt 2 for
    /// the division), the intermediate values read by nothing else: one GELU layer of x. The
    /// chain's steps are left to the network, which skips steps nothing reads.
    pub(super) fn fuse_gelu(&mut self, node: &NodeProto, ins: &[&str]) -> Result<bool> {
        let close = |v: f32, want: f64| (v as f64 - want).abs() <= 1e-5 * want.abs();
        let ids: Vec<Option<ValueId>> = ins.iter().map(|n| if let Some(Val::Runtime(id)) = self.vals.get(*n) { Some(*id) } else { None }).collect();
        let consts: Vec<Option<f32>> = ins
            .iter()
            .map(|n| match self.vals.get(*n) {
                Some(Val::Const(Const::F32(t))) if t.numel() == 1 => t.data().first().copied(),
                _ => None,
            })
            .collect();
        // (x, the Add of erf and 1, the product between that Add and this node).
        let mut candidates: Vec<(ValueId, ValueId, ValueId)> = Vec::new();
        match (ids.as_slice(), consts.as_slice()) {
            ([Some(m), None], [None, Some(h)]) | ([None, Some(m)], [Some(h), None]) if close(*h, 0.5) => {
                if let Some(Step::Binary(BinOp::Mul, u, v)) = self.steps.get(*m - 1) {
                    candidates.extend([(*u, *v, *m), (*v, *u, *m)]);
                }
            }
            ([Some(p), Some(q)], _) => {
                for (x, h) in [(*p, *q), (*q, *p)] {
                    if let Some((sum, _)) = self.with_const(h, BinOp::Mul).filter(|&(_, c)| close(c, 0.5)) {
                        candidates.push((x, sum, h));
                    }
                }
            }
            _ => return Ok(false),
        }
        for (x, sum, m) in candidates {
            let Some((e, one)) = self.with_const(sum, BinOp::Add) else { continue };
            let Some(Step::Layer { module, input: d, .. }) = self.steps.get(e - 1) else { continue };
            if module.describe() != "erf" {
                continue;
            }
            let d = *d;
            let scaled = match (self.with_const(d, BinOp::Div), self.with_const(d, BinOp::Mul)) {
                (Some((dx, c)), _) => dx == x && close(c, std::f64::consts::SQRT_2),
                (_, Some((dx, c))) => dx == x && close(c, std::f64::consts::FRAC_1_SQRT_2),
                _ => false,
            };
            if !scaled || !close(one, 1.0) || ![m, sum, e, d].iter().all(|&id| self.read_once(id)) {
                continue;
            }
            let name = self.layer_name(node, None);
            let id = self.push(Step::Layer { name, module: Box::new(Activation(Unary::Gelu)), input: x });
            self.set_output(node, id)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Mul(x, Sigmoid(x)) or Mul(Sigmoid(x), x), the sigmoid read by nothing else: the sigmoid's
    /// step becomes a SiLU of x (one pass over the values instead of two and a product).
    pub(super) fn fuse_silu(&mut self, node: &NodeProto, ins: &[&str]) -> Result<bool> {
        let [p, q] = ins else { return Ok(false) };
        for (sig, x) in [(p, q), (q, p)] {
            let (Some(Val::Runtime(s)), Some(Val::Runtime(x))) = (self.vals.get(*sig), self.vals.get(*x)) else { continue };
            let (s, x) = (*s, *x);
            if self.sigmoid_of.get(&s) != Some(&x) || !self.read_once(s) {
                continue;
            }
            let Some(Step::Layer { name, .. }) = self.steps.get(s - 1) else { continue };
            let name = name.clone();
            self.steps[s - 1] = Step::Layer { name, module: Box::new(Activation(Unary::Silu)), input: x };
            self.sigmoid_of.remove(&s);
            self.set_output(node, s)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Add(product, bias) or Add(bias, product) where `product` is a dense layer without a
    /// bias that nothing else reads, and the bias a constant vector of its outputs: the layer
    /// takes the bias (so fine-tuning trains it) and its name (`fc.bias` names layer `fc`).
    pub(super) fn fuse_bias(&mut self, node: &NodeProto, ins: &[&str]) -> Result<bool> {
        let [p, q] = ins else { return Ok(false) };
        for (prod, bias) in [(p, q), (q, p)] {
            let Some(Val::Runtime(id)) = self.vals.get(*prod) else { continue };
            let (id, single) = (*id, self.read_once(*id) && self.value_name.get(id).map(String::as_str) == Some(*prod));
            let Some(weight) = self.bare_linear.get(&id).filter(|_| single).cloned() else { continue };
            let fout = weight.shape()[0];
            let Some(Val::Const(Const::F32(b))) = self.vals.get(*bias) else { continue };
            if b.shape() != [fout] {
                continue;
            }
            let b = Var::parameter(b.clone());
            let Some(Step::Layer { name, input, .. }) = self.steps.get(id - 1) else { continue };
            let (old, input) = (name.clone(), *input);
            let name = match bias.strip_suffix(".bias").filter(|p| !p.is_empty()) {
                Some(prefix) if !self.names.contains(prefix) => {
                    self.names.remove(&old);
                    self.names.insert(prefix.to_string());
                    prefix.to_string()
                }
                _ => old,
            };
            self.steps[id - 1] = Step::Layer { name, module: Box::new(Linear { weight, bias: Some(b) }), input };
            self.bare_linear.remove(&id);
            self.set_output(node, id)?;
            return Ok(true);
        }
        Ok(false)
    }
}
