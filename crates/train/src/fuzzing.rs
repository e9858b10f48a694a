//! Entry points for the fuzz targets in `fuzz/` and for the tests that replay their corpora:
//! each feeds untrusted bytes to one reader of outside data and must return, never panic.
//! Each returns whether the input was accepted (an error is the right answer for most inputs).

use std::path::Path;

use stride_autograd::Rng;
use stride_models::InputSpec;

/// A model small enough to build on every fuzz iteration, for the checkpoint target.
pub const TINY_MODEL: &str = r#"
[[layers]]
type = "conv2d"
out_channels = 2
kernel = 3
[[layers]]
type = "batch_norm"
[[layers]]
type = "flatten"
[[layers]]
type = "linear"
out_features = "classes"
"#;

/// The input the tiny model is built for.
pub const SPEC: InputSpec = InputSpec { channels: 1, height: 6, width: 6, classes: 3 };
/// The input fuzzed model files are built for (MNIST's, as `stride train` would).
pub const FILE_SPEC: InputSpec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };

fn tiny() -> stride_nn::layers::Sequential {
    stride_models::from_toml("tiny.toml", TINY_MODEL, &mut Rng::seed(0), SPEC).expect("the tiny model builds")
}

/// IDX, raw or gzipped; also split in two (at a place the first byte picks) as an image file
/// and a label file, made a data set and batched. Accepted when either reading works.
pub fn idx(data: &[u8]) -> bool {
    let mut ok = stride_data::idx::parse(Path::new("fuzz.idx"), data).is_ok();
    if let Some(&first) = data.first() {
        let cut = 1 + first as usize % data.len();
        let (a, b) = data[1..].split_at((cut - 1).min(data.len() - 1));
        let (ip, lp) = (Path::new("images.idx"), Path::new("labels.idx"));
        if let (Ok(images), Ok(labels)) = (stride_data::idx::parse(ip, a), stride_data::idx::parse(lp, b)) {
            if let Ok(ds) = stride_data::from_idx(images, labels, ip, lp, None) {
                // An accepted label file numbers at least two classes and every label is one.
                assert!(ds.classes >= 2, "{} classes accepted", ds.classes);
                assert!(ds.labels.iter().all(|&l| (l as usize) < ds.classes), "a label outside 0..{}", ds.classes);
                let counts = ds.class_counts();
                assert!(counts[1..].iter().all(|&c| c > 0), "a class after 0 without examples: {counts:?}");
                let norm = stride_data::Normalize::of(&ds);
                let batches = stride_data::Batches::new(&ds, 7, None, false).normalized(&norm).expect("a set's own statistics fit its channels");
                let seen: usize = batches.map(|b| b.labels.len()).sum();
                assert_eq!(seen, ds.len(), "batches cover the data set once");
                ok = true;
            }
        }
    }
    ok
}

/// One CIFAR-10 binary batch, or a CIFAR-100 file read for its fine and its coarse labels.
pub fn cifar(data: &[u8]) -> bool {
    let hundred =
        [stride_data::CifarLabels::Fine, stride_data::CifarLabels::Coarse].map(|l| stride_data::parse_cifar(Path::new("fuzz.bin"), data, l).is_ok());
    stride_data::parse_cifar_batch(Path::new("fuzz.bin"), data).is_ok() || hundred.contains(&true)
}

/// PNG or JPEG (or anything the decoder guesses).
pub fn image(data: &[u8]) -> bool {
    stride_data::decode_image(Path::new("fuzz.img"), data).is_ok()
}

/// A safetensors weight file or training checkpoint: parsed, loaded into a small model as
/// weights (without `optimizer.` entries), and restored as a training checkpoint. Accepted when
/// it loads as weights.
pub fn checkpoint(data: &[u8]) -> bool {
    let path = Path::new("fuzz.safetensors");
    let Ok((tensors, meta)) = crate::checkpoint::parse(path, data) else { return false };
    let mut model = tiny();
    let weights = tensors.iter().filter(|(k, _)| !k.starts_with("optimizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let ok = crate::checkpoint::load_into(&mut model, &weights).is_ok();
    let _ = crate::restore_checkpoint(path, tensors, &meta, &mut model, &crate::TrainConfig::default());
    ok
}

/// Whether `data` restores as a training checkpoint of the tiny model (Adam, seed 0).
pub fn restores(data: &[u8]) -> bool {
    let path = Path::new("fuzz.safetensors");
    let Ok((tensors, meta)) = crate::checkpoint::parse(path, data) else { return false };
    crate::restore_checkpoint(path, tensors, &meta, &mut tiny(), &crate::TrainConfig::default()).is_ok()
}

/// A TOML model file, built for MNIST's images.
pub fn toml_model(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    stride_models::from_toml("fuzz.toml", text, &mut Rng::seed(0), FILE_SPEC).is_ok()
}

/// An ONNX model: decoded and imported; when it declares a small fixed input, also run once
/// eagerly (`stride run`) and, if that works, through a compiled plan (`stride eval` and
/// `predict`), which must give an output of the same shape.
pub fn onnx_model(data: &[u8]) -> bool {
    let Ok(model) = stride_onnx::decode(data) else { return false };
    let Ok(imported) = stride_onnx::import(&model) else { return false };
    let mut net = imported.network;
    let dims: Option<Vec<usize>> = net.input_shape.iter().enumerate().map(|(i, d)| if i == 0 { Some(1) } else { *d }).collect();
    let Some(dims) = dims.filter(|d| !d.is_empty() && d.iter().product::<usize>() <= 4096) else { return true };
    let n = dims.iter().product::<usize>();
    let x = stride_autograd::Tensor::from_vec((0..n).map(|i| (i % 7) as f32 * 0.25 - 0.75).collect(), &dims).expect("a small input");
    let eager =
        stride_autograd::no_grad(|| stride_nn::Module::forward(&mut net, &stride_autograd::Var::constant(x.clone()), &mut stride_nn::Ctx::eval()));
    let Ok(eager) = eager else { return false };
    if let Ok(planned) = stride_nn::planned::Planned::new().forward(&mut net, &x) {
        assert_eq!(planned.shape(), eager.shape(), "the plan's output shape differs from the eager pass's");
    }
    true
}

/// The tiny model as ONNX: the seed of the `onnx_model` target.
pub fn tiny_onnx() -> Vec<u8> {
    stride_onnx::export(&mut tiny(), &[SPEC.channels, SPEC.height, SPEC.width], stride_onnx::DEFAULT_OPSET).expect("the tiny model exports")
}

/// A fuzz target: decodes the bytes, returns whether they were accepted (never panics).
pub type Target = fn(&[u8]) -> bool;

/// The targets by name, as `fuzz/fuzz_targets/` names them.
pub const TARGETS: &[(&str, Target)] =
    &[("idx", idx), ("cifar", cifar), ("image", image), ("checkpoint", checkpoint), ("toml_model", toml_model), ("onnx_model", onnx_model)];
