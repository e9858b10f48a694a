//! Graphs with several outputs (a detector's boxes and mask prototypes), and nodes whose extra
//! outputs (a mask, indices, statistics) nothing reads.

use stride_autograd::{no_grad, Tensor, Var};
use stride_nn::{Ctx, Module};
use stride_onnx::proto::{GraphProto, ModelProto, NodeProto};

mod common;
use common::{model_of, node, value};

fn model(nodes: Vec<NodeProto>, outputs: &[&str]) -> ModelProto {
    let output = outputs.iter().map(|o| value(o, &[-1, 3])).collect();
    model_of(GraphProto { node: nodes, input: vec![value("x", &[-1, 3])], output, ..Default::default() }, 18)
}

#[test]
fn every_output_comes_back_by_name_and_the_module_gives_the_first() {
    let m = model(vec![node("Relu", &["x"], "r"), node("Neg", &["x"], "n"), node("Sigmoid", &["r"], "s")], &["s", "n", "r", "s"]);
    let mut net = stride_onnx::import(&m).unwrap().network;
    assert_eq!(net.output_names, ["s", "n", "r", "s"]);
    let x = Tensor::from_vec(vec![-1.0f32, 0.0, 2.0], &[1, 3]).unwrap();
    let all = no_grad(|| net.forward_all(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["s", "n", "r", "s"]);
    assert_eq!(all[1].1.value().data(), [1.0, -0.0, -2.0]);
    assert_eq!(all[2].1.value().data(), [0.0, 0.0, 2.0]);
    assert_eq!(all[0].1.value().data(), all[3].1.value().data());
    let first = no_grad(|| net.forward(&Var::constant(x), &mut Ctx::eval())).unwrap();
    assert_eq!(first.value().data(), all[0].1.value().data());

    let e = stride_onnx::import(&model(vec![node("Relu", &["x"], "r")], &[])).err().unwrap().to_string();
    assert!(e.contains("the graph declares no output"), "{e}");
    let e = stride_onnx::import(&model(vec![node("Relu", &["x"], "r")], &["r", "q"])).err().unwrap().to_string();
    assert!(e.contains("the graph's output 'q' is made by no node"), "{e}");
}

#[test]
fn extra_outputs_nothing_reads_are_left_and_a_read_one_is_refused() {
    let mut dropout = node("Dropout", &["x"], "d");
    dropout.output.push("mask".into());
    let m = model(vec![dropout.clone(), node("Relu", &["d"], "y")], &["y"]);
    let mut net = stride_onnx::import(&m).unwrap().network;
    let x = Tensor::from_vec(vec![-1.0f32, 0.5, 2.0], &[1, 3]).unwrap();
    assert_eq!(no_grad(|| net.forward(&Var::constant(x), &mut Ctx::eval())).unwrap().value().data(), [0.0, 0.5, 2.0]);
    let m = model(vec![dropout, node("Relu", &["d"], "y")], &["y", "mask"]);
    let e = stride_onnx::import(&m).err().unwrap().to_string();
    assert!(e.contains("Dropout with 2 outputs: Stride gives the first only, and 'mask' is read"), "{e}");
}
