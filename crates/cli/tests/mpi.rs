//! Data-parallel training on Open MPI, end to end (`cargo test -p stride-cli --features mpi
//! --test mpi`; needs `mpirun`: `apt-get install openmpi-bin libopenmpi-dev libclang-dev`).
#![cfg(feature = "mpi")]

mod common;
mod emulator;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> common::Scratch {
    common::Scratch::new("stride-mpi", name)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `mpirun -np n stride ARGS` on this machine (root and oversubscription allowed, as in CI).
fn mpirun(n: usize) -> Command {
    mpirun_with(n, &[])
}

/// `mpirun` with `env` set for the ranks only (`-x NAME=value`), not for mpirun itself.
fn mpirun_with(n: usize, env: &[(String, String)]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string()]);
    for (k, v) in env {
        c.args(["-x", &format!("{k}={v}")]);
    }
    c.arg(env!("CARGO_BIN_EXE_stride"));
    c
}

fn train_args(out: &Path, epochs: usize) -> Vec<String> {
    ["--threads", "1", "train", "--epochs", &epochs.to_string(), "--batch-size", "64", "--no-report", "--out", out.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn last_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or("").to_string()
}

/// The optimizer both comparisons train with (see the next test for why not Adam).
const PLAIN_SGD: [&str; 6] = ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.01"];

/// Two ranks sum their halves of each batch's gradient where one process sums the whole batch,
/// so the two differ by rounding, and training must keep that difference at rounding size.
/// Plain SGD does; Adam does not (and is not compared here): it divides each gradient by its
/// running size, so a weight whose gradient is rounding noise around zero (a dead unit) takes
/// full-size steps whose sign depends on the summation order. With Adam the two runs agree to
/// about 1e-5 on some machines and 4e-3 on others (AVX-512 products round differently).
#[test]
fn two_ranks_train_as_one_process_with_the_same_batch() {
    let (solo, pair) = (tmp("solo"), tmp("pair"));
    let sgd = |out: &Path| {
        let mut a = train_args(out, 2);
        a.extend(PLAIN_SGD.map(String::from));
        a
    };
    // The one process trains eagerly as the ranks do (training plans are for one process),
    // so the runs differ only in how each batch's gradient is summed.
    let one = Command::new(env!("CARGO_BIN_EXE_stride")).args(sgd(&solo)).arg("--eager").output().unwrap();
    assert!(one.status.success(), "{}", text(&one));
    let two = mpirun(2).args(sgd(&pair)).output().unwrap();
    assert!(two.status.success(), "{}", text(&two));
    let log = text(&two);
    assert!(log.contains("data parallel: 2 processes"), "{log}");
    assert_eq!(log.matches("test accuracy").count(), 1, "only rank 0 reports: {log}");
    let a = stride_train::checkpoint::load(&solo.join("model.safetensors")).unwrap();
    let b = stride_train::checkpoint::load(&pair.join("model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (name, t) in &a {
        let u = &b[name];
        assert_eq!(t.shape(), u.shape(), "{name}");
        worst = t.data().iter().zip(u.data()).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
    }
    eprintln!("largest weight difference after 2 epochs: {worst:e}");
    // Measured: 3e-8 with AVX2 products, 2.5e-4 with AVX-512 ones (the library's blocking of
    // a product depends on its row count, so each rank's 32-image products round differently
    // from one process's 64-image ones, and early training amplifies that). A real fault is far
    // larger: a doubled gradient (a rank that forgets its share weight) moves them by 0.14.
    assert!(worst <= 1e-3, "two ranks' weights differ from one process's by {worst:e}");
    // After two epochs at this rate the network is barely trained (~59%) and many test images
    // are near-ties between classes, so weights a rounding apart flip a few of them (one to
    // two of 2,000 measured); more than ten would mean the runs really differ.
    let accuracy = |o: &Output| last_line(o).trim_start_matches("test accuracy ").parse::<f64>().unwrap();
    let (a1, a2) = (accuracy(&one), accuracy(&two));
    assert!((a1 - a2).abs() <= 0.005, "accuracy {a2} on two ranks, {a1} in one process");
    for d in [solo, pair] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// A network with batch norm and no dropout, so one process and two can be compared. The
/// convolution before batch norm has no bias, as usual: its gradient would be rounding noise
/// (batch norm removes the mean), which Adam turns into full-size steps that differ with the
/// summation order.
const BN_MODEL: &str = r#"
[[layers]]
type = "conv2d"
out_channels = 8
kernel = 3
bias = false
[[layers]]
type = "batch_norm"
[[layers]]
type = "relu"
[[layers]]
type = "avg_pool2d"
kernel = 2
[[layers]]
type = "flatten"
[[layers]]
type = "linear"
out_features = "classes"
"#;

/// The largest difference between two runs' weights and buffers, relative to 1 + |value|
/// (running variances are in the tens).
fn max_difference(a: &Path, b: &Path) -> f32 {
    let a = stride_train::checkpoint::load(&a.join("model.safetensors")).unwrap();
    let b = stride_train::checkpoint::load(&b.join("model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (name, t) in &a {
        let d = t.data().iter().zip(b[name].data()).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0f32, f32::max);
        if d > 1e-5 {
            eprintln!("  {name}: differs by {d:e}");
        }
        worst = worst.max(d);
    }
    worst
}

#[test]
fn synchronised_batch_norm_makes_two_ranks_one_process() {
    let dir = tmp("syncbn");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("bn.toml");
    std::fs::write(&model, BN_MODEL).unwrap();
    let run = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a = train_args(out, 1);
        a.extend(["--model".to_string(), model.to_str().unwrap().to_string()]);
        a.extend(PLAIN_SGD.map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let (solo, synced, local) = (dir.join("solo"), dir.join("synced"), dir.join("local"));
    // Eager in one process too, as the ranks train (see above).
    let one = Command::new(env!("CARGO_BIN_EXE_stride")).args(run(&solo, &["--eager"])).output().unwrap();
    assert!(one.status.success(), "{}", text(&one));
    let two = mpirun(2).args(run(&synced, &["--sync-bn"])).output().unwrap();
    assert!(two.status.success(), "{}", text(&two));
    let plain = mpirun(2).args(run(&local, &[])).output().unwrap();
    assert!(plain.status.success(), "{}", text(&plain));
    let (d_sync, d_local) = (max_difference(&solo, &synced), max_difference(&solo, &local));
    eprintln!("after 1 epoch: synchronised batch norm {d_sync:e}, per-rank batch norm {d_local:e} from one process");
    assert!(d_sync <= 1e-5, "--sync-bn: two ranks differ from one process by {d_sync:e}");
    assert!(d_local > 1e-4, "per-rank statistics should differ from the whole batch's ({d_local:e})");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_rank_that_differs_stops_the_job_with_the_reason() {
    let dir = tmp("mismatch");
    // MPMD: rank 1 runs with another seed.
    let mut args = train_args(&dir, 1);
    let mut other = args.clone();
    other.extend(["--seed".to_string(), "5".to_string()]);
    args.push(":".into());
    args.extend(["-np".into(), "1".into(), env!("CARGO_BIN_EXE_stride").into()]);
    args.extend(other);
    let o = mpirun(1).args(&args).output().unwrap();
    assert!(!o.status.success());
    let log = text(&o);
    // Whichever rank exits first, the launcher may kill the other before it prints: each rank's
    // message alone must say which rank differs and in what.
    assert!(log.contains(": ranks [1] differ from rank 0 in model or data (rank 1 has seed 5 (rank 0: 0))"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_killed_rank_ends_the_job_and_the_checkpoint_resumes() {
    let dir = tmp("kill");
    let mut job = mpirun(2).args(train_args(&dir, 3)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait for the first epoch's checkpoint, then kill one rank (a child of mpirun) mid-epoch.
    let ckpt = dir.join("checkpoint.safetensors");
    let start = Instant::now();
    while !ckpt.exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ckpt.exists(), "no checkpoint after the first epoch");
    std::thread::sleep(Duration::from_millis(500));
    let children = Command::new("pgrep").args(["-P", &job.id().to_string()]).output().unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&children.stdout).split_whitespace().map(str::to_string).collect();
    assert!(!pids.is_empty(), "mpirun has no child processes");
    Command::new("kill").args(["-9", pids.last().unwrap()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the job did not end within 60 s of a rank's death");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success(), "the job exits non-zero when a rank dies");
    // The last checkpoint loads, and the same job resumes from it and finishes.
    assert!(stride_train::checkpoint::load(&ckpt).is_ok());
    let mut args = train_args(&dir, 3);
    args.push("--resume".into());
    let r = mpirun(2).args(&args).output().unwrap();
    assert!(r.status.success(), "{}", text(&r));
    assert!(last_line(&r).starts_with("test accuracy "), "{}", text(&r));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn two_ranks_on_two_emulated_gpus_train_as_two_ranks_on_the_cpu() {
    // Two GPUs on the CUDA emulator (crates/cuda/emulator), set for the ranks only (-x): each
    // rank takes the GPU of its local rank, and the job trains as the same job on the CPU.
    let Some(emu) = emulator::emulator() else { return };
    let dir = tmp("gpus");
    common::shapes(&dir.join("data"));
    let run = |device: &str, extra: &[&str]| {
        let out = dir.join(device);
        let mut env = emu.env();
        env.push(("FAKE_CUDA_DEVICES".into(), "2".into()));
        let mut cmd = mpirun_with(2, &env);
        cmd.args(["--threads", "1", "train", "--model", "cnn-bn", "--epochs", "2", "--batch-size", "8", "--no-report", "--device", device]);
        cmd.args(["--data", dir.join("data").to_str().unwrap(), "--out", out.to_str().unwrap()]);
        cmd.args(PLAIN_SGD).args(extra);
        (cmd.output().unwrap(), out)
    };
    let (cpu, on_cpu) = run("cpu", &[]);
    assert!(cpu.status.success(), "{}", text(&cpu));
    let (gpu, on_gpu) = run("cuda", &[]);
    let log = text(&gpu);
    if !gpu.status.success() && log.contains("libnvrtc.so.13") && !emulator::required() {
        eprintln!("skipped: no NVRTC");
        return;
    }
    assert!(gpu.status.success(), "{log}");
    assert!(log.contains("on cuda:0: Stride CPU emulator"), "{log}");
    assert!(log.contains("ranks on cuda:0, cuda:1"), "each rank on the GPU of its local rank: {log}");
    assert_eq!(log.matches("on cuda:0: ").count(), 1, "only rank 0 prints the header: {log}");
    let worst = max_difference(&on_cpu, &on_gpu);
    eprintln!("two ranks on two emulated GPUs against two on the CPU, after 2 epochs: {worst:e}");
    assert!(worst <= 1e-3, "the GPUs' weights differ from the CPU's by {worst:e}");
    // With synchronised batch norm too (composed on the GPU from its sums and an all-reduce).
    let (cpu, on_cpu) = run("cpu", &["--sync-bn"]);
    assert!(cpu.status.success(), "{}", text(&cpu));
    let (gpu, on_gpu) = run("cuda", &["--sync-bn"]);
    assert!(gpu.status.success(), "{}", text(&gpu));
    let worst = max_difference(&on_cpu, &on_gpu);
    eprintln!("the same with --sync-bn: {worst:e}");
    assert!(worst <= 1e-3, "with --sync-bn the GPUs' weights differ from the CPU's by {worst:e}");
    let _ = std::fs::remove_dir_all(dir);
}
