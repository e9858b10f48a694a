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

use crate::indices::IntTensor;
use crate::network::{BinOp, Dim, Network, Piece, Reduce, Step, ValueId};
use crate::pad::PadMode;
use crate::proto::{attribute_proto::AttributeType, type_proto, AttributeProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use crate::tensor::{read_const, type_name, Const};
use crate::{err, Result};

mod fold;
mod fuse;
mod indices;
mod lift;
mod masks;
mod operators;
mod resize;
mod shapes;

pub use operators::OPERATORS;

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
    if let Some(missing) = operators::unsupported(graph) {
        return Err(err(missing));
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
        b.node_or_fold(node).map_err(|e| e.context(format!("node {name} ({}, opset {opset})", node.op_type.as_deref().unwrap_or(""))))?;
    }
    let Some(first) = graph.output.first() else {
        return Err(err("the graph declares no output"));
    };
    let output_shape = tensor_shape(first).unwrap_or_default();
    let names: Vec<&str> = graph.output.iter().map(|o| o.name.as_deref().unwrap_or("")).collect();
    b.make_fills(&names);
    let mut outputs = Vec::with_capacity(graph.output.len());
    for output in &graph.output {
        let out_name = output.name.as_deref().unwrap_or("");
        match b.vals.get(out_name) {
            Some(Val::Runtime(id)) => outputs.push((out_name.to_string(), *id)),
            Some(Val::Const(_) | Val::Ints(_) | Val::Indices(_) | Val::Fill(..)) => {
                return Err(err(format!("the graph's output '{out_name}' is a constant or computed from shapes")))
            }
            None => return Err(err(format!("the graph's output '{out_name}' is made by no node"))),
        }
    }
    Ok(Imported {
        network: Network::new(b.steps, outputs, input_shape, output_shape),
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
    /// An integer tensor computed from shapes (Gather's indices).
    Indices(IntTensor),
    /// One value filling a shape computed as the network runs, and what the value is
    /// (ConstantOfShape of such a shape; made into data where data reads it).
    Fill(Vec<Piece>, f64, masks::Kind),
}

/// What an error says of a value computed from shapes used where data is expected.
const SHAPE_AS_DATA: &str =
    "is computed from the shapes of the values flowing through; Stride uses such integers only as shapes (Reshape), bounds (Slice) and indices (Gather)";

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
        "Sin" => Unary::Sin,
        "Cos" => Unary::Cos,
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
            Some(Val::Ints(_) | Val::Indices(_) | Val::Fill(..)) => Err(err(format!("input '{name}' {SHAPE_AS_DATA}"))),
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
            Some(Val::Const(Const::Bool(..))) => Err(err(format!("input '{name}' holds booleans; Stride computes in float32"))),
            Some(Val::Ints(_) | Val::Indices(_) | Val::Fill(..)) => Err(err(format!("input '{name}' {SHAPE_AS_DATA}"))),
            None => Err(err(format!("input '{name}' is made by no earlier node"))),
        }
    }
    fn const_f32(&self, name: &str, what: &str) -> Result<Tensor<f32>> {
        match self.vals.get(name) {
            Some(Val::Const(Const::F32(t))) => Ok(t.clone()),
            Some(Val::Const(Const::I64(..))) => Err(err(format!("{what} '{name}' holds integers, not float32"))),
            Some(Val::Const(Const::Bool(..))) => Err(err(format!("{what} '{name}' holds booleans, not float32"))),
            Some(Val::Runtime(_)) => Err(err(format!("{what} '{name}' is computed in the graph; Stride needs it as a constant (an initializer)"))),
            Some(Val::Ints(_) | Val::Indices(_) | Val::Fill(..)) => Err(err(format!("{what} '{name}' {SHAPE_AS_DATA}"))),
            None => Err(err(format!("{what} '{name}' is made by no earlier node"))),
        }
    }
    fn const_ints(&self, name: &str, what: &str) -> Result<Vec<i64>> {
        match self.vals.get(name) {
            Some(Val::Const(Const::I64(d, _))) => Ok(d.clone()),
            Some(Val::Const(Const::F32(_))) => Err(err(format!("{what} '{name}' holds floats, not integers"))),
            Some(Val::Const(Const::Bool(..))) => Err(err(format!("{what} '{name}' holds booleans, not integers"))),
            Some(Val::Runtime(_) | Val::Ints(_) | Val::Indices(_) | Val::Fill(..)) => {
                Err(err(format!("{what} '{name}' is computed in the graph; Stride needs it as a constant")))
            }
            None => Err(err(format!("{what} '{name}' is made by no earlier node"))),
        }
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
        // Outputs beyond the first must go unread (Dropout's mask, MaxPool's indices, BN's and
        // LayerNormalization's statistics).
        let read_extra = node.output.iter().skip(1).find(|o| !o.is_empty() && self.uses.get(o.as_str()).is_some_and(|&n| n > 0));
        if let (Some(o), false) = (read_extra, op == "Split") {
            return Err(err(format!("{op} with {} outputs: Stride gives the first only, and '{o}' is read", node.output.len())));
        }
        if self.one_d_node(node)? {
            return Ok(());
        }
        if self.mask_node(node, &ins, &mut a)? {
            return a.done();
        }
        self.make_fills(&ins);
        if self.fold_node(node, &ins, &mut a)? || self.index_node(node, &ins, &mut a)? || self.shape_node(node, &ins, &mut a)? {
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
            "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceSum" | "ReduceL1" | "ReduceL2" | "ReduceSumSquare" => {
                let x = self.runtime(need(0)?)?;
                let axes = match opt(1) {
                    Some(n) => Some(self.const_ints(n, "axes")?),
                    None => a.ints("axes"),
                };
                let keep = a.int("keepdims", 1)? != 0;
                let noop = a.int("noop_with_empty_axes", 0)? != 0;
                a.done()?;
                let axes = axes.filter(|a| !a.is_empty());
                if axes.is_none() && noop {
                    // No axes and noop_with_empty_axes: the input as it is.
                    return self.set_output(node, x);
                }
                let mut sorted = axes.clone().unwrap_or_default();
                sorted.sort();
                let global = (sorted == [2, 3] || sorted == [-2, -1]) && matches!(op, "ReduceMean" | "ReduceMax");
                if global {
                    // Global pooling (PyTorch's newer exporter writes adaptive_avg_pool2d(1)
                    // this way): Stride's pooling layer.
                    let m = if op == "ReduceMean" { OtherPool::GlobalAvg } else { OtherPool::GlobalMax };
                    let pooled = self.layer(node, None, m, x);
                    if keep {
                        pooled
                    } else {
                        self.push(Step::Flatten(pooled, 1))
                    }
                } else {
                    let how = match op {
                        "ReduceMean" => Reduce::Mean,
                        "ReduceMax" => Reduce::Max,
                        "ReduceMin" => Reduce::Min,
                        "ReduceSum" => Reduce::Sum,
                        "ReduceL1" => Reduce::L1,
                        "ReduceL2" => Reduce::L2,
                        _ => Reduce::SumSquare,
                    };
                    self.push(Step::Reduce { input: x, how, axes, keep })
                }
            }
            "Resize" | "Upsample" => return self.resize(node, &ins, a),
            "Expand" => {
                let x = self.value(need(0)?)?;
                let n = need(1)?;
                let shape = self.int_pieces(n).ok_or_else(|| err(format!("shape '{n}' is not a list of integers")))?;
                a.done()?;
                self.push(Step::Expand(x, shape))
            }
            "Where" => {
                // A condition known when the file is read (masks the new exporter writes);
                // one computed from the data would need comparisons Stride does not have.
                let c = need(0)?;
                let (cond, dims) = match self.vals.get(c) {
                    Some(Val::Const(Const::Bool(v, d))) => (v.clone(), d.clone()),
                    Some(Val::Runtime(_)) => {
                        return Err(err(format!("Where's condition '{c}' is computed from the data; Stride selects by a constant condition only")))
                    }
                    Some(_) => return Err(err(format!("Where's condition '{c}' is not a boolean constant"))),
                    None => return Err(err(format!("condition '{c}' is made by no earlier node"))),
                };
                a.done()?;
                let (x, y) = (self.value(need(1)?)?, self.value(need(2)?)?);
                self.push(Step::Where { cond, dims, x, y })
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
                a.take("spatial"); // opset < 9: 1 (per channel) is the only form Stride has
                let training = a.int("training_mode", 0)? != 0;
                a.done()?;
                if training {
                    // The statistics of the values at hand, whatever the run's mode (the running
                    // ones it would update are outputs nothing may read).
                    let (scale, bias) = (Var::constant(parts[0].clone()), Var::constant(parts[1].clone()));
                    self.push(Step::Normalize { input: x, over_batch: true, scale, bias, eps })
                } else {
                    let mut bn = BatchNorm::new(c)?;
                    bn.weight = Var::parameter(parts[0].clone());
                    bn.bias = Var::parameter(parts[1].clone());
                    bn.running_mean = parts[2].clone();
                    bn.running_var = parts[3].clone();
                    bn.opts = BatchNormOptions { eps, momentum: 1.0 - momentum };
                    let wname = need(1)?.to_string();
                    self.layer(node, Some(&wname), bn, x)
                }
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
                        Some(Val::Const(Const::I64(d, _))) => d.first().is_some_and(|v| *v != 0),
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
            "Cast" => {
                // Of the data flowing through (integers are cast by the shape and index rules):
                // to float32 it is what it was, read under a second name (as Identity).
                let x = self.runtime(need(0)?)?;
                let to = a.int("to", 0)?;
                a.take("saturate");
                a.done()?;
                if to != 1 {
                    return Err(err(format!("Cast of the data to {}: Stride computes in float32", type_name(to as i32))));
                }
                self.value_name.remove(&x);
                let out = node.output.first().ok_or_else(|| err("Cast has no output"))?;
                self.vals.insert(out.clone(), Val::Runtime(x));
                return Ok(());
            }
            "Gather" | "GatherND" => {
                // The shape and index rules took every form Stride has: data flowing through
                // (or a shape) by integer indices.
                let x = need(0)?;
                self.runtime(x)?;
                let i = need(1)?;
                return Err(err(format!("indices '{i}' are not integers")));
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
                let steps = steps.unwrap_or_else(|| vec![1; axes.len()]);
                if steps.len() != axes.len() || steps.iter().any(|&v| v < 1) {
                    return Err(err(format!("steps {steps:?} for {} axes: Stride slices forwards, a step of 1 or more per axis", axes.len())));
                }
                let steps = steps.iter().map(|&v| usize::try_from(v).unwrap_or(usize::MAX)).collect();
                self.push(Step::Slice { input: x, axes, starts, ends, steps })
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
            "InstanceNormalization" => {
                let x = self.runtime(need(0)?)?;
                let (scale, bias) = (self.const_f32(need(1)?, "scale")?, self.const_f32(need(2)?, "bias")?);
                let eps = a.float("epsilon", 1e-5)? as f64;
                a.done()?;
                if scale.shape().len() != 1 || bias.shape() != scale.shape() {
                    return Err(err(format!("scale of shape {:?} and bias of shape {:?}: both must be [C]", scale.shape(), bias.shape())));
                }
                self.push(Step::Normalize { input: x, over_batch: false, scale: Var::constant(scale), bias: Var::constant(bias), eps })
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
                let mode = PadMode::parse(&mode, value as f64)
                    .ok_or_else(|| err(format!("mode '{mode}' is not one of ONNX's (constant, reflect, edge, wrap)")))?;
                self.push(Step::Pad { input: x, pads, mode })
            }
            "Mod" => return Err(err("Mod of float data: Stride takes Mod of integers computed from shapes (a window's padding)")),
            "ConstantOfShape" => {
                // Constant shapes were worked out by `fold_node`.
                return Err(err(format!("ConstantOfShape of '{}': Stride fills a shape known from constants only", opt(0).unwrap_or(""))));
            }
            "Constant" => {
                let t = a.take("value").and_then(|v| v.t.clone());
                let c = match t {
                    Some(t) => read_const(&t)?,
                    None => match (a.take("value_float"), a.take("value_floats"), a.take("value_int"), a.take("value_ints")) {
                        (Some(f), ..) => Const::F32(Tensor::scalar(f.f.unwrap_or(0.0))),
                        (_, Some(f), ..) => Const::F32(Tensor::from_vec(f.floats.clone(), &[f.floats.len()])?),
                        (_, _, Some(i), _) => Const::I64(vec![i.i.unwrap_or(0)], vec![]),
                        (_, _, _, Some(i)) => Const::I64(i.ints.clone(), vec![i.ints.len()]),
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
