//! `stride train`: trains a zoo model on a data set and reports test accuracy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, ValueEnum};
use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_data::Augment;
use stride_models::InputSpec;
use stride_nn::schedule::{ReduceOnPlateau, Schedule};
use stride_nn::{Ctx, Module};
use stride_train::{ClassWeights, OptimizerKind, Standardize, TrainConfig};

#[derive(Args)]
pub struct TrainArgs {
    /// Zoo model to train (`stride models` lists them), or a TOML model file (see
    /// examples/models/).
    #[arg(long, default_value = "cnn")]
    model: String,
    /// `mnist` (embedded, 8,000/2,000 digits), `fashion-mnist` (Debian's dataset-fashion-mnist),
    /// or a folder: the four IDX files of MNIST's layout (raw or .gz), CIFAR-10's binary batches
    /// (data_batch_1.bin ... test_batch.bin), CIFAR-100's (train.bin, test.bin; 100 classes, or
    /// `FOLDER:coarse` for its 20 superclasses), or one sub-folder of PNG/JPEG images per class.
    #[arg(long, default_value = "mnist")]
    data: String,
    /// Epochs (default: the zoo model's, see `stride models`; 10 for a model file).
    #[arg(long, value_parser = crate::at_least_one)]
    epochs: Option<usize>,
    #[arg(long, default_value_t = 64, value_parser = crate::at_least_one)]
    batch_size: usize,
    /// Gradient accumulation: update once every N batches with their summed gradients, so an
    /// update sees N x batch-size images while memory holds one batch.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = crate::at_least_one)]
    accumulate: usize,
    /// Keep an exponential moving average of the weights with this decay, such as 0.999
    /// (timm's ModelEma, Keras's use_ema): each epoch is evaluated, and model.safetensors and
    /// best.safetensors saved, with the averaged weights while the optimizer goes on with its
    /// own.
    #[arg(long, value_name = "DECAY", value_parser = parse_decay)]
    ema: Option<f64>,
    /// MixUp: blend each training image with the one before it in the batch by λ ~ Beta(A, A)
    /// and train towards both labels in proportion (torchvision's v2 MixUp; timm uses 0.8).
    #[arg(long, value_name = "A", value_parser = parse_alpha)]
    mixup: Option<f64>,
    /// CutMix: paste a box of about 1 - λ of the area from the image before it, λ ~ Beta(A,
    /// A) (timm uses 1.0). With --mixup too, each batch takes one of the two at random.
    #[arg(long, value_name = "A", value_parser = parse_alpha)]
    cutmix: Option<f64>,
    /// Optimizer (default: adam, or adamw for a zoo model with a default weight decay, see
    /// `stride models`).
    #[arg(long, value_enum)]
    optimizer: Option<Opt>,
    /// Learning rate (at the start of the schedule).
    #[arg(long, default_value_t = 2e-3, allow_negative_numbers = true, value_parser = crate::learning_rate)]
    lr: f64,
    /// Momentum (SGD only).
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true, value_parser = crate::momentum)]
    momentum: f64,
    /// L2 weight decay (decoupled for adamw). Default 0, or the zoo model's when --optimizer
    /// is not given either.
    #[arg(long, allow_negative_numbers = true, value_parser = crate::weight_decay)]
    weight_decay: Option<f64>,
    /// Augmentation of training images: `auto` (none for the MNIST family, where it did not
    /// pay in the default epochs), `none`, or a list such as `hflip,crop4,rotate10,erase0.5`;
    /// for photographs `resizedcrop0.35,hflip,jitter0.4` (RandomResizedCrop, ColorJitter).
    #[arg(long, default_value = "auto")]
    augment: String,
    /// Input standardisation after scaling pixels to [0, 1]: `data` (each channel's mean and
    /// standard deviation over the training images), `imagenet` (what torchvision's pretrained
    /// weights expect), `none`, or `MEAN,...:STD,...` such as `0.5,0.5,0.5:0.25,0.25,0.25`.
    /// The weights' header records it for eval and predict; a resumed run needs the same.
    #[arg(long, value_name = "HOW", value_parser = parse_normalize)]
    normalize: Option<Standardize>,
    /// Linear warm-up: the first N epochs rise from a tenth of --lr towards it, then the schedule
    /// runs over the remaining epochs (PyTorch's LinearLR then the schedule, in a SequentialLR).
    /// Not with onecycle, which rises on its own, nor plateau.
    #[arg(long, value_name = "N", value_parser = crate::at_least_one)]
    warmup: Option<usize>,
    /// Learning-rate schedule over the epochs.
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: Sched,
    /// Label smoothing of the training loss, in [0, 1): 1-ε on the true class and ε/C on every
    /// class (default 0).
    #[arg(long, value_name = "ε", value_parser = parse_smoothing)]
    label_smoothing: Option<f64>,
    /// Weigh the training loss by class, for imbalanced data: `balanced` (each class counts the
    /// same in total: n / (classes x its count)) or one weight per class, such as `1,4,1`.
    /// The held-out loss stays unweighted.
    #[arg(long, value_name = "W", value_parser = parse_class_weights)]
    class_weights: Option<ClassWeights>,
    /// Clip gradients to this global L2 norm before each update (a number > 0, such as 1).
    #[arg(long, value_parser = parse_clip_norm)]
    clip_grad_norm: Option<f64>,
    /// Stop when the held-out loss (validation with --validation-split, else test) has not
    /// improved for N epochs in a row (Keras's EarlyStopping); the best epoch's weights are kept
    /// in best.safetensors.
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    early_stop: Option<usize>,
    /// What picks the best epoch for --early-stop and --keep-best: the held-out loss (lower is
    /// better), accuracy or macro-averaged F1 (higher is better; F1 weighs every class the same,
    /// for imbalanced data). Keras's `monitor`.
    #[arg(long, value_enum, default_value = "loss")]
    monitor: Watch,
    /// Keep the weights of the epoch with the lowest held-out loss in best.safetensors
    /// (model.safetensors holds the last epoch's).
    #[arg(long)]
    keep_best: bool,
    /// Hold out this fraction of the training images (each class's share, drawn by --seed),
    /// such as 0.1, and judge every epoch on them instead of on the test set; the test set is
    /// evaluated once at the end. What early stopping, --keep-best and the plateau schedule
    /// should watch, so that picking an epoch never looks at the test set.
    #[arg(long, value_name = "F", value_parser = parse_fraction)]
    validation_split: Option<f64>,
    /// Seed for initialisation, shuffling and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for this run's files (metrics.csv, model.safetensors); default: a new folder
    /// under runs/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in --out (after Ctrl-C or a crash) exactly where it stopped.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Resize every image first: `32` or `HxW` (for models that need larger inputs than the
    /// data's, such as vgg16 on 28x28 digits).
    #[arg(long, value_parser = parse_size)]
    resize: Option<(usize, usize)>,
    /// Start from these weights (a safetensors state_dict: a Stride run's model.safetensors or
    /// torchvision's, saved with `safetensors.torch.save_file(model.state_dict(), ...)`).
    #[arg(long, conflicts_with = "resume")]
    weights: Option<PathBuf>,
    /// With --weights: tensors whose shape differs from the model's (a classifier trained for
    /// another number of classes) start fresh instead of being refused; the run names them.
    #[arg(long, requires = "weights")]
    skip_mismatched: bool,
    /// Do not train the parameters under these dotted names (comma-separated, e.g.
    /// `conv1,layer1`; `stride summary MODEL` lists the layers): they keep their values and no
    /// gradient is computed for them; a batch norm among them normalises by its running
    /// statistics and keeps them (Keras's frozen layers).
    #[arg(long, value_name = "LAYERS", value_delimiter = ',', conflicts_with = "train_only")]
    freeze: Vec<String>,
    /// Train only the parameters under these dotted names (e.g. `fc`, a new classifier on a
    /// pretrained network); everything else is frozen.
    #[arg(long, value_name = "LAYERS", value_delimiter = ',')]
    train_only: Vec<String>,
    /// Print every layer's output shape for one batch before training.
    #[arg(long)]
    debug: bool,
    /// Activation recompute: keep only the inputs of N segments of the network in the forward
    /// pass and recompute each in the backward pass (less memory, about one more forward
    /// pass of compute; `stride summary MODEL --recompute N` shows the saving).
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    recompute: Option<usize>,
    /// Do not write report.html (curves, confusion matrix, most confident mistakes) after
    /// each epoch.
    #[arg(long)]
    no_report: bool,
    /// Under `mpirun` (a build with `--features mpi`): batch norm's training statistics over all
    /// processes' shares of the batch (PyTorch's SyncBatchNorm) rather than each process's own.
    #[arg(long)]
    sync_bn: bool,
    /// Train every step eagerly (op by op) instead of through a compiled training plan (for
    /// debugging; networks the planner refuses, such as those with dropout, always do).
    #[arg(long)]
    eager: bool,
    /// Instead of training, run a learning-rate range test (fastai's lr_find): 100 updates with
    /// the rate rising from 1e-7 to 10 and everything else as this command would train; writes
    /// lr_find.csv and lr_find.png to the run folder and suggests the rate at which the loss
    /// fell fastest. The weights are left as they were; --lr, --epochs and the schedule do not
    /// apply.
    #[arg(long, conflicts_with_all = ["resume", "sync_bn"])]
    lr_find: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Sched {
    /// The same rate every epoch.
    Constant,
    /// Cosine annealing to zero over the run.
    Cosine,
    /// Divide by 10 every third of the run.
    Step,
    /// One-cycle: rise to --lr over the first 30% of the run, then anneal far below it.
    Onecycle,
    /// Divide by 10 when the held-out loss (validation or test) has not improved for 2 epochs.
    Plateau,
}

#[derive(Clone, Copy, ValueEnum)]
enum Watch {
    Loss,
    Accuracy,
    F1,
}

impl Watch {
    fn monitor(self) -> stride_train::Monitor {
        match self {
            Watch::Loss => stride_train::Monitor::Loss,
            Watch::Accuracy => stride_train::Monitor::Accuracy,
            Watch::F1 => stride_train::Monitor::MacroF1,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Opt {
    Sgd,
    Nesterov,
    Adam,
    Adamw,
}

impl Opt {
    pub fn kind(self, momentum: f64) -> OptimizerKind {
        match self {
            Opt::Sgd => OptimizerKind::Sgd { momentum, nesterov: false },
            Opt::Nesterov => OptimizerKind::Sgd { momentum, nesterov: true },
            Opt::Adam => OptimizerKind::Adam,
            Opt::Adamw => OptimizerKind::AdamW,
        }
    }
}

/// A fresh run folder under runs/: `runs/<model>-<data>-<n>`, names reduced to safe characters.
pub fn default_out(model: &str, data: &str) -> PathBuf {
    let tag = |s: &str| -> String {
        let base = std::path::Path::new(s).file_stem().map_or(s.to_string(), |f| f.to_string_lossy().into_owned());
        base.chars().map(|c| if c.is_alphanumeric() || c == '-' { c } else { '_' }).collect()
    };
    let (m, d) = (tag(model), tag(data));
    (1..).map(|n| PathBuf::from(format!("runs/{m}-{d}-{n}"))).find(|p| !p.exists()).expect("an unused name")
}

/// The optimizer and weight decay: the flags where given; else AdamW with the zoo model's
/// weight decay when it has one (and neither flag is given), else Adam without decay.
fn recipe(optimizer: Option<Opt>, weight_decay: Option<f64>, zoo_decay: f64) -> (Opt, f64) {
    match (optimizer, weight_decay) {
        (None, None) if zoo_decay > 0.0 => (Opt::Adamw, zoo_decay),
        (opt, wd) => (opt.unwrap_or(Opt::Adam), wd.unwrap_or(0.0)),
    }
}

/// A label-smoothing ε in [0, 1).
fn parse_smoothing(s: &str) -> Result<f64, String> {
    parse_number(s, |e| (0.0..1.0).contains(&e), "a label smoothing", "a number in [0, 1), such as 0.1")
}

/// The learning-rate schedule over `epochs`, after a linear warm-up of `warmup` epochs.
fn schedule(kind: Sched, epochs: usize, warmup: Option<usize>) -> Result<Schedule, String> {
    let rest = epochs - warmup.unwrap_or(0).min(epochs);
    let after = match kind {
        Sched::Constant | Sched::Plateau => Schedule::Constant,
        Sched::Cosine => Schedule::Cosine { t_max: rest, eta_min: 0.0 },
        Sched::Step => Schedule::Step { step_size: rest.div_ceil(3), gamma: 0.1 },
        Sched::Onecycle => Schedule::OneCycle { total: rest, pct_start: 0.3, div_factor: 25.0, final_div_factor: 1e4 },
    };
    let Some(n) = warmup else { return Ok(after) };
    if matches!(kind, Sched::Onecycle | Sched::Plateau) {
        let name = kind.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string());
        return Err(format!("--warmup does not combine with the {name} schedule (onecycle warms up on its own; plateau follows the held-out loss)"));
    }
    if n >= epochs {
        return Err(format!("--warmup {n} leaves none of the {} for the schedule", epochs_text(epochs)));
    }
    Ok(Schedule::Warmup { epochs: n, start_factor: 0.1, then: Box::new(after) })
}

/// `data`, `imagenet`, `none` or `MEAN,...:STD,...`.
pub fn parse_normalize(s: &str) -> Result<Standardize, String> {
    match s.trim() {
        "data" => Ok(Standardize::TrainingImages),
        spec => stride_data::Normalize::parse(spec).map(Standardize::Fixed).map_err(|e| format!("{e} (or data)")),
    }
}

/// `balanced`, or comma-separated weights, each a finite number >= 0.
fn parse_class_weights(s: &str) -> Result<ClassWeights, String> {
    if s.trim() == "balanced" {
        return Ok(ClassWeights::Balanced);
    }
    let weight = |v: &str| parse_number(v, |w| w >= 0.0 && w.is_finite(), "a class weight", "balanced, or numbers >= 0 such as 1,4,1");
    s.split(',').map(weight).collect::<Result<Vec<f64>, String>>().map(ClassWeights::Given)
}

/// A validation fraction in (0, 1).
fn parse_decay(s: &str) -> Result<f64, String> {
    parse_number(s, |v| (0.0..1.0).contains(&v), "a decay for the weight average", "a number in [0, 1), such as 0.999")
}

fn parse_alpha(s: &str) -> Result<f64, String> {
    parse_number(s, |v| v > 0.0 && v <= stride_data::MAX_ALPHA, "a Beta distribution's alpha", "a number in (0, 100], such as 0.8")
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    parse_number(s, |f| f > 0.0 && f < 1.0, "a fraction of the training set", "a number between 0 and 1, such as 0.1")
}

/// A gradient clipping norm: finite and > 0.
fn parse_clip_norm(s: &str) -> Result<f64, String> {
    parse_number(s, |m| m > 0.0 && m.is_finite(), "a gradient norm", "a number > 0, such as 1")
}

/// A number that `ok` accepts, or "'S' is not WHAT: give GIVE".
fn parse_number(s: &str, ok: impl Fn(f64) -> bool, what: &str, give: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().ok().filter(|&v| ok(v)).ok_or_else(|| format!("'{s}' is not {what}: give {give}"))
}

/// "1 epoch", "3 epochs".
fn epochs_text(n: usize) -> String {
    format!("{n} epoch{}", if n == 1 { "" } else { "s" })
}

/// `32` or `32x48` (height x width).
pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|n| (1..=4096).contains(n));
    let size = match s.split_once(['x', 'X']) {
        Some((h, w)) => parse(h).zip(parse(w)),
        None => parse(s).map(|n| (n, n)),
    };
    size.ok_or_else(|| format!("'{s}' is not a size: give N or HxW with each side 1..=4096"))
}

/// Trains as `a` says on `device`; `on_gpu` is the GPU's line for the header ("on cuda:0: ...").
pub fn run(a: &TrainArgs, device: stride_autograd::Device, on_gpu: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
    // Under `mpirun -np N` (a build with `--features mpi`), this process is one rank of N.
    #[cfg(not(feature = "mpi"))]
    if let Some(n) = launched_processes().filter(|&n| n > 1) {
        return Err(format!(
            "this stride was built without MPI, so under mpirun each of the {n} processes would train alone into the same run folder; \
             build it with `cargo build --release -p stride-cli --features mpi`"
        )
        .into());
    }
    #[cfg(feature = "mpi")]
    let world = std::rc::Rc::new(crate::mpi::World::init()?);
    #[cfg(feature = "mpi")]
    let group: Option<std::rc::Rc<dyn stride_train::group::Group>> =
        (stride_train::group::Group::size(world.as_ref()) > 1).then(|| world.clone() as std::rc::Rc<dyn stride_train::group::Group>);
    #[cfg(not(feature = "mpi"))]
    let group: Option<std::rc::Rc<dyn stride_train::group::Group>> = None;
    // Rank 0 speaks for the job; the other ranks print only errors.
    let root = group.as_ref().is_none_or(|g| g.rank() == 0);
    // Where every rank trains, for rank 0's header.
    let devices = match &group {
        Some(g) => rank_devices(g.as_ref(), device)?,
        None => vec![device],
    };
    if let Some(line) = on_gpu.filter(|_| root) {
        println!("{line}");
    }
    let mut data = stride_data::load(&a.data)?;
    if let Some((h, w)) = a.resize {
        data = data.resized(h, w)?;
    }
    let t = &data.train;
    let spec = InputSpec { channels: t.channels, height: t.height, width: t.width, classes: t.classes };
    let mut model = stride_models::build_any(&a.model, &mut Rng::seed(a.seed), spec)?;
    let mut fresh = Vec::new();
    if let Some(w) = &a.weights {
        let (standardised, skipped) = crate::infer::load_weights_with(&mut model, w, a.skip_mismatched)?;
        fresh = skipped;
        // Weights without Stride's header are most likely torchvision's, trained on ImageNet.
        if standardised.is_none() && a.normalize.is_none() && t.channels == 3 {
            crate::infer::imagenet_hint(w);
        }
    }
    let normalize = a.normalize.clone().unwrap_or_default();
    let frozen = if a.train_only.is_empty() { a.freeze.clone() } else { stride_train::freeze_all_but(&mut model, &a.train_only)? };
    // A zoo model's own epochs and weight decay (with AdamW) apply where no flag says otherwise;
    // a model file gets 10 epochs and plain Adam.
    let zoo = if a.model.ends_with(".toml") || a.model.ends_with(".onnx") { None } else { Some(stride_models::entry(&a.model)?) };
    let epochs = a.epochs.unwrap_or(zoo.map_or(10, |z| z.epochs));
    let schedule = schedule(a.schedule, epochs, a.warmup)?;
    let (opt, weight_decay) = recipe(a.optimizer, a.weight_decay, zoo.map_or(0.0, |z| z.weight_decay));
    let label_smoothing = a.label_smoothing.unwrap_or(0.0);
    let augment = match a.augment.as_str() {
        // Measured on Fashion-MNIST with the earlier two-block cnn-bn: flips cost 0.3 points
        // of test accuracy in 12 epochs (92.7% against 93.0%), shifts by up to 2 pixels
        // (crop2) 0.9 points in 13 (92.0% against 93.0%). So "auto" adds none.
        "auto" | "none" => Augment::default(),
        spec => Augment::parse(spec)?,
    };
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.model, &a.data));
    if let Some(g) = group.as_ref().filter(|_| root) {
        let (start, len) = stride_train::group::shard(a.batch_size, 0, g.size());
        let on = if devices.iter().all(|d| d.is_cpu()) {
            String::new()
        } else {
            format!("; ranks on {}", devices.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
        };
        println!(
            "data parallel: {} processes, each trains on its share of every batch of {} (rank 0: rows {start}..{}){on}",
            g.size(),
            a.batch_size,
            start + len
        );
    }
    // The set each epoch is judged on, and how many training images a split holds out.
    let held_out = if a.validation_split.is_some() { "validation" } else { "test" };
    // What the best epoch is chosen by: "lower validation loss", "higher test accuracy".
    let monitor = a.monitor.monitor();
    let better = format!("{} {held_out} {}", if monitor == stride_train::Monitor::Loss { "lower" } else { "higher" }, monitor.name());
    let held = a.validation_split.map_or(0, |f| t.validation_size(f));
    if root {
        println!(
            "training {} ({} parameters) on {}: {} training{} / {} test images of {}x{}x{}, {} classes; run folder {}",
            a.model,
            model.num_parameters(),
            data.name,
            t.len() - held,
            a.validation_split.map_or_else(String::new, |_| format!(" / {held} validation")),
            data.test.len(),
            t.channels,
            t.height,
            t.width,
            t.classes,
            out.display()
        );
    }
    if root && !a.lr_find {
        println!(
            "{}, batch {}{}, {} lr {}{}, {} schedule{}{}{}{}{}{}",
            epochs_text(epochs),
            a.batch_size,
            if a.accumulate > 1 { format!(" x {} accumulated per update", a.accumulate) } else { String::new() },
            opt.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string()),
            a.lr,
            if weight_decay > 0.0 { format!(" weight decay {weight_decay}") } else { String::new() },
            a.warmup.map_or_else(String::new, |n| format!("{} of warm-up, then ", epochs_text(n)))
                + &a.schedule.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string()),
            if label_smoothing > 0.0 { format!(", label smoothing {label_smoothing}") } else { String::new() },
            match &a.class_weights {
                None | Some(ClassWeights::Equal) => String::new(),
                Some(ClassWeights::Balanced) => {
                    // From the images trained on, as the run computes them.
                    let counts = a.validation_split.map_or_else(|| t.class_counts(), |f| t.training_class_counts(f));
                    let w = ClassWeights::Balanced.resolve(&counts)?.unwrap_or_default();
                    format!(", balanced class weights {}", w.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(","))
                }
                Some(ClassWeights::Given(w)) => format!(", class weights {}", w.iter().map(f64::to_string).collect::<Vec<_>>().join(",")),
            },
            a.early_stop.map_or_else(String::new, |n| format!(", early stopping after {} without a {better}", epochs_text(n))),
            match &normalize {
                Standardize::TrainingImages => String::new(),
                Standardize::Fixed(n) if *n == stride_data::Normalize::identity() => ", inputs only scaled to [0, 1]".into(),
                Standardize::Fixed(n) => format!(", inputs standardised by {n}"),
            },
            a.ema.map_or_else(String::new, |d| format!(", evaluating and saving the weights' moving average (decay {d})")),
            match (a.mixup, a.cutmix) {
                (None, None) => String::new(),
                (Some(m), None) => format!(", MixUp alpha {m}"),
                (None, Some(c)) => format!(", CutMix alpha {c}"),
                (Some(m), Some(c)) => format!(", MixUp alpha {m} or CutMix alpha {c} by turns at random"),
            },
        );
    }
    if root && !fresh.is_empty() {
        let list: Vec<String> = fresh.iter().map(|s| format!("{} {:?} (the weights' {:?})", s.name, s.model, s.file)).collect();
        println!("started fresh, their shapes differ from the weights': {}", list.join(", "));
    }
    if root && !frozen.is_empty() {
        let (warm, cold) = stride_train::split_frozen(&mut model, &frozen)?;
        let count = |vars: &[Var]| vars.iter().map(|v| v.value_ref().numel()).sum::<usize>();
        println!("frozen: {} ({} parameters); training the other {}", frozen.join(", "), count(&cold), count(&warm));
    }
    if a.debug {
        let x = Var::constant(Tensor::zeros(&[a.batch_size.clamp(1, 64), t.channels, t.height, t.width])?);
        let mut ctx = Ctx::eval();
        ctx.debug = true;
        eprintln!("{:>16} {:<48} -> {:?}", "", "input", x.shape());
        no_grad(|| model.forward(&x, &mut ctx))?;
    }
    let optimizer = opt.kind(a.momentum);
    let cfg = TrainConfig {
        epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        optimizer,
        weight_decay,
        schedule,
        plateau: matches!(a.schedule, Sched::Plateau).then(|| ReduceOnPlateau::new(0.1, 2, 1e-4, 0.0)),
        normalize,
        augment,
        clip_grad_norm: a.clip_grad_norm,
        early_stopping: a.early_stop,
        monitor,
        keep_best: a.keep_best,
        validation_split: a.validation_split,
        frozen,
        seed: a.seed,
        out_dir: Some(out.clone()),
        progress: root && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        report: (!a.no_report).then(|| a.model.clone()),
        recompute: a.recompute,
        label_smoothing,
        class_weights: a.class_weights.clone().unwrap_or_default(),
        data_parallel: group.clone().map(stride_train::group::DataParallel),
        sync_bn: a.sync_bn,
        device,
        eager: a.eager,
        accumulate: a.accumulate,
        ema: a.ema,
        mix: stride_data::BatchMix { mixup: a.mixup.unwrap_or(0.0), cutmix: a.cutmix.unwrap_or(0.0) },
    };
    let stop = stop_on_ctrl_c();
    if a.lr_find {
        if group.is_some() {
            return Err("the learning-rate range test runs in one process; run `stride train --lr-find` without mpirun".into());
        }
        return range_test(&mut model, &data, &cfg, &out, &stop);
    }
    let started = std::time::Instant::now();
    let outcome = stride_train::train(&mut model, &data, &cfg, a.resume, Some(&stop), |r| {
        if !root {
            return;
        }
        let held = if cfg.validation_split.is_some() { "val" } else { "test" };
        println!(
            "epoch {}/{}: train loss {:.4} acc {:.4} | {held} loss {:.4} acc {:.4} | {:.0} images/s",
            r.epoch, cfg.epochs, r.train_loss, r.train_accuracy, r.test.loss, r.test.accuracy, r.images_per_second
        );
    })?;
    if !root {
        return Ok(());
    }
    if let Some(g) = &group {
        let (busy, all) = (g.collective_seconds(), started.elapsed().as_secs_f64());
        println!("rank 0 waited {busy:.1} s of {all:.1} s for collectives ({:.0}%: gradients, metrics, buffers)", 100.0 * busy / all.max(1e-9));
    }
    if let Some((epoch, step)) = outcome.interrupted {
        println!("interrupted during epoch {epoch} after step {step}; checkpoint saved in {}", out.display());
        println!("resume: run the same command with --out {} --resume", out.display());
        return Ok(());
    }
    let best_line = |b: &stride_train::Best| {
        // A run resumed with --keep-best whose best epoch came before it had no file to keep.
        let file = out.join(stride_train::BEST_WEIGHTS);
        let kept = if file.exists() { format!("its weights: {}", file.display()) } else { "its weights were not kept (no --keep-best then)".into() };
        let on_test = outcome.best_test.as_ref().map_or_else(String::new, |t| format!(" (test accuracy {:.4})", t.accuracy));
        let f1 = if monitor == stride_train::Monitor::MacroF1 { format!(" macro F1 {:.4}", b.macro_f1) } else { String::new() };
        println!("best epoch {}: {held_out} loss {:.4} acc {:.4}{f1}; {kept}{on_test}", b.epoch, b.loss, b.accuracy)
    };
    // The last line states the test accuracy of the last epoch's weights: measured at the end
    // with a validation split.
    let test_line = |acc: f64| {
        let when = if outcome.test.is_some() { " (last epoch's weights)" } else { "" };
        println!("test accuracy {acc:.4}{when}")
    };
    let Some(last) = outcome.reports.last() else {
        match outcome.stopped_early {
            Some(e) => println!("nothing to do: the run in {} stopped early after epoch {e}", out.display()),
            None => println!("nothing to do: the run in {} already finished its {} epochs", out.display(), cfg.epochs),
        }
        if let Some(b) = outcome.best.as_ref().filter(|_| cfg.keep_best || cfg.early_stopping.is_some()) {
            best_line(b);
        }
        // The last line still states the run's final accuracy: from its metrics, or measured
        // now after a validation split.
        let csv = std::fs::read_to_string(out.join("metrics.csv"))?;
        let last_row = csv.lines().last().and_then(|l| l.split(',').nth(4)).and_then(|v| v.parse::<f64>().ok());
        if let Some(acc) = outcome.test.as_ref().map(|t| t.accuracy).or(last_row) {
            test_line(acc);
        }
        return Ok(());
    };
    if let (Some(e), Some(b)) = (outcome.stopped_early, outcome.best) {
        println!("stopped early after epoch {e}: no {better} in the {} since epoch {}", epochs_text(e - b.epoch), b.epoch);
    } else if let Some(e) = outcome.stopped_early {
        println!("stopped early after epoch {e}: no finite {held_out} {} in {}", monitor.name(), epochs_text(e));
    }
    println!("wrote {} and {}", out.join("metrics.csv").display(), out.join("model.safetensors").display());
    if let Some(b) = outcome.best.as_ref().filter(|_| cfg.keep_best || cfg.early_stopping.is_some()) {
        best_line(b);
    }
    match &outcome.test {
        Some(t) => {
            println!("validation accuracy {:.4}", last.test.accuracy);
            test_line(t.accuracy);
        }
        None => test_line(last.test.accuracy),
    }
    Ok(())
}

/// `stride train --lr-find`: the range test on the images the run would train on, its files,
/// and what it suggests.
fn range_test(
    model: &mut dyn Module,
    data: &stride_data::Split,
    cfg: &TrainConfig,
    out: &std::path::Path,
    stop: &AtomicBool,
) -> Result<(), Box<dyn std::error::Error>> {
    let find = stride_train::LrFind::default();
    let held;
    let images = match cfg.validation_split {
        Some(f) => {
            held = data.train.split_validation(f, cfg.seed)?.0;
            &held
        }
        None => &data.train,
    };
    println!(
        "learning-rate range test: {} updates of batch {}{} at rates rising from {:e} to {:e} (the weights are restored afterwards)",
        find.steps,
        cfg.batch_size,
        if cfg.accumulate > 1 { format!(" x {}", cfg.accumulate) } else { String::new() },
        find.start,
        find.end
    );
    let found = stride_train::lr_find(model, images, cfg, &find, Some(stop))?;
    std::fs::create_dir_all(out)?;
    let (csv, png) = (out.join("lr_find.csv"), out.join("lr_find.png"));
    stride_train::checkpoint::write_atomic(&csv, found.to_csv().as_bytes())?;
    stride_train::curves::plot_lr_find(&found, &png)?;
    if let Some(last) = found.points.last() {
        let why = if found.interrupted {
            "interrupted"
        } else if found.diverged {
            "the loss blew up"
        } else {
            "the end of the sweep"
        };
        println!("{} steps, up to lr {:.1e} ({why})", found.points.len(), last.lr);
    }
    if let Some(lr) = found.lowest() {
        println!("lowest smoothed loss at lr {lr:.1e} (a tenth of it: {:.1e})", lr / 10.0);
    }
    match found.steepest() {
        Some(lr) => println!("steepest fall of the loss at lr {lr:.1e}: suggested --lr {lr:.1e}"),
        None => println!("no rate at which the loss fell: no suggestion (try a wider sweep, another optimizer or more images)"),
    }
    println!("wrote {} and {}", csv.display(), png.display());
    Ok(())
}

/// How many processes a launcher started this one among (Open MPI's `OMPI_COMM_WORLD_SIZE`,
/// MPICH's `PMI_SIZE`); `None` outside one.
#[cfg(not(feature = "mpi"))]
fn launched_processes() -> Option<usize> {
    crate::launcher_number(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
}

/// The device of every rank (one sum of a table with a row per rank), in rank order.
fn rank_devices(g: &dyn stride_train::group::Group, mine: stride_autograd::Device) -> stride_train::Result<Vec<stride_autograd::Device>> {
    use stride_autograd::Device;
    let mut table = vec![0.0; g.size()];
    // 0 for the CPU, n + 1 for cuda:n.
    table[g.rank()] = match mine {
        Device::Cpu => 0.0,
        Device::Cuda(n) => n as f64 + 1.0,
    };
    g.sum_f64(&mut table)?;
    Ok(table.iter().map(|&v| if v < 0.5 { Device::Cpu } else { Device::Cuda(v as usize - 1) }).collect())
}

/// A flag Ctrl-C raises, for a training loop to stop after the step under way and save where it
/// is; a second Ctrl-C ends the process at once (exit status 130, as the default would).
pub fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_rises_linearly_then_the_schedule_runs_over_the_rest() {
        let lrs = |kind, warmup| {
            let s = schedule(kind, 6, warmup).unwrap();
            (0..6).map(|e| s.lr(1.0, e)).collect::<Vec<f64>>()
        };
        let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        // Two epochs from 0.1 towards 1, then cosine over the other four from 1.
        let cos = |e: f64| (1.0 + (std::f64::consts::PI * e / 4.0).cos()) / 2.0;
        let want = [0.1, 0.55, cos(0.0), cos(1.0), cos(2.0), cos(3.0)];
        assert!(close(&lrs(Sched::Cosine, Some(2)), &want), "{:?}", lrs(Sched::Cosine, Some(2)));
        assert!(close(&lrs(Sched::Constant, Some(1)), &[0.1, 1.0, 1.0, 1.0, 1.0, 1.0]));
        assert!(close(&lrs(Sched::Cosine, None)[..1], &[1.0]), "no warm-up starts at --lr");
        assert!(schedule(Sched::Cosine, 6, Some(6)).unwrap_err().contains("--warmup 6 leaves none of the 6 epochs for the schedule"));
        assert!(schedule(Sched::Onecycle, 6, Some(1)).unwrap_err().contains("does not combine with the onecycle schedule"));
        assert!(schedule(Sched::Plateau, 6, Some(1)).unwrap_err().contains("plateau"));
    }

    #[test]
    fn a_zoo_recipe_applies_only_when_no_flag_overrides_it() {
        let name = |(o, wd): (Opt, f64)| (o.to_possible_value().unwrap().get_name().to_string(), wd);
        assert_eq!(name(recipe(None, None, 0.05)), ("adamw".into(), 0.05));
        assert_eq!(name(recipe(None, None, 0.0)), ("adam".into(), 0.0));
        assert_eq!(name(recipe(Some(Opt::Adam), None, 0.05)), ("adam".into(), 0.0), "an explicit optimizer starts from no decay");
        assert_eq!(name(recipe(None, Some(0.01), 0.05)), ("adam".into(), 0.01), "an explicit decay keeps the default optimizer");
        assert_eq!(name(recipe(Some(Opt::Sgd), Some(5e-4), 0.05)), ("sgd".into(), 5e-4));
        assert_eq!(parse_smoothing("0.1"), Ok(0.1));
        assert!(parse_smoothing("1").is_err() && parse_smoothing("-0.1").is_err() && parse_smoothing("x").is_err());
    }
}
