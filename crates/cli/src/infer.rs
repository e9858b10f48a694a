//! `stride eval` and `stride run`: a trained model on a test set, or on a tensor file.

use std::path::PathBuf;

use clap::Args;
use stride_autograd::{no_grad, Rng, Var};
use stride_models::InputSpec;
use stride_nn::{Ctx, Module};
use stride_train::checkpoint;

#[derive(Args)]
pub struct EvalArgs {
    /// Zoo model the weights belong to.
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Weights: a run's model.safetensors (or checkpoint.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Data set whose test split to evaluate on (as for `stride train`).
    #[arg(long, default_value = "mnist")]
    data: String,
}

#[derive(Args)]
pub struct RunArgs {
    /// Zoo model the weights belong to.
    #[arg(long, default_value = "cnn")]
    model: String,
    #[arg(long)]
    weights: PathBuf,
    /// A safetensors file with an f32 tensor named `input`, [N, C, H, W].
    #[arg(long)]
    input: PathBuf,
    /// Where to write the tensor `output` (the model's raw outputs, eval mode).
    #[arg(long)]
    output: PathBuf,
    /// Classes the model was built for.
    #[arg(long, default_value_t = 10)]
    classes: usize,
}

/// Builds `model` for `spec` and loads `weights` into it (optimizer entries are ignored).
fn load_model(model: &str, spec: InputSpec, weights: &PathBuf) -> Result<stride_nn::layers::Sequential, Box<dyn std::error::Error>> {
    let mut m = stride_models::build_any(model, &mut Rng::seed(0), spec)?;
    let mut tensors = checkpoint::load(weights)?;
    tensors.retain(|k, _| !k.starts_with("optimizer."));
    checkpoint::load_into(&mut m, &tensors)?;
    Ok(m)
}

pub fn eval(a: &EvalArgs) -> Result<(), Box<dyn std::error::Error>> {
    let data = stride_data::load(&a.data)?;
    let t = &data.train;
    let spec = InputSpec { channels: t.channels, height: t.height, width: t.width, classes: t.classes };
    let mut model = load_model(&a.model, spec, &a.weights)?;
    let ev = stride_train::evaluate(&mut model, &data.test, 500, t.pixel_stats())?;
    println!("{} on the {} test images of {}: loss {:.4}", a.model, data.test.len(), data.name, ev.loss);
    println!("per-class accuracy:");
    for (c, acc) in ev.per_class_accuracy().iter().enumerate() {
        println!("  class {c:>2}: {acc:.4} ({} images)", ev.confusion[c].iter().sum::<usize>());
    }
    println!("confusion matrix (rows: true class, columns: predicted):");
    for row in &ev.confusion {
        println!("  {}", row.iter().map(|v| format!("{v:>5}")).collect::<String>());
    }
    println!("test accuracy {:.4}", ev.accuracy);
    Ok(())
}

pub fn run(a: &RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let tensors = checkpoint::load(&a.input)?;
    let x = tensors
        .get("input")
        .ok_or_else(|| format!("{}: no tensor named 'input' (found: {:?})", a.input.display(), tensors.keys().collect::<Vec<_>>()))?;
    let [_, c, h, w] = x.shape()[..] else {
        return Err(format!("{}: 'input' has shape {:?}, expected [N, C, H, W]", a.input.display(), x.shape()).into());
    };
    let mut model = load_model(&a.model, InputSpec { channels: c, height: h, width: w, classes: a.classes }, &a.weights)?;
    let y = no_grad(|| model.forward(&Var::constant(x.clone()), &mut Ctx::eval()))?;
    checkpoint::save(&a.output, &[("output".to_string(), y.value())])?;
    println!("wrote 'output' {:?} to {}", y.shape(), a.output.display());
    Ok(())
}
