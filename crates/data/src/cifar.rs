//! CIFAR's binary formats. CIFAR-10: records of one label byte and 3,072 pixel bytes (the red,
//! green and blue 32x32 planes), in data_batch_1.bin .. data_batch_5.bin and test_batch.bin.
//! CIFAR-100: records of a coarse label byte (20 superclasses), a fine label byte (100
//! classes) and the same 3,072 pixel bytes, in train.bin and test.bin, with the class names
//! one per line in fine_label_names.txt and coarse_label_names.txt.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::{Dataset, Split};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;
/// A CIFAR batch file holds 10,000 (CIFAR-10) or 50,000 (CIFAR-100's train.bin) records; a
/// larger file is not one.
const MAX_RECORDS: usize = 1_000_000;

/// How a CIFAR file lays out its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    /// CIFAR-10: one label byte, 10 classes.
    Ten,
    /// CIFAR-100's 100 fine classes (the second label byte).
    Fine,
    /// CIFAR-100's 20 coarse superclasses (the first label byte).
    Coarse,
}

impl Labels {
    fn record(self) -> usize {
        match self {
            Labels::Ten => 1 + PIXELS,
            Labels::Fine | Labels::Coarse => 2 + PIXELS,
        }
    }
    fn classes(self) -> usize {
        match self {
            Labels::Ten => 10,
            Labels::Fine => 100,
            Labels::Coarse => 20,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Labels::Ten => "CIFAR-10",
            Labels::Fine | Labels::Coarse => "CIFAR-100",
        }
    }
    /// Where the label byte sits in a record.
    fn at(self) -> usize {
        match self {
            Labels::Ten | Labels::Coarse => 0,
            Labels::Fine => 1,
        }
    }
}

/// Whether `dir` looks like CIFAR-10's binary folder.
pub fn is_cifar_folder(dir: &Path) -> bool {
    dir.join("data_batch_1.bin").is_file() || dir.join("test_batch.bin").is_file()
}

/// Whether `dir` looks like CIFAR-100's binary folder (cifar-100-binary).
pub fn is_cifar100_folder(dir: &Path) -> bool {
    dir.join("train.bin").is_file() && dir.join("test.bin").is_file()
}

/// Parses one batch file's bytes into `ds`.
fn append(path: &Path, bytes: &[u8], labels: Labels, ds: &mut Dataset) -> Result<()> {
    let (record, classes, name) = (labels.record(), labels.classes(), labels.name());
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(DataError::format(path, format!("{} bytes is not a whole number of {record}-byte {name} records", bytes.len())));
    }
    if bytes.len() / record > MAX_RECORDS {
        return Err(DataError::format(path, format!("{} records is more than a {name} file holds", bytes.len() / record)));
    }
    let first = record - PIXELS;
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        // Both of CIFAR-100's labels are checked, whichever is kept.
        for (k, &l) in rec[..first].iter().enumerate() {
            let limit = if labels == Labels::Ten {
                10
            } else if k == 0 {
                20
            } else {
                100
            };
            if l as usize >= limit {
                let which = match (labels, k) {
                    (Labels::Ten, _) => "label",
                    (_, 0) => "coarse label",
                    _ => "fine label",
                };
                return Err(DataError::format(path, format!("record {i} has {which} {l}, {name}'s are 0..{}", limit - 1)));
            }
        }
        ds.labels.push(rec[labels.at()]);
        ds.images.extend_from_slice(&rec[first..]);
    }
    debug_assert!(ds.labels.iter().all(|&l| (l as usize) < classes));
    Ok(())
}

fn empty(labels: Labels) -> Dataset {
    Dataset { images: Vec::new(), labels: Vec::new(), channels: 3, height: SIDE, width: SIDE, classes: labels.classes() }
}

/// Parses one CIFAR-10 batch file held in memory; `path` only names it in errors.
pub fn parse_batch(path: &Path, bytes: &[u8]) -> Result<Dataset> {
    parse(path, bytes, Labels::Ten)
}

/// Parses one CIFAR file held in memory with the given layout; `path` only names it in errors.
pub fn parse(path: &Path, bytes: &[u8], labels: Labels) -> Result<Dataset> {
    let mut ds = empty(labels);
    append(path, bytes, labels, &mut ds)?;
    Ok(ds)
}

fn read(dir: &Path, names: &[String], labels: Labels) -> Result<Dataset> {
    let mut ds = empty(labels);
    for name in names {
        let path = dir.join(name);
        let meta = std::fs::metadata(&path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        if meta.len() > (MAX_RECORDS * labels.record()) as u64 {
            return Err(DataError::format(&path, format!("file of {} bytes is larger than any {} file", meta.len(), labels.name())));
        }
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        append(&path, &bytes, labels, &mut ds)?;
    }
    Ok(ds)
}

/// Reads the five training batches and the test batch of a CIFAR-10 binary folder.
pub fn cifar10_folder(dir: &Path) -> Result<Split> {
    let train: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
    Ok(Split {
        name: "cifar-10".into(),
        train: read(dir, &train, Labels::Ten)?,
        test: read(dir, &["test_batch.bin".to_string()], Labels::Ten)?,
        class_names: crate::dataset::default_class_names("cifar-10", 10),
    })
}

/// Reads CIFAR-100's binary folder (train.bin, test.bin) with its fine or coarse labels;
/// the class names come from fine_label_names.txt or coarse_label_names.txt beside them (the
/// label numbers where that file is missing or does not name every class).
pub fn cifar100_folder(dir: &Path, labels: Labels) -> Result<Split> {
    if labels == Labels::Ten {
        return Err(DataError::Other("CIFAR-100 has fine or coarse labels".into()));
    }
    let classes = labels.classes();
    let file = if labels == Labels::Fine { "fine_label_names.txt" } else { "coarse_label_names.txt" };
    // A names file is a few kilobytes; a larger one is not CIFAR-100's.
    let names = std::fs::metadata(dir.join(file))
        .ok()
        .filter(|m| m.len() < 1 << 20)
        .and_then(|_| std::fs::read_to_string(dir.join(file)).ok())
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect::<Vec<_>>())
        .filter(|n| n.len() == classes)
        .unwrap_or_else(|| (0..classes).map(|c| c.to_string()).collect());
    let name = if labels == Labels::Fine { "cifar-100" } else { "cifar-100 (coarse)" };
    Ok(Split {
        name: name.into(),
        train: read(dir, &["train.bin".to_string()], labels)?,
        test: read(dir, &["test.bin".to_string()], labels)?,
        class_names: names,
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
        append(Path::new("b.bin"), &two, Labels::Ten, &mut ds).unwrap();
        assert_eq!(ds.labels, vec![3, 9]);
        assert_eq!(ds.image(1)[0], 7);
        assert_eq!(ds.image(0)[1024], (1024 % 251) as u8, "green plane follows red");
        let e = append(Path::new("b.bin"), &two[..5000], Labels::Ten, &mut ds).unwrap_err().to_string();
        assert!(e.contains("5000 bytes is not a whole number of 3073-byte CIFAR-10 records"), "{e}");
        two[0] = 10;
        assert!(append(Path::new("b.bin"), &two, Labels::Ten, &mut ds)
            .unwrap_err()
            .to_string()
            .contains("record 0 has label 10, CIFAR-10's are 0..9"));
    }

    #[test]
    fn cifar100_records_keep_the_fine_or_the_coarse_label() {
        let mut two = vec![19u8, 99];
        two.extend((0..3072).map(|i| (i % 251) as u8));
        two.extend([4u8, 30]);
        two.extend(vec![7u8; 3072]);
        let fine = parse(Path::new("train.bin"), &two, Labels::Fine).unwrap();
        assert_eq!((fine.labels.clone(), fine.classes), (vec![99, 30], 100));
        assert_eq!((fine.image(1)[0], fine.image(0)[1024]), (7, (1024 % 251) as u8));
        let coarse = parse(Path::new("train.bin"), &two, Labels::Coarse).unwrap();
        assert_eq!((coarse.labels.clone(), coarse.classes), (vec![19, 4], 20));
        assert_eq!(coarse.images, fine.images);
        let e = parse(Path::new("t.bin"), &two[..3075], Labels::Fine).unwrap_err().to_string();
        assert!(e.contains("3075 bytes is not a whole number of 3074-byte CIFAR-100 records"), "{e}");
        // A bad label in either byte is refused, whichever is kept.
        let mut bad = two.clone();
        bad[3074] = 20;
        let e = parse(Path::new("t.bin"), &bad, Labels::Fine).unwrap_err().to_string();
        assert!(e.contains("record 1 has coarse label 20, CIFAR-100's are 0..19"), "{e}");
        let mut bad = two;
        bad[1] = 100;
        let e = parse(Path::new("t.bin"), &bad, Labels::Coarse).unwrap_err().to_string();
        assert!(e.contains("record 0 has fine label 100, CIFAR-100's are 0..99"), "{e}");
    }
}
