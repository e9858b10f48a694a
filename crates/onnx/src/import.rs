//! An ONNX graph to a [`Network`] of Stride's layers.
//!
//! Each node becomes an existing layer (Conv -> `Conv2d`, BatchNormalization -> `BatchNorm`,
//! Gemm -> `Linear`, ...) or one of the network's steps between layers. Weights must be
//! constants (initializers or Constant nodes). A layer is named after its weight's initializer
//! (`features.0.weight` -> layer `features.0`), so a model Stride exported comes back with
//! its `state_dict` names. Anything Stride does not have, or an attribute value it does not
//! implement, is an error naming the operator, the node and the opset.

use std::collections::{HashMap, HashSet};

use stride_autograd::{BatchNormOptions, Conv2dOptions, Padding, Pool2dOptions, Tensor, Unary, Var};
use stride_nn::blocks::{ConvTranspose2d, OtherPool};
use stride_nn::layers::{Activation, BatchNorm, Conv2d, Dropout, Flatten, LayerNorm, Linear, Pool};
use stride_nn::Module;

use crate::network::{BinOp, Dim, IntOp, Network, Piece, Step, ValueId};
use crate::proto::{attribute_proto::AttributeType, type_proto, AttributeProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use crate::tensor::{read_const, type_name, Const};
use crate::{err, Result};

/// What `import` made of a file.
pub struct Imported {
    pub network: Network,
    /// The default domain's opset the file was written for.
    pub opset: i64,
    /// The program that wrote the file.
    pub producer: String,
    /// The model's `metadata_props` (see [`crate::read_metadata`]).
    pub metadata: HashMap<String, String>,
}

/// Imports `model`: one tensor input, one output.
pub fn import(model: &ModelProto) -> Result<Imported> {
    import_with(model, &HashMap::new())
}

/// Imports `model`, treating the graph inputs named in `bound` as constants with those values
/// (ONNX's node tests pass weights as inputs; a graph's other inputs become its constants).
pub fn import_with(model: &ModelProto, bound: &HashMap<String, TensorProto>) -> Result<Imported> {
    let graph = model.graph.as_ref().ok_or_else(|| err("the model has no graph"))?;
    let mut opset = None;
    for o in &model.opset_import {
        match o.domain.as_deref().unwrap_or("") {
            "" | "ai.onnx" => opset = o.version,
            _ => {}
        }
    }
    let opset = opset.ok_or_else(|| err("the model imports no version of ONNX's default operator set"))?;
    if opset < 7 {
        return Err(err(format!("opset {opset} is older than Stride reads (7 and later)")));
    }
    let mut uses: HashMap<String, usize> = HashMap::new();
    for name in graph.node.iter().flat_map(|n| n.input.iter()).chain(graph.output.iter().filter_map(|o| o.name.as_ref())) {
        *uses.entry(name.clone()).or_default() += 1;
    }
    let mut b = Builder {
        opset,
        vals: HashMap::new(),
        steps: Vec::new(),
        names: HashSet::new(),
        domains: HashMap::new(),
        uses,
        bare_linear: HashMap::new(),
        sigmoid_of: HashMap::new(),
        value_name: HashMap::new(),
    };
    for o in &model.opset_import {
        if let Some(d) = o.domain.as_deref().filter(|d| !d.is_empty() && *d != "ai.onnx") {
            b.domains.insert(d.to_string(), o.version.unwrap_or(0));
        }
    }
    for t in &graph.initializer {
        let name = t.name.clone().unwrap_or_default();
        b.vals.insert(name, Val::Const(read_const(t)?));
    }
    if !graph.sparse_initializer.is_empty() {
        return Err(err("the graph has sparse initializers; Stride reads dense ones"));
    }
    for (name, t) in bound {
        b.vals.insert(name.clone(), Val::Const(read_const(t)?));
    }
    let runtime: Vec<&ValueInfoProto> = graph.input.iter().filter(|i| !b.vals.contains_key(i.name.as_deref().unwrap_or(""))).collect();
    let [input] = runtime[..] else {
        let names: Vec<&str> = runtime.iter().map(|i| i.name.as_deref().unwrap_or("")).collect();
        return Err(err(format!("a Stride network takes one input; this graph takes {} ({})", names.len(), names.join(", "))));
    };
    let input_name = input.name.clone().unwrap_or_default();
    let input_shape = tensor_shape(input).map_err(|e| e.context(format!("graph input '{input_name}'")))?;
    b.vals.insert(input_name, Val::Runtime(0));
    for (i, node) in graph.node.iter().enumerate() {
        let name = match node.name.as_deref() {
            Some(n) if !n.is_empty() => format!("'{n}'"),
            _ => format!("#{i}"),
        };
        b.node(node).map_err(|e| e.context(format!("node {name} ({}, opset {opset})", node.op_type.as_deref().unwrap_or(""))))?;
    }
    let [output] = &graph.output[..] else {
        return Err(err(format!("a Stride network gives one output; this graph gives {}", graph.output.len())));
    };
    let out_name = output.name.as_deref().unwrap_or("");
    let output_shape = tensor_shape(output).unwrap_or_default();
    let out = match b.vals.get(out_name) {
        Some(Val::Runtime(id)) => *id,
        Some(Val::Const(_) | Val::Ints(_)) => return Err(err(format!("the graph's output '{out_name}' is a constant or a shape"))),
        None => return Err(err(format!("the graph's output '{out_name}' is made by no node"))),
    };
    Ok(Imported {
        network: Network::new(b.steps, out, input_shape, output_shape),
        opset,
        producer: model.producer_name.clone().unwrap_or_default(),
        metadata: crate::metadata_map(&model.metadata_props),
    })
}

/// A float tensor's declared shape (None for symbolic dimensions).
fn tensor_shape(v: &ValueInfoProto) -> Result<Vec<Option<usize>>> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(err("is not a tensor"));
    };
    if t.elem_type != Some(1) {
        return Err(err(format!("has element type {}; Stride computes in float32", type_name(t.elem_type.unwrap_or(0)))));
    }
    let dims = t.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
    Ok(dims
        .iter()
        .map(|d| match d.value {
            Some(crate::proto::tensor_shape_proto::dimension::Value::DimValue(v)) if v >= 0 => Some(v as usize),
            _ => None,
        })
        .collect())
}

#[derive(Clone)]
enum Val {
    Runtime(ValueId),
    Const(Const),
    /// Integers computed from the shapes of runtime values (a shape subgraph's values).
    Ints(Vec<Piece>),
}

/// What an error says of a value computed from shapes used where data is expected.
const SHAPE_AS_DATA: &str =
    "is computed from the shapes of the values flowing through; Stride uses such integers only as shapes (Reshape) and bounds (Slice)";

struct Builder {
    opset: i64,
    vals: HashMap<String, Val>,
    steps: Vec<Step>,
    names: HashSet<String>,
    domains: HashMap<String, i64>,
    /// How many nodes (and graph outputs) read each value.
    uses: HashMap<String, usize>,
    /// Dense layers made without a bias (MatMul), by output: an Add of a bias vector that
    /// alone reads one becomes its bias, as PyTorch's Linear on more than two axes exports.
    bare_linear: HashMap<ValueId, Var>,
    /// Sigmoid layers by output, with their input: Mul(x, Sigmoid(x)) whose sigmoid nothing
    /// else reads becomes one SiLU layer (EfficientNet's activation as PyTorch exports it).
    sigmoid_of: HashMap<ValueId, ValueId>,
    /// Each runtime value's name in the graph (for [`Builder::read_once`]).
    value_name: HashMap<ValueId, String>,
}

/// A node's attributes, each read at most once; whatever is left unread is refused.
struct Attrs<'a> {
    map: HashMap<&'a str, &'a AttributeProto>,
}

impl<'a> Attrs<'a> {
    fn new(node: &'a NodeProto) -> Self {
        Attrs { map: node.attribute.iter().map(|a| (a.name.as_deref().unwrap_or(""), a)).collect() }
    }
    fn take(&mut self, name: &str) -> Option<&'a AttributeProto> {
        self.map.remove(name)
    }
    fn int(&mut self, name: &str, default: i64) -> Result<i64> {
        match self.take(name) {
            None => Ok(default),
            Some(a) if a.r#type == Some(AttributeType::Int as i32) || a.i.is_some() => Ok(a.i.unwrap_or(0)),
            Some(_) => Err(err(format!("attribute {name} is not an int"))),
        }
    }
    fn float(&mut self, name: &str, default: f32) -> Result<f32> {
        match self.take(name) {
            None => Ok(default),
            Some(a) if a.r#type == Some(AttributeType::Float as i32) || a.f.is_some() => Ok(a.f.unwrap_or(0.0)),
            Some(_) => Err(err(format!("attribute {name} is not a float"))),
        }
    }
    fn ints(&mut self, name: &str) -> Option<Vec<i64>> {
        self.take(name).map(|a| a.ints.clone())
    }
    fn string(&mut self, name: &str) -> Option<String> {
        self.take(name).map(|a| String::from_utf8_lossy(a.s.as_deref().unwrap_or(&[])).into_owned())
    }
    /// Refuses attributes no rule read.
    fn done(self) -> Result<()> {
        let mut left: Vec<&str> = self.map.keys().copied().collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        Err(err(format!("attribute {} is not supported", left.join(", "))))
    }
}

/// The largest stride, dilation, pad or kernel an imported model may ask for: a file cannot make
/// Stride allocate outputs out of all proportion to its own size.
pub const MAX_WINDOW: i64 = 1024;

/// Two spatial values of an ints attribute (kernel, strides, dilations: at least 1; output
/// padding: at least 0), or `default`.
fn pair(a: Option<Vec<i64>>, name: &str, default: usize) -> Result<(usize, usize)> {
    let min = if name == "output_padding" { 0 } else { 1 };
    match a.as_deref() {
        None => Ok((default, default)),
        Some([h, w]) if (min..=MAX_WINDOW).contains(h) && (min..=MAX_WINDOW).contains(w) => Ok((*h as usize, *w as usize)),
        Some(v) => Err(err(format!("{name} {v:?}: Stride's layers are 2-d (two values from {min} to {MAX_WINDOW})"))),
    }
}

/// ONNX's pads [top, left, bottom, right] and auto_pad as Stride's padding.
fn padding(pads: Option<Vec<i64>>, auto_pad: Option<String>) -> Result<Padding> {
    match auto_pad.as_deref().unwrap_or("NOTSET") {
        "NOTSET" => {}
        "VALID" => return Ok(Padding::Valid),
        // TensorFlow's rule, the odd pixel at the end: what Stride's `same` is.
        "SAME_UPPER" => return Ok(Padding::Same),
        "SAME_LOWER" => return Ok(Padding::SameLower),
        other => return Err(err(format!("auto_pad {other} is not one of NOTSET, VALID, SAME_UPPER and SAME_LOWER"))),
    }
    match pads.as_deref() {
        None => Ok(Padding::Valid),
        Some([t, l, b, r]) if [t, l, b, r].iter().all(|p| (0..=MAX_WINDOW).contains(*p)) => {
            Ok(Padding::Explicit { top: *t as usize, bottom: *b as usize, left: *l as usize, right: *r as usize })
        }
        Some(v) => Err(err(format!("pads {v:?}: Stride's layers take four pads (2-d) from 0 to {MAX_WINDOW}"))),
    }
}

fn unary_op(op: &str) -> Option<Unary> {
    Some(match op {
        "Relu" => Unary::Relu,
        "Sigmoid" => Unary::Sigmoid,
        "Tanh" => Unary::Tanh,
        "Exp" => Unary::Exp,
        "Log" => Unary::Log,
        "Sqrt" => Unary::Sqrt,
        "Neg" => Unary::Neg,
        "Abs" => Unary::Abs,
        "HardSwish" => Unary::HardSwish,
        "Erf" => Unary::Erf,
        // ONNX's softplus is log(1 + exp(x)); PyTorch's threshold changes nothing in f32.
        "Softplus" => Unary::Softplus { beta: 1.0, threshold: 20.0 },
        _ => return None,
    })
}

impl Builder {
    fn runtime(&self, name: &str) -> Result<ValueId> {
        match self.vals.get(name) {
            Some(Val::Runtime(id)) => Ok(*id),
            Some(Val::Const(_)) => Err(err(format!("input '{name}' is a constant where Stride expects the data flowing through"))),
            Some(Val::Ints(_)) => Err(err(format!("input '{name}' {SHAPE_AS_DATA}"))),
            None => Err(err(format!("input '{name}' is made by no earlier node"))),
        }
    }
    /// A runtime value, or a constant made into a step.
    fn value(&mut self, name: &str) -> Result<ValueId> {
        match self.vals.get(name) {
            Some(Val::Runtime(id)) => Ok(*id),
            Some(Val::Const(Const::F32(t))) => {
                let v = Var::constant(t.clone());
                Ok(self.push(Step::Const(v)))
            }
            Some(Val::Const(Const::I64(..))) => Err(err(format!("input '{name}' holds integers; Stride computes in float32"))),
            Some(Val::Ints(_)) => Err(err(format!("input '{name}' {SHAPE_AS_DATA}"))),
            None => Err(err(format!("input '{name}' is made by no earlier node"))),
        }
    }
    fn const_f32(&self, name: &str, what: &str) -> Result<Tensor<f32>> {
        match self.vals.get(name) {
            Some(Val::Const(Const::F32(t))) => Ok(t.clone()),
            Some(Val::Const(Const::I64(..))) => Err(err(format!("{what} '{name}' holds integers, not float32"))),
            Some(Val::Runtime(_)) => Err(err(format!("{what} '{name}' is computed in the graph; Stride needs it as a constant (an initializer)"))),
            Some(Val::Ints(_)) => Err(err(format!("{what} '{name}' {SHAPE_AS_DATA}"))),
            None => Err(err(format!("{what} '{name}' is made by no earlier node"))),
        }
    }
    fn const_ints(&self, name: &str, what: &str) -> Result<Vec<i64>> {
        match self.vals.get(name) {
            Some(Val::Const(Const::I64(d))) => Ok(d.clone()),
            Some(Val::Const(Const::F32(_))) => Err(err(format!("{what} '{name}' holds floats, not integers"))),
            Some(Val::Runtime(_) | Val::Ints(_)) => Err(err(format!("{what} '{name}' is computed in the graph; Stride needs it as a constant"))),
            None => Err(err(format!("{what} '{name}' is made by no earlier node"))),
        }
    }
    /// An integer list: a constant, or integers computed from shapes. None for anything else.
    fn int_pieces(&self, name: &str) -> Option<Vec<Piece>> {
        match self.vals.get(name)? {
            Val::Const(Const::I64(d)) => Some(d.iter().map(|&i| Piece::One(Dim::Const(i))).collect()),
            Val::Ints(p) => Some(p.clone()),
            _ => None,
        }
    }
    /// Whether `name` is integers computed from shapes.
    fn is_ints(&self, name: &str) -> bool {
        matches!(self.vals.get(name), Some(Val::Ints(_)))
    }
    /// An integer list of known length, each entry a constant or computed from shapes.
    fn int_list(&self, name: &str, what: &str) -> Result<Vec<Dim>> {
        let pieces = self.int_pieces(name).ok_or_else(|| err(format!("{what} '{name}' is not a list of integers")))?;
        pieces
            .into_iter()
            .map(|p| match p {
                Piece::One(d) => Ok(d),
                Piece::Run { .. } => {
                    Err(err(format!("{what} '{name}' holds a whole shape, whose length Stride does not know before the network runs")))
                }
            })
            .collect()
    }
    /// Stores integers: folded to a constant when none depends on a shape.
    fn set_ints(&mut self, node: &NodeProto, pieces: Vec<Piece>) -> Result<()> {
        let consts: Option<Vec<i64>> = pieces.iter().map(|p| if let Piece::One(Dim::Const(c)) = p { Some(*c) } else { None }).collect();
        let v = match consts {
            Some(c) => Val::Const(Const::I64(c)),
            None => Val::Ints(pieces),
        };
        let out = node.output.first().ok_or_else(|| err("the node has no output"))?;
        self.vals.insert(out.clone(), v);
        Ok(())
    }

    /// Shape, Gather, Unsqueeze, Squeeze, Concat, Cast, Slice and integer arithmetic on a
    /// graph's shapes. Returns false when `node` is not such an operation.
    fn shape_node(&mut self, node: &NodeProto, ins: &[&str], a: &mut Attrs) -> Result<bool> {
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
                if to != 6 && to != 7 {
                    return Err(err(format!("Cast of integers to {}: Stride keeps shapes as integers", crate::tensor::type_name(to as i32))));
                }
                self.int_pieces(first).unwrap_or_default()
            }
            "Add" | "Sub" | "Mul" | "Div" if ins.len() == 2 && self.int_pieces(ins[0]).is_some() && self.int_pieces(ins[1]).is_some() => {
                let (x, y) = (self.int_list(ins[0], "operand")?, self.int_list(ins[1], "operand")?);
                let n = x.len().max(y.len());
                if !(x.len() == n || x.len() == 1) || !(y.len() == n || y.len() == 1) {
                    return Err(err(format!("{op} of {} and {} integers", x.len(), y.len())));
                }
                let iop = match op {
                    "Add" => IntOp::Add,
                    "Sub" => IntOp::Sub,
                    "Mul" => IntOp::Mul,
                    _ => IntOp::Div,
                };
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    let (p, q) = (x[if x.len() == 1 { 0 } else { i }].clone(), y[if y.len() == 1 { 0 } else { i }].clone());
                    out.push(Piece::One(match (&p, &q) {
                        (Dim::Const(u), Dim::Const(v)) => Dim::Const(
                            match iop {
                                IntOp::Add => u.checked_add(*v),
                                IntOp::Sub => u.checked_sub(*v),
                                IntOp::Mul => u.checked_mul(*v),
                                IntOp::Div => u.checked_div(*v),
                            }
                            .ok_or_else(|| err(format!("{op} of {u} and {v} has no int64 result")))?,
                        ),
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

    fn push(&mut self, s: Step) -> ValueId {
        self.steps.push(s);
        self.steps.len()
    }
    /// A unique layer name: the weight's initializer name less `.weight`, else the node's.
    fn layer_name(&mut self, node: &NodeProto, weight: Option<&str>) -> String {
        let base = match weight.and_then(|w| w.strip_suffix(".weight")) {
            Some(p) if !p.is_empty() => p.to_string(),
            _ => match node.name.as_deref() {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => format!("{}_{}", node.op_type.as_deref().unwrap_or("node").to_lowercase(), self.steps.len()),
            },
        };
        let mut name = base.clone();
        let mut i = 0;
        while !self.names.insert(name.clone()) {
            i += 1;
            name = format!("{base}_{i}");
        }
        name
    }
    fn layer(&mut self, node: &NodeProto, weight: Option<&str>, module: impl Module + 'static, input: ValueId) -> ValueId {
        let name = self.layer_name(node, weight);
        self.push(Step::Layer { name, module: Box::new(module), input })
    }

    fn node(&mut self, node: &NodeProto) -> Result<()> {
        let op = node.op_type.as_deref().unwrap_or("");
        let domain = node.domain.as_deref().unwrap_or("");
        if !domain.is_empty() && domain != "ai.onnx" {
            return Err(err(format!(
                "operator {op} of domain '{domain}' (version {}) is not supported",
                self.domains.get(domain).copied().unwrap_or(0)
            )));
        }
        let ins: Vec<&str> = node.input.iter().map(|s| s.as_str()).collect();
        let opt = |i: usize| ins.get(i).copied().filter(|s| !s.is_empty());
        let need = |i: usize| opt(i).ok_or_else(|| err(format!("{op} needs input {i}")));
        let mut a = Attrs::new(node);
        // Outputs beyond the first must go unused (Dropout's mask, MaxPool's indices, BN's stats).
        let extra_outputs = node.output.iter().skip(1).filter(|o| !o.is_empty()).count();
        let multi = op == "Split";
        if extra_outputs > 0 && !multi {
            return Err(err(format!("{op} with {} outputs: Stride gives the first only", node.output.len())));
        }
        if self.shape_node(node, &ins, &mut a)? {
            return a.done();
        }
        let id: ValueId = match op {
            "Conv" | "ConvTranspose" => {
                let x = self.runtime(need(0)?)?;
                let wname = need(1)?;
                let w = self.const_f32(wname, "weight")?;
                if w.shape().len() != 4 {
                    return Err(err(format!("weight '{wname}' has shape {:?}: Stride's {op} is 2-d (a 4-d weight)", w.shape())));
                }
                let (weight, bias) = (Var::parameter(w.clone()), opt(2).map(|n| self.const_f32(n, "bias")).transpose()?.map(Var::parameter));
                if op == "Conv" {
                    let opts = self.conv_opts(&mut a, w.shape())?;
                    a.done()?;
                    self.layer(node, Some(wname), Conv2d { weight, bias, opts }, x)
                } else {
                    if a.take("output_shape").is_some() {
                        return Err(err("attribute output_shape is not supported: Stride takes pads and output_padding"));
                    }
                    let output_padding = pair(a.ints("output_padding"), "output_padding", 0)?;
                    let mut opts = self.conv_opts(&mut a, w.shape())?;

                    opts.output_padding = output_padding;
                    a.done()?;
                    self.layer(node, Some(wname), ConvTranspose2d { weight, bias, opts }, x)
                }
            }
            "MaxPool" | "AveragePool" | "LpPool" => {
                let x = self.runtime(need(0)?)?;
                let k = a.ints("kernel_shape").ok_or_else(|| err("attribute kernel_shape is missing"))?;
                let kernel = pair(Some(k), "kernel_shape", 1)?;
                let stride = pair(a.ints("strides"), "strides", 1)?;
                if pair(a.ints("dilations"), "dilations", 1)? != (1, 1) {
                    return Err(err("dilations other than 1 are not supported in pooling"));
                }
                let padding = padding(a.ints("pads"), a.string("auto_pad"))?;
                let ceil_mode = a.int("ceil_mode", 0)? != 0;
                let count_include_pad = a.int("count_include_pad", 0)? != 0;
                if a.int("storage_order", 0)? != 0 {
                    return Err(err("storage_order 1 (column major) is not supported"));
                }
                let o = Pool2dOptions { kernel, stride: Some(stride), padding, ceil_mode, count_include_pad };
                let m: Box<dyn Module> = match op {
                    "MaxPool" => Box::new(Pool::Max(o)),
                    "AveragePool" => Box::new(Pool::Avg(o)),
                    _ => {
                        let p = a.int("p", 2)?;
                        if !(1..=MAX_WINDOW).contains(&p) {
                            return Err(err(format!("p {p} must be from 1 to {MAX_WINDOW}")));
                        }
                        Box::new(OtherPool::Lp(p as f64, o))
                    }
                };
                a.done()?;
                let name = self.layer_name(node, None);
                self.push(Step::Layer { name, module: m, input: x })
            }
            "GlobalAveragePool" | "GlobalMaxPool" => {
                let x = self.runtime(need(0)?)?;
                a.done()?;
                let m = if op == "GlobalAveragePool" { OtherPool::GlobalAvg } else { OtherPool::GlobalMax };
                self.layer(node, None, m, x)
            }
            "ReduceMean" | "ReduceMax" => {
                // Global pooling as PyTorch's newer exporter writes adaptive_avg_pool2d(1).
                let x = self.runtime(need(0)?)?;
                let axes = match opt(1) {
                    Some(n) => Some(self.const_ints(n, "axes")?),
                    None => a.ints("axes"),
                };
                let keep = a.int("keepdims", 1)? != 0;
                if a.int("noop_with_empty_axes", 0)? != 0 {
                    return Err(err("noop_with_empty_axes 1 is not supported"));
                }
                a.done()?;
                let mut axes = axes.unwrap_or_default();
                axes.sort();
                if axes != [2, 3] && axes != [-2, -1] {
                    return Err(err(format!("{op} over axes {axes:?}: Stride reduces the two spatial axes of [N, C, H, W] (global pooling)")));
                }
                let m = if op == "ReduceMean" { OtherPool::GlobalAvg } else { OtherPool::GlobalMax };
                let pooled = self.layer(node, None, m, x);
                if keep {
                    pooled
                } else {
                    self.push(Step::Flatten(pooled, 1))
                }
            }
            "BatchNormalization" => {
                let x = self.runtime(need(0)?)?;
                let parts: Vec<Tensor<f32>> =
                    (1..5).map(|i| need(i).and_then(|n| self.const_f32(n, ["scale", "bias", "mean", "variance"][i - 1]))).collect::<Result<_>>()?;
                let c = parts[0].numel();
                if parts.iter().any(|p| p.shape() != [c]) {
                    return Err(err(format!(
                        "scale, bias, mean and variance must be [C]; got {:?}",
                        parts.iter().map(|p| p.shape().to_vec()).collect::<Vec<_>>()
                    )));
                }
                let eps = a.float("epsilon", 1e-5)? as f64;
                let momentum = a.float("momentum", 0.9)? as f64;
                if a.int("training_mode", 0)? != 0 {
                    return Err(err("training_mode 1 is not supported: Stride imports networks for inference and fine-tuning"));
                }
                a.take("spatial"); // opset < 9: 1 (per channel) is the only form Stride has
                a.done()?;
                let mut bn = BatchNorm::new(c)?;
                bn.weight = Var::parameter(parts[0].clone());
                bn.bias = Var::parameter(parts[1].clone());
                bn.running_mean = parts[2].clone();
                bn.running_var = parts[3].clone();
                bn.opts = BatchNormOptions { eps, momentum: 1.0 - momentum };
                let wname = need(1)?.to_string();
                self.layer(node, Some(&wname), bn, x)
            }
            "LeakyRelu" | "Elu" | "Selu" | "Clip" => {
                let x = self.runtime(need(0)?)?;
                let f = match op {
                    "LeakyRelu" => Unary::LeakyRelu(a.float("alpha", 0.01)? as f64),
                    "Elu" => Unary::Elu(a.float("alpha", 1.0)? as f64),
                    "Selu" => {
                        let (alpha, gamma) = (a.float("alpha", 1.673_263_2)?, a.float("gamma", 1.050_701)?);
                        if (alpha - 1.673_263_2).abs() > 1e-6 || (gamma - 1.050_701).abs() > 1e-6 {
                            return Err(err(format!("Selu with alpha {alpha} and gamma {gamma}: Stride has the standard constants only")));
                        }
                        Unary::Selu
                    }
                    _ => {
                        let bound = |i: usize, attr: &str, default: f32, a: &mut Attrs| -> Result<f32> {
                            match opt(i) {
                                Some(n) => {
                                    let t = self.const_f32(n, attr)?;
                                    t.data().first().copied().ok_or_else(|| err(format!("{attr} '{n}' is empty")))
                                }
                                None => a.float(attr, default),
                            }
                        };
                        let lo = bound(1, "min", f32::NEG_INFINITY, &mut a)?;
                        let hi = bound(2, "max", f32::INFINITY, &mut a)?;
                        if lo == 0.0 && hi == 6.0 {
                            Unary::Relu6
                        } else {
                            Unary::Clamp(lo as f64, hi as f64)
                        }
                    }
                };
                a.done()?;
                self.layer(node, None, Activation(f), x)
            }
            "Dropout" => {
                let x = self.runtime(need(0)?)?;
                let ratio = match opt(1) {
                    Some(n) => self.const_f32(n, "ratio")?.data().first().copied().unwrap_or(0.5),
                    None => a.float("ratio", 0.5)?,
                };
                if let Some(n) = opt(2) {
                    let training = match self.vals.get(n) {
                        Some(Val::Const(Const::F32(t))) => t.data().first().is_some_and(|v| *v != 0.0),
                        Some(Val::Const(Const::I64(d))) => d.first().is_some_and(|v| *v != 0),
                        _ => true,
                    };
                    if training {
                        return Err(err("training_mode true: Stride's dropout follows the run's mode, not an input"));
                    }
                }
                a.take("seed"); // the draws are Stride's own, seeded per run
                a.take("is_test"); // opset < 7
                a.done()?;
                if !(0.0..1.0).contains(&ratio) {
                    return Err(err(format!("ratio {ratio} must be in [0, 1)")));
                }
                self.layer(node, None, Dropout(ratio as f64), x)
            }
            "Identity" => {
                a.done()?;
                let src = need(0)?;
                let v = self.vals.get(src).cloned().ok_or_else(|| err(format!("input '{src}' is made by no earlier node")))?;
                if let Val::Runtime(id) = v {
                    // Read under two names now: no fused pattern may count its readers by one.
                    self.value_name.remove(&id);
                }
                let out = node.output.first().ok_or_else(|| err("Identity has no output"))?;
                self.vals.insert(out.clone(), v);
                return Ok(());
            }
            "Gemm" | "MatMul" => return self.product(node, &ins, a),
            "Add" if self.fuse_bias(node, &ins)? => return a.done(),
            "Mul" if self.fuse_silu(node, &ins)? || self.fuse_gelu(node, &ins)? => return a.done(),
            "Add" | "Sub" | "Mul" | "Div" => {
                a.done()?;
                let (x, y) = (self.value(need(0)?)?, self.value(need(1)?)?);
                let b = match op {
                    "Add" => BinOp::Add,
                    "Sub" => BinOp::Sub,
                    "Mul" => BinOp::Mul,
                    _ => BinOp::Div,
                };
                self.push(Step::Binary(b, x, y))
            }
            "Concat" => {
                let ax = a.take("axis").and_then(|x| x.i).ok_or_else(|| err("attribute axis is missing"))?;
                a.done()?;
                let ids = ins.iter().filter(|s| !s.is_empty()).map(|n| self.value(n)).collect::<Result<Vec<_>>>()?;
                if ids.is_empty() {
                    return Err(err("Concat has no inputs"));
                }
                self.push(Step::Concat(ids, ax))
            }
            "Flatten" => {
                let x = self.runtime(need(0)?)?;
                let axis = a.int("axis", 1)?;
                a.done()?;
                if axis == 1 {
                    self.layer(node, None, Flatten, x)
                } else {
                    self.push(Step::Flatten(x, axis))
                }
            }
            "Reshape" => {
                let x = self.runtime(need(0)?)?;
                let shape = match opt(1) {
                    Some(n) => self.int_pieces(n).ok_or_else(|| err(format!("shape '{n}' is not a list of integers")))?,
                    None => a.ints("shape").ok_or_else(|| err("the shape is missing"))?.into_iter().map(|i| Piece::One(Dim::Const(i))).collect(),
                };
                let allowzero = a.int("allowzero", 0)? != 0;
                if allowzero && shape.iter().any(|p| matches!(p, Piece::One(Dim::Const(0)))) {
                    return Err(err("allowzero 1 with a 0 in the shape (an empty tensor) is not supported"));
                }
                a.done()?;
                self.push(Step::Reshape(x, shape, allowzero))
            }
            "Transpose" => {
                let x = self.runtime(need(0)?)?;
                let perm = a.ints("perm");
                a.done()?;
                let perm = perm
                    .map(|perm| {
                        perm.iter()
                            .map(|&p| usize::try_from(p).map_err(|_| err(format!("perm {perm:?} has a negative entry"))))
                            .collect::<Result<Vec<_>>>()
                    })
                    .transpose()?;
                self.push(Step::Transpose(x, perm))
            }
            "Split" => return self.split(node, &ins, a),
            "Slice" => {
                let x = self.runtime(need(0)?)?;
                let (starts, ends, axes, steps) = if self.opset < 10 {
                    let list = |v: Option<Vec<i64>>| v.map(|v| v.into_iter().map(Dim::Const).collect::<Vec<_>>());
                    (list(a.ints("starts")), list(a.ints("ends")), a.ints("axes"), None)
                } else {
                    let axes = opt(3).map(|n| self.const_ints(n, "axes")).transpose()?;
                    let steps = opt(4).map(|n| self.const_ints(n, "steps")).transpose()?;
                    (Some(self.int_list(need(1)?, "starts")?), Some(self.int_list(need(2)?, "ends")?), axes, steps)
                };
                a.done()?;
                let (starts, ends) = (starts.ok_or_else(|| err("starts are missing"))?, ends.ok_or_else(|| err("ends are missing"))?);
                let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
                if starts.len() != ends.len() || axes.len() != starts.len() {
                    return Err(err(format!("{} starts, {} ends and {} axes", starts.len(), ends.len(), axes.len())));
                }
                if let Some(st) = steps.filter(|st| st.iter().any(|&v| v != 1)) {
                    return Err(err(format!("steps {st:?}: Stride slices with step 1")));
                }
                self.push(Step::Slice { input: x, axes, starts, ends })
            }
            "Unsqueeze" | "Squeeze" => {
                let x = self.runtime(need(0)?)?;
                let axes = match opt(1) {
                    Some(n) => Some(self.const_ints(n, "axes")?),
                    None => a.ints("axes"),
                };
                a.done()?;
                if op == "Unsqueeze" {
                    let axes = axes.ok_or_else(|| err("Unsqueeze needs axes"))?;
                    self.push(Step::Unsqueeze(x, axes))
                } else {
                    self.push(Step::Squeeze(x, axes))
                }
            }
            "Gelu" => {
                let x = self.runtime(need(0)?)?;
                let approximate = a.string("approximate").unwrap_or_else(|| "none".into());
                a.done()?;
                if approximate != "none" {
                    return Err(err(format!("approximate '{approximate}' is not supported: Stride's GELU is the exact (erf) one")));
                }
                self.layer(node, None, Activation(Unary::Gelu), x)
            }
            "HardSigmoid" => {
                // max(0, min(1, alpha x + beta)), as three of Stride's element-wise functions.
                let x = self.runtime(need(0)?)?;
                let (alpha, beta) = (a.float("alpha", 0.2)? as f64, a.float("beta", 0.5)? as f64);
                a.done()?;
                let scaled = self.layer(node, None, Activation(Unary::MulScalar(alpha)), x);
                let shifted = self.layer(node, None, Activation(Unary::AddScalar(beta)), scaled);
                self.layer(node, None, Activation(Unary::Clamp(0.0, 1.0)), shifted)
            }
            "LayerNormalization" => {
                let x = self.runtime(need(0)?)?;
                let sname = need(1)?;
                let scale = self.const_f32(sname, "scale")?;
                let bias = opt(2).map(|n| self.const_f32(n, "bias")).transpose()?;
                let axis = a.int("axis", -1)?;
                let eps = a.float("epsilon", 1e-5)? as f64;
                a.take("stash_type"); // Stride computes the statistics in f32 either way
                a.done()?;
                if bias.as_ref().is_some_and(|b| b.shape() != scale.shape()) {
                    return Err(err(format!(
                        "bias of shape {:?} for a scale of shape {:?}",
                        bias.as_ref().map(|b| b.shape().to_vec()),
                        scale.shape()
                    )));
                }
                let mut ln = LayerNorm::new(scale.shape(), eps)?;
                ln.weight = Var::parameter(scale);
                ln.bias = bias.map(Var::parameter);
                ln.begin_axis = Some(axis);
                self.layer(node, Some(sname), ln, x)
            }
            "Softmax" | "LogSoftmax" => {
                let x = self.runtime(need(0)?)?;
                let coerce = self.opset < 13;
                let axis = a.int("axis", if coerce { 1 } else { -1 })?;
                a.done()?;
                self.push(Step::Softmax { input: x, axis, log: op == "LogSoftmax", coerce })
            }
            "Pad" => {
                let x = self.runtime(need(0)?)?;
                let mode = a.string("mode").unwrap_or_else(|| "constant".into());
                if mode != "constant" {
                    return Err(err(format!("mode '{mode}' is not supported: Stride pads with a constant")));
                }
                let (pads, value) = if self.opset < 11 {
                    (a.ints("pads").ok_or_else(|| err("attribute pads is missing"))?, a.float("value", 0.0)?)
                } else {
                    let pads = self.const_ints(need(1)?, "pads")?;
                    let value = match opt(2) {
                        Some(n) => self.const_f32(n, "constant_value")?.data().first().copied().unwrap_or(0.0),
                        None => 0.0,
                    };
                    if opt(3).is_some() {
                        return Err(err("the axes input is not supported: give pads for every axis"));
                    }
                    (pads, value)
                };
                a.done()?;
                if pads.len() % 2 != 0 || pads.iter().any(|p| !(0..=MAX_WINDOW).contains(p)) {
                    return Err(err(format!("pads {pads:?}: Stride pads by 0 to {MAX_WINDOW}, a start and an end per axis")));
                }
                let r = pads.len() / 2;
                let pads = (0..r).map(|i| (pads[i] as usize, pads[i + r] as usize)).collect();
                self.push(Step::Pad { input: x, pads, value: value as f64 })
            }
            "Constant" => {
                let t = a.take("value").and_then(|v| v.t.clone());
                let c = match t {
                    Some(t) => read_const(&t)?,
                    None => match (a.take("value_float"), a.take("value_floats"), a.take("value_int"), a.take("value_ints")) {
                        (Some(f), ..) => Const::F32(Tensor::scalar(f.f.unwrap_or(0.0))),
                        (_, Some(f), ..) => Const::F32(Tensor::from_vec(f.floats.clone(), &[f.floats.len()])?),
                        (_, _, Some(i), _) => Const::I64(vec![i.i.unwrap_or(0)]),
                        (_, _, _, Some(i)) => Const::I64(i.ints.clone()),
                        _ => return Err(err("a Constant without a value Stride reads (value, value_float(s), value_int(s))")),
                    },
                };
                a.done()?;
                let out = node.output.first().ok_or_else(|| err("Constant has no output"))?;
                self.vals.insert(out.clone(), Val::Const(c));
                return Ok(());
            }
            _ => match unary_op(op) {
                Some(f) => {
                    let x = self.runtime(need(0)?)?;
                    a.done()?;
                    let y = self.layer(node, None, Activation(f), x);
                    if f == Unary::Sigmoid {
                        self.sigmoid_of.insert(y, x);
                    }
                    y
                }
                None => return Err(err(format!("operator {op} is not supported by Stride"))),
            },
        };
        self.set_output(node, id)
    }

    /// Records runtime value `id` as `node`'s (first) output.
    fn set_output(&mut self, node: &NodeProto, id: ValueId) -> Result<()> {
        let out = node.output.first().ok_or_else(|| err(format!("{} has no output", node.op_type.as_deref().unwrap_or("the node"))))?;
        self.vals.insert(out.clone(), Val::Runtime(id));
        self.value_name.insert(id, out.clone());
        Ok(())
    }

    /// Whether value `id` (a node's output) is read once, by the node being built (false for a
    /// value an Identity gave a second name).
    fn read_once(&self, id: ValueId) -> bool {
        self.value_name.get(&id).and_then(|n| self.uses.get(n)) == Some(&1)
    }

    /// The value of a one-element constant step.
    fn const_scalar(&self, id: ValueId) -> Option<f32> {
        match self.steps.get(id.checked_sub(1)?)? {
            Step::Const(v) if v.value().numel() == 1 => v.value().to_host().ok()?.data().first().copied(),
            _ => None,
        }
    }

    /// The operands of a binary step `op` as (runtime value, constant), either way round.
    fn with_const(&self, id: ValueId, op: BinOp) -> Option<(ValueId, f32)> {
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
    /// 0.5) (any order of the products' operands, or x times 1/sqrt 2 for the division), the
    /// intermediate values read by nothing else: one GELU layer of x. The chain's steps are left
    /// to the network, which skips steps nothing reads.
    fn fuse_gelu(&mut self, node: &NodeProto, ins: &[&str]) -> Result<bool> {
        let close = |v: f32, want: f64| (v as f64 - want).abs() <= 1e-5 * want.abs();
        let ids: Vec<Option<ValueId>> = ins.iter().map(|n| if let Some(Val::Runtime(id)) = self.vals.get(*n) { Some(*id) } else { None }).collect();
        let consts: Vec<Option<f32>> = ins
            .iter()
            .map(|n| match self.vals.get(*n) {
                Some(Val::Const(Const::F32(t))) if t.numel() == 1 => t.data().first().copied(),
                _ => None,
            })
            .collect();
        let m = match (ids.as_slice(), consts.as_slice()) {
            ([Some(m), None], [None, Some(h)]) | ([None, Some(m)], [Some(h), None]) if close(*h, 0.5) => *m,
            _ => return Ok(false),
        };
        let Some(Step::Binary(BinOp::Mul, u, v)) = self.steps.get(m - 1) else { return Ok(false) };
        let (u, v) = (*u, *v);
        for (x, sum) in [(u, v), (v, u)] {
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

    fn conv_opts(&self, a: &mut Attrs, w: &[usize]) -> Result<Conv2dOptions> {
        if let Some(k) = a.ints("kernel_shape") {
            if k.len() != 2 || k[0] as usize != w[2] || k[1] as usize != w[3] {
                return Err(err(format!("kernel_shape {k:?} does not match the weight's {:?}", &w[2..])));
            }
        }
        let stride = pair(a.ints("strides"), "strides", 1)?;
        let dilation = pair(a.ints("dilations"), "dilations", 1)?;
        let padding = padding(a.ints("pads"), a.string("auto_pad"))?;
        let groups = a.int("group", 1)?;
        if groups < 1 {
            return Err(err(format!("group {groups} must be at least 1")));
        }
        Ok(Conv2dOptions { stride, padding, dilation, groups: groups as usize, output_padding: (0, 0) })
    }

    /// Gemm and MatMul: a Linear layer when the second factor is a constant matrix, else a
    /// product step.
    fn product(&mut self, node: &NodeProto, ins: &[&str], mut a: Attrs) -> Result<()> {
        let op = node.op_type.as_deref().unwrap_or("");
        let get = |i: usize| ins.get(i).copied().filter(|s| !s.is_empty()).ok_or_else(|| err(format!("{op} needs input {i}")));
        let (alpha, beta, trans_a, trans_b) = if op == "Gemm" {
            (a.float("alpha", 1.0)?, a.float("beta", 1.0)?, a.int("transA", 0)? != 0, a.int("transB", 0)? != 0)
        } else {
            (1.0, 1.0, false, false)
        };
        a.take("broadcast"); // Gemm before opset 7 only
        a.done()?;
        if trans_a {
            return Err(err("transA 1 is not supported: Stride's dense layer takes rows of features"));
        }
        let bname = get(1)?;
        let b = match self.vals.get(bname) {
            Some(Val::Const(Const::F32(t))) if t.shape().len() == 2 => t.clone(),
            _ => {
                if op == "Gemm" || alpha != 1.0 {
                    return Err(err(format!("Gemm's B '{bname}' must be a constant matrix (Stride's dense layer)")));
                }
                let (x, y) = (self.value(get(0)?)?, self.value(bname)?);
                let id = self.push(Step::MatMul(x, y));
                return self.set_output(node, id);
            }
        };
        let x = self.runtime(get(0)?)?;
        // Linear's weight is [out, in]: B transposed unless transB.
        let w = if trans_b { b } else { b.permute(&[1, 0])? };
        let w = if alpha != 1.0 { w.map(|v| v * alpha) } else { w };
        let fout = w.shape()[0];
        let bias = match ins.get(2).copied().filter(|s| !s.is_empty()) {
            None => None,
            Some(cname) => {
                let c = self.const_f32(cname, "C")?;
                let c = match c.shape() {
                    [] | [1] | [1, 1] => Tensor::from_vec(vec![c.data()[0]; fout], &[fout])?,
                    [n] | [1, n] if *n == fout => c.reshape(&[fout])?,
                    s => return Err(err(format!("C of shape {s:?}: Stride's dense layer takes one bias per output ({fout})"))),
                };
                Some(if beta != 1.0 { c.map(|v| v * beta) } else { c })
            }
        };
        let wname = bname.to_string();
        let weight = Var::parameter(w);
        let bare = bias.is_none();
        let id = self.layer(node, Some(&wname), Linear { weight: weight.clone(), bias: bias.map(Var::parameter) }, x);
        if bare {
            self.bare_linear.insert(id, weight);
        }
        self.set_output(node, id)
    }

    /// Mul(x, Sigmoid(x)) or Mul(Sigmoid(x), x), the sigmoid read by nothing else: the sigmoid's
    /// step becomes a SiLU of x (one pass over the values instead of two and a product).
    fn fuse_silu(&mut self, node: &NodeProto, ins: &[&str]) -> Result<bool> {
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
    fn fuse_bias(&mut self, node: &NodeProto, ins: &[&str]) -> Result<bool> {
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

    fn split(&mut self, node: &NodeProto, ins: &[&str], mut a: Attrs) -> Result<()> {
        let x = self.runtime(ins.first().copied().unwrap_or(""))?;
        let axis = a.int("axis", 0)?;
        let sizes = match ins.get(1).copied().filter(|s| !s.is_empty()) {
            Some(n) => Some(self.const_ints(n, "split")?),
            None => a.ints("split"),
        };
        let parts = a.int("num_outputs", node.output.len() as i64)?;
        a.done()?;
        let Some(sizes) = sizes else {
            // Equal parts, the last one shorter when they do not come out even.
            if parts != node.output.len() as i64 || parts < 1 {
                return Err(err(format!("num_outputs {parts} for {} outputs", node.output.len())));
            }
            for (index, out) in node.output.iter().enumerate() {
                let id = self.push(Step::Chunk { input: x, axis, index, parts: parts as usize });
                if !out.is_empty() {
                    self.vals.insert(out.clone(), Val::Runtime(id));
                }
            }
            return Ok(());
        };
        if sizes.len() != node.output.len() || sizes.iter().any(|&s| s < 0) {
            return Err(err(format!("split sizes {sizes:?} for {} outputs", node.output.len())));
        }
        let mut start = 0;
        for (s, out) in sizes.iter().zip(&node.output) {
            let len = usize::try_from(*s).map_err(|_| err(format!("split size {s} is too large")))?;
            let id = self.push(Step::Narrow { input: x, axis, start, len });
            start = start.checked_add(len).ok_or_else(|| err(format!("split sizes {sizes:?} overflow")))?;
            if !out.is_empty() {
                self.vals.insert(out.clone(), Val::Runtime(id));
            }
        }
        Ok(())
    }
}
