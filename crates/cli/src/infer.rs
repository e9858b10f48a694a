//! `stride eval` and `stride run`: a trained model on a test set, or on a tensor file.

use std::path::{Path, PathBuf};

use clap::Args;
use stride_autograd::{no_grad, Device, Rng, Tensor, ToDevice, Var};
use stride_data::Normalize;
use stride_models::InputSpec;
use stride_nn::{Ctx, Module};
use stride_train::checkpoint;

#[derive(Args)]
pub struct EvalArgs {
    /// Zoo model the weights belong to, a TOML model file, or an ONNX model (`.onnx`).
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Weights: a run's model.safetensors (or checkpoint.safetensors); optional for an ONNX
    /// model, which carries its own.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Data set whose test split to evaluate on (as for `stride train`).
    #[arg(long, default_value = "mnist")]
    data: String,
    /// Resize the images as the model was trained (`--resize` of `stride train`).
    #[arg(long, value_parser = crate::train::parse_size)]
    resize: Option<(usize, usize)>,
    /// Input standardisation, as `stride train --normalize` takes it (`imagenet` for
    /// torchvision's weights). Default: what the weights' header records, else `data`.
    #[arg(long, value_name = "HOW", value_parser = crate::train::parse_normalize)]
    normalize: Option<stride_train::Standardize>,
    /// One JSON object instead of text: loss, accuracy, top5, macro_f1, per_class (precision,
    /// recall, f1, images, name) and confusion (rows: true class).
    #[arg(long)]
    json: bool,
    /// Test-time augmentation: each image's class probabilities are the mean of the image's
    /// and its mirror image's (left-right). For photographs; digits and letters are not
    /// symmetric.
    #[arg(long)]
    tta: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// Zoo model the weights belong to, a TOML model file, or an ONNX model (`.onnx`).
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Weights (optional for an ONNX model, which carries its own).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// A safetensors file with an f32 tensor named `input`, [N, C, H, W] (for an ONNX model, what
    /// its graph takes: [N, C, L] for a 1-d CNN).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the tensor `output` (the model's raw outputs, eval mode). An ONNX model
    /// with several outputs writes each under its name in the file.
    #[arg(long)]
    output: PathBuf,
    /// Classes the model was built for.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Print every layer's output shape as the input flows through (to stderr).
    #[arg(long)]
    debug: bool,
}

/// Loads a safetensors state_dict into `model`, checking every name and shape (optimizer
/// entries of a Stride checkpoint are ignored).
pub fn load_weights(model: &mut dyn Module, weights: &Path) -> Result<Standardisation, Box<dyn std::error::Error>> {
    load_weights_with(model, weights, false).map(|(s, _)| s)
}

/// [`load_weights`], leaving the model's tensors whose shape differs from the file's as they
/// are (and naming them) when `skip_mismatched`.
pub fn load_weights_with(
    model: &mut dyn Module,
    weights: &Path,
    skip_mismatched: bool,
) -> Result<(Standardisation, Vec<checkpoint::Skipped>), Box<dyn std::error::Error>> {
    let (mut tensors, meta) = checkpoint::load_with_metadata(weights)?;
    tensors.retain(|k, _| !k.starts_with("optimizer."));
    let loaded = if skip_mismatched {
        checkpoint::load_skipping_mismatched(model, &tensors)
    } else {
        checkpoint::load_into(model, &tensors).map(|_| Vec::new())
    };
    let skipped = loaded.map_err(|e| format!("{}: {e}", weights.display()))?;
    Ok((header_standardisation(&meta, weights)?, skipped))
}

/// How a run standardised its inputs, from its weights' header; `None` for weights without
/// one (torchvision's).
pub type Standardisation = Option<Normalize>;

/// A note for colour images and weights without Stride's header, most likely torchvision's,
/// trained on ImageNet's standardised inputs.
pub fn imagenet_hint(weights: &Path) {
    eprintln!(
        "note: {} has no Stride header; if it holds ImageNet-pretrained weights (torchvision's), --normalize imagenet gives \
         the inputs they were trained on",
        weights.display()
    );
}

/// The header's `input_mean` and `input_std` (one value, or one per channel); an error names
/// the file when they are not numbers.
fn header_standardisation(meta: &std::collections::HashMap<String, String>, weights: &Path) -> Result<Standardisation, String> {
    match (meta.get("input_mean"), meta.get("input_std")) {
        (Some(mean), Some(std)) => Normalize::from_lists(mean, std).map(Some).map_err(|e| format!("{}: header: {e}", weights.display())),
        _ => Ok(None),
    }
}

/// Builds `model` for `spec` and loads `weights` into it (an ONNX model may come without: it
/// carries its own).
fn load_model(
    model: &str,
    spec: Option<InputSpec>,
    weights: Option<&Path>,
) -> Result<(stride_nn::layers::Sequential, Standardisation), Box<dyn std::error::Error>> {
    let mut m = match spec {
        Some(spec) => stride_models::build_any(model, &mut Rng::seed(0), spec)?,
        None => stride_models::from_onnx(model, None)?,
    };
    let standardised = match weights {
        Some(w) => load_weights(&mut m, w)?,
        // `stride export` writes the run's standardisation into the model's metadata.
        None if model.ends_with(".onnx") => header_standardisation(&stride_onnx::read_metadata(Path::new(model))?, Path::new(model))?,
        None => return Err(format!("--weights is needed: {model} is built with fresh weights (only an ONNX model carries its own)").into()),
    };
    Ok((m, standardised))
}

pub fn eval(a: &EvalArgs, device: Device) -> Result<(), Box<dyn std::error::Error>> {
    let mut data = stride_data::load(&a.data)?;
    if let Some((h, w)) = a.resize {
        data = data.resized(h, w)?;
    }
    let t = &data.train;
    let spec = InputSpec { channels: t.channels, height: t.height, width: t.width, classes: t.classes };
    let (mut model, standardised) = load_model(&a.model, Some(spec), a.weights.as_deref())?;
    model.to(device)?;
    // Inputs as asked, else as the run standardised them (its training images' statistics,
    // which with a validation split are not the whole training set's), else by this training
    // set's.
    if let (None, None, Some(w), 3) = (&a.normalize, &standardised, &a.weights, t.channels) {
        imagenet_hint(w);
    }
    let norm = match (&a.normalize, standardised) {
        (Some(stride_train::Standardize::Fixed(n)), _) => n.clone(),
        (None, Some(n)) => n,
        (Some(stride_train::Standardize::TrainingImages) | None, _) => Normalize::of(t),
    };
    let ev = stride_train::evaluate_with(&mut model, &data.test, stride_train::EVAL_BATCH, &norm, a.tta)?;
    if a.json {
        let per_class: Vec<serde_json::Value> = ev
            .per_class()
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let name = data.class_names.get(c).cloned().unwrap_or_else(|| c.to_string());
                serde_json::json!({"name": name, "precision": s.precision, "recall": s.recall, "f1": s.f1, "images": s.images})
            })
            .collect();
        let out = serde_json::json!({
            "model": a.model, "data": data.name, "images": data.test.len(), "loss": ev.loss, "accuracy": ev.accuracy,
            "top5": ev.top5, "macro_f1": ev.macro_f1(), "per_class": per_class, "confusion": ev.confusion,
        });
        println!("{out}");
        return Ok(());
    }
    println!("{} on the {} test images of {}: loss {:.4}", a.model, data.test.len(), data.name, ev.loss);
    // As scikit-learn's classification_report: recall is the class's accuracy.
    let names: Vec<String> = (0..ev.confusion.len())
        .map(|c| match data.class_names.get(c).filter(|n| **n != c.to_string()) {
            Some(n) => format!("{c} {n}"),
            None => c.to_string(),
        })
        .collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0).max(13);
    println!("  {:<width$}  precision  recall      f1  images", "class");
    let scores = ev.per_class();
    for (name, s) in names.iter().zip(&scores) {
        println!("  {name:<width$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>6}", s.precision, s.recall, s.f1, s.images);
    }
    let mean = |f: fn(&stride_train::ClassScores) -> f64| scores.iter().map(f).sum::<f64>() / scores.len().max(1) as f64;
    println!(
        "  {:<width$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>6}",
        "macro average",
        mean(|s| s.precision),
        mean(|s| s.recall),
        mean(|s| s.f1),
        scores.iter().map(|s| s.images).sum::<usize>()
    );
    println!("confusion matrix (rows: true class, columns: predicted):");
    for row in &ev.confusion {
        println!("  {}", row.iter().map(|v| format!("{v:>5}")).collect::<String>());
    }
    if let Some(top5) = ev.top5 {
        println!("top-5 accuracy {top5:.4}");
    }
    println!("test accuracy {:.4}", ev.accuracy);
    Ok(())
}

pub fn run(a: &RunArgs, device: Device) -> Result<(), Box<dyn std::error::Error>> {
    let tensors = checkpoint::load(&a.input)?;
    let x = tensors
        .get("input")
        .ok_or_else(|| format!("{}: no tensor named 'input' (found: {:?})", a.input.display(), tensors.keys().collect::<Vec<_>>()))?;
    let onnx = a.model.ends_with(".onnx");
    // Zoo and TOML models take images; an ONNX model what its graph does (a 1-d CNN: [N, C, L]).
    let dims = match x.shape()[..] {
        [_, c, h, w] => Some((c, h, w)),
        _ if onnx && !x.shape().is_empty() => None,
        _ => {
            let want = if onnx { "a batch (at least one axis)" } else { "[N, C, H, W]" };
            return Err(format!("{}: 'input' has shape {:?}, expected {want}", a.input.display(), x.shape()).into());
        }
    };
    let mut ctx = Ctx::eval();
    ctx.debug = a.debug;
    if a.debug {
        eprintln!("{:>16} {:<48} -> {:?}", "", "input", x.shape());
    }
    let x = Var::constant(x.to(device)?);
    // An ONNX model gives the outputs it declares (--classes is for zoo and TOML models): one
    // as `output`, several under their names in the file.
    let outputs = if onnx {
        let mut net = stride_models::onnx_network(&a.model)?;
        if let Some(w) = &a.weights {
            load_weights(&mut net, w)?;
        }
        net.to(device)?;
        let mut all = no_grad(|| net.forward_all(&x, &mut ctx))?;
        if all.len() == 1 {
            all[0].0 = "output".to_string();
        }
        let mut seen = std::collections::HashSet::new();
        all.retain(|(name, _)| seen.insert(name.clone()));
        all
    } else {
        let (channels, height, width) = dims.expect("checked above");
        let spec = InputSpec { channels, height, width, classes: a.classes };
        let (mut model, _) = load_model(&a.model, Some(spec), a.weights.as_deref())?;
        model.to(device)?;
        vec![("output".to_string(), no_grad(|| model.forward(&x, &mut ctx))?)]
    };
    let tensors = outputs.iter().map(|(n, y)| Ok((n.clone(), y.value().to_host()?))).collect::<Result<Vec<_>, stride_nn::Error>>()?;
    checkpoint::save(&a.output, &tensors)?;
    let list: Vec<String> = outputs.iter().map(|(n, y)| format!("'{n}' {:?}", y.shape())).collect();
    println!("wrote {} to {}", list.join(", "), a.output.display());
    Ok(())
}

#[derive(Args)]
pub struct PredictArgs {
    /// Zoo model or TOML file the weights belong to.
    #[arg(long, default_value = "cnn")]
    model: String,
    /// A run's model.safetensors: its header tells the input size, standardisation and class
    /// names used in training. Optional for an ONNX model (`--model file.onnx`), which then
    /// takes pixels scaled to [0, 1] and numbers its classes.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Input standardisation: `imagenet` (torchvision's weights), `none`, or `MEAN,...:STD,...`.
    /// Default: what the weights' header records, else none (pixels in [0, 1]).
    #[arg(long, value_name = "HOW", value_parser = parse_fixed_normalize)]
    normalize: Option<Normalize>,
    /// How many of the most likely classes to print per image.
    #[arg(long, default_value_t = 3, value_parser = crate::at_least_one)]
    top: usize,
    /// One JSON object per image instead of text: `{"image": PATH, "top": [{"class": NAME,
    /// "index": I, "probability": P}, ...]}`.
    #[arg(long)]
    json: bool,
    /// Test-time augmentation: average the class probabilities of each image and its mirror
    /// image (left-right).
    #[arg(long)]
    tta: bool,
    /// PNG or JPEG files, or folders of them (their sub-folders too, such as a data set's class
    /// folders).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// A trained model with the preprocessing its run used.
pub struct Trained {
    pub model: stride_nn::layers::Sequential,
    /// One image: [channels, height, width].
    pub chw: [usize; 3],
    pub norm: Normalize,
    pub names: Vec<String>,
    /// The header the weights carried (`stride train`'s: input shape, standardisation, class
    /// names, data set), empty without one.
    pub header: std::collections::HashMap<String, String>,
}

impl Trained {
    /// Standardises inputs by `norm` instead of the header's (`--normalize`), when given.
    pub fn normalized_by(mut self, norm: Option<&Normalize>) -> Result<Self, Box<dyn std::error::Error>> {
        if let Some(n) = norm {
            n.check(self.chw[0])?;
            self.norm = n.clone();
        }
        Ok(self)
    }

    /// Reads `path` as the model's input [1, C, H, W] (resized to `hw`, default the trained
    /// size), standardised; also keeps the planar bytes for pictures.
    pub fn image(&self, path: &Path, hw: Option<(usize, usize)>) -> Result<Image, Box<dyn std::error::Error>> {
        let [c, h0, w0] = self.chw;
        let (h, w) = hw.unwrap_or((h0, w0));
        let pixels = stride_data::load_image(path, c, h, w)?;
        let mut x = Vec::with_capacity(pixels.len());
        self.norm.extend(&pixels, c, h * w, &mut x);
        let x = Tensor::from_vec(x, &[1, c, h, w])?;
        Ok(Image { x: Var::constant(x), pixels, chw: [c, h, w] })
    }
}

/// An image read for a model: its input tensor and the planar bytes it came from.
pub struct Image {
    pub x: Var,
    pub pixels: Vec<u8>,
    pub chw: [usize; 3],
}

/// Builds `model` and loads `weights`. The input size, standardisation and class names come
/// from the header `stride train` writes; weights without it (torchvision's) get the zoo
/// model's design input and numbered classes, unstandardised, with a note on stderr.
pub fn load_trained(model: &str, weights: &Path) -> Result<Trained, Box<dyn std::error::Error>> {
    let (mut tensors, meta) = checkpoint::load_with_metadata(weights)?;
    tensors.retain(|k, _| !k.starts_with("optimizer."));
    let Preprocessing { chw, norm, names } = preprocessing(model, &meta, weights)?;
    let [c, h, w] = chw;
    let mut m = stride_models::build_any(model, &mut Rng::seed(0), InputSpec { channels: c, height: h, width: w, classes: names.len() })?;
    checkpoint::load_into(&mut m, &tensors).map_err(|e| format!("{}: {e}", weights.display()))?;
    Ok(Trained { model: m, chw, norm, names, header: meta })
}

/// `model` with `weights` ([`load_trained`]), or an ONNX model with its own ([`onnx_trained`]).
pub fn trained(model: &str, weights: Option<&Path>) -> Result<Trained, Box<dyn std::error::Error>> {
    match weights {
        Some(w) => load_trained(model, w),
        None if model.ends_with(".onnx") => onnx_trained(model),
        None => Err(format!("--weights is needed: {model} is built with fresh weights (only an ONNX model carries its own)").into()),
    }
}

/// An ONNX classifier with the preprocessing its metadata records (`stride export` writes a
/// training run's header there), else its declared input, numbered classes and pixels scaled to
/// [0, 1], with a note on stderr.
pub fn onnx_trained(path: &str) -> Result<Trained, Box<dyn std::error::Error>> {
    let (model, s) = stride_models::onnx_classifier(path)?;
    let meta = stride_onnx::read_metadata(Path::new(path))?;
    if meta.contains_key("input_shape") {
        let Preprocessing { chw, norm, names } = preprocessing(path, &meta, Path::new(path))?;
        if chw != [s.channels, s.height, s.width] || names.len() != s.classes {
            return Err(format!(
                "{path}: its metadata describes {}x{}x{} inputs and {} classes, its graph {}x{}x{} and {}",
                chw[0],
                chw[1],
                chw[2],
                names.len(),
                s.channels,
                s.height,
                s.width,
                s.classes
            )
            .into());
        }
        return Ok(Trained { model, chw, norm, names, header: meta });
    }
    eprintln!(
        "note: {path} has no Stride metadata: it gets pixels scaled to [0, 1] unless --normalize says otherwise, classes numbered 0..{}",
        s.classes.saturating_sub(1)
    );
    let names = (0..s.classes).map(|i| i.to_string()).collect();
    Ok(Trained { model, chw: [s.channels, s.height, s.width], norm: Normalize::identity(), names, header: meta })
}

/// Input shape, standardisation and class names from a training run's header `meta` (of the
/// file `weights`, named in errors); without one, the zoo model's design input, numbered
/// classes and pixels only scaled, with a note on stderr.
fn preprocessing(model: &str, meta: &std::collections::HashMap<String, String>, weights: &Path) -> Result<Preprocessing, Box<dyn std::error::Error>> {
    let bad = |what: &str| format!("{}: {what} (weights written by `stride train` carry it)", weights.display());
    let (chw, norm, names) = match meta.get("input_shape") {
        Some(shape) => {
            let shape: Vec<usize> = shape.split('x').filter_map(|v| v.parse().ok()).collect();
            let [c, h, w] = shape[..] else { return Err(bad("input_shape is not CxHxW").into()) };
            let norm = header_standardisation(meta, weights)?.unwrap_or_default();
            norm.check(c).map_err(|e| format!("{}: header: {e}", weights.display()))?;
            let names: Vec<String> = meta.get("class_names").map(|s| s.split('\n').map(str::to_string).collect()).unwrap_or_default();
            if names.is_empty() {
                return Err(bad("no class_names in the header").into());
            }
            ([c, h, w], norm, names)
        }
        None => {
            let s = stride_models::entry(model).map_err(|_| bad("no input_shape in the header, and the model is not from the zoo"))?.input;
            eprintln!(
                "note: {} has no Stride header; using {model}'s design input {}x{}x{} and {} numbered classes, pixels scaled to [0, 1] \
                 unless --normalize says otherwise (imagenet for torchvision's weights)",
                weights.display(),
                s.channels,
                s.height,
                s.width,
                s.classes
            );
            ([s.channels, s.height, s.width], Normalize::identity(), (0..s.classes).map(|i| i.to_string()).collect())
        }
    };
    Ok(Preprocessing { chw, norm, names })
}

/// What a model's inputs and outputs are: one image's [channels, height, width], its
/// standardisation, the class names.
struct Preprocessing {
    chw: [usize; 3],
    norm: Normalize,
    names: Vec<String>,
}

/// Class probabilities for image files, with the training run's preprocessing.
pub fn predict(a: &PredictArgs, device: Device) -> Result<(), Box<dyn std::error::Error>> {
    let mut t = trained(&a.model, a.weights.as_deref())?.normalized_by(a.normalize.as_ref())?;
    t.model.to(device)?;
    let mut files = Vec::new();
    for p in &a.images {
        if p.is_dir() {
            let found = stride_data::image_files(p)?;
            if found.is_empty() {
                return Err(format!("{}: no PNG or JPEG images in this folder or under it", p.display()).into());
            }
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    // Batches through an inference plan on the CPU (as `eval` runs); an image that cannot be
    // read is named and skipped, and the run fails at the end.
    let mut planned = stride_nn::planned::Planned::new();
    let mut unreadable = 0;
    for chunk in files.chunks(PREDICT_BATCH) {
        let mut read = Vec::new();
        for path in chunk {
            match t.image(path, None) {
                Ok(img) => read.push((path, img.x.value())),
                Err(e) => {
                    eprintln!("error: {e}");
                    unreadable += 1;
                }
            }
        }
        if read.is_empty() {
            continue;
        }
        let x = Tensor::concat(&read.iter().map(|(_, x)| x).collect::<Vec<_>>(), 0)?;
        let mut probabilities = |x: &Tensor<f32>| -> Result<Tensor<f32>, Box<dyn std::error::Error>> {
            let logits = match device {
                Device::Cpu => planned.forward(&mut t.model, x)?,
                _ => no_grad(|| t.model.forward(&Var::constant(x.to(device)?), &mut Ctx::eval()))?.value().to_host()?,
            };
            Ok(stride_autograd::softmax(&Var::constant(logits), 1)?.value())
        };
        let mut p = probabilities(&x)?;
        if a.tta {
            let m = probabilities(&stride_train::mirrored(&x)?)?;
            p = Tensor::from_vec(p.data().iter().zip(m.data()).map(|(a, b)| 0.5 * (a + b)).collect(), p.shape())?;
        }
        let k = p.shape()[1];
        let name = |i: usize| t.names.get(i).cloned().unwrap_or_else(|| i.to_string());
        for (row, (path, _)) in p.data().chunks_exact(k.max(1)).zip(&read) {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
            if a.json {
                let top: Vec<serde_json::Value> =
                    order.iter().take(a.top).map(|&i| serde_json::json!({"class": name(i), "index": i, "probability": row[i]})).collect();
                println!("{}", serde_json::json!({"image": path.to_string_lossy(), "top": top}));
            } else {
                let top: Vec<String> = order.iter().take(a.top).map(|&i| format!("{} {:.4}", name(i), row[i])).collect();
                println!("{}: {}", path.display(), top.join(", "));
            }
        }
    }
    if unreadable > 0 {
        return Err(format!("{unreadable} of the {} images could not be read (named above)", files.len()).into());
    }
    Ok(())
}

/// `imagenet`, `none` or `MEAN,...:STD,...` (no training images to take statistics from).
pub fn parse_fixed_normalize(s: &str) -> Result<Normalize, String> {
    Normalize::parse(s).map_err(|e| e.to_string())
}

/// Images per batch in `stride predict`.
const PREDICT_BATCH: usize = 32;
