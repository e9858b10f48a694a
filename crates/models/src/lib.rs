//! The model zoo: networks by name, built for a given input shape and class count.
#![forbid(unsafe_code)]

pub mod arch;
mod file;
pub mod vae;

pub use file::from_toml;

use stride_autograd::{no_grad, Conv2dOptions, Error, Padding, Pool2dOptions, Rng, Tensor, Unary, Var};
use stride_nn::layers::{Activation, BatchNorm, Conv2d, Dropout, Flatten, Linear, Pool, Sequential};
use stride_nn::{Ctx, Module, Result};

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
    /// Decoupled weight decay `stride train` uses by default (with AdamW); 0 means plain Adam.
    pub weight_decay: f64,
    /// The input the model was designed for (its parameter count in `stride models` is for
    /// this input and class count).
    pub input: InputSpec,
    /// The smallest square image side the model accepts.
    pub min_size: usize,
    pub build: fn(&mut Rng, InputSpec) -> Result<Sequential>,
}

const fn spec(channels: usize, side: usize, classes: usize) -> InputSpec {
    InputSpec { channels, height: side, width: side, classes }
}
const MNIST: InputSpec = spec(1, 28, 10);
const CIFAR: InputSpec = spec(3, 32, 10);
const IMAGENET: InputSpec = spec(3, 224, 1000);

/// Every classifier, by name. (The variational autoencoder is [`vae`]'s.)
pub const ZOO: &[ZooEntry] = &[
    ZooEntry {
        name: "cnn",
        about: "the \"CNN from scratch\" tutorial network: conv 20 3x3, relu, avg-pool, conv 50 5x5, relu, avg-pool, dense 128, relu, dense 10",
        epochs: 15,
        weight_decay: 0.0,
        input: MNIST,
        min_size: 14,
        build: tutorial_cnn,
    },
    ZooEntry {
        name: "cnn-bn",
        about:
            "three 3x3 conv blocks (32, 64, 128 channels) with batch norm, relu and max-pool, dropout 0.25, dense 128, relu, dropout 0.25, dense 10",
        epochs: 9,
        weight_decay: 0.05,
        input: MNIST,
        min_size: 8,
        build: cnn_bn,
    },
    ZooEntry {
        name: "lenet5",
        about: "LeNet-5: conv 6 5x5 (pad 2), tanh, avg-pool, conv 16 5x5, tanh, avg-pool, dense 120, 84",
        epochs: 10,
        weight_decay: 0.0,
        input: MNIST,
        min_size: 12,
        build: arch::classic::lenet5,
    },
    ZooEntry {
        name: "allconv",
        about: "All-CNN-C: 3x3 convs with strided convs instead of pooling, 1x1 conv to classes, global average pool (with batch norm)",
        epochs: 5,
        weight_decay: 0.0,
        input: CIFAR,
        min_size: 9,
        build: arch::classic::allconv,
    },
    ZooEntry {
        name: "alexnet",
        about: "AlexNet as torchvision builds it",
        epochs: 5,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 63,
        build: arch::classic::alexnet,
    },
    ZooEntry {
        name: "vgg11",
        about: "VGG-11 (configuration A), torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 32,
        build: |r, s| arch::classic::vgg(r, s, arch::classic::VGG11, false),
    },
    ZooEntry {
        name: "vgg11_bn",
        about: "VGG-11 with batch norm, torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 32,
        build: |r, s| arch::classic::vgg(r, s, arch::classic::VGG11, true),
    },
    ZooEntry {
        name: "vgg16",
        about: "VGG-16 (configuration D), torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 32,
        build: |r, s| arch::classic::vgg(r, s, arch::classic::VGG16, false),
    },
    ZooEntry {
        name: "vgg16_bn",
        about: "VGG-16 with batch norm, torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 32,
        build: |r, s| arch::classic::vgg(r, s, arch::classic::VGG16, true),
    },
    ZooEntry {
        name: "googlenet",
        about: "GoogLeNet (Inception v1), torchvision's with aux_logits=False, transform_input=False",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 15,
        build: arch::inception::googlenet,
    },
    ZooEntry {
        name: "resnet18",
        about: "ResNet-18, torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 1,
        build: |r, s| arch::resnet::resnet(r, s, arch::resnet::RESNET18),
    },
    ZooEntry {
        name: "resnet34",
        about: "ResNet-34, torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 1,
        build: |r, s| arch::resnet::resnet(r, s, arch::resnet::RESNET34),
    },
    ZooEntry {
        name: "resnet50",
        about: "ResNet-50 (bottleneck blocks, stride on the 3x3), torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 1,
        build: |r, s| arch::resnet::resnet(r, s, arch::resnet::RESNET50),
    },
    ZooEntry {
        name: "resnet18_cifar",
        about: "ResNet-18 with the CIFAR stem (3x3 conv, no max-pool): bench/SPEC.md's B4",
        epochs: 3,
        weight_decay: 0.0,
        input: CIFAR,
        min_size: 1,
        build: |r, s| arch::resnet::resnet(r, s, arch::resnet::ResNetConfig { cifar: true, ..arch::resnet::RESNET18 }),
    },
    ZooEntry {
        name: "resnet34_cifar",
        about: "ResNet-34 with the CIFAR stem",
        epochs: 3,
        weight_decay: 0.0,
        input: CIFAR,
        min_size: 1,
        build: |r, s| arch::resnet::resnet(r, s, arch::resnet::ResNetConfig { cifar: true, ..arch::resnet::RESNET34 }),
    },
    ZooEntry {
        name: "resnet50_cifar",
        about: "ResNet-50 with the CIFAR stem",
        epochs: 3,
        weight_decay: 0.0,
        input: CIFAR,
        min_size: 1,
        build: |r, s| arch::resnet::resnet(r, s, arch::resnet::ResNetConfig { cifar: true, ..arch::resnet::RESNET50 }),
    },
    ZooEntry {
        name: "se_resnet18",
        about: "SE-ResNet-18: ResNet-18 with a squeeze-and-excitation unit (reduction 16) in every block",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 1,
        build: |r, s| arch::resnet::resnet(r, s, arch::resnet::ResNetConfig { se: true, ..arch::resnet::RESNET18 }),
    },
    ZooEntry {
        name: "se_resnet50",
        about: "SE-ResNet-50: ResNet-50 with a squeeze-and-excitation unit (reduction 16) in every block",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 1,
        build: |r, s| arch::resnet::resnet(r, s, arch::resnet::ResNetConfig { se: true, ..arch::resnet::RESNET50 }),
    },
    ZooEntry {
        name: "densenet121",
        about: "DenseNet-121 (growth 32, blocks 6-12-24-16), torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 29,
        build: |r, s| arch::dense::densenet(r, s, arch::dense::DENSENET121),
    },
    ZooEntry {
        name: "densenet_bc",
        about: "DenseNet-BC-40 (growth 12, three blocks of 6 bottleneck layers) for small images",
        epochs: 5,
        weight_decay: 0.0,
        input: CIFAR,
        min_size: 4,
        build: |r, s| arch::dense::densenet(r, s, arch::dense::DENSENET_BC_40),
    },
    ZooEntry {
        name: "mobilenet_v1",
        about: "MobileNet v1 (width 1.0): 13 depthwise-separable blocks",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 1,
        build: arch::mobile::mobilenet_v1,
    },
    ZooEntry {
        name: "mobilenet_v2",
        about: "MobileNet v2 (inverted residuals, relu6), torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 1,
        build: arch::mobile::mobilenet_v2,
    },
    ZooEntry {
        name: "shufflenet_v2_x1_0",
        about: "ShuffleNet v2 x1.0, torchvision's",
        epochs: 3,
        weight_decay: 0.0,
        input: IMAGENET,
        min_size: 1,
        build: arch::mobile::shufflenet_v2_x1_0,
    },
    ZooEntry {
        name: "xception",
        about: "Xception (Keras's layout): separable convolutions with residual connections",
        epochs: 3,
        weight_decay: 0.0,
        input: spec(3, 299, 1000),
        min_size: 7,
        build: arch::inception::xception,
    },
];

/// Builds the zoo model `name`.
/// The model is checked by a dry run on one blank image, so a size it cannot take is an
/// error here, naming the layer, not in the middle of training.
pub fn build(name: &str, rng: &mut Rng, spec: InputSpec) -> Result<Sequential> {
    let e = entry(name)?;
    if spec.channels == 0 || spec.classes == 0 {
        return Err(Error::arg(
            "model",
            format!("{name}: needs at least one channel and one class, got {} channels and {} classes", spec.channels, spec.classes),
        )
        .into());
    }
    let m = e.min_size;
    let why = || {
        format!(
            "{name} cannot take {}x{}x{} images (it needs at least {m}x{m}; `stride train --resize N` resizes)",
            spec.channels, spec.height, spec.width
        )
    };
    let mut model = (e.build)(rng, spec).map_err(|err| err.context(why()))?;
    dry_run(&mut model, spec).map_err(|err| err.context(why()))?;
    Ok(model)
}

/// Runs `m` in evaluation mode on one blank image of `spec`.
pub fn dry_run(m: &mut Sequential, spec: InputSpec) -> Result<()> {
    let x = Var::constant(Tensor::zeros(&[1, spec.channels, spec.height, spec.width])?);
    let y = no_grad(|| m.forward(&x, &mut Ctx::eval()))?;
    if y.shape() != [1, spec.classes] {
        return Err(Error::shape("model", format!("gives outputs of shape {:?}, expected [1, {}]", y.shape(), spec.classes)).into());
    }
    Ok(())
}

/// A zoo name, a path to a TOML model file (ending in `.toml`) or an ONNX model (`.onnx`,
/// its weights included).
pub fn build_any(name_or_path: &str, rng: &mut Rng, spec: InputSpec) -> Result<Sequential> {
    if name_or_path.ends_with(".onnx") {
        return from_onnx(name_or_path, Some(spec));
    }
    if !name_or_path.ends_with(".toml") {
        return build(name_or_path, rng, spec);
    }
    let text = std::fs::read_to_string(name_or_path).map_err(|e| Error::arg("model file", format!("{name_or_path}: {e}")))?;
    if text.len() > 1 << 20 {
        return Err(Error::arg("model file", format!("{name_or_path}: larger than 1 MiB")).into());
    }
    from_toml(name_or_path, &text, rng, spec)
}

/// An ONNX model as a network of Stride's layers (weights from the file). With `spec`, the
/// file's declared input must fit it and a dry run must give `spec.classes` outputs.
pub fn from_onnx(path: &str, spec: Option<InputSpec>) -> Result<Sequential> {
    onnx_model(path, read_onnx(path)?, spec)
}

/// An ONNX classifier and the input and class count it declares, from one read of the file.
pub fn onnx_classifier(path: &str) -> Result<(Sequential, InputSpec)> {
    let net = read_onnx(path)?;
    let spec = declared_spec(path, &net)?;
    Ok((onnx_model(path, net, Some(spec))?, spec))
}

/// A shape as an ONNX file declares it: None where the file leaves a dimension free.
pub type Declared = Vec<Option<usize>>;

/// The input and output shapes an ONNX model declares, for models that are not classifiers (a
/// segmentation map, an image).
pub fn onnx_declared(path: &str) -> Result<(Declared, Declared)> {
    let net = read_onnx(path)?;
    Ok((net.input_shape.clone(), net.output_shape.clone()))
}

/// The input and class count an ONNX classifier declares ([N, C, H, W] in, [N, K] out).
pub fn onnx_spec(path: &str) -> Result<InputSpec> {
    declared_spec(path, &read_onnx(path)?)
}

/// An ONNX model as Stride's network itself, with every output the file declares
/// ([`stride_onnx::Network::forward_all`]).
pub fn onnx_network(path: &str) -> Result<stride_onnx::Network> {
    read_onnx(path)
}

fn read_onnx(path: &str) -> Result<stride_onnx::Network> {
    Ok(stride_onnx::import(&stride_onnx::read(std::path::Path::new(path))?).map_err(|e| e.context(path.to_string()))?.network)
}

fn declared_spec(path: &str, net: &stride_onnx::Network) -> Result<InputSpec> {
    match (&net.input_shape[..], &net.output_shape[..]) {
        ([_, Some(c), Some(h), Some(w)], [_, Some(k)]) => Ok(InputSpec { channels: *c, height: *h, width: *w, classes: *k }),
        (i, o) => Err(Error::shape(
            "model",
            format!(
                "{path} declares input {} and output {}; a classifier takes [N, C, H, W] and gives [N, classes]",
                stride_onnx::Network::dims_text(i),
                stride_onnx::Network::dims_text(o)
            ),
        )
        .into()),
    }
}

/// `net` as a model; with `spec`, checked against it.
fn onnx_model(path: &str, net: stride_onnx::Network, spec: Option<InputSpec>) -> Result<Sequential> {
    if let Some(s) = spec {
        let want = [s.channels, s.height, s.width];
        let declared = net.input_shape.get(1..).unwrap_or(&[]);
        let fits = declared.len() == 3 && declared.iter().zip(want).all(|(d, w)| d.is_none_or(|d| d == w));
        if !fits {
            let shape: Vec<String> = net.input_shape.iter().map(|d| d.map_or("N".into(), |d| d.to_string())).collect();
            return Err(Error::shape(
                "model",
                format!("{path} takes inputs [{}], the data gives [N, {}, {}, {}]", shape.join(", "), s.channels, s.height, s.width),
            )
            .into());
        }
    }
    // Unnamed: the layers keep the names the file gave their weights.
    let mut model = Sequential::new().push_named("", net);
    if let Some(s) = spec {
        dry_run(&mut model, s).map_err(|e| e.context(path.to_string()))?;
    }
    Ok(model)
}

/// The zoo entry called `name`, or an error listing the zoo.
pub fn entry(name: &str) -> Result<&'static ZooEntry> {
    Ok(ZOO.iter().find(|e| e.name == name).ok_or_else(|| {
        if name == "vae" {
            return Error::arg("model", "the VAE is not a classifier: train it with `stride vae`, draw digits with `stride sample`");
        }
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
    Ok((size - k).div_ceil(2))
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

/// Three conv + batch norm + relu + max-pool blocks (32, 64, 128 channels: 28 -> 14 -> 7 -> 3
/// on Fashion-MNIST), dropout, dense 128, dropout, dense. The third block replaced a second
/// dense-heavy design (3136 x 128) that stayed near 93.0% on Fashion-MNIST: for 1.8 times the
/// multiply-adds and 57% of the parameters it reaches 93.4% in 9 epochs with AdamW (README).
pub fn cnn_bn(rng: &mut Rng, s: InputSpec) -> Result<Sequential> {
    const DROPOUT: f64 = 0.25;
    let same = Conv2dOptions::default().padding(Padding::Same);
    let (h, w) = (s.height / 8, s.width / 8);
    if h == 0 || w == 0 {
        return Err(Error::geometry("cnn-bn", format!("input {}x{} is too small for three 2x2 poolings", s.height, s.width)).into());
    }
    let mut net = Sequential::new();
    for (cin, cout) in [(s.channels, 32), (32, 64), (64, 128)] {
        net = net
            .push(Conv2d::new(rng, cin, cout, 3, same, false)?)
            .push(BatchNorm::new(cout)?)
            .push(Activation(Unary::Relu))
            .push(Pool::Max(Pool2dOptions::new(2)));
    }
    Ok(net
        .push(Flatten)
        .push(Dropout(DROPOUT))
        .push(Linear::new(rng, 128 * h * w, 128, true)?)
        .push(Activation(Unary::Relu))
        .push(Dropout(DROPOUT))
        .push(Linear::new(rng, 128, s.classes, true)?))
}
