//! MixUp and CutMix in training: the mixed loss against cross-entropy towards the blended target
//! computed directly, every loss's target mass (what training plans take) against the eager
//! loss, and a mixed run that steps through plans, resumes bit for bit and refuses another
//! mix on resume.

use std::sync::atomic::AtomicBool;

use stride_autograd::{Rng, Var};
use stride_data::BatchMix;
use stride_train::{checkpoint, train, Loss, Targets, TrainConfig};

mod common;
use common::{cfg, model, small, tmp};

#[test]
fn the_mixed_loss_is_cross_entropy_towards_the_blended_smoothed_target() {
    let (n, k, lam, eps) = (6usize, 5usize, 0.3f64, 0.1f64);
    let z: Vec<f32> = Rng::seed(4).normal::<f32>(&[n, k], 0.0, 2.0).unwrap().data().to_vec();
    let (labels, partners) = ([0usize, 4, 2, 2, 1, 3], [3usize, 0, 4, 2, 2, 1]);
    let logits = Var::parameter(stride_autograd::Tensor::from_vec(z.clone(), &[n, k]).unwrap());
    let loss = Loss { label_smoothing: eps, class_weights: None };
    let l = loss.of_targets(&logits, Targets { labels: &labels, mixed: Some((&partners, lam)) }).unwrap();
    l.backward().unwrap();
    // Directly: the target puts λ(1-ε) + ε/K on the label, (1-λ)(1-ε) + ε/K on the partner's
    // (both on one class when they agree); the loss is -Σ t log softmax, its gradient
    // (softmax - t) / N.
    let (mut want, mut grad) = (0.0f64, vec![0.0f64; n * k]);
    for i in 0..n {
        let row = &z[i * k..(i + 1) * k];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        for c in 0..k {
            let p = (row[c] as f64 - max).exp() / sum;
            let t = eps / k as f64
                + if c == labels[i] { lam * (1.0 - eps) } else { 0.0 }
                + if c == partners[i] { (1.0 - lam) * (1.0 - eps) } else { 0.0 };
            want -= t * p.ln() / n as f64;
            grad[i * k + c] = (p - t) / n as f64;
        }
    }
    let have = l.value().item().unwrap() as f64;
    assert!((have - want).abs() < 1e-5 * want, "loss {have} against {want}");
    let g = logits.grad().unwrap();
    for (a, b) in g.data().iter().zip(&grad) {
        assert!((*a as f64 - b).abs() < 1e-6, "gradient {a} against {b}");
    }
    // Unmixed targets are the plain loss; the dominant labels follow λ.
    let t = Targets { labels: &labels, mixed: Some((&partners, 0.4)) };
    assert_eq!(t.dominant(), &partners);
    assert_eq!(Targets::plain(&labels).dominant(), &labels);
}

/// `Loss::mass` is the loss a training plan computes, -Σ m log softmax, with gradient
/// softmax·Σ_c m - m: for every setting it must give `of_targets`'s value and gradient.
#[test]
fn the_target_mass_gives_the_eager_loss_and_gradient_for_every_setting() {
    let (n, k) = (6usize, 4usize);
    let z: Vec<f32> = Rng::seed(9).normal::<f32>(&[n, k], 0.0, 2.0).unwrap().data().to_vec();
    let (labels, partners) = ([0usize, 3, 2, 2, 1, 3], [3usize, 0, 3, 2, 2, 1]);
    let weighted = |eps| Loss { label_smoothing: eps, class_weights: Some(vec![1.0, 2.5, 0.5, 0.0]) };
    let cases = [
        (Loss::default(), None),
        (Loss { label_smoothing: 0.2, class_weights: None }, None),
        (weighted(0.0), None),
        (weighted(0.15), None),
        (weighted(0.15), Some(0.35)),
        (Loss { label_smoothing: 0.1, class_weights: None }, Some(0.8)),
    ];
    for (loss, lam) in cases {
        let t = Targets { labels: &labels, mixed: lam.map(|l| (&partners[..], l)) };
        let logits = Var::parameter(stride_autograd::Tensor::from_vec(z.clone(), &[n, k]).unwrap());
        let l = loss.of_targets(&logits, t).unwrap();
        l.backward().unwrap();
        let m = loss.mass(t, k).unwrap();
        let (mut value, mut worst) = (0.0f64, 0.0f64);
        for i in 0..n {
            let row = &z[i * k..(i + 1) * k];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mass: f64 = m[i * k..(i + 1) * k].iter().map(|&v| v as f64).sum();
            for c in 0..k {
                let logp = row[c] as f64 - max - sum.ln();
                value -= m[i * k + c] as f64 * logp;
                let g = logp.exp() * mass - m[i * k + c] as f64;
                worst = worst.max((g - logits.grad().unwrap().data()[i * k + c] as f64).abs());
            }
        }
        let have = l.value().item().unwrap() as f64;
        assert!((value - have).abs() < 1e-5 * have.abs().max(1.0), "{loss:?} λ {lam:?}: {value} against {have}");
        assert!(worst < 1e-6, "{loss:?} λ {lam:?}: gradients differ by {worst}");
    }
    // A batch whose images all weigh 0 has no loss: a zero mass; a label past the classes and
    // weights for another number of classes are refused as the eager loss refuses them.
    let zero = Loss { label_smoothing: 0.0, class_weights: Some(vec![0.0, 1.0, 1.0, 1.0]) };
    assert!(zero.mass(Targets::plain(&[0, 0]), k).unwrap().iter().all(|&v| v == 0.0));
    let e = Loss::default().mass(Targets::plain(&[0, 4]), k).unwrap_err().to_string();
    assert!(e.contains("label 4 is outside the 4 classes"), "{e}");
    let e = weighted(0.0).mass(Targets::plain(&[0, 1]), 3).unwrap_err().to_string();
    assert!(e.contains("4 class weights for 3 classes"), "{e}");
}

#[test]
fn a_mixed_run_steps_through_plans_and_resumes_bit_for_bit() {
    let data = small(320, 64);
    let with = |dir: &std::path::Path, mix: BatchMix| TrainConfig { mix, ..cfg(2, Some(dir.to_path_buf())) };
    let both = BatchMix { mixup: 0.4, cutmix: 1.0 };
    let (plain_dir, whole, parts) = (tmp("mix-plain"), tmp("mix-whole"), tmp("mix-parts"));
    let plain = train(&mut model(7), &data, &with(&plain_dir, BatchMix::default()), false, None, |_| {}).unwrap();
    let mut a = model(7);
    let out = train(&mut a, &data, &TrainConfig { report: Some("cnn".into()), ..with(&whole, both) }, false, None, |_| {}).unwrap();
    assert_eq!(out.planned_steps, plain.planned_steps, "mixed batches step through the plans too");
    let html = std::fs::read_to_string(whole.join("report.html")).unwrap();
    assert!(html.contains("cross-entropy, batches mixed by MixUp (alpha 0.4) or CutMix (alpha 1)"), "report.html states the mixing");
    assert!(plain.planned_steps > 0);
    // Mixed images are harder to fit: the training loss stays above the plain run's.
    assert!(out.reports[1].train_loss > plain.reports[1].train_loss + 0.1, "{} vs {}", out.reports[1].train_loss, plain.reports[1].train_loss);
    let stop = AtomicBool::new(true);
    assert_eq!(train(&mut model(7), &data, &with(&parts, both), false, Some(&stop), |_| {}).unwrap().interrupted, Some((1, 1)));
    for (mix, want) in
        [(BatchMix::default(), "mixup 0.4, cutmix 1, this run has none"), (BatchMix { mixup: 0.4, cutmix: 0.0 }, "this run has mixup 0.4, cutmix 0")]
    {
        let e = train(&mut model(7), &data, &with(&parts, mix), true, None, |_| {}).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let mut b = model(99);
    train(&mut b, &data, &with(&parts, both), true, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));
    let e = train(&mut model(0), &data, &with(&tmp("mix-bad"), BatchMix { mixup: 0.0, cutmix: -2.0 }), false, None, |_| {}).unwrap_err();
    assert!(e.to_string().contains("cutmix's alpha must be 0 (off) or in (0, 100]"), "{e}");
    for d in [plain_dir, whole, parts] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
