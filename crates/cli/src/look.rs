//! `stride features` and `stride gradcam`: what a trained network sees in an image; `stride
//! patterns`: what it would most like to see.

use std::path::{Path, PathBuf};

use clap::Args;
use stride_autograd::{softmax, Var};
use stride_nn::{Module, Slot, Trace};
use stride_train::visual;

use crate::infer::{trained, Image, Trained};

/// The trained network the commands look at.
#[derive(Args)]
pub struct Network {
    /// Zoo model or TOML file the weights belong to, or an ONNX model (`.onnx`).
    #[arg(long, default_value = "cnn")]
    model: String,
    /// A run's model.safetensors (optional for an ONNX model, which carries its own).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Input standardisation instead of the header's: `imagenet` (torchvision's weights),
    /// `none`, or `MEAN,...:STD,...`.
    #[arg(long, value_name = "HOW", value_parser = crate::infer::parse_fixed_normalize)]
    normalize: Option<stride_data::Normalize>,
}

impl Network {
    /// The model with its weights, standardising as the header (or --normalize) says.
    fn load(&self) -> Result<Trained, Box<dyn std::error::Error>> {
        trained(&self.model, self.weights.as_deref())?.normalized_by(self.normalize.as_ref())
    }
}

/// The trained network and the image the commands look at.
#[derive(Args)]
pub struct Source {
    #[command(flatten)]
    net: Network,
    /// The image (PNG or JPEG), e.g. china.jpg.
    #[arg(long)]
    image: PathBuf,
}

#[derive(Args)]
pub struct FeaturesArgs {
    #[command(flatten)]
    src: Source,
    /// Layers to draw, by dotted path as `stride summary` names them (default: up to four
    /// convolutions spread over the network).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<String>,
    /// Draw at most this many channels per layer.
    #[arg(long, default_value_t = 64)]
    max_channels: usize,
    /// Run on the image at this size (`N` or `HxW`) instead of the trained one: convolutions
    /// take any size, so feature maps of a whole photograph work even where the dense head
    /// would not.
    #[arg(long, value_parser = crate::train::parse_size)]
    size: Option<(usize, usize)>,
    /// Folder for the PNGs.
    #[arg(long, default_value = "features")]
    out: PathBuf,
}

#[derive(Args)]
pub struct GradCamArgs {
    #[command(flatten)]
    src: Source,
    /// Class to explain, by index or name (default: the predicted class).
    #[arg(long)]
    class: Option<String>,
    /// Layer whose feature maps are weighted (default: the last with a spatial map).
    #[arg(long)]
    layer: Option<String>,
    /// Where to write the heat map over the image.
    #[arg(long, default_value = "gradcam.png")]
    out: PathBuf,
}

#[derive(Args)]
pub struct PatternsArgs {
    #[command(flatten)]
    net: Network,
    /// The layer, by dotted path as `stride summary` names them (default: the last
    /// convolution). The logits' layer gives one pattern per class.
    #[arg(long)]
    layer: Option<String>,
    /// Which channels: a count from the first (`16`) or a list (`0,5,9`).
    #[arg(long, default_value = "16")]
    channels: String,
    /// Steps of gradient ascent.
    #[arg(long, default_value_t = 40, value_parser = crate::at_least_one)]
    steps: usize,
    /// How far each step moves the standardised input, along the gradient scaled to unit RMS.
    #[arg(long, default_value_t = 0.2)]
    rate: f32,
    /// Grow the patterns at this size (`N` or `HxW`) instead of the trained one (convolutions
    /// take any size).
    #[arg(long, value_parser = crate::train::parse_size)]
    size: Option<(usize, usize)>,
    /// Seed of the starting noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The PNG to write.
    #[arg(long, default_value = "patterns.png")]
    out: PathBuf,
}

pub fn patterns(a: &PatternsArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut t = a.net.load()?;
    let [c, h0, w0] = t.chw;
    let (h, w) = a.size.unwrap_or((h0, w0));
    // The layers, from one pass over a blank input of that size.
    let (trace, _, err) = visual::traced(&mut t.model, &Var::constant(stride_autograd::Tensor::zeros(&[1, c, h, w])?));
    let err = err.map(|e| e.to_string());
    let layer = match &a.layer {
        Some(l) => l.clone(),
        None => {
            let last = spatial(&trace).into_iter().rfind(|&i| trace.rows[i].layer.starts_with("Conv2d"));
            let i = last.ok_or_else(|| with_cause(format!("{} has no convolution; name a layer with --layer", a.net.model), &err))?;
            trace.rows[i].path.clone()
        }
    };
    let row = trace.find(&layer).map_err(|e| with_cause(e, &err))?;
    let units = *trace.rows[row].output.get(1).ok_or_else(|| format!("layer {layer} gives {:?}", trace.rows[row].output))?;
    let channels: Vec<usize> = if a.channels.contains(',') {
        a.channels
            .split(',')
            .map(|v| v.trim().parse::<usize>().map_err(|_| format!("--channels: '{v}' is not a channel number")))
            .collect::<Result<_, _>>()?
    } else {
        let n: usize = a.channels.trim().parse().map_err(|_| format!("--channels: '{}' is neither a count nor a list such as 0,5,9", a.channels))?;
        (0..n.min(units)).collect()
    };
    let how = visual::Ascent { steps: a.steps, rate: a.rate, seed: a.seed };
    let (images, scores) = visual::patterns(&mut t.model, &layer, &channels, [c, h, w], &t.norm, how)?;
    let cols = (channels.len() as f64).sqrt().ceil() as usize;
    stride_train::vae::write_grid(&a.out, &images, cols, h.max(w).clamp(56, 128))?;
    let is_logits = trace.rows.last().is_some_and(|r| r.path == trace.rows[row].path) && trace.rows[row].output.len() == 2;
    println!(
        "{}: {} patterns for {layer} ({}), {} steps of gradient ascent at {}x{}",
        a.out.display(),
        channels.len(),
        trace.rows[row].layer,
        a.steps,
        h,
        w
    );
    for (ch, (before, after)) in channels.iter().zip(&scores) {
        let name = if is_logits { t.names.get(*ch).map_or(String::new(), |n| format!(" ({n})")) } else { String::new() };
        println!("  channel {ch}{name}: mean activation {before:.4} -> {after:.4}");
    }
    Ok(())
}

#[derive(Args)]
pub struct AugmentArgs {
    /// The augmentation, as `stride train --augment` takes it: `hflip,crop4,rotate10,erase0.5`,
    /// `resizedcrop0.35,hflip,jitter0.4`, ...
    augment: String,
    /// Data set whose training images to show (as for `stride train`).
    #[arg(long, default_value = "mnist")]
    data: String,
    /// Resize every image first (`32` or `HxW`), as `stride train --resize`.
    #[arg(long, value_parser = crate::train::parse_size)]
    resize: Option<(usize, usize)>,
    /// How many images (rows), spread over the training set.
    #[arg(long, default_value_t = 8, value_parser = crate::at_least_one)]
    n: usize,
    /// Augmented draws of each image.
    #[arg(long, default_value_t = 7, value_parser = crate::at_least_one)]
    versions: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The PNG to write.
    #[arg(long, default_value = "augmented.png")]
    out: PathBuf,
}

pub fn augment(a: &AugmentArgs) -> Result<(), Box<dyn std::error::Error>> {
    let spec = stride_data::Augment::parse(&a.augment)?;
    let mut data = stride_data::load(&a.data)?;
    if let Some((h, w)) = a.resize {
        data = data.resized(h, w)?;
    }
    let grid = visual::augmentation_grid(&data.train, &spec, a.n, a.versions, a.seed)?;
    visual::save_png(&a.out, &grid)?;
    let t = &data.train;
    println!(
        "{}: {} of {}'s training images ({}x{}x{}), each followed by {} draws of {spec}",
        a.out.display(),
        a.n.min(t.len()),
        data.name,
        t.channels,
        t.height,
        t.width,
        a.versions
    );
    Ok(())
}

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    net: Network,
    /// Data set whose test images to place (as for `stride eval`; resized to the trained size).
    #[arg(long, default_value = "mnist")]
    data: String,
    /// The layer, by dotted path as `stride summary` names them (default: the one before the
    /// last, what the classifier reads).
    #[arg(long)]
    layer: Option<String>,
    /// The PNG to write.
    #[arg(long, default_value = "embedding.png")]
    out: PathBuf,
}

/// The most numbers `stride embed` gathers from a layer (images x values each).
const MAX_VALUES: usize = 8 << 20;

pub fn embed(a: &EmbedArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut t = a.net.load()?;
    let [c, h, w] = t.chw;
    let mut data = stride_data::load(&a.data)?;
    if data.test.channels != c {
        return Err(format!("{} was trained on {c}-channel images; {} has {}", a.net.model, data.name, data.test.channels).into());
    }
    if (data.test.height, data.test.width) != (h, w) {
        data = data.resized(h, w)?;
    }
    if data.test.len() < 2 {
        return Err(format!("{} has {} test images; placing them needs at least 2", data.name, data.test.len()).into());
    }
    // The layer's output for the images from..from + n, as rows.
    let mut outputs = |test: &stride_data::Dataset, from: usize, n: usize| -> Result<(Vec<f32>, String), Box<dyn std::error::Error>> {
        let mut x = Vec::with_capacity(n * c * h * w);
        t.norm.extend(&test.images[from * c * h * w..(from + n) * c * h * w], c, h * w, &mut x);
        let x = Var::constant(stride_autograd::Tensor::from_vec(x, &[n, c, h, w])?);
        let (trace, _, err) = stride_autograd::no_grad(|| visual::traced(&mut t.model, &x));
        let err = err.map(|e| e.to_string());
        let layer = match &a.layer {
            Some(l) => l.clone(),
            None => trace
                .rows
                .len()
                .checked_sub(2)
                .map(|i| trace.rows[i].path.clone())
                .ok_or_else(|| format!("{} has fewer than two layers; name one with --layer", a.net.model))?,
        };
        let row = trace.find(&layer).map_err(|e| with_cause(e, &err))?;
        let y = trace.output(row).ok_or("traced output missing")?.value().to_host()?;
        Ok((y.data().to_vec(), format!("{layer} ({})", trace.rows[row].layer)))
    };
    // One image first, for the layer's width: a wide layer places fewer images, so the
    // principal axes' working set stays near MAX_VALUES numbers.
    let width = outputs(&data.test, 0, 1)?.0.len();
    let points = (MAX_VALUES / width.max(1)).min(stride_train::latent::MAX_POINTS);
    if points < 10 {
        return Err(
            format!("that layer gives {width} values an image: too many to place ({MAX_VALUES} in all); pick a later one with --layer").into()
        );
    }
    let test = data.test.subset(&stride_train::latent::spread(data.test.len(), points))?;
    let (mut features, mut name) = (Vec::with_capacity(test.len() * width), String::new());
    for b in (0..test.len()).step_by(250) {
        let (y, layer) = outputs(&test, b, (test.len() - b).min(250))?;
        features.extend_from_slice(&y);
        name = layer;
    }
    let codes = stride_autograd::Tensor::from_vec(features, &[test.len(), width])?;
    let plane = stride_train::latent::plane(&codes)?;
    let classes: Vec<usize> = test.labels.iter().map(|&l| l as usize).collect();
    stride_train::curves::plot_scatter(&plane.points, &classes, [&plane.axes[0], &plane.axes[1]], &a.out)?;
    println!(
        "{}: {} test images of {} at layer {name}, {width} values each, on {} and {}",
        a.out.display(),
        test.len(),
        data.name,
        plane.axes[0],
        plane.axes[1]
    );
    let legend: Vec<String> = t.names.iter().enumerate().take(20).map(|(i, n)| format!("{i} {n}")).collect();
    println!("colours by class: {}", legend.join(", "));
    Ok(())
}

#[derive(Args)]
pub struct OcclusionArgs {
    #[command(flatten)]
    src: Source,
    /// Class to explain, by index or name (default: the predicted class).
    #[arg(long)]
    class: Option<String>,
    /// Side of the hiding square in pixels (default: a seventh of the image's smaller side, at
    /// least 2).
    #[arg(long)]
    patch: Option<usize>,
    /// How far the square moves each time (default: half the patch).
    #[arg(long)]
    stride: Option<usize>,
    /// Where to write the heat map over the image.
    #[arg(long, default_value = "occlusion.png")]
    out: PathBuf,
}

/// `--class` as an index or a name among `names`; the predicted class when not given.
fn chosen_class(asked: &Option<String>, names: &[String], predicted: usize) -> Result<usize, String> {
    match asked {
        None => Ok(predicted),
        Some(s) => match (s.parse::<usize>(), names.iter().position(|n| n == s)) {
            (_, Some(i)) => Ok(i),
            (Ok(i), None) if i < names.len() => Ok(i),
            _ => Err(format!("--class {s}: not a class index below {} or a class name ({})", names.len(), names.join(", "))),
        },
    }
}

pub fn occlusion(a: &OcclusionArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut t = a.src.net.load()?;
    let image = t.image(&a.src.image, None)?;
    let [c, h, w] = image.chw;
    let y = stride_autograd::no_grad(|| t.model.forward(&image.x, &mut stride_nn::Ctx::eval()))?;
    let probs = softmax(&y, 1)?.value();
    let p = probs.data();
    let predicted = (0..p.len()).max_by(|&i, &j| p[i].total_cmp(&p[j])).unwrap_or(0);
    let class = chosen_class(&a.class, &t.names, predicted)?;
    let patch = a.patch.unwrap_or((h.min(w) / 7).max(2));
    let stride = a.stride.unwrap_or((patch / 2).max(1));
    let (fall, base) = visual::occlusion(&mut t.model, &image.x.value(), class, patch, stride)?;
    let top = fall.iter().copied().fold(0.0f32, f32::max);
    let heat: Vec<f32> = fall.iter().map(|&f| if top > 0.0 { (f / top).max(0.0) } else { 0.0 }).collect();
    let at = fall.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map_or(0, |(i, _)| i);
    visual::save_png(&a.out, &visual::overlay(&visual::picture(&image.pixels, c, h, w, 224), &heat, h, w))?;
    let name = |i: usize| t.names.get(i).cloned().unwrap_or_else(|| i.to_string());
    let found = if top > 0.0 {
        format!("falls most, by {top:.4}, when a {patch}x{patch} square (stride {stride}) hides pixel ({}, {})", at / w, at % w)
    } else {
        format!("falls nowhere: hiding any {patch}x{patch} square (stride {stride}) leaves it or raises it")
    };
    println!("predicted {} ({:.4}); class {} ({base:.4}) {found} -> {}", name(predicted), p[predicted], name(class), a.out.display());
    Ok(())
}

/// Rows of 4-D outputs (feature maps).
fn spatial(t: &Trace) -> Vec<usize> {
    t.rows.iter().enumerate().filter(|(_, r)| r.output.len() == 4).map(|(i, _)| i).collect()
}

/// A traced pass over one image; an error after some layers ran is kept for the caller to
/// report if it needed later layers.
struct Seen {
    trace: Trace,
    y: Option<Var>,
    err: Option<String>,
    image: Image,
}

fn run(t: &mut Trained, path: &Path, size: Option<(usize, usize)>) -> Result<Seen, Box<dyn std::error::Error>> {
    let image = t.image(path, size)?;
    let (trace, y, err) = visual::traced(&mut t.model, &image.x);
    Ok(Seen { trace, y, err: err.map(|e| e.to_string()), image })
}

pub fn features(a: &FeaturesArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut t = a.src.net.load()?;
    let Seen { trace, err, image, .. } = run(&mut t, &a.src.image, a.size)?;
    let (pixels, [c, h, w]) = (image.pixels, image.chw);
    let chosen: Vec<usize> = if a.layers.is_empty() {
        let convs: Vec<usize> = spatial(&trace).into_iter().filter(|&i| trace.rows[i].layer.starts_with("Conv2d")).collect();
        let k = convs.len().min(4);
        (0..k).map(|j| convs[if k > 1 { j * (convs.len() - 1) / (k - 1) } else { 0 }]).collect()
    } else {
        a.layers.iter().map(|p| trace.find(p).map_err(|e| with_cause(e, &err))).collect::<Result<_, _>>()?
    };
    if chosen.is_empty() {
        return Err(with_cause(format!("{} has no convolution to draw", a.src.net.model), &err).into());
    }
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let input = a.out.join("input.png");
    visual::save_png(&input, &visual::picture(&pixels, c, h, w, 128))?;
    println!("{}: the image as the network sees it ({c}x{h}x{w})", input.display());
    for i in chosen {
        let r = &trace.rows[i];
        if r.output.len() != 4 {
            return Err(format!("layer {} gives {:?}, not feature maps [N, C, H, W]", r.path, r.output).into());
        }
        let maps = trace.output(i).ok_or("traced output missing")?.value();
        let file = a.out.join(format!("layer-{}.png", r.path.replace(['.', '/'], "_")));
        visual::save_png(&file, &visual::feature_grid(&maps, a.max_channels)?)?;
        let s = &r.output;
        println!("{}: {} ({}), {} of {} channels of {}x{}", file.display(), r.path, r.layer, s[1].min(a.max_channels.max(1)), s[1], s[2], s[3]);
    }
    // The first convolution's filters.
    if let Some(first) = trace.rows.iter().find(|r| r.layer.starts_with("Conv2d")) {
        let name = format!("{}.weight", first.path);
        let mut weight = None;
        t.model.visit("", &mut |n, s| {
            if let (true, Slot::Param(p)) = (n == name, s) {
                weight = Some(p.value());
            }
        });
        if let Some(wt) = weight {
            let file = a.out.join("filters.png");
            visual::save_png(&file, &visual::filter_grid(&wt)?)?;
            println!("{}: the {} filters of {} ({:?})", file.display(), wt.shape()[0], first.path, wt.shape());
        }
    }
    Ok(())
}

fn with_cause(msg: String, err: &Option<String>) -> String {
    match err {
        Some(e) => format!("{msg} (the network stopped early: {e})"),
        None => msg,
    }
}

pub fn gradcam(a: &GradCamArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut t = a.src.net.load()?;
    let Seen { trace, y, err, image } = run(&mut t, &a.src.image, None)?;
    let (pixels, [c, h, w]) = (image.pixels, image.chw);
    let y = match (y, err) {
        (Some(y), _) => y,
        (None, e) => return Err(e.unwrap_or_default().into()),
    };
    let probs = softmax(&y, 1)?.value();
    let p = probs.data();
    let predicted = (0..p.len()).max_by(|&i, &j| p[i].total_cmp(&p[j])).unwrap_or(0);
    let class = chosen_class(&a.class, &t.names, predicted)?;
    let layer = match &a.layer {
        Some(path) => trace.find(path)?,
        None => *spatial(&trace)
            .iter()
            .rev()
            .find(|&&i| trace.rows[i].output[2] * trace.rows[i].output[3] > 1)
            .ok_or("no layer with a spatial feature map for Grad-CAM")?,
    };
    let r = &trace.rows[layer];
    if r.output.len() != 4 {
        return Err(format!("layer {} gives {:?}, not feature maps [N, C, H, W]", r.path, r.output).into());
    }
    let maps = trace.output(layer).ok_or("traced output missing")?;
    let score = y.narrow(1, class, 1)?.sum_all()?;
    let cam = visual::grad_cam(&score, maps)?;
    let base = visual::picture(&pixels, c, h, w, 224);
    visual::save_png(&a.out, &visual::overlay(&base, &cam, r.output[2], r.output[3]))?;
    println!(
        "predicted {} ({:.4}); heat map of class {} ({:.4}) at layer {} ({}x{}) -> {}",
        t.names[predicted],
        p[predicted],
        t.names[class],
        p[class],
        r.path,
        r.output[2],
        r.output[3],
        a.out.display()
    );
    Ok(())
}
