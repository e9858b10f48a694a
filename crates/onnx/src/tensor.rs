//! TensorProto to and from Stride's tensors: f32 data, int64 for shapes and index lists.

use stride_autograd::Tensor;

use crate::proto::{tensor_proto::DataType, TensorProto};
use crate::{err, Result};

/// A constant read from a file.
#[derive(Clone, Debug)]
pub enum Const {
    F32(Tensor<f32>),
    /// Integers (int64 or int32 in the file) and their dimensions.
    I64(Vec<i64>, Vec<usize>),
    /// Booleans (a Where's condition) and their dimensions.
    Bool(Vec<bool>, Vec<usize>),
}

/// A float tensor as a TensorProto with raw little-endian data.
pub fn to_tensor_proto(name: &str, t: &Tensor<f32>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(t.data().iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// An int64 list as a TensorProto.
pub(crate) fn ints_proto(name: &str, dims: &[usize], data: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// The element count of `dims`, refusing negative or overflowing dimensions.
fn numel(name: &str, dims: &[i64]) -> Result<(Vec<usize>, usize)> {
    let mut shape = Vec::with_capacity(dims.len());
    let mut n: usize = 1;
    for &d in dims {
        let d = usize::try_from(d).map_err(|_| err(format!("tensor '{name}' has a negative dimension in {dims:?}")))?;
        n = n.checked_mul(d).ok_or_else(|| err(format!("tensor '{name}' with dimensions {dims:?} is too large")))?;
        shape.push(d);
    }
    Ok((shape, n))
}

/// Reads a float, int64 (or int32) or bool TensorProto; any other type, or data still outside the file, is refused
/// with the tensor's name. The element count must match the data present.
pub(crate) fn read_const(t: &TensorProto) -> Result<Const> {
    let name = t.name.as_deref().unwrap_or("");
    if t.data_location == Some(1) {
        return Err(err(format!(
            "tensor '{name}' keeps its data in an external file: read the model from its path (stride_onnx::read), which loads the file beside it"
        )));
    }
    let (shape, n) = numel(name, &t.dims)?;
    let dt = t.data_type.unwrap_or(0);
    let raw = t.raw_data.as_deref();
    let count = |have: usize, width: usize| -> Result<()> {
        if have != n {
            return Err(err(format!(
                "tensor '{name}' has dimensions {:?} ({n} values) but holds {have}{}",
                t.dims,
                if width > 0 { format!(" ({} bytes)", have * width) } else { String::new() }
            )));
        }
        Ok(())
    };
    if dt == DataType::Float as i32 {
        let data: Vec<f32> = match raw {
            Some(r) => {
                if r.len() % 4 != 0 {
                    return Err(err(format!("tensor '{name}': {} raw bytes are not whole f32 values", r.len())));
                }
                count(r.len() / 4, 4)?;
                r.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            None => {
                count(t.float_data.len(), 0)?;
                t.float_data.clone()
            }
        };
        return Ok(Const::F32(Tensor::from_vec(data, &shape).map_err(|e| err(format!("tensor '{name}': {e}")))?));
    }
    if dt == DataType::Int64 as i32 || dt == DataType::Int32 as i32 {
        let width = if dt == DataType::Int64 as i32 { 8 } else { 4 };
        let data: Vec<i64> = match raw {
            Some(r) => {
                if r.len() % width != 0 {
                    return Err(err(format!("tensor '{name}': {} raw bytes are not whole {}-byte integers", r.len(), width)));
                }
                count(r.len() / width, width)?;
                if width == 8 {
                    r.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
                } else {
                    r.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect()
                }
            }
            None if width == 8 => {
                count(t.int64_data.len(), 0)?;
                t.int64_data.clone()
            }
            None => {
                count(t.int32_data.len(), 0)?;
                t.int32_data.iter().map(|&v| v as i64).collect()
            }
        };
        return Ok(Const::I64(data, shape));
    }
    if dt == DataType::Bool as i32 {
        let data: Vec<bool> = match raw {
            Some(r) => {
                count(r.len(), 1)?;
                r.iter().map(|&b| b != 0).collect()
            }
            None => {
                count(t.int32_data.len(), 0)?;
                t.int32_data.iter().map(|&v| v != 0).collect()
            }
        };
        return Ok(Const::Bool(data, shape));
    }
    Err(err(format!("tensor '{name}' has element type {}; Stride computes in float32 (shapes in int64)", type_name(dt))))
}

/// ONNX's name for an element type.
pub(crate) fn type_name(dt: i32) -> String {
    DataType::try_from(dt).map(|d| d.as_str_name().to_lowercase()).unwrap_or_else(|_| format!("#{dt}"))
}

/// A float TensorProto as a tensor (the test data of ONNX's node tests, a `run` input).
pub fn from_tensor_proto(t: &TensorProto) -> Result<Tensor<f32>> {
    match read_const(t)? {
        Const::F32(t) => Ok(t),
        Const::I64(..) => Err(err(format!("tensor '{}' holds integers, not float32", t.name.as_deref().unwrap_or("")))),
        Const::Bool(..) => Err(err(format!("tensor '{}' holds booleans, not float32", t.name.as_deref().unwrap_or("")))),
    }
}
