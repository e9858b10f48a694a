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

/// Every parameter and buffer of `model`, by its PyTorch-style name, in host memory.
pub fn state_dict(model: &mut dyn Module) -> Vec<(String, Tensor<f32>)> {
    // Checkpoints go through the CPU: a tensor on a device is read back (a device that fails
    // to answer panics here, as `Tensor::data` does).
    named_tensors(model)
        .into_iter()
        .map(|(name, t)| {
            let t = if t.device().is_cpu() { t } else { t.to_host().unwrap_or_else(|e| panic!("reading {name} back from {}: {e}", t.device())) };
            (name, t)
        })
        .collect()
}

/// Every parameter and buffer of `model` by name, where they are (shared, not copied).
pub(crate) fn named_tensors(model: &mut dyn Module) -> Vec<(String, Tensor<f32>)> {
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

/// Writes `tensors` to `path` as safetensors, atomically: f32, except batch norm's
/// `num_batches_tracked`, which is int64 as in PyTorch, so the file loads into torchvision.
pub fn save(path: &Path, tensors: &[(String, Tensor<f32>)]) -> Result<()> {
    save_with_metadata(path, tensors, None)
}

/// Like [`save`], with string metadata in the file's header.
pub fn save_with_metadata(path: &Path, tensors: &[(String, Tensor<f32>)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let bytes: Vec<(String, Dtype, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let (dtype, b) = if n.ends_with("num_batches_tracked") {
                (Dtype::I64, t.data().iter().flat_map(|&v| (v as i64).to_le_bytes()).collect())
            } else {
                (Dtype::F32, t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
            };
            (n.clone(), dtype, b, t.shape().to_vec())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, d, b, s)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    let data = safetensors::serialize(views, metadata).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    write_atomic(path, &data)
}

/// Writes `data` to a temporary file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| TrainError::Io(format!("cannot write {}: {e}; the previous file, if any, is unchanged", path.display()));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().map_or("checkpoint".into(), |n| n.to_string_lossy()), std::process::id()));
    let result = (|| -> std::io::Result<()> {
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

/// Removes the temporary files earlier processes left in `dir` when they were killed in the
/// middle of [`write_atomic`] (never the real files: those are only ever renamed into place).
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let own = format!(".tmp-{}", std::process::id());
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with('.') && name.contains(".tmp-") && !name.ends_with(&own);
        if stale && e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Reads a safetensors file as f32 tensors (f64, int64 and int32 tensors are converted, as
/// PyTorch's `num_batches_tracked`). Names, shapes and byte ranges are checked by the
/// safetensors crate before any data is used.
pub fn load(path: &Path) -> Result<HashMap<String, Tensor<f32>>> {
    Ok(load_with_metadata(path)?.0)
}

/// The largest checkpoint or weight file Stride reads (VGG-16's weights are 553 MB).
pub const MAX_FILE_BYTES: u64 = 8 << 30;

/// Tensors by name, as a weight file holds them, with the header's metadata.
pub type WithMetadata = (HashMap<String, Tensor<f32>>, HashMap<String, String>);

/// Like [`load`], also returning the header's metadata (empty when there is none).
pub fn load_with_metadata(path: &Path) -> Result<WithMetadata> {
    let io = |e: std::io::Error| TrainError::Io(format!("{}: {e}", path.display()));
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(TrainError::Checkpoint(format!(
            "{}: {len} bytes is larger than the {MAX_FILE_BYTES}-byte limit for weight files",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    parse(path, &bytes)
}

/// Decodes a safetensors file held in memory; `path` only names it in errors. Nothing in the
/// file is executed; the header's names, dtypes, shapes and byte ranges are checked by the
/// safetensors crate before any tensor is read, and each tensor is converted to f32.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<WithMetadata> {
    let bad = |e: safetensors::SafeTensorError| TrainError::Checkpoint(format!("{}: not a valid safetensors file: {e}", path.display()));
    let st = SafeTensors::deserialize(bytes).map_err(bad)?;
    let metadata = SafeTensors::read_metadata(bytes).map_err(bad)?.1.metadata().clone().unwrap_or_default();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
            Dtype::F64 => raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
            Dtype::I64 => raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
            Dtype::I32 => raw.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32).collect(),
            other => {
                return Err(TrainError::Checkpoint(format!(
                    "{}: tensor '{name}' has dtype {other:?}; Stride reads F32, F64, I64 and I32 (convert with `model.float()` before saving)",
                    path.display()
                )))
            }
        };
        let t = Tensor::from_vec(data, view.shape()).map_err(|e| TrainError::Checkpoint(format!("{}: tensor '{name}': {e}", path.display())))?;
        out.insert(name.clone(), t);
    }
    Ok((out, metadata))
}

/// Copies `tensors` into `model`, checking every name and shape first and reporting the
/// missing, unexpected and mis-shaped entries together (the first few of each kind, with their
/// counts). Nothing is changed on error.
pub fn load_into(model: &mut dyn Module, tensors: &HashMap<String, Tensor<f32>>) -> Result<()> {
    load_checking(model, tensors, false).map(|_| ())
}

/// A tensor of the model that [`load_skipping_mismatched`] left as it was.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub name: String,
    /// The file's shape for it.
    pub file: Vec<usize>,
    /// The model's.
    pub model: Vec<usize>,
}

/// [`load_into`] for fine-tuning (Hugging Face's `ignore_mismatched_sizes`): tensors whose
/// shape differs from the model's (a classifier for another number of classes) are left as the
/// model has them, and returned; every other tensor must fit by name and shape, as for
/// `load_into`. Refused when nothing would be loaded. Nothing is changed on error.
pub fn load_skipping_mismatched(model: &mut dyn Module, tensors: &HashMap<String, Tensor<f32>>) -> Result<Vec<Skipped>> {
    load_checking(model, tensors, true)
}

fn load_checking(model: &mut dyn Module, tensors: &HashMap<String, Tensor<f32>>, skip_mismatched: bool) -> Result<Vec<Skipped>> {
    let (mut missing, mut misshaped, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    model.visit("", &mut |name, slot| {
        let shape = match &slot {
            Slot::Param(v) => v.shape(),
            Slot::Buffer(b) => b.shape().to_vec(),
        };
        match tensors.get(&name) {
            None => missing.push(format!("missing '{name}' {shape:?}")),
            Some(t) if t.shape() != shape && !same_scalar(t.shape(), &shape) => {
                misshaped.push(format!("'{name}' has shape {:?}, the model needs {shape:?}", t.shape()));
                skipped.push(Skipped { name: name.clone(), file: t.shape().to_vec(), model: shape });
            }
            Some(_) => {}
        }
        seen.insert(name);
    });
    let mut unexpected: Vec<String> = tensors.keys().filter(|k| !seen.contains(*k)).map(|k| format!("unexpected '{k}'")).collect();
    unexpected.sort();
    if skip_mismatched && !skipped.is_empty() && skipped.len() == seen.len() {
        return Err(TrainError::Checkpoint(format!("none of the {} tensors fits the model: every shape differs", seen.len())));
    }
    if skip_mismatched {
        misshaped.clear();
    }
    if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() {
        let skip: std::collections::HashSet<&str> = skipped.iter().map(|s| s.name.as_str()).collect();
        load_checked(model, tensors, &skip)?;
        return Ok(skipped);
    }
    // A file of another model misses everything: the counts, and a few names of each kind,
    // say so in a line rather than a screenful.
    const SHOWN: usize = 6;
    let mut problems = Vec::new();
    for (kind, list) in [("missing", &missing), ("mis-shaped", &misshaped), ("unexpected", &unexpected)] {
        problems.extend(list.iter().take(SHOWN).cloned());
        if list.len() > SHOWN {
            problems.push(format!("... and {} more {kind}", list.len() - SHOWN));
        }
    }
    let stranger = if missing.len() == seen.len() && unexpected.len() == tensors.len() {
        "; no name is the model's: are these another model's weights?"
    } else {
        ""
    };
    Err(TrainError::Checkpoint(format!(
        "weights do not fit the model ({} of its {} tensors missing, {} mis-shaped, {} of the file's {} unexpected{stranger}): {}",
        missing.len(),
        seen.len(),
        misshaped.len(),
        unexpected.len(),
        tensors.len(),
        problems.join("; ")
    )))
}

/// Copies `tensors`, whose names and shapes fit `model` but for the names in `skip`, into it.
fn load_checked(model: &mut dyn Module, tensors: &HashMap<String, Tensor<f32>>, skip: &std::collections::HashSet<&str>) -> Result<()> {
    let mut result = Ok(());
    model.visit("", &mut |name, slot| {
        if skip.contains(name.as_str()) {
            return;
        }
        let t = tensors[&name].clone();
        let shape = match &slot {
            Slot::Param(v) => v.shape(),
            Slot::Buffer(b) => b.shape().to_vec(),
        };
        let t = if t.shape() == shape { t } else { Tensor::from_vec(t.data().to_vec(), &shape).expect("one element either way") };
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

/// A scalar saved as shape [] or [1] (older Stride files kept `num_batches_tracked` as [1]).
fn same_scalar(a: &[usize], b: &[usize]) -> bool {
    a.len() <= 1 && b.len() <= 1 && a.iter().product::<usize>() == 1 && b.iter().product::<usize>() == 1
}
