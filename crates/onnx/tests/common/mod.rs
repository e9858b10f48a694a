//! Graphs written node by node, for the importer's tests.
#![allow(dead_code)]

use stride_onnx::proto::{
    tensor_proto::DataType,
    tensor_shape_proto::{dimension::Value as Dim, Dimension},
    type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// `graph` as a model of ONNX's default domain at `opset`.
pub fn model_of(graph: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { version: Some(opset), ..Default::default() }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// A graph of `nodes` and `initializer` from the input x of `input` dimensions to the output y
/// of `output` dimensions (-1: symbolic), at opset 18.
pub fn model(nodes: Vec<NodeProto>, initializer: Vec<TensorProto>, input: &[i64], output: &[i64]) -> ModelProto {
    model_of(GraphProto { node: nodes, initializer, input: vec![value("x", input)], output: vec![value("y", output)], ..Default::default() }, 18)
}

/// A float32 value of `dims` (-1: a symbolic dimension, "N").
pub fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dim = |d: i64| Dimension { value: Some(if d < 0 { Dim::DimParam("N".into()) } else { Dim::DimValue(d) }), ..Default::default() };
    let shape = TensorShapeProto { dim: dims.iter().map(|&d| dim(d)).collect() };
    let t = type_proto::Tensor { elem_type: Some(1), shape: Some(shape) };
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(t)), ..Default::default() }),
        ..Default::default()
    }
}

/// A node of the default domain, named after its one output.
pub fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: Some(output.into()),
        ..Default::default()
    }
}

/// An int64 initializer.
pub fn ints(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        int64_data: data.to_vec(),
        ..Default::default()
    }
}

/// A float32 initializer.
pub fn floats(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        float_data: data.to_vec(),
        ..Default::default()
    }
}
