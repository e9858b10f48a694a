//! The convolutional VAE: layer shapes, parameter count, the loss by hand, and a short run on
//! the embedded MNIST whose held-out loss must fall.

mod common;

use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_models::vae::{Vae, CLIP};
use stride_nn::{Ctx, Module};
use stride_train::vae::{self as v, VaeConfig};

#[test]
fn the_generator_has_the_articles_shapes_and_the_count_is_right() {
    let mut m = Vae::new(&mut Rng::seed(0)).unwrap();
    // Encoder 1024*500+500 + 500*500+500 + 500*200+200; generator 100*256*16 + 256*128*16 +
    // 128*64*16 + 64*1*16 weights and 2*(256+128+64+1) batch-norm scalars.
    assert_eq!(m.num_parameters(), 863_200 + 1_065_984 + 898);
    let mut h = Var::constant(Tensor::zeros(&[2, 100, 1, 1]).unwrap());
    let mut sides = Vec::new();
    for l in m.generator.layers.iter_mut() {
        h = no_grad(|| l.forward(&h, &mut Ctx::eval())).unwrap();
        sides.push((h.shape()[1], h.shape()[2]));
    }
    assert_eq!(sides, [(256, 4), (256, 4), (256, 4), (128, 4), (128, 4), (128, 4), (64, 7), (64, 8), (64, 8), (64, 8), (1, 32), (1, 32), (1, 32)]);
    let e = m.encode(&Var::constant(Tensor::zeros(&[2, 1, 28, 28]).unwrap()), &mut Ctx::eval()).unwrap_err().to_string();
    assert!(e.contains("expects [N, 1, 32, 32] images, got [2, 1, 28, 28]"), "{e}");
}

#[test]
fn the_loss_is_the_articles() {
    let mut m = Vae::new(&mut Rng::seed(1)).unwrap();
    let x = Rng::seed(2).uniform(&[3, 1, 32, 32], 0.0, 1.0).unwrap();
    let mut ctx = Ctx::eval();
    let (y, loss) = m.forward_loss(&Var::constant(x.clone()), &mut ctx).unwrap();
    // The same draw of eps, by hand.
    let (mu, sigma) = m.encode(&Var::constant(x.clone()), &mut Ctx::eval()).unwrap();
    let (mu, sigma) = (mu.value(), sigma.value());
    let kl: f64 = (0..mu.numel())
        .map(|i| {
            let (m, s) = (mu.data()[i] as f64, sigma.data()[i] as f64);
            0.5 * (m * m + s * s - (1e-8 + s * s).ln() - 1.0)
        })
        .sum::<f64>()
        / 3.0;
    let bce: f64 = x
        .data()
        .iter()
        .zip(y.value().data())
        .map(|(&t, &p)| {
            let p = (p as f64).clamp(CLIP, 1.0 - CLIP);
            -(t as f64 * p.ln() + (1.0 - t as f64) * (1.0 - p).ln())
        })
        .sum::<f64>()
        / 3.0;
    let got = |v: &Var| v.value().data()[0] as f64;
    assert!((got(&loss.kl) - kl).abs() < 1e-3 * kl.abs().max(1.0), "{} vs {kl}", got(&loss.kl));
    assert!((got(&loss.likelihood) - bce).abs() < 1e-3 * bce, "{} vs {bce}", got(&loss.likelihood));
    assert!((got(&loss.total) - bce - kl).abs() < 1e-3 * bce);
    // sigma = 1e-6 + softplus(.) is positive.
    assert!(sigma.data().iter().all(|&s| s > 0.0));
}

#[test]
fn held_out_loss_falls_on_the_embedded_mnist() {
    let full = v::prepare(&stride_data::load("mnist").unwrap()).unwrap();
    // Every fourth training image and every fourth held-out one keep the test quick.
    let thin = |d: &stride_data::Dataset| {
        let keep: Vec<usize> = (0..d.len()).step_by(4).collect();
        let plane = d.height * d.width;
        stride_data::Dataset {
            images: keep.iter().flat_map(|&i| d.images[i * plane..(i + 1) * plane].to_vec()).collect(),
            labels: keep.iter().map(|&i| d.labels[i]).collect(),
            ..d.clone()
        }
    };
    let data = stride_data::Split { train: thin(&full.train), test: thin(&full.test), ..full };
    let dir = std::env::temp_dir().join(format!("stride-vae-{}", std::process::id()));
    let mut m = Vae::new(&mut Rng::seed(0)).unwrap();
    let cfg = VaeConfig { epochs: 3, out_dir: Some(dir.clone()), ..VaeConfig::default() };
    let r = v::train_vae(&mut m, &data, &cfg, |_| {}).unwrap();
    let curve: Vec<f64> = r.iter().map(|r| r.total).collect();
    eprintln!("held-out L_tot per epoch: {curve:?}");
    assert!(curve.windows(2).all(|w| w[1] < w[0]), "{curve:?}");
    assert!(curve[2] < 0.9 * curve[0], "{curve:?}");
    // result{N}.png: a 3x3 grid of 28x28 images with 2-pixel gaps, not blank.
    for e in 1..=3 {
        let img = image_bytes(&dir.join(format!("result{e}.png")));
        assert_eq!((img.0, img.1), (92, 92));
        let inside: Vec<u8> = (0..28).flat_map(|y| (0..28).map(move |x| (y + 2) * 92 + x + 2)).map(|i| img.2[i]).collect();
        assert!(inside.iter().max().unwrap() - inside.iter().min().unwrap() > 100, "epoch {e}: a flat image");
    }
    let csv = std::fs::read_to_string(dir.join("vae_metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4);
    // report.html: the losses, and per epoch the reconstructions and the prior samples (the
    // same 16 points of the prior every epoch, as samples{N}.png).
    for e in 1..=3 {
        assert_eq!(image_bytes(&dir.join(format!("samples{e}.png"))).0, 4 * 30 + 2);
    }
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 2);
    assert!(html.contains("epoch 3: samples from the prior") && html.contains("epoch 1: reconstructions"));
    if let Some((body, _)) = common::chromium(&dir.join("report.html")) {
        assert!(body.contains(r#"data-images-decoded="6/6""#) && !body.contains("data-errors"), "{body}");
    }
    // Samples from the prior have the grid's shape.
    let s = v::sample(&mut m, 16, 3).unwrap();
    assert_eq!(s.shape(), [16, 1, 32, 32]);
    assert!(v::sample(&mut m, 0, 3).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_settings_are_refused_before_anything_is_written() {
    let data = v::prepare(&stride_data::load("mnist").unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("stride-vae-bad-{}", std::process::id()));
    let cfg = VaeConfig { out_dir: Some(dir.clone()), ..VaeConfig::default() };
    let cases = [
        (VaeConfig { epochs: 0, ..cfg.clone() }, "epochs (0) must be at least 1"),
        (VaeConfig { lr: -1.0, ..cfg.clone() }, "learning rate must be finite and >= 0, got -1"),
        (VaeConfig { batch_size: 1, ..cfg.clone() }, "batch size 1 needs at least 2"),
    ];
    for (c, want) in cases {
        let e = v::train_vae(&mut Vae::new(&mut Rng::seed(0)).unwrap(), &data, &c, |_| panic!("an epoch ran")).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!dir.exists(), "{want}: {} was made", dir.display());
    }
}

/// (width, height, gray pixels) of a PNG.
fn image_bytes(path: &std::path::Path) -> (usize, usize, Vec<u8>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Grayscale);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}
