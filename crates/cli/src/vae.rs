//! `stride vae` and `stride sample`: the convolutional variational autoencoder.

use std::path::PathBuf;

use clap::Args;
use stride_autograd::{Device, Rng};
use stride_models::vae::Vae;
use stride_nn::Module;
use stride_train::vae::{self as v, VaeConfig};

#[derive(Args)]
pub struct VaeArgs {
    /// One-channel data set (resized to 32x32): `mnist`, `fashion-mnist` or an IDX folder.
    #[arg(long, default_value = "mnist")]
    data: String,
    #[arg(long, default_value_t = 10, value_parser = crate::at_least_one)]
    epochs: usize,
    #[arg(long, default_value_t = 32, value_parser = crate::at_least_one)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for result{N}.png, vae_metrics.csv and vae.safetensors (default: under runs/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start from these weights (a vae.safetensors).
    #[arg(long)]
    weights: Option<PathBuf>,
}

#[derive(Args)]
pub struct SampleArgs {
    /// A trained VAE's weights (vae.safetensors from `stride vae`).
    #[arg(long)]
    weights: PathBuf,
    /// The PNG to write.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// How many digits to draw.
    #[arg(long, default_value_t = 16)]
    n: usize,
    #[arg(long, default_value_t = 4)]
    cols: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn train(a: &VaeArgs, device: Device) -> Result<(), Box<dyn std::error::Error>> {
    let data = v::prepare(&stride_data::load(&a.data)?)?;
    let mut model = Vae::new(&mut Rng::seed(a.seed))?;
    if let Some(w) = &a.weights {
        crate::infer::load_weights(&mut model, w)?;
    }
    let out = a.out.clone().unwrap_or_else(|| crate::train::default_out("vae", &a.data));
    println!(
        "training the VAE ({} parameters) on {}: {} training / {} held-out images; run folder {}",
        model.num_parameters(),
        data.name,
        data.train.len(),
        data.test.len(),
        out.display()
    );
    let cfg = VaeConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
        out_dir: Some(out.clone()),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        device,
    };
    v::train_vae(&mut model, &data, &cfg, |r| {
        println!(
            "epoch {}: L_tot = {:.4}, L_likelihood = {:.4}, L_KL = {:.4}  (train L_tot {:.4}, {:.0} images/s)",
            r.epoch, r.total, r.likelihood, r.kl, r.train_total, r.images_per_second
        );
    })?;
    println!("wrote {}/result*.png, vae_metrics.csv and vae.safetensors", out.display());
    Ok(())
}

pub fn sample(a: &SampleArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut model = Vae::new(&mut Rng::seed(0))?;
    crate::infer::load_weights(&mut model, &a.weights)?;
    let images = v::sample(&mut model, a.n, a.seed)?;
    v::write_grid(&a.out, &images, a.cols, 28)?;
    println!("wrote {} ({} digits drawn from the prior)", a.out.display(), a.n);
    Ok(())
}
