//! LeNet-5, the all-convolutional net, AlexNet and VGG.

use stride_autograd::{Error, Pool2dOptions, Rng, Unary};
use stride_nn::blocks::OtherPool;
use stride_nn::layers::{Activation, Dropout, Flatten, Linear, Pool, Sequential};
use stride_nn::Result;

use super::{bn, conv, max_pool, relu};
use crate::InputSpec;

/// LeNet-5 (LeCun et al. 1998) as most courses write it: conv 6 5x5 (padding 2, so a 28x28
/// digit is seen as the original 32x32), tanh, average pool, conv 16 5x5, tanh, average pool,
/// dense 120, 84, classes.
pub fn lenet5(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    // conv1 keeps the size, each pool halves it, conv2 takes 4 off.
    let side = |n: usize| (n / 2).checked_sub(4).map(|v| v / 2).filter(|&v| v > 0);
    let (Some(h), Some(w)) = (side(s.height), side(s.width)) else {
        return Err(Error::geometry(
            "lenet5",
            format!("input {}x{} is too small: conv2 (5x5) needs at least 5x5 after the first pool, so at least 12x12 images", s.height, s.width),
        )
        .into());
    };
    let tanh = || Activation(Unary::Tanh);
    let pool = || Pool::Avg(Pool2dOptions::new(2));
    Ok(Sequential::new()
        .push_named("conv1", conv(rng, s.channels, 6, 5, 1, 2, 1, true)?)
        .push_named("act1", tanh())
        .push_named("pool1", pool())
        .push_named("conv2", conv(rng, 6, 16, 5, 1, 0, 1, true)?)
        .push_named("act2", tanh())
        .push_named("pool2", pool())
        .push_named("flatten", Flatten)
        .push_named("fc1", Linear::new(rng, 16 * h * w, 120, true)?)
        .push_named("act3", tanh())
        .push_named("fc2", Linear::new(rng, 120, 84, true)?)
        .push_named("act4", tanh())
        .push_named("fc3", Linear::new(rng, 84, s.classes, true)?))
}

/// All-CNN-C (Springenberg et al. 2015, "Striving for simplicity"): only convolutions, strided
/// ones in place of pooling, a 1x1 convolution to the classes and global average pooling; with
/// batch norm after every hidden convolution so that it trains with the default settings.
pub fn allconv(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    let mut net = Sequential::new();
    let mut i = s.channels;
    // (out channels, kernel, stride, padding)
    let plan = [(96, 3, 1, 1), (96, 3, 1, 1), (96, 3, 2, 1), (192, 3, 1, 1), (192, 3, 1, 1), (192, 3, 2, 1), (192, 3, 1, 0), (192, 1, 1, 0)];
    for &(o, k, st, p) in &plan {
        net = net.push(conv(rng, i, o, k, st, p, 1, false)?).push(bn(o)?).push(relu());
        if st == 2 {
            net = net.push(Dropout(0.5));
        }
        i = o;
    }
    Ok(net.push(conv(rng, i, s.classes, 1, 1, 0, 1, true)?).push(OtherPool::GlobalAvg).push(Flatten))
}

/// AlexNet as torchvision builds it (the one-GPU variant of Krizhevsky et al. 2012).
pub fn alexnet(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    let pool = || max_pool(3, 2, 0);
    let features = Sequential::new()
        .push(conv(rng, s.channels, 64, 11, 4, 2, 1, true)?)
        .push(relu())
        .push(pool())
        .push(conv(rng, 64, 192, 5, 1, 2, 1, true)?)
        .push(relu())
        .push(pool())
        .push(conv(rng, 192, 384, 3, 1, 1, 1, true)?)
        .push(relu())
        .push(conv(rng, 384, 256, 3, 1, 1, 1, true)?)
        .push(relu())
        .push(conv(rng, 256, 256, 3, 1, 1, 1, true)?)
        .push(relu())
        .push(pool());
    let classifier = Sequential::new()
        .push(Dropout(0.5))
        .push(Linear::new(rng, 256 * 6 * 6, 4096, true)?)
        .push(relu())
        .push(Dropout(0.5))
        .push(Linear::new(rng, 4096, 4096, true)?)
        .push(relu())
        .push(Linear::new(rng, 4096, s.classes, true)?);
    Ok(Sequential::new()
        .push_named("features", features)
        .push_named("avgpool", OtherPool::AdaptiveAvg(6, 6))
        .push_named("flatten", Flatten)
        .push_named("classifier", classifier))
}

/// VGG configuration A (11 weight layers).
pub const VGG11: &[usize] = &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];
/// VGG configuration D (16 weight layers). 0 is a 2x2 max pool.
pub const VGG16: &[usize] = &[64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0];

/// VGG (Simonyan and Zisserman 2014) as torchvision builds it, optionally with batch norm.
pub fn vgg(rng: &mut Rng, s: InputSpec, cfg: &[usize], batch_norm: bool) -> Result<Sequential> {
    let mut features = Sequential::new();
    let mut i = s.channels;
    for &o in cfg {
        if o == 0 {
            features = features.push(max_pool(2, 2, 0));
            continue;
        }
        features = features.push(conv(rng, i, o, 3, 1, 1, 1, true)?);
        if batch_norm {
            features = features.push(bn(o)?);
        }
        features = features.push(relu());
        i = o;
    }
    let classifier = Sequential::new()
        .push(Linear::new(rng, 512 * 7 * 7, 4096, true)?)
        .push(relu())
        .push(Dropout(0.5))
        .push(Linear::new(rng, 4096, 4096, true)?)
        .push(relu())
        .push(Dropout(0.5))
        .push(Linear::new(rng, 4096, s.classes, true)?);
    Ok(Sequential::new()
        .push_named("features", features)
        .push_named("avgpool", OtherPool::AdaptiveAvg(7, 7))
        .push_named("flatten", Flatten)
        .push_named("classifier", classifier))
}
