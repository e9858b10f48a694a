//! `stride export` and `stride import`: ONNX out and in.

use std::path::PathBuf;

use clap::Args;
use stride_autograd::{Rng, Tensor};
use stride_models::vae::Vae;
use stride_models::InputSpec;
use stride_train::checkpoint;

#[derive(Args)]
pub struct ExportArgs {
    /// Zoo model, TOML model file, or `vae` (its generator, from a 100-d code to an image).
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Trained weights (a run's model.safetensors, or vae.safetensors); without them the
    /// model's initial weights are written.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The ONNX file to write.
    #[arg(long)]
    out: PathBuf,
    /// ONNX operator set (13 to 23).
    #[arg(long, default_value_t = stride_onnx::DEFAULT_OPSET)]
    opset: i64,
}

#[derive(Args)]
pub struct ImportArgs {
    /// An ONNX model (`.onnx`), its weights inside.
    model: PathBuf,
    /// Where to write its weights as a safetensors state_dict (names from the file).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn export(a: &ExportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = if a.model == "vae" {
        let mut vae = match &a.weights {
            Some(w) => crate::vae::load_vae(w)?,
            None => {
                eprintln!("note: no --weights: writing the VAE's initial weights");
                Vae::new(&mut Rng::seed(0))?
            }
        };
        let example = Tensor::zeros(&[1, vae.latent()])?;
        stride_onnx::export_with(example, a.opset, |g, z| vae.export_generator(g, z))?
    } else {
        let (mut model, chw, header) = match &a.weights {
            Some(w) => {
                let t = crate::infer::load_trained(&a.model, w)?;
                (t.model, t.chw, t.header)
            }
            None => {
                let s: InputSpec = if a.model.ends_with(".toml") {
                    InputSpec { channels: 1, height: 28, width: 28, classes: 10 }
                } else {
                    stride_models::entry(&a.model)?.input
                };
                eprintln!("note: no --weights: writing {}'s initial weights for {}x{}x{} inputs", a.model, s.channels, s.height, s.width);
                (stride_models::build_any(&a.model, &mut Rng::seed(0), s)?, [s.channels, s.height, s.width], Default::default())
            }
        };
        // The run's header (input shape, standardisation, class names) travels as the model's
        // metadata, for `stride eval`/`predict` and for anyone feeding it with another engine.
        let metadata: Vec<(String, String)> =
            stride_train::HEADER_KEYS.iter().filter_map(|&k| Some((k.to_string(), header.get(k)?.clone()))).collect();
        if !metadata.is_empty() {
            let keys: Vec<&str> = metadata.iter().map(|(k, _)| k.as_str()).collect();
            println!("metadata from the weights' header: {}", keys.join(", "));
        }
        stride_onnx::export_annotated(&mut model, &chw, a.opset, &metadata)?
    };
    checkpoint::write_atomic(&a.out, &bytes)?;
    println!("wrote {} ({} bytes, opset {})", a.out.display(), bytes.len(), a.opset);
    Ok(())
}

pub fn import(a: &ImportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let path = a.model.display().to_string();
    let imported = stride_onnx::import(&stride_onnx::read(&a.model)?).map_err(|e| e.context(path.clone()))?;
    let mut net = imported.network;
    let dims = stride_onnx::Network::dims_text;
    println!(
        "{path}: opset {}, written by {}; {} layers; input {}, output {}",
        imported.opset,
        if imported.producer.is_empty() { "an unnamed producer" } else { &imported.producer },
        net.layers(),
        dims(&net.input_shape),
        dims(&net.output_shape)
    );
    if let Some(out) = &a.out {
        let tensors = checkpoint::state_dict(&mut net);
        // A Stride export's metadata is its run's header: the weights carry it on.
        let header: std::collections::HashMap<String, String> =
            stride_train::HEADER_KEYS.iter().filter_map(|&k| Some((k.to_string(), imported.metadata.get(k)?.clone()))).collect();
        let carried = !header.is_empty();
        checkpoint::save_with_metadata(out, &tensors, carried.then_some(header))?;
        println!(
            "wrote {} tensors to {}{}",
            tensors.len(),
            out.display(),
            if carried { " with the run's header from the model's metadata" } else { "" }
        );
    }
    Ok(())
}
