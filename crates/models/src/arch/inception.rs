//! GoogLeNet (Inception v1, Szegedy et al. 2014) as torchvision builds it with
//! `aux_logits=False, transform_input=False`, and Xception (Chollet 2017) as Keras builds it.

use stride_autograd::{Padding, Pool2dOptions, Rng};
use stride_nn::blocks::{Concat, DepthwiseSeparableConv2d, OtherPool, Residual};
use stride_nn::layers::{BatchNorm, Dropout, Flatten, Linear, Pool, Sequential};
use stride_nn::{Module, Result};

use super::{bn, conv, pooled_head, relu};
use crate::InputSpec;

/// torchvision's `BasicConv2d`: `conv` (no bias), `bn` (eps 0.001), relu.
fn basic(rng: &mut Rng, i: usize, o: usize, k: usize, stride: usize, pad: usize) -> Result<Sequential> {
    Ok(Sequential::new()
        .push_named("conv", conv(rng, i, o, k, stride, pad, 1, false)?)
        .push_named("bn", BatchNorm::with_eps(o, 1e-3)?)
        .push_named("relu", super::relu()))
}

/// Max pooling with `ceil_mode=True`, as every GoogLeNet pool.
fn ceil_pool(k: usize, stride: usize, pad: usize) -> Pool {
    Pool::Max(Pool2dOptions::new(k).stride(stride).padding(Padding::uniform(pad)).ceil_mode(true))
}

/// An Inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 (torchvision's "5x5" branch is 3x3) |
/// 3x3 max pool -> 1x1, concatenated.
#[allow(clippy::too_many_arguments)]
fn inception(rng: &mut Rng, i: usize, c1: usize, r3: usize, c3: usize, r5: usize, c5: usize, pp: usize) -> Result<Concat> {
    let b2 = Sequential::new().push(basic(rng, i, r3, 1, 1, 0)?).push(basic(rng, r3, c3, 3, 1, 1)?);
    let b3 = Sequential::new().push(basic(rng, i, r5, 1, 1, 0)?).push(basic(rng, r5, c5, 3, 1, 1)?);
    let b4 = Sequential::new().push(ceil_pool(3, 1, 1)).push(basic(rng, i, pp, 1, 1, 0)?);
    Ok(Concat::named(vec![
        ("branch1", Box::new(basic(rng, i, c1, 1, 1, 0)?) as Box<dyn Module>),
        ("branch2", Box::new(b2)),
        ("branch3", Box::new(b3)),
        ("branch4", Box::new(b4)),
    ]))
}

pub fn googlenet(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    type Cfg = (&'static str, usize, usize, usize, usize, usize, usize, usize);
    let stage3: [Cfg; 2] = [("inception3a", 192, 64, 96, 128, 16, 32, 32), ("inception3b", 256, 128, 128, 192, 32, 96, 64)];
    let stage4: [Cfg; 5] = [
        ("inception4a", 480, 192, 96, 208, 16, 48, 64),
        ("inception4b", 512, 160, 112, 224, 24, 64, 64),
        ("inception4c", 512, 128, 128, 256, 24, 64, 64),
        ("inception4d", 512, 112, 144, 288, 32, 64, 64),
        ("inception4e", 528, 256, 160, 320, 32, 128, 128),
    ];
    let stage5: [Cfg; 2] = [("inception5a", 832, 256, 160, 320, 32, 128, 128), ("inception5b", 832, 384, 192, 384, 48, 128, 128)];
    let mut net = Sequential::new()
        .push_named("conv1", basic(rng, s.channels, 64, 7, 2, 3)?)
        .push_named("maxpool1", ceil_pool(3, 2, 0))
        .push_named("conv2", basic(rng, 64, 64, 1, 1, 0)?)
        .push_named("conv3", basic(rng, 64, 192, 3, 1, 1)?)
        .push_named("maxpool2", ceil_pool(3, 2, 0));
    let add = |mut net: Sequential, rng: &mut Rng, cfgs: &[Cfg]| -> Result<Sequential> {
        for &(name, i, c1, r3, c3, r5, c5, pp) in cfgs {
            net = net.push_named(name, inception(rng, i, c1, r3, c3, r5, c5, pp)?);
        }
        Ok(net)
    };
    net = add(net, rng, &stage3)?.push_named("maxpool3", ceil_pool(3, 2, 0));
    net = add(net, rng, &stage4)?.push_named("maxpool4", ceil_pool(2, 2, 0));
    net = add(net, rng, &stage5)?;
    Ok(net
        .push_named("avgpool", OtherPool::AdaptiveAvg(1, 1))
        .push_named("flatten", Flatten)
        .push_named("dropout", Dropout(0.2))
        .push_named("fc", Linear::new(rng, 1024, s.classes, true)?))
}

/// Xception's separable convolution (depthwise 3x3 "same", pointwise 1x1, no bias) and its BN.
fn sep_bn(rng: &mut Rng, i: usize, o: usize) -> Result<Sequential> {
    let same = stride_autograd::Conv2dOptions::default().padding(Padding::Same);
    Ok(Sequential::new().push_named("sep", DepthwiseSeparableConv2d::new(rng, i, o, 3, same, false)?).push_named("bn", bn(o)?))
}

/// One Xception block: [relu] sep conv + BN repeated, an optional 3x3 stride-2 max pool, and
/// a 1x1 strided projection (with BN) as the shortcut when the shape changes.
fn xblock(rng: &mut Rng, widths: &[usize], i: usize, start_with_relu: bool, downsample: bool) -> Result<Residual> {
    let mut rep = Sequential::new();
    let mut c = i;
    for (j, &o) in widths.iter().enumerate() {
        if j > 0 || start_with_relu {
            rep = rep.push(relu());
        }
        rep = rep.push(sep_bn(rng, c, o)?);
        c = o;
    }
    let shortcut: Option<Box<dyn Module>> = if downsample {
        rep = rep.push(Pool::Max(Pool2dOptions::new(3).stride(2).padding(Padding::Same)));
        Some(Box::new(Sequential::new().push(conv(rng, i, c, 1, 2, 0, 1, false)?).push(bn(c)?)))
    } else {
        None
    };
    Ok(Residual::new(Box::new(rep), shortcut).named("rep", "skip"))
}

/// Xception with Keras's layout: entry flow (two valid 3x3 convs, three down-sampling
/// blocks), 8 middle blocks of 728 channels, exit flow, global average pooling.
pub fn xception(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    let mut net = Sequential::new()
        .push_named("conv1", conv(rng, s.channels, 32, 3, 2, 0, 1, false)?)
        .push_named("bn1", bn(32)?)
        .push_named("relu1", relu())
        .push_named("conv2", conv(rng, 32, 64, 3, 1, 0, 1, false)?)
        .push_named("bn2", bn(64)?)
        .push_named("relu2", relu())
        .push_named("block1", xblock(rng, &[128, 128], 64, false, true)?)
        .push_named("block2", xblock(rng, &[256, 256], 128, true, true)?)
        .push_named("block3", xblock(rng, &[728, 728], 256, true, true)?);
    for b in 4..12 {
        net = net.push_named(&format!("block{b}"), xblock(rng, &[728, 728, 728], 728, true, false)?);
    }
    net = net
        .push_named("block12", xblock(rng, &[728, 1024], 728, true, true)?)
        .push_named("conv3", sep_bn(rng, 1024, 1536)?)
        .push_named("relu3", relu())
        .push_named("conv4", sep_bn(rng, 1536, 2048)?)
        .push_named("relu4", relu());
    pooled_head(net, rng, 2048, s.classes, "fc")
}
