//! What a training checkpoint holds (weights, optimizer state, the weight average, where the
//! run stands and the settings it must resume with) and how a run resumes from one: every
//! check first, then the copy, so a checkpoint that does not fit changes nothing.

use stride_nn::optim::Optimizer;
use stride_nn::Module;

use crate::{checkpoint, make_optimizer, split_frozen, Ema, Result, TrainConfig, TrainError};

/// Where a run stands: the epoch being trained (1-based), steps done in it, and its running sums.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Position {
    pub(crate) epoch: usize,
    pub(crate) step: usize,
    pub(crate) loss_sum: f64,
    pub(crate) right: usize,
    pub(crate) seen: usize,
}

const CHECKPOINT: &str = "checkpoint.safetensors";

/// The validation split as a checkpoint records it ("none", or the fraction).
fn validation_tag(cfg: &TrainConfig) -> String {
    cfg.validation_split.map_or_else(|| "none".to_string(), |f| f.to_string())
}

/// Saves weights, buffers, optimizer state and the position: everything a resume needs.
pub(crate) fn save_checkpoint(
    dir: &std::path::Path,
    model: &mut dyn Module,
    opt: &dyn Optimizer,
    pos: Position,
    cfg: &TrainConfig,
    ema: Option<&Ema>,
    extra: &[(&str, String)],
) -> Result<()> {
    let mut tensors = checkpoint::state_dict(model);
    push_optimizer_state(&mut tensors, opt)?;
    if let Some(e) = ema {
        for (name, t) in e.tensors() {
            tensors.push((format!("{EMA_PREFIX}{name}"), t.to_host()?));
        }
    }
    let meta: std::collections::HashMap<String, String> = [
        ("format", "stride-checkpoint-1".to_string()),
        ("epoch", pos.epoch.to_string()),
        ("step", pos.step.to_string()),
        ("loss_sum", format!("{:e}", pos.loss_sum)),
        ("right", pos.right.to_string()),
        ("seen", pos.seen.to_string()),
        ("seed", cfg.seed.to_string()),
        ("optimizer", format!("{:?}", cfg.optimizer)),
        ("validation_split", validation_tag(cfg)),
        ("frozen", cfg.frozen.join(",")),
        ("normalize", cfg.normalize.tag()),
        ("accumulate", cfg.accumulate.to_string()),
        ("monitor", cfg.monitor.name().to_string()),
        ("ema", ema_tag(cfg)),
        ("mix", mix_tag(cfg)),
        ("ema_updates", ema.map_or(0, Ema::updates).to_string()),
    ]
    .into_iter()
    .chain(extra.iter().cloned())
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    checkpoint::save_with_metadata(&dir.join(CHECKPOINT), &tensors, Some(meta))
}

/// The checkpoint's names for the weight average's tensors: `ema.` and the model's name.
const EMA_PREFIX: &str = "ema.";

/// How a checkpoint records the weight average: its decay, or "none".
fn ema_tag(cfg: &TrainConfig) -> String {
    cfg.ema.map_or_else(|| "none".into(), |d| d.to_string())
}

/// How a checkpoint records batch mixing: "mixup A, cutmix B", or "none".
fn mix_tag(cfg: &TrainConfig) -> String {
    if cfg.mix.is_off() {
        "none".into()
    } else {
        format!("mixup {}, cutmix {}", cfg.mix.mixup, cfg.mix.cutmix)
    }
}

/// A checkpoint's weight average: its tensors by the model's names, and its updates.
type SavedEma = (std::collections::HashMap<String, stride_autograd::Tensor<f32>>, usize);

/// Loads a run folder's checkpoint into the model and optimizer; returns where to continue,
/// the metadata and the weight average's state.
pub(crate) fn load_checkpoint(
    dir: &std::path::Path,
    model: &mut dyn Module,
    opt: &mut dyn Optimizer,
    cfg: &TrainConfig,
) -> Result<(Position, std::collections::HashMap<String, String>, SavedEma)> {
    let path = dir.join(CHECKPOINT);
    let (tensors, meta) = checkpoint::load_with_metadata(&path)?;
    let (pos, ema) = restore(&path, tensors, &meta, model, opt, cfg)?;
    Ok((pos, meta, ema))
}

/// Checks a training checkpoint against the model, the optimizer and the run's settings and
/// only then copies it in: the format tag, seed and optimizer in the metadata, the position
/// numbers, every weight's name and shape, and every optimizer entry's parameter and length.
/// Nothing is changed when any check fails. `path` names the file in errors.
pub fn restore_checkpoint(
    path: &std::path::Path,
    tensors: std::collections::HashMap<String, stride_autograd::Tensor<f32>>,
    meta: &std::collections::HashMap<String, String>,
    model: &mut dyn Module,
    cfg: &TrainConfig,
) -> Result<(usize, usize)> {
    let mut opt = make_optimizer(cfg)?;
    restore(path, tensors, meta, model, opt.as_mut(), cfg).map(|(p, _)| (p.epoch, p.step))
}

fn restore(
    path: &std::path::Path,
    mut tensors: std::collections::HashMap<String, stride_autograd::Tensor<f32>>,
    meta: &std::collections::HashMap<String, String>,
    model: &mut dyn Module,
    opt: &mut dyn Optimizer,
    cfg: &TrainConfig,
) -> Result<(Position, SavedEma)> {
    let bad = |what: &str| TrainError::Checkpoint(format!("{}: {what}", path.display()));
    if meta.get("format").map(String::as_str) != Some("stride-checkpoint-1") {
        return Err(bad("not a Stride training checkpoint (no format tag)"));
    }
    for (key, want) in [("seed", cfg.seed.to_string()), ("optimizer", format!("{:?}", cfg.optimizer))] {
        if meta.get(key) != Some(&want) {
            return Err(bad(&format!("was written with {key} {}, this run has {want}", meta.get(key).map_or("(none)", String::as_str))));
        }
    }
    // The images a run trains on: a checkpoint of an older Stride has no tag and had none.
    let (had, has) = (meta.get("validation_split").map_or("none", String::as_str), validation_tag(cfg));
    if had != has {
        return Err(bad(&format!("was written with validation split {had}, this run has {has} (it would train on other images)")));
    }
    let (had, has) = (meta.get("frozen").map_or("", String::as_str), cfg.frozen.join(","));
    if had != has {
        let say = |v: &str| if v.is_empty() { "nothing".to_string() } else { v.to_string() };
        return Err(bad(&format!(
            "was written with {} frozen, this run freezes {} (its optimizer state is for other parameters)",
            say(had),
            say(&has)
        )));
    }
    // An older Stride's checkpoint has no tag: it standardised by the training images.
    let (had, has) = (meta.get("normalize").map_or("the training images", String::as_str), cfg.normalize.tag());
    if had != has {
        return Err(bad(&format!("was written standardising inputs by {had}, this run by {has}")));
    }
    // The best epoch so far was chosen by it; an older checkpoint monitored the loss.
    let (had, has) = (meta.get("monitor").map_or("loss", String::as_str), cfg.monitor.name());
    if had != has {
        return Err(bad(&format!("was written picking the best epoch by {had}, this run by {has}")));
    }
    // Where an update's group of batches starts depends on it; an older checkpoint had 1.
    let (had, has) = (meta.get("accumulate").map_or("1", String::as_str), cfg.accumulate.to_string());
    if had != has {
        return Err(bad(&format!("was written accumulating {had} batches per update, this run {has}")));
    }
    // The batches' draws depend on it; an older checkpoint mixed none.
    let (had, has) = (meta.get("mix").map_or("none", String::as_str), mix_tag(cfg));
    if had != has {
        return Err(bad(&format!("was written with batch mixing {had}, this run has {has}")));
    }
    // An older checkpoint kept no weight average.
    let (had, has) = (meta.get("ema").map_or("none", String::as_str), ema_tag(cfg));
    if had != has {
        return Err(bad(&format!("was written with weight average (EMA) decay {had}, this run has {has}")));
    }
    // Counts are whole numbers below 2^53; anything else is not a position this code wrote.
    let count = |k: &str| -> Result<usize> {
        meta.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0 && v.fract() == 0.0 && *v < 9e15)
            .map(|v| v as usize)
            .ok_or_else(|| bad(&format!("metadata '{k}' is missing or not a count")))
    };
    let loss_sum = meta
        .get("loss_sum")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .ok_or_else(|| bad("metadata 'loss_sum' is missing or not a number"))?;
    let pos = Position { epoch: count("epoch")?, step: count("step")?, loss_sum, right: count("right")?, seen: count("seen")? };
    if pos.epoch == 0 || pos.right > pos.seen {
        return Err(bad(&format!("impossible position: epoch {}, {} right of {} seen", pos.epoch, pos.right, pos.seen)));
    }
    let ema_keys: Vec<String> = tensors.keys().filter(|k| k.starts_with(EMA_PREFIX)).cloned().collect();
    let ema = ema_keys.iter().map(|k| (k[EMA_PREFIX.len()..].to_string(), tensors.remove(k).expect("key"))).collect();
    let ema_updates = if cfg.ema.is_some() { count("ema_updates")? } else { 0 };
    let state = take_optimizer_state(&mut tensors);
    let sizes: Vec<usize> = split_frozen(model, &cfg.frozen)?.0.iter().map(|p| p.value_ref().numel()).collect();
    check_optimizer_state(&state, &sizes, &bad)?;
    checkpoint::load_into(model, &tensors)?;
    opt.load_state(&state)?;
    Ok((pos, (ema, ema_updates)))
}

/// The checkpoint's prefix for the optimizer's state entries.
const OPTIMIZER_PREFIX: &str = "optimizer.";

/// Adds the optimizer's state to a checkpoint's tensors, each entry as `optimizer.<name>`.
pub(crate) fn push_optimizer_state(tensors: &mut Vec<(String, stride_autograd::Tensor<f32>)>, opt: &dyn Optimizer) -> Result<()> {
    for (name, v) in opt.state() {
        let n = v.len();
        tensors.push((format!("{OPTIMIZER_PREFIX}{name}"), stride_autograd::Tensor::from_vec(v, &[n])?));
    }
    Ok(())
}

/// Takes the optimizer's entries out of a checkpoint's tensors, by their names without the
/// prefix (what `Optimizer::load_state` reads), leaving the model's.
pub(crate) fn take_optimizer_state(tensors: &mut std::collections::HashMap<String, stride_autograd::Tensor<f32>>) -> Vec<(String, Vec<f32>)> {
    let keys: Vec<String> = tensors.keys().filter(|k| k.starts_with(OPTIMIZER_PREFIX)).cloned().collect();
    keys.into_iter().filter_map(|k| tensors.remove(&k).map(|t| (k[OPTIMIZER_PREFIX.len()..].to_string(), t.into_vec()))).collect()
}

/// Checks optimizer state read from a checkpoint: every entry belongs to one of the trained
/// parameters (their sizes in order) and matches its size; a "step" entry is one count.
pub(crate) fn check_optimizer_state(state: &[(String, Vec<f32>)], sizes: &[usize], bad: &dyn Fn(&str) -> TrainError) -> Result<()> {
    for (k, v) in state {
        if k == "step" {
            if v.len() != 1 || !(v[0] >= 0.0 && v[0].is_finite()) {
                return Err(bad(&format!("optimizer step {v:?} is not a count")));
            }
            continue;
        }
        let index = k.rsplit_once('.').and_then(|(_, i)| i.parse::<usize>().ok());
        match index.map(|i| (i, sizes.get(i))) {
            Some((_, Some(&n))) if n == v.len() => {}
            Some((i, Some(&n))) => return Err(bad(&format!("optimizer entry '{k}' has {} values but parameter {i} has {n}", v.len()))),
            _ => return Err(bad(&format!("optimizer entry '{k}' names no parameter of this model ({} trained parameters)", sizes.len()))),
        }
    }
    Ok(())
}
