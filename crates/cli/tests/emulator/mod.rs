//! The CUDA emulator (`crates/cuda/emulator`) built for the tests that run `stride` on it
//! (emulated_gpu.rs, and mpi.rs for ranks on GPUs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EMULATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../cuda/emulator");
pub const CUDA_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../cuda/src");

pub fn required() -> bool {
    std::env::var_os("STRIDE_REQUIRE_NVRTC").is_some()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The emulator built from `kernels` (kernels.cu's text) by `build.sh`: libcuda.so, with
/// libcublas.so a link to it, so both are one library with one set of allocations. Kept in the
/// target folder under a hash of its sources: built once for every test and process that needs it.
/// `None` when there is no C++ compiler (and it is not required).
pub fn emulator_of(kernels: &str) -> Option<Emulator> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let sources = ["fake_cuda.cpp", "fake_cudnn.cpp", "cuda_host.h", "build.sh"].map(|f| std::fs::read_to_string(format!("{EMULATOR}/{f}")).unwrap());
    let asan = asan_runtime();
    (kernels, &sources, &asan).hash(&mut h);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda-emulator-{:016x}", h.finish()));
    let built = Emulator { dir: dir.clone(), asan: asan.clone() };
    if dir.join("libcuda.so").exists() {
        return Some(built);
    }
    if Command::new(cxx()).arg("--version").output().is_err() {
        assert!(!required(), "the CUDA emulator needs a C++20 compiler (c++ or $CXX)");
        eprintln!("skipped: no C++ compiler");
        return None;
    }
    // Built aside and moved into place whole: tests in other processes may be building it too.
    let partial = dir.with_extension(format!("partial-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::create_dir_all(&partial).unwrap();
    let source = partial.join("source.cu");
    std::fs::write(&source, kernels).unwrap();
    let out = Command::new("bash")
        .arg(format!("{EMULATOR}/build.sh"))
        .arg(&partial)
        .arg(&source)
        .args(asan.as_ref().map(|_| "--asan"))
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "building the CUDA emulator failed:\n{}", text(&out));
    if std::fs::rename(&partial, &dir).is_err() {
        // Another test got there first with the same sources.
        let _ = std::fs::remove_dir_all(&partial);
    }
    assert!(dir.join("libcuda.so").exists(), "the emulator at {}", dir.display());
    Some(built)
}

/// A built emulator: its folder, and AddressSanitizer's runtime when it was built with it (the
/// runtime is then preloaded into `stride`, which is not built with it).
pub struct Emulator {
    pub dir: PathBuf,
    pub asan: Option<PathBuf>,
}

impl Emulator {
    /// The environment a `stride` process needs to find the emulator before any real CUDA
    /// (LD_LIBRARY_PATH), with AddressSanitizer's runtime preloaded when it was built with it.
    pub fn env(&self) -> Vec<(String, String)> {
        let lib = self.dir.display().to_string();
        let path = match std::env::var("LD_LIBRARY_PATH") {
            Ok(p) if !p.is_empty() => format!("{lib}:{p}"),
            _ => lib,
        };
        let mut env = vec![("LD_LIBRARY_PATH".to_string(), path)];
        if let Some(asan) = &self.asan {
            // Leaks are not what this checks (the binary keeps its statics to the end).
            env.push(("LD_PRELOAD".into(), asan.display().to_string()));
            env.push(("ASAN_OPTIONS".into(), "detect_leaks=0".into()));
        }
        env
    }
}

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// AddressSanitizer's runtime library as the compiler names it, if it has one.
fn asan_runtime() -> Option<PathBuf> {
    let out = Command::new(cxx()).arg("-print-file-name=libasan.so").output().ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (path.is_absolute() && path.exists()).then_some(path)
}

/// The emulator built from the backend's own kernels.cu.
pub fn emulator() -> Option<Emulator> {
    emulator_of(&std::fs::read_to_string(format!("{CUDA_SRC}/kernels.cu")).unwrap())
}
