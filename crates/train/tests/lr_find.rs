//! The learning-rate range test: its sweep, its smoothing and suggestion against direct
//! computations, the weights it puts back, accumulation against whole batches, and its errors.

mod common;

use common::{cfg, model, small};
use stride_autograd::Rng;
use stride_models::{build, InputSpec};
use stride_nn::Module;
use stride_train::checkpoint::state_dict;
use stride_train::{lr_find, LrFind, LrFinding, LrPoint, OptimizerKind};

/// Every tensor's values, by name.
fn values(m: &mut dyn Module) -> Vec<(String, Vec<f32>)> {
    state_dict(m).into_iter().map(|(n, t)| (n, t.data().to_vec())).collect()
}

#[test]
fn a_sweep_rises_geometrically_smooths_as_documented_and_puts_the_weights_back() {
    let data = small(256, 10);
    // Batch norm's running statistics and dropout: buffers to restore and an eager network.
    let mut m = build("cnn-bn", &mut Rng::seed(3), InputSpec { channels: 1, height: 28, width: 28, classes: 10 }).unwrap();
    let before = values(&mut m);
    let find = LrFind { start: 1e-5, end: 1e-1, steps: 12, ..LrFind::default() };
    let found = lr_find(&mut m, &data.train, &cfg(1, None), &find, None).unwrap();
    assert_eq!(values(&mut m), before, "every parameter and buffer is put back bit for bit");
    assert!(!found.diverged && !found.interrupted);
    assert_eq!(found.points.len(), 12, "12 steps over 256 images in batches of 32 run into a second epoch");
    let ratio = (1e-1f64 / 1e-5).powf(1.0 / 11.0);
    for (i, p) in found.points.iter().enumerate() {
        let want = 1e-5 * ratio.powi(i as i32);
        assert!((p.lr - want).abs() <= 1e-12 * want, "step {i}: lr {} against {want}", p.lr);
    }
    assert!((found.points[11].lr - 1e-1).abs() < 1e-12, "the last step is at the end of the range");
    // fastai's smoothing: an exponential moving average, divided by 1 - beta^(i+1).
    let (beta, mut avg) = (0.98f64, 0.0f64);
    for (i, p) in found.points.iter().enumerate() {
        assert!(p.loss.is_finite() && p.loss > 0.0);
        avg = beta * avg + (1.0 - beta) * p.loss;
        let want = avg / (1.0 - beta.powi(i as i32 + 1));
        assert!((p.smoothed - want).abs() <= 1e-12 * want, "step {i}: smoothed {} against {want}", p.smoothed);
    }
    // The sweep trained: a second sweep from the restored weights repeats the first exactly.
    let again = lr_find(&mut m, &data.train, &cfg(1, None), &find, None).unwrap();
    assert_eq!(again, found);
}

#[test]
fn the_loss_falls_then_the_sweep_stops_where_it_blows_up() {
    let data = small(8000, 10);
    let mut m = model(0);
    let found = lr_find(&mut m, &data.train, &stride_train::TrainConfig { batch_size: 64, ..cfg(1, None) }, &LrFind::default(), None).unwrap();
    let p = &found.points;
    assert!(found.diverged, "Adam at rates up to 10 blows up: {} points", p.len());
    assert!(p.len() < 100, "it stopped early: {} points", p.len());
    let lowest = p.iter().map(|q| q.smoothed).fold(f64::INFINITY, f64::min);
    assert!(p.last().unwrap().smoothed > 4.0 * lowest, "it stops past 4x the lowest smoothed loss");
    assert!(p[..p.len() - 1].iter().all(|q| q.smoothed <= 4.0 * lowest), "and not before");
    assert!(lowest < 0.8 * p[0].smoothed, "the loss fell first: {lowest} from {}", p[0].smoothed);
    // The tutorial CNN trains well with Adam between about 1e-3 and 1e-2 (README: 2e-3); the
    // steepest fall lies in the sweep's falling part, before the lowest loss.
    let steep = found.steepest().expect("a falling loss gives a suggestion");
    assert!((1e-4..=5e-2).contains(&steep), "suggested {steep}");
    assert!(steep <= found.lowest().unwrap(), "steepest {steep} after the lowest loss at {}", found.lowest().unwrap());
}

#[test]
fn accumulated_halves_follow_whole_batches_and_planned_steps_the_eager_ones() {
    let data = small(320, 10);
    let find = LrFind { start: 1e-4, end: 1e-2, steps: 8, ..LrFind::default() };
    let whole = lr_find(&mut model(1), &data.train, &cfg(1, None), &find, None).unwrap();
    let halves =
        lr_find(&mut model(1), &data.train, &stride_train::TrainConfig { batch_size: 16, accumulate: 2, ..cfg(1, None) }, &find, None).unwrap();
    let eager = lr_find(&mut model(1), &data.train, &stride_train::TrainConfig { eager: true, ..cfg(1, None) }, &find, None).unwrap();
    assert_eq!(whole.points.len(), 8);
    for (other, what) in [(&halves, "2 x 16 accumulated"), (&eager, "eager steps")] {
        assert_eq!(other.points.len(), 8, "{what}");
        for (i, (a, b)) in whole.points.iter().zip(&other.points).enumerate() {
            assert_eq!(a.lr, b.lr);
            assert!((a.loss - b.loss).abs() <= 1e-4 * a.loss, "{what}, step {i}: loss {} against batches of 32's {}", b.loss, a.loss);
        }
    }
    // Each half counted in full would double the gradient: Adam hides a scale, SGD does not.
    let sgd = |batch_size, accumulate| stride_train::TrainConfig {
        batch_size,
        accumulate,
        optimizer: OptimizerKind::Sgd { momentum: 0.0, nesterov: false },
        ..cfg(1, None)
    };
    let find = LrFind { start: 1e-2, end: 1e-1, steps: 6, ..LrFind::default() };
    let (a, b) = (
        lr_find(&mut model(2), &data.train, &sgd(32, 1), &find, None).unwrap(),
        lr_find(&mut model(2), &data.train, &sgd(16, 2), &find, None).unwrap(),
    );
    for (i, (a, b)) in a.points.iter().zip(&b.points).enumerate() {
        assert!((a.loss - b.loss).abs() <= 1e-4 * a.loss, "SGD step {i}: {} against {}", b.loss, a.loss);
    }
}

fn curve(f: impl Fn(f64) -> f64, n: usize) -> LrFinding {
    // Rates 1e-7 .. 1e1, evenly in log10.
    let points = (0..n)
        .map(|i| {
            let lr = 10f64.powf(-7.0 + 8.0 * i as f64 / (n - 1) as f64);
            LrPoint { lr, loss: f(lr.log10()), smoothed: f(lr.log10()) }
        })
        .collect();
    LrFinding { points, diverged: false, interrupted: false }
}

#[test]
fn the_suggestion_is_the_steepest_fall_of_the_smoothed_loss() {
    // 2 - tanh(x + 3) falls fastest at x = -3: lr 1e-3.
    let found = curve(|x| 2.0 - (x + 3.0).tanh(), 81);
    let s = found.steepest().unwrap();
    assert!((s.log10() + 3.0).abs() < 1e-9, "suggested {s}");
    assert!((found.lowest().unwrap() - 10.0).abs() < 1e-9, "a falling curve's lowest loss is at its end");
    // Only the fall to the lowest point counts: not a fall after a blow-up (towards a broken
    // network's constant guess), nor one in the first tenth, where the average still leans on
    // its first values.
    let mut ends = curve(|x| 2.0 - (x + 3.0).tanh(), 81);
    for (i, p) in ends.points.iter_mut().enumerate().skip(60) {
        p.smoothed = if i < 70 { 100.0 * (i - 59) as f64 } else { 1000.0 - 50.0 * (i - 69) as f64 };
    }
    ends.points[1].smoothed = 50.0;
    assert!((ends.steepest().unwrap().log10() + 3.0).abs() < 1e-9, "{:?}", ends.steepest());
    assert!((ends.lowest().unwrap().log10() + 1.1).abs() < 1e-9, "the lowest before the blow-up, at 10^-1.1");
    // A loss that never falls gives no suggestion; nor do too few points.
    assert_eq!(curve(|x| x, 81).steepest(), None);
    assert_eq!(curve(|x| -x, 2).steepest(), None);
    assert!(curve(|x| -x, 3).steepest().is_some());
    assert_eq!(LrFinding::default().steepest(), None);
    assert_eq!(LrFinding::default().lowest(), None);
    let csv = curve(|x| -x, 3).to_csv();
    assert_eq!(csv.lines().next(), Some("step,lr,loss,smoothed_loss"));
    assert_eq!(csv.lines().nth(1), Some("1,1e-7,7.000000,7.000000"));
}

#[test]
fn bad_sweeps_and_empty_data_are_refused_by_value() {
    let data = small(64, 10);
    let bad = |find: LrFind, want: &str| {
        let e = lr_find(&mut model(0), &data.train, &cfg(1, None), &find, None).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    };
    bad(LrFind { start: 0.0, ..LrFind::default() }, "from a positive start, got 0 to 10");
    bad(LrFind { start: 1.0, end: 0.5, ..LrFind::default() }, "got 1 to 0.5");
    bad(LrFind { end: f64::INFINITY, ..LrFind::default() }, "to inf");
    bad(LrFind { steps: 1, ..LrFind::default() }, "2 to 100000 steps, got 1");
    bad(LrFind { steps: 100_001, ..LrFind::default() }, "got 100001");
    bad(LrFind { smoothing: 1.0, ..LrFind::default() }, "smoothing must be in [0, 1), got 1");
    bad(LrFind { diverge: 1.0, ..LrFind::default() }, "above 1 (times the lowest loss), got 1");
    let empty = common::take(&data.train, 0);
    let e = lr_find(&mut model(0), &empty, &cfg(1, None), &LrFind::default(), None).unwrap_err().to_string();
    assert!(e.contains("needs images (0)"), "{e}");
}
