//! torchvision's classifiers as PyTorch's two exporters write them (`tests/torchvision/`, made
//! by scripts/onnx/torchvision_fixtures.py: ResNet, MobileNet V2 and V3, GoogLeNet,
//! ShuffleNet V2, EfficientNet, SqueezeNet, RegNet, DenseNet, ConvNeXt, AlexNet; LR-ASPP's
//! segmentation map), imported by Stride and
//! compared with ONNX Runtime's output on the same graph and weights, eagerly (on the two images
//! exported and on one) and through a compiled plan (as `stride eval` and `predict` run them).
//!
//! The kept files hold the graphs without their weights; every float initializer of more than
//! one value gets the value of a formula (the script's `formula`, recomputed here), so no
//! weights are committed.

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
        u.iter().map(|v| (1.0 + (v * 2.0 - 1.0) * 0.5) as f32).collect()
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
    let mut cases: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".output.pb").map(str::to_string))
        .filter(|c| {
            ![
                "tiny_cnn.",
                "attention_cnn.",
                "small_unet.",
                "adaptive_pool_cnn.",
                "self_attention_cnn.",
                "group_norm_cnn.",
                "padded_cnn.",
                "one_d_cnn.",
            ]
            .iter()
            .any(|own| c.starts_with(own))
        })
        .collect();
    cases.sort();
    let mut n = 0;
    {
        for case in &cases {
            let mut model = stride_onnx::read(&dir.join(format!("{case}.onnx"))).unwrap();
            let graph = model.graph.as_mut().unwrap();
            let mut k = 0;
            for t in &mut graph.initializer {
                if t.data_type == Some(DataType::Float as i32) && t.dims.iter().product::<i64>() > 1 {
                    let values = formula(k, &t.dims);
                    t.raw_data = Some(values.iter().flat_map(|v| v.to_le_bytes()).collect());
                    k += 1;
                }
            }
            let imported = stride_onnx::import(&model).unwrap_or_else(|e| panic!("{case}: {e}"));
            let mut net = imported.network;
            // Patterns PyTorch writes out op by op run as one layer: ConvNeXt's GELU (Div, Erf,
            // Add, Mul, Mul) and EfficientNet's SiLU (Sigmoid, Mul).
            let kinds: Vec<String> = net.layer_kinds().into_iter().map(|(_, k)| k).collect();
            let count = |k: &str| kinds.iter().filter(|&x| x == k).count();
            if case.starts_with("convnext") {
                assert_eq!((count("gelu"), count("erf")), (18, 0), "{case}");
            }
            if case.starts_with("efficientnet") {
                // 49 SiLUs; the 16 squeeze-excitation gates stay sigmoids (their input is not x).
                assert_eq!((count("silu"), count("sigmoid")), (49, 16), "{case}");
            }
            let y = no_grad(|| net.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap_or_else(|e| panic!("{case}: {e}")).value();
            let want = read_pb(&dir.join(format!("{case}.output.pb")));
            assert_eq!(y.shape(), want.shape(), "{case}");
            // Compared relative to the output's own scale: graphs whose batch norms the new
            // exporter dropped (they were identities at initialisation) end in small outputs
            // under the formula weights (EfficientNet's ~1e-7), which floating point computes
            // as well as large ones. They must differ from image to image and class to class.
            let scale = want.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let spread = want.data().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) - want.data().iter().fold(f32::INFINITY, |m, &v| m.min(v));
            assert!(spread > 1e-2 * scale && scale > 0.0, "{case}: the expected outputs are all alike ({spread} apart)");
            for (i, (a, b)) in y.data().iter().zip(want.data()).enumerate() {
                assert!((a - b).abs() <= 1e-4 * scale, "{case}: output {i} is {a}, ONNX Runtime gives {b}");
            }
            // One image: shapes and indices computed in the graph follow the batch (ConvNeXt's
            // new-exporter graph gathers its pooled values by Range(0, N) * 768 + offsets).
            let per = x.numel() / x.shape()[0];
            let first = Tensor::from_vec(x.data()[..per].to_vec(), &[1, 3, 64, 64]).unwrap();
            let y1 = no_grad(|| net.forward(&Var::constant(first), &mut Ctx::eval())).unwrap_or_else(|e| panic!("{case}, one image: {e}")).value();
            assert_eq!(y1.shape(), [&[1][..], &want.shape()[1..]].concat(), "{case}, one image");
            for (i, (a, b)) in y1.data().iter().zip(want.data()).enumerate() {
                assert!((a - b).abs() <= 1e-4 * scale, "{case}, one image: output {i} is {a}, ONNX Runtime gives {b}");
            }
            // And through a compiled plan, as `stride eval` and `predict` run it.
            let mut plan = stride_nn::planned::compile(&mut net, &x).unwrap_or_else(|e| panic!("{case}: the planner refused it: {e}"));
            let y = plan.run(&x).unwrap_or_else(|e| panic!("{case} planned: {e}"));
            for (i, (a, b)) in y.data().iter().zip(want.data()).enumerate() {
                assert!((a - b).abs() <= 1e-4 * scale, "{case} planned: output {i} is {a}, ONNX Runtime gives {b}");
            }
            n += 1;
        }
    }
    assert_eq!(n, 22, "{cases:?}");
}

const BOTH: &[&str] = &["dynamo", "torchscript"];

/// A graph exported with its own weights (`{name}.{exporter}.onnx` for each of `exporters`, input
/// `{name}.input.pb`): within `tol` of ONNX Runtime at the exported batch and on its first image
/// alone (computed shapes follow the batch), eagerly and through a compiled plan.
fn agrees_at_any_batch(name: &str, exporters: &[&str], tol: f32) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torchvision");
    let x = read_pb(&dir.join(format!("{name}.input.pb")));
    let batch = x.shape()[0];
    let first = Tensor::from_vec(x.data()[..x.numel() / batch].to_vec(), &[&[1][..], &x.shape()[1..]].concat()).unwrap();
    for exporter in exporters {
        let case = format!("{name}.{exporter}");
        let mut net =
            stride_onnx::import(&stride_onnx::read(&dir.join(format!("{case}.onnx"))).unwrap()).unwrap_or_else(|e| panic!("{case}: {e}")).network;
        let want = read_pb(&dir.join(format!("{case}.output.pb")));
        let close = |y: &Tensor<f32>, rows: usize, how: &str| {
            assert_eq!(y.shape(), [&[rows][..], &want.shape()[1..]].concat(), "{case} {how}");
            for (i, (a, b)) in y.data().iter().zip(want.data()).enumerate() {
                assert!((a - b).abs() <= tol, "{case} {how}: output {i} is {a}, ONNX Runtime gives {b}");
            }
        };
        close(&no_grad(|| net.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap().value(), batch, "eager");
        close(&no_grad(|| net.forward(&Var::constant(first.clone()), &mut Ctx::eval())).unwrap().value(), 1, "eager, one image");
        for (input, rows) in [(&x, batch), (&first, 1)] {
            let mut plan = stride_nn::planned::compile(&mut net, input).unwrap_or_else(|e| panic!("{case}: the planner refused it: {e}"));
            close(&plan.run(input).unwrap(), rows, "planned");
        }
    }
}

/// A CNN as the tutorials write one, `x.view(x.size(0), -1)` before its dense layer, with its
/// weights: the TorchScript exporter computes that shape in the graph from the batch (Shape,
/// Gather, Unsqueeze, Concat, Reshape), the new one keeps the weights beside the model in
/// `tiny_cnn.dynamo.onnx.data`.
#[test]
fn a_tutorial_cnn_exported_by_default_imports_and_agrees_with_onnx_runtime() {
    agrees_at_any_batch("tiny_cnn", BOTH, 1e-5);
}

/// CBAM's attention (the mean and max of each map through a shared MLP; the mean and max over
/// channels through a 7x7 convolution) and F.normalize: reductions over any axes, an L2 norm
/// and Expand, as both exporters write them.
#[test]
fn a_cnn_with_attention_imports_and_agrees_with_onnx_runtime() {
    agrees_at_any_batch("attention_cnn", BOTH, 1e-5);
}

/// A U-Net whose decoder upsamples by nearest (nn.Upsample) and bilinear Resize, with half-pixel
/// and aligned corners (F.interpolate by a factor and to the skip connection's size).
#[test]
fn a_unet_upsampling_three_ways_imports_and_agrees_with_onnx_runtime() {
    agrees_at_any_batch("small_unet", BOTH, 1e-5);
}

/// Adaptive average pooling to sizes that do not divide the map (15x15 to 7x4, 3x3 up to 5x5, as
/// VGG's classifier on 64x64 images): the new exporter gathers each window's two candidate cells
/// and zeroes the second where a window has one, by Where with constant masks.
#[test]
fn adaptive_pooling_to_sizes_that_do_not_divide_imports_and_agrees_with_onnx_runtime() {
    agrees_at_any_batch("adaptive_pool_cnn", &["dynamo"], 1e-5);
}

/// Multi-head self-attention over a feature map's positions (YOLO11's C2PSA, non-local blocks):
/// queries times keys and values times weights are products of 4-d stacks (batched MatMul).
#[test]
fn self_attention_over_a_feature_map_imports_and_agrees_with_onnx_runtime() {
    agrees_at_any_batch("self_attention_cnn", BOTH, 1e-5);
}

/// Group normalisation and instance normalisation with its affine, which both exporters write
/// as InstanceNormalization (a group norm between two Reshapes).
#[test]
fn group_and_instance_normalisation_import_and_agree_with_onnx_runtime() {
    agrees_at_any_batch("group_norm_cnn", BOTH, 1e-5);
}

/// Padding by the map's own values (reflect, edge and wrap: ReflectionPad2d, ReplicationPad2d,
/// circular F.pad) and EdgeNeXt's sine position encoding (a mask of the input's shape negated
/// and counted by CumSum, every second frequency by a stepped Slice, then convolved).
#[test]
fn padding_by_the_maps_own_values_and_a_position_encoding_import_and_agree_with_onnx_runtime() {
    agrees_at_any_batch("padded_cnn", BOTH, 1e-5);
}

/// A 1-d CNN (Conv1d with padding, groups, stride and dilation, batch norm, max and average
/// pooling, ECA's Conv1d across channels, ConvTranspose1d): Stride's 2-d layers over maps of
/// height 1.
#[test]
fn a_one_d_cnn_imports_and_agrees_with_onnx_runtime() {
    agrees_at_any_batch("one_d_cnn", BOTH, 1e-5);
}

/// A shape computed in the graph is used only as a shape: fed to a layer as data it is refused
/// by name, and an index past the value's rank is an error when the network runs, not a panic.
#[test]
fn computed_shapes_are_refused_where_they_cannot_work() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torchvision");
    let model = stride_onnx::read(&dir.join("tiny_cnn.torchscript.onnx")).unwrap();
    let reshape =
        |m: &stride_onnx::proto::ModelProto| m.graph.as_ref().unwrap().node.iter().position(|n| n.op_type.as_deref() == Some("Reshape")).unwrap();

    let mut as_data = model.clone();
    let i = reshape(&as_data);
    let node = &mut as_data.graph.as_mut().unwrap().node[i];
    let shape = node.input[1].clone();
    node.input[0] = shape.clone();
    let e = stride_onnx::import(&as_data).err().expect("a shape as data").to_string();
    assert!(e.contains(&shape) && e.contains("computed from the shapes"), "{e}");

    let mut past_rank = model.clone();
    let graph = past_rank.graph.as_mut().unwrap();
    let gather = graph.node.iter().find(|n| n.op_type.as_deref() == Some("Gather")).unwrap().input[1].clone();
    let constant = graph.node.iter_mut().find(|n| n.output.first() == Some(&gather)).expect("the index is a Constant node");
    let value = constant.attribute[0].t.as_mut().unwrap();
    value.raw_data = Some(7i64.to_le_bytes().to_vec());
    value.int64_data.clear();
    let mut net = stride_onnx::import(&past_rank).unwrap().network;
    let x = read_pb(&dir.join("tiny_cnn.input.pb"));
    let e = no_grad(|| net.forward(&Var::constant(x), &mut Ctx::eval())).expect_err("axis 7 of a 4-d value").to_string();
    assert!(e.contains("axis 7") && e.contains("4-d"), "{e}");
}
