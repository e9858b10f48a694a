//! Weights move between torchvision and Stride: the same names, shapes and layout, and the
//! same eval-mode outputs (fixtures and the script that made them in `fixtures/`).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_models::InputSpec;
use stride_nn::{Ctx, Module};
use stride_train::checkpoint;

fn refs() -> Value {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torchvision_refs.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The script's `uniform`: an integer hash of (tensor index, element index) mapped to [0, 1).
fn uniform(t: u64, n: usize) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let h = (i * 2_654_435_761 + t * 40_503 + 12_345) % (1 << 32);
            let h = ((h ^ (h >> 13)) * 1_274_126_177) % (1 << 32);
            h as f64 / (1u64 << 32) as f64
        })
        .collect()
}

/// The script's `formula`, rule for rule.
fn formula(t: usize, name: &str, shape: &[usize]) -> Tensor<f32> {
    let n = shape.iter().product();
    let u = uniform(t as u64, n);
    let v: Vec<f64> = if name.ends_with("num_batches_tracked") {
        vec![0.0; n]
    } else if name.ends_with("running_var") {
        u.iter().map(|u| 0.5 + u).collect()
    } else if name.ends_with("running_mean") || name.ends_with("bias") {
        u.iter().map(|u| 0.2 * (u - 0.5)).collect()
    } else if shape.len() == 1 {
        u.iter().map(|u| 1.0 + 0.4 * (u - 0.5)).collect()
    } else {
        let fan_in: usize = shape[1..].iter().product();
        u.iter().map(|u| (u - 0.5) * 2.0 * (3.0 / fan_in as f64).sqrt()).collect()
    };
    Tensor::from_vec(v.into_iter().map(|x| x as f32).collect(), shape).unwrap()
}

fn input(channels: usize, side: usize) -> Tensor<f32> {
    let u = uniform(999_999, 2 * channels * side * side);
    Tensor::from_vec(u.iter().map(|u| (2.0 * u - 1.0) as f32).collect(), &[2, channels, side, side]).unwrap()
}

fn torch_state_dict(m: &Value) -> Vec<(String, Vec<usize>)> {
    m["state_dict"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// max |a - b| / max |b|
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("stride-tv-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn names_and_shapes_are_torchvisions_in_order() {
    let r = refs();
    let classes = r["classes"].as_u64().unwrap() as usize;
    for (name, m) in r["models"].as_object().unwrap() {
        let spec = InputSpec { channels: 3, height: 64, width: 64, classes };
        let mut model = (stride_models::entry(name).unwrap().build)(&mut Rng::seed(0), spec).unwrap();
        let ours: Vec<(String, Vec<usize>)> = checkpoint::state_dict(&mut model).into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
        assert_eq!(ours, torch_state_dict(m), "{name}");
    }
}

#[test]
fn torchvision_weights_give_torchvisions_outputs() {
    let r = refs();
    let (classes, side) = (r["classes"].as_u64().unwrap() as usize, r["side"].as_u64().unwrap() as usize);
    let dir = tmp("outputs");
    let export = std::env::var_os("STRIDE_EXPORT_DIR");
    for (name, m) in r["models"].as_object().unwrap() {
        let Some(want) = m.get("output") else { continue };
        // The weights a torchvision user would save, written as a safetensors file (int64
        // num_batches_tracked included), then loaded the way `--weights` loads them.
        let weights: Vec<(String, Tensor<f32>)> = torch_state_dict(m).iter().enumerate().map(|(t, (n, s))| (n.clone(), formula(t, n, s))).collect();
        let file = dir.join(format!("{name}.safetensors"));
        checkpoint::save(&file, &weights).unwrap();
        let mut model = stride_models::build(name, &mut Rng::seed(3), InputSpec { channels: 3, height: side, width: side, classes }).unwrap();
        checkpoint::load_into(&mut model, &checkpoint::load(&file).unwrap()).unwrap();
        let y = no_grad(|| model.forward(&Var::constant(input(3, side)), &mut Ctx::eval())).unwrap().value();
        let err = rel_err(y.data(), &floats(want));
        eprintln!("{name}: max |stride - torch| / max |torch| = {err:.2e}");
        assert!(err < 1e-4, "{name}: relative error {err}");
        if let Some(d) = &export {
            // For `make_torchvision_refs.py --check`: Stride's own file, loaded into torchvision.
            let mut out = checkpoint::state_dict(&mut model);
            out.push(("stride_output".into(), y.clone()));
            checkpoint::save(&Path::new(d).join(format!("{name}.safetensors")), &out).unwrap();
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_file_pytorch_wrote_loads_and_agrees() {
    let r = refs();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lenet5_torch.safetensors");
    let (tensors, meta) = checkpoint::load_with_metadata(&path).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    let mut model = stride_models::build("lenet5", &mut Rng::seed(0), InputSpec { channels: 1, height: 28, width: 28, classes: 10 }).unwrap();
    checkpoint::load_into(&mut model, &tensors).unwrap();
    let y = no_grad(|| model.forward(&Var::constant(input(1, 28)), &mut Ctx::eval())).unwrap().value();
    assert!(rel_err(y.data(), &floats(&r["lenet5_output"])) < 1e-5);
}

#[test]
fn wrong_weights_are_reported_all_at_once() {
    let r = refs();
    let m = &r["models"]["resnet18"];
    let mut t: HashMap<String, Tensor<f32>> = torch_state_dict(m).iter().enumerate().map(|(i, (n, s))| (n.clone(), formula(i, n, s))).collect();
    t.remove("layer1.0.bn1.running_var");
    t.insert("fc.weight".into(), Tensor::zeros(&[5, 512]).unwrap());
    t.insert("fc.extra".into(), Tensor::zeros(&[1]).unwrap());
    let mut model = stride_models::build("resnet18", &mut Rng::seed(0), InputSpec { channels: 3, height: 32, width: 32, classes: 10 }).unwrap();
    let before = checkpoint::state_dict(&mut model);
    let e = checkpoint::load_into(&mut model, &t).unwrap_err().to_string();
    for part in [
        "(1 of its 122 tensors missing, 1 mis-shaped, 1 of the file's 122 unexpected)",
        "missing 'layer1.0.bn1.running_var' [64]",
        "'fc.weight' has shape [5, 512], the model needs [10, 512]",
        "unexpected 'fc.extra'",
    ] {
        assert!(e.contains(part), "{e}");
    }
    // Another model's weights: the counts, the first six of each kind and how many more, in a
    // line rather than 240 entries.
    let other = stride_models::build("resnet34", &mut Rng::seed(0), InputSpec { channels: 3, height: 32, width: 32, classes: 10 }).unwrap();
    let mut tutorial = stride_models::build("cnn", &mut Rng::seed(0), InputSpec { channels: 1, height: 28, width: 28, classes: 10 }).unwrap();
    let mut other = other;
    let e = checkpoint::load_into(&mut tutorial, &checkpoint::state_dict(&mut other).into_iter().collect()).unwrap_err().to_string();
    assert!(e.contains("(8 of its 8 tensors missing, 0 mis-shaped, 218 of the file's 218 unexpected; no name is the model's"), "{e}");
    assert!(e.contains("... and 2 more missing") && e.contains("... and 212 more unexpected") && e.len() < 1000, "{e}");
    // Nothing was changed.
    let after = checkpoint::state_dict(&mut model);
    assert!(before.iter().zip(&after).all(|(a, b)| a.1.data() == b.1.data()));
}
