//! Entry points for the fuzz targets in `fuzz/` and for the tests that replay their corpora:
//! each feeds untrusted bytes to one reader of outside data and must return, never panic.
//! Results are discarded; an `Err` is the right answer for most inputs.

use std::path::Path;

use stride_autograd::Rng;
use stride_models::InputSpec;

/// A model small enough to build on every fuzz iteration, for the checkpoint target.
pub const TINY_MODEL: &str = r#"
[[layers]]
type = "conv"
out_channels = 2
kernel = 3
[[layers]]
type = "batch_norm"
[[layers]]
type = "flatten"
[[layers]]
type = "linear"
"#;

/// The input the fuzzed models are built for.
pub const SPEC: InputSpec = InputSpec { channels: 1, height: 6, width: 6, classes: 3 };

/// IDX, raw or gzipped.
pub fn idx(data: &[u8]) {
    let _ = stride_data::idx::parse(Path::new("fuzz.idx"), data);
}

/// One CIFAR-10 binary batch.
pub fn cifar(data: &[u8]) {
    let _ = stride_data::parse_cifar_batch(Path::new("fuzz.bin"), data);
}

/// PNG or JPEG (or anything the decoder guesses).
pub fn image(data: &[u8]) {
    let _ = stride_data::decode_image(Path::new("fuzz.img"), data);
}

/// A safetensors weight file or training checkpoint: parsed, loaded into a small model, and
/// restored as a training checkpoint.
pub fn checkpoint(data: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    let Ok((tensors, meta)) = crate::checkpoint::parse(path, data) else { return };
    let mut model = stride_models::from_toml("tiny.toml", TINY_MODEL, &mut Rng::seed(0), SPEC).expect("the tiny model builds");
    let _ = crate::checkpoint::load_into(&mut model, &tensors);
    let cfg = crate::TrainConfig::default();
    let _ = crate::restore_checkpoint(path, tensors, &meta, &mut model, &cfg);
}

/// A TOML model file, built for a small image.
pub fn toml_model(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = stride_models::from_toml("fuzz.toml", text, &mut Rng::seed(0), SPEC);
}

/// The targets by name, as `fuzz/fuzz_targets/` names them.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[("idx", idx), ("cifar", cifar), ("image", image), ("checkpoint", checkpoint), ("toml_model", toml_model)];
