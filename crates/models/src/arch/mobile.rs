//! Networks for small devices: MobileNet v1 (Howard et al. 2017), MobileNet v2 (Sandler et al.
//! 2018) and ShuffleNet v2 (Ma et al. 2018), the last two as torchvision builds them.

use stride_autograd::{self as ag, Rng, Unary, Var};
use stride_nn::blocks::{concat, OtherPool, Residual};
use stride_nn::export::{Attr, Graph, Value};
use stride_nn::layers::{Dropout, Flatten, Linear, Sequential};
use stride_nn::{call, join, Ctx, Module, Result, Slot};

use super::{bn, conv, conv_bn_act, max_pool, pooled_head, relu};
use crate::InputSpec;

/// MobileNet v1 (width 1.0): a strided 3x3 convolution, then 13 depthwise-separable blocks
/// (depthwise 3x3 + BN + relu, pointwise 1x1 + BN + relu), global pooling, dense.
pub fn mobilenet_v1(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    let mut features = Sequential::new().push(conv_bn_act(rng, s.channels, 32, 3, 2, 1, Unary::Relu)?);
    let plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)];
    let mut i = 32;
    for (o, stride) in plan {
        features = features.push(
            Sequential::new()
                .push(conv(rng, i, i, 3, stride, 1, i, false)?)
                .push(bn(i)?)
                .push(relu())
                .push(conv(rng, i, o, 1, 1, 0, 1, false)?)
                .push(bn(o)?)
                .push(relu()),
        );
        i = o;
    }
    pooled_head(Sequential::new().push_named("features", features), rng, 1024, s.classes, "fc")
}

/// MobileNet v2's inverted residual: 1x1 expansion (unless the ratio is 1), depthwise 3x3,
/// linear 1x1 projection; a residual connection when the shape is kept.
fn inverted_residual(rng: &mut Rng, inp: usize, oup: usize, stride: usize, expand: usize) -> Result<Box<dyn Module>> {
    let hidden = inp * expand;
    let mut body = Sequential::new();
    if expand != 1 {
        body = body.push(conv_bn_act(rng, inp, hidden, 1, 1, 1, Unary::Relu6)?);
    }
    body =
        body.push(conv_bn_act(rng, hidden, hidden, 3, stride, hidden, Unary::Relu6)?).push(conv(rng, hidden, oup, 1, 1, 0, 1, false)?).push(bn(oup)?);
    Ok(if stride == 1 && inp == oup {
        Box::new(Residual::new(Box::new(body), None).named("conv", "shortcut"))
    } else {
        Box::new(Sequential::new().push_named("conv", body))
    })
}

pub fn mobilenet_v2(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    // (expansion t, channels c, repeats n, first stride s), from the paper's Table 2.
    let plan = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];
    let mut features = Sequential::new().push(conv_bn_act(rng, s.channels, 32, 3, 2, 1, Unary::Relu6)?);
    let mut i = 32;
    for (t, c, n, first) in plan {
        for r in 0..n {
            features = features.push_boxed(inverted_residual(rng, i, c, if r == 0 { first } else { 1 }, t)?);
            i = c;
        }
    }
    features = features.push(conv_bn_act(rng, i, 1280, 1, 1, 1, Unary::Relu6)?);
    Ok(Sequential::new()
        .push_named("features", features)
        .push_named("avgpool", OtherPool::AdaptiveAvg(1, 1))
        .push_named("flatten", Flatten)
        .push_named("classifier", Sequential::new().push(Dropout(0.2)).push(Linear::new(rng, 1280, s.classes, true)?)))
}

/// ShuffleNet v2's unit. Stride 1: split the channels in two, transform the second half,
/// concatenate; stride 2: two transformed branches of the whole input. Then shuffle the
/// channels in two groups. Children `branch1` (stride 2 only) and `branch2`, as torchvision.
pub struct ShuffleUnit {
    pub branch1: Option<Sequential>,
    pub branch2: Sequential,
}

impl ShuffleUnit {
    pub fn new(rng: &mut Rng, inp: usize, oup: usize, stride: usize) -> Result<Self> {
        let half = oup / 2;
        let branch1 = if stride > 1 {
            Some(
                Sequential::new()
                    .push(conv(rng, inp, inp, 3, stride, 1, inp, false)?)
                    .push(bn(inp)?)
                    .push(conv(rng, inp, half, 1, 1, 0, 1, false)?)
                    .push(bn(half)?)
                    .push(relu()),
            )
        } else {
            None
        };
        let first = if stride > 1 { inp } else { half };
        let branch2 = Sequential::new()
            .push(conv(rng, first, half, 1, 1, 0, 1, false)?)
            .push(bn(half)?)
            .push(relu())
            .push(conv(rng, half, half, 3, stride, 1, half, false)?)
            .push(bn(half)?)
            .push(conv(rng, half, half, 1, 1, 0, 1, false)?)
            .push(bn(half)?)
            .push(relu());
        Ok(ShuffleUnit { branch1, branch2 })
    }
}

impl Module for ShuffleUnit {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        let (a, b) = match &mut self.branch1 {
            Some(b1) => (call(b1, "branch1", x, ctx)?, call(&mut self.branch2, "branch2", x, ctx)?),
            None => {
                let c = x.shape()[1];
                let parts = x.split(1, &[c / 2, c - c / 2])?;
                (parts[0].clone(), call(&mut self.branch2, "branch2", &parts[1], ctx)?)
            }
        };
        let before = ag::tape_bytes();
        let out = ag::concat(&[&a, &b], 1)?.channel_shuffle(2)?;
        ctx.record_merge(|| "concat, channel shuffle".into(), &[&a, &b], &out, before, true);
        Ok(out)
    }
    fn is_container(&self) -> bool {
        true
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        if let Some(b) = &mut self.branch1 {
            b.visit(&join(prefix, "branch1"), f);
        }
        self.branch2.visit(&join(prefix, "branch2"), f);
    }
    fn describe(&self) -> String {
        format!("ShuffleUnit(stride {})", if self.branch1.is_some() { 2 } else { 1 })
    }
    fn export(&mut self, g: &mut Graph, name: &str, x: &Value) -> Result<Value> {
        let (a, b) = match &mut self.branch1 {
            Some(b1) => (g.child(b1, name, "branch1", x)?, g.child(&mut self.branch2, name, "branch2", x)?),
            None => {
                let c = x.shape()[1];
                let sizes = [c / 2, c - c / 2];
                let parts = x.var.split(1, &sizes)?;
                let split = g.ints(&join(name, "split"), sizes.iter().map(|&s| s as i64).collect());
                let mut halves = g.op_multi("Split", &join(name, "split"), vec![x.name.clone(), split], vec![("axis", Attr::Int(1))], parts);
                let second = halves.pop().expect("two halves");
                (halves.pop().expect("two halves"), g.child(&mut self.branch2, name, "branch2", &second)?)
            }
        };
        let cat = concat(g, &join(name, "concat"), &[a, b])?;
        channel_shuffle(g, &join(name, "shuffle"), &cat, 2)
    }
}

/// Channel shuffle as ONNX writes it: reshape to [N, groups, C/groups, H, W], swap the two
/// channel axes, reshape back.
fn channel_shuffle(g: &mut Graph, name: &str, x: &Value, groups: usize) -> Result<Value> {
    let [n, c, h, w] = x.shape()[..] else {
        return Err(stride_nn::export::unsupported(&format!("channel shuffle of a {:?} value", x.shape())));
    };
    let split = x.var.reshape(&[n, groups, c / groups, h, w])?;
    let five = g.ints(&join(name, "shape5"), vec![0, groups as i64, (c / groups) as i64, h as i64, w as i64]);
    let split = g.op("Reshape", &join(name, "split"), vec![x.name.clone(), five], vec![], split);
    let swapped = split.var.permute(&[0, 2, 1, 3, 4])?;
    let swapped = g.op("Transpose", &join(name, "swap"), vec![split.name], vec![("perm", Attr::Ints(vec![0, 2, 1, 3, 4]))], swapped);
    let y = x.var.channel_shuffle(groups)?;
    let four = g.ints(&join(name, "shape4"), vec![0, c as i64, h as i64, w as i64]);
    Ok(g.op("Reshape", name, vec![swapped.name, four], vec![], y))
}

/// ShuffleNet v2 x1.0: stages of 4, 8 and 4 units with 116, 232 and 464 channels.
pub fn shufflenet_v2_x1_0(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    let mut net = Sequential::new()
        .push_named("conv1", Sequential::new().push(conv(rng, s.channels, 24, 3, 2, 1, 1, false)?).push(bn(24)?).push(relu()))
        .push_named("maxpool", max_pool(3, 2, 1));
    let mut i = 24;
    for (stage, (repeats, o)) in [(4, 116), (8, 232), (4, 464)].into_iter().enumerate() {
        let mut st = Sequential::new().push(ShuffleUnit::new(rng, i, o, 2)?);
        for _ in 1..repeats {
            st = st.push(ShuffleUnit::new(rng, o, o, 1)?);
        }
        net = net.push_named(&format!("stage{}", stage + 2), st);
        i = o;
    }
    net = net.push_named("conv5", Sequential::new().push(conv(rng, i, 1024, 1, 1, 0, 1, false)?).push(bn(1024)?).push(relu()));
    pooled_head(net, rng, 1024, s.classes, "fc")
}
