//! 1-d convolution, pooling and resizing (Conv1d, ConvTranspose1d, MaxPool1d, AvgPool1d,
//! F.interpolate of a sequence: ECA's channel attention, audio and sequence CNNs) as Stride's
//! 2-d layers and Resize over maps of height 1: the input
//! [N, C, L] gains an axis of 1 before the layer and loses it after; the weight [K, C, k]
//! becomes [K, C, 1, k], each attribute gains the height's entry (kernel 1, stride 1,
//! dilation 1, no padding) and Resize's factors and sizes theirs (1).

use super::{err, Builder, Const, NodeProto, Result, Step, Val};
use crate::network::{Dim, Piece};
use stride_autograd::Tensor;

/// A name no file's value has (ONNX names do not hold NUL), for the lifted values.
fn lifted(name: &str) -> String {
    format!("{name}\u{0}2d")
}

impl Builder {
    /// Whether `node` is a 1-d convolution (a 3-d weight), pooling (a kernel of one axis) or
    /// resizing (three factors or sizes).
    fn is_1d(&self, node: &NodeProto) -> bool {
        match node.op_type.as_deref().unwrap_or("") {
            "Conv" | "ConvTranspose" => {
                matches!(node.input.get(1).and_then(|w| self.vals.get(w.as_str())), Some(Val::Const(Const::F32(t))) if t.shape().len() == 3)
            }
            "MaxPool" | "AveragePool" | "LpPool" => node.attribute.iter().any(|a| a.name.as_deref() == Some("kernel_shape") && a.ints.len() == 1),
            // Factors or sizes for the three axes of [N, C, L] (F.interpolate of a sequence).
            "Resize" if !node.attribute.iter().any(|a| a.name.as_deref() == Some("axes")) => {
                let given = |i: usize| node.input.get(i).filter(|n| !n.is_empty()).map(|n| n.as_str());
                let scales = given(2).is_some_and(|n| matches!(self.vals.get(n), Some(Val::Const(Const::F32(t))) if t.numel() == 3));
                scales || given(3).and_then(|n| self.int_list(n, "sizes").ok()).is_some_and(|d| d.len() == 3)
            }
            _ => false,
        }
    }

    /// A Resize's scales or sizes for [N, C, L] as those for [N, C, 1, L], under new names.
    fn lift_resize(&mut self, two: &mut NodeProto) -> Result<()> {
        if let Some(n) = two.input.get(2).filter(|n| !n.is_empty()).cloned() {
            if let Some(Val::Const(Const::F32(t))) = self.vals.get(n.as_str()) {
                let d = t.data();
                let t = Tensor::from_vec(vec![d[0], d[1], 1.0, d[2]], &[4])?;
                self.vals.insert(lifted(&n), Val::Const(Const::F32(t)));
                two.input[2] = lifted(&n);
            }
        }
        if let Some(n) = two.input.get(3).filter(|n| !n.is_empty()).cloned() {
            if let Ok(mut d) = self.int_list(&n, "sizes") {
                d.insert(2, Dim::Const(1));
                self.vals.insert(lifted(&n), Val::Ints(d.into_iter().map(Piece::One).collect()));
                two.input[3] = lifted(&n);
            }
        }
        Ok(())
    }

    /// Runs a 1-d `node` as its 2-d form over a height-1 map. Returns false for other nodes.
    pub(super) fn one_d_node(&mut self, node: &NodeProto) -> Result<bool> {
        if !self.is_1d(node) {
            return Ok(false);
        }
        let op = node.op_type.as_deref().unwrap_or("");
        let (Some(x), Some(out)) = (node.input.first(), node.output.first()) else { return Ok(false) };
        let mut two = node.clone();
        let id = self.runtime(x)?;
        let up = self.push(Step::Unsqueeze(id, vec![2]));
        two.input[0] = lifted(x);
        self.vals.insert(two.input[0].clone(), Val::Runtime(up));
        if let Some(w) = node.input.get(1).filter(|_| op.starts_with("Conv")) {
            if let Some(Val::Const(Const::F32(t))) = self.vals.get(w.as_str()) {
                let s = t.shape();
                let t = t.reshape(&[s[0], s[1], 1, s[2]])?;
                // The layer is named after its weight: keep the name unless another node reads it.
                let name = if self.uses.get(w.as_str()).copied().unwrap_or(0) <= 1 { w.clone() } else { lifted(w) };
                self.vals.insert(name.clone(), Val::Const(Const::F32(t)));
                two.input[1] = name;
            }
        }
        if op == "Resize" {
            self.lift_resize(&mut two)?;
        }
        for a in &mut two.attribute {
            let name = a.name.as_deref().unwrap_or("");
            let before = a.ints.clone();
            a.ints = match (name, &before[..]) {
                ("kernel_shape" | "strides" | "dilations", [v]) => vec![1, *v],
                ("pads", [b, e]) => vec![0, *b, 0, *e],
                ("output_padding", [v]) => vec![0, *v],
                ("kernel_shape" | "strides" | "dilations" | "pads" | "output_padding", _) => {
                    return Err(err(format!("{name} {before:?} for a 1-d {op}")));
                }
                _ => continue,
            };
        }
        two.output[0] = lifted(out);
        self.node(&two)?;
        let y = self.runtime(&two.output[0])?;
        let id = self.push(Step::Squeeze(y, Some(vec![2])));
        self.set_output(node, id).map(|_| true)
    }
}
