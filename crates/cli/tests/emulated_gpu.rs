//! The CUDA backend end to end without a GPU: `crates/cuda/emulator` is a CUDA driver, cuBLAS
//! and the part of cuDNN that Stride calls, run on the CPU (kernels.cu compiled for the host
//! with `c++`), and `stride` finds them before any real ones through LD_LIBRARY_PATH. cudarc,
//! NVRTC (the real one) and every line of the backend run as they do on a GPU, so `stride
//! devices --check` compares each kernel, launch, cuBLAS and cuDNN call with the CPU engine here.
//! What only a GPU shows (races between threads, the real cuDNN, speed) still needs
//! `scripts/gpu-check.sh`.
//!
//! Where the compiler has AddressSanitizer the emulator is built with it, so a kernel that reads
//! or writes past its buffers (allocations are plain heap memory here) stops with a report.
//!
//! Needs a C++20 compiler and libnvrtc.so.13 on LD_LIBRARY_PATH (CI has both); without them the
//! tests are skipped, unless STRIDE_REQUIRE_NVRTC is set (CI), where that is a failure.
#![cfg(target_os = "linux")]

mod common;
mod emulator;

use std::path::Path;
use std::process::{Command, Output};

use emulator::{emulator, emulator_of, required, Emulator, CUDA_SRC};

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `stride args` with the emulator found first, `cudnn` as `--cudnn` (`None`: convolutions
/// through columns) and `env` set; `None` (skipped) when NVRTC is missing and not required.
fn on_emulator_with(emu: &Emulator, args: &[&str], cudnn: Option<&str>, env: &[(&str, &str)]) -> Option<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stride"));
    cmd.args(args).envs(emu.env()).env("RAYON_NUM_THREADS", "2");
    if let Some(mode) = cudnn {
        cmd.args(["--cudnn", mode]);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("the binary runs");
    if !out.status.success() && text(&out).contains("libnvrtc.so.13") && !required() {
        eprintln!("skipped: {}", String::from_utf8_lossy(&out.stderr).trim());
        return None;
    }
    Some(out)
}

fn on_emulator(emu: &Emulator, args: &[&str], cudnn: Option<&str>) -> Option<Output> {
    on_emulator_with(emu, args, cudnn, &[])
}

#[test]
fn every_primitive_agrees_with_the_cpu_on_the_emulated_gpu() {
    let Some(lib) = emulator() else { return };
    // Convolutions through columns, then on (emulated) cuDNN with batch norm and pooling.
    for (cudnn, route) in [(None, "convolution: columns and cuBLAS"), (Some("fp32"), "convolution: cuDNN 9.13.0 (FP32)")] {
        let Some(out) = on_emulator(&lib, &["devices", "--check"], cudnn) else { return };
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(log.contains("cuda:0: Stride CPU emulator"), "the emulator, not a GPU: {log}");
        assert!(log.contains(route), "{route}: {log}");
        assert!(log.contains("every primitive agrees with the CPU within 1e-4"), "{log}");
        for case in ["lp_pool2d", "channel_max_pool", "rmsprop_update", "4x4 same (VAE)", "3x3 depthwise same"] {
            assert!(log.contains(case), "{case} is among the cases: {log}");
        }
    }
}

#[test]
fn a_faulty_kernel_fails_the_check() {
    // The check is only as good as its power to fail: a sign dropped from Lp pooling's gradient
    // (in the emulator's copy of the kernels only; NVRTC still compiles the right ones).
    let kernels = std::fs::read_to_string(format!("{CUDA_SRC}/kernels.cu")).unwrap();
    let slip = "scale * copysignf(1.0f, v) *";
    assert!(kernels.contains(slip), "lp_pool_bwd's sign, which this test removes, has moved");
    let Some(lib) = emulator_of(&kernels.replace(slip, "scale *")) else { return };
    let Some(out) = on_emulator(&lib, &["devices", "--check"], None) else { return };
    let log = text(&out);
    assert!(!out.status.success(), "a wrong gradient passed: {log}");
    assert!(log.contains("lp_pool2d") && log.contains("backward"), "the error names the primitive: {log}");
}

/// metrics.csv's rows: epoch, train loss, train accuracy, test loss, test accuracy, ...
fn metrics(run: &Path) -> Vec<Vec<f64>> {
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    csv.lines().skip(1).map(|l| l.split(',').take(5).map(|v| v.parse().unwrap()).collect()).collect()
}

#[test]
fn training_on_the_emulated_gpu_follows_the_cpu() {
    let Some(lib) = emulator() else { return };
    let dir = common::Scratch::new("stride-emulated", "train");
    common::shapes(&dir.join("data"));
    let data = dir.join("data");
    // `optimizer`: SGD moves by the gradient's size (AdamW, the model's default, would hardly
    // see every gradient scaled, by a wrong seed for instance).
    let run = |device: &str, cudnn: Option<&str>, optimizer: Option<&str>| {
        let out_dir = dir.join(format!("{device}-{}-{}", cudnn.unwrap_or("columns"), optimizer.unwrap_or("default")));
        let mut args = vec!["train", "--model", "cnn-bn", "--data", data.to_str().unwrap(), "--epochs", "2", "--batch-size", "8", "--no-report"];
        args.extend(["--device", device, "--out", out_dir.to_str().unwrap()]);
        args.extend(optimizer.map(|o| ["--optimizer", o]).into_iter().flatten());
        // With SGD the epochs are also evaluated with the weights' moving average, which the
        // device folds in with its element-wise kernels.
        if optimizer == Some("sgd") {
            args.extend(["--ema", "0.9"]);
        }
        let out = on_emulator(&lib, &args, cudnn)?;
        assert!(out.status.success(), "training on {device}: {}", text(&out));
        if device == "cuda" {
            // On the route asked for (cuDNN that does not start falls back to columns).
            let route = if cudnn.is_some() { "convolution: cuDNN 9.13.0 (FP32)" } else { "convolution: columns" };
            assert!(text(&out).contains(route), "{route}: {}", text(&out));
        }
        Some(metrics(&out_dir))
    };
    // Same seed, same batches: the epochs' losses and accuracies agree but for rounding, with
    // convolutions through columns and on cuDNN (batch norm too; its running statistics are
    // what the test loss is computed with).
    for (cudnn, optimizer) in [(None, Some("sgd")), (Some("fp32"), None)] {
        let Some(cpu) = run("cpu", None, optimizer) else { return };
        assert_eq!(cpu.len(), 2);
        let Some(gpu) = run("cuda", cudnn, optimizer) else { return };
        for (c, g) in cpu.iter().zip(&gpu) {
            for (i, (a, b)) in c.iter().zip(g).enumerate().skip(1) {
                assert!(
                    (a - b).abs() <= 1e-3 * a.abs().max(1.0),
                    "{cudnn:?}, {optimizer:?}: column {i} of epoch {}: cpu {a}, cuda {b} ({cpu:?} / {gpu:?})",
                    c[0]
                );
            }
        }
    }
    // The CPU-trained model predicts the same on the emulated GPU (evaluation mode: batch norm's
    // running statistics, softmax), to the four decimals printed.
    let weights = dir.join("cpu-columns-default/model.safetensors");
    let images = [data.join("square/05.png"), data.join("circle/07.png")];
    let predict = |device: &str| {
        let mut args = vec!["predict", "--model", "cnn-bn", "--weights", weights.to_str().unwrap(), "--device", device];
        args.extend(images.iter().map(|p| p.to_str().unwrap()));
        let out = on_emulator(&lib, &args, Some("fp32")).unwrap();
        assert!(out.status.success(), "predict on {device}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let on_cpu = predict("cpu");
    assert_eq!(on_cpu.lines().count(), 2, "{on_cpu}");
    assert_eq!(predict("cuda"), on_cpu);
    // And with test-time augmentation, evaluated on the device.
    let eval = |device: &str| {
        let args =
            ["eval", "--model", "cnn-bn", "--weights", weights.to_str().unwrap(), "--data", data.to_str().unwrap(), "--tta", "--device", device];
        let out = on_emulator(&lib, &args, Some("fp32")).unwrap();
        assert!(out.status.success(), "eval --tta on {device}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string()
    };
    assert_eq!(eval("cuda"), eval("cpu"));
}

#[test]
fn a_full_gpu_and_a_missing_one_are_clear_errors() {
    let Some(lib) = emulator() else { return };
    // 20 MB of device memory (FAKE_CUDA_MEMORY): the model fits, a batch of 4,096 does not; and
    // 100 kB, where the weights do not.
    for (memory, what) in [("20000000", "out of GPU memory allocating"), ("100000", "out of GPU memory copying to the device")] {
        let args = ["train", "--device", "cuda", "--epochs", "1", "--batch-size", "4096", "--no-report", "--out"];
        let dir = std::env::temp_dir().join(format!("stride-emulated-oom-{}-{memory}", std::process::id()));
        let Some(out) = on_emulator_with(&lib, &[&args[..], &[dir.to_str().unwrap()]].concat(), None, &[("FAKE_CUDA_MEMORY", memory)]) else {
            return;
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(err.contains(what) && err.contains("a smaller --batch-size"), "{memory} bytes: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
    let Some(out) = on_emulator(&lib, &["train", "--device", "cuda:1"], None) else { return };
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "error: --device: cuda:1 asked for, the driver sees 1 GPU(s)\n");
}

#[test]
fn every_gpu_the_driver_sees_is_checked() {
    let Some(lib) = emulator() else { return };
    // Two emulated GPUs (FAKE_CUDA_DEVICES): `devices --check` sets up a backend on each.
    let Some(out) = on_emulator_with(&lib, &["devices", "--check"], None, &[("FAKE_CUDA_DEVICES", "2")]) else { return };
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for gpu in ["cuda:0: Stride CPU emulator (8 GiB", "cuda:1: Stride CPU emulator (8 GiB"] {
        assert!(log.contains(gpu), "{gpu}: {log}");
    }
    assert_eq!(log.matches("rmsprop_update").count(), 2, "every case on both: {log}");
    let Some(out) = on_emulator_with(&lib, &["devices"], None, &[("FAKE_CUDA_DEVICES", "0")]) else { return };
    let log = text(&out);
    assert!(out.status.success() && log.contains("cpu: ") && !log.contains("cuda:0"), "no GPU listed: {log}");
}

/// What `FAKE_CUDA_COUNT` printed for `what`: a kind of work on its first line ("copies to the
/// device") or a kernel's launches on the lines after; 0 when it printed none.
fn counted(log: &str, what: &str) -> u64 {
    let mut lines = log.lines().filter_map(|l| l.strip_prefix("fake CUDA: "));
    let totals = lines.next().unwrap_or_else(|| panic!("no counts printed: {log}"));
    totals
        .split(", ")
        .chain(lines.map(str::trim_start))
        .filter_map(|part| part.split_once(' '))
        .find(|(_, name)| *name == what)
        .map_or(0, |(n, _)| n.parse().unwrap())
}

#[test]
fn a_training_step_uploads_only_its_labels() {
    let Some(lib) = emulator() else { return };
    // The work is checked and counted but not done (FAKE_CUDA_HOST_ONLY): only the counts
    // matter here. `--reps` 50 and 100 run 55 and 105 training steps and as many inference
    // passes of the tutorial CNN, whose bias adds broadcast and whose bias gradients reduce
    // (both kernels take shape tables); the 50 more steps may upload only their 50 label
    // vectors.
    let mut copies = Vec::new();
    for reps in ["50", "100"] {
        let env = [("FAKE_CUDA_COUNT", "1"), ("FAKE_CUDA_HOST_ONLY", "1")];
        let Some(out) = on_emulator_with(&lib, &["bench", "--device", "cuda", "--bench", "lenet", "--reps", reps], None, &env) else { return };
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        assert!(counted(&log, "binary_bcast") >= 100 && counted(&log, "reduce_sum") >= 100, "{log}");
        copies.push(counted(&log, "copies to the device"));
    }
    assert_eq!(copies[1] - copies[0], 50, "copies to the device with 55 and 105 steps: {copies:?}");
}
