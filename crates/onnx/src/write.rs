//! A Stride network to an ONNX model.

use stride_autograd::{no_grad, Tensor, Var};
use stride_nn::export::{Attr, Graph, Init, Value};
use stride_nn::Module;

use crate::proto::{
    attribute_proto::AttributeType, tensor_shape_proto::dimension::Value as Dim, tensor_shape_proto::Dimension, type_proto, AttributeProto,
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::tensor::{ints_proto, to_tensor_proto};
use crate::Result;

/// The operator set `stride export` writes unless told otherwise (PyTorch's default too).
pub const DEFAULT_OPSET: i64 = 17;

/// `model.to_onnx(&[1, 28, 28], 17)`: any Stride module written as an ONNX model.
pub trait ToOnnx {
    /// The ONNX bytes of this network for inputs [N, ...`input`] (N dynamic).
    fn to_onnx(&mut self, input: &[usize], opset: i64) -> Result<Vec<u8>>;
}

impl<M: Module + ?Sized> ToOnnx for M {
    fn to_onnx(&mut self, input: &[usize], opset: i64) -> Result<Vec<u8>> {
        export(self, input, opset)
    }
}

/// Writes `model` for inputs of shape [N, ...`input`] (N dynamic), as ONNX bytes.
pub fn export<M: Module + ?Sized>(model: &mut M, input: &[usize], opset: i64) -> Result<Vec<u8>> {
    export_annotated(model, input, opset, &[])
}

/// [`export`] with `metadata` as the model's `metadata_props` (key, value), which ONNX Runtime
/// shows as `get_modelmeta().custom_metadata_map`: `stride export` records there how the
/// training run standardised its inputs and its class names, and `stride eval` and `predict`
/// read them back.
pub fn export_annotated<M: Module + ?Sized>(model: &mut M, input: &[usize], opset: i64, metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let mut shape = vec![1];
    shape.extend_from_slice(input);
    let mut m = build(Tensor::zeros(&shape)?, opset, |g, x| model.export(g, "", x))?;
    m.metadata_props = metadata.iter().map(|(k, v)| StringStringEntryProto { key: Some(k.clone()), value: Some(v.clone()) }).collect();
    Ok(crate::encode(&m))
}

/// Writes the graph that `f` builds from the input `example` (its first axis becomes the
/// dynamic batch): for networks that are not one module, such as the VAE's generator.
pub fn export_with(example: Tensor<f32>, opset: i64, f: impl FnOnce(&mut Graph, &Value) -> Result<Value>) -> Result<Vec<u8>> {
    Ok(crate::encode(&build(example, opset, f)?))
}

/// The model that `f` builds from the input `example`.
fn build(example: Tensor<f32>, opset: i64, f: impl FnOnce(&mut Graph, &Value) -> Result<Value>) -> Result<ModelProto> {
    let mut g = Graph::new(opset)?;
    let x = g.input("input", Var::constant(example));
    let y = no_grad(|| f(&mut g, &x))?;
    Ok(to_model(&g, &x, &y))
}

fn value_info(name: &str, shape: &[usize]) -> ValueInfoProto {
    let dims = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| Dimension { value: Some(if i == 0 { Dim::DimParam("N".into()) } else { Dim::DimValue(d as i64) }), ..Default::default() })
        .collect();
    let tensor = type_proto::Tensor { elem_type: Some(1), shape: Some(TensorShapeProto { dim: dims }) };
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() }),
        ..Default::default()
    }
}

fn attribute(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto { name: Some(name.into()), ..Default::default() };
    match a {
        Attr::Int(i) => {
            p.i = Some(*i);
            p.r#type = Some(AttributeType::Int as i32);
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            p.r#type = Some(AttributeType::Ints as i32);
        }
        Attr::Float(f) => {
            p.f = Some(*f);
            p.r#type = Some(AttributeType::Float as i32);
        }
    }
    p
}

/// The IR version that goes with an opset (onnx/helper.py's table).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        21..=22 => 10,
        _ => 11,
    }
}

fn to_model(g: &Graph, x: &Value, y: &Value) -> ModelProto {
    let nodes = g
        .nodes
        .iter()
        .map(|n| NodeProto {
            op_type: Some(n.op.into()),
            name: Some(n.name.clone()),
            input: n.inputs.clone(),
            output: n.outputs.clone(),
            attribute: n.attrs.iter().map(|(k, a)| attribute(k, a)).collect(),
            ..Default::default()
        })
        .collect();
    let initializer = g
        .initializers
        .iter()
        .map(|(name, init)| match init {
            Init::F32(t) => to_tensor_proto(name, t),
            Init::I64 { dims, data } => ints_proto(name, dims, data),
        })
        .collect();
    // An output that is the input itself (a network of identities) still needs a node.
    let graph = GraphProto {
        name: Some("stride".into()),
        node: nodes,
        initializer,
        input: vec![value_info(&x.name, &x.shape())],
        output: vec![value_info(&y.name, &y.shape())],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(ir_version(g.opset)),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(g.opset) }],
        producer_name: Some("stride".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        ..Default::default()
    }
}
