//! Stride's ONNX exports run in ONNX Runtime (an engine that is not Stride) give Stride's outputs
//! within 1e-4: every zoo model and the VAE's generator. The ONNX checker (full check, with
//! shape inference) must accept every file too.
//!
//! Needs `python3` with `onnx` and `onnxruntime` (`pip install onnx onnxruntime`). Without them
//! the test says so and passes, except under CI (`CI` set), where it fails: .ci/run installs them.

use std::path::Path;
use std::process::Command;

use prost::Message;
use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_models::{InputSpec, ZOO};
use stride_nn::{Ctx, Module};

fn have_ort() -> bool {
    Command::new("python3").args(["-c", "import onnx, onnxruntime"]).output().is_ok_and(|o| o.status.success())
}

/// Whether to skip for want of ONNX Runtime (saying so); under CI (`CI` set) its absence fails
/// instead: .ci/run installs it.
fn skip_without_ort() -> bool {
    if have_ort() {
        return false;
    }
    assert!(std::env::var_os("CI").is_none(), "CI needs python3 with onnx and onnxruntime (pip install onnx onnxruntime)");
    eprintln!("skipped: python3 with onnx and onnxruntime not found (pip install onnx onnxruntime)");
    true
}

fn write_pb(path: &Path, t: &Tensor<f32>) {
    std::fs::write(path, stride_onnx::to_tensor_proto("input", t).encode_to_vec()).unwrap();
}

#[test]
fn onnx_runtime_agrees_with_stride_on_every_export() {
    if skip_without_ort() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("stride-ort-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut expected = Vec::new();
    for e in ZOO {
        let s = InputSpec { classes: 10, ..e.input };
        let mut rng = Rng::seed(11);
        let mut model = stride_models::build(e.name, &mut rng, s).unwrap();
        let bytes = stride_onnx::export(&mut model, &[s.channels, s.height, s.width], stride_onnx::DEFAULT_OPSET).unwrap();
        let x: Tensor<f32> = rng.normal(&[2, s.channels, s.height, s.width], 0.0, 1.0).unwrap();
        let y = no_grad(|| model.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap().value();
        std::fs::write(dir.join(format!("{}.onnx", e.name)), bytes).unwrap();
        write_pb(&dir.join(format!("{}.input.pb", e.name)), &x);
        expected.push((e.name.to_string(), y));
    }
    {
        let mut rng = Rng::seed(12);
        let mut vae = stride_models::vae::Vae::new(&mut rng).unwrap();
        let z: Tensor<f32> = rng.normal(&[2, stride_models::vae::LATENT], 0.0, 1.0).unwrap();
        let bytes =
            stride_onnx::export_with(Tensor::zeros(&[1, stride_models::vae::LATENT]).unwrap(), 17, |g, x| vae.export_generator(g, x)).unwrap();
        let y = no_grad(|| vae.generate(&Var::constant(z.clone()), &mut Ctx::eval())).unwrap().value();
        std::fs::write(dir.join("vae_generator.onnx"), bytes).unwrap();
        write_pb(&dir.join("vae_generator.input.pb"), &z);
        expected.push(("vae_generator".into(), y));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/onnx/ort_run.py");
    let out = Command::new("python3").arg(&script).arg(&dir).output().unwrap();
    assert!(out.status.success(), "ort_run.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
    for (name, want) in expected {
        let bytes = std::fs::read(dir.join(format!("{name}.ort.pb"))).unwrap();
        let have = stride_onnx::from_tensor_proto(&stride_onnx::proto::TensorProto::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(have.shape(), want.shape(), "{name}: output shapes");
        let worst = have.data().iter().zip(want.data()).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0f32, f32::max);
        assert!(worst <= 1e-4, "{name}: ONNX Runtime differs from Stride by {worst:e} (relative)");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn onnx_runtime_reads_the_metadata_an_export_records() {
    if skip_without_ort() {
        return;
    }
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 3 };
    let mut model = stride_models::build("cnn", &mut Rng::seed(0), spec).unwrap();
    let metadata = [("input_mean", "0.5"), ("input_std", "0.25"), ("class_names", "cat\ndog\nbird")].map(|(k, v)| (k.to_string(), v.to_string()));
    let bytes = stride_onnx::export_annotated(&mut model, &[1, 28, 28], stride_onnx::DEFAULT_OPSET, &metadata).unwrap();
    let path = std::env::temp_dir().join(format!("stride-ort-meta-{}.onnx", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let script = "import json, sys, onnxruntime as ort\n\
                  m = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']).get_modelmeta()\n\
                  print(json.dumps(m.custom_metadata_map, sort_keys=True))";
    let out = Command::new("python3").args(["-c", script]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: std::collections::BTreeMap<String, String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen, metadata.iter().cloned().collect());
    // Stride reads back what ONNX Runtime sees, without building the graph, and on import.
    assert_eq!(stride_onnx::read_metadata(&path).unwrap(), metadata.iter().cloned().collect());
    assert_eq!(stride_onnx::import(&stride_onnx::read(&path).unwrap()).unwrap().metadata, metadata.iter().cloned().collect());
    std::fs::remove_file(&path).ok();
}
