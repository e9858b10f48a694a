//! `--device` and `stride devices` on a machine without a GPU (CI's): the flag parses, a GPU
//! that is not there is a one-line error naming the missing driver, and commands that do not
//! take a device say so.

use std::process::{Command, Output};

fn stride(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stride")).args(args).env("RAYON_NUM_THREADS", "2").output().expect("the binary runs")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn has_gpu() -> bool {
    stride_cuda::probe().is_ok_and(|g| !g.is_empty())
}

#[test]
fn devices_lists_the_cpu_and_what_it_found_of_cuda() {
    let o = stride(&["devices"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("cpu: 2 worker threads\n"), "{out}");
    assert!(out.contains("cuda:"), "{out}");
    if !has_gpu() {
        assert!(out.contains("cuda: none (--device cuda: no CUDA driver found (libcuda.so.1)"), "{out}");
        let o = stride(&["devices", "--check"]);
        assert!(!o.status.success());
        assert_eq!(text(&o).1, "error: --check needs a GPU, and none was found\n");
    }
}

#[test]
fn a_missing_gpu_is_one_clear_error_for_every_command_that_takes_a_device() {
    if has_gpu() {
        return;
    }
    for args in [
        &["train", "--device", "cuda", "--epochs", "1"][..],
        &["--device", "cuda:0", "eval"],
        &["vae", "--device", "cuda"],
        &["bench", "--bench", "lenet", "--device", "cuda"],
        &["summary", "cnn", "--device", "cuda"],
    ] {
        let o = stride(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let (out, err) = text(&o);
        assert!(out.is_empty(), "{args:?} printed {out}");
        assert_eq!(err, "error: --device cuda: no CUDA driver found (libcuda.so.1); is an NVIDIA driver installed?\n", "{args:?}");
    }
}

#[test]
fn bad_device_names_and_commands_without_a_device_are_refused() {
    let o = stride(&["train", "--device", "tpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("expected cpu, cuda or cuda:N, got \"tpu\""), "{}", text(&o).1);
    let o = stride(&["models", "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(text(&o).1, "error: --device: applies to train, eval, run, predict, vae, bench, summary and devices\n");
    // The CPU is the default and may be named.
    let o = stride(&["--device", "cpu", "models"]);
    assert!(o.status.success(), "{}", text(&o).1);
}
