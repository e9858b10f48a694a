//! The IDX format of MNIST, Fashion-MNIST, KMNIST and EMNIST, raw or gzipped.
//!
//! Header: two zero bytes, a type byte (0x08 = unsigned byte, the only one these sets use), the
//! number of dimensions, then each dimension as a big-endian u32; then the data, row-major.

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;

use crate::error::{DataError, Result};

/// The most elements one IDX file may declare (the full EMNIST is about 0.7e9 bytes).
pub const MAX_IDX_BYTES: usize = 1 << 31;

/// A decoded IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Whether `bytes` start with the gzip magic number.
fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Decodes an IDX file's bytes (gzipped or not). `path` is only used in error messages.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Idx> {
    let raw;
    let bytes = if is_gzip(bytes) {
        // Read at most one byte past the limit, so a gzip bomb is an error, not an allocation.
        let mut out = Vec::new();
        GzDecoder::new(bytes)
            .take(MAX_IDX_BYTES as u64 + 1024 + 1)
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("not a valid gzip stream: {e}")))?;
        raw = out;
        &raw[..]
    } else {
        bytes
    };
    if bytes.len() < 4 {
        return Err(DataError::format(path, format!("too short for an IDX header ({} bytes)", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::format(
            path,
            format!("bad magic number {:02x}{:02x}{:02x}{:02x}: not an IDX file", bytes[0], bytes[1], bytes[2], bytes[3]),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::format(path, format!("element type 0x{:02x} is not supported (only unsigned bytes, 0x08)", bytes[2])));
    }
    let rank = bytes[3] as usize;
    if rank == 0 || rank > 4 {
        return Err(DataError::format(path, format!("{rank} dimensions: expected 1 (labels) to 4")));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(DataError::format(path, format!("header declares {rank} dimensions but the file ends after {} bytes", bytes.len())));
    }
    let dims: Vec<usize> = (0..rank).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize).collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_IDX_BYTES)
        .ok_or_else(|| DataError::format(path, format!("dimensions {dims:?} declare more than {MAX_IDX_BYTES} elements")))?;
    let body = &bytes[header..];
    if body.len() != count {
        let what = if body.len() < count { "truncated" } else { "has trailing bytes" };
        return Err(DataError::format(path, format!("{what}: dimensions {dims:?} need {count} bytes of data, found {}", body.len())));
    }
    Ok(Idx { dims, data: body.to_vec() })
}

/// Reads and decodes an IDX file from disk.
pub fn read(path: &Path) -> Result<Idx> {
    let meta = std::fs::metadata(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    if meta.len() > MAX_IDX_BYTES as u64 + 1024 {
        return Err(DataError::format(path, format!("file of {} bytes is larger than any IDX data set", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    parse(path, &bytes)
}
