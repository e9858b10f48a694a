//! The IDX reader on the embedded data and on corrupt files, and the batch iterator.

use std::path::Path;

use stride_data::{embedded_mnist, idx, load, Augment, Batches};
use stride_tensor::Rng;

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

#[test]
fn embedded_mnist_is_the_documented_split() {
    let s = embedded_mnist().unwrap();
    assert_eq!((s.train.len(), s.test.len()), (8000, 2000));
    assert_eq!((s.train.channels, s.train.height, s.train.width, s.train.classes), (1, 28, 28, 10));
    // Stratified: 20% of each digit's 1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978.
    assert_eq!(s.test.class_counts(), vec![200, 225, 198, 206, 196, 173, 203, 214, 189, 196]);
    assert_eq!(s.train.class_counts().iter().sum::<usize>(), 8000);
    // Real digits: blank corners, the full byte range, and about a fifth of the pixels inked.
    for i in 0..100 {
        let img = s.train.image(i);
        assert_eq!((img[0], img[27], img[783]), (0, 0, 0));
        assert!(img.iter().any(|&p| p > 200), "image {i} has no dark stroke");
    }
    let inked = (0..100).map(|i| s.train.image(i).iter().filter(|&&p| p > 0).count()).sum::<usize>() / 100;
    assert!((80..250).contains(&inked), "{inked} inked pixels per image on average");
}

#[test]
fn corrupt_idx_files_are_named_errors() {
    let p = Path::new("x.idx");
    let err = |b: &[u8]| idx::parse(p, b).unwrap_err().to_string();
    assert_eq!(err(&[0, 0]), "x.idx: too short for an IDX header (2 bytes)");
    assert!(err(&[1, 2, 3, 4, 5]).contains("bad magic number"));
    assert!(err(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0]).contains("element type 0x0d is not supported"));
    assert!(err(&[0, 0, 8, 3, 0, 0]).contains("header declares 3 dimensions"));
    assert!(err(&idx_bytes(&[2, 3], &[1, 2, 3, 4, 5])).contains("truncated: dimensions [2, 3] need 6 bytes of data, found 5"));
    assert!(err(&idx_bytes(&[2], &[1, 2, 3])).contains("trailing bytes"));
    // A header that claims 2^64 elements is an error, not an allocation.
    assert!(err(&idx_bytes(&[u32::MAX, u32::MAX, u32::MAX], &[])).contains("declare more than"));
    // Truncated gzip.
    let gz = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/mnist/t10k-labels-idx1-ubyte.gz")).unwrap();
    assert!(err(&gz[..gz.len() / 2]).contains("not a valid gzip stream"));
    assert_eq!(idx::parse(p, &gz).unwrap().dims, vec![2000]);
    assert_eq!(idx::parse(p, &idx_bytes(&[2, 1], &[7, 9])).unwrap().data, vec![7, 9]);
}

#[test]
fn folders_are_checked_file_by_file() {
    let dir = std::env::temp_dir().join(format!("stride-idx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = load(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("no train-images-idx3-ubyte"), "{e}");
    std::fs::write(dir.join("train-images-idx3-ubyte"), idx_bytes(&[2, 2, 2], &[0; 8])).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx_bytes(&[3], &[0, 1, 2])).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx_bytes(&[1, 2, 2], &[0; 4])).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_bytes(&[1], &[1])).unwrap();
    let e = load(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("3 labels for 2 images"), "{e}");
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx_bytes(&[2], &[0, 1])).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx_bytes(&[1, 3, 2], &[0; 6])).unwrap();
    let e = load(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("test images are 1x3x2 but training images are 1x2x2"), "{e}");
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx_bytes(&[1, 2, 2], &[0; 4])).unwrap();
    let s = load(dir.to_str().unwrap()).unwrap();
    assert_eq!((s.train.len(), s.test.len(), s.train.classes), (2, 1, 2));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(load("/no/such/folder").unwrap_err().to_string().contains("not `mnist`, `fashion-mnist` or an existing folder"));
}

#[test]
fn labels_outside_the_classes_are_refused_with_index_value_and_range() {
    let p = Path::new("labels.idx");
    let err = |labels: &[u8], classes| stride_data::check_labels(labels, classes, p).unwrap_err().to_string();
    // A stray 200 among digits: the gap 10..199 gives it away, with or without a known count.
    let mut digits: Vec<u8> = (0..50).map(|i| i % 10).collect();
    digits[37] = 200;
    assert_eq!(
        err(&digits, None),
        "labels.idx: label 200 at index 37 is outside the classes 0..9 that the labels number without a gap (no label is 10..199)"
    );
    assert_eq!(err(&digits, Some(10)), "labels.idx: label 200 at index 37 is outside this data set's classes 0..9");
    // With the count known, even a label just past it (10 for digits) is caught.
    digits[37] = 10;
    assert_eq!(err(&digits, Some(10)), "labels.idx: label 10 at index 37 is outside this data set's classes 0..9");
    // A missing class in the middle names the first label past it.
    assert_eq!(
        err(&[0, 1, 3, 1, 0], None),
        "labels.idx: label 3 at index 2 is outside the classes 0..1 that the labels number without a gap (no label is 2)"
    );
    assert_eq!(err(&[4, 4, 4], None), "labels.idx: all 3 labels are 4: a classifier needs at least two classes");
    assert!(err(&[], None).contains("all 0 labels are none"));
    // Accepted: consecutive labels, and sets numbered from 1 (EMNIST letters: 1..26).
    assert_eq!(stride_data::check_labels(&[2, 0, 1, 1], None, p).unwrap(), 3);
    assert_eq!(stride_data::check_labels(&(1..=26).collect::<Vec<u8>>(), None, p).unwrap(), 27);
    assert_eq!(stride_data::check_labels(&[0, 1], Some(10), p).unwrap(), 10);
}

#[test]
fn idx_folders_refuse_stray_training_and_test_labels() {
    let dir = std::env::temp_dir().join(format!("stride-labels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let images = |n: u32| idx_bytes(&[n, 2, 2], &vec![0; 4 * n as usize]);
    std::fs::write(dir.join("train-images-idx3-ubyte"), images(6)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx_bytes(&[6], &[0, 1, 2, 200, 1, 0])).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), images(3)).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_bytes(&[3], &[2, 1, 0])).unwrap();
    let e = load(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("train-labels-idx1-ubyte: label 200 at index 3 is outside the classes 0..2"), "{e}");
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx_bytes(&[6], &[0, 1, 2, 2, 1, 0])).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_bytes(&[3], &[2, 1, 3])).unwrap();
    let e = load(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("t10k-labels-idx1-ubyte: label 3 at index 2 is outside the training labels' classes 0..2"), "{e}");
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_bytes(&[3], &[1, 1, 0])).unwrap();
    let s = load(dir.to_str().unwrap()).unwrap();
    assert_eq!((s.train.classes, s.test.classes), (3, 3), "a test set may lack a class");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_image_folder_with_one_class_is_refused() {
    let dir = std::env::temp_dir().join(format!("stride-oneclass-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_image_folder(&dir, 5, false);
    std::fs::remove_dir_all(dir.join("square")).unwrap();
    let e = load(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("one class folder ('circle'): a classifier needs at least two"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn batches_cover_the_epoch_once_in_a_seeded_order() {
    let s = embedded_mnist().unwrap();
    let ds = &s.test;
    let b: Vec<_> = Batches::new(ds, 300, Some(&mut Rng::seed(1)), false).collect();
    assert_eq!(b.len(), 7);
    assert_eq!(b[0].images.shape(), [300, 1, 28, 28]);
    assert_eq!(b[6].labels.len(), 200);
    let mut counts = [0; 10];
    b.iter().flat_map(|x| &x.labels).for_each(|&l| counts[l] += 1);
    assert_eq!(counts.to_vec(), ds.class_counts());
    let again: Vec<_> = Batches::new(ds, 300, Some(&mut Rng::seed(1)), false).map(|x| x.labels).collect();
    assert_eq!(again, b.iter().map(|x| x.labels.clone()).collect::<Vec<_>>());
    assert_eq!(Batches::new(ds, 300, None, true).num_batches(), 6);
    assert_eq!(Batches::new(ds, 300, None, true).count(), 6);
    assert!(b[0].images.data().iter().all(|&v| (0.0..=1.0).contains(&v)));
}

#[test]
fn a_validation_split_holds_out_each_class_share_by_the_seed() {
    let ds = embedded_mnist().unwrap().train;
    let (train, val) = ds.split_validation(0.1, 7).unwrap();
    // Each class gives its share, rounded: 10% of every class, the parts summing to the whole.
    let expected: Vec<usize> = ds.class_counts().iter().map(|&c| (c as f64 * 0.1).round() as usize).collect();
    assert_eq!(val.class_counts(), expected);
    assert_eq!(train.len() + val.len(), ds.len());
    assert_eq!(ds.validation_size(0.1), val.len());
    assert_eq!(ds.training_class_counts(0.1), train.class_counts());
    assert_eq!((train.channels, train.height, train.width, train.classes), (ds.channels, ds.height, ds.width, ds.classes));
    // Every image lands in exactly one part, both parts in the set's order: walking the set once
    // with a cursor in each part meets every image (an image is matched by its pixels and label).
    let (mut t, mut v) = (0, 0);
    for i in 0..ds.len() {
        let is = |part: &stride_data::Dataset, j: usize| j < part.len() && part.image(j) == ds.image(i) && part.labels[j] == ds.labels[i];
        if is(&val, v) {
            v += 1;
        } else {
            assert!(is(&train, t), "image {i} is in neither part at its place");
            t += 1;
        }
    }
    assert_eq!((t, v), (train.len(), val.len()));
    // The same seed holds out the same images; another seed others.
    assert_eq!(ds.split_validation(0.1, 7).unwrap().1, val);
    assert_ne!(ds.split_validation(0.1, 8).unwrap().1, val);
    // Fractions outside (0, 1), and ones that leave a part empty, are refused by name.
    for f in [0.0, 1.0, -0.5, f64::NAN] {
        let e = ds.split_validation(f, 0).unwrap_err().to_string();
        assert!(e.contains("between 0 and 1"), "{f}: {e}");
    }
    let two = ds.subset(&[0, 1]).unwrap();
    assert!(ds.subset(&[0, 8000]).unwrap_err().to_string().contains("index 8000 is past the 8000 images"));
    let e = two.split_validation(0.2, 0).unwrap_err().to_string();
    assert!(e.contains("of 2 training images leaves 2 for training and 0 for validation"), "{e}");
}

#[test]
fn augmented_batches_differ_from_plain_ones_and_repeat_with_the_seed() {
    let s = embedded_mnist().unwrap();
    let plain: Vec<_> = Batches::new(&s.test, 100, None, false).take(2).collect();
    let flip = Augment { hflip: true, ..Augment::default() };
    let aug = |seed| Batches::new(&s.test, 100, None, false).augmented(&flip, seed).take(2).map(|b| b.images).collect::<Vec<_>>();
    let (a, b) = (aug(5), aug(5));
    assert_eq!(a, b, "the same seed gives the same images");
    assert_ne!(a, aug(6));
    // About half the images are mirrored: compare each to its plain version.
    let per = 28 * 28;
    let mut mirrored = 0;
    for (x, y) in a.iter().zip(&plain) {
        for (p, q) in x.data().chunks(per).zip(y.images.data().chunks(per)) {
            if p != q {
                mirrored += 1;
                for r in 0..28 {
                    for c in 0..28 {
                        assert_eq!(p[r * 28 + c], q[r * 28 + 27 - c]);
                    }
                }
            }
        }
    }
    assert!((60..140).contains(&mirrored), "{mirrored} of 200 mirrored");
    // Identity augmentation changes nothing.
    let same: Vec<_> = Batches::new(&s.test, 100, None, false).augmented(&Augment::default(), 1).take(2).map(|b| b.images).collect();
    assert_eq!(same, plain.iter().map(|b| b.images.clone()).collect::<Vec<_>>());
}

/// Writes a small image folder: `circle` and `square` classes of 16x12 pictures.
pub fn write_image_folder(dir: &std::path::Path, per_class: usize, rgb: bool) {
    for (class, square) in [("circle", false), ("square", true)] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(16, 12, |x, y| {
                let (dx, dy) = (x as i32 - 8, y as i32 - 6);
                let inside = if square { dx.abs() < 4 + (i % 2) as i32 && dy.abs() < 4 } else { dx * dx + dy * dy < 16 + i as i32 };
                let v = if inside { 230 } else { 20 };
                image::Rgb(if rgb { [v, 255 - v, 128] } else { [v, v, v] })
            });
            let name = dir.join(class).join(format!("{i:03}.{}", if i % 3 == 0 { "jpg" } else { "png" }));
            // Grey pictures are stored as grey images (one channel), colour ones as RGB.
            if rgb {
                img.save(&name).unwrap();
            } else {
                image::DynamicImage::ImageRgb8(img).to_luma8().save(&name).unwrap();
            }
        }
    }
}

#[test]
fn image_folders_split_and_decode() {
    let dir = std::env::temp_dir().join(format!("stride-imgs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_image_folder(&dir, 10, false);
    std::fs::write(dir.join("circle").join("notes.txt"), "not an image").unwrap();
    let s = load(dir.to_str().unwrap()).unwrap();
    assert_eq!(s.class_names, vec!["circle", "square"]);
    assert_eq!((s.train.len(), s.test.len()), (16, 4), "every fifth image is a test image");
    assert_eq!((s.train.channels, s.train.height, s.train.width, s.train.classes), (1, 12, 16, 2));
    assert_eq!(s.test.labels, vec![0, 0, 1, 1]);
    // The centre is bright, the corner dark (PNG exactly, JPEG nearly).
    let img = s.train.image(0);
    assert!(img[6 * 16 + 8] > 200 && img[0] < 40, "{} {}", img[6 * 16 + 8], img[0]);
    // Colour images give three planes.
    let rgb = dir.with_extension("rgb");
    let _ = std::fs::remove_dir_all(&rgb);
    write_image_folder(&rgb, 5, true);
    let c = load(rgb.to_str().unwrap()).unwrap();
    assert_eq!(c.train.channels, 3);
    assert!(c.train.image(0)[16 * 12] > 200, "green plane of a dark pixel is bright");
    // A corrupt image is named.
    std::fs::write(dir.join("square").join("bad.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let e = load(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("bad.png") && e.contains("cannot decode"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&rgb).unwrap();
}

#[test]
fn an_image_claiming_more_pixels_than_the_limit_is_refused_before_decoding() {
    // A 483-byte JPEG (found by the fuzzer) whose header claims 11,519 x 9,461 x 3 pixels.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/image/jpeg-claims-11519x9461.jpg");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 483);
    let e = stride_data::decode_image(&path, &bytes).unwrap_err().to_string();
    assert!(e.contains("cannot decode the image") && e.to_lowercase().contains("limit"), "{e}");
}

/// CIFAR-10's and CIFAR-100's binary folders, as their archives unpack, found by `--data`.
#[test]
fn cifar_folders_are_found_and_read_with_their_class_names() {
    let root = std::env::temp_dir().join(format!("stride-cifar-{}", std::process::id()));
    let (ten, hundred) = (root.join("cifar-10-batches-bin"), root.join("cifar-100-binary"));
    std::fs::create_dir_all(&ten).unwrap();
    std::fs::create_dir_all(&hundred).unwrap();
    // Records whose first pixel is the record's number, so the order can be followed.
    let records = |labels: &[&[u8]]| -> Vec<u8> {
        labels.iter().enumerate().flat_map(|(i, l)| l.iter().copied().chain(std::iter::once(i as u8)).chain(std::iter::repeat_n(9, 3071))).collect()
    };
    for b in 1..=5 {
        std::fs::write(ten.join(format!("data_batch_{b}.bin")), records(&[&[b as u8], &[0]])).unwrap();
    }
    std::fs::write(ten.join("test_batch.bin"), records(&[&[9]])).unwrap();
    let s = load(ten.to_str().unwrap()).unwrap();
    assert_eq!((s.name.as_str(), s.train.len(), s.test.len(), s.train.classes), ("cifar-10", 10, 1, 10));
    assert_eq!(&s.train.labels[..4], [1, 0, 2, 0]);
    assert_eq!((s.class_names[0].as_str(), s.class_names[9].as_str()), ("airplane", "truck"));

    std::fs::write(hundred.join("train.bin"), records(&[&[3, 42], &[19, 99], &[0, 7]])).unwrap();
    std::fs::write(hundred.join("test.bin"), records(&[&[5, 1]])).unwrap();
    let fine_names: String = (0..100).map(|c| format!("fine{c}\n")).collect();
    std::fs::write(hundred.join("fine_label_names.txt"), fine_names).unwrap();
    let s = load(hundred.to_str().unwrap()).unwrap();
    assert_eq!((s.name.as_str(), s.train.classes, s.train.channels, s.train.height), ("cifar-100", 100, 3, 32));
    assert_eq!((s.train.labels.clone(), s.test.labels.clone()), (vec![42, 99, 7], vec![1]));
    assert_eq!((s.train.image(1)[0], s.train.image(1)[1]), (1, 9));
    assert_eq!((s.class_names[42].as_str(), s.class_names.len()), ("fine42", 100));
    // The superclasses, with no names file: numbered.
    let c = load(&format!("{}:coarse", hundred.display())).unwrap();
    assert_eq!((c.name.as_str(), c.train.classes, c.train.labels.clone()), ("cifar-100 (coarse)", 20, vec![3, 19, 0]));
    assert_eq!(c.class_names, (0..20).map(|c| c.to_string()).collect::<Vec<_>>());
    assert_eq!(c.train.images, s.train.images);
    let e = load(&format!("{}:coarse", ten.display())).unwrap_err().to_string();
    assert!(e.contains("`:coarse` picks CIFAR-100's superclasses, but") && e.contains("holds no train.bin and test.bin"), "{e}");
    // A record cut short is named with its file.
    std::fs::write(hundred.join("test.bin"), vec![1u8; 3000]).unwrap();
    let e = load(hundred.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("test.bin") && e.contains("3000 bytes is not a whole number of 3074-byte CIFAR-100 records"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}

/// An augmentation spec written back (report.html's caption, `stride augment`) parses to the
/// same augmentation.
#[test]
fn augmentation_specs_round_trip() {
    for spec in ["none", "hflip", "hflip,vflip,crop4,rotate10,erase0.5", "resizedcrop0.35,hflip,jitter0.4", "crop2"] {
        let a = Augment::parse(spec).unwrap();
        assert_eq!(Augment::parse(&a.to_string()).unwrap(), a, "{spec} -> {a}");
    }
    assert_eq!(Augment::parse("rotate10,hflip").unwrap().to_string(), "hflip,rotate10");
}
