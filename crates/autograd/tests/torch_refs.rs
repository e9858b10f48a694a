//! Stride against values made by PyTorch (tests/fixtures/make_torch_refs.py), in f64 and f32.

mod common;

use common::assert_close;
use serde_json::Value;
use stride_autograd::*;
use stride_kernels::conv::ConvGeom;
use stride_kernels::pool::PoolGeom;

fn refs() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch_refs.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tensor(v: &Value) -> Tensor<f64> {
    let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let data: Vec<f64> = v["data"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap()).collect();
    Tensor::from_vec(data, &shape).unwrap()
}

fn pair(v: &Value) -> (usize, usize) {
    (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize)
}

/// Runs `f` on the case's inputs (in the listed order), checks the output and each input's
/// gradient of sum(output * upstream), in f64 (tight) and in f32 (loose).
fn check_case(case: &Value, names: &[&str], f: impl Fn(&[Var<f64>]) -> Result<Var<f64>>, f32f: impl Fn(&[Var<f32>]) -> Result<Var<f32>>) {
    let inputs: Vec<Tensor<f64>> = names.iter().map(|n| tensor(&case["inputs"][n])).collect();
    let vars: Vec<Var<f64>> = inputs.iter().map(|t| Var::parameter(t.clone())).collect();
    let out = f(&vars).unwrap();
    let want = tensor(&case["output"]);
    assert_eq!(out.shape(), want.shape(), "output shape");
    assert_close(out.value().data(), want.data(), 1e-10, "output");
    let up = tensor(&case["upstream"]);
    out.backward_with(up.clone()).unwrap();
    for (n, v) in names.iter().zip(&vars) {
        assert_close(v.grad().unwrap().data(), tensor(&case["grads"][n]).data(), 1e-10, &format!("grad {n}"));
    }
    // The same in f32, as users run it.
    let vars32: Vec<Var<f32>> = inputs.iter().map(|t| Var::parameter(t.cast())).collect();
    let out32 = f32f(&vars32).unwrap();
    let got: Vec<f64> = out32.value().data().iter().map(|&v| v as f64).collect();
    assert_close(&got, want.data(), 1e-4, "f32 output");
    out32.backward_with(up.cast()).unwrap();
    for (n, v) in names.iter().zip(&vars32) {
        let g: Vec<f64> = v.grad().unwrap().data().iter().map(|&v| v as f64).collect();
        assert_close(&g, tensor(&case["grads"][n]).data(), 1e-3, &format!("f32 grad {n}"));
    }
}

macro_rules! both {
    ($case:expr, $names:expr, |$v:ident| $body:expr) => {
        check_case($case, $names, |$v: &[Var<f64>]| $body, |$v: &[Var<f32>]| $body)
    };
}

#[test]
fn conv2d_grouped_dilated_strided() {
    let r = refs();
    let c = &r["cases"]["conv2d_grouped_dilated_strided"];
    let p = &c["params"];
    let (ph, pw) = pair(&p["padding"]);
    let o =
        Conv2dOptions { stride: pair(&p["stride"]), dilation: pair(&p["dilation"]), padding: Padding::hw(ph, pw), groups: 2, output_padding: (0, 0) };
    both!(c, &["x", "w", "b"], |v| conv2d(&v[0], &v[1], Some(&v[2]), &o));
}

#[test]
fn conv2d_same_with_even_kernel_pads_bottom_right() {
    let r = refs();
    let c = &r["cases"]["conv2d_same_even_kernel"];
    let o = Conv2dOptions::default().padding(Padding::Same);
    both!(c, &["x", "w", "b"], |v| conv2d(&v[0], &v[1], Some(&v[2]), &o));
}

#[test]
fn conv_transpose2d_with_output_padding() {
    let r = refs();
    let c = &r["cases"]["conv_transpose2d_output_padding"];
    let o = Conv2dOptions::default().stride(2).padding(Padding::uniform(1)).output_padding(1).groups(2);
    both!(c, &["x", "w", "b"], |v| conv_transpose2d(&v[0], &v[1], Some(&v[2]), &o));
}

#[test]
fn conv_transpose2d_dilated_strided() {
    let r = refs();
    let c = &r["cases"]["conv_transpose2d_dilated_strided"];
    let o = Conv2dOptions { stride: (3, 2), padding: Padding::hw(0, 1), output_padding: (1, 0), dilation: (2, 1), groups: 1 };
    both!(c, &["x", "w"], |v| conv_transpose2d(&v[0], &v[1], None, &o));
}

#[test]
fn pooling_with_padding_and_ceil_mode() {
    let r = refs();
    let o = Pool2dOptions::new(3).stride(2).padding(Padding::uniform(1)).ceil_mode(true);
    both!(&r["cases"]["max_pool2d_padding_ceil"], &["x"], |v| { max_pool2d(&v[0], &o) });
    for cip in [true, false] {
        let o = o.count_include_pad(cip);
        both!(&r["cases"][format!("avg_pool2d_padding_ceil_cip_{cip}")], &["x"], |v| avg_pool2d(&v[0], &o));
    }
    let o = Pool2dOptions::new(2).stride(2);
    both!(&r["cases"]["lp_pool2d_p2"], &["x"], |v| lp_pool2d(&v[0], 2.0, &o));
    both!(&r["cases"]["adaptive_avg_pool2d"], &["x"], |v| { adaptive_avg_pool2d(&v[0], (3, 2)) });
    both!(&r["cases"]["adaptive_max_pool2d"], &["x"], |v| { adaptive_max_pool2d(&v[0], (3, 2)) });
}

#[test]
fn batch_norm_training_step_with_running_statistics() {
    let r = refs();
    let c = &r["cases"]["batch_norm_training_step"];
    let rm0 = tensor(&c["running_before"]["mean"]);
    let rv0 = tensor(&c["running_before"]["var"]);
    let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
    both!(c, &["x", "gamma", "beta"], |v| {
        // Each call starts from the same running statistics; the f64 run's are checked below.
        let (mut m, mut s) = (rm0.cast(), rv0.cast());
        batch_norm(&v[0], &v[1], &v[2], &mut m, &mut s, true, BatchNormOptions::default())
    });
    let x = Var::constant(tensor(&c["inputs"]["x"]));
    let (g, b) = (Var::constant(tensor(&c["inputs"]["gamma"])), Var::constant(tensor(&c["inputs"]["beta"])));
    batch_norm(&x, &g, &b, &mut rm, &mut rv, true, BatchNormOptions::default()).unwrap();
    assert_close(rm.data(), tensor(&c["running_after"]["mean"]).data(), 1e-12, "running_mean");
    assert_close(rv.data(), tensor(&c["running_after"]["var"]).data(), 1e-12, "running_var");
}

#[test]
fn cross_entropy_with_label_smoothing() {
    let r = refs();
    let c = &r["cases"]["cross_entropy_label_smoothing"];
    let targets: Vec<usize> = c["params"]["targets"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as usize).collect();
    both!(c, &["x"], |v| cross_entropy(&v[0], &targets, 0.1)?.reshape(&[1]));
}

#[test]
fn class_weighted_cross_entropy() {
    let r = refs();
    for name in ["cross_entropy_weighted", "cross_entropy_weighted_smoothed"] {
        let c = &r["cases"][name];
        let targets: Vec<usize> = c["params"]["targets"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as usize).collect();
        let weight: Vec<f64> = c["params"]["weight"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
        let eps = c["params"]["label_smoothing"].as_f64().unwrap();
        both!(c, &["x"], |v| weighted_cross_entropy(&v[0], &targets, &weight, eps)?.reshape(&[1]));
    }
    // Equal weights are the plain loss.
    let x: Var<f64> = Var::parameter(Rng::seed(3).normal(&[5, 3], 0.0, 2.0).unwrap());
    for eps in [0.0, 0.3] {
        let (a, b) = (cross_entropy(&x, &[2, 0, 1, 1, 2], eps).unwrap(), weighted_cross_entropy(&x, &[2, 0, 1, 1, 2], &[4.0; 3], eps).unwrap());
        assert!((a.value().item().unwrap() - b.value().item().unwrap()).abs() < 1e-12, "ε {eps}");
    }
}

#[test]
fn activations_match_pytorch() {
    let r = refs();
    let c = &r["cases"]["activations"];
    let x = Var::constant(tensor(&c["x"]));
    let ours: [(&str, Var<f64>); 11] = [
        ("relu", x.relu().unwrap()),
        ("relu6", x.relu6().unwrap()),
        ("elu", x.elu().unwrap()),
        ("selu", x.selu().unwrap()),
        ("gelu", x.gelu().unwrap()),
        ("silu", x.silu().unwrap()),
        ("hardswish", x.hardswish().unwrap()),
        ("tanh", x.tanh().unwrap()),
        ("sigmoid", x.sigmoid().unwrap()),
        ("softplus", x.softplus().unwrap()),
        ("leaky_relu_0.1", x.leaky_relu(0.1).unwrap()),
    ];
    for (name, v) in ours {
        assert_close(v.value().data(), tensor(&c["outputs"][name]).data(), 1e-12, name);
    }
}

#[test]
fn output_sizes_match_pytorch() {
    let r = refs();
    let sizes = r["cases"]["output_sizes"].as_array().unwrap();
    assert!(sizes.len() > 1000);
    let u = |v: &Value| v.as_u64().unwrap() as usize;
    for s in sizes {
        let (h, k, st, p, d, want) = (u(&s["h"]), u(&s["k"]), u(&s["s"]), u(&s["p"]), u(&s["d"]), u(&s["out"]));
        let got = match s["op"].as_str().unwrap() {
            "max_pool2d" => {
                let o = Pool2dOptions::new(k).stride(st).padding(Padding::uniform(p)).ceil_mode(s["ceil"].as_bool().unwrap());
                PoolGeom::new("max_pool2d", &[1, 1, h, h], &o).map(|g| g.p)
            }
            "conv2d" => {
                let o = Conv2dOptions::default().stride(st).padding(Padding::uniform(p)).dilation(d);
                ConvGeom::conv2d(&[1, 1, h, h], &[1, 1, k, k], &o).map(|g| g.p)
            }
            _ => {
                let o = Conv2dOptions::default().stride(st).padding(Padding::uniform(p)).dilation(d).output_padding(u(&s["op_pad"]));
                ConvGeom::conv_transpose2d(&[1, 1, h, h], &[1, 1, k, k], &o).map(|g| g.h)
            }
        };
        match got {
            Ok(g) => assert_eq!(g, want, "{s}"),
            Err(e) => assert_eq!(want, 0, "{s}: Stride refused ({e}) but PyTorch gives {want}"),
        }
    }
}
