//! `stride`: the command line. Parses strings into typed configs and hands them to the library.

mod bench;
mod devices;
mod infer;
mod look;
mod memory;
#[cfg(feature = "mpi")]
mod mpi;
mod onnx;
mod summary;
mod train;
mod vae;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: memory::Counting = memory::Counting;

#[derive(Parser)]
#[command(name = "stride", version, about = "Convolutional neural networks in Rust: build, train, look inside, fast.")]
struct Cli {
    /// Worker threads for the kernels, 1 to 1024 (default: all cores).
    #[arg(long, global = true, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    threads: Option<usize>,
    /// Where models run: cpu, cuda or cuda:N (train, eval, run, predict, vae, bench, summary,
    /// devices). CUDA is loaded at run time; `stride devices` lists what is there.
    /// Under `mpirun` (a build with `--features mpi`), `train --device cuda` gives each process
    /// a GPU of its machine by its local rank (cuda:N pins them all to one).
    #[arg(long, global = true, default_value = "cpu", value_parser = parse_device)]
    device: DeviceArg,
    /// On a GPU, cuDNN for convolutions, batch norm and max and average pooling: off (convolutions
    /// lowered to columns and multiplied by cuBLAS), fp32 (results within 1e-4 of the CPU's) or
    /// tf32 (tensor cores, PyTorch's default for convolutions).
    #[arg(long, global = true, default_value = "off")]
    cudnn: stride_cuda::Cudnn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trains a CNN (by default the tutorial network on the embedded MNIST).
    Train(Box<train::TrainArgs>),
    /// Evaluates trained weights on a data set's test split: accuracy, per class, confusion.
    Eval(infer::EvalArgs),
    /// Runs a model in evaluation mode on the tensor `input` of a safetensors file and writes
    /// `output`, for tensor-by-tensor comparison with other frameworks.
    Run(infer::RunArgs),
    /// Class probabilities for image files (PNG, JPEG), with a trained model.
    Predict(infer::PredictArgs),
    /// Trains the convolutional variational autoencoder; saves reconstructions every epoch.
    Vae(vae::VaeArgs),
    /// Draws new digits from a trained VAE's prior into a grid PNG.
    Sample(vae::SampleArgs),
    /// Lists the model zoo.
    Models,
    /// One row per layer (shape, parameters, multiply-adds, receptive field, memory kept) and
    /// the memory a batch needs for inference and for training.
    Summary(summary::SummaryArgs),
    /// Feature maps of chosen layers for an image, and the first layer's filters, as PNG grids.
    Features(look::FeaturesArgs),
    /// Grad-CAM: a heat map over an image of where a trained network found evidence for a class.
    Gradcam(look::GradCamArgs),
    /// The input patterns that most excite a layer's channels (or, on the logits, each class),
    /// grown by gradient ascent on the input, as a PNG grid.
    Patterns(look::PatternsArgs),
    /// Shows what an augmentation spec does to a data set's training images, as a PNG grid (each
    /// image, then augmented draws of it), before a run uses it.
    Augment(look::AugmentArgs),
    /// Where a trained network puts a data set's test images: one layer's outputs (by default
    /// the classifier's input) on their first two principal axes, coloured by class, as a PNG.
    Embed(look::EmbedArgs),
    /// Occlusion sensitivity: a heat map over an image of how much a class's probability falls
    /// where a grey square hides it (any network, ONNX ones too: it needs only the outputs).
    Occlusion(look::OcclusionArgs),
    /// Writes a model (zoo, TOML, or the VAE's generator) with its weights as ONNX.
    Export(onnx::ExportArgs),
    /// Reads an ONNX model: checks that Stride can run it, and writes its weights as safetensors.
    /// `--model file.onnx` works wherever a model is taken.
    Import(onnx::ImportArgs),
    /// Runs the benchmark suite of bench/SPEC.md and prints one JSON line per figure.
    Bench(bench::BenchArgs),
    /// Lists the devices Stride can run on; `--check` compares every primitive on each GPU
    /// (or on `--device`) with the CPU.
    Devices(devices::DevicesArgs),
}

/// The zoo with parameter counts for each model's design input.
fn models() -> Result<(), Box<dyn std::error::Error>> {
    println!("{:<20} {:>13}  {:<16} {:>6}  about", "name", "parameters", "designed for", "epochs");
    for m in stride_models::ZOO {
        let s = m.input;
        let n = stride_nn::Module::num_parameters(&mut (m.build)(&mut stride_autograd::Rng::seed(0), s)?);
        let input = format!("{}x{}x{}, {}", s.channels, s.height, s.width, s.classes);
        let recipe = if m.weight_decay > 0.0 { format!(" (trained with AdamW, weight decay {})", m.weight_decay) } else { String::new() };
        println!("{:<20} {:>13}  {:<16} {:>6}  {}{recipe}", m.name, group(n), input, m.epochs, m.about);
    }
    let n = stride_nn::Module::num_parameters(&mut stride_models::vae::Vae::new(&mut stride_autograd::Rng::seed(0))?);
    println!("{:<20} {:>13}  {:<16} {:>6}  {}", "vae", group(n), "1x32x32", 10, stride_models::vae::ABOUT);
    println!("\nEvery model builds for any channel and class count; `stride train --resize N` fits the data to models that need larger images.");
    Ok(())
}

/// 11689512 -> "11,689,512"
fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The first of the launcher's environment variables `names` that holds a number (a rank or a
/// count mpirun sets before MPI starts); `None` outside a launcher.
fn launcher_number(names: &[&str]) -> Option<usize> {
    names.iter().find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// `--device` as given: the device, and whether it named no GPU in particular (`cuda`).
#[derive(Clone, Copy, Debug)]
struct DeviceArg {
    device: stride_autograd::Device,
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    any_gpu: bool,
}

/// A count that must be at least 1 (epochs, batch sizes, --top).
fn at_least_one(s: &str) -> Result<usize, String> {
    s.trim().parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(|| format!("'{s}' is not a whole number of at least 1"))
}

/// A number `ok` accepts, else an error naming `what` it should have been and `hint`.
fn number(s: &str, what: &str, ok: impl Fn(f64) -> bool, hint: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().ok().filter(|&v| ok(v)).ok_or_else(|| format!("'{s}' is not {what}: give {hint}"))
}

/// A learning rate: finite and >= 0 (0 freezes the weights, as PyTorch allows).
fn learning_rate(s: &str) -> Result<f64, String> {
    number(s, "a learning rate", |r| r.is_finite() && r >= 0.0, "a finite number >= 0, such as 2e-3")
}

/// SGD's momentum, in [0, 1).
fn momentum(s: &str) -> Result<f64, String> {
    number(s, "a momentum", |m| (0.0..1.0).contains(&m), "a number in [0, 1), such as 0.9")
}

/// A weight decay: finite and >= 0.
fn weight_decay(s: &str) -> Result<f64, String> {
    number(s, "a weight decay", |d| d.is_finite() && d >= 0.0, "a finite number >= 0, such as 5e-4")
}

fn parse_device(s: &str) -> Result<DeviceArg, String> {
    let device = s.parse::<stride_autograd::Device>().map_err(|e| e.to_string())?;
    Ok(DeviceArg { device, any_gpu: matches!(s.trim().to_ascii_lowercase().as_str(), "cuda" | "gpu") })
}

/// The device this process runs on: `--device`'s, except that each rank of a data-parallel job
/// (`mpirun stride train --device cuda`) takes GPU (local rank mod GPUs), one process per GPU
/// as with PyTorch's DDP.
fn device_of_process(arg: DeviceArg, training: bool) -> stride_autograd::Device {
    #[cfg(feature = "mpi")]
    if arg.any_gpu && training {
        if let (Some(local), Ok(count @ 1..)) = (mpi::local_rank(), stride_cuda::device_count()) {
            return stride_autograd::Device::Cuda(local % count);
        }
    }
    #[cfg(not(feature = "mpi"))]
    let _ = training;
    arg.device
}

fn main() {
    memory::keep_freed_memory();
    // `stride summary resnet50 | head` should end quietly when the reader closes the pipe, as
    // other command-line tools do, rather than panic in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default action of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // The main thread is worker 0 of the pool: a parallel op it starts runs on it at once
    // with the others stealing, rather than being handed to the pool while it sleeps until
    // the op is done (two thread switches per op, which small layers felt).
    let pool = rayon::ThreadPoolBuilder::new().num_threads(cli.threads.unwrap_or(0)).use_current_thread();
    if let Err(e) = pool.build_global() {
        eprintln!("error: cannot set up {} threads: {e}", cli.threads.map_or("the".to_string(), |t| t.to_string()));
        std::process::exit(1);
    }
    let device = device_of_process(cli.device, matches!(cli.command, Command::Train(_)));
    let takes_device = matches!(
        cli.command,
        Command::Train(_)
            | Command::Eval(_)
            | Command::Run(_)
            | Command::Predict(_)
            | Command::Vae(_)
            | Command::Bench(_)
            | Command::Summary(_)
            | Command::Devices(_)
    );
    // A run's header says which GPU it trains on and how (cuDNN or columns).
    let mut on_gpu = None;
    if !device.is_cpu() {
        let ready = if takes_device {
            stride_cuda::init_with(device, stride_cuda::CudaOptions { cudnn: cli.cudnn }).map(|gpu| {
                on_gpu = Some(format!("on {}", stride_autograd::device::Backend::<f32>::describe(&*gpu)));
            })
        } else {
            Err(stride_autograd::Error::device("--device", "applies to train, eval, run, predict, vae, bench, summary and devices"))
        };
        if let Err(e) = ready {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        // Training prints it in its header (one line for all ranks of a data-parallel job).
        Command::Train(args) => train::run(&args, device, on_gpu.as_deref()),
        Command::Eval(args) => infer::eval(&args, device),
        Command::Run(args) => infer::run(&args, device),
        Command::Predict(args) => infer::predict(&args, device),
        Command::Models => models(),
        Command::Summary(args) => summary::run(&args, device),
        Command::Features(args) => look::features(&args),
        Command::Gradcam(args) => look::gradcam(&args),
        Command::Patterns(args) => look::patterns(&args),
        Command::Augment(args) => look::augment(&args),
        Command::Embed(args) => look::embed(&args),
        Command::Occlusion(args) => look::occlusion(&args),
        Command::Vae(args) => {
            if let Some(line) = &on_gpu {
                println!("{line}");
            }
            vae::train(&args, device)
        }
        Command::Sample(args) => vae::sample(&args),
        Command::Export(args) => onnx::export(&args),
        Command::Import(args) => onnx::import(&args),
        Command::Bench(args) => bench::run(&args, device).map_err(Into::into),
        Command::Devices(args) => devices::run(&args, device, stride_cuda::CudaOptions { cudnn: cli.cudnn }),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_autograd::Device;

    #[test]
    fn a_device_flag_says_whether_it_named_a_gpu() {
        for (text, device, any_gpu) in [
            ("cpu", Device::Cpu, false),
            ("cuda", Device::Cuda(0), true),
            ("GPU", Device::Cuda(0), true),
            ("cuda:0", Device::Cuda(0), false),
            ("cuda:3", Device::Cuda(3), false),
        ] {
            let d = parse_device(text).unwrap();
            assert_eq!((d.device, d.any_gpu), (device, any_gpu), "{text}");
        }
        let e = parse_device("tpu").unwrap_err();
        assert!(e.contains("\"tpu\""), "{e}");
        // Outside mpirun (as tests run) `cuda` is GPU 0, and cuda:N is kept.
        assert_eq!(device_of_process(parse_device("cuda").unwrap(), true), Device::Cuda(0));
        assert_eq!(device_of_process(parse_device("cuda:2").unwrap(), true), Device::Cuda(2));
    }

    #[test]
    fn optimizer_settings_are_checked_when_parsed() {
        assert_eq!(learning_rate("0"), Ok(0.0));
        assert_eq!(learning_rate(" 3e-4"), Ok(3e-4));
        assert_eq!(momentum("0.9"), Ok(0.9));
        assert_eq!(weight_decay("0.05"), Ok(0.05));
        for bad in ["-1", "nan", "inf", "fast", ""] {
            let e = learning_rate(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}' is not a learning rate")), "{e}");
            assert!(weight_decay(bad).is_err(), "{bad}");
        }
        for bad in ["1", "-0.1", "nan", "1.5"] {
            assert!(momentum(bad).unwrap_err().contains("not a momentum"), "{bad}");
        }
    }
}
