//! ONNX in and out.
//!
//! Export: every layer writes its ONNX form into a [`stride_nn::export::Graph`] (the layer knows
//! its operators; this crate only encodes), then [`write`] turns the graph into a `ModelProto`.
//! Import: [`read`] decodes a file (bounded: its size is checked before it is read, every
//! tensor's element count against its bytes), and [`import`] turns the graph into a
//! [`Network`] of Stride's existing layers. An operator or attribute Stride lacks is refused
//! with its name, the node's name and the opset, never guessed.
//!
//! The protobuf messages (`proto`) were generated once from ONNX 1.23.2's `onnx.proto` with
//! prost-build (`scripts/onnx/gen_proto.sh`) and are checked in: building needs no protoc.
#![forbid(unsafe_code)]

mod cumsum;
mod external;
mod import;
mod indices;
mod matmul;
mod network;
mod norm;
mod pad;
#[allow(clippy::all, missing_docs, rustdoc::all)]
#[rustfmt::skip]
pub mod proto;
mod resize;
mod select;
mod tensor;
mod write;

pub use import::{import, import_with, Imported, OPERATORS};
pub use network::Network;
pub use tensor::{from_tensor_proto, to_tensor_proto};
pub use write::{export, export_annotated, export_with, ToOnnx, DEFAULT_OPSET};

use prost::Message;
use stride_autograd::Error;

/// Files larger than this are refused before they are read (protobuf's own limit is 2 GiB).
pub const MAX_FILE_BYTES: u64 = 2 << 30;

pub type Result<T> = stride_nn::Result<T>;

pub(crate) fn err(msg: impl Into<String>) -> stride_nn::Error {
    Error::arg("onnx", msg).into()
}

/// Decodes a model from bytes.
pub fn decode(bytes: &[u8]) -> Result<proto::ModelProto> {
    proto::ModelProto::decode(bytes).map_err(|e| err(format!("not an ONNX model: {e}")))
}

/// Reads and decodes an ONNX file, refusing one over [`MAX_FILE_BYTES`] before reading it.
/// Tensors kept in files beside it (ONNX's external data, as PyTorch's exporter writes by
/// default: `model.onnx.data`) are read in too.
pub fn read(path: &std::path::Path) -> Result<proto::ModelProto> {
    let len = std::fs::metadata(path).map_err(|e| err(format!("{}: {e}", path.display())))?.len();
    if len > MAX_FILE_BYTES {
        return Err(err(format!("{}: {len} bytes is over ONNX's 2 GiB limit", path.display())));
    }
    let bytes = std::fs::read(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let mut model = decode(&bytes).map_err(|e| e.context(path.display().to_string()))?;
    external::load(&mut model, path.parent().unwrap_or(std::path::Path::new(""))).map_err(|e| e.context(path.display().to_string()))?;
    Ok(model)
}

/// Only the `metadata_props` of a `ModelProto` (field 14): decoding it skips the graph's
/// fields without building them.
#[derive(Clone, PartialEq, Message)]
struct MetadataOnly {
    #[prost(message, repeated, tag = "14")]
    metadata_props: Vec<proto::StringStringEntryProto>,
}

/// The model's `metadata_props` (ONNX Runtime's `custom_metadata_map`) as key-value pairs, read
/// without building the graph; entries without a key are left out, a missing value is empty.
pub fn read_metadata(path: &std::path::Path) -> Result<std::collections::HashMap<String, String>> {
    let len = std::fs::metadata(path).map_err(|e| err(format!("{}: {e}", path.display())))?.len();
    if len > MAX_FILE_BYTES {
        return Err(err(format!("{}: {len} bytes is over ONNX's 2 GiB limit", path.display())));
    }
    let bytes = std::fs::read(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let m = MetadataOnly::decode(bytes.as_slice()).map_err(|e| err(format!("{}: not an ONNX model: {e}", path.display())))?;
    Ok(metadata_map(&m.metadata_props))
}

/// Key-value entries as a map (the last of a repeated key wins).
pub(crate) fn metadata_map(props: &[proto::StringStringEntryProto]) -> std::collections::HashMap<String, String> {
    props.iter().filter_map(|p| Some((p.key.clone()?, p.value.clone().unwrap_or_default()))).collect()
}

/// Encodes a model to bytes.
pub fn encode(m: &proto::ModelProto) -> Vec<u8> {
    m.encode_to_vec()
}
