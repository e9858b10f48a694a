//! Image folders: one sub-folder per class (named after it), PNG or JPEG files inside, as
//! torchvision's `ImageFolder`. With `train/` and `test/` sub-folders those are the split;
//! otherwise every fifth image of each class (in file-name order) is a test image.
//! Every image is brought to the size and colour of the first one (grey: 1 channel, else RGB).

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::{Dataset, Split};

/// The most pixel bytes an image folder may decode into memory (4 GiB).
pub(crate) const MAX_BYTES: usize = 1 << 32;
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|source| DataError::Io { path: dir.into(), source })?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

fn is_image(p: &Path) -> bool {
    p.is_file() && p.extension().is_some_and(|e| EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
}

/// The PNG and JPEG files under `dir`, in its sub-folders too (a data set's class layout), in
/// sorted order; folders deeper than 8 levels are not entered.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        for p in list(dir)? {
            if p.is_dir() && depth < 8 {
                walk(&p, depth + 1, out)?;
            } else if is_image(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out)?;
    Ok(out)
}

/// Whether `dir` is laid out as an image folder (class sub-folders holding images).
pub fn is_image_folder(dir: &Path) -> bool {
    let root = if dir.join("train").is_dir() { dir.join("train") } else { dir.to_path_buf() };
    list(&root).is_ok_and(|entries| entries.iter().any(|c| c.is_dir() && list(c).is_ok_and(|f| f.iter().any(|p| is_image(p)))))
}

/// Class folders and their image files under `root`.
fn classes(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut out = Vec::new();
    for c in list(root)?.into_iter().filter(|p| p.is_dir()) {
        let files: Vec<PathBuf> = list(&c)?.into_iter().filter(|p| is_image(p)).collect();
        if !files.is_empty() {
            out.push((c.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned()), files));
        }
    }
    if out.is_empty() {
        return Err(DataError::format(root, "no class folders with PNG or JPEG images inside"));
    }
    if out.len() > 256 {
        return Err(DataError::format(root, format!("{} class folders: at most 256 classes are supported", out.len())));
    }
    Ok(out)
}

/// The largest image side and decoding buffer any image may claim.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
pub const MAX_IMAGE_ALLOC: u64 = 256 << 20;

/// Decodes an image file, whatever its format (by content, not by name).
fn decode(path: &Path) -> Result<image::DynamicImage> {
    let io = |source| DataError::Io { path: path.into(), source };
    let mut reader = image::ImageReader::open(path).map_err(io)?.with_guessed_format().map_err(io)?;
    reader.limits(limits());
    reader.decode().map_err(|e| DataError::format(path, format!("cannot decode the image: {e}")))
}

fn limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_IMAGE_ALLOC);
    l
}

/// Decodes an image held in memory (PNG or JPEG, by content) to (channels, height, width,
/// planar bytes): 1 channel for grey images, else 3. `path` only names it in errors. A header
/// claiming more than 16,384 pixels a side or 256 MiB of pixels (a 483-byte JPEG claiming 11,519 x 9,461 pixels took a second to decode) is an error, not an allocation.
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<(usize, usize, usize, Vec<u8>)> {
    let io = |source| DataError::Io { path: path.into(), source };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(io)?;
    reader.limits(limits());
    let img = reader.decode().map_err(|e| DataError::format(path, format!("cannot decode the image: {e}")))?;
    let c = if img.color().has_color() { 3 } else { 1 };
    let (h, w) = (img.height() as usize, img.width() as usize);
    Ok((c, h, w, planar(&img, c, h, w)))
}

/// `img` as `channels` planes of h x w bytes.
fn planar(img: &image::DynamicImage, channels: usize, h: usize, w: usize) -> Vec<u8> {
    if channels == 1 {
        return img.to_luma8().into_raw();
    }
    let rgb = img.to_rgb8();
    let mut planes = vec![0u8; 3 * h * w];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            planes[c * h * w + i] = px.0[c];
        }
    }
    planes
}

/// Decodes `path` to `channels` x `h` x `w` bytes (planar), resizing if needed.
pub fn load_image(path: &Path, channels: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    let img = decode(path)?;
    let img = if (img.width() as usize, img.height() as usize) != (w, h) {
        img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    Ok(planar(&img, channels, h, w))
}

/// The size and colour of an image: (channels, height, width).
pub fn image_shape(path: &Path) -> Result<(usize, usize, usize)> {
    let img = decode(path)?;
    let channels = if img.color().has_color() { 3 } else { 1 };
    Ok((channels, img.height() as usize, img.width() as usize))
}

fn build(files: &[(PathBuf, u8)], shape: (usize, usize, usize), classes: usize) -> Result<Dataset> {
    let (c, h, w) = shape;
    let per = c * h * w;
    if files.len().saturating_mul(per) > MAX_BYTES {
        return Err(DataError::Other(format!("{} images of {c}x{h}x{w} need more than {MAX_BYTES} bytes", files.len())));
    }
    let mut ds = Dataset { images: Vec::with_capacity(files.len() * per), labels: Vec::new(), channels: c, height: h, width: w, classes };
    for (p, label) in files {
        ds.images.extend(load_image(p, c, h, w)?);
        ds.labels.push(*label);
    }
    Ok(ds)
}

/// Reads an image folder (see the module docs).
pub fn image_folder(dir: &Path) -> Result<Split> {
    let split_dirs = dir.join("train").is_dir() && dir.join("test").is_dir();
    let train_classes = classes(&if split_dirs { dir.join("train") } else { dir.to_path_buf() })?;
    let names: Vec<String> = train_classes.iter().map(|(n, _)| n.clone()).collect();
    if names.len() < 2 {
        let root = if split_dirs { dir.join("train") } else { dir.to_path_buf() };
        return Err(DataError::format(
            root,
            format!("one class folder ('{}'): a classifier needs at least two, one sub-folder of images per class", names[0]),
        ));
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    if split_dirs {
        for (label, (_, files)) in train_classes.iter().enumerate() {
            train.extend(files.iter().map(|f| (f.clone(), label as u8)));
        }
        for (name, files) in classes(&dir.join("test"))? {
            let label = names
                .iter()
                .position(|n| *n == name)
                .ok_or_else(|| DataError::format(dir.join("test").join(&name), format!("class '{name}' has no training folder")))?;
            test.extend(files.into_iter().map(|f| (f, label as u8)));
        }
    } else {
        for (label, (_, files)) in train_classes.iter().enumerate() {
            for (i, f) in files.iter().enumerate() {
                if i % 5 == 4 { &mut test } else { &mut train }.push((f.clone(), label as u8));
            }
        }
        if test.is_empty() {
            return Err(DataError::format(dir, "too few images for a test split (every fifth image of a class is a test image)"));
        }
    }
    let shape = image_shape(&train[0].0)?;
    let name = dir.file_name().map_or_else(|| "images".to_string(), |n| n.to_string_lossy().into_owned());
    Ok(Split { name, train: build(&train, shape, names.len())?, test: build(&test, shape, names.len())?, class_names: names })
}
