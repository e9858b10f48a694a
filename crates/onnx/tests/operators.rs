//! Which operators the importer has: every one listed in `OPERATORS` reaches a rule, and a graph
//! using others is refused once, naming all of them with their nodes.

use stride_onnx::proto::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};

mod common;
use common::node;

fn model(nodes: Vec<NodeProto>) -> ModelProto {
    with_constants(nodes, vec![])
}

fn with_constants(nodes: Vec<NodeProto>, initializer: Vec<TensorProto>) -> ModelProto {
    common::model(nodes, initializer, &[-1, 3], &[-1, 3])
}

#[test]
fn a_graph_with_operators_stride_lacks_names_them_all_at_once() {
    let mut fused = node("FusedConv", &["x"], "f");
    fused.domain = Some("com.microsoft".into());
    let nodes = vec![
        node("Relu", &["x"], "r"),
        node("NonZero", &["r"], "n1"),
        node("GatherElements", &["x", "i"], "g"),
        node("NonZero", &["g"], "n2"),
        fused,
        node("NonZero", &["f"], "n3"),
        node("NonZero", &["n3"], "y"),
    ];
    let e = stride_onnx::import(&model(nodes)).err().unwrap().to_string();
    let want = "the graph uses operators Stride does not have: FusedConv of domain 'com.microsoft' (node 'f'); \
                GatherElements (node 'g'); NonZero (4 nodes: 'n1', 'n2', 'n3', ...)";
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

#[test]
fn where_takes_each_element_from_the_branch_its_constant_condition_names() {
    use stride_autograd::{no_grad, Tensor, Var};
    use stride_nn::{Ctx, Module};
    let boolean = |name: &str, dims: &[i64], raw: &[u8]| TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Bool as i32),
        raw_data: Some(raw.to_vec()),
        ..Default::default()
    };
    let fill = TensorProto { name: Some("f".into()), data_type: Some(DataType::Float as i32), float_data: vec![-7.0], ..Default::default() };
    // x [N, 3] masked by a [3] condition (broadcast over the batch) and by a [N?, 1]-shaped one.
    let m = with_constants(
        vec![node("Where", &["c", "f", "x"], "w"), node("Where", &["d", "w", "x"], "y")],
        vec![boolean("c", &[3], &[1, 0, 1]), boolean("d", &[1, 1], &[1]), fill],
    );
    let mut net = stride_onnx::import(&m).unwrap().network;
    let x = Tensor::from_vec(vec![1.0, f32::INFINITY, 3.0, f32::NAN, 5.0, 6.0], &[2, 3]).unwrap();
    let y = no_grad(|| net.forward(&Var::constant(x), &mut Ctx::eval())).unwrap().value();
    assert_eq!(y.shape(), [2, 3]);
    assert_eq!(y.data()[..3], [-7.0, f32::INFINITY, -7.0]);
    assert_eq!(y.data()[3..], [-7.0, 5.0, -7.0]);

    // A condition from the data, of floats, or one that does not broadcast with the data.
    let cases = [
        (
            vec![node("Where", &["x", "x", "x"], "y")],
            vec![],
            "Where's condition 'x' is computed from the data; Stride selects by a constant condition only",
        ),
        (
            vec![node("Where", &["c", "x", "x"], "y")],
            vec![TensorProto { name: Some("c".into()), data_type: Some(DataType::Float as i32), float_data: vec![1.0], ..Default::default() }],
            "Where's condition 'c' is not a boolean constant",
        ),
    ];
    for (nodes, consts, want) in cases {
        let e = stride_onnx::import(&with_constants(nodes, consts)).err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
    }
    let m = with_constants(vec![node("Where", &["c", "x", "x"], "y")], vec![boolean("c", &[2], &[1, 0])]);
    let mut net = stride_onnx::import(&m).unwrap().network;
    let e = no_grad(|| net.forward(&Var::constant(Tensor::<f32>::zeros(&[4, 3]).unwrap()), &mut Ctx::eval())).err().unwrap().to_string();
    assert!(e.contains("[2] and [4, 3] do not broadcast (axis 1: 2 against 3)"), "{e}");
}
