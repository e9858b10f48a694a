//! report.html for a classifier's training run: what the run chose and how it went, gathered
//! from its configuration, metrics.csv and its evaluations, then drawn by [`crate::report`].

use stride_data::{Dataset, Split};

use crate::{curves, report, ClassWeights, Evaluation, Result, TrainConfig};

/// report.html of a classifier's run: the curves from metrics.csv (so a resumed run shows its
/// whole history), the last epoch's figures on the held-out set (`data.test`: the validation part
/// with a validation split), and the confusion matrix and most confident mistakes of that set or,
/// once a run with a validation split has ended, of the test set (`final_test`).
pub(crate) fn write_report(
    dir: &std::path::Path,
    title: &str,
    cfg: &TrainConfig,
    data: &Split,
    held: &Evaluation,
    final_test: Option<(&Dataset, &Evaluation)>,
) -> Result<()> {
    let rows = curves::read_metrics(&dir.join("metrics.csv"))?;
    let held_out = if cfg.validation_split.is_some() { "validation" } else { "test" };
    let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<f64>>();
    let series = |name: &str, color, i| report::Series { name: name.into(), color, values: col(i) };
    let (ds, shown, evaluated_on) = match final_test {
        Some((ds, ev)) => (ds, ev, "test"),
        None => (&data.test, held, held_out),
    };
    let plane = ds.channels * ds.height * ds.width;
    let mistakes = shown
        .mistakes
        .iter()
        .filter_map(|m| {
            ds.images.get(m.index * plane..(m.index + 1) * plane).map(|px| (m.clone(), report::image_png(px, ds.channels, ds.height, ds.width)))
        })
        .collect();
    let r = report::Report {
        title: format!("{title} on {}", data.name),
        facts: vec![
            ("model".into(), title.into()),
            (
                "data".into(),
                format!(
                    "{} ({} training, {} {held_out}{} images of {}x{}x{})",
                    data.name,
                    data.train.len(),
                    data.test.len(),
                    final_test.map_or(String::new(), |(t, _)| format!(", {} test", t.len())),
                    ds.channels,
                    ds.height,
                    ds.width
                ),
            ),
            (
                "optimizer".into(),
                format!(
                    "{:?}, lr {}, weight decay {}, batch {}{}",
                    cfg.optimizer,
                    cfg.lr,
                    cfg.weight_decay,
                    cfg.batch_size,
                    if cfg.accumulate > 1 { format!(" x {} accumulated per update", cfg.accumulate) } else { String::new() }
                ),
            ),
            ("inputs".into(), format!("standardised by {}", cfg.normalize.tag())),
            ("loss".into(), loss_fact(cfg)),
            ("epochs".into(), format!("{} of {} (best chosen by {held_out} {})", rows.len(), cfg.epochs, cfg.monitor.name())),
            (format!("{held_out} accuracy"), format!("{:.2}%", 100.0 * held.accuracy)),
            (format!("{held_out} macro F1"), format!("{:.4}", held.macro_f1())),
        ]
        .into_iter()
        .chain((!cfg.frozen.is_empty()).then(|| ("frozen".to_string(), cfg.frozen.join(", "))))
        .chain(cfg.ema.map(|d| ("weights".to_string(), format!("evaluated and saved as their moving average, decay {d}"))))
        .chain(final_test.map(|(_, t)| ("test accuracy (last epoch's weights)".to_string(), format!("{:.2}%", 100.0 * t.accuracy))))
        .collect(),
        charts: vec![
            ("loss".into(), vec![series("train", "#1f77b4", 1), series(held_out, "#ff7f0e", 3)]),
            ("accuracy".into(), vec![series("train", "#1f77b4", 2), series(held_out, "#ff7f0e", 4)]),
            ("learning rate".into(), vec![series("lr", "#2ca02c", 6)]),
        ],
        confusion: Some((shown.confusion.clone(), data.class_names.clone())),
        evaluated_on: evaluated_on.into(),
        mistakes,
        pictures: augmented(cfg, data)?.into_iter().collect(),
    };
    report::write(&dir.join("report.html"), &r)
}

/// With augmentation on, what it does to six training images (seven draws each), as a
/// captioned picture.
fn augmented(cfg: &TrainConfig, data: &Split) -> Result<Option<(String, Vec<u8>)>> {
    if cfg.augment.is_identity() || data.train.is_empty() {
        return Ok(None);
    }
    let grid = crate::visual::augmentation_grid(&data.train, &cfg.augment, 6, 7, cfg.seed)?;
    let png = crate::visual::png_bytes(&grid).map_err(|e| crate::TrainError::Io(format!("augmentation grid: {e}")))?;
    Ok(Some((format!("training images (left) and seven draws of their augmentation, {}", cfg.augment), png)))
}

/// The training loss as report.html states it.
fn loss_fact(cfg: &TrainConfig) -> String {
    let mut s = "cross-entropy".to_string();
    if cfg.label_smoothing > 0.0 {
        s += &format!(", label smoothing {}", cfg.label_smoothing);
    }
    match &cfg.class_weights {
        ClassWeights::Equal => {}
        ClassWeights::Balanced => s += ", balanced class weights",
        ClassWeights::Given(w) => s += &format!(", class weights {}", w.iter().map(f64::to_string).collect::<Vec<_>>().join(",")),
    }
    match (cfg.mix.mixup > 0.0, cfg.mix.cutmix > 0.0) {
        (false, false) => {}
        (true, false) => s += &format!(", batches mixed by MixUp (alpha {})", cfg.mix.mixup),
        (false, true) => s += &format!(", batches mixed by CutMix (alpha {})", cfg.mix.cutmix),
        (true, true) => s += &format!(", batches mixed by MixUp (alpha {}) or CutMix (alpha {})", cfg.mix.mixup, cfg.mix.cutmix),
    }
    s
}
