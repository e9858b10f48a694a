//! `stride bench`: Stride's side of the shared benchmark suite (bench/SPEC.md). Each figure is
//! one JSON line in the same form the peers' script prints, so the two can be compared line
//! for line.

use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;
use stride_autograd::{conv2d, conv_transpose2d, device, no_grad, Conv2dOptions, Device, Padding, Result, Rng, ToDevice, Var};
use stride_kernels::conv::{self, ConvGeom};
use stride_nn::planned::TrainPlanned;

#[derive(Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    #[arg(long, value_enum, default_value = "conv")]
    bench: Bench,
    /// Only these B3 shapes (comma-separated ids, e.g. c3,c4); default all nine.
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Timed calls per figure (the median is reported); at least 20 per SPEC.md.
    #[arg(long, default_value_t = 30)]
    reps: usize,
    /// Everything eagerly, op by op: inference, and the classifiers' (lenet, resnet18)
    /// training steps, which otherwise run through compiled plans as `stride train` runs them
    /// (to see what planning gains; see ARCHITECTURE.md, "Planned execution").
    #[arg(long)]
    eager: bool,
    /// `--bench onnx`: the ONNX file whose inference is timed (its weights inside or beside it).
    #[arg(long, value_name = "FILE.onnx")]
    model: Option<std::path::PathBuf>,
    /// `--bench onnx`: the input `CxHxW` or `NxCxHxW`; default the file's declared input.
    #[arg(long)]
    input: Option<String>,
    /// `--bench onnx`: images per inference pass (N of --input wins).
    #[arg(long, default_value_t = 32, value_parser = crate::at_least_one)]
    batch_size: usize,
    /// `--bench onnx`: after timing, where a planned pass spends its time, by kind of step
    /// (on stderr).
    #[arg(long)]
    profile: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// B3: single convolution layers, forward and backward.
    Conv,
    /// B1: the tutorial CNN, training steps (SGD) and inference, batch 64.
    Lenet,
    /// B2: the convolutional VAE's training steps (Adam), batch 32.
    Vae,
    /// B4: ResNet-18 (CIFAR stem) inference and training steps (SGD with momentum), batch 32.
    Resnet18,
    /// B1, B2, B3 and B4.
    All,
    /// Inference of an ONNX file (`--model FILE.onnx`): images per second on random inputs, to
    /// set beside ONNX Runtime's on the same file.
    Onnx,
}

/// One B3 shape: id, N, Cin, Cout, H (= W), kernel, stride, padding, groups, transposed.
type Shape = (&'static str, usize, usize, usize, usize, usize, usize, usize, usize, bool);

const B3: [Shape; 9] = [
    ("c1", 64, 1, 20, 28, 3, 1, 0, 1, false),
    ("c2", 64, 20, 50, 13, 5, 1, 0, 1, false),
    ("c3", 8, 64, 64, 56, 3, 1, 1, 1, false),
    ("c4", 8, 256, 256, 14, 3, 1, 1, 1, false),
    ("c5", 8, 64, 256, 56, 1, 1, 0, 1, false),
    ("c6", 8, 128, 128, 56, 3, 1, 1, 128, false),
    ("c7", 8, 64, 128, 56, 3, 2, 1, 1, false),
    ("t1", 32, 256, 128, 4, 4, 1, 0, 1, true),
    ("t2", 32, 64, 1, 8, 4, 4, 0, 1, true),
];

const WARMUP: usize = 3;

pub fn run(args: &BenchArgs, device: Device) -> Result<()> {
    if args.reps == 0 {
        return Err(stride_autograd::Error::arg("bench", "--reps must be at least 1"));
    }
    if !device.is_cpu() {
        let done = match args.bench {
            Bench::Lenet => lenet_bench(args, device),
            Bench::Vae => vae_bench(args, device),
            Bench::Resnet18 => resnet18_bench(args, device),
            Bench::All => lenet_bench(args, device).and_then(|_| vae_bench(args, device)).and_then(|_| resnet18_bench(args, device)),
            Bench::Onnx => onnx_bench(args, device),
            Bench::Conv => Err(stride_autograd::Error::device(
                "bench",
                "the B3 convolution figures time the CPU kernels; use --bench lenet, vae or resnet18 on a GPU",
            )),
        };
        if let Some(table) = stride_cuda::init(device).ok().and_then(|b| b.profile_report()) {
            eprint!("{table}");
        }
        return done;
    }
    match args.bench {
        Bench::Conv => conv_bench(args),
        Bench::Lenet => lenet_bench(args, device),
        Bench::Vae => vae_bench(args, device),
        Bench::Resnet18 => resnet18_bench(args, device),
        Bench::Onnx => onnx_bench(args, device),
        Bench::All => {
            lenet_bench(args, device).and_then(|_| vae_bench(args, device)).and_then(|_| conv_bench(args)).and_then(|_| resnet18_bench(args, device))
        }
    }
}

fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    let m = t.len() / 2;
    if t.len() % 2 == 1 {
        t[m]
    } else {
        0.5 * (t[m - 1] + t[m])
    }
}

fn conv_bench(args: &BenchArgs) -> Result<()> {
    let known: Vec<&str> = B3.iter().map(|s| s.0).collect();
    if let Some(bad) = args.shapes.iter().find(|s| !known.contains(&s.as_str())) {
        return Err(stride_autograd::Error::arg("bench", format!("unknown shape '{bad}'; the B3 shapes are {}", known.join(","))));
    }
    let mut rng = Rng::seed(3);
    for &(id, n, cin, cout, h, k, s, p, groups, transposed) in &B3 {
        if !args.shapes.is_empty() && !args.shapes.iter().any(|x| x == id) {
            continue;
        }
        let opts = Conv2dOptions::default().stride(s).padding(Padding::uniform(p)).groups(groups);
        let x = Var::constant(rng.normal::<f32>(&[n, cin, h, h], 0.0, 1.0)?);
        let wshape = if transposed { [cin, cout / groups, k, k] } else { [cout, cin / groups, k, k] };
        let w = Var::constant(rng.normal::<f32>(&wshape, 0.0, 0.05)?);
        let b = Var::constant(rng.normal::<f32>(&[cout], 0.0, 1.0)?);
        let geom = if transposed { ConvGeom::conv_transpose2d(&x.shape(), &wshape, &opts)? } else { ConvGeom::conv2d(&x.shape(), &wshape, &opts)? };
        let fwd = || {
            if transposed {
                conv_transpose2d(&x, &w, Some(&b), &opts)
            } else {
                conv2d(&x, &w, Some(&b), &opts)
            }
        };
        let y = no_grad(fwd)?;
        let gy = rng.normal::<f32>(&y.shape(), 0.0, 1.0)?;
        let (xv, wv) = (x.value(), w.value());
        let t_fwd = median_seconds(args.reps, || {
            let _ = no_grad(fwd);
        });
        // Input gradient + weight gradient, as the peers' convolution_backward (no bias).
        let t_bwd = median_seconds(args.reps, || {
            if transposed {
                std::hint::black_box(conv::forward(&geom, gy.data(), wv.data(), None));
                std::hint::black_box(conv::backward_filter(&geom, gy.data(), xv.data()));
            } else {
                std::hint::black_box(conv::backward_data(&geom, gy.data(), wv.data()));
                std::hint::black_box(conv::backward_filter(&geom, xv.data(), gy.data()));
            }
        });
        // SPEC.md's FLOPs: the same count for a convolution and its transpose.
        let flops = geom.flops();
        // Each pass's algorithm (a transposed convolution's forward is a data gradient).
        let algo = |pass| format!("{:?}", conv::Algo::for_pass(&geom, pass));
        let (fwd_pass, data_pass) = if transposed { (conv::Pass::Data, conv::Pass::Forward) } else { (conv::Pass::Forward, conv::Pass::Data) };
        let algos = [algo(fwd_pass), format!("{}/{}", algo(data_pass), algo(conv::Pass::Filter))];
        for ((name, secs, fl), algo) in [("conv_fwd", t_fwd, flops), ("conv_bwd", t_bwd, 2.0 * flops)].into_iter().zip(algos) {
            let rec = json!({
                "bench": name, "impl": "stride", "shape": id,
                "value": (fl / secs / 1e9 * 1000.0).round() / 1000.0, "unit": "GFLOP/s",
                "median_ms": (secs * 1e7).round() / 1e4, "gflop": (fl / 1e9 * 1e4).round() / 1e4,
                "algo": algo, "threads": rayon::current_num_threads(),
            });
            println!("{rec}");
        }
    }
    Ok(())
}

/// B1: SPEC.md's `lenet_train` (forward, backward, plain SGD lr 0.01 on random data, batch 64)
/// and `lenet_infer` (forward only), in images per second.
fn lenet_bench(args: &BenchArgs, device: Device) -> Result<()> {
    use stride_nn::optim::{Optimizer, Sgd};
    use stride_nn::{Ctx, Module};
    let spec = stride_models::InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let mut model = stride_models::build("cnn", &mut Rng::seed(2), spec).map_err(|e| e.source)?;
    model.to(device).map_err(|e| e.source)?;
    let mut rng = Rng::seed(2);
    let x = Var::constant(rng.normal::<f32>(&[64, 1, 28, 28], 0.0, 1.0)?.to(device)?);
    let labels: Vec<usize> = (0..64).map(|_| rng.below(10)).collect();
    let params = model.parameters();
    let mut opt = Sgd::new(0.01, 0.0, false, 0.0).map_err(|e| e.source)?;
    let mut ctx = Ctx::train(0);
    let steps = args.reps.max(50);
    let mut planned = TrainPlanned::new();
    let mut step = || -> Result<()> {
        classifier_step(eager_training(args, device), &mut planned, &mut model, &x, &labels, &mut ctx)?;
        opt.step(&params).map_err(|e| e.source)
    };
    let train_s = step_seconds(device, 5, steps, &mut step)?;
    let train_mode = mode(eager_training(args, device), &planned, &x);
    let infer_s = infer_seconds(args, device, &mut model, &x.value(), 5, steps)?;
    report_mode("lenet_train", train_s, 64, train_mode, device);
    report_mode("lenet_infer", infer_s, 64, infer_mode(args, device), device);
    Ok(())
}

/// `--bench onnx`: the imported network's inference on random inputs, planned where the
/// planner takes the network (else eagerly, saying why), one JSON line naming the file.
fn onnx_bench(args: &BenchArgs, device: Device) -> Result<()> {
    let fail = |msg: String| stride_autograd::Error::arg("bench", msg);
    let path = args.model.as_ref().ok_or_else(|| fail("--bench onnx needs --model FILE.onnx".into()))?;
    let mut net = stride_onnx::import(&stride_onnx::read(path).map_err(|e| e.source)?).map_err(|e| e.source)?.network;
    let (n, chw) = match &args.input {
        Some(s) => stride_train::inspect::parse_input(s).map_err(|e| fail(e.to_string()))?,
        None => match net.input_shape.get(1..) {
            Some([Some(c), Some(h), Some(w)]) => (None, [*c, *h, *w]),
            _ => return Err(fail(format!("{} declares its input as {:?}; give --input CxHxW", path.display(), net.input_shape))),
        },
    };
    let batch = n.unwrap_or(args.batch_size);
    stride_nn::Module::to(&mut net, device).map_err(|e| e.source)?;
    let x: stride_autograd::Tensor<f32> = Rng::seed(1).normal(&[batch, chw[0], chw[1], chw[2]], 0.0, 1.0)?.to(device)?;
    let steps = args.reps.max(5);
    let (secs, mode) = match infer_seconds(args, device, &mut net, &x, 2, steps) {
        Ok(s) => (s, infer_mode(args, device).to_string()),
        Err(why) if !args.eager && device.is_cpu() => {
            eprintln!("inference ran eagerly: {why}");
            let eager = BenchArgs { eager: true, model: None, input: None, shapes: Vec::new(), profile: false, ..*args };
            (infer_seconds(&eager, device, &mut net, &x, 2, steps)?, "eager".to_string())
        }
        Err(e) => return Err(e),
    };
    let mut rec = record("onnx_infer", secs, batch, device);
    rec["mode"] = json!(mode);
    rec["model"] = json!(path.display().to_string());
    rec["input"] = json!(chw);
    println!("{rec}");
    Ok(())
}

/// Seconds per step: `warmup` untimed steps, then the median of 5 timed blocks that together
/// hold at least `steps` steps (on a GPU, each block waits for its queued work).
fn step_seconds(device: Device, warmup: usize, steps: usize, step: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        step()?;
    }
    device::synchronize::<f32>(device)?;
    let block = steps.div_ceil(5).max(1);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..block {
            step()?;
        }
        device::synchronize::<f32>(device)?;
        times.push(t.elapsed().as_secs_f64() / block as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// Seconds per inference pass of `model` on `x`: through a plan compiled once (the
/// compilation is not timed, as a session's is not in the peers' figures), or eagerly.
fn infer_seconds(
    args: &BenchArgs,
    device: Device,
    model: &mut dyn stride_nn::Module,
    x: &stride_autograd::Tensor<f32>,
    warmup: usize,
    steps: usize,
) -> Result<f64> {
    use stride_nn::Ctx;
    if args.eager || !device.is_cpu() {
        let mut eval = Ctx::eval();
        let xv = Var::constant(x.clone());
        return step_seconds(device, warmup, steps, &mut || no_grad(|| model.forward(&xv, &mut eval)).map(|_| ()).map_err(|e| e.source));
    }
    let mut plan = stride_nn::planned::compile(model, x).map_err(|e| e.source)?;
    let secs = step_seconds(device, warmup, steps, &mut || plan.run(x).map(|_| ()))?;
    if args.profile {
        eprint!("{}", plan_profile(&mut plan, x)?);
    }
    Ok(secs)
}

/// Steps listed one by one under a profile's table of kinds.
const SLOWEST_STEPS: usize = 12;

/// A table of where a planned pass spends its time: each kind of step's median over five
/// passes, summed over its steps, largest first; then the slowest steps one by one, with the
/// shapes and GFLOP/s of convolutions and products.
fn plan_profile(plan: &mut stride_autograd::Plan, x: &stride_autograd::Tensor<f32>) -> Result<String> {
    let names = plan.describe();
    let geometry = plan.geometry();
    let mut runs: Vec<Vec<f64>> = (0..5).map(|_| plan.run_timed(x).map(|r| r.1)).collect::<Result<_>>()?;
    let mut kinds: Vec<(String, f64, usize)> = Vec::new();
    let mut steps: Vec<(usize, f64)> = Vec::with_capacity(names.len());
    for (s, name) in names.iter().enumerate() {
        let mut t: Vec<f64> = runs.iter_mut().map(|r| r[s]).collect();
        t.sort_by(f64::total_cmp);
        steps.push((s, t[2]));
        match kinds.iter_mut().find(|k| &k.0 == name) {
            Some(k) => {
                k.1 += t[2];
                k.2 += 1;
            }
            None => kinds.push((name.clone(), t[2], 1)),
        }
    }
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = kinds.iter().map(|k| k.1).sum();
    let mut out = format!("{:>10} {:>6} {:>6}  step (planned pass, {} steps)\n", "ms", "share", "count", names.len());
    for (name, t, count) in kinds {
        out += &format!("{:>10.3} {:>5.1}% {count:>6}  {name}\n", t * 1e3, 100.0 * t / total.max(f64::MIN_POSITIVE));
    }
    steps.sort_by(|a, b| b.1.total_cmp(&a.1));
    out += &format!("\n{:>10} {:>6} {:>7}  slowest steps (step number: what, shapes)\n", "ms", "share", "GFLOP/s");
    for &(s, t) in steps.iter().take(SLOWEST_STEPS) {
        let (shapes, rate) = match &geometry[s] {
            Some((shapes, flops)) => (format!(", {shapes}"), format!("{:.1}", flops / t.max(1e-9) / 1e9)),
            None => (String::new(), "-".into()),
        };
        out += &format!("{:>10.3} {:>5.1}% {rate:>7}  {s}: {}{shapes}\n", t * 1e3, 100.0 * t / total.max(f64::MIN_POSITIVE), names[s]);
    }
    Ok(out)
}

/// Whether the classifiers' training steps run eagerly: on request, and on a GPU (plans run on
/// the CPU), as in `stride train`.
fn eager_training(args: &BenchArgs, device: Device) -> bool {
    args.eager || !device.is_cpu()
}

/// How inference ran: planned on the CPU unless `--eager`; eagerly on a GPU.
fn infer_mode(args: &BenchArgs, device: Device) -> &'static str {
    if args.eager || !device.is_cpu() {
        "eager"
    } else {
        "planned"
    }
}

/// One images-per-second line.
fn report(name: &str, secs: f64, batch: usize, device: Device) {
    println!("{}", record(name, secs, batch, device));
}

/// A figure's line, saying whether it ran planned or eagerly.
fn report_mode(name: &str, secs: f64, batch: usize, mode: &str, device: Device) {
    let mut rec = record(name, secs, batch, device);
    rec["mode"] = json!(mode);
    println!("{rec}");
}

/// One classifier training step (gradients only; the caller's optimizer steps): through a
/// training plan unless `eager`, or when the planner refuses the network.
fn classifier_step(
    eager: bool,
    planned: &mut TrainPlanned,
    model: &mut dyn stride_nn::Module,
    x: &Var,
    labels: &[usize],
    ctx: &mut stride_nn::Ctx,
) -> Result<()> {
    if !eager && planned.step(model, &x.value(), labels).map_err(|e| e.source)?.is_some() {
        return Ok(());
    }
    stride_nn::optim::zero_grad(&model.parameters());
    let logits = model.forward(x, ctx).map_err(|e| e.source)?;
    stride_autograd::cross_entropy(&logits, labels, 0.0)?.backward()
}

/// How the training steps ran: planned, eagerly on request, or eagerly because the planner
/// refused the network (its reason on stderr).
fn mode(eager: bool, planned: &TrainPlanned, x: &Var) -> &'static str {
    match planned.refusal(&x.shape()) {
        _ if eager => "eager",
        Some(why) => {
            eprintln!("training ran eagerly: {why}");
            "eager (refused)"
        }
        None => "planned",
    }
}

fn record(name: &str, secs: f64, batch: usize, device: Device) -> serde_json::Value {
    let mut rec = json!({
        "bench": name, "impl": "stride", "value": (batch as f64 / secs * 10.0).round() / 10.0, "unit": "images/s",
        "median_ms": (secs * 1e7).round() / 1e4, "batch": batch, "threads": rayon::current_num_threads(),
    });
    if !device.is_cpu() {
        rec["device"] = json!(device.to_string());
        // The backend is up by now (the model moved there); this only looks it up.
        if let Ok(b) = stride_cuda::init(device) {
            rec["convolution"] = json!(b.convolution_route());
        }
    }
    rec
}

/// B2: SPEC.md's `vae_train` (Adam 1e-3, batch 32 of 32x32 images in [0, 1], training mode).
fn vae_bench(args: &BenchArgs, device: Device) -> Result<()> {
    use stride_nn::optim::{zero_grad, Adam, Optimizer};
    use stride_nn::{Ctx, Module};
    let mut model = stride_models::vae::Vae::new(&mut Rng::seed(0)).map_err(|e| e.source)?;
    model.to(device).map_err(|e| e.source)?;
    let x = Var::constant(Rng::seed(1).uniform::<f32>(&[32, 1, 32, 32], 0.0, 1.0)?.to(device)?);
    let params = model.parameters();
    let mut opt = Adam::default_with_lr(1e-3).map_err(|e| e.source)?;
    let mut ctx = Ctx::train(0);
    let mut step = || -> Result<()> {
        zero_grad(&params);
        let (_, loss) = model.forward_loss(&x, &mut ctx).map_err(|e| e.source)?;
        loss.total.backward()?;
        opt.step(&params).map_err(|e| e.source)
    };
    report("vae_train", step_seconds(device, 5, args.reps.max(50), &mut step)?, 32, device);
    Ok(())
}

/// B4: SPEC.md's `resnet18_infer` (eval mode) and `resnet18_train` (SGD lr 0.1, momentum 0.9,
/// weight decay 5e-4), ResNet-18 with the CIFAR stem on [32, 3, 32, 32].
fn resnet18_bench(args: &BenchArgs, device: Device) -> Result<()> {
    use stride_nn::optim::{Optimizer, Sgd};
    use stride_nn::{Ctx, Module};
    let spec = stride_models::InputSpec { channels: 3, height: 32, width: 32, classes: 10 };
    let mut model = stride_models::build("resnet18_cifar", &mut Rng::seed(4), spec).map_err(|e| e.source)?;
    model.to(device).map_err(|e| e.source)?;
    let mut rng = Rng::seed(4);
    let x = Var::constant(rng.normal::<f32>(&[32, 3, 32, 32], 0.0, 1.0)?.to(device)?);
    let labels: Vec<usize> = (0..32).map(|_| rng.below(10)).collect();
    let steps = args.reps.clamp(10, 30);
    let infer_s = infer_seconds(args, device, &mut model, &x.value(), 2, steps)?;
    let params = model.parameters();
    let mut opt = Sgd::new(0.1, 0.9, false, 5e-4).map_err(|e| e.source)?;
    let mut ctx = Ctx::train(0);
    let mut planned = TrainPlanned::new();
    let mut step = || -> Result<()> {
        classifier_step(eager_training(args, device), &mut planned, &mut model, &x, &labels, &mut ctx)?;
        opt.step(&params).map_err(|e| e.source)
    };
    let train_s = step_seconds(device, 2, steps, &mut step)?;
    let train_mode = mode(eager_training(args, device), &planned, &x);
    report_mode("resnet18_infer", infer_s, 32, infer_mode(args, device), device);
    report_mode("resnet18_train", train_s, 32, train_mode, device);
    Ok(())
}
