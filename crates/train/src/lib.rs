//! The training loop: batches, forward, loss, backward, update; evaluation; metrics and
//! checkpoints in the run's folder.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod curves;
mod ema;
mod freeze;
pub mod fuzzing;
pub mod group;
pub mod inspect;
pub mod latent;
mod lr_find;
mod objective;
pub mod recompute;
pub mod report;
mod resume;
mod run_report;
pub mod vae;
pub mod visual;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use stride_autograd::{cross_entropy, no_grad, Device, Rng, ToDevice, Var};
use stride_data::{Augment, Batch, BatchMix, Batches, Dataset, Normalize, Split};
use stride_nn::optim::{self, Adam, Optimizer, Sgd};
use stride_nn::schedule::{ReduceOnPlateau, Schedule};
use stride_nn::{Ctx, Module};

pub use ema::Ema;
use freeze::Frozen;
pub use freeze::{freeze_all_but, split_frozen};
pub use lr_find::{lr_find, LrFind, LrFinding, LrPoint};
use objective::Progress;
pub use objective::{Best, ClassWeights, Loss, Monitor, Targets};
pub use resume::restore_checkpoint;
use resume::{load_checkpoint, save_checkpoint, Position};
use run_report::write_report;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] stride_nn::Error),
    #[error("{0}")]
    Io(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("the loss became {loss} at epoch {epoch}, step {step}: training stopped; the last good checkpoint is kept (try a lower learning rate)")]
    Diverged { epoch: usize, step: usize, loss: f32 },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] stride_data::DataError),
}

impl From<stride_autograd::Error> for TrainError {
    fn from(e: stride_autograd::Error) -> Self {
        TrainError::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// How a run standardises its inputs after scaling pixels to [0, 1]; the weights' header
/// records the statistics, so `stride eval` and `stride predict` prepare images alike.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Standardize {
    /// Each channel's mean and standard deviation over the images trained on (with a
    /// validation split, its training part).
    #[default]
    TrainingImages,
    /// Given statistics, such as ImageNet's for torchvision's pretrained weights
    /// ([`Normalize::imagenet`]) or none ([`Normalize::identity`]).
    Fixed(Normalize),
}

impl Standardize {
    /// The statistics for a run that trains on `training`.
    pub fn resolve(&self, training: &Dataset) -> Normalize {
        match self {
            Standardize::TrainingImages => Normalize::of(training),
            Standardize::Fixed(n) => n.clone(),
        }
    }

    /// As a checkpoint records it: "the training images", or the fixed statistics as
    /// `MEAN,...:STD,...` (what [`Normalize::parse`] reads).
    fn tag(&self) -> String {
        match self {
            Standardize::TrainingImages => "the training images".into(),
            Standardize::Fixed(n) => {
                let (mean, std) = n.header();
                format!("{mean}:{std}")
            }
        }
    }
}

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
    /// When set, replaces `schedule`: the rate drops when the held-out loss stops improving.
    pub plateau: Option<ReduceOnPlateau>,
    /// How inputs are standardised after scaling to [0, 1].
    pub normalize: Standardize,
    /// Augmentation of training images.
    pub augment: Augment,
    /// Scale gradients so their global L2 norm is at most this (no clipping when `None`).
    pub clip_grad_norm: Option<f64>,
    /// Early stopping (Keras's `EarlyStopping(monitor="val_loss", patience=N)`): end the run
    /// after the epoch that makes N in a row without a better held-out figure ([`Monitor`])
    /// than the best so far. The best epoch's weights are kept as with `keep_best`.
    pub early_stopping: Option<usize>,
    /// Keep the weights of the epoch with the best held-out figure in best.safetensors beside
    /// model.safetensors (which always holds the last epoch's).
    pub keep_best: bool,
    /// Which held-out figure picks the best epoch for `keep_best` and `early_stopping`
    /// (Keras's `monitor`). Reduce-on-plateau follows the loss.
    pub monitor: Monitor,
    /// Hold out this fraction of the training set (each class's share, drawn by `seed`) and
    /// evaluate on it after every epoch instead of on the test set: the held-out set that
    /// early stopping, `keep_best`, reduce-on-plateau and metrics.csv (`val_loss`,
    /// `val_accuracy`) see. The test set is then evaluated once, when training ends
    /// ([`Outcome::test`]), so choosing an epoch never looks at it. Without it the held-out set
    /// is the test set.
    pub validation_split: Option<f64>,
    /// Parameters not to train, by dotted name prefix (`conv1`, `layer1`, `features.0`: every
    /// parameter under it): they keep their values and no gradient is computed for them (or,
    /// before the first trained layer, for anything), as after PyTorch's
    /// `requires_grad_(False)`. A frozen batch norm normalises by its running statistics and
    /// keeps them (Keras's frozen layers, torchvision's `FrozenBatchNorm2d`), so frozen layers
    /// compute what they did before. For fine-tuning: train a new classifier on a pretrained
    /// network. Each prefix must name at least one parameter, and one must remain.
    pub frozen: Vec<String>,
    pub seed: u64,
    /// Where metrics.csv and model.safetensors go; nothing is written when `None`.
    pub out_dir: Option<PathBuf>,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// Write report.html (curves, confusion matrix, most confident mistakes) beside the
    /// metrics after every epoch, under this title (the model's name).
    pub report: Option<String>,
    /// Activation recompute: keep only the inputs of this many segments of the network in the
    /// forward pass and recompute each segment in the backward pass (see [`recompute`]).
    pub recompute: Option<usize>,
    /// Label smoothing of the training loss, in [0, 1): the target puts 1-ε on the class and
    /// ε/C on every class (PyTorch's `CrossEntropyLoss(label_smoothing=ε)`). The held-out loss is
    /// always the plain cross-entropy.
    pub label_smoothing: f64,
    /// Per-class weights of the training loss, for imbalanced data (Keras's `class_weight`,
    /// PyTorch's `CrossEntropyLoss(weight=)`). The held-out loss stays unweighted.
    pub class_weights: ClassWeights,
    /// Data-parallel training over several processes (`mpirun -np N stride train`): each rank
    /// trains on its share of every batch, gradients are averaged, rank 0 writes the files.
    pub data_parallel: Option<group::DataParallel>,
    /// With `data_parallel`: batch norm's training statistics over all ranks' shares (PyTorch's
    /// SyncBatchNorm) instead of each rank's own.
    pub sync_bn: bool,
    /// Where the model trains: the CPU, or a GPU whose backend is set up (`stride_cuda::init`;
    /// the CLI's `--device`). Batches move there; checkpoints go through the CPU.
    pub device: Device,
    /// Train every step eagerly (op by op on the autograd tape) instead of through compiled
    /// training plans; for debugging, or to compare the two.
    pub eager: bool,
    /// Gradient accumulation: sum the gradients of this many batches (each weighed by its share
    /// of their images) before each update, so one update sees `accumulate x batch_size` images
    /// while memory holds one batch (Lightning's `accumulate_grad_batches`). Batch norm still
    /// normalises by each batch. At least 1; a Ctrl-C stop waits for the group's last batch.
    pub accumulate: usize,
    /// Keep an exponential moving average of the weights with this decay (such as 0.999;
    /// timm's `ModelEma`, Keras's `use_ema`), updated after every optimizer step (see [`Ema`]):
    /// the run evaluates and saves the averaged weights (model.safetensors, best.safetensors,
    /// and the model when the run returns) while the optimizer goes on with its own; the
    /// checkpoint holds both.
    pub ema: Option<f64>,
    /// MixUp and CutMix of the training batches (torchvision's v2 `MixUp`/`CutMix`, timm's
    /// `Mixup`; see [`BatchMix`]): each image is blended with, or has a box pasted in from, the
    /// image before it, and the loss is λ of its label's plus 1 - λ of the partner's. The
    /// training accuracy counts the label that weighs more.
    pub mix: BatchMix,
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
            plateau: None,
            normalize: Standardize::TrainingImages,
            augment: Augment::default(),
            clip_grad_norm: None,
            early_stopping: None,
            monitor: Monitor::Loss,
            keep_best: false,
            validation_split: None,
            frozen: Vec::new(),
            seed: 0,
            out_dir: None,
            progress: false,
            report: None,
            recompute: None,
            label_smoothing: 0.0,
            class_weights: ClassWeights::Equal,
            data_parallel: None,
            sync_bn: false,
            device: Device::Cpu,
            eager: false,
            accumulate: 1,
            ema: None,
            mix: BatchMix::default(),
        }
    }
}

/// Loss, accuracy and confusion matrix of one pass over a data set.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// The share of images whose class is among the five the model rates highest (ImageNet's
    /// top-5), for models with more than five classes.
    pub top5: Option<f64>,
    /// `confusion[true][predicted]`
    pub confusion: Vec<Vec<usize>>,
    /// The wrong answers given with the highest probability, most confident first.
    pub mistakes: Vec<report::Mistake>,
}

/// How many confident mistakes an evaluation keeps.
pub const MISTAKES_KEPT: usize = 16;

/// Images per evaluation batch. Evaluation runs through a plan compiled from one recorded
/// batch, which holds every activation of that batch for a moment: 128 keeps that moment
/// small (the tutorial CNN: ~18 MB) while each plan still has a wide product per thread.
pub const EVAL_BATCH: usize = 128;

impl Evaluation {
    /// Accuracy of each class (NaN for a class with no examples).
    pub fn per_class_accuracy(&self) -> Vec<f64> {
        self.confusion.iter().enumerate().map(|(c, row)| row[c] as f64 / row.iter().sum::<usize>() as f64).collect()
    }

    /// Precision, recall and F1 of each class, as scikit-learn's `classification_report`
    /// (0 where a ratio has nothing to divide by, as its `zero_division=0`).
    pub fn per_class(&self) -> Vec<ClassScores> {
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        (0..self.confusion.len())
            .map(|c| {
                let right = self.confusion[c][c];
                let images: usize = self.confusion[c].iter().sum();
                let predicted: usize = self.confusion.iter().map(|row| row[c]).sum();
                let (precision, recall) = (ratio(right, predicted), ratio(right, images));
                let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
                ClassScores { precision, recall, f1, images }
            })
            .collect()
    }

    /// The unweighted mean of the classes' F1 (scikit-learn's `f1_score(average="macro")`):
    /// every class counts the same, however many images it has.
    pub fn macro_f1(&self) -> f64 {
        let scores = self.per_class();
        scores.iter().map(|s| s.f1).sum::<f64>() / scores.len().max(1) as f64
    }
}

/// One class's figures in an [`Evaluation`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassScores {
    /// Of the images predicted as the class, the share that are.
    pub precision: f64,
    /// Of the class's images, the share predicted as it (its accuracy).
    pub recall: f64,
    /// The harmonic mean of precision and recall.
    pub f1: f64,
    /// How many of the images are of the class.
    pub images: usize,
}

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// The held-out set after the epoch: the validation part with
    /// [`TrainConfig::validation_split`], else the test set.
    pub test: Evaluation,
    pub images_per_second: f64,
    pub lr: f64,
}

fn correct(logits: &Var, labels: &[usize]) -> Result<usize> {
    Ok(logits.argmax(1)?.iter().zip(labels).filter(|(p, t)| p == t).count())
}

/// Evaluates `model` on `ds` in evaluation mode, without recording gradients; inputs are
/// standardised with `norm`.
pub fn evaluate(model: &mut dyn Module, ds: &Dataset, batch_size: usize, norm: &Normalize) -> Result<Evaluation> {
    evaluate_with(model, ds, batch_size, norm, false)
}

/// [`evaluate`], with test-time augmentation when `tta`: each image's class probabilities are
/// the mean of the image's and its mirror image's (left-right, [`mirrored`]), and the loss is
/// the negative log of that mean's probability for the true class.
pub fn evaluate_with(model: &mut dyn Module, ds: &Dataset, batch_size: usize, norm: &Normalize, tta: bool) -> Result<Evaluation> {
    // Through plans compiled for this call (the weights are fixed while it runs); a network
    // the planner refuses runs eagerly.
    let mut planned = stride_nn::planned::Planned::new();
    // A model on a GPU runs eagerly there (plans are for the CPU).
    let device = stride_nn::device_of(model);
    let (mut loss, mut right, mut in_top5) = (0.0, 0usize, 0usize);
    let mut confusion = vec![vec![0; ds.classes]; ds.classes];
    let mut mistakes: Vec<report::Mistake> = Vec::new();
    let mut seen = 0;
    no_grad(|| -> Result<()> {
        let mut classify = |images: &stride_autograd::Tensor<f32>| -> Result<Var> {
            Ok(if device.is_cpu() {
                Var::constant(planned.forward(model, images)?)
            } else {
                model.forward(&Var::constant(images.to(device)?), &mut Ctx::eval())?
            })
        };
        for Batch { images, labels } in Batches::new(ds, batch_size, None, false).normalized(norm)? {
            let logits = classify(&images)?;
            let (pred, probs) = if tta {
                let both = stride_autograd::softmax(&logits, 1)?.add(&stride_autograd::softmax(&classify(&mirrored(&images)?)?, 1)?)?;
                let probs = both.mul_scalar(0.5)?.value().to_host()?;
                let k = probs.shape()[1];
                for (row, &t) in probs.data().chunks_exact(k).zip(&labels) {
                    loss -= (row[t] as f64).max(f64::MIN_POSITIVE).ln();
                }
                (Var::constant(probs.clone()).argmax(1)?, probs)
            } else {
                loss += cross_entropy(&logits, &labels, 0.0)?.value().item()? as f64 * labels.len() as f64;
                (logits.argmax(1)?, stride_autograd::softmax(&logits, 1)?.value())
            };
            let k = probs.shape()[1];
            for (i, (&p, &t)) in pred.iter().zip(&labels).enumerate() {
                confusion[t][p.min(ds.classes - 1)] += 1;
                right += (p == t) as usize;
                // In the top five: fewer than five classes rated above the true one.
                let row = &probs.data()[i * k..(i + 1) * k];
                in_top5 += usize::from(row.get(t).is_some_and(|&pt| row.iter().filter(|&&q| q > pt).count() < 5));
                if p != t {
                    let confidence = probs.data()[i * k + p.min(k - 1)];
                    mistakes.push(report::Mistake { index: seen + i, truth: t, predicted: p, confidence });
                }
            }
            seen += labels.len();
            mistakes.sort_by(|a, b| b.confidence.total_cmp(&a.confidence).then(a.index.cmp(&b.index)));
            mistakes.truncate(MISTAKES_KEPT);
        }
        Ok(())
    })?;
    let n = ds.len().max(1) as f64;
    let top5 = (ds.classes > 5).then(|| in_top5 as f64 / n);
    Ok(Evaluation { loss: loss / n, accuracy: right as f64 / n, top5, confusion, mistakes })
}

/// `images` [N, C, H, W] mirrored left-right (each row reversed), for test-time augmentation.
pub fn mirrored(images: &stride_autograd::Tensor<f32>) -> Result<stride_autograd::Tensor<f32>> {
    let &[.., w] = images.shape() else {
        return Err(TrainError::Config(format!("mirroring needs images [N, C, H, W], got {:?}", images.shape())));
    };
    let mut out = images.to_host()?.into_vec();
    out.chunks_exact_mut(w.max(1)).for_each(<[f32]>::reverse);
    Ok(stride_autograd::Tensor::from_vec(out, images.shape())?)
}

/// The optimizer `cfg` asks for.
pub fn make_optimizer(cfg: &TrainConfig) -> Result<Box<dyn Optimizer>> {
    Ok(match cfg.optimizer {
        OptimizerKind::Sgd { momentum, nesterov } => Box::new(Sgd::new(cfg.lr, momentum, nesterov, cfg.weight_decay)?),
        OptimizerKind::Adam => Box::new(Adam::new(cfg.lr, (0.9, 0.999), 1e-8, cfg.weight_decay, false)?),
        OptimizerKind::AdamW => Box::new(Adam::new(cfg.lr, (0.9, 0.999), 1e-8, cfg.weight_decay, true)?),
    })
}

/// A seed for (run seed, epoch, step): every shuffle and dropout mask is a function of where
/// training is, so a resumed run draws exactly what an uninterrupted one would.
fn mix(seed: u64, epoch: usize, step: usize) -> u64 {
    let mut z = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const METRICS_HEADER: &str = "epoch,train_loss,train_accuracy,test_loss,test_accuracy,images_per_second,lr\n";
/// metrics.csv's header with a validation split: the held-out columns are the validation set's.
const METRICS_HEADER_VALIDATION: &str = "epoch,train_loss,train_accuracy,val_loss,val_accuracy,images_per_second,lr\n";
const WEIGHTS: &str = "model.safetensors";

fn io_err(path: &std::path::Path, e: std::io::Error) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// What became of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub reports: Vec<EpochReport>,
    /// Steps that ran through a compiled training plan (the rest ran eagerly).
    pub planned_steps: usize,
    /// Set when `stop` was raised: the (epoch, step) the saved checkpoint resumes from.
    pub interrupted: Option<(usize, usize)>,
    /// The epoch with the lowest finite held-out loss so far, this run's or (resumed) an earlier
    /// part's; `None` before any.
    pub best: Option<Best>,
    /// Set when early stopping ended the run: the last epoch it trained.
    pub stopped_early: Option<usize>,
    /// With [`TrainConfig::validation_split`], once training has ended (not when interrupted):
    /// the test set's evaluation with the last epoch's weights.
    pub test: Option<Evaluation>,
    /// As `test`, with the best epoch's weights (best.safetensors) where they were kept.
    pub best_test: Option<Evaluation>,
}

/// The weights of the best epoch, beside model.safetensors (`keep_best`, `early_stopping`).
pub const BEST_WEIGHTS: &str = "best.safetensors";

/// The header a run writes into its weights: how to feed them (input shape, standardisation),
/// what their outputs mean (class names) and what they were trained on. `stride export`
/// carries these into an ONNX model's metadata and `stride import` back.
pub const HEADER_KEYS: [&str; 5] = ["input_mean", "input_std", "input_shape", "class_names", "data"];

/// Trains `model` on `data.train`, evaluating on `data.test` after every epoch (or, with
/// `cfg.validation_split`, training on part of `data.train`, evaluating on the rest after every
/// epoch and on `data.test` once at the end); `on_epoch` gets each epoch's report. With
/// `cfg.out_dir`, writes metrics.csv, model.safetensors and a resumable
/// checkpoint.safetensors after every epoch (atomically). With `resume`, continues
/// the run saved in `cfg.out_dir` exactly where it stopped. When `stop` becomes true, the
/// current step finishes, the checkpoint is saved and the run returns.
pub fn train(
    model: &mut dyn Module,
    data: &Split,
    cfg: &TrainConfig,
    resume: bool,
    stop: Option<&std::sync::atomic::AtomicBool>,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Outcome> {
    if cfg.epochs == 0 || cfg.batch_size == 0 || cfg.accumulate == 0 {
        return Err(TrainError::Config(format!(
            "epochs ({}), batch size ({}) and batches per update ({}) must each be at least 1",
            cfg.epochs, cfg.batch_size, cfg.accumulate
        )));
    }
    if let Some(max) = cfg.clip_grad_norm.filter(|m| !(*m > 0.0 && m.is_finite())) {
        return Err(TrainError::Config(format!("the gradient clipping norm must be finite and > 0, got {max}")));
    }
    cfg.mix.check().map_err(TrainError::Config)?;
    if !cfg.mix.is_off() && cfg.data_parallel.is_some() && cfg.class_weights != ClassWeights::Equal {
        return Err(TrainError::Config(
            "class weights with MixUp/CutMix under mpirun are not supported yet: a rank's share of the two labels' weights differs".into(),
        ));
    }
    if cfg.early_stopping == Some(0) {
        return Err(TrainError::Config("early stopping's patience (0 epochs) must be at least 1".into()));
    }
    // With a validation split the epochs see part of the training set and are judged on the
    // rest; the test set waits for the end.
    let watched;
    let (data, test_set) = match cfg.validation_split {
        Some(f) => {
            let (train, validation) = data.train.split_validation(f, cfg.seed).map_err(|e| TrainError::Config(e.to_string()))?;
            watched = Split { name: data.name.clone(), train, test: validation, class_names: data.class_names.clone() };
            (&watched, Some(&data.test))
        }
        None => (data, None),
    };
    let loss_fn = Loss { label_smoothing: cfg.label_smoothing, class_weights: cfg.class_weights.resolve(&data.train.class_counts())? };
    model.to(cfg.device)?;
    // The parameters this run trains; the frozen ones record nothing until it returns.
    let (params, frozen) = split_frozen(model, &cfg.frozen)?;
    let _frozen = Frozen::new(frozen)?;
    let mut opt = make_optimizer(cfg)?;
    let group = cfg.data_parallel.as_ref().map(|d| d.0.clone());
    // Rank 0 writes the run's files; the others read the checkpoint to resume.
    let root = group.as_ref().is_none_or(|g| g.rank() == 0);
    let mut plateau = cfg.plateau.clone();
    let mut plateau_lr = cfg.lr;
    let mut pos = Position { epoch: 1, ..Position::default() };
    let mut progress = Progress::default();
    let keep_best = cfg.keep_best || cfg.early_stopping.is_some();
    let mut metrics = None;
    let mut saved_ema = None;
    if let Some(dir) = &cfg.out_dir {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        if root {
            checkpoint::remove_stale_temporaries(dir);
        }
        if resume {
            let (p, meta, ema) = load_checkpoint(dir, model, opt.as_mut(), cfg)?;
            // Loaded buffers arrive on the CPU.
            model.to(cfg.device)?;
            pos = p;
            saved_ema = Some(ema);
            if let Some(pl) = plateau.as_mut() {
                let num = |k: &str| meta.get(k).and_then(|v| v.parse::<f64>().ok());
                match (num("plateau_best"), num("plateau_bad"), num("lr")) {
                    (Some(best), Some(bad), Some(lr)) => {
                        pl.set_state(best, bad as usize);
                        plateau_lr = lr;
                    }
                    _ => return Err(TrainError::Checkpoint(format!("{}: no reduce-on-plateau state to resume", dir.display()))),
                }
            }
            progress = match Progress::from_meta(&meta) {
                Some(p) => p,
                None if keep_best => {
                    return Err(TrainError::Checkpoint(format!(
                        "{}: no best epoch recorded to resume early stopping or --keep-best with (a checkpoint of an older Stride)",
                        dir.display()
                    )))
                }
                None => Progress::default(),
            };
        }
        // On resume, keep only the rows of epochs the checkpoint has finished: a crash between
        // a row and its checkpoint (or in the middle of a row) must not leave a duplicate.
        let path = dir.join("metrics.csv");
        let mut text = String::from(if test_set.is_some() { METRICS_HEADER_VALIDATION } else { METRICS_HEADER });
        if resume {
            match std::fs::read_to_string(&path) {
                Ok(old) => {
                    let done = |l: &&str| {
                        l.split(',').count() == 7 && l.split(',').next().and_then(|e| e.parse::<usize>().ok()).is_some_and(|e| e < pos.epoch)
                    };
                    text.extend(old.lines().skip(1).filter(done).map(|l| format!("{l}\n")));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
        }
        if root {
            checkpoint::write_atomic(&path, text.as_bytes())?;
            metrics = Some(std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| io_err(&path, e))?);
        }
    } else if resume {
        return Err(TrainError::Config("resuming needs the run folder (out_dir) that holds the checkpoint".into()));
    }
    let norm = cfg.normalize.resolve(&data.train);
    norm.check(data.train.channels)?;
    let segments = match cfg.recompute {
        Some(k) => Some(recompute::plan(model, [data.train.channels, data.train.height, data.train.width], k)?),
        None => None,
    };
    if let Some(g) = &group {
        let n_params: usize = params.iter().map(|p| p.value_ref().numel()).sum();
        let world = [
            ("parameters", n_params as f64),
            ("training images", data.train.len() as f64),
            ("test images", data.test.len() as f64),
            ("batch size", cfg.batch_size as f64),
            ("seed", cfg.seed as f64),
            ("epochs", cfg.epochs as f64),
            ("resume epoch", pos.epoch as f64),
            ("resume step", pos.step as f64),
        ];
        group::check_world(g.as_ref(), &world)?;
        group::broadcast_state(g.as_ref(), model, false)?;
    }
    // The weight average starts from the weights every rank now holds, or from the checkpoint's.
    let mut ema = match cfg.ema {
        Some(decay) => {
            let mut e = Ema::new(model, decay)?;
            if let Some((tensors, updates)) = saved_ema {
                e.restore(tensors, updates)?;
            }
            Some(e)
        }
        None => None,
    };
    // Which gradients travel together between ranks: fixed for the run.
    let plan = group.as_ref().map(|_| group::BucketPlan::new(&params));
    let mut planned = planner(cfg, segments.is_some(), group.is_some());
    let mut planned_steps = 0;
    let mut ctx = Ctx::train(cfg.seed);
    if let (Some(g), true) = (&group, cfg.sync_bn) {
        if segments.is_some() {
            return Err(TrainError::Config("synchronised batch norm does not combine with activation recompute yet".into()));
        }
        // Its statistics are collectives inside the forward pass, which a rank with no share of
        // a batch does not run: every batch, the epoch's last too, must reach every rank.
        let (n, b, size) = (data.train.len(), cfg.batch_size, g.size());
        let smallest = if n % b == 0 { b.min(n) } else { n % b };
        if smallest < size {
            return Err(TrainError::Config(format!(
                "synchronised batch norm needs a share of every batch on each of the {size} processes, but the smallest batch of an \
                 epoch has {smallest} image(s) ({n} training images in batches of {b}); choose a batch size that leaves at least {size}"
            )));
        }
        let g = g.clone();
        ctx.sync_bn = Some(stride_autograd::SyncStats(std::rc::Rc::new(move |buf: &mut [f64]| {
            g.sum_f64(buf).map_err(|e| stride_autograd::Error::arg("sync batch norm", e.to_string()))
        })));
    }
    let mut reports = Vec::new();
    // A resumed run that had stopped early stays stopped.
    let ended = Ended { watched: data, test_set: test_set.filter(|_| root), norm: norm.clone(), keep_best };
    if pos.epoch <= cfg.epochs && progress.exhausted(cfg.early_stopping) {
        return ended.outcome(model, cfg, ema.as_mut(), reports, planned_steps, progress.best, Some(pos.epoch - 1));
    }
    while pos.epoch <= cfg.epochs {
        let epoch = pos.epoch;
        opt.set_lr(if plateau.is_some() { plateau_lr } else { cfg.schedule.lr(cfg.lr, epoch - 1) });
        let extra = |plateau: &Option<ReduceOnPlateau>, lr: f64, progress: Progress| -> Vec<(&'static str, String)> {
            let mut out = progress.to_meta();
            if let Some(p) = plateau {
                let (best, bad) = p.state();
                out.extend([("plateau_best", format!("{best:e}")), ("plateau_bad", bad.to_string()), ("lr", format!("{lr:e}"))]);
            }
            out
        };
        let mut shuffle = Rng::seed(mix(cfg.seed, epoch, usize::MAX));
        let batches = Batches::new(&data.train, cfg.batch_size, Some(&mut shuffle), false)
            .normalized(&norm)?
            .augmented(&cfg.augment, mix(cfg.seed, epoch, usize::MAX - 1));
        let num_batches = batches.num_batches();
        let bar = if cfg.progress { ProgressBar::new(num_batches as u64) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}").expect("valid template").progress_chars("=> "));
        bar.set_prefix(format!("{epoch}/{}", cfg.epochs));
        bar.set_position(pos.step as u64);
        let start = Instant::now();
        let seen_before = pos.seen;
        // A background thread prepares the next batches (decode, augment, standardise) while
        // this one trains; dropping the receiver on an early return stops it.
        let interrupted = std::thread::scope(|scope| -> Result<bool> {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let skip = pos.step;
            scope.spawn(move || {
                for item in batches.enumerate().skip(skip) {
                    if tx.send(item).is_err() {
                        break;
                    }
                }
            });
            for (step, Batch { mut images, labels }) in rx {
                ctx.rng = Rng::seed(mix(cfg.seed, epoch, step));
                // MixUp / CutMix over the whole batch, before each rank takes its share.
                let lam = mix_batch(&cfg.mix, &mut images, cfg.seed, epoch, step)?;
                let partners = stride_data::partners(&labels);
                // The update's group of batches (an epoch's last group may be shorter), and this
                // batch's share of its images.
                let first = step - step % cfg.accumulate;
                let end = (first + cfg.accumulate).min(num_batches);
                let last = step + 1 == end;
                let group_images = (end * cfg.batch_size).min(data.train.len()) - first * cfg.batch_size;
                let part = labels.len() as f64 / group_images.max(1) as f64;
                if step == first {
                    optim::zero_grad(&params);
                }
                // With several ranks, this one trains on its share of the global batch, and its
                // loss is that share of the batch's.
                let (images, labels, partners, share) = match &group {
                    Some(g) => {
                        let (start, len) = group::shard(labels.len(), g.rank(), g.size());
                        let share = loss_fn.share(&labels[start..start + len], &labels);
                        let range = start..start + len;
                        (images.narrow(0, start, len)?, labels[range.clone()].to_vec(), partners[range].to_vec(), share)
                    }
                    None => (images, labels, partners, 1.0),
                };
                let targets = Targets { labels: &labels, mixed: lam.map(|l| (&partners[..], l)) };
                // Several ranks on the plain path: gradient sums start during the backward pass
                // of the group's last batch, when they hold the whole group's.
                let mut overlap = match (&group, &plan) {
                    (Some(g), Some(plan)) if segments.is_none() && last => Some(group::OverlappedSum::new(g.as_ref(), &params, plan)),
                    _ => None,
                };
                // The loss this rank back-propagates: its share of the batch, the batch's of the
                // group.
                let scale = share * part;
                let (lv, right) = if labels.is_empty() {
                    (0.0, 0)
                } else {
                    let x = Var::constant(images.to(cfg.device)?);
                    let (lv, logits, was_planned) =
                        forward_backward(model, planned.as_mut(), segments.as_ref(), &x, targets, &loss_fn, scale, &mut ctx, overlap.as_mut())?;
                    planned_steps += usize::from(was_planned);
                    (lv, correct(&logits, targets.dominant())?)
                };
                if let Some(o) = overlap {
                    o.finish()?;
                }
                // Loss, hits, images and the stop request of every rank, so all ranks agree on
                // divergence and on stopping at the same step.
                let asked = stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
                let mut sums = [lv as f64 * labels.len() as f64, right as f64, labels.len() as f64, f64::from(u8::from(asked))];
                if let Some(g) = &group {
                    g.sum_f64(&mut sums)?;
                }
                let [loss_sum, right, seen, stops] = sums;
                if !loss_sum.is_finite() {
                    bar.abandon();
                    return Err(TrainError::Diverged { epoch, step: step + 1, loss: (loss_sum / seen.max(1.0)) as f32 });
                }
                if last {
                    if let (Some(g), Some(plan), Some(_)) = (&group, &plan, &segments) {
                        // The recompute path: each rank's gradients, scaled by its share in
                        // the backward passes, summed once the group's are in.
                        group::reduce_gradients(g.as_ref(), &params, plan, 1.0)?;
                    }
                    if let Some(max) = cfg.clip_grad_norm {
                        optim::clip_grad_norm(&params, max)?;
                    }
                    opt.step(&params)?;
                    if let Some(g) = &group {
                        group::broadcast_state(g.as_ref(), model, true)?;
                    }
                    // After rank 0's buffers reached every rank, so the ranks' averages agree.
                    if let Some(e) = ema.as_mut() {
                        e.update(model)?;
                    }
                }
                pos.loss_sum += loss_sum;
                pos.right += right as usize;
                pos.seen += seen as usize;
                pos.step = step + 1;
                bar.inc(1);
                let ips = (pos.seen - seen_before) as f64 / start.elapsed().as_secs_f64();
                bar.set_message(format!("loss {:.4} acc {:.4} {ips:.0} img/s", pos.loss_sum / pos.seen as f64, pos.right as f64 / pos.seen as f64));
                if stops > 0.0 && last {
                    return Ok(true);
                }
            }
            Ok(false)
        })?;
        if interrupted {
            bar.abandon();
            if let Some(dir) = cfg.out_dir.as_ref().filter(|_| root) {
                save_checkpoint(dir, model, opt.as_ref(), pos, cfg, ema.as_ref(), &extra(&plateau, plateau_lr, progress))?;
            }
            let at = Some((epoch, pos.step));
            return Ok(Outcome { reports, planned_steps, interrupted: at, best: progress.best, stopped_early: None, test: None, best_test: None });
        }
        let ips = (pos.seen - seen_before) as f64 / start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        // The averaged weights are the run's: evaluated and saved. The optimizer's own go back
        // into the model for the checkpoint and the next epoch.
        let mut averaged = match ema.as_mut() {
            Some(e) => e.swap(model).map(|()| true)?,
            None => false,
        };
        let test = evaluate(model, &data.test, EVAL_BATCH, &norm)?;
        if let Some(p) = plateau.as_mut() {
            plateau_lr = p.step(test.loss, plateau_lr);
        }
        let new_best = progress.record(epoch, &test, cfg.monitor);
        // Every rank stops where rank 0 does (their held-out losses agree unless their arithmetic
        // differs, and a rank that stopped alone would leave the others waiting).
        let mut stop_early = epoch < cfg.epochs && progress.exhausted(cfg.early_stopping);
        if let (Some(g), Some(_)) = (&group, cfg.early_stopping) {
            let mut v = [f64::from(u8::from(root && stop_early))];
            g.sum_f64(&mut v)?;
            stop_early = v[0] > 0.5;
        }
        let seen = pos.seen.max(1) as f64;
        let report = EpochReport {
            epoch,
            train_loss: pos.loss_sum / seen,
            train_accuracy: pos.right as f64 / seen,
            test,
            images_per_second: ips,
            lr: opt.lr(),
        };
        pos = Position { epoch: epoch + 1, ..Position::default() };
        if let (Some(f), Some(dir)) = (metrics.as_mut(), &cfg.out_dir) {
            writeln!(
                f,
                "{},{:.6},{:.6},{:.6},{:.6},{:.1},{}",
                epoch, report.train_loss, report.train_accuracy, report.test.loss, report.test.accuracy, ips, report.lr
            )
            .and_then(|_| f.flush())
            .map_err(|e| io_err(&dir.join("metrics.csv"), e))?;
            let (mean, std) = norm.header();
            let info: std::collections::HashMap<String, String> = HEADER_KEYS
                .into_iter()
                .zip([
                    mean,
                    std,
                    format!("{}x{}x{}", data.train.channels, data.train.height, data.train.width),
                    data.class_names.iter().map(|n| n.replace(['\n', '\r'], " ")).collect::<Vec<_>>().join("\n"),
                    data.name.clone(),
                ])
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            let weights = checkpoint::state_dict(model);
            if keep_best && new_best {
                let mut info = info.clone();
                info.insert("epoch".into(), epoch.to_string());
                checkpoint::save_with_metadata(&dir.join(BEST_WEIGHTS), &weights, Some(info))?;
            }
            checkpoint::save_with_metadata(&dir.join(WEIGHTS), &weights, Some(info))?;
            if let (Some(e), true) = (ema.as_mut(), averaged) {
                e.swap(model)?;
                averaged = false;
            }
            save_checkpoint(dir, model, opt.as_ref(), pos, cfg, ema.as_ref(), &extra(&plateau, plateau_lr, progress))?;
            curves::plot_from_metrics(&dir.join("metrics.csv"), &dir.join("curves.png"))?;
            if let Some(title) = &cfg.report {
                write_report(dir, title, cfg, data, &report.test, None)?;
            }
        }
        if let (Some(e), true) = (ema.as_mut(), averaged) {
            e.swap(model)?;
        }
        on_epoch(&report);
        reports.push(report);
        if stop_early {
            return ended.outcome(model, cfg, ema.as_mut(), reports, planned_steps, progress.best, Some(epoch));
        }
    }
    ended.outcome(model, cfg, ema.as_mut(), reports, planned_steps, progress.best, None)
}

/// Mixes a training batch as `how` asks (MixUp / CutMix), with draws fixed by where training
/// is, so a resumed run mixes as an uninterrupted one would: λ, or `None` when unmixed.
fn mix_batch(how: &BatchMix, images: &mut stride_autograd::Tensor<f32>, seed: u64, epoch: usize, step: usize) -> Result<Option<f64>> {
    if how.is_off() {
        return Ok(None);
    }
    let &[n, c, h, w] = images.shape() else {
        return Err(TrainError::Config(format!("batch mixing needs images [N, C, H, W], got {:?}", images.shape())));
    };
    let mut rng = Rng::seed(mix(seed ^ 0x4D49_5855_5043_5554, epoch, step));
    how.apply(images.data_mut(), [n, c, h, w], &mut rng).map_err(TrainError::Config)
}

/// Compiled training plans (one per batch shape) for a run's steps where they apply: on the
/// CPU, one process, no recompute (any loss: smoothing, class weights and mixing reach the plan
/// as a target mass; accumulated batches add their gradients). A network the planner refuses
/// (dropout, an op without a planned gradient) trains eagerly, as every step does with
/// `cfg.eager`.
fn planner(cfg: &TrainConfig, recompute: bool, ranks: bool) -> Option<stride_nn::planned::TrainPlanned> {
    (!cfg.eager && cfg.device.is_cpu() && !ranks && !recompute).then(stride_nn::planned::TrainPlanned::new)
}

/// One batch's forward and backward pass on `x` towards `targets`, its gradients added to the
/// parameters': through the compiled training plan where `planned` takes the batch, else in
/// `segments` (activation recompute), else eagerly, the loss scaled by `scale` and, with `overlap`, each
/// bucket's sum across ranks started as its gradients finish. Returns the batch's loss
/// (unscaled), the logits (detached) and whether the plan ran the step.
#[allow(clippy::too_many_arguments)]
fn forward_backward(
    model: &mut dyn Module,
    planned: Option<&mut stride_nn::planned::TrainPlanned>,
    segments: Option<&recompute::Segments>,
    x: &Var,
    targets: Targets,
    loss_fn: &Loss,
    scale: f64,
    ctx: &mut Ctx,
    overlap: Option<&mut group::OverlappedSum>,
) -> Result<(f32, Var, bool)> {
    if let Some(p) = planned {
        // Added to what the parameters hold, as backward() adds: the group's earlier batches.
        if let Some(lv) = p.step_towards(model, &x.value(), |[_, classes]| loss_fn.mass(targets, classes), scale as f32, true)? {
            let logits = p.logits(&x.shape()).ok_or_else(|| stride_autograd::Error::arg("train plan", "a step ran but left no logits"))?;
            return Ok((lv, Var::constant(logits), true));
        }
    }
    if let Some(seg) = segments {
        let (lv, logits) = recompute::forward_backward(model, x, targets, loss_fn, scale, ctx, seg)?;
        return Ok((lv, logits, false));
    }
    let logits = model.forward(x, ctx)?;
    let loss = loss_fn.of_targets(&logits, targets)?;
    match overlap {
        // Several ranks: each back-propagates its share of the global batch's mean loss (so
        // synchronised batch norm sums true partials), always, so every rank starts the same
        // sums.
        Some(o) => loss
            .mul_scalar(scale)?
            .backward_hooked(&mut |leaf| o.ready(leaf).map_err(|e| stride_autograd::Error::arg("all-reduce", e.to_string())))?,
        // Also when the loss is not finite: the caller stops before the optimizer, and the
        // gradients are never used.
        None if scale == 1.0 => loss.backward()?,
        None => loss.mul_scalar(scale)?.backward()?,
    }
    // Read once the backward pass is queued: on a GPU a read waits for the work before it,
    // and read earlier it would hold the backward pass back until the forward pass had run.
    Ok((loss.value().item()?, logits, false))
}

/// How a run that has ended (not one interrupted) reports: with a validation split, rank 0
/// evaluates the test set with the last weights and with the best epoch's where they were kept.
struct Ended<'a> {
    /// The training and validation parts the epochs saw.
    watched: &'a Split,
    /// The test set, when the epochs watched a validation split (and this is rank 0).
    test_set: Option<&'a Dataset>,
    norm: Normalize,
    keep_best: bool,
}

impl Ended<'_> {
    /// The outcome; with a weight average, the model holds the averaged weights from here on.
    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &self,
        model: &mut dyn Module,
        cfg: &TrainConfig,
        ema: Option<&mut Ema>,
        reports: Vec<EpochReport>,
        planned_steps: usize,
        best: Option<Best>,
        stopped_early: Option<usize>,
    ) -> Result<Outcome> {
        if let Some(e) = ema {
            e.swap(model)?;
        }
        let (mut test, mut best_test) = (None, None);
        if let Some(ds) = self.test_set {
            test = Some(evaluate(model, ds, EVAL_BATCH, &self.norm)?);
            let file = cfg.out_dir.as_ref().map(|d| d.join(BEST_WEIGHTS)).filter(|f| self.keep_best && best.is_some() && f.exists());
            if let Some(file) = file {
                // The best weights in, evaluated, and the last ones back (loaded buffers
                // arrive on the CPU).
                let last: std::collections::HashMap<_, _> = checkpoint::state_dict(model).into_iter().collect();
                checkpoint::load_into(model, &checkpoint::load(&file)?)?;
                model.to(cfg.device)?;
                let evaluated = evaluate(model, ds, EVAL_BATCH, &self.norm);
                checkpoint::load_into(model, &last)?;
                model.to(cfg.device)?;
                best_test = Some(evaluated?);
            }
        }
        // report.html's confusion matrix and mistakes become the test set's.
        if let (Some(dir), Some(title), Some(ds), Some(t)) = (&cfg.out_dir, &cfg.report, self.test_set, &test) {
            let held = match reports.last() {
                Some(r) => r.test.clone(),
                None => evaluate(model, &self.watched.test, EVAL_BATCH, &self.norm)?,
            };
            write_report(dir, title, cfg, self.watched, &held, Some((ds, t)))?;
        }
        Ok(Outcome { reports, planned_steps, interrupted: None, best, stopped_early, test, best_test })
    }
}
