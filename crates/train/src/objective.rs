//! What a run optimises and how it picks its best epoch: class weights and the training loss,
//! and the held-out figure (`Monitor`) that early stopping and keep-best follow.

use stride_autograd::{cross_entropy, Var};

use crate::{Evaluation, Result, TrainError};

/// How much each class counts in the training loss.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ClassWeights {
    /// Every image counts the same.
    #[default]
    Equal,
    /// n / (classes x count of the class) over the images trained on (scikit-learn's
    /// "balanced"): each class weighs the same in total, however many images it has.
    Balanced,
    /// One weight per class, finite and >= 0, not all 0.
    Given(Vec<f64>),
}

impl ClassWeights {
    /// The weights for classes with these numbers of training images (`None` when all are
    /// equal); an error names what does not fit.
    pub fn resolve(&self, counts: &[usize]) -> Result<Option<Vec<f64>>> {
        let classes = counts.len();
        match self {
            ClassWeights::Equal => Ok(None),
            ClassWeights::Balanced => {
                let n = counts.iter().sum::<usize>() as f64;
                // A class without training images cannot be in a batch; it gets 0.
                Ok(Some(counts.iter().map(|&k| if k == 0 { 0.0 } else { n / (classes as f64 * k as f64) }).collect()))
            }
            ClassWeights::Given(w) => {
                if w.len() != classes {
                    return Err(TrainError::Config(format!("{} class weights given for the {classes} classes of the data", w.len())));
                }
                if let Some((k, v)) = w.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
                    return Err(TrainError::Config(format!("class {k}'s weight {v} is not a finite number >= 0")));
                }
                if w.iter().all(|&v| v == 0.0) {
                    return Err(TrainError::Config("every class weight is 0: nothing would be learned".into()));
                }
                Ok(Some(w.clone()))
            }
        }
    }
}

/// The training loss: softmax cross-entropy with label smoothing and optional class weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loss {
    pub label_smoothing: f64,
    /// One weight per class (see [`ClassWeights`]); `None` weighs every image the same.
    pub class_weights: Option<Vec<f64>>,
}

/// What a batch trains towards: its labels, or with batch mixing ([`stride_data::BatchMix`]) a
/// blend of its labels (their share `λ`) and its images' partners' labels (`1 - λ`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Targets<'a> {
    pub labels: &'a [usize],
    /// The partners' labels and λ.
    pub mixed: Option<(&'a [usize], f64)>,
}

impl<'a> Targets<'a> {
    /// Just the labels.
    pub fn plain(labels: &'a [usize]) -> Self {
        Targets { labels, mixed: None }
    }

    /// The labels that weigh more in the images (for the training accuracy): the images' own,
    /// unless λ is under 1/2.
    pub fn dominant(&self) -> &'a [usize] {
        match self.mixed {
            Some((partners, lam)) if lam < 0.5 => partners,
            _ => self.labels,
        }
    }
}

impl Loss {
    /// The loss towards `t`: with mixing, λ times the loss on the labels plus 1 - λ times the
    /// loss on the partners' (which, as the loss is linear in its target, is the loss towards
    /// the blended, smoothed target of torchvision's `MixUp` and timm's `Mixup`).
    pub fn of_targets(&self, logits: &Var, t: Targets) -> stride_autograd::Result<Var> {
        let own = self.of(logits, t.labels)?;
        match t.mixed {
            None => Ok(own),
            Some((partners, lam)) => own.mul_scalar(lam)?.add(&self.of(logits, partners)?.mul_scalar(1.0 - lam)?),
        }
    }

    /// The batch's loss; a batch whose images all weigh 0 gives 0 (and no gradient).
    pub fn of(&self, logits: &Var, labels: &[usize]) -> stride_autograd::Result<Var> {
        match &self.class_weights {
            None => cross_entropy(logits, labels, self.label_smoothing),
            Some(w) if labels.iter().all(|&t| w.get(t).is_some_and(|&v| v == 0.0)) => logits.mul_scalar(0.0)?.sum_all(),
            Some(w) => stride_autograd::weighted_cross_entropy(logits, labels, w, self.label_smoothing),
        }
    }

    /// The loss towards `t` as a target mass m [N, classes] for logits of `classes` columns,
    /// the loss being -sum m log softmax(logits) (what a training plan takes): the same loss
    /// as [`of_targets`](Self::of_targets), smoothing, class weights and mixing included.
    pub fn mass(&self, t: Targets, classes: usize) -> stride_autograd::Result<Vec<f32>> {
        let n = t.labels.len();
        let mut m = vec![0.0f64; n * classes];
        let mut add = |labels: &[usize], share: f64| -> stride_autograd::Result<()> {
            if let Some(&bad) = labels.iter().find(|&&l| l >= classes) {
                return Err(stride_autograd::Error::arg("cross_entropy", format!("label {bad} is outside the {classes} classes")));
            }
            let eps = self.label_smoothing;
            let weight = |c: usize| self.class_weights.as_ref().map_or(Some(1.0), |w| w.get(c).copied());
            if let Some(w) = &self.class_weights {
                if w.len() != classes {
                    return Err(stride_autograd::Error::shape("weighted_cross_entropy", format!("{} class weights for {classes} classes", w.len())));
                }
            }
            let total: f64 = labels.iter().map(|&y| weight(y).unwrap_or(0.0)).sum();
            if total <= 0.0 {
                // A batch whose images all weigh 0: no loss, no gradient.
                return Ok(());
            }
            for (row, &y) in m.chunks_exact_mut(classes).zip(labels) {
                for (c, v) in row.iter_mut().enumerate() {
                    let on = if c == y { (1.0 - eps) * weight(y).unwrap_or(0.0) } else { 0.0 };
                    *v += share * (on + eps / classes as f64 * weight(c).unwrap_or(0.0)) / total;
                }
            }
            Ok(())
        };
        match t.mixed {
            None => add(t.labels, 1.0)?,
            Some((partners, lam)) => {
                add(t.labels, lam)?;
                add(partners, 1.0 - lam)?;
            }
        }
        Ok(m.into_iter().map(|v| v as f32).collect())
    }

    /// The part of a batch's loss that `shard` (a share of `batch`'s labels) carries: its
    /// images' share of the batch's weight.
    pub(crate) fn share(&self, shard: &[usize], batch: &[usize]) -> f64 {
        let weight = |labels: &[usize]| match &self.class_weights {
            None => labels.len() as f64,
            Some(w) => labels.iter().map(|&t| w.get(t).copied().unwrap_or(0.0)).sum(),
        };
        let total = weight(batch);
        if total > 0.0 {
            weight(shard) / total
        } else {
            0.0
        }
    }
}

/// The epoch with the best held-out figure (validation, else test) by
/// [`TrainConfig::monitor`](crate::TrainConfig::monitor), and its figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Best {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
}

/// The held-out figure that picks the best epoch (Keras's `monitor`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Monitor {
    /// The loss, lower is better (Keras's `"val_loss"`).
    #[default]
    Loss,
    /// The accuracy, higher is better (`"val_accuracy"`); a tie is no improvement.
    Accuracy,
    /// The macro-averaged F1 ([`Evaluation::macro_f1`]), higher is better: every class counts
    /// the same, for imbalanced data.
    MacroF1,
}

impl Monitor {
    /// The figure as a cost: lower is better.
    fn cost(self, loss: f64, accuracy: f64, macro_f1: f64) -> f64 {
        match self {
            Monitor::Loss => loss,
            Monitor::Accuracy => -accuracy,
            Monitor::MacroF1 => -macro_f1,
        }
    }

    /// "loss", "accuracy" or "macro F1".
    pub fn name(self) -> &'static str {
        match self {
            Monitor::Loss => "loss",
            Monitor::Accuracy => "accuracy",
            Monitor::MacroF1 => "macro F1",
        }
    }
}

/// Early stopping's and keep-best's state: the best epoch so far and the epochs since it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Progress {
    pub(crate) best: Option<Best>,
    /// Epochs in a row since the best one (since the start while there is none).
    stale: usize,
}

impl Progress {
    /// Takes an epoch's held-out result; whether it is the new best by `monitor`. A figure that
    /// is not finite never is.
    pub(crate) fn record(&mut self, epoch: usize, e: &Evaluation, monitor: Monitor) -> bool {
        let macro_f1 = e.macro_f1();
        let cost = monitor.cost(e.loss, e.accuracy, macro_f1);
        let better = cost.is_finite() && self.best.is_none_or(|b| cost < monitor.cost(b.loss, b.accuracy, b.macro_f1));
        if better {
            *self = Progress { best: Some(Best { epoch, loss: e.loss, accuracy: e.accuracy, macro_f1 }), stale: 0 };
        } else {
            self.stale += 1;
        }
        better
    }

    /// Whether `patience` epochs in a row have passed without a new best.
    pub(crate) fn exhausted(&self, patience: Option<usize>) -> bool {
        patience.is_some_and(|p| self.stale >= p)
    }

    /// For the checkpoint's metadata (exact: the loss in full precision).
    pub(crate) fn to_meta(self) -> Vec<(&'static str, String)> {
        let mut out = vec![("stale_epochs", self.stale.to_string())];
        if let Some(b) = self.best {
            out.extend([
                ("best_epoch", b.epoch.to_string()),
                ("best_loss", format!("{:e}", b.loss)),
                ("best_accuracy", format!("{:e}", b.accuracy)),
                ("best_macro_f1", format!("{:e}", b.macro_f1)),
            ]);
        }
        out
    }

    /// From a checkpoint's metadata; `None` when it has none (a checkpoint of an older Stride).
    pub(crate) fn from_meta(meta: &std::collections::HashMap<String, String>) -> Option<Progress> {
        let stale = meta.get("stale_epochs")?.parse().ok()?;
        let best = match meta.get("best_epoch") {
            None => None,
            Some(e) => {
                // A checkpoint of an older Stride has no F1; it monitored the loss.
                let macro_f1 = meta.get("best_macro_f1").map_or(Some(0.0), |v| v.parse().ok())?;
                let (loss, accuracy) = (meta.get("best_loss")?.parse().ok()?, meta.get("best_accuracy")?.parse().ok()?);
                Some(Best { epoch: e.parse().ok()?, loss, accuracy, macro_f1 })
            }
        };
        Some(Progress { best, stale })
    }
}
