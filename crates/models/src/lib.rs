//! The model zoo: networks by name, built for a given input shape and class count.
#![forbid(unsafe_code)]

mod file;

pub use file::from_toml;

use stride_autograd::{Conv2dOptions, Error, Padding, Pool2dOptions, Rng, Unary};
use stride_nn::layers::{Activation, BatchNorm, Conv2d, Dropout, Flatten, Linear, Pool, Sequential};
use stride_nn::Result;

/// What a model is built for: [channels, height, width] of one image and the class count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

/// One zoo entry.
pub struct ZooEntry {
    pub name: &'static str,
    pub about: &'static str,
    /// Epochs `stride train` runs by default for this model.
    pub epochs: usize,
    pub build: fn(&mut Rng, InputSpec) -> Result<Sequential>,
}

/// Every model, by name.
pub const ZOO: &[ZooEntry] = &[
    ZooEntry {
        name: "cnn",
        about: "the \"CNN from scratch\" tutorial network: conv 20 3x3, relu, avg-pool, conv 50 5x5, relu, avg-pool, dense 128, relu, dense 10",
        epochs: 15,
        build: tutorial_cnn,
    },
    ZooEntry {
        name: "cnn-bn",
        about: "two 3x3 conv blocks (32, 64 channels) with batch norm, relu and max-pool, dropout 0.25, dense 128, relu, dropout 0.25, dense 10",
        epochs: 13,
        build: cnn_bn,
    },
];

/// Builds the zoo model `name`.
pub fn build(name: &str, rng: &mut Rng, spec: InputSpec) -> Result<Sequential> {
    (entry(name)?.build)(rng, spec)
}

/// A zoo name, or a path to a TOML model file (ending in `.toml`).
pub fn build_any(name_or_path: &str, rng: &mut Rng, spec: InputSpec) -> Result<Sequential> {
    if !name_or_path.ends_with(".toml") {
        return build(name_or_path, rng, spec);
    }
    let text = std::fs::read_to_string(name_or_path).map_err(|e| Error::arg("model file", format!("{name_or_path}: {e}")))?;
    if text.len() > 1 << 20 {
        return Err(Error::arg("model file", format!("{name_or_path}: larger than 1 MiB")).into());
    }
    from_toml(name_or_path, &text, rng, spec)
}

/// The zoo entry called `name`, or an error listing the zoo.
pub fn entry(name: &str) -> Result<&'static ZooEntry> {
    Ok(ZOO.iter().find(|e| e.name == name).ok_or_else(|| {
        let names: Vec<&str> = ZOO.iter().map(|e| e.name).collect();
        Error::arg("model", format!("unknown model '{name}'; the zoo has {}", names.join(", ")))
    })?)
}

/// Spatial size after a valid conv of kernel k then a 2x2 pool, or an error naming the layer.
fn shrink(layer: &str, size: usize, k: usize) -> Result<usize> {
    if size < k + 1 {
        return Err(
            Error::geometry("model", format!("{layer}: input size {size} is too small for a {k}x{k} convolution followed by 2x2 pooling")).into()
        );
    }
    Ok((size - k + 1) / 2)
}

/// The network of "Convolutional neural networks from scratch" (SPEC.md's B1).
pub fn tutorial_cnn(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    let (h, w) = (shrink("conv2", shrink("conv1", s.height, 3)?, 5)?, shrink("conv2", shrink("conv1", s.width, 3)?, 5)?);
    let pool = || Pool::Avg(Pool2dOptions::new(2));
    Ok(Sequential::new()
        .push(Conv2d::new(rng, s.channels, 20, 3, Conv2dOptions::default(), true)?)
        .push(Activation(Unary::Relu))
        .push(pool())
        .push(Conv2d::new(rng, 20, 50, 5, Conv2dOptions::default(), true)?)
        .push(Activation(Unary::Relu))
        .push(pool())
        .push(Flatten)
        .push(Linear::new(rng, 50 * h * w, 128, true)?)
        .push(Activation(Unary::Relu))
        .push(Linear::new(rng, 128, s.classes, true)?))
}

/// Two conv + batch norm + pooling blocks, for Fashion-MNIST.
pub fn cnn_bn(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    let same = Conv2dOptions::default().padding(Padding::Same);
    let (h, w) = (s.height / 4, s.width / 4);
    if h == 0 || w == 0 {
        return Err(Error::geometry("cnn-bn", format!("input {}x{} is too small for two 2x2 poolings", s.height, s.width)).into());
    }
    Ok(Sequential::new()
        .push(Conv2d::new(rng, s.channels, 32, 3, same, false)?)
        .push(BatchNorm::new(32)?)
        .push(Activation(Unary::Relu))
        .push(Pool::Max(Pool2dOptions::new(2)))
        .push(Conv2d::new(rng, 32, 64, 3, same, false)?)
        .push(BatchNorm::new(64)?)
        .push(Activation(Unary::Relu))
        .push(Pool::Max(Pool2dOptions::new(2)))
        .push(Flatten)
        .push(Dropout(0.25))
        .push(Linear::new(rng, 64 * h * w, 128, true)?)
        .push(Activation(Unary::Relu))
        .push(Dropout(0.25))
        .push(Linear::new(rng, 128, s.classes, true)?))
}
