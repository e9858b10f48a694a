//! DenseNet (Huang et al. 2017) as torchvision builds it, and a small DenseNet-BC for CIFAR.

use stride_autograd::{Pool2dOptions, Rng};
use stride_nn::blocks::{DenseBlock, OtherPool};
use stride_nn::layers::{Flatten, Linear, Pool, Sequential};
use stride_nn::Result;

use super::{bn, conv, max_pool, relu};
use crate::InputSpec;

/// What varies between DenseNets.
#[derive(Clone, Copy, Debug)]
pub struct DenseNetConfig {
    pub growth: usize,
    pub blocks: &'static [usize],
    /// Channels of the stem's convolution.
    pub init_features: usize,
    /// The CIFAR stem: one 3x3 convolution, no max pool; else 7x7 stride 2 and a max pool.
    pub cifar: bool,
}

pub const DENSENET121: DenseNetConfig = DenseNetConfig { growth: 32, blocks: &[6, 12, 24, 16], init_features: 64, cifar: false };
/// DenseNet-BC with depth 40 and growth 12 (bottlenecks, compression 0.5).
pub const DENSENET_BC_40: DenseNetConfig = DenseNetConfig { growth: 12, blocks: &[6, 6, 6], init_features: 24, cifar: true };

/// A DenseNet-BC (bottleneck width 4 x growth, transitions halve the channels). Names as
/// torchvision: `features.conv0`, `features.denseblock1.denselayer1.norm1`, ...,
/// `features.transition1.conv`, `features.norm5`, `classifier`.
pub fn densenet(rng: &mut Rng, s: InputSpec, c: DenseNetConfig) -> Result<Sequential> {
    let mut f = Sequential::new();
    let mut ch = c.init_features;
    if c.cifar {
        f = f.push_named("conv0", conv(rng, s.channels, ch, 3, 1, 1, 1, false)?);
    } else {
        f = f
            .push_named("conv0", conv(rng, s.channels, ch, 7, 2, 3, 1, false)?)
            .push_named("norm0", bn(ch)?)
            .push_named("relu0", relu())
            .push_named("pool0", max_pool(3, 2, 1));
    }
    for (i, &n) in c.blocks.iter().enumerate() {
        let mut block = DenseBlock { layers: Vec::new(), names: Vec::new() };
        for j in 0..n {
            let width = 4 * c.growth;
            let layer = Sequential::new()
                .push_named("norm1", bn(ch + j * c.growth)?)
                .push_named("relu1", relu())
                .push_named("conv1", conv(rng, ch + j * c.growth, width, 1, 1, 0, 1, false)?)
                .push_named("norm2", bn(width)?)
                .push_named("relu2", relu())
                .push_named("conv2", conv(rng, width, c.growth, 3, 1, 1, 1, false)?);
            block.layers.push(Box::new(layer));
            block.names.push(format!("denselayer{}", j + 1));
        }
        f = f.push_named(&format!("denseblock{}", i + 1), block);
        ch += n * c.growth;
        if i + 1 < c.blocks.len() {
            let t = Sequential::new()
                .push_named("norm", bn(ch)?)
                .push_named("relu", relu())
                .push_named("conv", conv(rng, ch, ch / 2, 1, 1, 0, 1, false)?)
                .push_named("pool", Pool::Avg(Pool2dOptions::new(2)));
            f = f.push_named(&format!("transition{}", i + 1), t);
            ch /= 2;
        }
    }
    f = f.push_named("norm5", bn(ch)?);
    Ok(Sequential::new()
        .push_named("features", f)
        .push_named("relu", relu())
        .push_named("avgpool", OtherPool::AdaptiveAvg(1, 1))
        .push_named("flatten", Flatten)
        .push_named("classifier", Linear::new(rng, ch, s.classes, true)?))
}
