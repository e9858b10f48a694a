//! `stride summary`: a model's layers, sizes, receptive fields and the memory a batch needs,
//! predicted and (with --measure) measured.

use clap::Args;
use stride_autograd::{cross_entropy, no_grad, Device, Rng, ToDevice, Var};
use stride_models::vae::{self, Vae};
use stride_models::InputSpec;
use stride_nn::{optim, Ctx, Module};
use stride_train::inspect::{self, bytes, count, Memory, Summary};
use stride_train::recompute::{self, Segments};
use stride_train::{OptimizerKind, TrainConfig};

use crate::memory;
use crate::train::Opt;

#[derive(Args)]
pub struct SummaryArgs {
    /// Zoo model (`stride models`), TOML model file, or ONNX model (`.onnx`; a classifier or
    /// not).
    model: String,
    /// Input `CxHxW` or `NxCxHxW` (N is the batch size); default: the model's design input.
    #[arg(long)]
    input: Option<String>,
    /// Classes (default: the model's design count; 10 for a model file).
    #[arg(long)]
    classes: Option<usize>,
    /// Batch size the memory is predicted for (N of --input wins).
    #[arg(long, default_value_t = 64, value_parser = crate::at_least_one)]
    batch_size: usize,
    /// The optimizer whose state the training memory includes.
    #[arg(long, value_enum, default_value = "adam")]
    optimizer: Opt,
    /// Momentum (SGD only: 0 means no velocity buffer).
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Activation recompute in N segments (`stride train --recompute N`): show what training
    /// keeps then, and measure with it.
    #[arg(long, value_name = "N")]
    recompute: Option<usize>,
    /// Also run one inference pass and two training steps at this batch size and print the
    /// peaks reached beside the predictions.
    #[arg(long)]
    measure: bool,
}

/// A zoo classifier or model file, the VAE, or an ONNX model of another output (a
/// segmentation map), with the loss it trains on.
enum Net {
    Classifier(stride_nn::layers::Sequential),
    Vae(Vae),
    /// Trained on the mean of its output, for the memory a step needs.
    Other(stride_nn::layers::Sequential),
}

impl Net {
    fn module(&mut self) -> &mut dyn Module {
        match self {
            Net::Classifier(m) | Net::Other(m) => m,
            Net::Vae(v) => v,
        }
    }
    /// A batch like the real data: standardised pixels, or the VAE's [0, 1] images.
    fn batch(&self, shape: &[usize], seed: u64) -> Result<Var, Box<dyn std::error::Error>> {
        let mut rng = Rng::seed(seed);
        Ok(Var::constant(match self {
            Net::Classifier(_) | Net::Other(_) => rng.normal(shape, 0.0, 1.0)?,
            Net::Vae(_) => rng.uniform(shape, 0.0, 1.0)?,
        }))
    }
    fn loss(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var, Box<dyn std::error::Error>> {
        let n = x.shape()[0];
        Ok(match self {
            Net::Classifier(m) => cross_entropy(&m.forward(x, ctx)?, &vec![0; n], 0.0)?,
            Net::Vae(v) => v.forward_loss(x, ctx)?.1.total,
            Net::Other(m) => m.forward(x, ctx)?.mean_all()?,
        })
    }
}

pub fn run(a: &SummaryArgs, device: Device) -> Result<(), Box<dyn std::error::Error>> {
    let is_vae = a.model == "vae";
    // An ONNX model whose output is not [N, classes]: its declared input, its output as it is.
    let other = match a.model.ends_with(".onnx") {
        true => match stride_models::onnx_declared(&a.model)? {
            (_, o) if matches!(o[..], [_, Some(_)]) => None,
            (i, o) => match i[..] {
                [_, c, h, w] => Some(([c, h, w], o)),
                _ => return Err(format!("{} takes {}: summary reads [N, C, H, W] inputs", a.model, stride_onnx::Network::dims_text(&i)).into()),
            },
        },
        false => None,
    };
    let design = if let Some(([c, h, w], _)) = &other {
        let given = a.input.as_deref().map(inspect::parse_input).transpose()?.map(|(_, chw)| chw);
        let free = || format!("{} leaves its input's size free: give it with --input CxHxW", a.model);
        let pick = |d: Option<usize>, i: usize| d.or(given.map(|g| g[i])).ok_or_else(free);
        InputSpec { channels: pick(*c, 0)?, height: pick(*h, 1)?, width: pick(*w, 2)?, classes: 0 }
    } else if a.model.ends_with(".onnx") {
        stride_models::onnx_spec(&a.model)?
    } else if a.model.ends_with(".toml") {
        InputSpec { channels: 1, height: 28, width: 28, classes: 10 }
    } else if is_vae {
        InputSpec { channels: 1, height: vae::SIDE, width: vae::SIDE, classes: 0 }
    } else {
        stride_models::entry(&a.model)?.input
    };
    let (n, chw) = match &a.input {
        Some(s) => inspect::parse_input(s)?,
        None => (None, [design.channels, design.height, design.width]),
    };
    let batch = n.unwrap_or(a.batch_size);
    // A file exported for one batch size (torch.onnx.export's default) runs only at that one:
    // traced and measured there.
    let fixed = match a.model.ends_with(".onnx") {
        true => stride_models::onnx_declared(&a.model)?.0.first().copied().flatten(),
        false => None,
    };
    if let Some(f) = fixed.filter(|&f| a.measure && f != batch) {
        return Err(format!("{} declares a batch of {f}: measure it with --batch-size {f}", a.model).into());
    }
    let spec = InputSpec { channels: chw[0], height: chw[1], width: chw[2], classes: a.classes.unwrap_or(design.classes) };
    let optimizer = a.optimizer.kind(a.momentum);

    let mut net = if is_vae {
        if !matches!(chw, [1 | 3, vae::SIDE, vae::SIDE]) {
            return Err(format!("the VAE takes 1x{0}x{0} or 3x{0}x{0} images, not --input {1}x{2}x{3}", vae::SIDE, chw[0], chw[1], chw[2]).into());
        }
        Net::Vae(Vae::for_images(&mut Rng::seed(0), chw[0], vae::LATENT)?)
    } else if other.is_some() {
        Net::Other(stride_models::from_onnx(&a.model, None)?)
    } else {
        Net::Classifier(stride_models::build_any(&a.model, &mut Rng::seed(0), spec)?)
    };
    let model = net.module();
    let s = inspect::summarize_batch(model, chw, fixed.unwrap_or(2))?;
    let what = match &other {
        _ if is_vae => "the VAE: encoder, sampling, generator and its loss".into(),
        Some((_, o)) => format!("output {} (trained on its mean, for the memory a step needs)", stride_onnx::Network::dims_text(o)),
        None => format!("{} classes", spec.classes),
    };
    print_rows(&a.model, &s, what);
    let segments = match a.recompute {
        Some(k) => {
            let names = recompute::cut_points(model)?;
            let seg = recompute::plan_from(&s, &names, k)?;
            print_segments(&seg, &names);
            Some(seg)
        }
        None => None,
    };
    let infer = inspect::inference_memory(&s, batch);
    let train = inspect::training_memory(&s, batch, optimizer, segments.as_ref());
    println!("\nmemory for a batch of {batch} (predicted):");
    print_memory("inference", &infer, None);
    if segments.is_some() {
        let plain = inspect::training_memory(&s, batch, optimizer, None);
        print_memory(&format!("training ({})", optimizer_name(optimizer)), &plain, None);
        print_memory("training, recompute", &train, None);
    } else {
        print_memory(&format!("training ({})", optimizer_name(optimizer)), &train, None);
    }
    if a.measure && !device.is_cpu() {
        net.module().to(device)?;
        let (_, _, secs) = measure(&mut net, chw, batch, optimizer, segments.as_ref(), device)?;
        println!("\nmeasured on {device}: a training step took {:.0} ms (the second of two); the memory counters see host memory only", secs * 1e3);
    } else if a.measure {
        let (mi, mt, secs) = measure(&mut net, chw, batch, optimizer, segments.as_ref(), device)?;
        println!("\nmeasured (the weights plus the peak of bytes allocated above what the process held once the model was built):");
        print_memory("inference", &infer, Some(mi));
        print_memory("training", &train, Some(mt));
        println!("  a training step took {:.0} ms (the second of two; the first also sets up the optimizer)", secs * 1e3);
    }
    Ok(())
}

fn print_segments(seg: &Segments, names: &[String]) {
    println!(
        "\nactivation recompute in {} segments (training keeps each segment's input, and one segment's tape while it is recomputed):",
        seg.starts.len()
    );
    for (j, &start) in seg.starts.iter().enumerate() {
        let end = seg.starts.get(j + 1).copied().unwrap_or(seg.layers);
        println!(
            "  {:<40} input {:>10}/image, tape {:>10}/image",
            format!("{} .. {}", names[start], names[end - 1]),
            bytes(seg.inputs[j]),
            bytes(seg.tape[j])
        );
    }
    println!("  kept per image: {} instead of {}", bytes(seg.kept_per_image()), bytes(seg.tape.iter().sum()));
}

fn optimizer_name(o: OptimizerKind) -> String {
    match o {
        OptimizerKind::Adam => "adam".into(),
        OptimizerKind::AdamW => "adamw".into(),
        OptimizerKind::Sgd { momentum, nesterov } if momentum > 0.0 => format!("{} momentum {momentum}", if nesterov { "nesterov" } else { "sgd" }),
        OptimizerKind::Sgd { .. } => "sgd".into(),
    }
}

fn print_rows(model: &str, s: &Summary, what: String) {
    let [c, h, w] = s.input;
    println!("{model} on {c}x{h}x{w} images, {what} (per image; field = receptive field, jump = effective stride, in input pixels)\n");
    let width = s.rows.iter().map(|r| r.path.len()).max().unwrap_or(5).clamp(5, 40);
    println!("{:<width$}  {:<44} {:>16} {:>11} {:>9} {:>9} {:>5} {:>10}", "layer", "kind", "output", "params", "MACs", "field", "jump", "kept");
    let dims = |v: &[usize]| v.iter().skip(1).map(|d| d.to_string()).collect::<Vec<_>>().join("x");
    let side = |f: &stride_nn::Field, v: [f64; 2]| -> String {
        if f.whole {
            return "all".into();
        }
        let one = |x: f64| if x.fract() == 0.0 { format!("{x}") } else { format!("{x:.2}") };
        if v[0] == v[1] {
            one(v[0])
        } else {
            format!("{}x{}", one(v[0]), one(v[1]))
        }
    };
    for r in &s.rows {
        let mut kind = r.layer.clone();
        if kind.chars().count() > 44 {
            kind = kind.chars().take(43).collect::<String>() + "…";
        }
        println!(
            "{:<width$}  {:<44} {:>16} {:>11} {:>9} {:>9} {:>5} {:>10}",
            r.path,
            kind,
            dims(&r.output),
            if r.params == 0 { "-".into() } else { crate::group(r.params) },
            count(r.macs),
            side(&r.field, r.field.size),
            if r.field.whole { "-".into() } else { side(&r.field, r.field.jump) },
            bytes(r.tape_bytes)
        );
    }
    let macs = s.macs();
    println!(
        "\ntotal: {} parameters ({}), {} multiply-adds = {} FLOPs per image; training keeps {} per image (kept = what each layer puts on the autograd tape for the backward pass)",
        crate::group(s.params),
        bytes(s.params as u64 * 4),
        count(macs),
        count(2 * macs),
        bytes(s.tape_per_image)
    );
}

fn print_memory(what: &str, m: &Memory, measured: Option<u64>) {
    let total = m.total();
    let Some(got) = measured else {
        let parts = if m.gradients == 0 {
            format!("weights {} + activations alive at once (about two layers) {}", bytes(m.weights), bytes(m.activations))
        } else {
            format!(
                "weights {} + gradients {} + optimizer state {} + activations kept {} + backward working set {}",
                bytes(m.weights),
                bytes(m.gradients),
                bytes(m.optimizer),
                bytes(m.activations),
                bytes(m.backward)
            )
        };
        println!("  {what:<24} {:>10} = {parts}", bytes(total));
        return;
    };
    let off = (total as f64 / got as f64 - 1.0) * 100.0;
    println!("  {what:<24} measured {:>10}, predicted {:>10} ({off:+.1}%)", bytes(got), bytes(total));
}

/// Peak bytes of one inference pass and of two training steps at `batch`: the weights plus
/// what was allocated above the level before (which holds the weights, the data and the
/// thread pools' one-time buffers, none of which the prediction counts).
fn measure(
    net: &mut Net,
    chw: [usize; 3],
    batch: usize,
    optimizer: OptimizerKind,
    segments: Option<&Segments>,
    device: Device,
) -> Result<(u64, u64, f64), Box<dyn std::error::Error>> {
    let shape = [batch, chw[0], chw[1], chw[2]];
    let params = net.module().parameters();
    let weights: u64 = params.iter().map(|p| p.value_ref().numel() as u64 * 4).sum();
    stride_kernels::gemm::warm_up_threads();
    let base = memory::reset_peak() - weights;
    {
        let x = Var::constant(net.batch(&shape, 1)?.value().to(device)?);
        no_grad(|| net.module().forward(&x, &mut Ctx::eval()))?;
    }
    let inference = memory::peak().saturating_sub(base);
    let cfg = TrainConfig { optimizer, lr: 1e-3, ..TrainConfig::default() };
    let mut secs = 0.0;
    memory::reset_peak();
    {
        let mut opt = stride_train::make_optimizer(&cfg)?;
        let mut ctx = Ctx::train(0);
        for step in 0..2 {
            let start = std::time::Instant::now();
            optim::zero_grad(&params);
            let x = Var::constant(net.batch(&shape, step)?.value().to(device)?);
            match segments {
                Some(seg) => {
                    recompute::forward_backward(
                        net.module(),
                        &x,
                        stride_train::Targets::plain(&vec![0; batch]),
                        &stride_train::Loss::default(),
                        1.0,
                        &mut ctx,
                        seg,
                    )?;
                }
                None => net.loss(&x, &mut ctx)?.backward()?,
            }
            opt.step(&params)?;
            secs = start.elapsed().as_secs_f64();
        }
        optim::zero_grad(&params);
    }
    Ok((inference, memory::peak().saturating_sub(base), secs))
}
