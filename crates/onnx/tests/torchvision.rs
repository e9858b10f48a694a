//! torchvision's resnet18, mobilenet_v2 and googlenet as PyTorch's two exporters write them
//! (`tests/torchvision/`, made by scripts/onnx/torchvision_fixtures.py), imported by Stride and
//! compared with ONNX Runtime's output on the same graph and weights.
//!
//! The kept files hold the graphs without their float data; every float initializer gets the
//! value of a formula (the script's `formula`, recomputed here), so no weights are committed.

use std::path::Path;

use prost::Message;
use stride_autograd::{no_grad, Tensor, Var};
use stride_nn::{Ctx, Module};
use stride_onnx::proto::{tensor_proto::DataType, TensorProto};

/// n values in [0, 1): the script's integer hash, exact in f64.
fn uniform(t_index: u64, n: usize) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let h = (i.wrapping_mul(2_654_435_761) + t_index * 40_503 + 12_345) % (1 << 32);
            let h = ((h ^ (h >> 13)) * 1_274_126_177) % (1 << 32);
            h as f64 / (1u64 << 32) as f64
        })
        .collect()
}

fn formula(t_index: u64, dims: &[i64]) -> Vec<f32> {
    let n: i64 = dims.iter().product();
    let u = uniform(t_index, n as usize);
    if dims.len() >= 2 {
        let fan_in: i64 = dims[1..].iter().product();
        let scale = (3.0 / fan_in as f64).sqrt();
        u.iter().map(|v| ((v * 2.0 - 1.0) * scale) as f32).collect()
    } else {
        u.iter().map(|v| ((v * 2.0 - 1.0) * 0.1) as f32).collect()
    }
}

fn read_pb(path: &Path) -> Tensor<f32> {
    let t = TensorProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    stride_onnx::from_tensor_proto(&t).unwrap()
}

#[test]
fn torchvision_exports_import_and_agree_with_onnx_runtime() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torchvision");
    let x = read_pb(&dir.join("input.pb"));
    let mut n = 0;
    for name in ["resnet18", "mobilenet_v2", "googlenet"] {
        for exporter in ["dynamo", "torchscript"] {
            let case = format!("{name}.{exporter}");
            let mut model = stride_onnx::read(&dir.join(format!("{case}.onnx"))).unwrap();
            let graph = model.graph.as_mut().unwrap();
            let mut k = 0;
            for t in &mut graph.initializer {
                if t.data_type == Some(DataType::Float as i32) && !t.dims.is_empty() {
                    let values = formula(k, &t.dims);
                    t.raw_data = Some(values.iter().flat_map(|v| v.to_le_bytes()).collect());
                    k += 1;
                }
            }
            let imported = stride_onnx::import(&model).unwrap_or_else(|e| panic!("{case}: {e}"));
            let mut net = imported.network;
            let y = no_grad(|| net.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap_or_else(|e| panic!("{case}: {e}")).value();
            let want = read_pb(&dir.join(format!("{case}.output.pb")));
            assert_eq!(y.shape(), want.shape(), "{case}");
            let scale = want.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(scale > 1e-3, "{case}: the expected output is all but zero ({scale}); the formula weights are too small");
            for (i, (a, b)) in y.data().iter().zip(want.data()).enumerate() {
                assert!((a - b).abs() <= 1e-4 * (1.0 + scale), "{case}: output {i} is {a}, ONNX Runtime gives {b}");
            }
            n += 1;
        }
    }
    assert_eq!(n, 6);
}
