//! ResNet (He et al. 2015) as torchvision builds it, its CIFAR variant, and SE-ResNet (Hu et
//! al. 2018).

use stride_autograd::{Rng, Unary};
use stride_nn::blocks::{Residual, SqueezeExcite};
use stride_nn::layers::Sequential;
use stride_nn::Result;

use super::{bn, conv, max_pool, pooled_head, relu};
use crate::InputSpec;

/// What varies between the ResNets.
#[derive(Clone, Copy, Debug)]
pub struct ResNetConfig {
    /// Blocks per stage.
    pub blocks: [usize; 4],
    /// Bottleneck blocks (1x1, 3x3, 1x1 with 4x expansion) instead of basic ones (3x3, 3x3).
    pub bottleneck: bool,
    /// The CIFAR stem: a 3x3 stride-1 convolution and no max pool (bench/SPEC.md's B4).
    pub cifar: bool,
    /// A squeeze-and-excitation unit (reduction 16) at the end of every block's body.
    pub se: bool,
}

pub const RESNET18: ResNetConfig = ResNetConfig { blocks: [2, 2, 2, 2], bottleneck: false, cifar: false, se: false };
pub const RESNET34: ResNetConfig = ResNetConfig { blocks: [3, 4, 6, 3], ..RESNET18 };
pub const RESNET50: ResNetConfig = ResNetConfig { blocks: [3, 4, 6, 3], bottleneck: true, ..RESNET18 };

/// A ResNet. Names: `conv1`, `bn1`, `layer1.0.conv1`, ..., `layer2.0.downsample.0`, `fc`.
pub fn resnet(rng: &mut Rng, s: InputSpec, c: ResNetConfig) -> Result<Sequential> {
    let mut net = if c.cifar {
        Sequential::new().push_named("conv1", conv(rng, s.channels, 64, 3, 1, 1, 1, false)?)
    } else {
        Sequential::new().push_named("conv1", conv(rng, s.channels, 64, 7, 2, 3, 1, false)?)
    };
    net = net.push_named("bn1", bn(64)?).push_named("relu", relu());
    if !c.cifar {
        net = net.push_named("maxpool", max_pool(3, 2, 1));
    }
    let expansion = if c.bottleneck { 4 } else { 1 };
    let mut inplanes = 64;
    for (stage, (&n, planes)) in c.blocks.iter().zip([64, 128, 256, 512]).enumerate() {
        let mut layer = Sequential::new();
        for b in 0..n {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            layer = layer.push(block(rng, inplanes, planes, stride, c)?);
            inplanes = planes * expansion;
        }
        net = net.push_named(&format!("layer{}", stage + 1), layer);
    }
    pooled_head(net, rng, 512 * expansion, s.classes, "fc")
}

/// One residual block: torchvision's `BasicBlock` or `Bottleneck` (stride on the 3x3, "v1.5").
fn block(rng: &mut Rng, inp: usize, planes: usize, stride: usize, c: ResNetConfig) -> Result<Residual> {
    let out = if c.bottleneck { planes * 4 } else { planes };
    let mut body = if c.bottleneck {
        Sequential::new()
            .push_named("conv1", conv(rng, inp, planes, 1, 1, 0, 1, false)?)
            .push_named("bn1", bn(planes)?)
            .push_named("relu1", relu())
            .push_named("conv2", conv(rng, planes, planes, 3, stride, 1, 1, false)?)
            .push_named("bn2", bn(planes)?)
            .push_named("relu2", relu())
            .push_named("conv3", conv(rng, planes, out, 1, 1, 0, 1, false)?)
            .push_named("bn3", bn(out)?)
    } else {
        Sequential::new()
            .push_named("conv1", conv(rng, inp, planes, 3, stride, 1, 1, false)?)
            .push_named("bn1", bn(planes)?)
            .push_named("relu1", relu())
            .push_named("conv2", conv(rng, planes, planes, 3, 1, 1, 1, false)?)
            .push_named("bn2", bn(planes)?)
    };
    if c.se {
        body = body.push_named("se", SqueezeExcite::new(rng, out, out / 16)?);
    }
    let shortcut = if stride != 1 || inp != out {
        let s: Box<dyn stride_nn::Module> = Box::new(Sequential::new().push(conv(rng, inp, out, 1, stride, 0, 1, false)?).push(bn(out)?));
        Some(s)
    } else {
        None
    };
    Ok(Residual::new(Box::new(body), shortcut).named("", "downsample").then(Unary::Relu))
}
