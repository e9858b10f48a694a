//! What a graph computes from constants alone is worked out when the file is read: integer
//! tensors (F.pad's pads as the TorchScript exporter writes them) and float ones (NFNet's
//! weight standardisation, a convolution's weight centred in the graph); and batch
//! normalisation in training mode, by the statistics of the values at hand.

use stride_autograd::{no_grad, Tensor, Var};
use stride_nn::{Ctx, Module};
use stride_onnx::proto::{AttributeProto, ModelProto};

mod common;
use common::{floats, model, node, value};

fn attr(name: &str, f: &dyn Fn(&mut AttributeProto)) -> AttributeProto {
    let mut a = AttributeProto { name: Some(name.into()), ..Default::default() };
    f(&mut a);
    a
}

fn run(m: &ModelProto, x: Tensor<f32>) -> Tensor<f32> {
    let mut net = stride_onnx::import(m).unwrap_or_else(|e| panic!("{e}")).network;
    no_grad(|| net.forward(&Var::constant(x), &mut Ctx::eval())).unwrap().value()
}

/// `F.pad(x, (0, 1))` as the TorchScript exporter writes it: the pads computed from constants
/// (ConstantOfShape, Concat, Reshape to pairs, a Slice that reverses them, Transpose, Reshape,
/// Cast) are worked out when the file is read.
#[test]
fn pads_computed_from_constants_are_worked_out_on_reading() {
    let mut fill = node("ConstantOfShape", &["two"], "zeros");
    fill.attribute = vec![attr("value", &|a| {
        a.r#type = Some(4);
        a.t = Some(common::ints("v", &[1], &[0]));
    })];
    let reverse = node("Slice", &["pairs", "minus_one", "far", "zero", "minus_one"], "reversed");
    let mut transpose = node("Transpose", &["reversed"], "t");
    transpose.attribute = vec![attr("perm", &|a| {
        a.r#type = Some(7);
        a.ints = vec![1, 0];
    })];
    let mut cast = node("Cast", &["flat"], "pads");
    cast.attribute = vec![attr("to", &|a| {
        a.r#type = Some(2);
        a.i = Some(7);
    })];
    let mut concat = node("Concat", &["given", "zeros"], "all");
    concat.attribute = vec![attr("axis", &|a| {
        a.r#type = Some(2);
        a.i = Some(0);
    })];
    let nodes = vec![
        fill,
        concat,
        node("Reshape", &["all", "pair_shape"], "pairs"),
        reverse,
        transpose,
        node("Reshape", &["t", "flat_shape"], "flat"),
        cast,
        node("Pad", &["x", "pads"], "y"),
    ];
    let consts = vec![
        common::ints("two", &[1], &[2]),
        common::ints("given", &[2], &[0, 1]),
        common::ints("pair_shape", &[2], &[-1, 2]),
        common::ints("minus_one", &[1], &[-1]),
        common::ints("far", &[1], &[-(1 << 40)]),
        common::ints("zero", &[1], &[0]),
        common::ints("flat_shape", &[1], &[-1]),
    ];
    let m = model(nodes, consts, &[-1, 3], &[-1, 4]);
    let y = run(&m, Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap());
    assert_eq!(y.shape(), [2, 4]);
    assert_eq!(y.data(), [1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 0.0]);
}

/// A convolution whose weight the graph centres (Sub of its ReduceMean, as NFNet's
/// standardisation does): worked out on reading, so the convolution has a constant weight.
#[test]
fn a_weight_computed_from_constants_is_worked_out_on_reading() {
    let mut mean = node("ReduceMean", &["w", "axes"], "m");
    mean.attribute = vec![attr("keepdims", &|a| {
        a.r#type = Some(2);
        a.i = Some(1);
    })];
    let nodes = vec![mean, node("Sub", &["w", "m"], "centred"), node("Conv", &["x", "centred"], "y")];
    // One filter of 1x1x2x2 with values 1..4: centred, -1.5, -0.5, 0.5, 1.5.
    let consts = vec![floats("w", &[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]), common::ints("axes", &[3], &[1, 2, 3])];
    let m = model(nodes, consts, &[-1, 1, 2, 2], &[-1, 1, 1, 1]);
    let y = run(&m, Tensor::from_vec(vec![1.0f32, 1.0, 2.0, 2.0], &[1, 1, 2, 2]).unwrap());
    assert_eq!(y.data(), [-1.5 - 0.5 + 1.0 + 3.0]);
    let names: Vec<String> = stride_onnx::import(&m).unwrap().network.layer_kinds().into_iter().map(|(_, k)| k).collect();
    assert_eq!(names.len(), 1, "only the convolution is left: {names:?}");
}

/// BatchNormalization in training mode normalises by the statistics of its input (over the
/// batch and positions), whatever the run's mode; its running statistics may not be read.
#[test]
fn batch_norm_in_training_mode_uses_the_statistics_at_hand() {
    let mut bn = node("BatchNormalization", &["x", "scale", "bias", "mean", "var"], "y");
    bn.attribute = vec![attr("training_mode", &|a| {
        a.r#type = Some(2);
        a.i = Some(1);
    })];
    let consts =
        vec![floats("scale", &[2], &[1.0, 2.0]), floats("bias", &[2], &[0.0, 1.0]), floats("mean", &[2], &[0.0; 2]), floats("var", &[2], &[1.0; 2])];
    let m = model(vec![bn.clone()], consts.clone(), &[-1, 2], &[-1, 2]);
    // Channel 0: 1 and 3 (mean 2, variance 1); channel 1: 0 and 4 (mean 2, variance 4).
    let y = run(&m, Tensor::from_vec(vec![1.0f32, 0.0, 3.0, 4.0], &[2, 2]).unwrap());
    let want =
        [-1.0 / (1.0f32 + 1e-5).sqrt(), 1.0 - 2.0 / (1.0f32 + 2.5e-6).sqrt(), 1.0 / (1.0f32 + 1e-5).sqrt(), 1.0 + 2.0 / (1.0f32 + 2.5e-6).sqrt()];
    for (a, b) in y.data().iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{:?} against {want:?}", y.data());
    }
    bn.output.push("running_mean".into());
    let mut m = model(vec![bn], consts, &[-1, 2], &[-1, 2]);
    m.graph.as_mut().unwrap().output.push(value("running_mean", &[2]));
    let e = stride_onnx::import(&m).err().unwrap().to_string();
    assert!(e.contains("Stride gives the first only, and 'running_mean' is read"), "{e}");
}

/// A table of constants gathered by a constant index (an attention block's learned biases
/// picked per head, as the new exporter writes EfficientViT's `attention_biases[:, idxs]`) is
/// worked out on reading (before, the data flowing through was expected there), and added to
/// the data as any constant.
#[test]
fn a_constant_table_gathered_by_a_constant_index_is_worked_out_on_reading() {
    let table: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let m = model(
        vec![node("Gather", &["table", "head"], "bias"), node("Add", &["x", "bias"], "y")],
        vec![floats("table", &[3, 2, 2], &table), common::ints("head", &[], &[1])],
        &[-1, 2, 2],
        &[-1, 2, 2],
    );
    let y = run(&m, Tensor::from_vec(vec![0.5f32; 8], &[2, 2, 2]).unwrap());
    assert_eq!(y.data(), [4.5, 5.5, 6.5, 7.5, 4.5, 5.5, 6.5, 7.5]);
}
