//! Which operators the importer has: every one listed in `OPERATORS` reaches a rule, and a graph
//! using others is refused once, naming all of them with their nodes.

use stride_onnx::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};

mod common;
use common::{node, value};

fn model(nodes: Vec<NodeProto>) -> ModelProto {
    let graph = GraphProto { node: nodes, input: vec![value("x", &[-1, 3])], output: vec![value("y", &[-1, 3])], ..Default::default() };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { version: Some(18), ..Default::default() }],
        graph: Some(graph),
        ..Default::default()
    }
}

#[test]
fn a_graph_with_operators_stride_lacks_names_them_all_at_once() {
    let mut fused = node("FusedConv", &["x"], "f");
    fused.domain = Some("com.microsoft".into());
    let nodes = vec![
        node("Relu", &["x"], "r"),
        node("Where", &["c", "x", "r"], "w1"),
        node("GatherElements", &["x", "i"], "g"),
        node("Where", &["c", "x", "g"], "w2"),
        fused,
        node("Where", &["c", "x", "f"], "w3"),
        node("Where", &["c", "x", "w3"], "y"),
    ];
    let e = stride_onnx::import(&model(nodes)).err().unwrap().to_string();
    let want = "the graph uses operators Stride does not have: FusedConv of domain 'com.microsoft' (node 'f'); \
                GatherElements (node 'g'); Where (4 nodes: 'w1', 'w2', 'w3', ...)";
    assert!(e.ends_with(want), "{e}");
    let e = stride_onnx::import(&model(vec![node("Einsum", &["x"], "y")])).err().unwrap().to_string();
    assert!(e.ends_with("the graph uses an operator Stride does not have: Einsum (node 'y')"), "{e}");
}

#[test]
fn every_listed_operator_reaches_a_rule() {
    // A node of each with no inputs: its rule refuses it (a missing input, attribute or
    // value), never as an operator Stride lacks.
    for op in stride_onnx::OPERATORS {
        let e = match stride_onnx::import(&model(vec![node(op, &[], "y")])) {
            Ok(_) => continue,
            Err(e) => e.to_string(),
        };
        assert!(!e.contains("does not have") && !e.contains("is not supported by Stride"), "{op}: {e}");
        assert!(e.contains(&format!("({op}, opset 18)")), "{op}: refused before its rule: {e}");
    }
}

#[test]
fn a_cast_of_the_data_to_float32_is_the_data_and_to_another_type_is_refused() {
    use stride_autograd::{no_grad, Tensor, Var};
    use stride_nn::{Ctx, Module};
    let cast = |to: i64| {
        let mut c = node("Cast", &["x"], "c");
        c.attribute = vec![stride_onnx::proto::AttributeProto { name: Some("to".into()), i: Some(to), r#type: Some(2), ..Default::default() }];
        model(vec![c, node("Relu", &["c"], "y")])
    };
    let mut net = stride_onnx::import(&cast(1)).unwrap().network;
    let x = Tensor::from_vec(vec![-1.0, 2.0, -3.0, 4.0, 0.5, -0.5], &[2, 3]).unwrap();
    let y = no_grad(|| net.forward(&Var::constant(x), &mut Ctx::eval())).unwrap().value();
    assert_eq!(y.data(), [0.0, 2.0, 0.0, 4.0, 0.5, 0.0]);
    let e = stride_onnx::import(&cast(7)).err().unwrap().to_string();
    assert!(e.contains("Cast of the data to int64: Stride computes in float32"), "{e}");
}
