//! More layers: transposed and depthwise-separable convolution, the other poolings, 2-D
//! dropout, padding, and the blocks later models need (residual add, channel concat).

use stride_autograd::{self as ag, Conv2dOptions, Pool2dOptions, Rng, Unary, Var};

use crate::layers::Conv2d;
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
        if opts.groups == 0 || out_channels % opts.groups != 0 || in_channels % opts.groups != 0 {
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
    fn macs(&self, input: &[usize], _: &[usize]) -> u64 {
        let (n, c) = (input[0], input[1]);
        let squeeze = self.fc1.weight.shape()[0];
        self.fc1.macs(&[n, c, 1, 1], &[n, squeeze, 1, 1]) + self.fc2.macs(&[n, squeeze, 1, 1], &[n, c, 1, 1])
    }
    // The field is the local path's: the channel gates see the whole image, but (as is usual
    // for receptive fields) that global context is not counted.
}
