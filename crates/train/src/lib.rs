//! The training loop: batches, forward, loss, backward, update; evaluation; metrics and
//! checkpoints in the run's folder.
#![forbid(unsafe_code)]

pub mod checkpoint;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use stride_autograd::{cross_entropy, no_grad, Rng, Var};
use stride_data::{Batch, Batches, Dataset, Split};
use stride_nn::optim::{self, Adam, Optimizer, Sgd};
use stride_nn::schedule::Schedule;
use stride_nn::{Ctx, Module};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] stride_nn::Error),
    #[error("{0}")]
    Io(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("the loss became {loss} at epoch {epoch}, step {step}: training stopped; the last good checkpoint is kept (try a lower learning rate)")]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f32,
    },
    #[error("{0}")]
    Config(String),
}

impl From<stride_autograd::Error> for TrainError {
    fn from(e: stride_autograd::Error) -> Self {
        TrainError::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Which optimizer, with its own hyper-parameters; the learning rate is in `TrainConfig`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    Sgd { momentum: f64, nesterov: bool },
    Adam,
    AdamW,
}

/// Everything a training run needs besides the model and the data.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    /// Learning rate per epoch.
    pub schedule: Schedule,
    /// Standardise inputs with the training set's pixel mean and std (else only scale to [0, 1]).
    pub normalize: bool,
    pub seed: u64,
    /// Where metrics.csv and model.safetensors go; nothing is written when `None`.
    pub out_dir: Option<PathBuf>,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 5,
            batch_size: 64,
            lr: 1e-3,
            optimizer: OptimizerKind::Adam,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            normalize: true,
            seed: 0,
            out_dir: None,
            progress: false,
        }
    }
}

/// Loss, accuracy and confusion matrix of one pass over a data set.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<usize>>,
}

impl Evaluation {
    /// Accuracy of each class (NaN for a class with no examples).
    pub fn per_class_accuracy(&self) -> Vec<f64> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(c, row)| row[c] as f64 / row.iter().sum::<usize>() as f64)
            .collect()
    }
}

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test: Evaluation,
    pub images_per_second: f64,
    pub lr: f64,
}

fn correct(logits: &Var, labels: &[usize]) -> Result<usize> {
    Ok(logits
        .argmax(1)?
        .iter()
        .zip(labels)
        .filter(|(p, t)| p == t)
        .count())
}

/// Evaluates `model` on `ds` in evaluation mode, without recording gradients; inputs are
/// standardised with `norm` = (mean, std).
pub fn evaluate(
    model: &mut dyn Module,
    ds: &Dataset,
    batch_size: usize,
    norm: (f32, f32),
) -> Result<Evaluation> {
    let mut ctx = Ctx::eval();
    let (mut loss, mut right) = (0.0, 0usize);
    let mut confusion = vec![vec![0; ds.classes]; ds.classes];
    no_grad(|| -> Result<()> {
        for Batch { images, labels } in
            Batches::new(ds, batch_size, None, false).normalized(norm.0, norm.1)
        {
            let logits = model.forward(&Var::constant(images), &mut ctx)?;
            loss +=
                cross_entropy(&logits, &labels, 0.0)?.value().item()? as f64 * labels.len() as f64;
            let pred = logits.argmax(1)?;
            for (&p, &t) in pred.iter().zip(&labels) {
                confusion[t][p.min(ds.classes - 1)] += 1;
                right += (p == t) as usize;
            }
        }
        Ok(())
    })?;
    let n = ds.len().max(1) as f64;
    Ok(Evaluation {
        loss: loss / n,
        accuracy: right as f64 / n,
        confusion,
    })
}

fn make_optimizer(cfg: &TrainConfig) -> Result<Box<dyn Optimizer>> {
    Ok(match cfg.optimizer {
        OptimizerKind::Sgd { momentum, nesterov } => {
            Box::new(Sgd::new(cfg.lr, momentum, nesterov, cfg.weight_decay)?)
        }
        OptimizerKind::Adam => Box::new(Adam::new(
            cfg.lr,
            (0.9, 0.999),
            1e-8,
            cfg.weight_decay,
            false,
        )?),
        OptimizerKind::AdamW => Box::new(Adam::new(
            cfg.lr,
            (0.9, 0.999),
            1e-8,
            cfg.weight_decay,
            true,
        )?),
    })
}

/// Trains `model` on `data.train`, evaluating on `data.test` after every epoch. `on_epoch` is
/// called with each epoch's report (for printing). Writes metrics.csv and model.safetensors
/// (after every epoch, atomically) when `cfg.out_dir` is set.
pub fn train(
    model: &mut dyn Module,
    data: &Split,
    cfg: &TrainConfig,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Vec<EpochReport>> {
    if cfg.epochs == 0 || cfg.batch_size == 0 {
        return Err(TrainError::Config(format!(
            "epochs ({}) and batch size ({}) must be at least 1",
            cfg.epochs, cfg.batch_size
        )));
    }
    let params = model.parameters();
    let mut opt = make_optimizer(cfg)?;
    let mut shuffle = Rng::seed(cfg.seed);
    let mut ctx = Ctx::train(cfg.seed.wrapping_add(1));
    let mut metrics = match &cfg.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
            let path = dir.join("metrics.csv");
            let mut f = std::fs::File::create(&path)
                .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
            writeln!(
                f,
                "epoch,train_loss,train_accuracy,test_loss,test_accuracy,images_per_second,lr"
            )
            .map_err(|e| TrainError::Io(e.to_string()))?;
            Some(f)
        }
        None => None,
    };
    let norm = if cfg.normalize {
        data.train.pixel_stats()
    } else {
        (0.0, 1.0)
    };
    let mut reports = Vec::new();
    for epoch in 1..=cfg.epochs {
        opt.set_lr(cfg.schedule.lr(cfg.lr, epoch - 1));
        let batches = Batches::new(&data.train, cfg.batch_size, Some(&mut shuffle), false)
            .normalized(norm.0, norm.1);
        let bar = if cfg.progress {
            ProgressBar::new(batches.num_batches() as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", cfg.epochs));
        let start = Instant::now();
        let (mut loss_sum, mut right, mut seen) = (0.0f64, 0usize, 0usize);
        for (step, Batch { images, labels }) in batches.enumerate() {
            optim::zero_grad(&params);
            let logits = model.forward(&Var::constant(images), &mut ctx)?;
            let loss = cross_entropy(&logits, &labels, 0.0)?;
            let lv = loss.value().item()?;
            if !lv.is_finite() {
                bar.abandon();
                return Err(TrainError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: lv,
                });
            }
            loss.backward()?;
            opt.step(&params)?;
            loss_sum += lv as f64 * labels.len() as f64;
            right += correct(&logits, &labels)?;
            seen += labels.len();
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.4} {:.0} img/s",
                loss_sum / seen as f64,
                right as f64 / seen as f64,
                seen as f64 / start.elapsed().as_secs_f64()
            ));
        }
        let ips = seen as f64 / start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let test = evaluate(model, &data.test, 500, norm)?;
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / seen as f64,
            train_accuracy: right as f64 / seen as f64,
            test,
            images_per_second: ips,
            lr: opt.lr(),
        };
        if let (Some(f), Some(dir)) = (metrics.as_mut(), &cfg.out_dir) {
            writeln!(
                f,
                "{},{:.6},{:.6},{:.6},{:.6},{:.1},{}",
                epoch,
                report.train_loss,
                report.train_accuracy,
                report.test.loss,
                report.test.accuracy,
                ips,
                report.lr
            )
            .and_then(|_| f.flush())
            .map_err(|e| TrainError::Io(e.to_string()))?;
            checkpoint::save(
                &dir.join("model.safetensors"),
                &checkpoint::state_dict(model),
            )?;
        }
        on_epoch(&report);
        reports.push(report);
    }
    Ok(reports)
}
