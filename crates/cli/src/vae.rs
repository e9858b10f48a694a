//! `stride vae` and `stride sample`: the convolutional variational autoencoder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Args;
use stride_autograd::{Device, Rng};
use stride_models::vae::Vae;
use stride_nn::Module;
use stride_train::vae::{self as v, VaeConfig};

#[derive(Args)]
pub struct VaeArgs {
    /// Data set (resized to 32x32): `mnist`, `fashion-mnist`, an IDX folder, or colour images
    /// (CIFAR-10's or CIFAR-100's folder, an image folder), for which the VAE draws in colour.
    #[arg(long, default_value = "mnist")]
    data: String,
    #[arg(long, default_value_t = 10, value_parser = crate::at_least_one)]
    epochs: usize,
    #[arg(long, default_value_t = 32, value_parser = crate::at_least_one)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true, value_parser = crate::learning_rate)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Size of the code z (1 to 1024; default 100, the article's, or the --weights' own). With 2,
    /// manifold.png draws what the generator makes of every point of the code
    #[arg(long)]
    latent: Option<usize>,
    /// β-VAE: weigh the KL term by β in what training minimises (1, the default, is the plain
    /// VAE; above 1 the code keeps closer to the prior, below 1 it carries more of each
    /// image). The printed L_tot stays L_likelihood + L_KL
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = parse_beta)]
    beta: f64,
    /// Folder for result{N}.png, samples{N}.png, latent.png, interpolation.png,
    /// vae_metrics.csv, vae.safetensors and report.html (default: under runs/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start from these weights (a vae.safetensors).
    #[arg(long, conflicts_with = "resume")]
    weights: Option<PathBuf>,
    /// Continue the run in --out where it stopped (the step Ctrl-C ended it at, or after a crash
    /// its last finished epoch), as if it had not stopped; --epochs may ask for more than it
    /// first had
    #[arg(long, requires = "out")]
    resume: bool,
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

/// β as `--beta` takes it: a number in 0..=[`v::MAX_BETA`], refused before anything runs.
fn parse_beta(s: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().ok().filter(|b| (0.0..=v::MAX_BETA).contains(b)).ok_or_else(|| format!("'{s}' is not a weight in 0..={}", v::MAX_BETA))
}

pub fn train(a: &VaeArgs, device: Device) -> Result<(), Box<dyn std::error::Error>> {
    let data = v::prepare(&stride_data::load(&a.data)?)?;
    let mut model = match &a.weights {
        Some(w) => {
            let model = load_vae(w)?;
            if let Some(l) = a.latent.filter(|&l| l != model.latent()) {
                return Err(format!("--latent {l}: the weights in {} have a {}-dimensional code", w.display(), model.latent()).into());
            }
            model
        }
        // A resumed run's code has the size its checkpoint records (the weights follow).
        None if a.resume => {
            let dir = a.out.as_deref().ok_or("--resume needs --out")?;
            let file = dir.join(v::CHECKPOINT);
            let (channels, latent) = shape_of(&stride_train::checkpoint::load(&file)?, &file)?;
            if let Some(l) = a.latent.filter(|&l| l != latent) {
                return Err(format!("--latent {l}: the run in {} has a {latent}-dimensional code", dir.display()).into());
            }
            Vae::for_images(&mut Rng::seed(a.seed), channels, latent)?
        }
        // Grey or colour, as the data are.
        None => Vae::for_images(&mut Rng::seed(a.seed), data.train.channels, a.latent.unwrap_or(stride_models::vae::LATENT))?,
    };
    let out = a.out.clone().unwrap_or_else(|| crate::train::default_out("vae", &a.data));
    println!(
        "training the VAE ({} parameters, a {}-d code{}) on {}: {} training / {} held-out images; run folder {}",
        model.num_parameters(),
        model.latent(),
        if a.beta == 1.0 { String::new() } else { format!(", β {}", a.beta) },
        data.name,
        data.train.len(),
        data.test.len(),
        out.display()
    );
    if a.resume {
        println!("resuming the run in {} where its checkpoint left it", out.display());
    }
    let cfg = VaeConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
        beta: a.beta,
        out_dir: Some(out.clone()),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        device,
        resume: a.resume,
    };
    let stop = crate::train::stop_on_ctrl_c();
    let outcome = v::train_vae(&mut model, &data, &cfg, Some(&stop), |r| {
        println!(
            "epoch {}: L_tot = {:.4}, L_likelihood = {:.4}, L_KL = {:.4}  (train L_tot {:.4}, {:.0} images/s)",
            r.epoch, r.total, r.likelihood, r.kl, r.train_total, r.images_per_second
        );
    })?;
    if let Some((epoch, step)) = outcome.interrupted {
        match step {
            0 => println!("stopped after epoch {}; checkpoint saved in {}", epoch - 1, out.display()),
            _ => println!("interrupted during epoch {epoch} after step {step}; checkpoint saved in {}", out.display()),
        }
        println!("resume: run the same command with --out {} --resume", out.display());
        return Ok(());
    }
    println!(
        "wrote {}/result*.png, samples*.png, latent.png, interpolation.png{}, vae_metrics.csv, vae.safetensors and report.html",
        out.display(),
        if model.latent() == 2 { ", manifold.png" } else { "" }
    );
    Ok(())
}

/// The image channels and code size of VAE weights read from `path` (which names errors).
fn shape_of(tensors: &HashMap<String, stride_autograd::Tensor<f32>>, path: &Path) -> Result<(usize, usize), Box<dyn std::error::Error>> {
    let named = |e: stride_nn::Error| format!("{}: {e}", path.display());
    Ok((stride_models::vae::channels_of(tensors).map_err(named)?, stride_models::vae::latent_of(tensors).map_err(named)?))
}

/// A VAE of the image channels and code size of the weights in `path` (a `vae.safetensors`),
/// holding them.
pub fn load_vae(path: &Path) -> Result<Vae, Box<dyn std::error::Error>> {
    let tensors = stride_train::checkpoint::load(path)?;
    let (channels, latent) = shape_of(&tensors, path)?;
    let mut model = Vae::for_images(&mut Rng::seed(0), channels, latent)?;
    stride_train::checkpoint::load_into(&mut model, &tensors).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(model)
}

pub fn sample(a: &SampleArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut model = load_vae(&a.weights)?;
    let images = v::sample(&mut model, a.n, a.seed)?;
    v::write_grid(&a.out, &images, a.cols, v::cell_side(&model))?;
    println!("wrote {} ({} images drawn from the prior)", a.out.display(), a.n);
    Ok(())
}
