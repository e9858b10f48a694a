//! `stride`: the command line. Parses strings into typed configs and hands them to the library.

mod bench;
mod infer;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "stride", version, about = "Convolutional neural networks in Rust: build, train, look inside, fast.")]
struct Cli {
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trains a CNN (by default the tutorial network on the embedded MNIST).
    Train(train::TrainArgs),
    /// Evaluates trained weights on a data set's test split: accuracy, per class, confusion.
    Eval(infer::EvalArgs),
    /// Runs a model in evaluation mode on the tensor `input` of a safetensors file and writes
    /// `output`, for tensor-by-tensor comparison with other frameworks.
    Run(infer::RunArgs),
    /// Class probabilities for image files (PNG, JPEG), with a trained model.
    Predict(infer::PredictArgs),
    /// Lists the model zoo.
    Models,
    /// Runs the benchmark suite of bench/SPEC.md and prints one JSON line per figure.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        if t == 0 {
            eprintln!("error: --threads must be at least 1");
            std::process::exit(2);
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(t).build_global() {
            eprintln!("error: cannot set up {t} threads: {e}");
            std::process::exit(1);
        }
    }
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => infer::eval(&args),
        Command::Run(args) => infer::run(&args),
        Command::Predict(args) => infer::predict(&args),
        Command::Models => {
            for m in stride_models::ZOO {
                println!("{:<10} {:>3} epochs  {}", m.name, m.epochs, m.about);
            }
            Ok(())
        }
        Command::Bench(args) => bench::run(&args).map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
