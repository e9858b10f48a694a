//! The weights' moving average: its recurrence against a direct computation, a run that keeps
//! one trains the same weights and saves the average, and it resumes bit for bit.

use std::sync::atomic::AtomicBool;

use stride_autograd::{Rng, Tensor};
use stride_models::{build, InputSpec};
use stride_nn::{Module, Slot};
use stride_train::{checkpoint, evaluate, train, Ema, Standardize, TrainConfig, EVAL_BATCH};

mod common;
use common::{cfg, model, small, tmp};

/// Every tensor of `m` by name, as f64 values.
fn values(m: &mut dyn Module) -> Vec<(String, Vec<f64>)> {
    checkpoint::state_dict(m).into_iter().map(|(n, t)| (n, t.data().iter().map(|&v| v as f64).collect())).collect()
}

/// Gives every parameter and buffer of `m` new random values (a counter stays a count).
fn scramble(m: &mut dyn Module, rng: &mut Rng) {
    m.visit("", &mut |name, slot| match slot {
        Slot::Param(v) => v.set_value(rng.normal(&v.shape(), 0.0, 1.0).unwrap()).unwrap(),
        Slot::Buffer(b) if name.ends_with("num_batches_tracked") => *b = Tensor::from_vec(vec![b.data()[0] + 1.0], b.shape()).unwrap(),
        Slot::Buffer(b) => *b = rng.uniform(b.shape(), 0.5, 2.0).unwrap(),
    });
}

#[test]
fn the_average_follows_its_recurrence_and_swaps_back_exactly() {
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let mut m = build("cnn-bn", &mut Rng::seed(0), spec).unwrap();
    let mut rng = Rng::seed(1);
    let mut ema = Ema::new(&mut m, 0.9).unwrap();
    let mut want = values(&mut m);
    for n in 0..4 {
        scramble(&mut m, &mut rng);
        ema.update(&mut m).unwrap();
        // TensorFlow's num_updates rule: min(decay, (1 + n) / (10 + n)).
        let d = f64::min(0.9, (1.0 + n as f64) / (10.0 + n as f64));
        assert_eq!(ema.decay_at(n), d);
        for ((name, w), (_, now)) in want.iter_mut().zip(values(&mut m)) {
            if name.ends_with("num_batches_tracked") {
                *w = now;
            } else {
                w.iter_mut().zip(&now).for_each(|(a, c)| *a = d * *a + (1.0 - d) * c);
            }
        }
    }
    assert_eq!(ema.updates(), 4);
    let last = checkpoint::state_dict(&mut m);
    ema.swap(&mut m).unwrap();
    for ((name, w), (_, have)) in want.iter().zip(values(&mut m)) {
        let worst = w.iter().zip(&have).map(|(a, b)| (a - b).abs() / (1.0 + a.abs())).fold(0.0, f64::max);
        assert!(worst < 1e-6, "{name}: the average is off by {worst:e}");
    }
    ema.swap(&mut m).unwrap();
    assert_eq!(checkpoint::state_dict(&mut m), last, "a second swap puts the model's own weights back bit for bit");
    assert!(Ema::new(&mut m, 1.0).unwrap_err().to_string().contains("[0, 1), such as 0.999; got 1"));
}

#[test]
fn a_run_with_an_average_trains_the_same_weights_and_evaluates_and_saves_the_average() {
    let data = small(320, 100);
    let (plain_dir, avg_dir, zero_dir) = (tmp("ema-plain"), tmp("ema-avg"), tmp("ema-zero"));
    let plain = train(&mut model(3), &data, &cfg(2, Some(plain_dir.clone())), false, None, |_| {}).unwrap();
    let mut m = model(3);
    let with = TrainConfig { ema: Some(0.95), report: Some("cnn".into()), ..cfg(2, Some(avg_dir.clone())) };
    let out = train(&mut m, &data, &with, false, None, |_| {}).unwrap();
    let html = std::fs::read_to_string(avg_dir.join("report.html")).unwrap();
    assert!(html.contains("evaluated and saved as their moving average, decay 0.95"), "report.html states the average");
    assert_eq!(out.planned_steps, plain.planned_steps, "the average leaves the planned steps alone");
    // The optimizer's weights are the run's without the average, bit for bit (the checkpoint
    // holds them beside the average).
    let (ckpt, _) = checkpoint::load_with_metadata(&avg_dir.join("checkpoint.safetensors")).unwrap();
    let (plain_ckpt, _) = checkpoint::load_with_metadata(&plain_dir.join("checkpoint.safetensors")).unwrap();
    for (name, t) in &plain_ckpt {
        assert_eq!(ckpt.get(name), Some(t), "{name}");
    }
    assert_eq!(out.reports[1].train_loss, plain.reports[1].train_loss);
    // model.safetensors holds the average, which differs from the last step's weights; the
    // model holds it when the run returns, and the last epoch's test loss is its evaluation.
    let saved = checkpoint::load(&avg_dir.join("model.safetensors")).unwrap();
    for (name, t) in &saved {
        assert_eq!(ckpt.get(&format!("ema.{name}")), Some(t), "{name}: model.safetensors is the checkpoint's average");
    }
    assert_ne!(saved.get("0.weight"), ckpt.get("0.weight"));
    assert_eq!(checkpoint::state_dict(&mut m).into_iter().collect::<std::collections::HashMap<_, _>>(), saved);
    let again = evaluate(&mut m, &data.test, EVAL_BATCH, &Standardize::TrainingImages.resolve(&data.train)).unwrap();
    assert_eq!(again.loss, out.reports[1].test.loss);
    assert_ne!(out.reports[1].test.loss, plain.reports[1].test.loss);
    // Decay 0 averages nothing: its files are the plain run's.
    train(&mut model(3), &data, &TrainConfig { ema: Some(0.0), ..cfg(2, Some(zero_dir.clone())) }, false, None, |_| {}).unwrap();
    assert_eq!(checkpoint::load(&zero_dir.join("model.safetensors")).unwrap(), checkpoint::load(&plain_dir.join("model.safetensors")).unwrap());
    for d in [plain_dir, avg_dir, zero_dir] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn a_run_with_an_average_resumes_bit_for_bit_and_refuses_another_decay() {
    let data = small(320, 64);
    let with = |dir: &std::path::Path| TrainConfig { ema: Some(0.9), ..cfg(2, Some(dir.to_path_buf())) };
    let whole = tmp("ema-whole");
    let mut a = model(7);
    train(&mut a, &data, &with(&whole), false, None, |_| {}).unwrap();
    let parts = tmp("ema-parts");
    let stop = AtomicBool::new(true);
    let out = train(&mut model(7), &data, &with(&parts), false, Some(&stop), |_| {}).unwrap();
    assert_eq!(out.interrupted, Some((1, 1)));
    for (ema, want) in [(None, "decay 0.9, this run has none"), (Some(0.99), "decay 0.9, this run has 0.99")] {
        let e = train(&mut model(7), &data, &TrainConfig { ema, ..with(&parts) }, true, None, |_| {}).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let mut b = model(99);
    train(&mut b, &data, &with(&parts), true, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));
    let files =
        |d: &std::path::Path| (checkpoint::load(&d.join("model.safetensors")).unwrap(), checkpoint::load(&d.join("checkpoint.safetensors")).unwrap());
    assert_eq!(files(&whole), files(&parts));
    for d in [whole, parts] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
