//! More layers: transposed and depthwise-separable convolution, the other poolings, 2-D
//! dropout, padding, and the blocks later models need (residual add, channel concat).

use stride_autograd::{self as ag, Conv2dOptions, Pool2dOptions, Rng, Unary, Var};

use crate::export::{conv_transpose_attrs, unsupported, Attr, Graph, Value};
use crate::layers::{dropout, weight_bias, Conv2d};
use crate::module::{call, join, visit_weight_bias, Ctx, Module, Slot};
use crate::trace::{Field, Scratch};
use crate::{init, Result};

/// Transposed convolution with PyTorch's [in, out/groups, k, k] weight.
pub struct ConvTranspose2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub opts: Conv2dOptions,
}

impl ConvTranspose2d {
    pub fn new(rng: &mut Rng, in_channels: usize, out_channels: usize, kernel: usize, opts: Conv2dOptions, bias: bool) -> Result<Self> {
        if opts.groups == 0 || !out_channels.is_multiple_of(opts.groups) || !in_channels.is_multiple_of(opts.groups) {
            return Err(ag::Error::arg("ConvTranspose2d", format!("groups {} must divide {in_channels} and {out_channels}", opts.groups)).into());
        }
        // PyTorch computes the fan-in of a transposed convolution's weight from its dim 1.
        let shape = [in_channels, out_channels / opts.groups, kernel, kernel];
        let (w, _) = init::torch_default(rng, &shape)?;
        let bound = 1.0 / (init::fans(&shape).0 as f64).sqrt();
        let b = rng.uniform(&[out_channels], -bound, bound)?;
        Ok(ConvTranspose2d { weight: Var::parameter(w), bias: bias.then(|| Var::parameter(b)), opts })
    }
}

impl Module for ConvTranspose2d {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        Ok(ag::conv_transpose2d(x, &self.weight, self.bias.as_ref(), &self.opts)?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        visit_weight_bias(prefix, &self.weight, self.bias.as_ref(), f);
    }
    fn describe(&self) -> String {
        let s = self.weight.shape();
        format!("ConvTranspose2d({}, {}, k{}x{}{})", s[0], s[1] * self.opts.groups, s[2], s[3], crate::layers::options(&self.opts))
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = self.forward(&x.var, g.ctx())?;
        let attrs = conv_transpose_attrs(&self.weight.shape(), &self.opts);
        let inputs = weight_bias(g, name, x, &self.weight, self.bias.as_ref());
        Ok(g.op("ConvTranspose", name, inputs, attrs, y))
    }
    fn macs(&self, input: &[usize], _: &[usize]) -> u64 {
        // Each input value is scattered into (out / groups) x kh x kw outputs.
        let s = self.weight.shape();
        input.iter().product::<usize>() as u64 * (s[1] * s[2] * s[3]) as u64
    }
    fn field(&self, input: Field, _: &[usize]) -> Field {
        let s = self.weight.shape();
        input.transposed((s[2], s[3]), self.opts.stride, self.opts.dilation)
    }
    fn scratch(&self, input: &[usize], _: &[usize]) -> Scratch {
        Scratch { per_image: 0, work: ag::conv_transpose2d_workspace(input, &self.weight.shape(), &self.opts).unwrap_or_default() }
    }
}

/// Depthwise (groups = channels) then pointwise 1x1 convolution: MobileNet's and Xception's
/// separable convolution. Children are `depthwise` and `pointwise`.
pub struct DepthwiseSeparableConv2d {
    pub depthwise: Conv2d,
    pub pointwise: Conv2d,
}

impl DepthwiseSeparableConv2d {
    pub fn new(rng: &mut Rng, in_channels: usize, out_channels: usize, kernel: usize, opts: Conv2dOptions, bias: bool) -> Result<Self> {
        Ok(DepthwiseSeparableConv2d {
            depthwise: Conv2d::new(rng, in_channels, in_channels, kernel, Conv2dOptions { groups: in_channels, ..opts }, bias)?,
            pointwise: Conv2d::new(rng, in_channels, out_channels, 1, Conv2dOptions::default(), bias)?,
        })
    }
}

impl Module for DepthwiseSeparableConv2d {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let h = self.depthwise.forward(x, ctx)?;
        self.pointwise.forward(&h, ctx)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        self.depthwise.visit(&join(prefix, "depthwise"), f);
        self.pointwise.visit(&join(prefix, "pointwise"), f);
    }
    fn describe(&self) -> String {
        format!("DepthwiseSeparable({}, {})", self.depthwise.describe(), self.pointwise.describe())
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let h = self.depthwise.export(g, &join(name, "depthwise"), x)?;
        self.pointwise.export(g, &join(name, "pointwise"), &h)
    }
    fn macs(&self, input: &[usize], output: &[usize]) -> u64 {
        // The depthwise output has the input's channels and the output's spatial size.
        let mid = [output[0], input[1], output[2], output[3]];
        self.depthwise.macs(input, &mid) + self.pointwise.macs(&mid, output)
    }
    fn field(&self, input: Field, shape: &[usize]) -> Field {
        self.depthwise.field(input, shape)
    }
}

/// The poolings without parameters beyond max/avg.
pub enum OtherPool {
    /// Power-average pooling with norm p.
    Lp(f64, Pool2dOptions),
    /// To a fixed output size.
    AdaptiveAvg(usize, usize),
    AdaptiveMax(usize, usize),
    /// To 1x1.
    GlobalAvg,
    GlobalMax,
    /// Max over windows of `depth` channels, moving by `stride`.
    ChannelMax {
        depth: usize,
        stride: usize,
    },
}

impl Module for OtherPool {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        Ok(match self {
            OtherPool::Lp(p, o) => ag::lp_pool2d(x, *p, o)?,
            OtherPool::AdaptiveAvg(h, w) => ag::adaptive_avg_pool2d(x, (*h, *w))?,
            OtherPool::AdaptiveMax(h, w) => ag::adaptive_max_pool2d(x, (*h, *w))?,
            // A 1-d map [N, C, L] (ONNX's global pooling takes any rank) as one of height 1.
            OtherPool::GlobalAvg | OtherPool::GlobalMax if x.shape().len() == 3 => {
                let s = x.shape();
                let x = x.reshape(&[s[0], s[1], 1, s[2]])?;
                let y = if matches!(self, OtherPool::GlobalAvg) { ag::global_avg_pool2d(&x)? } else { ag::global_max_pool2d(&x)? };
                y.reshape(&[s[0], s[1], 1])?
            }
            OtherPool::GlobalAvg => ag::global_avg_pool2d(x)?,
            OtherPool::GlobalMax => ag::global_max_pool2d(x)?,
            OtherPool::ChannelMax { depth, stride } => ag::channel_max_pool(x, *depth, *stride)?,
        })
    }
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(String, Slot<'_>)) {}
    fn describe(&self) -> String {
        match self {
            OtherPool::Lp(p, o) => format!("LpPool2d(p {p}, {})", crate::layers::pool_options(o)),
            OtherPool::AdaptiveAvg(h, w) => format!("AdaptiveAvgPool2d({h}, {w})"),
            OtherPool::AdaptiveMax(h, w) => format!("AdaptiveMaxPool2d({h}, {w})"),
            OtherPool::GlobalAvg => "GlobalAvgPool2d".into(),
            OtherPool::GlobalMax => "GlobalMaxPool2d".into(),
            OtherPool::ChannelMax { depth, stride } => {
                format!("ChannelMaxPool(depth {depth}, stride {stride})")
            }
        }
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = self.forward(&x.var, g.ctx())?;
        let xi = vec![x.name.clone()];
        let (xs, ys) = (x.shape(), y.shape());
        Ok(match self {
            OtherPool::Lp(p, o) if p.fract() == 0.0 && *p >= 1.0 => {
                let mut attrs = crate::export::pool_attrs(o, &xs, &ys, false);
                attrs.retain(|(k, _)| *k != "ceil_mode" || o.ceil_mode);
                attrs.push(("p", Attr::Int(*p as i64)));
                g.op("LpPool", name, xi, attrs, y)
            }
            OtherPool::GlobalAvg => g.op("GlobalAveragePool", name, xi, vec![], y),
            OtherPool::GlobalMax => g.op("GlobalMaxPool", name, xi, vec![], y),
            OtherPool::AdaptiveAvg(..) | OtherPool::AdaptiveMax(..) if ys[2] == 1 && ys[3] == 1 => {
                let op = if matches!(self, OtherPool::AdaptiveAvg(..)) { "GlobalAveragePool" } else { "GlobalMaxPool" };
                g.op(op, name, xi, vec![], y)
            }
            // An adaptive pool whose output divides the input is a plain pool with a fixed window.
            OtherPool::AdaptiveAvg(oh, ow) | OtherPool::AdaptiveMax(oh, ow) if xs[2] % *oh == 0 && xs[3] % *ow == 0 => {
                let (kh, kw) = (xs[2] / *oh, xs[3] / *ow);
                let avg = matches!(self, OtherPool::AdaptiveAvg(..));
                let o = Pool2dOptions { kernel: (kh, kw), ..Pool2dOptions::new(1) };
                let attrs = crate::export::pool_attrs(&o, &xs, &ys, avg);
                g.op(if avg { "AveragePool" } else { "MaxPool" }, name, xi, attrs, y)
            }
            _ => return Err(unsupported(&format!("{} on a {}x{} input", self.describe(), xs.get(2).unwrap_or(&0), xs.get(3).unwrap_or(&0)))),
        })
    }
    fn field(&self, input: Field, shape: &[usize]) -> Field {
        let (h, w) = match shape {
            [_, _, h, w] => (*h, *w),
            _ => return input,
        };
        // An adaptive window to (oh, ow) spans up to ceil(h / oh) rows, moving by about h / oh.
        let adaptive = |oh: usize, ow: usize| {
            let (oh, ow) = (oh.max(1), ow.max(1));
            input.window((h.div_ceil(oh), w.div_ceil(ow)), ((h / oh).max(1), (w / ow).max(1)), (1, 1))
        };
        match self {
            OtherPool::Lp(_, o) => input.window(o.kernel, o.stride.unwrap_or(o.kernel), (1, 1)),
            OtherPool::AdaptiveAvg(oh, ow) | OtherPool::AdaptiveMax(oh, ow) => adaptive(*oh, *ow),
            OtherPool::GlobalAvg | OtherPool::GlobalMax => adaptive(1, 1),
            OtherPool::ChannelMax { .. } => input,
        }
    }
}

/// Drops whole channels with probability p in training.
pub struct Dropout2d(pub f64);

impl Module for Dropout2d {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        Ok(ag::dropout2d(x, self.0, ctx.training, &mut ctx.rng)?)
    }
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(String, Slot<'_>)) {}
    fn describe(&self) -> String {
        format!("Dropout2d({})", self.0)
    }
    /// Written as ONNX's Dropout (which drops elements, not channels): the same in inference.
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        dropout(g, name, x, self.0)
    }
}

/// Constant padding of the two spatial axes: (top, bottom, left, right).
pub struct Pad {
    pub pad: (usize, usize, usize, usize),
    pub value: f64,
}

impl Module for Pad {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> Result<Var> {
        let (t, b, l, r) = self.pad;
        Ok(x.pad(&[(t, b), (l, r)], self.value)?)
    }
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(String, Slot<'_>)) {}
    fn describe(&self) -> String {
        format!("Pad{:?}", self.pad)
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = self.forward(&x.var, g.ctx())?;
        let (t, b, l, r) = self.pad;
        let rank = x.shape().len();
        // ONNX's pads: every axis's start, then every axis's end; only the last two are padded.
        let mut pads = vec![0i64; 2 * rank];
        pads[rank - 2] = t as i64;
        pads[rank - 1] = l as i64;
        pads[2 * rank - 2] = b as i64;
        pads[2 * rank - 1] = r as i64;
        let pads = g.ints(&join(name, "pads"), pads);
        let value = g.scalar(&join(name, "value"), self.value as f32);
        Ok(g.op("Pad", name, vec![x.name.clone(), pads, value], vec![], y))
    }
}

/// y = post(body(x) + shortcut(x)), identity shortcut when `shortcut` is None: ResNet's and
/// MobileNet v2's blocks. Children are named `body` and `shortcut` unless renamed; an empty
/// body name puts the body's parameters directly under the block (torchvision's `conv1`, `bn1`,
/// ..., `downsample`).
pub struct Residual {
    pub body: Box<dyn Module>,
    pub shortcut: Option<Box<dyn Module>>,
    pub body_name: String,
    pub shortcut_name: String,
    /// Applied after the sum (ResNet's final relu).
    pub post: Option<Unary>,
}

impl Residual {
    pub fn new(body: Box<dyn Module>, shortcut: Option<Box<dyn Module>>) -> Self {
        Residual { body, shortcut, body_name: "body".into(), shortcut_name: "shortcut".into(), post: None }
    }
    /// Renames the children.
    pub fn named(mut self, body: &str, shortcut: &str) -> Self {
        self.body_name = body.into();
        self.shortcut_name = shortcut.into();
        self
    }
    /// Applies `f` to the sum.
    pub fn then(mut self, f: Unary) -> Self {
        self.post = Some(f);
        self
    }
}

impl Module for Residual {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let y = call(self.body.as_mut(), &self.body_name, x, ctx)?;
        let s = match &mut self.shortcut {
            Some(m) => call(m.as_mut(), &self.shortcut_name, x, ctx)?,
            None => x.clone(),
        };
        if y.shape() != s.shape() {
            let e: crate::Error =
                ag::Error::shape("Residual", format!("the block gives {:?} but the shortcut gives {:?}", y.shape(), s.shape())).into();
            return Err(e.context(format!("layer {} ({})", ctx.path(), self.describe())));
        }
        let before = ag::tape_bytes();
        let sum = y.add(&s)?;
        let out = match self.post {
            Some(f) => ag::ops::arith::unary(&sum, f)?,
            None => sum,
        };
        let what = || self.post.map_or("add".to_string(), |f| format!("add, {}", f.name()));
        ctx.record_merge(what, &[&y, &s], &out, before, self.post.is_some());
        Ok(out)
    }
    fn is_container(&self) -> bool {
        true
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        self.body.visit(&join(prefix, &self.body_name), f);
        if let Some(s) = &mut self.shortcut {
            s.visit(&join(prefix, &self.shortcut_name), f);
        }
    }
    fn describe(&self) -> String {
        format!("Residual({})", self.body.describe())
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let y = g.child(self.body.as_mut(), name, &self.body_name, x)?;
        let s = match &mut self.shortcut {
            Some(m) => g.child(m.as_mut(), name, &self.shortcut_name, x)?,
            None => x.clone(),
        };
        let sum = y.var.add(&s.var)?;
        let sum = g.op("Add", &join(name, "add"), vec![y.name, s.name], vec![], sum);
        match self.post {
            Some(f) => g.unary(f, &join(name, f.name()), &sum),
            None => Ok(sum),
        }
    }
}

/// Runs every branch on the same input and concatenates the results along channels:
/// Inception's blocks. Children are named 0, 1, ... unless named.
pub struct Concat {
    pub branches: Vec<Box<dyn Module>>,
    pub names: Vec<String>,
}

impl Concat {
    pub fn new(branches: Vec<Box<dyn Module>>) -> Self {
        let names = (0..branches.len()).map(|i| i.to_string()).collect();
        Concat { branches, names }
    }
    /// Branches with names (`branch1`, `branch2`, ...).
    pub fn named(branches: Vec<(&str, Box<dyn Module>)>) -> Self {
        let (names, branches) = branches.into_iter().map(|(n, b)| (n.to_string(), b)).unzip();
        Concat { branches, names }
    }
}

impl Module for Concat {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let outs: Vec<Var> = self.branches.iter_mut().zip(&self.names).map(|(b, name)| call(b.as_mut(), name, x, ctx)).collect::<Result<_>>()?;
        let refs: Vec<&Var> = outs.iter().collect();
        let before = ag::tape_bytes();
        let out = ag::concat(&refs, 1).map_err(|e| crate::Error::from(e).context(format!("layer {} ({})", ctx.path(), self.describe())))?;
        ctx.record_merge(|| "concat".into(), &refs, &out, before, false);
        Ok(out)
    }
    fn is_container(&self) -> bool {
        true
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        for (b, name) in self.branches.iter_mut().zip(&self.names) {
            b.visit(&join(prefix, name), f);
        }
    }
    fn describe(&self) -> String {
        format!("Concat({} branches)", self.branches.len())
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let outs: Vec<Value> = self.branches.iter_mut().zip(&self.names).map(|(b, n)| g.child(b.as_mut(), name, n, x)).collect::<Result<_>>()?;
        concat(g, &join(name, "concat"), &outs)
    }
}

/// Concat along channels of values already in the graph.
pub fn concat(g: &mut Graph, name: &str, parts: &[Value]) -> Result<Value> {
    let vars: Vec<&Var> = parts.iter().map(|p| &p.var).collect();
    let y = ag::concat(&vars, 1)?;
    Ok(g.op("Concat", name, parts.iter().map(|p| p.name.clone()).collect(), vec![("axis", Attr::Int(1))], y))
}

/// DenseNet's dense block: layer i sees the channel concatenation of the block's input and
/// every earlier layer's output; the block returns the concatenation of all of them.
pub struct DenseBlock {
    pub layers: Vec<Box<dyn Module>>,
    pub names: Vec<String>,
}

impl Module for DenseBlock {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let mut feats = vec![x.clone()];
        // The concatenation of `feats`, recorded as the input of layer `next` (or the output).
        let concat = |feats: &[Var], ctx: &mut Ctx, next: Option<&str>| -> Result<Var> {
            let refs: Vec<&Var> = feats.iter().collect();
            let before = ag::tape_bytes();
            let out = ag::concat(&refs, 1)?;
            let what = || next.map_or("concat".to_string(), |n| format!("concat for {n}"));
            ctx.record_merge(what, &refs, &out, before, false);
            Ok(out)
        };
        for (l, name) in self.layers.iter_mut().zip(&self.names) {
            let input = if feats.len() == 1 { feats[0].clone() } else { concat(&feats, ctx, Some(name))? };
            feats.push(call(l.as_mut(), name, &input, ctx)?);
        }
        concat(&feats, ctx, None)
    }
    fn is_container(&self) -> bool {
        true
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        for (l, name) in self.layers.iter_mut().zip(&self.names) {
            l.visit(&join(prefix, name), f);
        }
    }
    fn describe(&self) -> String {
        format!("DenseBlock({} layers)", self.layers.len())
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let mut feats = vec![x.clone()];
        for (l, n) in self.layers.iter_mut().zip(&self.names) {
            let input = if feats.len() == 1 { feats[0].clone() } else { concat(g, &join(name, &format!("concat_for_{n}")), &feats)? };
            feats.push(g.child(l.as_mut(), name, n, &input)?);
        }
        concat(g, &join(name, "concat"), &feats)
    }
}

/// Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(global_avg_pool(x))))), with 1x1
/// convolutions `fc1` (C -> C/r) and `fc2` (C/r -> C), as torchvision's SqueezeExcitation.
pub struct SqueezeExcite {
    pub fc1: Conv2d,
    pub fc2: Conv2d,
}

impl SqueezeExcite {
    pub fn new(rng: &mut Rng, channels: usize, squeeze: usize) -> Result<Self> {
        if squeeze == 0 {
            return Err(ag::Error::arg("SqueezeExcite", format!("{channels} channels squeeze to 0; use a smaller reduction")).into());
        }
        Ok(SqueezeExcite {
            fc1: Conv2d::new(rng, channels, squeeze, 1, Conv2dOptions::default(), true)?,
            fc2: Conv2d::new(rng, squeeze, channels, 1, Conv2dOptions::default(), true)?,
        })
    }
}

impl Module for SqueezeExcite {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let s = ag::global_avg_pool2d(x)?;
        let s = self.fc1.forward(&s, ctx)?.relu()?;
        let s = self.fc2.forward(&s, ctx)?.sigmoid()?;
        Ok(x.mul(&s)?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        self.fc1.visit(&join(prefix, "fc1"), f);
        self.fc2.visit(&join(prefix, "fc2"), f);
    }
    fn describe(&self) -> String {
        let s = self.fc1.weight.shape();
        format!("SqueezeExcite({}, {})", s[1], s[0])
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let pooled = ag::global_avg_pool2d(&x.var)?;
        let s = g.op("GlobalAveragePool", &join(name, "avgpool"), vec![x.name.clone()], vec![], pooled);
        let s = self.fc1.export(g, &join(name, "fc1"), &s)?;
        let s = g.unary(Unary::Relu, &join(name, "relu"), &s)?;
        let s = self.fc2.export(g, &join(name, "fc2"), &s)?;
        let s = g.unary(Unary::Sigmoid, &join(name, "sigmoid"), &s)?;
        let y = x.var.mul(&s.var)?;
        Ok(g.op("Mul", &join(name, "scale"), vec![x.name.clone(), s.name], vec![], y))
    }
    fn macs(&self, input: &[usize], _: &[usize]) -> u64 {
        let (n, c) = (input[0], input[1]);
        let squeeze = self.fc1.weight.shape()[0];
        self.fc1.macs(&[n, c, 1, 1], &[n, squeeze, 1, 1]) + self.fc2.macs(&[n, squeeze, 1, 1], &[n, c, 1, 1])
    }
    // The field is the local path's: the channel gates see the whole image, but (as is usual
    // for receptive fields) that global context is not counted.
}
