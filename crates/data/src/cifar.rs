//! CIFAR-10's binary format: records of one label byte and 3,072 pixel bytes (the red, green
//! and blue 32x32 planes), in data_batch_1.bin .. data_batch_5.bin and test_batch.bin.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::{Dataset, Split};

const SIDE: usize = 32;
const RECORD: usize = 1 + 3 * SIDE * SIDE;
/// A CIFAR-10 batch file holds 10,000 records; a larger file is not one.
const MAX_RECORDS: usize = 1_000_000;

/// Whether `dir` looks like CIFAR-10's binary folder.
pub fn is_cifar_folder(dir: &Path) -> bool {
    dir.join("data_batch_1.bin").is_file() || dir.join("test_batch.bin").is_file()
}

/// Parses one batch file's bytes into `ds`.
fn append(path: &Path, bytes: &[u8], ds: &mut Dataset) -> Result<()> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        return Err(DataError::format(path, format!("{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records", bytes.len())));
    }
    if bytes.len() / RECORD > MAX_RECORDS {
        return Err(DataError::format(path, format!("{} records is more than a CIFAR-10 batch holds", bytes.len() / RECORD)));
    }
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(DataError::format(path, format!("record {i} has label {}, CIFAR-10 labels are 0..9", rec[0])));
        }
        ds.labels.push(rec[0]);
        ds.images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// Parses one CIFAR-10 batch file held in memory; `path` only names it in errors.
pub fn parse_batch(path: &Path, bytes: &[u8]) -> Result<Dataset> {
    let mut ds = Dataset { images: Vec::new(), labels: Vec::new(), channels: 3, height: SIDE, width: SIDE, classes: 10 };
    append(path, bytes, &mut ds)?;
    Ok(ds)
}

fn read(dir: &Path, names: &[String]) -> Result<Dataset> {
    let mut ds = Dataset { images: Vec::new(), labels: Vec::new(), channels: 3, height: SIDE, width: SIDE, classes: 10 };
    for name in names {
        let path = dir.join(name);
        let meta = std::fs::metadata(&path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        if meta.len() > (MAX_RECORDS * RECORD) as u64 {
            return Err(DataError::format(&path, format!("file of {} bytes is larger than any CIFAR-10 batch", meta.len())));
        }
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        append(&path, &bytes, &mut ds)?;
    }
    Ok(ds)
}

/// Reads the five training batches and the test batch of a CIFAR-10 binary folder.
pub fn cifar10_folder(dir: &Path) -> Result<Split> {
    let train: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
    Ok(Split {
        name: "cifar-10".into(),
        train: read(dir, &train)?,
        test: read(dir, &["test_batch.bin".to_string()])?,
        class_names: crate::dataset::default_class_names("cifar-10", 10),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_corrupt_batches() {
        let mut ds = Dataset { images: vec![], labels: vec![], channels: 3, height: 32, width: 32, classes: 10 };
        let mut two = vec![3u8];
        two.extend((0..3072).map(|i| (i % 251) as u8));
        two.push(9);
        two.extend(vec![7u8; 3072]);
        append(Path::new("b.bin"), &two, &mut ds).unwrap();
        assert_eq!(ds.labels, vec![3, 9]);
        assert_eq!(ds.image(1)[0], 7);
        assert_eq!(ds.image(0)[1024], (1024 % 251) as u8, "green plane follows red");
        let e = append(Path::new("b.bin"), &two[..5000], &mut ds).unwrap_err().to_string();
        assert!(e.contains("5000 bytes is not a whole number of 3073-byte CIFAR-10 records"), "{e}");
        two[0] = 10;
        assert!(append(Path::new("b.bin"), &two, &mut ds).unwrap_err().to_string().contains("record 0 has label 10"));
    }
}
