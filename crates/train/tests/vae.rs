//! The convolutional VAE: layer shapes, parameter count, the loss by hand, a short run on the
//! embedded MNIST whose held-out loss must fall, the code's size and β, and the pictures of
//! the code (principal axes, interpolation, the map of a two-dimensional code).

mod common;

use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_models::vae::{latent_of, Vae, CLIP};
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
    let r = v::train_vae(&mut m, &data, &cfg, None, |_| {}).unwrap().reports;
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
    // The pictures of the 100-d code: its principal axes, the morphs; no map (that needs 2-d).
    assert!(html.contains("the code of 500 held-out images after epoch 3"));
    assert!(html.contains("from one class into the next") && !html.contains("what the generator draws over the code"));
    assert!(dir.join("latent.png").is_file() && !dir.join("manifold.png").exists());
    // Five pairs of neighbouring classes, ten steps each, 28x28 with 2-pixel gaps.
    let morphs = image_bytes(&dir.join("interpolation.png"));
    assert_eq!((morphs.0, morphs.1), (10 * 30 + 2, 5 * 30 + 2));
    if let Some((body, _)) = common::chromium(&dir.join("report.html")) {
        assert!(body.contains(r#"data-images-decoded="8/8""#) && !body.contains("data-errors"), "{body}");
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
        let e = v::train_vae(&mut Vae::new(&mut Rng::seed(0)).unwrap(), &data, &c, None, |_| panic!("an epoch ran")).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!dir.exists(), "{want}: {} was made", dir.display());
    }
}

#[test]
fn a_chosen_code_size_builds_loads_by_its_weights_and_is_checked() {
    let mut m = Vae::with_latent(&mut Rng::seed(0), 2).unwrap();
    assert_eq!(m.latent(), 2);
    // Encoder 1024*500+500 + 500*500+500 + 500*4+4; generator 2*256*16 + 256*128*16 + 128*64*16
    // + 64*16 weights and the batch norms' 898.
    assert_eq!(m.num_parameters(), 512_500 + 250_500 + 2_004 + 8_192 + 524_288 + 131_072 + 1_024 + 898);
    let tensors: std::collections::HashMap<_, _> = stride_train::checkpoint::state_dict(&mut m).into_iter().collect();
    assert_eq!(latent_of(&tensors).unwrap(), 2);
    let (mu, sigma) = m.encode(&Var::constant(Tensor::zeros(&[3, 1, 32, 32]).unwrap()), &mut Ctx::eval()).unwrap();
    assert_eq!((mu.shape(), sigma.shape()), (vec![3, 2], vec![3, 2]));
    let e = m.generate(&Var::constant(Tensor::zeros(&[3, 100]).unwrap()), &mut Ctx::eval()).unwrap_err().to_string();
    assert!(e.contains("the generator expects codes [N, 2], got [3, 100]"), "{e}");
    for bad in [0, 1025] {
        let e = Vae::with_latent(&mut Rng::seed(0), bad).err().unwrap().to_string();
        assert!(e.contains(&format!("the code size must be 1..=1024, got {bad}")), "{e}");
    }
    // Another network's weights are not taken for a VAE's.
    let e = latent_of(&std::collections::HashMap::new()).unwrap_err().to_string();
    assert!(e.contains("no generator.0.weight: not a VAE's"), "{e}");
    let odd = [("generator.0.weight".to_string(), Tensor::zeros(&[2, 256, 3, 3]).unwrap())].into_iter().collect();
    let e = latent_of(&odd).unwrap_err().to_string();
    assert!(e.contains("generator.0.weight is [2, 256, 3, 3]"), "{e}");
    // The VAE's default is the article's 100-d code.
    assert_eq!(Vae::new(&mut Rng::seed(0)).unwrap().latent(), 100);
}

#[test]
fn principal_axes_find_known_directions_and_their_shares() {
    // 4,000 points in 5-d: spread 3 along u, 1 along v (orthonormal), 0.1 in every direction.
    let (n, d) = (4000, 5);
    let u = [0.6, 0.0, 0.8, 0.0, 0.0];
    let v = [0.0, -0.8, 0.0, 0.6, 0.0];
    let mut rng = Rng::seed(7);
    let a: Tensor<f64> = rng.normal(&[n, 2], 0.0, 1.0).unwrap();
    let noise: Tensor<f64> = rng.normal(&[n, d], 0.0, 0.1).unwrap();
    let x: Vec<f64> = (0..n)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .map(|(i, j)| 5.0 + 3.0 * a.data()[2 * i] * u[j] + a.data()[2 * i + 1] * v[j] + noise.data()[i * d + j])
        .collect();
    let (axes, shares) = stride_train::latent::principal_axes(&x, n, d, 2);
    // Signs put the largest entry positive: u as it is, v turned round.
    let want = [u, v.map(|x| -x)];
    for k in 0..2 {
        let off = axes[k].iter().zip(&want[k]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(off < 0.02, "axis {k}: {:?} against {:?}", axes[k], want[k]);
        assert!((axes[k].iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-9);
    }
    // Variances 9, 1 and 5 x 0.01 of noise: shares 9/10.05 and 1/10.05 (the sample's own, so
    // within a few per cent).
    assert!((shares[0] - 9.0 / 10.05).abs() < 0.03 && (shares[1] - 1.0 / 10.05).abs() < 0.01, "{shares:?}");
    // The projection of codes: a 2-d code is drawn as it is, a longer one on these axes.
    let codes = Tensor::from_vec(x.iter().map(|&v| v as f32).collect(), &[n, d]).unwrap();
    let p = stride_train::latent::plane(&codes).unwrap();
    assert!(p.axes[0].starts_with("pc1 (89%)") || p.axes[0].starts_with("pc1 (90%)"), "{:?}", p.axes);
    let want0 = (0..d).map(|j| (x[j] - 5.0) * axes[0][j]).sum::<f64>();
    // The mean is the sample's, within the spread of 4,000 points of it.
    assert!((p.points[0][0] - want0).abs() < 0.1, "{} vs {want0}", p.points[0][0]);
    let two = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
    assert_eq!(
        stride_train::latent::plane(&two).unwrap(),
        stride_train::latent::Plane { points: vec![[1.0, 2.0], [3.0, 4.0]], axes: ["z1".into(), "z2".into()] }
    );
    // One code of many dimensions has one axis at most, and no spread: it sits at the origin
    // (it had no second axis to project on, and indexing one panicked).
    let one = Tensor::from_vec(vec![1.0f32; 5], &[1, 5]).unwrap();
    assert_eq!(stride_train::latent::plane(&one).unwrap().points, vec![[0.0, 0.0]]);
}

/// Fewer points than dimensions go through the Gram matrix: the same axes and shares as the
/// covariance gives for the same points twice over (which has more points than dimensions and
/// the same covariance directions).
#[test]
fn principal_axes_of_few_points_in_many_dimensions_match_the_covariances() {
    let (n, d) = (60, 80);
    let x: Tensor<f64> = Rng::seed(12).normal(&[n, d], 0.0, 1.0).unwrap();
    // Some structure: the first coordinate stretched, the second tied to the third.
    let mut x = x.data().to_vec();
    for row in x.chunks_exact_mut(d) {
        row[0] *= 4.0;
        row[1] = 2.0 * row[2] + 0.1 * row[1];
    }
    let twice: Vec<f64> = [x.clone(), x.clone()].concat();
    let (ga, gs) = stride_train::latent::principal_axes(&x, n, d, 2);
    let (ca, cs) = stride_train::latent::principal_axes(&twice, 2 * n, d, 2);
    for k in 0..2 {
        let off = ga[k].iter().zip(&ca[k]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(off < 1e-6, "axis {k} differs by {off}");
        assert!((gs[k] - cs[k]).abs() < 1e-9, "share {k}: {} vs {}", gs[k], cs[k]);
    }
    assert!(ga[0][0].abs() > 0.9, "the stretched coordinate leads: {:?}", &ga[0][..3]);
}

#[test]
fn morphs_run_between_the_two_codes_and_the_map_covers_the_code() {
    let data = v::prepare(&stride_data::load("mnist").unwrap()).unwrap();
    let mut m = Vae::with_latent(&mut Rng::seed(3), 2).unwrap();
    let (morphs, rows) = stride_train::latent::interpolation(&mut m, &data.test, 5, 4).unwrap();
    assert_eq!((rows, morphs.shape()), (5, &[20, 1, 32, 32][..]));
    // The first row's ends are the generator's images of the code means of the first 0 and the
    // first 1; its middle steps, of points a third and two thirds of the way.
    let first = |c: u8| data.test.labels.iter().position(|&l| l == c).unwrap();
    let ends = stride_train::latent::codes(&mut m, &data.test, &[first(0), first(1)]).unwrap();
    let e = ends.data();
    let line: Vec<f32> = [0.0f32, 1.0 / 3.0, 2.0 / 3.0, 1.0].iter().flat_map(|&t| [e[0] + t * (e[2] - e[0]), e[1] + t * (e[3] - e[1])]).collect();
    let direct = no_grad(|| m.generate(&Var::constant(Tensor::from_vec(line, &[4, 2]).unwrap()), &mut Ctx::eval())).unwrap().value();
    let row: Vec<f32> = morphs.data()[..4 * 1024].to_vec();
    assert!(row.iter().zip(direct.data()).all(|(a, b)| (a - b).abs() < 1e-5));
    // The map: row r, column c is z = (-2 + 4c/(side-1), 2 - 4r/(side-1)).
    let map = stride_train::latent::manifold(&mut m, 3).unwrap();
    let corners = Tensor::from_vec(vec![-2.0f32, 2.0, 0.0, 0.0, 2.0, -2.0], &[3, 2]).unwrap();
    let want = no_grad(|| m.generate(&Var::constant(corners), &mut Ctx::eval())).unwrap().value();
    for (k, at) in [0usize, 4, 8].into_iter().enumerate() {
        let got = &map.data()[at * 1024..(at + 1) * 1024];
        assert!(got.iter().zip(&want.data()[k * 1024..(k + 1) * 1024]).all(|(a, b)| (a - b).abs() < 1e-5), "grid image {at}");
    }
    let e = stride_train::latent::manifold(&mut Vae::new(&mut Rng::seed(0)).unwrap(), 15).unwrap_err().to_string();
    assert!(e.contains("needs a two-dimensional code (--latent 2); this VAE's has 100"), "{e}");
    assert!(stride_train::latent::interpolation(&mut m, &data.test, 5, 1).is_err());
}

#[test]
fn beta_weighs_the_kl_term_and_a_two_dimensional_run_draws_its_map() {
    let mut m = Vae::new(&mut Rng::seed(1)).unwrap();
    let x = Rng::seed(2).uniform(&[3, 1, 32, 32], 0.0, 1.0).unwrap();
    let (_, loss) = m.forward_loss(&Var::constant(x), &mut Ctx::eval()).unwrap();
    let got = |v: &Var| v.value().data()[0] as f64;
    let (lik, kl) = (got(&loss.likelihood), got(&loss.kl));
    for beta in [0.0, 0.5, 4.0] {
        let o = got(&loss.objective(beta).unwrap());
        assert!((o - (lik + beta * kl)).abs() < 1e-4 * o.abs(), "β {beta}: {o} against {}", lik + beta * kl);
    }
    // Training with β = 0 leaves the KL term out: the code drifts from the prior, and the
    // held-out KL ends far above a β = 1 run's from the same start.
    let full = v::prepare(&stride_data::load("mnist").unwrap()).unwrap();
    // The test split is sorted by class: every fourth image keeps all ten.
    let test = full.test.subset(&stride_train::latent::spread(full.test.len(), 500)).unwrap();
    let data = stride_data::Split { train: common::take(&full.train, 2000), test, ..full };
    let run = |beta: f64, out: Option<std::path::PathBuf>| {
        let cfg = VaeConfig { epochs: 1, beta, out_dir: out, ..VaeConfig::default() };
        v::train_vae(&mut Vae::with_latent(&mut Rng::seed(4), 2).unwrap(), &data, &cfg, None, |_| {}).unwrap().reports[0]
    };
    let dir = common::tmp("vae-beta");
    let (free, plain) = (run(0.0, None), run(1.0, Some(dir.clone())));
    assert!(free.kl > 3.0 * plain.kl, "held-out KL {} with β 0, {} with β 1", free.kl, plain.kl);
    // A 2-d run draws the map of its code, and its report shows it.
    assert_eq!(image_bytes(&dir.join("manifold.png")).0, 15 * 30 + 2);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("what the generator draws over the code") && html.contains("2 dimensions; training minimised L_likelihood + 1 L_KL"));
    for bad in [-1.0, f64::NAN, 1e5] {
        let cfg = VaeConfig { beta: bad, ..VaeConfig::default() };
        let e = v::train_vae(&mut Vae::new(&mut Rng::seed(0)).unwrap(), &data, &cfg, None, |_| panic!("an epoch ran")).unwrap_err().to_string();
        assert!(e.contains("β (the KL term's weight) must be in 0..=10000"), "{e}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_run_stopped_inside_an_epoch_resumes_at_that_step_bit_for_bit() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let full = v::prepare(&stride_data::load("mnist").unwrap()).unwrap();
    let test = full.test.subset(&stride_train::latent::spread(full.test.len(), 100)).unwrap();
    let data = stride_data::Split { train: common::take(&full.train, 320), test, ..full };
    let (whole, parts) = (common::tmp("vae-steps-whole"), common::tmp("vae-steps-parts"));
    let cfg = |dir: &std::path::Path, resume: bool| VaeConfig { epochs: 2, out_dir: Some(dir.to_path_buf()), resume, ..VaeConfig::default() };
    let fresh = |seed| Vae::with_latent(&mut Rng::seed(seed), 3).unwrap();
    let mut a = fresh(5);
    let straight = v::train_vae(&mut a, &data, &cfg(&whole, false), None, |_| {}).unwrap();
    assert_eq!((straight.reports.len(), straight.interrupted), (2, None));
    // A stop asked for before the first step: the run ends after it, inside epoch 1, with no
    // epoch finished; each resume (a new process's worth of state) goes one step further.
    let stop = AtomicBool::new(true);
    let o = v::train_vae(&mut fresh(5), &data, &cfg(&parts, false), Some(&stop), |_| panic!("an epoch finished")).unwrap();
    assert_eq!((o.reports.len(), o.interrupted), (0, Some((1, 1))));
    assert!(!parts.join("vae_metrics.csv").exists());
    let o = v::train_vae(&mut fresh(98), &data, &cfg(&parts, true), Some(&stop), |_| panic!("an epoch finished")).unwrap();
    assert_eq!(o.interrupted, Some((1, 2)));
    // Asked for as epoch 1 ends: that epoch is finished and saved, then the run stops.
    stop.store(false, Ordering::SeqCst);
    let o = v::train_vae(&mut fresh(97), &data, &cfg(&parts, true), Some(&stop), |_| stop.store(true, Ordering::SeqCst)).unwrap();
    assert_eq!((o.reports.len(), o.interrupted), (1, Some((2, 0))));
    let mut b = fresh(96);
    let resumed = v::train_vae(&mut b, &data, &cfg(&parts, true), None, |_| {}).unwrap();
    // The first epoch's training loss summed over three processes, and everything after, as if
    // the run had never stopped.
    let losses = |r: &[v::VaeReport]| r.iter().map(|r| (r.epoch, r.train_total, r.total, r.likelihood, r.kl)).collect::<Vec<_>>();
    assert_eq!(losses(&resumed.reports), losses(&straight.reports));
    for ((na, ta), (nb, tb)) in stride_train::checkpoint::state_dict(&mut a).iter().zip(&stride_train::checkpoint::state_dict(&mut b)) {
        assert!(na == nb && ta.data() == tb.data(), "{na} differs after resuming");
    }
    // A checkpoint whose step is not a number is refused by name.
    let path = parts.join(v::CHECKPOINT);
    let (tensors, mut meta) = stride_train::checkpoint::load_with_metadata(&path).unwrap();
    meta.insert("step".into(), "3x".into());
    stride_train::checkpoint::save_with_metadata(&path, &tensors.into_iter().collect::<Vec<_>>(), Some(meta)).unwrap();
    let e = v::train_vae(&mut fresh(5), &data, &VaeConfig { epochs: 3, ..cfg(&parts, true) }, None, |_| panic!("an epoch ran")).unwrap_err();
    assert!(e.to_string().contains("its step, loss sum or image count is not a number"), "{e}");
}

#[test]
fn a_resumed_run_ends_as_an_uninterrupted_one_bit_for_bit() {
    let full = v::prepare(&stride_data::load("mnist").unwrap()).unwrap();
    let test = full.test.subset(&stride_train::latent::spread(full.test.len(), 200)).unwrap();
    let data = stride_data::Split { train: common::take(&full.train, 640), test, ..full };
    let (whole, parts) = (common::tmp("vae-whole"), common::tmp("vae-parts"));
    let cfg = |epochs: usize, dir: &std::path::Path, resume: bool| VaeConfig {
        epochs,
        beta: 2.0,
        out_dir: Some(dir.to_path_buf()),
        resume,
        ..VaeConfig::default()
    };
    let fresh = || Vae::with_latent(&mut Rng::seed(5), 3).unwrap();
    let mut a = fresh();
    let straight = v::train_vae(&mut a, &data, &cfg(3, &whole, false), None, |_| {}).unwrap().reports;
    // One epoch, then a new process's worth of state (a model from another seed) resumes to 3.
    v::train_vae(&mut fresh(), &data, &cfg(1, &parts, false), None, |_| {}).unwrap();
    let mut b = Vae::with_latent(&mut Rng::seed(99), 3).unwrap();
    let mut seen = Vec::new();
    let resumed = v::train_vae(&mut b, &data, &cfg(3, &parts, true), None, |r| seen.push(r.epoch)).unwrap().reports;
    assert_eq!(seen, [2, 3], "the resumed run trains the epochs left");
    let losses = |r: &[v::VaeReport]| r.iter().map(|r| (r.epoch, r.train_total, r.total, r.likelihood, r.kl)).collect::<Vec<_>>();
    assert_eq!(losses(&resumed), losses(&straight));
    let (sa, sb) = (stride_train::checkpoint::state_dict(&mut a), stride_train::checkpoint::state_dict(&mut b));
    assert_eq!(sa.len(), sb.len());
    for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb);
        assert!(ta.data() == tb.data(), "{na} differs after resuming");
    }
    let csv = std::fs::read_to_string(parts.join("vae_metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    // A resume with other settings, or from a folder without a checkpoint, is refused by name
    // and changes nothing.
    let cases = [
        (VaeConfig { beta: 1.0, ..cfg(4, &parts, true) }, "was written with beta 2, this run has 1"),
        (VaeConfig { lr: 1e-2, ..cfg(4, &parts, true) }, "was written with lr 0.001, this run has 0.01"),
        (VaeConfig { seed: 1, ..cfg(4, &parts, true) }, "was written with seed 0, this run has 1"),
    ];
    let before = std::fs::read(parts.join(v::CHECKPOINT)).unwrap();
    for (c, want) in cases {
        let e = v::train_vae(&mut fresh(), &data, &c, None, |_| panic!("an epoch ran")).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let e = v::train_vae(&mut Vae::with_latent(&mut Rng::seed(5), 4).unwrap(), &data, &cfg(4, &parts, true), None, |_| panic!("an epoch ran"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("was written with latent 3, this run has 4"), "{e}");
    assert_eq!(std::fs::read(parts.join(v::CHECKPOINT)).unwrap(), before);
    let empty = common::tmp("vae-empty");
    let e = v::train_vae(&mut fresh(), &data, &cfg(2, &empty, true), None, |_| panic!("an epoch ran")).unwrap_err().to_string();
    assert!(e.contains(v::CHECKPOINT), "{e}");
    for d in [whole, parts] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Colour images: three classes of noisy red, green and blue pictures. A colour VAE learns to
/// give each back in its colour, and its grids are RGB with the planes in their places.
#[test]
fn a_colour_vae_gives_back_each_colour_and_draws_in_colour() {
    let mut rng = Rng::seed(11);
    let make = |n: usize, rng: &mut Rng| {
        let noise: Tensor<f32> = rng.uniform(&[n, 3, 32, 32], 0.0, 60.0).unwrap();
        let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
        let images = (0..n * 3 * 1024).map(|j| {
            let (i, plane) = (j / 3072, j % 3072 / 1024);
            let lit = plane == labels[i] as usize;
            (if lit { 190.0 } else { 10.0 } + noise.data()[j]) as u8
        });
        stride_data::Dataset { images: images.collect(), labels, channels: 3, height: 32, width: 32, classes: 3 }
    };
    let data = stride_data::Split {
        name: "colours".into(),
        train: make(300, &mut rng),
        test: make(30, &mut rng),
        class_names: vec!["red".into(), "green".into(), "blue".into()],
    };
    let data = v::prepare(&data).unwrap();
    // A grey VAE refuses colour images by their shape.
    let e = v::train_vae(&mut Vae::new(&mut Rng::seed(0)).unwrap(), &data, &VaeConfig::default(), None, |_| panic!("an epoch ran"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("this VAE trains on 1x32x32 images, colours has 3x32x32"), "{e}");
    let dir = common::tmp("vae-colour");
    let mut m = Vae::for_images(&mut Rng::seed(2), 3, 4).unwrap();
    assert_eq!(m.channels(), 3);
    let cfg = VaeConfig { epochs: 5, batch_size: 16, out_dir: Some(dir.clone()), ..VaeConfig::default() };
    v::train_vae(&mut m, &data, &cfg, None, |_| {}).unwrap();
    let back = v::reconstructions(&mut m, &data.test, 3).unwrap();
    assert_eq!(back.shape(), [3, 3, 32, 32]);
    // reconstructions() takes images spread over the set: 0, 10 and 20, a red, a green and a
    // blue one; each comes back brightest in its own plane.
    for (k, i) in [0usize, 10, 20].into_iter().enumerate() {
        let img = &back.data()[k * 3072..(k + 1) * 3072];
        let means: Vec<f32> = (0..3).map(|p| img[p * 1024..(p + 1) * 1024].iter().sum::<f32>() / 1024.0).collect();
        let lit = data.test.labels[i] as usize;
        assert!((0..3).all(|p| p == lit || means[lit] > means[p] + 0.2), "image {i} (class {lit}): plane means {means:?}");
    }
    // RGB grids: result1.png is 3 x 3 images of 32 pixels with 2-pixel gaps, and a red plane
    // is red.
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(dir.join("result1.png")).unwrap()));
    let info = dec.read_info().unwrap().info().clone();
    assert_eq!((info.color_type, info.width, info.height), (png::ColorType::Rgb, 3 * 34 + 2, 3 * 34 + 2));
    let red = Tensor::from_vec([vec![1.0f32; 4], vec![0.0; 8]].concat(), &[1, 3, 2, 2]).unwrap();
    v::write_grid(&dir.join("red.png"), &red, 1, 2).unwrap();
    let img = image::open(dir.join("red.png")).unwrap().to_rgb8();
    assert_eq!(img.get_pixel(2, 2).0, [255, 0, 0]);
    std::fs::remove_dir_all(dir).unwrap();
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
