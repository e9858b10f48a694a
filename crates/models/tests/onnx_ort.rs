//! Stride's ONNX exports run in ONNX Runtime (an engine that is not Stride) give Stride's outputs
//! within 1e-4: every zoo model, the VAE's generator and layers no zoo model has. The ONNX checker (full check, with
//! shape inference) must accept every file too.
//!
//! Needs `python3` with `onnx` and `onnxruntime` (`pip install onnx onnxruntime`). Without them
//! the test says so and passes, except under CI (`CI` set), where it fails: .ci/run installs them.

use std::path::Path;
use std::process::Command;

use prost::Message;
use stride_autograd::{no_grad, Conv2dOptions, Rng, Tensor, Unary, Var};
use stride_models::{InputSpec, ZOO};
use stride_nn::layers::{Activation, Conv2d, Flatten, LayerNorm, Linear, Sequential};
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
    // Layers no zoo model has, in the forms they export to: GELU before opset 20 (through Erf),
    // layer norm over [C, H, W], a dense layer on the last axis of a 4-d value (MatMul and Add),
    // and HardSwish before opset 14 (through HardSigmoid).
    for (name, opset) in [("gelu_layernorm_linear4d", 17), ("hardswish_opset13", 13)] {
        let mut rng = Rng::seed(13);
        let conv = Conv2d::new(&mut rng, 3, 4, 3, Conv2dOptions::default(), true).unwrap();
        let mut model = Sequential::new().push(conv);
        model = if opset == 17 {
            let mut norm = LayerNorm::new(&[4, 6, 6], 1e-5).unwrap();
            norm.weight = Var::parameter(rng.normal(&[4, 6, 6], 1.0, 0.3).unwrap());
            norm.bias = Some(Var::parameter(rng.normal(&[4, 6, 6], 0.0, 0.3).unwrap()));
            model.push(Activation(Unary::Gelu)).push(norm).push(Linear::new(&mut rng, 6, 5, true).unwrap())
        } else {
            model.push(Activation(Unary::HardSwish))
        };
        let mut model = model.push(Flatten);
        let x: Tensor<f32> = rng.normal(&[2, 3, 8, 8], 0.0, 1.0).unwrap();
        let y = no_grad(|| model.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap().value();
        let bytes = stride_onnx::export(&mut model, &[3, 8, 8], opset).unwrap();
        // Stride reads its own file back: the same outputs, the same state_dict names.
        let mut back = stride_onnx::import(&stride_onnx::decode(&bytes).unwrap()).unwrap().network;
        let again = no_grad(|| back.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap().value();
        assert!(again.data().iter().zip(y.data()).all(|(a, b)| (a - b).abs() <= 1e-5), "{name}: Stride's import differs");
        let names = |m: &mut dyn Module| -> Vec<String> {
            let mut v = Vec::new();
            m.visit("", &mut |n, _| v.push(n));
            v.sort();
            v
        };
        assert_eq!(names(&mut back), names(&mut model), "{name}");
        std::fs::write(dir.join(format!("{name}.onnx")), bytes).unwrap();
        write_pb(&dir.join(format!("{name}.input.pb")), &x);
        expected.push((name.to_string(), y));
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
