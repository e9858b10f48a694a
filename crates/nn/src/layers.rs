//! Layers as modules over the core ops, configured with PyTorch's names.

use stride_autograd::{self as ag, BatchNormOptions, Conv2dOptions, Pool2dOptions, Rng, Tensor, Unary, Var};

use crate::export::{conv_attrs, pool_attrs, Attr, Graph, Value};
use crate::module::{call, join, visit_weight_bias, Ctx, Module, Slot};
use crate::trace::{Field, Scratch};
use crate::{init, Result};

/// 2-D convolution with a [out, in/groups, k, k] weight and an optional bias.
pub struct Conv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub opts: Conv2dOptions,
}

impl Conv2d {
    /// PyTorch's default initialisation.
    pub fn new(rng: &mut Rng, in_channels: usize, out_channels: usize, kernel: usize, opts: Conv2dOptions, bias: bool) -> Result<Self> {
        if opts.groups == 0 || !in_channels.is_multiple_of(opts.groups) {
            return Err(ag::Error::arg("Conv2d", format!("groups {} must divide the {in_channels} input channels", opts.groups)).into());
        }
        let (w, b) = init::torch_default(rng, &[out_channels, in_channels / opts.groups, kernel, kernel])?;
        Ok(Conv2d { weight: Var::parameter(w), bias: bias.then(|| Var::parameter(b)), opts })
    }
}

impl Module for Conv2d {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        Ok(ag::conv2d(x, &self.weight, self.bias.as_ref(), &self.opts)?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        visit_weight_bias(prefix, &self.weight, self.bias.as_ref(), f);
    }
    fn describe(&self) -> String {
        let s = self.weight.shape();
        format!("Conv2d({}, {}, k{}x{}{})", s[1] * self.opts.groups, s[0], s[2], s[3], options(&self.opts))
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = self.forward(&x.var, g.ctx())?;
        let attrs = conv_attrs(&self.weight.shape(), &self.opts, &x.shape(), &y.shape());
        let inputs = weight_bias(g, name, x, &self.weight, self.bias.as_ref());
        Ok(g.op("Conv", name, inputs, attrs, y))
    }
    fn macs(&self, _: &[usize], output: &[usize]) -> u64 {
        // Each output value is a dot product over (in / groups) x kh x kw weights.
        let s = self.weight.shape();
        output.iter().product::<usize>() as u64 * (s[1] * s[2] * s[3]) as u64
    }
    fn field(&self, input: Field, _: &[usize]) -> Field {
        let s = self.weight.shape();
        input.window((s[2], s[3]), self.opts.stride, self.opts.dilation)
    }
    fn scratch(&self, input: &[usize], _: &[usize]) -> Scratch {
        Scratch { per_image: 0, work: ag::conv2d_workspace(input, &self.weight.shape(), &self.opts).unwrap_or_default() }
    }
}

/// A weighted node's inputs: `x`, the weight and the bias, as initializers under `name`.
pub(crate) fn weight_bias(g: &mut Graph, name: &str, x: &Value, weight: &Var, bias: Option<&Var>) -> Vec<String> {
    let mut inputs = vec![x.name.clone(), g.param(&join(name, "weight"), weight.value())];
    if let Some(b) = bias {
        inputs.push(g.param(&join(name, "bias"), b.value()));
    }
    inputs
}

/// The options that differ from the defaults, compactly: `, stride 2, pad 1, groups 32`.
pub(crate) fn options(o: &Conv2dOptions) -> String {
    let pair = |(a, b): (usize, usize)| if a == b { a.to_string() } else { format!("{a}x{b}") };
    let mut out = String::new();
    if o.stride != (1, 1) {
        out += &format!(", stride {}", pair(o.stride));
    }
    match o.padding {
        ag::Padding::Valid | ag::Padding::Explicit { top: 0, bottom: 0, left: 0, right: 0 } => {}
        ag::Padding::Same => out += ", pad same",
        ag::Padding::SameLower => out += ", pad same_lower",
        ag::Padding::Explicit { top, bottom, left, right } if top == bottom && left == right => out += &format!(", pad {}", pair((top, left))),
        ag::Padding::Explicit { top, bottom, left, right } => out += &format!(", pad ({top}, {bottom}, {left}, {right})"),
    }
    if o.dilation != (1, 1) {
        out += &format!(", dilation {}", pair(o.dilation));
    }
    if o.groups != 1 {
        out += &format!(", groups {}", o.groups);
    }
    if o.output_padding != (0, 0) {
        out += &format!(", output padding {}", pair(o.output_padding));
    }
    out
}

/// y = x W^T + b with W [out, in].
pub struct Linear {
    pub weight: Var,
    pub bias: Option<Var>,
}

impl Linear {
    pub fn new(rng: &mut Rng, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let (w, b) = init::torch_default(rng, &[out_features, in_features])?;
        Ok(Linear { weight: Var::parameter(w), bias: bias.then(|| Var::parameter(b)) })
    }
}

impl Module for Linear {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        Ok(ag::linear(x, &self.weight, self.bias.as_ref())?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        visit_weight_bias(prefix, &self.weight, self.bias.as_ref(), f);
    }
    fn describe(&self) -> String {
        let s = self.weight.shape();
        format!("Linear({}, {})", s[1], s[0])
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = self.forward(&x.var, g.ctx())?;
        if x.shape().len() != 2 {
            // Rows of the last axis: MatMul by the weight transposed, then the bias.
            let wt = g.param(&join(name, "weight_t"), self.weight.value().permute(&[1, 0])?);
            let Some(b) = &self.bias else { return Ok(g.op("MatMul", name, vec![x.name.clone(), wt], vec![], y)) };
            let product = ag::linear(&x.var, &self.weight, None)?;
            let p = g.op("MatMul", &format!("{name}.matmul"), vec![x.name.clone(), wt], vec![], product);
            let bias = g.param(&join(name, "bias"), b.value());
            return Ok(g.op("Add", name, vec![p.name, bias], vec![], y));
        }
        let inputs = weight_bias(g, name, x, &self.weight, self.bias.as_ref());
        Ok(g.op("Gemm", name, inputs, vec![("transB", Attr::Int(1))], y))
    }
    fn macs(&self, _: &[usize], output: &[usize]) -> u64 {
        output.iter().product::<usize>() as u64 * self.weight.shape()[1] as u64
    }
    fn field(&self, input: Field, _: &[usize]) -> Field {
        input.whole()
    }
}

/// Batch normalisation over channels (BatchNorm1d for [N, C], BatchNorm2d for [N, C, H, W]).
///
/// Frozen (neither weight nor bias requires a gradient, as `stride train --freeze` leaves the
/// layers it names), it normalises by its running statistics in training too and leaves them
/// as they are: a frozen layer computes what it computed before, as Keras's non-trainable
/// `BatchNormalization` and torchvision's `FrozenBatchNorm2d` do. (PyTorch's plain
/// `requires_grad_(False)` keeps normalising by each batch and updating the statistics.)
pub struct BatchNorm {
    pub weight: Var,
    pub bias: Var,
    pub running_mean: Tensor<f32>,
    pub running_var: Tensor<f32>,
    /// Counted as PyTorch does: a scalar, saved as int64.
    pub num_batches_tracked: Tensor<f32>,
    pub opts: BatchNormOptions,
}

impl BatchNorm {
    /// With a different epsilon (GoogLeNet's 0.001).
    pub fn with_eps(channels: usize, eps: f64) -> Result<Self> {
        let mut bn = BatchNorm::new(channels)?;
        bn.opts.eps = eps;
        Ok(bn)
    }
    pub fn new(channels: usize) -> Result<Self> {
        Ok(BatchNorm {
            weight: Var::parameter(Tensor::ones(&[channels])?),
            bias: Var::parameter(Tensor::zeros(&[channels])?),
            running_mean: Tensor::zeros(&[channels])?,
            running_var: Tensor::ones(&[channels])?,
            num_batches_tracked: Tensor::scalar(0.0),
            opts: BatchNormOptions::default(),
        })
    }
}

impl Module for BatchNorm {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let training = ctx.training && (self.weight.requires_grad() || self.bias.requires_grad());
        if training {
            // A counter kept beside the statistics, stepped where it is: on a GPU, reading it
            // back would wait for all the work queued so far (in every layer, every step).
            if self.num_batches_tracked.device().is_cpu() {
                self.num_batches_tracked.data_mut()[0] += 1.0;
            } else {
                let stepped = ag::no_grad(|| Var::constant(self.num_batches_tracked.clone()).add_scalar(1.0))?;
                self.num_batches_tracked = stepped.value();
            }
        }
        Ok(ag::batch_norm_sync(
            x,
            &self.weight,
            &self.bias,
            &mut self.running_mean,
            &mut self.running_var,
            training,
            self.opts,
            ctx.sync_bn.as_ref(),
        )?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        f(join(prefix, "weight"), Slot::Param(&self.weight));
        f(join(prefix, "bias"), Slot::Param(&self.bias));
        f(join(prefix, "running_mean"), Slot::Buffer(&mut self.running_mean));
        f(join(prefix, "running_var"), Slot::Buffer(&mut self.running_var));
        f(join(prefix, "num_batches_tracked"), Slot::Buffer(&mut self.num_batches_tracked));
    }
    fn describe(&self) -> String {
        format!("BatchNorm({})", self.running_mean.numel())
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = self.forward(&x.var, g.ctx())?;
        let mut inputs = vec![x.name.clone()];
        for (part, t) in [
            ("weight", self.weight.value()),
            ("bias", self.bias.value()),
            ("running_mean", self.running_mean.clone()),
            ("running_var", self.running_var.clone()),
        ] {
            inputs.push(g.param(&join(name, part), t));
        }
        // ONNX's momentum weighs the running value, PyTorch's the new one.
        let attrs = vec![("epsilon", Attr::Float(self.opts.eps as f32)), ("momentum", Attr::Float(1.0 - self.opts.momentum as f32))];
        Ok(g.op("BatchNormalization", name, inputs, attrs, y))
    }
}

/// Layer normalisation (Ba, Kiros and Hinton; PyTorch's `nn.LayerNorm`, ONNX's
/// LayerNormalization): each sample normalised over its last axes, those the weight's shape
/// covers (its `normalized_shape`), to mean 0 and variance 1 (biased, plus `eps`), then scaled
/// by the weight and shifted by the bias. No running statistics: training and inference agree.
pub struct LayerNorm {
    pub weight: Var,
    pub bias: Option<Var>,
    pub eps: f64,
    /// ONNX's `axis`, where the normalised axes begin (negative: from the end). When set, an
    /// input whose rank puts it elsewhere than the weight's shape says is refused.
    pub begin_axis: Option<i64>,
}

impl LayerNorm {
    /// Normalises over trailing axes of `shape`: weight ones, bias zeros.
    pub fn new(shape: &[usize], eps: f64) -> Result<Self> {
        if shape.is_empty() || !(eps.is_finite() && eps >= 0.0) {
            return Err(
                ag::Error::arg("layer_norm", format!("normalises over at least one axis with eps >= 0; got shape {shape:?}, eps {eps}")).into()
            );
        }
        Ok(LayerNorm { weight: Var::parameter(Tensor::ones(shape)?), bias: Some(Var::parameter(Tensor::zeros(shape)?)), eps, begin_axis: None })
    }
}

impl Module for LayerNorm {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        let (s, w) = (x.shape(), self.weight.shape());
        let rank = s.len();
        if let Some(a) = self.begin_axis.filter(|_| rank >= w.len()) {
            let begin = if a < 0 { a + rank as i64 } else { a };
            if begin != (rank - w.len()) as i64 {
                return Err(ag::Error::shape(
                    "layer_norm",
                    format!("axis {a} of a {rank}-d input {s:?} starts elsewhere than the scale's shape {w:?} says"),
                )
                .into());
            }
        }
        Ok(ag::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps)?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        visit_weight_bias(prefix, &self.weight, self.bias.as_ref(), f);
    }
    fn describe(&self) -> String {
        format!("LayerNorm({:?})", self.weight.shape())
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        if g.opset < 17 {
            return Err(crate::export::unsupported(&format!("LayerNorm before opset 17 (asked for {})", g.opset)));
        }
        let y = self.forward(&x.var, g.ctx())?;
        let inputs = weight_bias(g, name, x, &self.weight, self.bias.as_ref());
        let axis = -(self.weight.shape().len() as i64);
        Ok(g.op("LayerNormalization", name, inputs, vec![("axis", Attr::Int(axis)), ("epsilon", Attr::Float(self.eps as f32))], y))
    }
}

/// Max or average pooling.
pub enum Pool {
    Max(Pool2dOptions),
    Avg(Pool2dOptions),
}

impl Module for Pool {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        Ok(match self {
            Pool::Max(o) => ag::max_pool2d(x, o)?,
            Pool::Avg(o) => ag::avg_pool2d(x, o)?,
        })
    }
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(String, Slot<'_>)) {}
    fn describe(&self) -> String {
        match self {
            Pool::Max(o) => format!("MaxPool2d({})", pool_options(o)),
            Pool::Avg(o) => format!("AvgPool2d({})", pool_options(o)),
        }
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = self.forward(&x.var, g.ctx())?;
        let (op, o, avg) = match self {
            Pool::Max(o) => ("MaxPool", o, false),
            Pool::Avg(o) => ("AveragePool", o, true),
        };
        let attrs = pool_attrs(o, &x.shape(), &y.shape(), avg);
        Ok(g.op(op, name, vec![x.name.clone()], attrs, y))
    }
    fn scratch(&self, _: &[usize], output: &[usize]) -> Scratch {
        // Max pooling writes the argmax of every output (u32) beside it, even in inference.
        match self {
            Pool::Max(_) => Scratch::per_image(output.iter().skip(1).product::<usize>() as u64 * 4),
            Pool::Avg(_) => Scratch::default(),
        }
    }
    fn field(&self, input: Field, _: &[usize]) -> Field {
        let (Pool::Max(o) | Pool::Avg(o)) = self;
        input.window(o.kernel, o.stride.unwrap_or(o.kernel), (1, 1))
    }
}

/// `k3, stride 2, pad 1, ceil`
pub(crate) fn pool_options(o: &Pool2dOptions) -> String {
    let conv = Conv2dOptions { stride: o.stride.unwrap_or(o.kernel), padding: o.padding, ..Conv2dOptions::default() };
    let (a, b) = o.kernel;
    let k = if a == b { a.to_string() } else { format!("{a}x{b}") };
    // Pooling's stride defaults to the kernel: always shown.
    let stride = if conv.stride == (1, 1) { ", stride 1" } else { "" };
    format!("k{k}{stride}{}{}", options(&conv), if o.ceil_mode { ", ceil" } else { "" })
}

/// An element-wise activation.
pub struct Activation(pub Unary);

impl Module for Activation {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        Ok(ag::ops::arith::unary(x, self.0)?)
    }
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(String, Slot<'_>)) {}
    fn describe(&self) -> String {
        self.0.name().to_string()
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        g.unary(self.0, name, x)
    }
}

/// [N, ...] -> [N, product of the rest].
pub struct Flatten;

impl Module for Flatten {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        Ok(x.flatten()?)
    }
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(String, Slot<'_>)) {}
    fn describe(&self) -> String {
        "Flatten".into()
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = self.forward(&x.var, g.ctx())?;
        Ok(g.op("Flatten", name, vec![x.name.clone()], vec![("axis", Attr::Int(1))], y))
    }
}

/// Dropout with probability p (identity in evaluation).
pub struct Dropout(pub f64);

impl Module for Dropout {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        Ok(ag::dropout(x, self.0, ctx.training, &mut ctx.rng)?)
    }
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(String, Slot<'_>)) {}
    fn describe(&self) -> String {
        format!("Dropout({})", self.0)
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        dropout(g, name, x, self.0)
    }
}

/// Dropout with ratio `p` (an identity in inference; fine-tuning an imported model drops again).
pub(crate) fn dropout(g: &mut Graph, name: &str, x: &Value, p: f64) -> Result<Value> {
    let ratio = g.scalar(&join(name, "ratio"), p as f32);
    Ok(g.op("Dropout", name, vec![x.name.clone(), ratio], vec![], x.var.clone()))
}

/// Layers applied in order. Children are named 0, 1, 2, ... as in PyTorch's `nn.Sequential`,
/// or by name (`conv1`, `layer1`, ...) as in a PyTorch module's attributes.
#[derive(Default)]
pub struct Sequential {
    pub layers: Vec<Box<dyn Module>>,
    /// One per layer: the name its parameters are saved under.
    pub names: Vec<String>,
}

impl Sequential {
    pub fn new() -> Self {
        Sequential::default()
    }
    /// Appends a layer named by its position.
    pub fn push(self, m: impl Module + 'static) -> Self {
        let name = self.layers.len().to_string();
        self.push_named(&name, m)
    }
    /// Appends a layer under `name`.
    pub fn push_named(mut self, name: &str, m: impl Module + 'static) -> Self {
        self.layers.push(Box::new(m));
        self.names.push(name.to_string());
        self
    }
    /// Appends a boxed layer named by its position.
    pub fn push_boxed(self, m: Box<dyn Module>) -> Self {
        let name = self.layers.len().to_string();
        self.push_named_boxed(&name, m)
    }
    /// Appends a boxed layer under `name`.
    pub fn push_named_boxed(mut self, name: &str, m: Box<dyn Module>) -> Self {
        self.layers.push(m);
        self.names.push(name.to_string());
        self
    }
}

impl Module for Sequential {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let mut h = x.clone();
        for (l, name) in self.layers.iter_mut().zip(&self.names) {
            h = call(l.as_mut(), name, &h, ctx)?;
        }
        Ok(h)
    }
    fn is_container(&self) -> bool {
        true
    }
    fn chain(&mut self) -> Option<crate::module::Chain<'_>> {
        Some((&mut self.layers, &self.names))
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        for (l, name) in self.layers.iter_mut().zip(&self.names) {
            l.visit(&join(prefix, name), f);
        }
    }
    fn describe(&self) -> String {
        format!("Sequential({} layers)", self.layers.len())
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let mut h = x.clone();
        for (l, child) in self.layers.iter_mut().zip(&self.names) {
            h = g.child(l.as_mut(), name, child, &h)?;
        }
        Ok(h)
    }
}

impl std::fmt::Debug for Sequential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.layers.iter().map(|l| l.describe())).finish()
    }
}
