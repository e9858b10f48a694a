//! Replays the fuzz corpora (`fuzz/seeds`, `fuzz/corpus`, `fuzz/regressions`) through the same
//! entry points the libFuzzer targets use: every input must come back (accepted or refused),
//! never panic. The valid seeds must be accepted, so a reader that refuses everything fails.

use std::path::{Path, PathBuf};

use stride_train::fuzzing;

fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz").join(kind).join(target);
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn valid_seeds_are_accepted() {
    // The ONNX seed is the tiny model exported now: a change to the writer that the reader
    // refuses fails here, and the kept seed must match what the exporter writes.
    let onnx = fuzzing::tiny_onnx();
    assert!(fuzzing::onnx_model(&onnx), "the exported tiny model imports and runs");
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/onnx_model/tiny.onnx");
    if std::env::var_os("STRIDE_BLESS").is_some() {
        std::fs::create_dir_all(seed.parent().unwrap()).unwrap();
        std::fs::write(&seed, &onnx).unwrap();
    }
    let kept = std::fs::read(&seed).unwrap();
    assert!(kept == onnx, "fuzz/seeds/onnx_model/tiny.onnx differs from the tiny model's export (STRIDE_BLESS=1 rewrites it)");
    for (target, run) in fuzzing::TARGETS {
        let seeds = files("seeds", target);
        assert!(!seeds.is_empty(), "no seeds for {target}");
        for s in seeds {
            assert!(run(&std::fs::read(&s).unwrap()), "{target}: the valid seed {} was refused", s.display());
        }
    }
    let ckpt = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/checkpoint/checkpoint.safetensors")).unwrap();
    assert!(fuzzing::restores(&ckpt), "the checkpoint seed restores");
    // A label file with a stray label (200 beside 0) is refused, not read as 201 classes.
    let stray = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/idx/pair-stray-label-200.bin")).unwrap();
    assert!(!fuzzing::idx(&stray), "the stray label was accepted");
    let mut fixed = stray.clone();
    *fixed.last_mut().unwrap() = 1;
    assert!(fuzzing::idx(&fixed), "labels 0 and 1 are accepted");
    // One byte less anywhere in the header must be refused, not trusted.
    assert!(!fuzzing::restores(&ckpt[..ckpt.len() - 1]));
}

#[test]
fn every_kept_input_returns() {
    let mut n = 0;
    for (target, run) in fuzzing::TARGETS {
        for kind in ["seeds", "corpus", "regressions"] {
            for f in files(kind, target) {
                let data = std::fs::read(&f).unwrap();
                // Truncations of each input too: the readers must refuse partial files cleanly.
                for cut in [data.len(), data.len() / 2, data.len().min(16)] {
                    let _ = run(&data[..cut]);
                    n += 1;
                }
            }
        }
    }
    eprintln!("{n} inputs replayed");
}
