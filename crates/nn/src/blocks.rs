//! More layers: transposed and depthwise-separable convolution, the other poolings, 2-D
//! dropout, padding, and the blocks later models need (residual add, channel concat).

use stride_autograd::{self as ag, Conv2dOptions, Pool2dOptions, Rng, Var};

use crate::layers::Conv2d;
use crate::module::{join, visit_weight_bias, Ctx, Module, Slot};
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
        format!("ConvTranspose2d({}, {}, k{}x{}, stride {:?})", s[0], s[1] * self.opts.groups, s[2], s[3], self.opts.stride)
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
            OtherPool::Lp(p, o) => format!("LpPool2d(p {p}, k{:?})", o.kernel),
            OtherPool::AdaptiveAvg(h, w) => format!("AdaptiveAvgPool2d({h}, {w})"),
            OtherPool::AdaptiveMax(h, w) => format!("AdaptiveMaxPool2d({h}, {w})"),
            OtherPool::GlobalAvg => "GlobalAvgPool2d".into(),
            OtherPool::GlobalMax => "GlobalMaxPool2d".into(),
            OtherPool::ChannelMax { depth, stride } => {
                format!("ChannelMaxPool(depth {depth}, stride {stride})")
            }
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

/// y = body(x) + shortcut(x) (identity shortcut when `shortcut` is None): ResNet's block.
pub struct Residual {
    pub body: Box<dyn Module>,
    pub shortcut: Option<Box<dyn Module>>,
}

impl Module for Residual {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let y = self.body.forward(x, ctx)?;
        let s = match &mut self.shortcut {
            Some(m) => m.forward(x, ctx)?,
            None => x.clone(),
        };
        if y.shape() != s.shape() {
            return Err(ag::Error::shape("Residual", format!("the block gives {:?} but the shortcut gives {:?}", y.shape(), s.shape())).into());
        }
        Ok(y.add(&s)?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        self.body.visit(&join(prefix, "body"), f);
        if let Some(s) = &mut self.shortcut {
            s.visit(&join(prefix, "shortcut"), f);
        }
    }
    fn describe(&self) -> String {
        format!("Residual({})", self.body.describe())
    }
}

/// Runs every branch on the same input and concatenates the results along channels:
/// Inception's and DenseNet's blocks. Children are named 0, 1, ...
pub struct Concat {
    pub branches: Vec<Box<dyn Module>>,
}

impl Module for Concat {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let outs: Vec<Var> = self.branches.iter_mut().map(|b| b.forward(x, ctx)).collect::<Result<_>>()?;
        let refs: Vec<&Var> = outs.iter().collect();
        Ok(ag::concat(&refs, 1)?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        for (i, b) in self.branches.iter_mut().enumerate() {
            b.visit(&join(prefix, &i.to_string()), f);
        }
    }
    fn describe(&self) -> String {
        format!("Concat({} branches)", self.branches.len())
    }
}
