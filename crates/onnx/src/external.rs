//! Tensors whose data lies outside the model file (ONNX's external data: `location`, `offset`,
//! `length` beside the tensor). PyTorch's `torch.onnx.export` writes its weights so by default
//! (`model.onnx` and `model.onnx.data`); [`crate::read`] loads them into the tensors.
//!
//! A location must be a relative path inside the model's folder (no `..`, no absolute path, as
//! ONNX Runtime requires), and every byte range must lie inside its file: nothing is allocated
//! for data that is not on the disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use crate::proto::{ModelProto, TensorProto};
use crate::{err, Result};

/// ONNX's `data_location` value for data in another file.
const EXTERNAL: i32 = 1;

/// Reads every initializer (and Constant node value) kept outside the model into its
/// `raw_data`, resolving locations against `dir`, the model file's folder.
pub(crate) fn load(model: &mut ModelProto, dir: &Path) -> Result<()> {
    let Some(graph) = model.graph.as_mut() else { return Ok(()) };
    let mut files: HashMap<PathBuf, (File, u64)> = HashMap::new();
    let constants = graph.node.iter_mut().flat_map(|n| n.attribute.iter_mut()).filter_map(|a| a.t.as_mut());
    for t in graph.initializer.iter_mut().chain(constants) {
        if t.data_location == Some(EXTERNAL) {
            fill(t, dir, &mut files)?;
        }
    }
    Ok(())
}

/// One tensor's bytes from its file.
fn fill(t: &mut TensorProto, dir: &Path, files: &mut HashMap<PathBuf, (File, u64)>) -> Result<()> {
    let name = t.name.clone().unwrap_or_default();
    let fail = |msg: String| err(format!("tensor '{name}': {msg}"));
    let mut location = None;
    let (mut offset, mut length) = (0u64, None);
    for e in &t.external_data {
        let value = e.value.as_deref().unwrap_or("");
        let number = || {
            value.trim().parse::<u64>().map_err(|_| fail(format!("external data {} '{value}' is not a byte count", e.key.as_deref().unwrap_or(""))))
        };
        match e.key.as_deref().unwrap_or("") {
            "location" => location = Some(value.to_string()),
            "offset" => offset = number()?,
            "length" => length = Some(number()?),
            _ => {} // checksum and anything newer: not needed to read the bytes
        }
    }
    let location = location.ok_or_else(|| fail("external data without a location".into()))?;
    let rel = Path::new(&location);
    if location.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(fail(format!("external data location '{location}' must be a file name inside the model's folder")));
    }
    let path = dir.join(rel);
    let (file, size) = match files.entry(path.clone()) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            let f = File::open(&path).map_err(|e| fail(format!("external data {}: {e}", path.display())))?;
            let size = f.metadata().map_err(|e| fail(format!("external data {}: {e}", path.display())))?.len();
            v.insert((f, size))
        }
    };
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > *size) {
        return Err(fail(format!(
            "external data asks for bytes {offset}..{} of {}, which has {size}",
            offset.saturating_add(length),
            path.display()
        )));
    }
    let mut bytes = vec![0u8; usize::try_from(length).map_err(|_| fail(format!("{length} bytes of external data are too many")))?];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| fail(format!("external data {}: {e}", path.display())))?;
    t.raw_data = Some(bytes);
    t.external_data.clear();
    t.data_location = None;
    Ok(())
}
