//! Weights kept beside the model (ONNX's external data, PyTorch's default since 2.6): read in by
//! `stride_onnx::read`, and every way a file can point outside itself or its data refused.

use std::path::{Path, PathBuf};

use stride_autograd::{no_grad, Conv2dOptions, Rng, Tensor, Var};
use stride_nn::layers::{Activation, Conv2d, Flatten, Linear, Sequential};
use stride_nn::{Ctx, Module};
use stride_onnx::proto::StringStringEntryProto;
use stride_onnx::ToOnnx;

fn folder(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stride-external-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn net() -> Sequential {
    let mut rng = Rng::seed(3);
    Sequential::new()
        .push(Conv2d::new(&mut rng, 1, 4, 3, Conv2dOptions::default(), true).unwrap())
        .push(Activation(stride_autograd::Unary::Relu))
        .push(Flatten)
        .push(Linear::new(&mut rng, 4 * 6 * 6, 3, true).unwrap())
}

fn run(net: &mut dyn Module, x: &Tensor<f32>) -> Tensor<f32> {
    no_grad(|| net.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap().value()
}

/// Writes `net` as `model.onnx` in `dir` with every initializer's bytes moved, one after the
/// other, into `weights.bin` (at `offset` bytes in); `edit` may then change any entry.
fn write_external(dir: &Path, offset: usize, edit: impl Fn(&mut Vec<StringStringEntryProto>)) -> PathBuf {
    let bytes = net().to_onnx(&[1, 8, 8], 17).unwrap();
    let mut model = stride_onnx::decode(&bytes).unwrap();
    let mut blob = vec![7u8; offset];
    for t in &mut model.graph.as_mut().unwrap().initializer {
        let raw = t.raw_data.take().unwrap();
        let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.external_data =
            vec![entry("location", "weights.bin".into()), entry("offset", blob.len().to_string()), entry("length", raw.len().to_string())];
        edit(&mut t.external_data);
        t.data_location = Some(1);
        blob.extend_from_slice(&raw);
    }
    std::fs::write(dir.join("weights.bin"), &blob).unwrap();
    let path = dir.join("model.onnx");
    std::fs::write(&path, stride_onnx::encode(&model)).unwrap();
    path
}

fn import_error(path: &Path) -> String {
    match stride_onnx::read(path).and_then(|m| stride_onnx::import(&m)) {
        Ok(_) => panic!("{} was imported", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn weights_beside_the_model_are_read_in() {
    let dir = folder("ok");
    let path = write_external(&dir, 5, |_| {});
    let x = Tensor::from_vec((0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect(), &[2, 1, 8, 8]).unwrap();
    let mut imported = stride_onnx::import(&stride_onnx::read(&path).unwrap()).unwrap().network;
    assert_eq!(run(&mut imported, &x).data(), run(&mut net(), &x).data());
    // Bytes in memory have no folder to look in: the error says how to read the file.
    let e = stride_onnx::import(&stride_onnx::decode(&std::fs::read(&path).unwrap()).unwrap()).err().unwrap().to_string();
    assert!(e.contains("external file") && e.contains("stride_onnx::read"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn external_data_outside_the_folder_or_the_file_is_refused() {
    let set = |key: &'static str, value: &'static str| {
        move |es: &mut Vec<StringStringEntryProto>| {
            for e in es.iter_mut().filter(|e| e.key.as_deref() == Some(key)) {
                e.value = Some(value.into());
            }
        }
    };
    for (what, edit, want) in [
        (
            "up",
            Box::new(set("location", "../weights.bin")) as Box<dyn Fn(&mut Vec<StringStringEntryProto>)>,
            "must be a file name inside the model's folder",
        ),
        ("absolute", Box::new(set("location", "/etc/passwd")), "must be a file name inside the model's folder"),
        ("missing", Box::new(set("location", "other.bin")), "other.bin"),
        ("past the end", Box::new(set("offset", "1000000")), "which has"),
        ("too long", Box::new(set("length", "99999999999999")), "which has"),
        ("not a number", Box::new(set("offset", "-4")), "is not a byte count"),
        ("no location", Box::new(|es: &mut Vec<StringStringEntryProto>| es.retain(|e| e.key.as_deref() != Some("location"))), "without a location"),
        ("wrong length", Box::new(set("length", "8")), "holds 2"),
    ] {
        let dir = folder(&what.replace(' ', "-"));
        let e = import_error(&write_external(&dir, 0, edit));
        assert!(e.contains(want), "{what}: {e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
