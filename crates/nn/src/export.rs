//! A network written out as a graph of ONNX operators, layer by layer.
//!
//! Every layer knows its ONNX form ([`Module::export`]); this module holds the graph they write
//! into. It is ONNX-shaped (operator names, attributes and initializers as ONNX spells them) but
//! has no protobuf in it: `stride-onnx` turns it into a file. Export runs the network once on an
//! example input while it writes, so every node knows its input and output shapes (padding
//! `same` becomes explicit pads, adaptive pooling a fixed window).

use std::collections::HashSet;

use stride_autograd::{self as ag, Conv2dOptions, Padding, Pool2dOptions, Tensor, Unary, Var};

use crate::module::{join, Ctx, Module};
use crate::Result;

/// A value flowing through the graph: its ONNX name and its value on the example input.
#[derive(Clone)]
pub struct Value {
    pub name: String,
    pub var: Var,
}

impl Value {
    pub fn shape(&self) -> Vec<usize> {
        self.var.shape()
    }
}

/// An operator attribute.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// One ONNX node.
#[derive(Clone, Debug)]
pub struct Node {
    pub op: &'static str,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(&'static str, Attr)>,
}

/// A constant of the graph: a weight (f32) or a shape or index list (int64).
#[derive(Clone, Debug)]
pub enum Init {
    F32(Tensor<f32>),
    I64 { dims: Vec<usize>, data: Vec<i64> },
}

/// The graph layers write into.
pub struct Graph {
    pub nodes: Vec<Node>,
    pub initializers: Vec<(String, Init)>,
    /// The operator set the nodes are written for (ONNX's default domain).
    pub opset: i64,
    ctx: Ctx,
    used: HashSet<String>,
}

/// The oldest operator set whose forms `export` writes (Dropout's ratio input, Split's sizes
/// input, Clip's bounds as inputs, Softmax along one axis).
pub const MIN_OPSET: i64 = 13;

impl Graph {
    pub fn new(opset: i64) -> Result<Self> {
        if !(MIN_OPSET..=23).contains(&opset) {
            return Err(ag::Error::arg("export", format!("opset {opset} is not supported: Stride writes opsets {MIN_OPSET} to 23")).into());
        }
        Ok(Graph { nodes: Vec::new(), initializers: Vec::new(), opset, ctx: Ctx::eval(), used: HashSet::new() })
    }

    /// The context layers run in while exporting (evaluation mode).
    pub fn ctx(&mut self) -> &mut Ctx {
        &mut self.ctx
    }

    /// `base`, or `base_1`, `base_2`, ... if taken.
    fn unique(&mut self, base: &str) -> String {
        let base = if base.is_empty() { "value" } else { base };
        let mut name = base.to_string();
        let mut i = 0;
        while self.used.contains(&name) {
            i += 1;
            name = format!("{base}_{i}");
        }
        self.used.insert(name.clone());
        name
    }

    /// Reserves `name` for the graph's input.
    pub fn input(&mut self, name: &str, var: Var) -> Value {
        Value { name: self.unique(name), var }
    }

    /// A parameter or buffer as an initializer under its `state_dict` name.
    pub fn param(&mut self, name: &str, t: Tensor<f32>) -> String {
        let name = self.unique(name);
        self.initializers.push((name.clone(), Init::F32(t)));
        name
    }

    /// An int64 constant (a shape, pads, split sizes).
    pub fn ints(&mut self, name: &str, data: Vec<i64>) -> String {
        let name = self.unique(name);
        self.initializers.push((name.clone(), Init::I64 { dims: vec![data.len()], data }));
        name
    }

    /// A scalar f32 constant.
    pub fn scalar(&mut self, name: &str, v: f32) -> String {
        self.param(name, Tensor::scalar(v))
    }

    /// Adds a node `op` named `name` with one output whose example value is `y`.
    pub fn op(&mut self, op: &'static str, name: &str, inputs: Vec<String>, attrs: Vec<(&'static str, Attr)>, y: Var) -> Value {
        let node = self.unique(if name.is_empty() { op } else { name });
        let out = node.clone();
        self.nodes.push(Node { op, name: node, inputs, outputs: vec![out.clone()], attrs });
        Value { name: out, var: y }
    }

    /// Adds a node with several outputs (Split).
    pub fn op_multi(&mut self, op: &'static str, name: &str, inputs: Vec<String>, attrs: Vec<(&'static str, Attr)>, ys: Vec<Var>) -> Vec<Value> {
        let node = self.unique(name);
        let outs: Vec<Value> = ys.into_iter().enumerate().map(|(i, var)| Value { name: self.unique(&format!("{node}.{i}")), var }).collect();
        self.nodes.push(Node { op, name: node, inputs, outputs: outs.iter().map(|v| v.name.clone()).collect(), attrs });
        outs
    }

    /// Exports child `m` of a container under `name` (its `state_dict` prefix), with the
    /// layer's path in any error, as [`crate::call`] does for forward.
    pub fn child(&mut self, m: &mut dyn Module, prefix: &str, name: &str, x: &Value) -> Result<Value> {
        let path = join(prefix, name);
        m.export(self, &path, x).map_err(|e| if m.is_container() { e } else { e.context(format!("layer {path} ({})", m.describe())) })
    }

    /// An element-wise activation applied to `x`.
    pub fn unary(&mut self, f: Unary, name: &str, x: &Value) -> Result<Value> {
        let y = ag::ops::arith::unary(&x.var, f)?;
        let xi = vec![x.name.clone()];
        let name = if name.is_empty() { f.name().to_string() } else { name.to_string() };
        Ok(match f {
            Unary::Relu => self.op("Relu", &name, xi, vec![], y),
            Unary::Tanh => self.op("Tanh", &name, xi, vec![], y),
            Unary::Sigmoid => self.op("Sigmoid", &name, xi, vec![], y),
            Unary::Exp => self.op("Exp", &name, xi, vec![], y),
            Unary::Log => self.op("Log", &name, xi, vec![], y),
            Unary::Sqrt => self.op("Sqrt", &name, xi, vec![], y),
            Unary::Neg => self.op("Neg", &name, xi, vec![], y),
            Unary::Abs => self.op("Abs", &name, xi, vec![], y),
            Unary::Selu => self.op("Selu", &name, xi, vec![], y),
            Unary::Erf => self.op("Erf", &name, xi, vec![], y),
            Unary::Sin => self.op("Sin", &name, xi, vec![], y),
            Unary::Cos => self.op("Cos", &name, xi, vec![], y),
            Unary::Gelu if self.opset >= 20 => self.op("Gelu", &name, xi, vec![], y),
            Unary::Gelu => {
                // x * (erf(x / sqrt 2) + 1) / 2, as PyTorch writes GELU before opset 20.
                let scaled = self.unary(Unary::MulScalar(std::f64::consts::FRAC_1_SQRT_2), &format!("{name}.scaled"), x)?;
                let erf = self.unary(Unary::Erf, &format!("{name}.erf"), &scaled)?;
                let shifted = self.unary(Unary::AddScalar(1.0), &format!("{name}.shifted"), &erf)?;
                let half = self.unary(Unary::MulScalar(0.5), &format!("{name}.half"), &shifted)?;
                self.op("Mul", &name, vec![x.name.clone(), half.name], vec![], y)
            }
            Unary::HardSwish if self.opset < 14 => {
                // x * max(0, min(1, x / 6 + 1 / 2)): HardSigmoid is in every opset Stride writes.
                let alpha = Attr::Float(1.0 / 6.0);
                let g = ag::ops::arith::unary(&ag::ops::arith::unary(&x.var, Unary::MulScalar(1.0 / 6.0))?, Unary::AddScalar(0.5))?;
                let g = ag::ops::arith::unary(&g, Unary::Clamp(0.0, 1.0))?;
                let gate = self.op("HardSigmoid", &format!("{name}.gate"), xi, vec![("alpha", alpha), ("beta", Attr::Float(0.5))], g);
                self.op("Mul", &name, vec![x.name.clone(), gate.name], vec![], y)
            }
            Unary::HardSwish => self.op("HardSwish", &name, xi, vec![], y),
            Unary::LeakyRelu(a) => self.op("LeakyRelu", &name, xi, vec![("alpha", Attr::Float(a as f32))], y),
            Unary::Elu(a) => self.op("Elu", &name, xi, vec![("alpha", Attr::Float(a as f32))], y),
            // ONNX's Softplus is log(1 + exp(x)); PyTorch's threshold only changes results by
            // less than f32 rounding (exp(-20) relative), so beta 1 is the same function.
            Unary::Softplus { beta: 1.0, .. } => self.op("Softplus", &name, xi, vec![], y),
            Unary::Relu6 | Unary::Clamp(..) => {
                let (lo, hi) = if let Unary::Clamp(lo, hi) = f { (lo, hi) } else { (0.0, 6.0) };
                let lo = self.scalar(&format!("{name}.min"), lo as f32);
                let hi = self.scalar(&format!("{name}.max"), hi as f32);
                self.op("Clip", &name, vec![x.name.clone(), lo, hi], vec![], y)
            }
            Unary::Square => self.op("Mul", &name, vec![x.name.clone(), x.name.clone()], vec![], y),
            Unary::Pow(p) | Unary::AddScalar(p) | Unary::MulScalar(p) => {
                let c = self.scalar(&format!("{name}.c"), p as f32);
                let op = match f {
                    Unary::Pow(_) => "Pow",
                    Unary::AddScalar(_) => "Add",
                    _ => "Mul",
                };
                self.op(op, &name, vec![x.name.clone(), c], vec![], y)
            }
            Unary::Silu => {
                let s = self.unary(Unary::Sigmoid, &format!("{name}.sigmoid"), x)?;
                self.op("Mul", &name, vec![x.name.clone(), s.name], vec![], y)
            }
            Unary::Softplus { .. } => {
                return Err(ag::Error::arg("export", format!("{} has no ONNX operator in opset {} that Stride writes", f.name(), self.opset)).into())
            }
        })
    }
}

fn ints(v: &[usize]) -> Attr {
    Attr::Ints(v.iter().map(|&u| u as i64).collect())
}

/// `same` padding as explicit pads: TensorFlow's rule, the odd pixel at the bottom/right.
fn same_pads(input: usize, output: usize, k_eff: usize, stride: usize, lower: bool) -> (usize, usize) {
    let total = ((output.max(1) - 1) * stride + k_eff).saturating_sub(input);
    if lower {
        (total - total / 2, total / 2)
    } else {
        (total / 2, total - total / 2)
    }
}

fn pads(p: Padding, x: &[usize], y: &[usize], k_eff: (usize, usize), stride: (usize, usize)) -> [usize; 4] {
    match p {
        Padding::Valid => [0; 4],
        Padding::Explicit { top, bottom, left, right } => [top, left, bottom, right],
        Padding::Same | Padding::SameLower => {
            let lower = p == Padding::SameLower;
            let (t, b) = same_pads(x[2], y[2], k_eff.0, stride.0, lower);
            let (l, r) = same_pads(x[3], y[3], k_eff.1, stride.1, lower);
            [t, l, b, r]
        }
    }
}

/// Conv's attributes, pads resolved for these shapes.
pub(crate) fn conv_attrs(w: &[usize], o: &Conv2dOptions, x: &[usize], y: &[usize]) -> Vec<(&'static str, Attr)> {
    let k_eff = ((w[2] - 1) * o.dilation.0 + 1, (w[3] - 1) * o.dilation.1 + 1);
    vec![
        ("kernel_shape", ints(&w[2..4])),
        ("strides", ints(&[o.stride.0, o.stride.1])),
        ("pads", ints(&pads(o.padding, x, y, k_eff, o.stride))),
        ("dilations", ints(&[o.dilation.0, o.dilation.1])),
        ("group", Attr::Int(o.groups as i64)),
    ]
}

/// ConvTranspose's attributes: Keras's `same` (output = input x stride) as explicit pads and
/// output padding, as the kernel computes it.
pub(crate) fn conv_transpose_attrs(w: &[usize], o: &Conv2dOptions) -> Vec<(&'static str, Attr)> {
    let axis = |k: usize, s: usize, d: usize, op: usize, p: (usize, usize)| -> ((usize, usize), usize) {
        let k_eff = (k - 1) * d + 1;
        match o.padding {
            Padding::Same | Padding::SameLower => {
                let total = k_eff.saturating_sub(s);
                let pads = if o.padding == Padding::Same { (total / 2, total - total / 2) } else { (total - total / 2, total / 2) };
                (pads, s.saturating_sub(k_eff) + op)
            }
            _ => (p, op),
        }
    };
    let (ph, pw) = match o.padding {
        Padding::Explicit { top, bottom, left, right } => ((top, bottom), (left, right)),
        _ => ((0, 0), (0, 0)),
    };
    let (ph, oph) = axis(w[2], o.stride.0, o.dilation.0, o.output_padding.0, ph);
    let (pw, opw) = axis(w[3], o.stride.1, o.dilation.1, o.output_padding.1, pw);
    vec![
        ("kernel_shape", ints(&w[2..4])),
        ("strides", ints(&[o.stride.0, o.stride.1])),
        ("pads", ints(&[ph.0, pw.0, ph.1, pw.1])),
        ("dilations", ints(&[o.dilation.0, o.dilation.1])),
        ("output_padding", ints(&[oph, opw])),
        ("group", Attr::Int(o.groups as i64)),
    ]
}

/// MaxPool's or AveragePool's attributes for these shapes.
pub(crate) fn pool_attrs(o: &Pool2dOptions, x: &[usize], y: &[usize], avg: bool) -> Vec<(&'static str, Attr)> {
    let stride = o.stride.unwrap_or(o.kernel);
    let mut a = vec![
        ("kernel_shape", ints(&[o.kernel.0, o.kernel.1])),
        ("strides", ints(&[stride.0, stride.1])),
        ("pads", ints(&pads(o.padding, x, y, o.kernel, stride))),
        ("ceil_mode", Attr::Int(o.ceil_mode as i64)),
    ];
    if avg {
        a.push(("count_include_pad", Attr::Int(o.count_include_pad as i64)));
    }
    a
}

/// The error for a layer with no ONNX form.
pub fn unsupported(what: &str) -> crate::Error {
    ag::Error::arg("export", format!("{what} has no ONNX form in Stride's exporter")).into()
}
