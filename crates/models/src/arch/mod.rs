//! The classic architectures, with torchvision's module names where torchvision has the model.
//!
//! Each builder takes the input's channel count and the class count from [`InputSpec`](crate::InputSpec); spatial
//! size is free (global pooling before the classifier), checked by a dry run in
//! [`crate::build`].

pub mod classic;
pub mod dense;
pub mod inception;
pub mod mobile;
pub mod resnet;

use stride_autograd::{Conv2dOptions, Padding, Pool2dOptions, Rng, Unary};
use stride_nn::blocks::OtherPool;
use stride_nn::layers::{Activation, BatchNorm, Conv2d, Flatten, Linear, Pool, Sequential};
use stride_nn::Result;

/// A k x k convolution with PyTorch's `stride`, `padding` and `groups`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(rng: &mut Rng, i: usize, o: usize, k: usize, stride: usize, pad: usize, groups: usize, bias: bool) -> Result<Conv2d> {
    Conv2d::new(rng, i, o, k, Conv2dOptions::default().stride(stride).padding(Padding::uniform(pad)).groups(groups), bias)
}

pub(crate) fn bn(c: usize) -> Result<BatchNorm> {
    BatchNorm::new(c)
}

pub(crate) fn relu() -> Activation {
    Activation(Unary::Relu)
}

/// torchvision's `Conv2dNormActivation`: conv (no bias, padding (k-1)/2) `0`, batch norm `1`,
/// activation `2`.
pub(crate) fn conv_bn_act(rng: &mut Rng, i: usize, o: usize, k: usize, stride: usize, groups: usize, act: Unary) -> Result<Sequential> {
    Ok(Sequential::new().push(conv(rng, i, o, k, stride, (k - 1) / 2, groups, false)?).push(bn(o)?).push(Activation(act)))
}

/// Max pooling with PyTorch's kernel, stride and padding.
pub(crate) fn max_pool(k: usize, stride: usize, pad: usize) -> Pool {
    Pool::Max(Pool2dOptions::new(k).stride(stride).padding(Padding::uniform(pad)))
}

/// Global average pooling, flatten and the classifier `fc`: the head of most modern CNNs.
pub(crate) fn pooled_head(net: Sequential, rng: &mut Rng, features: usize, classes: usize, fc: &str) -> Result<Sequential> {
    Ok(net
        .push_named("avgpool", OtherPool::AdaptiveAvg(1, 1))
        .push_named("flatten", Flatten)
        .push_named(fc, Linear::new(rng, features, classes, true)?))
}
