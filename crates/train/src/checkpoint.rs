//! Weights and buffers as safetensors files, written atomically (temp file, fsync, rename), so
//! a crash at any moment leaves either the old file or the new one, never half of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use stride_autograd::Tensor;
use stride_nn::{Module, Slot};

use crate::{Result, TrainError};

/// Every parameter and buffer of `model`, by its PyTorch-style name.
pub fn state_dict(model: &mut dyn Module) -> Vec<(String, Tensor<f32>)> {
    let mut out = Vec::new();
    model.visit("", &mut |name, slot| {
        let t = match slot {
            Slot::Param(v) => v.value(),
            Slot::Buffer(b) => b.clone(),
        };
        out.push((name, t));
    });
    out
}

/// Writes `tensors` to `path` as safetensors (f32), atomically.
pub fn save(path: &Path, tensors: &[(String, Tensor<f32>)]) -> Result<()> {
    save_with_metadata(path, tensors, None)
}

/// Like [`save`], with string metadata in the file's header.
pub fn save_with_metadata(path: &Path, tensors: &[(String, Tensor<f32>)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.data().iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape().to_vec())).collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, s)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    let data = safetensors::serialize(views, metadata).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    write_atomic(path, &data)
}

/// Writes `data` to a temporary file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| TrainError::Io(format!("{}: {e}", path.display()));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().map_or("checkpoint".into(), |n| n.to_string_lossy()), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Reads a safetensors file; every tensor must be f32. Names, shapes and byte ranges are
/// checked by the safetensors crate before any data is used.
pub fn load(path: &Path) -> Result<HashMap<String, Tensor<f32>>> {
    Ok(load_with_metadata(path)?.0)
}

/// Like [`load`], also returning the header's metadata (empty when there is none).
pub fn load_with_metadata(path: &Path) -> Result<(HashMap<String, Tensor<f32>>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let bad = |e: safetensors::SafeTensorError| TrainError::Checkpoint(format!("{}: not a valid safetensors file: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
    let metadata = SafeTensors::read_metadata(&bytes).map_err(bad)?.1.metadata().clone().unwrap_or_default();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(TrainError::Checkpoint(format!("{}: tensor '{name}' has dtype {:?}, expected F32", path.display(), view.dtype())));
        }
        let data: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        let t = Tensor::from_vec(data, view.shape()).map_err(|e| TrainError::Checkpoint(format!("{}: tensor '{name}': {e}", path.display())))?;
        out.insert(name.clone(), t);
    }
    Ok((out, metadata))
}

/// Copies `tensors` into `model`, checking every name and shape first and reporting all
/// missing, unexpected and mis-shaped entries together. Nothing is changed on error.
pub fn load_into(model: &mut dyn Module, tensors: &HashMap<String, Tensor<f32>>) -> Result<()> {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    model.visit("", &mut |name, slot| {
        let shape = match &slot {
            Slot::Param(v) => v.shape(),
            Slot::Buffer(b) => b.shape().to_vec(),
        };
        match tensors.get(&name) {
            None => problems.push(format!("missing '{name}' {shape:?}")),
            Some(t) if t.shape() != shape => problems.push(format!("'{name}' has shape {:?}, the model needs {shape:?}", t.shape())),
            Some(_) => {}
        }
        seen.insert(name);
    });
    let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !seen.contains(*k)).collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|k| format!("unexpected '{k}'")));
    if !problems.is_empty() {
        return Err(TrainError::Checkpoint(format!("weights do not fit the model: {}", problems.join("; "))));
    }
    let mut result = Ok(());
    model.visit("", &mut |name, slot| {
        let t = tensors[&name].clone();
        match slot {
            Slot::Param(v) => {
                if let Err(e) = v.set_value(t) {
                    result = Err(TrainError::Checkpoint(e.to_string()));
                }
            }
            Slot::Buffer(b) => *b = t,
        }
    });
    result
}
