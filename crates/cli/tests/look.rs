//! `stride features`, `stride gradcam`, `stride occlusion`, `stride patterns` and `stride embed` end to end, on a network trained
//! for one epoch: the pictures' sizes, that they show something, and bad arguments.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stride(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stride")).args(args).env("RAYON_NUM_THREADS", "2").output().expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A trained tutorial CNN and a test digit (a 7) as PNG.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let _ = std::fs::remove_dir_all(dir);
    let run = dir.join("run");
    let out = stride(&["train", "--epochs", "1", "--out", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let test = stride_data::load("mnist").unwrap().test;
    let i = test.labels.iter().position(|&l| l == 7).unwrap();
    let digit = image::GrayImage::from_raw(28, 28, test.images[i * 784..(i + 1) * 784].to_vec()).unwrap();
    let png = dir.join("seven.png");
    digit.save(&png).unwrap();
    (run.join("model.safetensors"), png)
}

fn distinct(img: &image::RgbImage) -> usize {
    let mut seen: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    seen.sort();
    seen.dedup();
    seen.len()
}

#[test]
fn features_and_gradcam_pictures() {
    let dir = std::env::temp_dir().join(format!("stride-look-{}", std::process::id()));
    let (weights, png) = setup(&dir);
    let w = weights.to_str().unwrap();

    let feats = dir.join("features");
    let out = stride(&["features", "--weights", w, "--image", png.to_str().unwrap(), "--out", feats.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // Golden sizes: the 28x28 input enlarged x5; conv 0's 20 maps of 26x26 as 5 x 4 tiles of
    // 52 (x2) with 2-pixel gaps; conv 3's 50 maps of 9x9 as 8 x 7 tiles of 54 (x6); 20 3x3
    // filters as 5 x 4 tiles of 48 (x16).
    for (file, size) in
        [("input.png", (140, 140)), ("layer-0.png", (272, 218)), ("layer-3.png", (8 * 56 + 2, 7 * 56 + 2)), ("filters.png", (252, 202))]
    {
        let img = image::open(feats.join(file)).unwrap_or_else(|e| panic!("{file}: {e}")).to_rgb8();
        assert_eq!(img.dimensions(), size, "{file}");
        assert!(distinct(&img) > 8, "{file} is not blank");
    }

    let cam = dir.join("cam.png");
    let out = stride(&["gradcam", "--weights", w, "--image", png.to_str().unwrap(), "--out", cam.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("predicted 7") && log.contains("at layer 5 (4x4)"), "{log}");
    let img = image::open(&cam).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (224, 224));
    assert!(distinct(&img) > 100, "a heat map, not a flat picture");
    // Another class and layer, by name and path.
    let out = stride(&["gradcam", "--weights", w, "--image", png.to_str().unwrap(), "--out", cam.to_str().unwrap(), "--class", "1", "--layer", "4"]);
    assert!(text(&out).contains("heat map of class 1") && text(&out).contains("at layer 4 (9x9)"), "{}", text(&out));

    for (args, want) in [
        (vec!["gradcam", "--class", "12"], "--class 12: not a class index below 10"),
        (vec!["gradcam", "--layer", "conv9"], "no layer 'conv9'; the layers are: 0, 1, 2"),
        (vec!["gradcam", "--layer", "7"], "layer 7 gives [1, 128], not feature maps"),
        (vec!["features", "--layers", "9"], "layer 9 gives [1, 10], not feature maps"),
    ] {
        let target = dir.join(if args[0] == "gradcam" { "x.png" } else { "x" });
        let mut full = args.clone();
        full.extend(["--weights", w, "--image", png.to_str().unwrap(), "--out", target.to_str().unwrap()]);
        let out = stride(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    }
    // An ONNX export looks the same without --weights: it carries them and the run's header.
    let onnx = dir.join("cnn.onnx");
    let out = stride(&["export", "--weights", w, "--out", onnx.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = stride(&["gradcam", "--model", onnx.to_str().unwrap(), "--image", png.to_str().unwrap(), "--out", cam.to_str().unwrap()]);
    assert!(text(&out).contains("predicted 7") && text(&out).contains("at layer 5 (4x4)"), "{}", text(&out));
    let out = stride(&[
        "features",
        "--model",
        onnx.to_str().unwrap(),
        "--image",
        png.to_str().unwrap(),
        "--out",
        dir.join("onnx-features").to_str().unwrap(),
    ]);
    assert!(out.status.success() && dir.join("onnx-features").join("filters.png").is_file(), "{}", text(&out));
    let out = stride(&["gradcam", "--image", png.to_str().unwrap(), "--out", cam.to_str().unwrap()]);
    assert!(text(&out).contains("--weights is needed: cnn is built with fresh weights"), "{}", text(&out));

    // Patterns: by default 16 channels of the last convolution (layer 3), 4 x 4 tiles of 56.
    let pat = dir.join("patterns.png");
    let out = stride(&["patterns", "--weights", w, "--out", pat.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success() && log.contains("16 patterns for 3 (Conv2d(20, 50, k5x5)), 40 steps"), "{log}");
    let img = image::open(&pat).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (4 * 58 + 2, 4 * 58 + 2));
    assert!(distinct(&img) > 50, "patterns, not flat tiles");
    // On the logits, one per class, named, each class's score raised.
    let out = stride(&["patterns", "--weights", w, "--layer", "9", "--channels", "3,7", "--out", pat.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for class in ["3", "7"] {
        let line = log.lines().find(|l| l.starts_with(&format!("  channel {class} ({class}): mean activation "))).unwrap_or_else(|| panic!("{log}"));
        let nums: Vec<f64> = line.rsplit(": mean activation ").next().unwrap().split(" -> ").map(|v| v.parse().unwrap()).collect();
        assert!(nums[1] > nums[0] + 1.0, "{line}");
    }
    for (args, want) in [
        (vec!["--channels", "a,b"], "--channels: 'a' is not a channel number"),
        (vec!["--layer", "99"], "no layer '99'; the layers are: 0, 1, 2"),
        (vec!["--layer", "3", "--channels", "0,50"], "layer 3 has 50 channels; there is no channel 50"),
    ] {
        let mut full = vec!["patterns", "--weights", w, "--out", pat.to_str().unwrap()];
        full.extend(args.iter().copied());
        let out = stride(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    }
    // Occlusion: the 7's probability falls where its stroke is hidden; the map is 224x224.
    let occ = dir.join("occlusion.png");
    let out = stride(&["occlusion", "--weights", w, "--image", png.to_str().unwrap(), "--out", occ.to_str().unwrap()]);
    let log = text(&out);
    assert!(
        out.status.success() && log.contains("predicted 7") && log.contains("class 7 (") && log.contains("when a 4x4 square (stride 2) hides pixel"),
        "{log}"
    );
    let img = image::open(&occ).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (224, 224));
    assert!(distinct(&img) > 100, "a heat map, not a flat picture");
    for (args, want) in [(vec!["--patch", "0"], "a patch of 1..=28 pixels"), (vec!["--class", "x"], "--class x: not a class index below 10")] {
        let mut full = vec!["occlusion", "--weights", w, "--image", png.to_str().unwrap(), "--out", occ.to_str().unwrap()];
        full.extend(args.iter().copied());
        let out = stride(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    }
    // Embed: the test images at the classifier's input (layer 8, 128 values) on a plane; a wide
    // layer places fewer images.
    let emb = dir.join("embedding.png");
    let out = stride(&["embed", "--weights", w, "--out", emb.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success() && log.contains("2000 test images of mnist at layer 8 (relu), 128 values each, on pc1 ("), "{log}");
    assert_eq!(image::open(&emb).unwrap().to_rgb8().dimensions(), (600, 500));
    let out = stride(&["embed", "--weights", w, "--layer", "0", "--out", emb.to_str().unwrap()]);
    assert!(text(&out).contains("620 test images of mnist at layer 0 (Conv2d(1, 20, k3x3)), 13520 values each"), "{}", text(&out));
    let out = stride(&["embed", "--weights", w, "--layer", "99", "--out", emb.to_str().unwrap()]);
    assert!(out.status.code() == Some(1) && text(&out).contains("no layer '99'"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
