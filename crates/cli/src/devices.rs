//! `stride devices`: what Stride can run on, and (`--check`) whether each GPU computes every
//! primitive as the CPU does.

use clap::Args;
use stride_autograd::{conformance, Backend, Device};

#[derive(Args)]
pub struct DevicesArgs {
    /// Run every primitive forward and backward on each GPU (or on `--device`) and on the CPU,
    /// and compare: within 1e-4 of the CPU's largest magnitude, or the command fails.
    #[arg(long)]
    check: bool,
}

/// How far a GPU's result may be from the CPU's, relative to the CPU tensor's largest value.
const TOLERANCE: f64 = 1e-4;

pub fn run(a: &DevicesArgs, device: Device, options: stride_cuda::CudaOptions) -> Result<(), Box<dyn std::error::Error>> {
    println!("cpu: {} worker threads", rayon::current_num_threads());
    let gpus = match stride_cuda::probe() {
        Ok(gpus) => gpus,
        Err(e) => {
            println!("cuda: none ({e})");
            Vec::new()
        }
    };
    for g in &gpus {
        let (major, minor) = g.compute_capability;
        println!("cuda:{}: {} ({:.1} GiB, compute capability {major}.{minor})", g.ordinal, g.name, g.memory_bytes as f64 / (1u64 << 30) as f64);
    }
    if gpus.is_empty() && stride_cuda::probe().is_ok() {
        println!("cuda: the driver sees no GPU");
    }
    if !a.check {
        return Ok(());
    }
    let targets: Vec<Device> = if device.is_cpu() { gpus.iter().map(|g| Device::Cuda(g.ordinal)).collect() } else { vec![device] };
    if targets.is_empty() {
        return Err("--check needs a GPU, and none was found".into());
    }
    let mut bad = Vec::new();
    for d in targets {
        let backend = stride_cuda::init_with(d, options)?;
        println!("\n{}", Backend::<f32>::describe(&*backend));
        println!("{:<22} {:>12} {:>12}  {:<7} case", "primitive", "forward", "backward", "");
        for r in conformance::check::<f32>(d)? {
            let ok = r.forward <= TOLERANCE && r.backward <= TOLERANCE;
            println!("{:<22} {:>12.2e} {:>12.2e}  {:<7} {}", r.primitive, r.forward, r.backward, if ok { "ok" } else { "FAILED" }, r.case);
            if !ok {
                let case = if r.case.is_empty() { String::new() } else { format!(" ({})", r.case) };
                bad.push(format!("{}{case} on {d}", r.primitive));
            }
        }
    }
    if !bad.is_empty() {
        return Err(format!("{} differ from the CPU by more than {TOLERANCE:e}: {}", bad.len(), bad.join(", ")).into());
    }
    println!("\nevery primitive agrees with the CPU within {TOLERANCE:e}");
    Ok(())
}
