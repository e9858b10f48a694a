//! The learning-rate range test (Leslie Smith's; fastai's `lr_find`, Lightning's
//! `Tuner.lr_find`): train for a few dozen steps while the learning rate rises geometrically
//! from far too small to far too large, and watch the loss. Where it falls fastest is a good
//! rate to train at; where it blows up is too far. The model's weights and buffers are put back
//! afterwards, so the test can run right before training.

use indicatif::{ProgressBar, ProgressStyle};
use stride_autograd::{Rng, ToDevice, Var};
use stride_data::{Batch, Batches, Dataset};
use stride_nn::optim;
use stride_nn::{Ctx, Module};

use crate::freeze::Frozen;
use crate::{
    checkpoint, forward_backward, make_optimizer, mix, mix_batch, planner, recompute, split_frozen, Loss, Result, Targets, TrainConfig, TrainError,
};

/// The most steps a sweep takes (its points are kept in memory).
pub const MAX_STEPS: usize = 100_000;

/// The sweep of a range test.
#[derive(Clone, Debug, PartialEq)]
pub struct LrFind {
    /// The first step's learning rate.
    pub start: f64,
    /// The last step's: the rates in between rise geometrically.
    pub end: f64,
    /// Updates in the sweep (each of `accumulate` batches, as the run's config says).
    pub steps: usize,
    /// Weight of the past in the smoothed loss (an exponential moving average with bias
    /// correction, as fastai smooths it), in [0, 1).
    pub smoothing: f64,
    /// Stop once the smoothed loss exceeds this multiple of its lowest so far.
    pub diverge: f64,
}

impl Default for LrFind {
    /// fastai's sweep: 100 steps from 1e-7 to 10, smoothing 0.98, stop at 4x the lowest loss.
    fn default() -> Self {
        LrFind { start: 1e-7, end: 10.0, steps: 100, smoothing: 0.98, diverge: 4.0 }
    }
}

impl LrFind {
    /// The learning rate of step `i` (0-based).
    pub fn lr(&self, i: usize) -> f64 {
        self.start * (self.end / self.start).powf(i as f64 / (self.steps - 1).max(1) as f64)
    }

    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(TrainError::Config(format!("learning-rate range test: {what}")));
        if !(self.start > 0.0 && self.start.is_finite() && self.end.is_finite() && self.end > self.start) {
            return bad(format!("the rates must rise from a positive start, got {} to {}", self.start, self.end));
        }
        if !(2..=MAX_STEPS).contains(&self.steps) {
            return bad(format!("it takes 2 to {MAX_STEPS} steps, got {}", self.steps));
        }
        if !(0.0..1.0).contains(&self.smoothing) {
            return bad(format!("the smoothing must be in [0, 1), got {}", self.smoothing));
        }
        if self.diverge.is_nan() || self.diverge <= 1.0 {
            return bad(format!("the divergence threshold must be above 1 (times the lowest loss), got {}", self.diverge));
        }
        Ok(())
    }
}

/// One step of the sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrPoint {
    pub lr: f64,
    /// The training loss of the step's batch (before its update).
    pub loss: f64,
    /// The exponential moving average of the losses so far, bias-corrected.
    pub smoothed: f64,
}

/// What a range test saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LrFinding {
    pub points: Vec<LrPoint>,
    /// The sweep stopped early: the smoothed loss passed [`LrFind::diverge`] times its lowest,
    /// or a loss was not finite (that step is not among the points).
    pub diverged: bool,
    /// Ctrl-C stopped it.
    pub interrupted: bool,
}

impl LrFinding {
    /// The rate at which the smoothed loss falls fastest against the logarithm of the rate, on
    /// its way down to its lowest point (fastai's `steep`, Lightning's suggestion, both kept to
    /// the fall: past the lowest point a sweep that broke the network can fall again, towards
    /// the loss of a constant guess): the suggested rate. The first tenth of the points (at
    /// most 10), where the average still leans on its first values, are left out. `None` with
    /// fewer than 3 points to judge or where the loss never falls.
    pub fn steepest(&self) -> Option<f64> {
        let p = &self.points;
        let skip = (p.len() / 10).min(10);
        let lowest = skip + p.get(skip..)?.iter().enumerate().min_by(|a, b| a.1.smoothed.total_cmp(&b.1.smoothed))?.0;
        let p = &p[skip..=lowest];
        if p.len() < 3 {
            return None;
        }
        let x: Vec<f64> = p.iter().map(|q| q.lr.log10()).collect();
        // Central differences inside, one-sided at the ends.
        let slope = |i: usize| {
            let (a, b) = (i.saturating_sub(1), (i + 1).min(p.len() - 1));
            (p[b].smoothed - p[a].smoothed) / (x[b] - x[a])
        };
        let (i, s) = (0..p.len()).map(|i| (i, slope(i))).min_by(|a, b| a.1.total_cmp(&b.1))?;
        (s < 0.0).then_some(p[i].lr)
    }

    /// The rate at the lowest smoothed loss (fastai suggests a tenth of it).
    pub fn lowest(&self) -> Option<f64> {
        self.points.iter().min_by(|a, b| a.smoothed.total_cmp(&b.smoothed)).map(|p| p.lr)
    }

    /// The points as CSV: `step,lr,loss,smoothed_loss`.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("step,lr,loss,smoothed_loss\n");
        for (i, p) in self.points.iter().enumerate() {
            s += &format!("{},{:e},{:.6},{:.6}\n", i + 1, p.lr, p.loss, p.smoothed);
        }
        s
    }
}

/// Runs the range test `find` on the training images `data` with everything else as `cfg`
/// trains (optimizer, weight decay, batch size and accumulation, augmentation, batch mixing,
/// standardisation, loss, frozen layers, gradient clipping, device, recompute), the batches
/// drawn by `cfg.seed`; `cfg`'s learning rate, epochs, schedule and weight average do not apply.
/// Every parameter and buffer of `model` is restored afterwards (the sweep's optimizer is its
/// own and is dropped). One process: refused with `cfg.data_parallel`. `stop` (Ctrl-C) ends
/// the sweep after the current step.
pub fn lr_find(
    model: &mut dyn Module,
    data: &Dataset,
    cfg: &TrainConfig,
    find: &LrFind,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<LrFinding> {
    find.check()?;
    if cfg.data_parallel.is_some() {
        return Err(TrainError::Config("the learning-rate range test runs in one process; run it without mpirun".into()));
    }
    if data.is_empty() || cfg.batch_size == 0 || cfg.accumulate == 0 {
        return Err(TrainError::Config(format!(
            "the learning-rate range test needs images ({}), a batch size ({}) and batches per update ({}) of at least 1",
            data.len(),
            cfg.batch_size,
            cfg.accumulate
        )));
    }
    let loss_fn = Loss { label_smoothing: cfg.label_smoothing, class_weights: cfg.class_weights.resolve(&data.class_counts())? };
    let norm = cfg.normalize.resolve(data);
    norm.check(data.channels)?;
    let segments = match cfg.recompute {
        Some(k) => Some(recompute::plan(model, [data.channels, data.height, data.width], k)?),
        None => None,
    };
    model.to(cfg.device)?;
    // What to put back: on the CPU these share storage with the weights until the first
    // update, which then writes to a copy; from a device they are read back.
    let saved: std::collections::HashMap<_, _> = checkpoint::state_dict(model).into_iter().collect();
    let (params, frozen) = split_frozen(model, &cfg.frozen)?;
    let _frozen = Frozen::new(frozen)?;
    let mut opt = make_optimizer(cfg)?;
    let mut planned = planner(cfg, segments.is_some(), false);
    let mut ctx = Ctx::train(cfg.seed);
    // Batches epoch after epoch, each epoch shuffled as a training run's would be.
    let (mut epoch, mut batches): (usize, Option<Batches>) = (0, None);
    let mut next_batch = || -> Result<Batch> {
        loop {
            if let Some(b) = batches.as_mut().and_then(Iterator::next) {
                return Ok(b);
            }
            epoch += 1;
            let mut shuffle = Rng::seed(mix(cfg.seed, epoch, usize::MAX));
            batches = Some(
                Batches::new(data, cfg.batch_size, Some(&mut shuffle), false)
                    .normalized(&norm)?
                    .augmented(&cfg.augment, mix(cfg.seed, epoch, usize::MAX - 1)),
            );
        }
    };
    let bar = if cfg.progress { ProgressBar::new(find.steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("lr range test [{bar:30}] {pos}/{len} {msg}").expect("valid template").progress_chars("=> "));
    let mut found = LrFinding::default();
    let (mut average, mut lowest) = (0.0, f64::INFINITY);
    let swept = (|| -> Result<()> {
        for i in 0..find.steps {
            let lr = find.lr(i);
            opt.set_lr(lr);
            optim::zero_grad(&params);
            let group = (0..cfg.accumulate).map(|_| next_batch()).collect::<Result<Vec<_>>>()?;
            let images: usize = group.iter().map(|b| b.labels.len()).sum();
            let mut loss_sum = 0.0;
            for (j, Batch { images: mut x, labels }) in group.into_iter().enumerate() {
                ctx.rng = Rng::seed(mix(cfg.seed, i, j));
                let lam = mix_batch(&cfg.mix, &mut x, cfg.seed, i, j)?;
                let partners = stride_data::partners(&labels);
                let targets = Targets { labels: &labels, mixed: lam.map(|l| (&partners[..], l)) };
                let x = Var::constant(x.to(cfg.device)?);
                let scale = labels.len() as f64 / images as f64;
                let (lv, _, _) = forward_backward(model, planned.as_mut(), segments.as_ref(), &x, targets, &loss_fn, scale, &mut ctx, None)?;
                loss_sum += lv as f64 * labels.len() as f64;
            }
            let loss = loss_sum / images as f64;
            if !loss.is_finite() {
                found.diverged = true;
                return Ok(());
            }
            if let Some(max) = cfg.clip_grad_norm {
                optim::clip_grad_norm(&params, max)?;
            }
            opt.step(&params)?;
            average = find.smoothing * average + (1.0 - find.smoothing) * loss;
            let smoothed = average / (1.0 - find.smoothing.powi(i as i32 + 1));
            found.points.push(LrPoint { lr, loss, smoothed });
            lowest = lowest.min(smoothed);
            bar.inc(1);
            bar.set_message(format!("lr {lr:.1e} loss {smoothed:.4}"));
            if smoothed > find.diverge * lowest {
                found.diverged = true;
                return Ok(());
            }
            if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                found.interrupted = true;
                return Ok(());
            }
        }
        Ok(())
    })();
    bar.finish_and_clear();
    // The weights go back whether or not the sweep finished.
    checkpoint::load_into(model, &saved)?;
    model.to(cfg.device)?;
    swept.map(|()| found)
}
