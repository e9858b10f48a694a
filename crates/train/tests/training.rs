//! Training learns, resumes bit for bit, and keeps its checkpoints safe.

use std::sync::atomic::AtomicBool;

use stride_autograd::Rng;
use stride_models::{build, InputSpec};
use stride_train::{checkpoint, train, OptimizerKind, TrainConfig, TrainError};

mod common;
use common::{cfg, model, small, tmp};

#[test]
fn a_short_run_learns() {
    let data = small(2000, 500);
    let mut m = model(0);
    let out = train(&mut m, &data, &cfg(2, None), false, None, |_| {}).unwrap();
    let r = &out.reports;
    assert_eq!(r.len(), 2);
    assert!(r[1].train_loss < r[0].train_loss, "{} then {}", r[0].train_loss, r[1].train_loss);
    assert!(r[1].test.accuracy > 0.85, "held-out accuracy {}", r[1].test.accuracy);
    assert_eq!(r[1].test.confusion.iter().flatten().sum::<usize>(), 500);
}

/// The default run steps through training plans (the tutorial CNN has nothing the planner
/// refuses), and it follows the eager run: after 30 steps of plain SGD (whose steps are
/// proportional to the gradients; Adam's would hide a scale error) the weights agree to 1e-5 of
/// each tensor's scale, and the losses to 1e-5 (measured: 2e-7 at most; with the planned
/// convolution's bias gradient 10% off, the training loss is 2.14891 against 2.14896 and fails
/// it). Not longer: the run turns chaotic in its second epoch, where a 1e-7 nudge to one weight
/// of an eager run moves the weights by 3% as much as planning does.
#[test]
fn planned_training_follows_the_eager_run() {
    let data = small(960, 200);
    let (mut a, mut b) = (model(5), model(5));
    let sgd = TrainConfig { optimizer: OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, lr: 0.05, ..cfg(1, None) };
    let planned = train(&mut a, &data, &sgd, false, None, |_| {}).unwrap();
    let eager = train(&mut b, &data, &TrainConfig { eager: true, ..sgd.clone() }, false, None, |_| {}).unwrap();
    follows(&planned, &eager, &mut a, &mut b);
}

/// A planned run (`a`, 30 planned steps) against the eager run of the same settings (`b`):
/// losses within 1e-5, weights within 1e-5 of each tensor's scale.
fn follows(planned: &stride_train::Outcome, eager: &stride_train::Outcome, a: &mut dyn stride_nn::Module, b: &mut dyn stride_nn::Module) {
    assert_eq!((planned.planned_steps, eager.planned_steps), (30, 0));
    let (p, e) = (&planned.reports[0], &eager.reports[0]);
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-5 * y.abs();
    assert!(close(p.train_loss, e.train_loss), "train loss {} vs {}", p.train_loss, e.train_loss);
    assert!(close(p.test.loss, e.test.loss), "test loss {} vs {}", p.test.loss, e.test.loss);
    let (wa, wb) = (checkpoint::state_dict(a), checkpoint::state_dict(b));
    for ((name, ta), (_, tb)) in wa.iter().zip(&wb) {
        let diff = ta.data().iter().zip(tb.data()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let scale = tb.data().iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "{name}: weights differ by {diff} (scale {scale})");
    }
}

/// Label smoothing, class weights, MixUp/CutMix and accumulated batches reach the plan as a
/// target mass: the planned run follows the eager one as the plain loss's does (the same
/// bounds, 30 SGD steps, here 2 batches of 32 per update).
#[test]
fn planned_training_with_every_loss_setting_follows_the_eager_run() {
    let data = small(960, 200);
    let (mut a, mut b) = (model(5), model(5));
    let sgd = TrainConfig {
        optimizer: OptimizerKind::Sgd { momentum: 0.0, nesterov: false },
        lr: 0.05,
        label_smoothing: 0.1,
        class_weights: stride_train::ClassWeights::Given(vec![1.0, 3.0, 0.5, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 0.25]),
        mix: stride_data::BatchMix { mixup: 0.4, cutmix: 1.0 },
        accumulate: 2,
        ..cfg(1, None)
    };
    let planned = train(&mut a, &data, &sgd, false, None, |_| {}).unwrap();
    let eager = train(&mut b, &data, &TrainConfig { eager: true, ..sgd.clone() }, false, None, |_| {}).unwrap();
    follows(&planned, &eager, &mut a, &mut b);
}

#[test]
fn stop_and_resume_equals_an_uninterrupted_run_bit_for_bit() {
    let data = small(320, 64);
    let whole = tmp("whole");
    let mut a = model(7);
    train(&mut a, &data, &cfg(2, Some(whole.clone())), false, None, |_| {}).unwrap();

    // Stopped after the first step of epoch 1, then resumed to the end.
    let parts = tmp("parts");
    let stop = AtomicBool::new(true);
    let out = train(&mut model(7), &data, &cfg(2, Some(parts.clone())), false, Some(&stop), |_| {}).unwrap();
    assert_eq!(out.interrupted, Some((1, 1)));
    let mut b = model(99); // different initial weights: everything must come from the checkpoint
    train(&mut b, &data, &cfg(2, Some(parts.clone())), true, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));

    // Stopped at the epoch boundary (a 1-epoch run), then extended to 2 epochs.
    let boundary = tmp("boundary");
    train(&mut model(7), &data, &cfg(1, Some(boundary.clone())), false, None, |_| {}).unwrap();
    let mut c = model(5);
    let out = train(&mut c, &data, &cfg(2, Some(boundary.clone())), true, None, |_| {}).unwrap();
    assert_eq!(out.reports.len(), 1);
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut c));
    // The saved files hold the same tensors and the same header entries (the header's key
    // order is the safetensors crate's choice).
    let saved = |d: &std::path::Path| checkpoint::load_with_metadata(&d.join("model.safetensors")).unwrap();
    assert_eq!(saved(&whole), saved(&boundary));
    let csv = std::fs::read_to_string(boundary.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    for d in [whole, parts, boundary] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn checkpoints_round_trip_exactly_and_refuse_what_does_not_fit() {
    let dir = tmp("roundtrip");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    let mut a = build("cnn-bn", &mut Rng::seed(1), InputSpec { channels: 1, height: 28, width: 28, classes: 10 }).unwrap();
    let sd = checkpoint::state_dict(&mut a);
    let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..7], ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked", "4.weight"]);
    checkpoint::save(&path, &sd).unwrap();
    let mut b = build("cnn-bn", &mut Rng::seed(2), InputSpec { channels: 1, height: 28, width: 28, classes: 10 }).unwrap();
    checkpoint::load_into(&mut b, &checkpoint::load(&path).unwrap()).unwrap();
    assert_eq!(checkpoint::state_dict(&mut b), sd);

    // Every problem is reported, and nothing is changed.
    let mut wrong = model(3);
    let before = checkpoint::state_dict(&mut wrong);
    let e = checkpoint::load_into(&mut wrong, &checkpoint::load(&path).unwrap()).unwrap_err().to_string();
    assert!(e.contains("'0.weight' has shape [32, 1, 3, 3], the model needs [20, 1, 3, 3]"), "{e}");
    assert!(e.contains("missing '3.weight'") && e.contains("unexpected '1.running_mean'"), "{e}");
    assert_eq!(checkpoint::state_dict(&mut wrong), before);
    // Skipping mismatched shapes does not excuse missing or unexpected names.
    let e = checkpoint::load_skipping_mismatched(&mut wrong, &checkpoint::load(&path).unwrap()).unwrap_err().to_string();
    assert!(e.contains("missing '3.weight'") && !e.contains("'0.weight' has shape"), "{e}");
    assert_eq!(checkpoint::state_dict(&mut wrong), before);
    // The same network for 3 classes: everything but the classifier loads, which is named.
    let mut three = build("cnn-bn", &mut Rng::seed(2), InputSpec { channels: 1, height: 28, width: 28, classes: 3 }).unwrap();
    let head_before: Vec<_> = checkpoint::state_dict(&mut three).into_iter().filter(|(n, _)| n.starts_with("17.")).collect();
    let skipped = checkpoint::load_skipping_mismatched(&mut three, &checkpoint::load(&path).unwrap()).unwrap();
    let names: Vec<(&str, &[usize], &[usize])> = skipped.iter().map(|s| (s.name.as_str(), &s.file[..], &s.model[..])).collect();
    assert_eq!(names, [("17.weight", &[10, 128][..], &[3, 128][..]), ("17.bias", &[10][..], &[3][..])]);
    for (name, t) in checkpoint::state_dict(&mut three) {
        match name.starts_with("17.") {
            true => assert!(head_before.contains(&(name.clone(), t)), "{name} was overwritten"),
            false => assert_eq!(Some(&t), sd.iter().find(|(n, _)| *n == name).map(|(_, t)| t), "{name} not loaded"),
        }
    }

    // Corrupt and truncated files are errors, never panics.
    let bytes = std::fs::read(&path).unwrap();
    for (name, data) in [
        ("empty", vec![]),
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("garbage", vec![0xff; 64]),
        ("huge-header", {
            let mut v = (u64::MAX / 2).to_le_bytes().to_vec();
            v.extend([b'{'; 16]);
            v
        }),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let e = checkpoint::load(&p).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors file"), "{name}: {e}");
    }
    assert!(checkpoint::load(&dir.join("absent")).is_err());
    // No temporary files are left behind by the atomic writes.
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let data = small(256, 64);
    let dir = tmp("nan");
    let sgd = |lr| TrainConfig { optimizer: OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, lr, ..cfg(1, Some(dir.clone())) };
    train(&mut model(1), &data, &sgd(0.01), false, None, |_| {}).unwrap();
    let good = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    let e = train(&mut model(1), &data, &TrainConfig { epochs: 2, ..sgd(1e300) }, true, None, |_| {}).unwrap_err();
    assert!(matches!(e, TrainError::Diverged { epoch: 2, .. }), "{e}");
    assert!(e.to_string().contains("training stopped; the last good checkpoint is kept"), "{e}");
    assert_eq!(std::fs::read(dir.join("checkpoint.safetensors")).unwrap(), good);
    // A resume with another seed or optimizer is refused with the reason.
    let e = train(&mut model(1), &data, &TrainConfig { seed: 3, epochs: 2, ..sgd(0.01) }, true, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("was written with seed 0, this run has 3"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_bad_clipping_norm_is_refused_before_anything_is_written() {
    let data = small(64, 32);
    let dir = tmp("clip");
    for bad in [-1.0, 0.0, f64::NAN] {
        let e =
            train(&mut model(1), &data, &TrainConfig { clip_grad_norm: Some(bad), ..cfg(1, Some(dir.clone())) }, false, None, |_| {}).unwrap_err();
        assert!(e.to_string().contains(&format!("clipping norm must be finite and > 0, got {bad}")), "{e}");
        assert!(!dir.exists(), "{} was created", dir.display());
    }
}

#[test]
fn plateau_runs_resume_exactly_too() {
    use stride_nn::schedule::ReduceOnPlateau;
    let data = small(192, 64);
    let plateau = |out| TrainConfig { plateau: Some(ReduceOnPlateau::new(0.5, 0, 0.9, 0.0)), ..cfg(3, Some(out)) };
    let whole = tmp("plateau-whole");
    let mut a = model(4);
    train(&mut a, &data, &plateau(whole.clone()), false, None, |_| {}).unwrap();
    let parts = tmp("plateau-parts");
    train(&mut model(4), &data, &TrainConfig { epochs: 2, ..plateau(parts.clone()) }, false, None, |_| {}).unwrap();
    let mut b = model(8);
    train(&mut b, &data, &plateau(parts.clone()), true, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));
    // Same losses, accuracies and learning rates epoch by epoch (images/s aside).
    let rows = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(d.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').enumerate().filter(|(i, _)| *i != 5).map(|(_, v)| v).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(rows(&whole), rows(&parts));
    assert_ne!(rows(&whole)[1].rsplit(',').next(), rows(&whole)[3].rsplit(',').next(), "the plateau lowered the rate");
    for d in [whole, parts] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Early stopping ends the run `patience` epochs after its lowest test loss; best.safetensors
/// then holds exactly the weights a run of that many epochs ends with, and the run resumes
/// (cut short, then continued) to the same stop with the same best weights.
#[test]
fn early_stopping_keeps_the_best_epoch_and_resumes_to_the_same_stop() {
    // Few training images overfit quickly: the test loss turns up within a few epochs.
    let data = small(96, 160);
    let patience = 2;
    let stopping = |epochs, out| TrainConfig { early_stopping: Some(patience), ..cfg(epochs, Some(out)) };
    let whole = tmp("early-whole");
    let run = train(&mut model(6), &data, &stopping(40, whole.clone()), false, None, |_| {}).unwrap();
    let losses: Vec<f64> = run.reports.iter().map(|r| r.test.loss).collect();
    let stop = run.stopped_early.unwrap_or_else(|| panic!("never stopped: {losses:?}"));
    let best = run.best.unwrap();
    eprintln!("test losses {losses:?}: best epoch {}, stopped after {stop}", best.epoch);
    assert_eq!((stop, run.reports.len()), (best.epoch + patience, stop), "{losses:?}");
    let lowest = losses.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!((best.loss, best.accuracy), (lowest, run.reports[best.epoch - 1].test.accuracy));
    assert!(losses[best.epoch..].iter().all(|&l| l >= best.loss), "{losses:?}");
    // The best epoch's weights: a plain run of that many epochs ends with them, and
    // model.safetensors holds the last epoch's.
    let plain = tmp("early-plain");
    train(&mut model(6), &data, &cfg(best.epoch, Some(plain.clone())), false, None, |_| {}).unwrap();
    let weights = |p: std::path::PathBuf| {
        let mut t: Vec<_> = checkpoint::load(&p).unwrap().into_iter().collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    assert_eq!(weights(whole.join("best.safetensors")), weights(plain.join("model.safetensors")));
    assert_ne!(weights(whole.join("best.safetensors")), weights(whole.join("model.safetensors")));
    assert!(!plain.join("best.safetensors").exists(), "written without being asked for");
    // Cut short one epoch after the best, then resumed: the same stop and the same best.
    let parts = tmp("early-parts");
    let first = train(&mut model(6), &data, &stopping(best.epoch + 1, parts.clone()), false, None, |_| {}).unwrap();
    assert_eq!(first.stopped_early, None);
    let rest = train(&mut model(9), &data, &stopping(40, parts.clone()), true, None, |_| {}).unwrap();
    assert_eq!((rest.stopped_early, rest.best, rest.reports.len()), (Some(stop), Some(best), patience - 1));
    assert_eq!(weights(whole.join("best.safetensors")), weights(parts.join("best.safetensors")));
    // Resumed once more, a stopped run stays stopped.
    let again = train(&mut model(9), &data, &stopping(40, parts.clone()), true, None, |_| {}).unwrap();
    assert_eq!((again.stopped_early, again.best, again.reports.len()), (Some(stop), Some(best), 0));
    let e = train(&mut model(1), &data, &TrainConfig { early_stopping: Some(0), ..cfg(2, None) }, false, None, |_| {}).unwrap_err();
    assert!(e.to_string().contains("patience (0 epochs) must be at least 1"), "{e}");
    for d in [whole, plain, parts] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn a_validation_split_judges_the_epochs_and_leaves_the_test_set_to_the_end() {
    // Few images: the validation loss turns up before the last epoch, so the best weights
    // differ from the last ones.
    const EPOCHS: usize = 12;
    let data = small(120, 160);
    let split = |epochs, out| TrainConfig { validation_split: Some(0.25), keep_best: true, report: Some("cnn".into()), ..cfg(epochs, Some(out)) };
    let dir = tmp("validation");
    let mut m = model(6);
    let run = train(&mut m, &data, &split(EPOCHS, dir.clone()), false, None, |_| {}).unwrap();
    let losses: Vec<f64> = run.reports.iter().map(|r| r.test.loss).collect();
    assert!(run.best.unwrap().epoch < EPOCHS, "the best epoch is the last: {losses:?}");
    // The same as a plain run on the split made beforehand: epochs judged on the held-out part.
    let (part, held) = data.train.split_validation(0.25, 0).unwrap();
    let pre = stride_data::Split { train: part.clone(), test: held.clone(), ..data.clone() };
    let plain = train(&mut model(6), &pre, &cfg(EPOCHS, None), false, None, |_| {}).unwrap();
    let figures = |o: &stride_train::Outcome| o.reports.iter().map(|r| (r.train_loss, r.train_accuracy, r.test.clone())).collect::<Vec<_>>();
    assert_eq!(figures(&run), figures(&plain));
    assert_eq!(run.reports[0].test.confusion.iter().flatten().sum::<usize>(), held.len());
    assert_eq!(plain.test, None, "no test evaluation of its own without a split");
    let header = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert!(header.starts_with("epoch,train_loss,train_accuracy,val_loss,val_accuracy,"), "{header}");
    // The test set once at the end, with the last weights (which the model still holds after
    // the best epoch's were evaluated) and with the best epoch's.
    let norm = stride_data::Normalize::of(&part);
    let last = stride_train::evaluate(&mut m, &data.test, stride_train::EVAL_BATCH, &norm).unwrap();
    assert_eq!(run.test.as_ref(), Some(&last));
    // Top-5, counted here by sorting each image's logits (10 classes, so it is reported).
    let batch = stride_data::Batches::new(&data.test, 160, None, false).normalized(&norm).unwrap().next().unwrap();
    let logits =
        stride_autograd::no_grad(|| stride_nn::Module::forward(&mut m, &stride_autograd::Var::constant(batch.images), &mut stride_nn::Ctx::eval()))
            .unwrap()
            .value();
    let hits = logits
        .data()
        .chunks_exact(10)
        .zip(&batch.labels)
        .filter(|(row, &t)| {
            let mut order: Vec<usize> = (0..10).collect();
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
            order[..5].contains(&t)
        })
        .count();
    assert_eq!(last.top5, Some(hits as f64 / 160.0));
    assert!(last.top5.unwrap() >= last.accuracy && last.top5.unwrap() < 1.0, "{:?}", last.top5);
    let mut best = model(1);
    checkpoint::load_into(&mut best, &checkpoint::load(&dir.join("best.safetensors")).unwrap()).unwrap();
    let on_best = stride_train::evaluate(&mut best, &data.test, stride_train::EVAL_BATCH, &norm).unwrap();
    assert_eq!(run.best_test.as_ref(), Some(&on_best));
    // report.html: the curves are the validation set's, the confusion matrix the test set's.
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("Confusion matrix (test set") && html.contains(&format!("{:.2}%", 100.0 * last.accuracy)), "report");
    assert!(html.contains(&format!("{} training, {} validation, 160 test", part.len(), held.len())), "report");
    // Resuming with another split (other training images) is refused and changes nothing.
    let before = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    let other = TrainConfig { validation_split: Some(0.5), ..split(EPOCHS + 1, dir.clone()) };
    let e = train(&mut model(6), &data, &other, true, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("was written with validation split 0.25, this run has 0.5"), "{e}");
    let none = TrainConfig { validation_split: None, ..split(EPOCHS + 1, dir.clone()) };
    let e = train(&mut model(6), &data, &none, true, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("was written with validation split 0.25, this run has none"), "{e}");
    assert_eq!(std::fs::read(dir.join("checkpoint.safetensors")).unwrap(), before);
    // A finished run resumed has nothing to train but still reports the test set.
    let again = train(&mut model(9), &data, &split(EPOCHS, dir.clone()), true, None, |_| {}).unwrap();
    assert_eq!((again.reports.len(), again.test.as_ref(), again.best_test.as_ref()), (0, Some(&last), Some(&on_best)));
    let e = train(&mut model(1), &data, &TrainConfig { validation_split: Some(1.5), ..cfg(1, None) }, false, None, |_| {}).unwrap_err();
    assert!(e.to_string().contains("between 0 and 1"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_given_standardisation_is_what_training_evaluation_and_the_header_use() {
    use stride_data::Normalize;
    use stride_train::Standardize;
    let data = small(320, 64);
    let dir = tmp("standardised");
    let fixed = Normalize::new(vec![0.25], vec![0.5]).unwrap();
    let with = |n: Standardize, epochs| TrainConfig { normalize: n, ..cfg(epochs, Some(dir.clone())) };
    let mut m = model(3);
    let run = train(&mut m, &data, &with(Standardize::Fixed(fixed.clone()), 1), false, None, |_| {}).unwrap();
    // The epoch's held-out figures are those of the given statistics, not the data's.
    assert_eq!(run.reports[0].test, stride_train::evaluate(&mut m, &data.test, stride_train::EVAL_BATCH, &fixed).unwrap());
    let by_data = stride_train::evaluate(&mut m, &data.test, stride_train::EVAL_BATCH, &Normalize::of(&data.train)).unwrap();
    assert_ne!(run.reports[0].test.loss, by_data.loss);
    let (_, meta) = checkpoint::load_with_metadata(&dir.join("model.safetensors")).unwrap();
    assert_eq!((meta["input_mean"].as_str(), meta["input_std"].as_str()), ("0.25", "0.5"));
    // Resuming with other statistics is refused and changes nothing.
    let before = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    let e = train(&mut model(3), &data, &with(Standardize::TrainingImages, 2), true, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("was written standardising inputs by 0.25:0.5, this run by the training images"), "{e}");
    assert_eq!(std::fs::read(dir.join("checkpoint.safetensors")).unwrap(), before);
    assert!(train(&mut model(3), &data, &with(Standardize::Fixed(fixed), 2), true, None, |_| {}).is_ok());
    // By the training images: one channel's mean and deviation, as the header records them.
    let plain = tmp("standardised-by-data");
    train(&mut model(3), &data, &cfg(1, Some(plain.clone())), false, None, |_| {}).unwrap();
    let (_, meta) = checkpoint::load_with_metadata(&plain.join("model.safetensors")).unwrap();
    let (mean, std) = data.train.pixel_stats();
    assert_eq!((meta["input_mean"].clone(), meta["input_std"].clone()), (mean.to_string(), std.to_string()));
    // Statistics for three channels do not fit the digits' one.
    let rgb = Standardize::Fixed(Normalize::imagenet());
    let e = train(&mut model(3), &data, &TrainConfig { normalize: rgb, ..cfg(1, None) }, false, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("3 values per statistic") && e.contains("1 channel"), "{e}");
    for d in [dir, plain] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn class_weights_steer_what_is_learned_and_bad_ones_are_refused_before_anything_runs() {
    use stride_train::ClassWeights;
    let data = small(640, 200);
    // Only the digit 3 weighs: the network learns to answer 3, whatever it sees.
    let mut only = [0.0; 10];
    only[3] = 1.0;
    let weighted = TrainConfig { class_weights: ClassWeights::Given(only.to_vec()), ..cfg(2, None) };
    let run = train(&mut model(2), &data, &weighted, false, None, |_| {}).unwrap();
    let test = &run.reports[1].test;
    let said_three: usize = test.confusion.iter().map(|row| row[3]).sum();
    assert!(said_three as f64 >= 0.9 * 200.0, "3 answered for {said_three} of 200: {:?}", test.confusion);
    let plain = train(&mut model(2), &data, &cfg(2, None), false, None, |_| {}).unwrap();
    assert!(plain.reports[1].test.accuracy > 0.7, "{}", plain.reports[1].test.accuracy);
    // Equal weights are the plain loss (both eager: the planner takes only the plain loss).
    let eager = TrainConfig { eager: true, ..cfg(1, None) };
    let a = train(&mut model(2), &data, &eager, false, None, |_| {}).unwrap();
    let b = train(&mut model(2), &data, &TrainConfig { class_weights: ClassWeights::Given(vec![2.5; 10]), ..eager.clone() }, false, None, |_| {})
        .unwrap();
    let (la, lb) = (a.reports[0].train_loss, b.reports[0].train_loss);
    assert!((la - lb).abs() <= 1e-5 * la, "training loss {la} vs {lb}");
    // Balanced: n / (classes x count).
    let w = ClassWeights::Balanced.resolve(&[3, 1, 0]).unwrap().unwrap();
    assert_eq!(w, [4.0 / 9.0, 4.0 / 3.0, 0.0], "a class without images gets 0");
    // Bad weights are named before the run folder is made.
    let dir = tmp("bad-weights");
    for (given, says) in [
        (vec![1.0; 9], "9 class weights given for the 10 classes"),
        (vec![1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "class 1's weight -1 is not a finite number >= 0"),
        (vec![0.0; 10], "every class weight is 0"),
    ] {
        let c = TrainConfig { class_weights: ClassWeights::Given(given), ..cfg(1, Some(dir.clone())) };
        let e = train(&mut model(1), &data, &c, false, None, |_| {}).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert!(!dir.exists());
    }
}

/// Two batches of 16 per update take the steps of one batch of 32 (the tutorial CNN: no batch
/// statistics), the epoch's short last group included; a stop waits for the group's end and
/// resumes as the run in one go.
#[test]
fn accumulated_batches_update_as_one_larger_batch() {
    let data = small(330, 64); // batches of 32: 10 full and one of 10
    let sgd = TrainConfig { optimizer: OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, lr: 0.05, eager: true, ..cfg(2, None) };
    let mut big = model(8);
    let one = train(&mut big, &data, &sgd, false, None, |_| {}).unwrap();
    let accumulating = |out| TrainConfig { batch_size: 16, accumulate: 2, out_dir: out, ..sgd.clone() };
    let mut small_batches = model(8);
    let two = train(&mut small_batches, &data, &accumulating(None), false, None, |_| {}).unwrap();
    // Measured: 2e-8 at most (sums in another order); each half-batch at full weight: 4e-2.
    let worst = |a: &mut stride_nn::layers::Sequential, b: &mut stride_nn::layers::Sequential| {
        checkpoint::state_dict(a)
            .iter()
            .zip(&checkpoint::state_dict(b))
            .flat_map(|((_, x), (_, y))| x.data().iter().zip(y.data()).map(|(p, q)| (p - q).abs() / (1.0 + p.abs())).collect::<Vec<_>>())
            .fold(0.0f32, f32::max)
    };
    let w = worst(&mut big, &mut small_batches);
    assert!(w < 1e-5, "accumulated weights differ from the large batch's by {w:e}");
    assert!((one.reports[1].train_loss - two.reports[1].train_loss).abs() < 1e-4, "{} vs {}", one.reports[1].train_loss, two.reports[1].train_loss);
    // A stop asked before the first batch takes effect after the group's second.
    let dir = tmp("accumulate");
    let stop = AtomicBool::new(true);
    let out = train(&mut model(8), &data, &accumulating(Some(dir.clone())), false, Some(&stop), |_| {}).unwrap();
    assert_eq!(out.interrupted, Some((1, 2)));
    let mut resumed = model(99);
    train(&mut resumed, &data, &accumulating(Some(dir.clone())), true, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut resumed), checkpoint::state_dict(&mut small_batches));
    let other = TrainConfig { accumulate: 4, ..accumulating(Some(dir.clone())) };
    let e = train(&mut model(8), &data, &TrainConfig { epochs: 3, ..other }, true, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("was written accumulating 2 batches per update, this run 4"), "{e}");
    let e = train(&mut model(8), &data, &TrainConfig { accumulate: 0, ..cfg(1, None) }, false, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("batches per update (0) must each be at least 1"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// With another monitor the best epoch is the first with the highest accuracy (or macro F1),
/// whatever its loss; early stopping counts from it; a resume must monitor the same.
#[test]
fn the_best_epoch_can_be_chosen_by_accuracy_or_macro_f1() {
    use stride_train::Monitor;
    let data = small(96, 160);
    for monitor in [Monitor::Accuracy, Monitor::MacroF1] {
        let dir = tmp("monitor");
        let c = TrainConfig { early_stopping: Some(3), monitor, ..cfg(30, Some(dir.clone())) };
        let run = train(&mut model(1), &data, &c, false, None, |_| {}).unwrap();
        let figure = |e: &stride_train::Evaluation| if monitor == Monitor::Accuracy { e.accuracy } else { e.macro_f1() };
        let figures: Vec<f64> = run.reports.iter().map(|r| figure(&r.test)).collect();
        let top = figures.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let first = figures.iter().position(|&f| f == top).unwrap() + 1;
        let best = run.best.unwrap();
        assert_eq!(best.epoch, first, "{monitor:?}: {figures:?}");
        // Here the most accurate epoch (4 of this seed) is not the one of lowest loss (7).
        let losses: Vec<f64> = run.reports.iter().map(|r| r.test.loss).collect();
        let lowest = losses.iter().position(|&l| l == losses.iter().copied().fold(f64::INFINITY, f64::min)).unwrap() + 1;
        assert!(monitor != Monitor::Accuracy || lowest != first, "{losses:?} {figures:?}");
        assert_eq!((best.accuracy, best.macro_f1), (run.reports[first - 1].test.accuracy, run.reports[first - 1].test.macro_f1()));
        if let Some(stop) = run.stopped_early {
            assert_eq!(stop, first + 3, "{monitor:?}: {figures:?}");
        }
        // The kept weights give that epoch's figures.
        let mut kept = model(0);
        checkpoint::load_into(&mut kept, &checkpoint::load(&dir.join("best.safetensors")).unwrap()).unwrap();
        let norm = stride_data::Normalize::of(&data.train);
        assert_eq!(figure(&stride_train::evaluate(&mut kept, &data.test, stride_train::EVAL_BATCH, &norm).unwrap()), top);
        let e = train(&mut model(1), &data, &TrainConfig { monitor: Monitor::Loss, ..c.clone() }, true, None, |_| {}).unwrap_err().to_string();
        assert!(e.contains(&format!("was written picking the best epoch by {}, this run by loss", monitor.name())), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn per_class_scores_are_scikit_learns() {
    // 3 classes; class 2 is never predicted and class 1 has no images.
    let ev = stride_train::Evaluation {
        loss: 0.0,
        accuracy: 0.0,
        top5: None,
        confusion: vec![vec![3, 1, 0], vec![0, 0, 0], vec![2, 4, 0]],
        mistakes: Vec::new(),
    };
    let s = ev.per_class();
    // Class 0: precision 3/5, recall 3/4, F1 = 2pr/(p+r) = 2/3.
    assert!((s[0].precision - 0.6).abs() < 1e-12 && (s[0].recall - 0.75).abs() < 1e-12 && (s[0].f1 - 2.0 / 3.0).abs() < 1e-12, "{:?}", s[0]);
    // Class 1: predicted 5 times, never right; no images. Class 2: never predicted.
    assert_eq!((s[1].precision, s[1].recall, s[1].f1, s[1].images), (0.0, 0.0, 0.0, 0));
    assert_eq!((s[2].precision, s[2].recall, s[2].f1, s[2].images), (0.0, 0.0, 0.0, 6));
    assert!((ev.macro_f1() - 2.0 / 9.0).abs() < 1e-12, "{}", ev.macro_f1());
}

/// Frozen batch norm normalises by its running statistics and keeps them (Keras's frozen
/// layers): fine-tuning only the classifier leaves every other tensor of the file as it was.
#[test]
fn frozen_batch_norm_keeps_its_statistics_and_normalises_by_them() {
    let data = small(320, 64);
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let mut m = build("cnn-bn", &mut Rng::seed(4), spec).unwrap();
    // Statistics of the digits first, so that they differ from the initial zeros and ones.
    train(&mut m, &data, &cfg(1, None), false, None, |_| {}).unwrap();
    let before = checkpoint::state_dict(&mut m);
    let names: Vec<String> = before.iter().map(|(n, _)| n.clone()).collect();
    let classifier = names.last().unwrap().split('.').next().unwrap().to_string();
    let frozen = stride_train::freeze_all_but(&mut m, std::slice::from_ref(&classifier)).unwrap();
    assert!(names.iter().any(|n| n.ends_with("running_mean") && !n.starts_with(&format!("{classifier}."))), "{names:?}");
    let run = train(&mut m, &data, &TrainConfig { frozen, ..cfg(2, None) }, false, None, |_| {}).unwrap();
    assert!(run.reports.iter().all(|r| r.train_loss.is_finite()), "{:?}", run.reports);
    for ((name, was), (_, is)) in before.iter().zip(&checkpoint::state_dict(&mut m)) {
        assert_eq!(was == is, !name.starts_with(&format!("{classifier}.")), "{name}");
    }
}

#[test]
fn frozen_layers_keep_their_values_and_resume_exactly() {
    use stride_nn::Module;
    let data = small(320, 64);
    // The tutorial CNN's layers: 0 and 3 convolutions, 7 and 9 dense.
    let freezing = |epochs, out| TrainConfig { frozen: vec!["0".into(), "3".into()], ..cfg(epochs, Some(out)) };
    let whole = tmp("frozen-whole");
    let (mut a, before) = (model(7), checkpoint::state_dict(&mut model(7)));
    let run = train(&mut a, &data, &freezing(2, whole.clone()), false, None, |_| {}).unwrap();
    assert!(run.reports[1].train_loss < run.reports[0].train_loss, "the rest still learns");
    let after = checkpoint::state_dict(&mut a);
    for ((name, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(was == is, name.starts_with("0.") || name.starts_with("3."), "{name}");
    }
    // No gradient was computed for them, and they are parameters again once the run is over.
    let mut seen = 0;
    a.visit("", &mut |name, slot| {
        if let (true, stride_nn::Slot::Param(v)) = (name.starts_with("0.") || name.starts_with("3."), slot) {
            assert!(v.grad().is_none() && v.requires_grad(), "{name}");
            seen += 1;
        }
    });
    assert_eq!(seen, 4);
    // Stopped after a step and resumed: the same weights as the run in one go (the optimizer's
    // state is for the trained parameters only); resuming with another set frozen is refused.
    let parts = tmp("frozen-parts");
    let stop = AtomicBool::new(true);
    train(&mut model(7), &data, &freezing(2, parts.clone()), false, Some(&stop), |_| {}).unwrap();
    let other = TrainConfig { frozen: vec!["0".into()], ..cfg(2, Some(parts.clone())) };
    let e = train(&mut model(7), &data, &other, true, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("was written with 0,3 frozen, this run freezes 0"), "{e}");
    let mut b = model(99);
    train(&mut b, &data, &freezing(2, parts.clone()), true, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut b), after);
    // Names that are no parameter's, and freezing everything, are refused before anything runs.
    for (frozen, want) in [(vec!["4"], "no parameter to freeze under '4'"), (vec!["0", "3", "7", "9"], "leaves no parameter to train")] {
        let c = TrainConfig { frozen: frozen.iter().map(|s| s.to_string()).collect(), ..cfg(1, None) };
        let e = train(&mut model(1), &data, &c, false, None, |_| {}).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(stride_train::freeze_all_but(&mut model(1), &["9".into()]).unwrap(), ["0", "3", "7"]);
    for d in [whole, parts] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn curves_png_has_both_series() {
    let dir = tmp("curves");
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("metrics.csv");
    std::fs::write(&csv, "epoch,train_loss,train_accuracy,test_loss,test_accuracy,images_per_second,lr\n1,0.9,0.7,0.8,0.75,100,0.1\n2,0.5,0.85,0.6,0.8,100,0.1\n3,0.3,0.9,0.5,0.82,100,0.1\n").unwrap();
    let png = dir.join("curves.png");
    stride_train::curves::plot_from_metrics(&csv, &png).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (900, 380));
    let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks(3).collect();
    let count = |c: [u8; 3]| px.iter().filter(|p| **p == c).count();
    assert!(count([31, 119, 180]) > 200, "train line drawn");
    assert!(count([255, 127, 14]) > 200, "test line drawn");
    assert!(count([255, 255, 255]) > px.len() / 2, "mostly background");
    std::fs::remove_dir_all(dir).unwrap();
}
