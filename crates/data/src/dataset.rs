//! Labelled image sets held as bytes, and where they come from (`--data`).

use std::path::{Path, PathBuf};

use stride_tensor::Rng;

use crate::error::{DataError, Result};
use crate::idx;

/// Images as bytes in NCHW order with one class label each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// [N, C, H, W] pixel bytes.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Pixels of one image.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.channels * self.height * self.width;
        &self.images[i * n..(i + 1) * n]
    }
    /// Mean and standard deviation of all pixels scaled to [0, 1].
    pub fn pixel_stats(&self) -> (f32, f32) {
        let n = self.images.len().max(1) as f64;
        let mean = self.images.iter().map(|&b| b as f64).sum::<f64>() / n / 255.0;
        let var = self.images.iter().map(|&b| (b as f64 / 255.0 - mean).powi(2)).sum::<f64>() / n;
        (mean as f32, var.sqrt() as f32)
    }
    /// Every image resized to `height` x `width` (bilinear, per channel), e.g. 28x28 digits to
    /// the 32x32 that VGG or the VAE expect.
    pub fn resized(&self, height: usize, width: usize) -> Result<Dataset> {
        if !(1..=4096).contains(&height) || !(1..=4096).contains(&width) {
            return Err(DataError::Other(format!("cannot resize to {height}x{width}: each side must be 1..=4096")));
        }
        if (height, width) == (self.height, self.width) {
            return Ok(self.clone());
        }
        let bytes = self.len() as u64 * self.channels as u64 * height as u64 * width as u64;
        if bytes > crate::folder::MAX_BYTES as u64 {
            return Err(DataError::Other(format!(
                "resizing {} images to {height}x{width} needs {bytes} bytes, over the {} limit",
                self.len(),
                crate::folder::MAX_BYTES as u64
            )));
        }
        let plane = self.height * self.width;
        let mut images = Vec::with_capacity(bytes as usize);
        for p in self.images.chunks_exact(plane) {
            let img = image::GrayImage::from_raw(self.width as u32, self.height as u32, p.to_vec()).expect("plane size");
            images.extend(image::imageops::resize(&img, width as u32, height as u32, image::imageops::FilterType::Triangle).into_raw());
        }
        Ok(Dataset { images, height, width, ..self.clone() })
    }

    /// Examples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }

    /// The images at `indices`, in that order; an index past the end is refused by name.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(DataError::Other(format!("subset: index {i} is past the {} images of the set", self.len())));
        }
        let plane = self.channels * self.height * self.width;
        Ok(Dataset {
            images: indices.iter().flat_map(|&i| self.images[i * plane..(i + 1) * plane].iter().copied()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            ..*self
        })
    }

    /// How many images [`split_validation`](Self::split_validation) holds out for `fraction`.
    pub fn validation_size(&self, fraction: f64) -> usize {
        self.class_counts().into_iter().map(|n| held_out(n, fraction)).sum()
    }

    /// Images per class that [`split_validation`](Self::split_validation) keeps for training.
    pub fn training_class_counts(&self, fraction: f64) -> Vec<usize> {
        self.class_counts().into_iter().map(|n| n - held_out(n, fraction)).collect()
    }

    /// Holds out `fraction` of the images for validation: (the rest, the held-out part). The
    /// same share of every class is held out (rounded, so a class of 9 images at 0.1 gives one),
    /// drawn at random by `seed`, and both parts keep the set's order. A fraction outside
    /// (0, 1), or one that leaves either part empty, is refused.
    pub fn split_validation(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(DataError::Other(format!("the validation split must be a fraction between 0 and 1, such as 0.1; got {fraction}")));
        }
        let mut rng = Rng::seed(seed ^ 0x5641_4C49_4441_5445);
        let mut by_class = vec![Vec::new(); self.classes];
        for (i, &l) in self.labels.iter().enumerate() {
            if let Some(members) = by_class.get_mut(l as usize) {
                members.push(i);
            }
        }
        let mut held = vec![false; self.len()];
        for members in &mut by_class {
            rng.shuffle(members);
            let k = held_out(members.len(), fraction);
            for &i in &members[..k.min(members.len())] {
                held[i] = true;
            }
        }
        let (val, train): (Vec<usize>, Vec<usize>) = (0..self.len()).partition(|&i| held[i]);
        if val.is_empty() || train.is_empty() {
            return Err(DataError::Other(format!(
                "a validation split of {fraction} of {} training images leaves {} for training and {} for validation; both need at least one",
                self.len(),
                train.len(),
                val.len()
            )));
        }
        Ok((self.subset(&train)?, self.subset(&val)?))
    }
}

/// Images of a class of `count` that a validation split of `fraction` holds out.
fn held_out(count: usize, fraction: f64) -> usize {
    ((count as f64 * fraction).round() as usize).min(count)
}

/// A training set and a test set of the same image size and classes.
#[derive(Clone, Debug)]
pub struct Split {
    pub name: String,
    pub train: Dataset,
    pub test: Dataset,
    /// A name per class index ("0".."9" for digits, "T-shirt/top".. for Fashion-MNIST,
    /// folder names for image folders).
    pub class_names: Vec<String>,
}

impl Split {
    /// Both halves resized to `height` x `width`; the name says so.
    pub fn resized(&self, height: usize, width: usize) -> Result<Split> {
        if (height, width) == (self.train.height, self.train.width) {
            return Ok(self.clone());
        }
        Ok(Split {
            name: format!("{} at {height}x{width}", self.name),
            train: self.train.resized(height, width)?,
            test: self.test.resized(height, width)?,
            class_names: self.class_names.clone(),
        })
    }
}

/// Fashion-MNIST's class names, by label.
pub const FASHION_CLASSES: [&str; 10] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
/// CIFAR-10's class names, by label.
pub const CIFAR10_CLASSES: [&str; 10] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Class names for a data set known by name, else the label numbers.
pub fn default_class_names(name: &str, classes: usize) -> Vec<String> {
    match name {
        "fashion-mnist" if classes == 10 => FASHION_CLASSES.iter().map(|s| s.to_string()).collect(),
        "cifar-10" if classes == 10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        _ => (0..classes).map(|c| c.to_string()).collect(),
    }
}

/// Where Debian's `dataset-fashion-mnist` installs Fashion-MNIST.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

const EMBEDDED: [&[u8]; 4] = [
    include_bytes!("../../../data/mnist/train-images-idx3-ubyte.gz"),
    include_bytes!("../../../data/mnist/train-labels-idx1-ubyte.gz"),
    include_bytes!("../../../data/mnist/t10k-images-idx3-ubyte.gz"),
    include_bytes!("../../../data/mnist/t10k-labels-idx1-ubyte.gz"),
];
const IDX_NAMES: [&str; 4] = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// The classes a label file numbers, checked: every label in 0..classes, no class between
/// 1 and the largest label without an example (class 0 may be empty, for sets numbered from 1
/// such as EMNIST letters), and at least two classes. With `expected` (a data set whose class
/// count is known, such as MNIST's 10) every label must be below it. A stray label (200 in a
/// file of digits) is named with its index, value and the allowed range.
pub fn check_labels(labels: &[u8], expected: Option<usize>, path: &Path) -> Result<usize> {
    if let Some(classes) = expected {
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
            return Err(DataError::format(path, format!("label {l} at index {i} is outside this data set's classes 0..{}", classes - 1)));
        }
    }
    let mut counts = [0usize; 256];
    for &l in labels {
        counts[l as usize] += 1;
    }
    let used = counts.iter().filter(|&&c| c > 0).count();
    if used < 2 {
        let first = labels.first().map_or_else(|| "none".to_string(), |l| l.to_string());
        return Err(DataError::format(path, format!("all {} labels are {first}: a classifier needs at least two classes", labels.len())));
    }
    let max = counts.iter().rposition(|&c| c > 0).expect("two labels are used");
    if let Some(gap) = (1..max).find(|&c| counts[c] == 0) {
        let next = (gap..=max).find(|&c| counts[c] > 0).expect("max is used");
        let (i, &l) = labels.iter().enumerate().find(|(_, &l)| l as usize >= next).expect("a label at or above next");
        let range = if next - 1 > gap { format!("{gap}..{}", next - 1) } else { gap.to_string() };
        return Err(DataError::format(
            path,
            format!("label {l} at index {i} is outside the classes 0..{} that the labels number without a gap (no label is {range})", gap - 1),
        ));
    }
    Ok(expected.unwrap_or(max + 1))
}

/// The height and width of an IDX image file's images, checked against its label file.
fn idx_shape(images: &idx::Idx, labels: &idx::Idx, image_path: &Path, label_path: &Path) -> Result<(usize, usize)> {
    let (n, h, w) = match images.dims[..] {
        [n, h, w] => (n, h, w),
        _ => return Err(DataError::format(image_path, format!("image file has dimensions {:?}, expected [count, height, width]", images.dims))),
    };
    if labels.dims.len() != 1 {
        return Err(DataError::format(label_path, format!("label file has dimensions {:?}, expected [count]", labels.dims)));
    }
    if labels.dims[0] != n {
        return Err(DataError::format(label_path, format!("{} labels for {n} images in {}", labels.dims[0], image_path.display())));
    }
    if n == 0 || h == 0 || w == 0 {
        return Err(DataError::format(image_path, format!("no images (dimensions {:?})", images.dims)));
    }
    Ok((h, w))
}

/// Builds a data set from an IDX image file and an IDX label file, checking they agree and
/// that the labels number the classes ([`check_labels`]; `classes` is the class count when the
/// data set's is known).
pub fn from_idx(images: idx::Idx, labels: idx::Idx, image_path: &Path, label_path: &Path, classes: Option<usize>) -> Result<Dataset> {
    let (height, width) = idx_shape(&images, &labels, image_path, label_path)?;
    let classes = check_labels(&labels.data, classes, label_path)?;
    Ok(Dataset { images: images.data, labels: labels.data, channels: 1, height, width, classes })
}

/// A training and a test set read from IDX files (images, labels, test images, test labels).
/// The test labels must be among the training set's classes; the test set may lack some.
fn idx_pair(name: &str, parsed: Vec<idx::Idx>, paths: &[PathBuf], classes: Option<usize>) -> Result<Split> {
    let mut it = parsed.into_iter();
    let (ti, tl, vi, vl) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    let train = from_idx(ti, tl, &paths[0], &paths[1], classes)?;
    let (height, width) = idx_shape(&vi, &vl, &paths[2], &paths[3])?;
    if (height, width) != (train.height, train.width) {
        return Err(DataError::format(
            &paths[2],
            format!("test images are 1x{height}x{width} but training images are 1x{}x{}", train.height, train.width),
        ));
    }
    if let Some((i, &l)) = vl.data.iter().enumerate().find(|(_, &l)| l as usize >= train.classes) {
        return Err(DataError::format(&paths[3], format!("label {l} at index {i} is outside the training labels' classes 0..{}", train.classes - 1)));
    }
    let test = Dataset { images: vi.data, labels: vl.data, channels: 1, height, width, classes: train.classes };
    let class_names = default_class_names(name, train.classes);
    Ok(Split { name: name.to_string(), train, test, class_names })
}

/// The embedded MNIST: 8,000 training and 2,000 test digits (see data/mnist/make_idx.py).
pub fn embedded_mnist() -> Result<Split> {
    let p: Vec<PathBuf> = IDX_NAMES.iter().map(|n| PathBuf::from(format!("<embedded mnist>/{n}.gz"))).collect();
    let parsed: Vec<idx::Idx> = EMBEDDED.iter().zip(&p).map(|(b, p)| idx::parse(p, b)).collect::<Result<_>>()?;
    idx_pair("mnist", parsed, &p, Some(10))
}

/// The file for `name` in `dir`, raw or gzipped (MNIST's file names, also with `.` for `-`
/// before "idx" as some mirrors write them).
fn find_idx(dir: &Path, name: &str) -> Option<PathBuf> {
    let dotted = name.replacen("-idx", ".idx", 1);
    [name.to_string(), format!("{name}.gz"), dotted.clone(), format!("{dotted}.gz")].into_iter().map(|f| dir.join(f)).find(|p| p.is_file())
}

/// A folder holding the four IDX files under MNIST's names, raw or `.gz`. `classes` is the
/// data set's class count where it is known (10 for Fashion-MNIST); otherwise the training
/// labels give it.
pub fn idx_folder(dir: &Path, name: &str, classes: Option<usize>) -> Result<Split> {
    let mut paths = Vec::new();
    for n in IDX_NAMES {
        paths.push(find_idx(dir, n).ok_or_else(|| {
            DataError::format(dir, format!("no {n} (or {n}.gz) here: an IDX data set folder holds the four files of MNIST's layout"))
        })?);
    }
    let parsed: Vec<idx::Idx> = paths.iter().map(|p| idx::read(p)).collect::<Result<_>>()?;
    idx_pair(name, parsed, &paths, classes)
}

/// Resolves `--data`: `mnist` (embedded), `fashion-mnist` (Debian's package), or a folder:
/// CIFAR-10's binary batches (`data_batch_1.bin` ...), CIFAR-100's (`train.bin`, `test.bin`;
/// its 100 fine classes, or with `:coarse` after the folder its 20 superclasses), the four IDX
/// files of MNIST's layout, or an image folder (one sub-folder of PNG/JPEG images per class).
pub fn load(spec: &str) -> Result<Split> {
    match spec {
        "mnist" => embedded_mnist(),
        "fashion-mnist" => {
            let dir = Path::new(FASHION_MNIST_DIR);
            if !dir.is_dir() {
                return Err(DataError::Other(format!("fashion-mnist: {FASHION_MNIST_DIR} does not exist; install it with `apt-get install dataset-fashion-mnist`, or pass the folder that holds its four IDX files")));
            }
            idx_folder(dir, "fashion-mnist", Some(FASHION_CLASSES.len()))
        }
        path => {
            // CIFAR-100's 20 superclasses: the folder with `:coarse` after it.
            if let Some(dir) = path.strip_suffix(":coarse").map(Path::new).filter(|d| !Path::new(path).exists() && d.is_dir()) {
                if !crate::cifar::is_cifar100_folder(dir) {
                    return Err(DataError::Other(format!(
                        "--data {path}: `:coarse` picks CIFAR-100's superclasses, but {} holds no train.bin and test.bin",
                        dir.display()
                    )));
                }
                return crate::cifar::cifar100_folder(dir, crate::cifar::Labels::Coarse);
            }
            let dir = Path::new(path);
            if !dir.is_dir() {
                return Err(DataError::Other(format!("--data {path}: not `mnist`, `fashion-mnist` or an existing folder")));
            }
            if crate::cifar::is_cifar_folder(dir) {
                return crate::cifar::cifar10_folder(dir);
            }
            if crate::cifar::is_cifar100_folder(dir) {
                return crate::cifar::cifar100_folder(dir, crate::cifar::Labels::Fine);
            }
            if find_idx(dir, IDX_NAMES[0]).is_none() && crate::folder::is_image_folder(dir) {
                return crate::folder::image_folder(dir);
            }
            idx_folder(dir, &dir.file_name().map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned()), None)
        }
    }
}
