//! `stride`: the command line. Parses strings into typed configs and hands them to the library.

mod bench;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stride",
    version,
    about = "Convolutional neural networks in Rust: build, train, look inside, fast."
)]
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
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
        {
            eprintln!("error: cannot set up {t} threads: {e}");
            std::process::exit(1);
        }
    }
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Train(args) => train::run(&args),
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
