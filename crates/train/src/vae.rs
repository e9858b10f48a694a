//! Training the convolutional VAE: Adam on the summed binary cross-entropy plus the KL term
//! (weighed by β), with the held-out loss, a grid of reconstructions, samples from the prior
//! and pictures of the code (`latent.rs`) after every epoch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use stride_autograd::{no_grad, Device, Rng, Tensor, ToDevice, Var};
use stride_data::{Batches, Dataset, Split};
use stride_models::vae::{Vae, SIDE};
use stride_nn::optim::{self, Adam, Optimizer};
use stride_nn::Ctx;

use crate::{checkpoint, mix, Result, TrainError};

/// A VAE run's settings (the article's: Adam 1e-3, batch 32, β 1).
#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// The weight of the KL term in what training minimises, L_likelihood + β L_KL (Higgins
    /// et al.'s β-VAE; 1 is the evidence lower bound). The reported L_tot is always
    /// L_likelihood + L_KL, so runs of different β compare.
    pub beta: f64,
    /// Where result{N}.png, vae_metrics.csv and vae.safetensors go; nothing is written when None.
    pub out_dir: Option<PathBuf>,
    pub progress: bool,
    /// Where the model trains (see `TrainConfig::device`).
    pub device: Device,
    /// Continue the run in `out_dir` from where its checkpoint ([`CHECKPOINT`]) left it (the
    /// last finished epoch, or the step a stop request ended at), as an uninterrupted run would
    /// have gone on, bit for bit.
    pub resume: bool,
}

/// How a VAE run ended.
#[derive(Clone, Debug, Default)]
pub struct VaeOutcome {
    /// Every finished epoch's report, a resumed run's earlier ones first.
    pub reports: Vec<VaeReport>,
    /// Set when the stop request ended the run inside an epoch: (epoch, steps of it done), the
    /// point [`CHECKPOINT`] resumes from.
    pub interrupted: Option<(usize, usize)>,
}

/// Where a run stands inside an epoch: the steps done and their summed loss and images.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Partial {
    step: usize,
    loss_sum: f64,
    seen: usize,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig { epochs: 10, batch_size: 32, lr: 1e-3, seed: 0, beta: 1.0, out_dir: None, progress: false, device: Device::Cpu, resume: false }
    }
}

/// One epoch's held-out loss (batch means over the test split).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VaeReport {
    pub epoch: usize,
    pub train_total: f64,
    pub total: f64,
    pub likelihood: f64,
    pub kl: f64,
    pub images_per_second: f64,
}

/// The split as 32x32 images (resized when needed), grey or colour.
pub fn prepare(data: &Split) -> Result<Split> {
    if data.train.channels != 1 && data.train.channels != 3 {
        return Err(TrainError::Config(format!(
            "the VAE reads grey (1-channel) or colour (3-channel) images; {} has {} channels",
            data.name, data.train.channels
        )));
    }
    data.resized(SIDE, SIDE).map_err(|e| TrainError::Config(e.to_string()))
}

/// Held-out loss terms, in evaluation mode with a fixed draw of eps.
pub fn evaluate_vae(model: &mut Vae, ds: &Dataset, batch_size: usize) -> Result<(f64, f64, f64)> {
    let mut ctx = Ctx::eval();
    ctx.rng = Rng::seed(0x5EED);
    let device = stride_nn::device_of(model);
    let (mut tot, mut lik, mut kl, mut n) = (0.0, 0.0, 0.0, 0usize);
    no_grad(|| -> Result<()> {
        for b in Batches::new(ds, batch_size, None, false) {
            let k = b.labels.len();
            let (_, l) = model.forward_loss(&Var::constant(b.images.to(device)?), &mut ctx)?;
            let v = |x: &Var| x.value().data()[0] as f64 * k as f64;
            tot += v(&l.total);
            lik += v(&l.likelihood);
            kl += v(&l.kl);
            n += k;
        }
        Ok(())
    })?;
    let n = n.max(1) as f64;
    Ok((tot / n, lik / n, kl / n))
}

/// Trains `model` on `data` (one channel, 32x32: see [`prepare`]); calls `on_epoch` after each
/// epoch. When `cfg.out_dir` is set, writes each epoch result{epoch}.png (reconstructions of
/// nine test images; 28x28 for grey images, 32x32 for colour), samples{epoch}.png, the pictures
/// of the code (latent.png, interpolation.png, manifold.png for a 2-d code), vae_metrics.csv,
/// vae.safetensors, report.html and, last, [`CHECKPOINT`], all atomically. A resumed run
/// (`cfg.resume`) goes on from where the checkpoint left it up to `cfg.epochs` (nothing when it
/// has done as many) and returns every epoch's report, the earlier ones read from
/// vae_metrics.csv.
///
/// When `stop` becomes true (Ctrl-C), the run ends after the step under way: inside an epoch
/// it saves the checkpoint at that step (with `out_dir`) and says where in
/// [`VaeOutcome::interrupted`]; after an epoch's last step it finishes that epoch first.
pub fn train_vae(
    model: &mut Vae,
    data: &Split,
    cfg: &VaeConfig,
    stop: Option<&AtomicBool>,
    mut on_epoch: impl FnMut(&VaeReport),
) -> Result<VaeOutcome> {
    if data.train.height != SIDE || data.train.width != SIDE || data.train.channels != model.channels() {
        return Err(TrainError::Config(format!(
            "this VAE trains on {}x{SIDE}x{SIDE} images, {} has {}x{}x{} (vae::prepare resizes; Vae::for_images builds for colour)",
            model.channels(),
            data.name,
            data.train.channels,
            data.train.height,
            data.train.width
        )));
    }
    if cfg.batch_size < 2 || data.train.len() < cfg.batch_size || data.test.is_empty() {
        return Err(TrainError::Config(format!(
            "batch size {} needs at least 2 and at most the {} training images, and the test split must not be empty",
            cfg.batch_size,
            data.train.len()
        )));
    }
    if cfg.epochs == 0 {
        return Err(TrainError::Config("epochs (0) must be at least 1".into()));
    }
    if !(cfg.beta.is_finite() && (0.0..=MAX_BETA).contains(&cfg.beta)) {
        return Err(TrainError::Config(format!("β (the KL term's weight) must be in 0..={MAX_BETA}, got {}", cfg.beta)));
    }
    // Checked before the run folder is made, so a bad rate leaves nothing behind.
    let mut opt = Adam::new(cfg.lr, (0.9, 0.999), 1e-8, 0.0, false)?;
    let (mut reports, mut csv, mut partial) = (Vec::new(), String::from(CSV_HEADER), Partial::default());
    if cfg.resume {
        let dir = cfg.out_dir.as_deref().ok_or_else(|| TrainError::Config("resuming a VAE run needs its folder (out_dir)".into()))?;
        (reports, partial) = resume(dir, model, &mut opt, cfg, data)?;
        for r in &reports {
            csv.push_str(&csv_row(r));
        }
    }
    if let Some(d) = &cfg.out_dir {
        std::fs::create_dir_all(d).map_err(|e| TrainError::Io(format!("{}: {e}", d.display())))?;
    }
    stride_nn::Module::to(model, cfg.device)?;
    let params = stride_nn::Module::parameters(model);
    let asked = || stop.is_some_and(|s| s.load(Ordering::SeqCst));
    for epoch in reports.len() + 1..=cfg.epochs {
        let mut shuffle = Rng::seed(mix(cfg.seed, epoch, 0));
        let batches = Batches::new(&data.train, cfg.batch_size, Some(&mut shuffle), true);
        let steps = batches.num_batches();
        // A run resumed inside this epoch: the same shuffle, from the step after the last done.
        let Partial { step: skip, loss_sum: mut sum, mut seen } = std::mem::take(&mut partial);
        if skip >= steps {
            return Err(TrainError::Checkpoint(format!("the checkpoint is at step {skip} of epoch {epoch}, which has {steps} steps")));
        }
        let bar = if cfg.progress { ProgressBar::new(steps as u64) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}").expect("valid template").progress_chars("=> "));
        bar.set_prefix(format!("{epoch}/{}", cfg.epochs));
        bar.set_position(skip as u64);
        let (start, seen_before) = (Instant::now(), seen);
        for (step, b) in batches.enumerate().skip(skip) {
            let mut ctx = Ctx::train(mix(cfg.seed, epoch, step + 1));
            optim::zero_grad(&params);
            let (_, loss) = model.forward_loss(&Var::constant(b.images.to(cfg.device)?), &mut ctx)?;
            let objective = loss.objective(cfg.beta)?;
            objective.backward()?;
            // Read once the backward pass is queued (on a GPU a read waits for the work before
            // it); a loss that is not finite stops the run before the optimizer uses its gradients.
            let l = loss.total.value().item()? as f64;
            let minimised = if cfg.beta == 1.0 { l } else { objective.value().item()? as f64 };
            if !l.is_finite() || !minimised.is_finite() {
                let loss = if l.is_finite() { minimised } else { l };
                return Err(TrainError::Diverged { epoch, step: step + 1, loss: loss as f32 });
            }
            opt.step(&params)?;
            sum += l * b.labels.len() as f64;
            seen += b.labels.len();
            bar.inc(1);
            bar.set_message(format!("L_tot {:.2}", sum / seen as f64));
            if asked() && step + 1 < steps {
                bar.finish_and_clear();
                if let Some(d) = &cfg.out_dir {
                    save_checkpoint(d, model, &opt, epoch - 1, Partial { step: step + 1, loss_sum: sum, seen }, cfg, data)?;
                }
                return Ok(VaeOutcome { reports, interrupted: Some((epoch, step + 1)) });
            }
        }
        bar.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        let (total, likelihood, kl) = evaluate_vae(model, &data.test, 250)?;
        // Throughput of the steps this process ran (a resumed epoch's earlier ones not counted).
        let images_per_second = (seen - seen_before) as f64 / secs;
        let r = VaeReport { epoch, train_total: sum / seen.max(1) as f64, total, likelihood, kl, images_per_second };
        csv.push_str(&csv_row(&r));
        if let Some(d) = &cfg.out_dir {
            let grid = reconstructions(model, &data.test, 9)?;
            write_grid(&d.join(format!("result{epoch}.png")), &grid, 3, cell_side(model))?;
            // The same 16 points of the prior every epoch, so the report shows them sharpen.
            write_grid(&d.join(format!("samples{epoch}.png")), &sample(model, 16, SAMPLE_SEED)?, 4, cell_side(model))?;
            let drawn = write_latent_pictures(model, &data.test, d)?;
            checkpoint::write_atomic(&d.join("vae_metrics.csv"), csv.as_bytes())?;
            checkpoint::save(&d.join("vae.safetensors"), &checkpoint::state_dict(model))?;
            write_report(d, &reports, &r, data, (model.latent(), cfg.beta), &drawn)?;
            // Last: a run that stops before this resumes from the epoch before.
            save_checkpoint(d, model, &opt, epoch, Partial::default(), cfg, data)?;
        }
        on_epoch(&r);
        reports.push(r);
        if asked() && epoch < cfg.epochs {
            return Ok(VaeOutcome { reports, interrupted: Some((epoch + 1, 0)) });
        }
    }
    Ok(VaeOutcome { reports, interrupted: None })
}

/// A VAE run's checkpoint in its folder: weights, Adam's state, the epochs done and the
/// settings a resume must share.
pub const CHECKPOINT: &str = "vae_checkpoint.safetensors";
const CSV_HEADER: &str = "epoch,train_total,total,likelihood,kl,images_per_second\n";

fn csv_row(r: &VaeReport) -> String {
    format!("{},{},{},{},{},{}\n", r.epoch, r.train_total, r.total, r.likelihood, r.kl, r.images_per_second)
}

/// What a resumed run must share with the one that wrote the checkpoint.
fn settings(model: &Vae, cfg: &VaeConfig, data: &Split) -> [(&'static str, String); 6] {
    [
        ("seed", cfg.seed.to_string()),
        ("lr", cfg.lr.to_string()),
        ("batch_size", cfg.batch_size.to_string()),
        ("beta", cfg.beta.to_string()),
        ("latent", model.latent().to_string()),
        ("data", format!("{} ({} training, {} test images)", data.name, data.train.len(), data.test.len())),
    ]
}

/// The checkpoint after `epoch` finished epochs and `at`'s steps of the next (f64's shortest
/// round-trip form keeps the loss sum exact).
fn save_checkpoint(dir: &Path, model: &mut Vae, opt: &Adam, epoch: usize, at: Partial, cfg: &VaeConfig, data: &Split) -> Result<()> {
    let mut tensors = checkpoint::state_dict(model);
    crate::resume::push_optimizer_state(&mut tensors, opt)?;
    let meta = [
        ("format", "stride-vae-checkpoint-1".to_string()),
        ("epoch", epoch.to_string()),
        ("step", at.step.to_string()),
        ("loss_sum", at.loss_sum.to_string()),
        ("seen", at.seen.to_string()),
    ]
    .into_iter()
    .chain(settings(model, cfg, data))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    checkpoint::save_with_metadata(&dir.join(CHECKPOINT), &tensors, Some(meta))
}

/// Reads `dir`'s checkpoint into the model and the optimizer, every check first (nothing
/// changes when one fails); returns the finished epochs' reports from vae_metrics.csv and where
/// the next epoch stands (a checkpoint of an older Stride, without steps, at its start).
fn resume(dir: &Path, model: &mut Vae, opt: &mut Adam, cfg: &VaeConfig, data: &Split) -> Result<(Vec<VaeReport>, Partial)> {
    let path = dir.join(CHECKPOINT);
    let (mut tensors, meta) = checkpoint::load_with_metadata(&path)?;
    let bad = |what: &str| TrainError::Checkpoint(format!("{}: {what}", path.display()));
    if meta.get("format").map(String::as_str) != Some("stride-vae-checkpoint-1") {
        return Err(bad("not a Stride VAE checkpoint (no format tag)"));
    }
    for (key, want) in settings(model, cfg, data) {
        let had = meta.get(key).map_or("(none)", String::as_str);
        if had != want {
            return Err(bad(&format!("was written with {key} {had}, this run has {want}")));
        }
    }
    let number = |key: &str| meta.get(key).map(|v| v.parse::<u64>().ok().filter(|&n| n <= 1 << 40).map(|n| n as usize));
    let partial = match (number("step"), meta.get("loss_sum").map(|v| v.parse::<f64>()), number("seen")) {
        (None | Some(Some(0)), ..) => Partial::default(),
        (Some(Some(step)), Some(Ok(loss_sum)), Some(Some(seen))) if loss_sum.is_finite() && seen > 0 => Partial { step, loss_sum, seen },
        _ => return Err(bad("its step, loss sum or image count is not a number")),
    };
    // Finished epochs: at least one, unless the run stopped inside its first.
    let least = if partial.step > 0 { 0 } else { 1 };
    let done = number("epoch").flatten().filter(|&e| (least..=1_000_000).contains(&e)).ok_or_else(|| bad("no finished epoch recorded"))?;
    let metrics = dir.join("vae_metrics.csv");
    // A run stopped inside its first epoch has no metrics yet.
    let text = match std::fs::read_to_string(&metrics) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && done == 0 => String::new(),
        read => read.map_err(|e| TrainError::Io(format!("{}: {e}", metrics.display())))?,
    };
    // Rows past the checkpoint's epoch (a stop between the two writes) are dropped.
    let reports: Vec<VaeReport> = text.lines().skip(1).filter_map(parse_row).filter(|r| r.epoch <= done).collect();
    if reports.iter().map(|r| r.epoch).ne(1..=done) {
        return Err(TrainError::Checkpoint(format!("{}: does not hold epochs 1 to {done}, which the checkpoint has finished", metrics.display())));
    }
    let state = crate::resume::take_optimizer_state(&mut tensors);
    let sizes: Vec<usize> = stride_nn::Module::parameters(model).iter().map(|p| p.value_ref().numel()).collect();
    crate::resume::check_optimizer_state(&state, &sizes, &bad)?;
    checkpoint::load_into(model, &tensors)?;
    opt.load_state(&state)?;
    Ok((reports, partial))
}

/// A row of vae_metrics.csv; one of an older Stride has no throughput (NaN).
fn parse_row(line: &str) -> Option<VaeReport> {
    let f: Vec<&str> = line.split(',').collect();
    let num = |i: usize| f.get(i).and_then(|v| v.trim().parse::<f64>().ok());
    Some(VaeReport {
        epoch: f.first()?.trim().parse().ok()?,
        train_total: num(1)?,
        total: num(2)?,
        likelihood: num(3)?,
        kl: num(4)?,
        images_per_second: num(5).unwrap_or(f64::NAN),
    })
}

const SAMPLE_SEED: u64 = 2017;
/// The largest β [`train_vae`] takes.
pub const MAX_BETA: f64 = 1e4;
/// Images a side of manifold.png.
const MANIFOLD_SIDE: usize = 15;

/// The pictures of the code, rewritten every epoch: latent.png (the held-out images' code
/// means on a plane, coloured by class), interpolation.png (morphs between neighbouring
/// classes) and, for a two-dimensional code, manifold.png (what the generator draws over it).
/// Returns the files written.
fn write_latent_pictures(model: &mut Vae, test: &Dataset, dir: &Path) -> Result<Vec<&'static str>> {
    let shown = crate::latent::spread(test.len(), crate::latent::MAX_POINTS);
    let plane = crate::latent::plane(&crate::latent::codes(model, test, &shown)?)?;
    let classes: Vec<usize> = shown.iter().map(|&i| test.labels[i] as usize).collect();
    crate::curves::plot_scatter(&plane.points, &classes, [&plane.axes[0], &plane.axes[1]], &dir.join(LATENT_PNG))?;
    let mut drawn = vec![LATENT_PNG];
    // A held-out set without two neighbouring classes (one class only) has nothing to morph.
    if let Ok((morphs, _)) = crate::latent::interpolation(model, test, 5, 10) {
        write_grid(&dir.join(INTERPOLATION_PNG), &morphs, 10, cell_side(model))?;
        drawn.push(INTERPOLATION_PNG);
    }
    if model.latent() == 2 {
        write_grid(&dir.join(MANIFOLD_PNG), &crate::latent::manifold(model, MANIFOLD_SIDE)?, MANIFOLD_SIDE, cell_side(model))?;
        drawn.push(MANIFOLD_PNG);
    }
    Ok(drawn)
}

const LATENT_PNG: &str = "latent.png";
const INTERPOLATION_PNG: &str = "interpolation.png";
const MANIFOLD_PNG: &str = "manifold.png";

/// report.html of a VAE run: the three losses per epoch, and per epoch the reconstructions
/// and the samples from the prior (read back from the PNGs just written).
/// `code` is the code's size and β; `drawn`, the pictures of the code just written.
fn write_report(dir: &Path, done: &[VaeReport], last: &VaeReport, data: &Split, code: (usize, f64), drawn: &[&str]) -> Result<()> {
    let all: Vec<&VaeReport> = done.iter().chain(std::iter::once(last)).collect();
    let series =
        |name: &str, color, f: fn(&VaeReport) -> f64| crate::report::Series { name: name.into(), color, values: all.iter().map(|r| f(r)).collect() };
    let mut pictures = Vec::new();
    for r in &all {
        for (what, file) in [("reconstructions", format!("result{}.png", r.epoch)), ("samples from the prior", format!("samples{}.png", r.epoch))] {
            let path = dir.join(&file);
            let png = std::fs::read(&path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
            pictures.push((format!("epoch {}: {what}", r.epoch), png));
        }
    }
    let names = data.class_names.iter().enumerate().map(|(i, n)| format!("{i} {n}")).collect::<Vec<_>>().join(", ");
    for (what, file) in [
        (
            format!(
                "the code of {} held-out images after epoch {} (means; colours by class: {names})",
                crate::latent::spread(data.test.len(), crate::latent::MAX_POINTS).len(),
                last.epoch
            ),
            LATENT_PNG,
        ),
        (format!("from one class into the next along a line between two codes, after epoch {}", last.epoch), INTERPOLATION_PNG),
        (format!("what the generator draws over the code, z1 from -2 to 2 across, z2 from 2 to -2 down, after epoch {}", last.epoch), MANIFOLD_PNG),
    ] {
        if drawn.contains(&file) {
            let path = dir.join(file);
            pictures.push((what, std::fs::read(&path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?));
        }
    }
    let report = crate::report::Report {
        title: format!("convolutional VAE on {}", data.name),
        facts: vec![
            ("data".into(), format!("{} ({} training, {} test images)", data.name, data.train.len(), data.test.len())),
            ("held-out L_tot".into(), format!("{:.2} after epoch {}", last.total, last.epoch)),
            ("code".into(), format!("{} dimensions; training minimised L_likelihood + {} L_KL", code.0, code.1)),
        ],
        charts: vec![
            ("L_tot".into(), vec![series("train", "#1f77b4", |r| r.train_total), series("test", "#ff7f0e", |r| r.total)]),
            ("test L_likelihood and L_KL".into(), vec![series("L_likelihood", "#9467bd", |r| r.likelihood), series("L_KL", "#2ca02c", |r| r.kl)]),
        ],
        pictures,
        ..Default::default()
    };
    crate::report::write(&dir.join("report.html"), &report)
}

/// Reconstructions of `n` images spread evenly over `ds` (so a class-sorted test split shows
/// several classes), in evaluation mode with a fixed eps.
pub fn reconstructions(model: &mut Vae, ds: &Dataset, n: usize) -> Result<Tensor<f32>> {
    let n = n.min(ds.len());
    if n == 0 {
        return Err(TrainError::Config("no images to reconstruct".into()));
    }
    let pixels: Vec<f32> = (0..n).flat_map(|i| ds.image(i * ds.len() / n).iter().map(|&p| p as f32 / 255.0)).collect();
    let x = Tensor::from_vec(pixels, &[n, ds.channels, ds.height, ds.width])?;
    let mut ctx = Ctx::eval();
    ctx.rng = Rng::seed(0x5EED);
    let x = x.to(stride_nn::device_of(model))?;
    Ok(no_grad(|| model.forward_loss(&Var::constant(x), &mut ctx))?.0.value().to_host()?)
}

/// `n` new images from the prior: z ~ N(0, 1), generated in evaluation mode.
pub fn sample(model: &mut Vae, n: usize, seed: u64) -> Result<Tensor<f32>> {
    if n == 0 || n > 4096 {
        return Err(TrainError::Config(format!("can sample 1..=4096 images, asked for {n}")));
    }
    let z = Var::constant(Rng::seed(seed).normal(&[n, model.latent()], 0.0, 1.0)?.to(stride_nn::device_of(model))?);
    Ok(no_grad(|| model.generate(&z, &mut Ctx::eval()))?.value().to_host()?)
}

/// The side a grid draws each image at: digits at MNIST's 28 (the article's), colour images
/// at their own 32.
pub fn cell_side(model: &Vae) -> usize {
    if model.channels() == 1 {
        28
    } else {
        SIDE
    }
}

const FILTER: image::imageops::FilterType = image::imageops::FilterType::Triangle;

/// Writes images [N, 1, H, W] (a grayscale PNG) or [N, 3, H, W] (RGB) in [0, 1] as a grid with
/// `cols` columns, each image resized to `side` x `side`, 2-pixel gaps; atomically.
pub fn write_grid(path: &Path, images: &Tensor<f32>, cols: usize, side: usize) -> Result<()> {
    let &[n, c @ (1 | 3), h, w] = images.shape() else {
        return Err(TrainError::Config(format!("a grid needs [N, 1 or 3, H, W] images, got {:?}", images.shape())));
    };
    let (cols, gap) = (cols.clamp(1, n.max(1)), 2);
    let rows = n.div_ceil(cols);
    let (gw, gh) = ((cols * (side + gap) + gap) as u32, (rows * (side + gap) + gap) as u32);
    let byte = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let at = |i: usize| ((gap + (i % cols) * (side + gap)) as i64, (gap + (i / cols) * (side + gap)) as i64);
    if c == 1 {
        let mut grid = image::GrayImage::from_pixel(gw, gh, image::Luma([255]));
        for (i, img) in images.data().chunks_exact(h * w).enumerate() {
            let small = image::GrayImage::from_raw(w as u32, h as u32, img.iter().map(|&v| byte(v)).collect()).expect("plane size");
            let (x, y) = at(i);
            image::imageops::replace(&mut grid, &image::imageops::resize(&small, side as u32, side as u32, FILTER), x, y);
        }
        return crate::visual::save_png(path, &grid);
    }
    let mut grid = image::RgbImage::from_pixel(gw, gh, image::Rgb([255, 255, 255]));
    for (i, img) in images.data().chunks_exact(3 * h * w).enumerate() {
        // Planes to interleaved pixels.
        let bytes: Vec<u8> = (0..h * w).flat_map(|p| (0..3).map(move |k| byte(img[k * h * w + p]))).collect();
        let small = image::RgbImage::from_raw(w as u32, h as u32, bytes).expect("plane size");
        let (x, y) = at(i);
        image::imageops::replace(&mut grid, &image::imageops::resize(&small, side as u32, side as u32, FILTER), x, y);
    }
    crate::visual::save_png(path, &grid)
}
