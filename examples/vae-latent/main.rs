//! A variational autoencoder with a two-dimensional code, trained on the embedded MNIST by
//! `stride_train::vae`, then looked at through its code with `stride_train::latent`: where each
//! digit's images land, how well the code alone tells the digits apart, and what the generator
//! draws between them (see README.md beside this file).
//!
//! ```sh
//! cargo run --release -p stride-cli --example vae-latent [-- OUT_DIR]
//! ```

use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_models::vae::Vae;
use stride_nn::Ctx;
use stride_train::latent;
use stride_train::vae::{self as v, VaeConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "runs/vae-latent".into()));
    // The digits at 32x32, the size the VAE reads.
    let data = v::prepare(&stride_data::embedded_mnist()?)?;
    let mut model = Vae::with_latent(&mut Rng::seed(0), 2)?;
    println!("1. a VAE with a {}-d code: {} parameters", model.latent(), stride_nn::Module::num_parameters(&mut model));
    let cfg = VaeConfig { epochs: 4, out_dir: Some(out.clone()), ..VaeConfig::default() };
    v::train_vae(&mut model, &data, &cfg, None, |r| println!("   epoch {}: held-out L_tot {:.1} (L_KL {:.2})", r.epoch, r.total, r.kl))?;

    // Each test image's code mean, and each digit's centre in the code.
    let test = &data.test;
    let all: Vec<usize> = (0..test.len()).collect();
    let codes = latent::codes(&mut model, test, &all)?;
    let z = |i: usize| [codes.data()[2 * i], codes.data()[2 * i + 1]];
    let mut centres = vec![[0.0f32; 2]; test.classes];
    let counts = test.class_counts();
    for (i, &l) in test.labels.iter().enumerate() {
        let c = &mut centres[l as usize];
        c[0] += z(i)[0] / counts[l as usize] as f32;
        c[1] += z(i)[1] / counts[l as usize] as f32;
    }
    println!("2. where each digit's test images land in the code (their mean):");
    for (d, c) in centres.iter().enumerate() {
        println!("   {d}: ({:+.2}, {:+.2})", c[0], c[1]);
    }
    // The code as a classifier no one trained: the nearest digit centre.
    let nearest = |p: [f32; 2]| (0..centres.len()).min_by(|&a, &b| dist(p, centres[a]).total_cmp(&dist(p, centres[b]))).unwrap_or(0);
    let right = (0..test.len()).filter(|&i| nearest(z(i)) == test.labels[i] as usize).count();
    println!(
        "3. the nearest centre names {right} of {} test digits ({:.1}%), from two numbers an image",
        test.len(),
        100.0 * right as f64 / test.len() as f64
    );

    // The generator along the line from the 0s' centre to the 1s', and over the whole code.
    let line: Vec<f32> = (0..8)
        .flat_map(|s| {
            let t = s as f32 / 7.0;
            [centres[0][0] + t * (centres[1][0] - centres[0][0]), centres[0][1] + t * (centres[1][1] - centres[0][1])]
        })
        .collect();
    let morph = no_grad(|| model.generate(&Var::constant(Tensor::from_vec(line, &[8, 2])?), &mut Ctx::eval()))?.value();
    v::write_grid(&out.join("zero-to-one.png"), &morph, 8, 28)?;
    v::write_grid(&out.join("map.png"), &latent::manifold(&mut model, 12)?, 12, 28)?;
    println!("4. wrote {0}/zero-to-one.png, {0}/map.png and, from the run, latent.png, manifold.png and report.html", out.display());
    Ok(())
}

fn dist(a: [f32; 2], b: [f32; 2]) -> f32 {
    (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)
}
