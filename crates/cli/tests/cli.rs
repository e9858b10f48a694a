//! The `stride` binary end to end: train, Ctrl-C and resume, eval, run, and bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn stride(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stride")).args(args).env("RAYON_NUM_THREADS", "2").output().expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn tmp(name: &str) -> common::Scratch {
    common::Scratch::new("stride-cli", name)
}

#[test]
fn train_then_eval_and_run() {
    let dir = tmp("train");
    let out = stride(&["train", "--epochs", "1", "--out", dir.to_str().unwrap(), "--debug"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
    let acc: f64 = last.strip_prefix("test accuracy ").expect("last line states the accuracy").parse().unwrap();
    assert!(acc > 0.85, "one epoch on 8,000 digits: {acc}");
    assert!(log.contains("Conv2d(20, 50, k5x5") && log.contains("-> [64, 800]"), "--debug prints shapes: {log}");
    for f in ["metrics.csv", "model.safetensors", "checkpoint.safetensors", "curves.png"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // eval reproduces the accuracy from the saved weights.
    let ev = stride(&["eval", "--weights", dir.join("model.safetensors").to_str().unwrap()]);
    assert!(ev.status.success(), "{}", text(&ev));
    assert_eq!(String::from_utf8_lossy(&ev.stdout).lines().last().unwrap(), last);
    assert!(text(&ev).contains("confusion matrix"));
    // A row per class (precision, recall, F1, images), then the macro average over them.
    let out = String::from_utf8_lossy(&ev.stdout).to_string();
    let rows: Vec<Vec<&str>> = out.lines().skip(2).take(11).map(|l| l.split_whitespace().collect()).collect();
    assert!(rows[..10].iter().enumerate().all(|(c, r)| r.len() == 5 && r[0] == c.to_string()), "{out}");
    let images: usize = rows[..10].iter().map(|r| r[4].parse::<usize>().unwrap()).sum();
    assert_eq!((rows[10][..2].join(" "), rows[10][5].parse::<usize>().unwrap(), images), ("macro average".to_string(), 2000, 2000), "{out}");
    // The same as one JSON object.
    let js = stride(&["eval", "--weights", dir.join("model.safetensors").to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&js)));
    assert_eq!(format!("test accuracy {:.4}", v["accuracy"].as_f64().unwrap()), last);
    let cells: u64 = v["confusion"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap()).map(|c| c.as_u64().unwrap()).sum();
    assert_eq!((cells, v["per_class"].as_array().unwrap().len(), v["images"].as_u64()), (2000, 10, Some(2000)));
    let recall = v["per_class"][3]["recall"].as_f64().unwrap();
    assert_eq!(format!("{recall:.4}"), rows[3][2], "{out}");
    // run: a tensor in, a tensor out.
    let input = dir.join("x.safetensors");
    let x = stride_autograd::Rng::seed(0).normal::<f32>(&[3, 1, 28, 28], 0.0, 1.0).unwrap();
    stride_train::checkpoint::save(&input, &[("input".into(), x)]).unwrap();
    let output = dir.join("y.safetensors");
    let r = stride(&[
        "run",
        "--weights",
        dir.join("model.safetensors").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--debug",
    ]);
    assert!(r.status.success(), "{}", text(&r));
    assert_eq!(stride_train::checkpoint::load(&output).unwrap()["output"].shape(), [3, 10]);
    let shapes = String::from_utf8_lossy(&r.stderr);
    assert!(shapes.contains("input") && shapes.contains("-> [3, 1, 28, 28]") && shapes.contains("-> [3, 20, 26, 26]"), "run --debug: {shapes}");
    // ONNX out and back in: the file evaluates and runs as the weights do, and its imported
    // state_dict loads into the zoo model.
    let onnx = dir.join("cnn.onnx");
    let ex = stride(&["export", "--weights", dir.join("model.safetensors").to_str().unwrap(), "--out", onnx.to_str().unwrap()]);
    assert!(ex.status.success(), "{}", text(&ex));
    let ev = stride(&["eval", "--model", onnx.to_str().unwrap()]);
    assert!(ev.status.success(), "{}", text(&ev));
    assert_eq!(String::from_utf8_lossy(&ev.stdout).lines().last().unwrap(), last, "eval of the ONNX file");
    let imported = dir.join("imported.safetensors");
    let im = stride(&["import", onnx.to_str().unwrap(), "--out", imported.to_str().unwrap()]);
    assert!(im.status.success() && text(&im).contains("input Nx1x28x28, output Nx10"), "{}", text(&im));
    let ev = stride(&["eval", "--weights", imported.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&ev.stdout).lines().last().unwrap(), last, "eval of the imported weights: {}", text(&ev));
    let output2 = dir.join("y2.safetensors");
    let r = stride(&["run", "--model", onnx.to_str().unwrap(), "--input", input.to_str().unwrap(), "--output", output2.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r));
    let (y1, y2) = (stride_train::checkpoint::load(&output).unwrap(), stride_train::checkpoint::load(&output2).unwrap());
    assert_eq!(y1["output"].data(), y2["output"].data(), "run through the ONNX file gives the same outputs");
    // Training writes the report beside the metrics.
    assert!(std::fs::read_to_string(dir.join("report.html")).unwrap().contains("Confusion matrix"));
    std::fs::remove_dir_all(dir).unwrap();
}

fn wait_for(path: &Path, what: impl Fn(&str) -> bool, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::fs::read_to_string(path).is_ok_and(|s| what(&s)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn ctrl_c_saves_and_resume_finishes() {
    let dir = tmp("sigint");
    let child = Command::new(env!("CARGO_BIN_EXE_stride"))
        .args(["train", "--epochs", "3", "--out", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first epoch is in metrics.csv.
    assert!(wait_for(&dir.join("metrics.csv"), |s| s.lines().count() >= 2, Duration::from_secs(120)), "epoch 1 never finished");
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{log}");
    if log.contains("interrupted during epoch") {
        assert!(log.contains("--resume"), "{log}");
        let r = stride(&["train", "--epochs", "3", "--out", dir.to_str().unwrap(), "--resume"]);
        assert!(r.status.success(), "{}", text(&r));
        assert!(String::from_utf8_lossy(&r.stdout).lines().last().unwrap().starts_with("test accuracy "));
    } else {
        // The signal arrived after the last step: the run simply finished.
        assert!(log.lines().last().unwrap().starts_with("test accuracy "), "{log}");
    }
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "three epochs in all: {csv}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: [(&[&str], &str); 28] = [
        (&["train", "--data", "/no/such/folder"], "not `mnist`, `fashion-mnist` or an existing folder"),
        (&["train", "--batch-size", "0"], "'0' is not a whole number of at least 1"),
        (&["vae", "--epochs", "0"], "'0' is not a whole number of at least 1"),
        (&["summary", "cnn", "--batch-size", "0"], "'0' is not a whole number of at least 1"),
        (&["predict", "--top", "0", "x.png"], "'0' is not a whole number of at least 1"),
        (&["train", "--label-smoothing", "1.5"], "'1.5' is not a label smoothing: give a number in [0, 1)"),
        (&["train", "--label-smoothing", "NaN"], "'NaN' is not a label smoothing"),
        (&["train", "--clip-grad-norm=-1"], "'-1' is not a gradient norm: give a number > 0"),
        (&["train", "--class-weights", "1,x"], "'x' is not a class weight: give balanced, or numbers >= 0 such as 1,4,1"),
        (&["train", "--class-weights", "1,2", "--out", "/tmp/stride-never-written"], "2 class weights given for the 10 classes"),
        (&["train", "--monitor", "precision"], "invalid value 'precision' for '--monitor"),
        (&["train", "--ema", "1"], "'1' is not a decay for the weight average: give a number in [0, 1), such as 0.999"),
        (&["train", "--mixup", "0"], "'0' is not a Beta distribution's alpha: give a number in (0, 100], such as 0.8"),
        (&["train", "--epochs", "2", "--warmup", "2"], "--warmup 2 leaves none of the 2 epochs for the schedule"),
        (&["train", "--normalize", "0.5"], "'0.5' is not a standardisation: give imagenet, none or MEAN,...:STD,..."),
        (&["eval", "--weights", "x", "--normalize", "1:2:3"], "'2:3' is not a number"),
        (&["train", "--clip-grad-norm", "inf"], "'inf' is not a gradient norm"),
        (&["--threads", "0", "models"], "0 is not in 1..=1024"),
        (&["train", "--early-stop", "0"], "0 is not in 1..=10000"),
        (&["summary", "cnn", "--threads", "100000"], "100000 is not in 1..=1024"),
        (&["train", "--model", "vgg99"], "unknown model 'vgg99'; the zoo has cnn, cnn-bn"),
        (&["train", "--augment", "shear"], "unknown augmentation 'shear'"),
        (&["eval", "--weights", "/no/such/file.safetensors"], "/no/such/file.safetensors"),
        (&["bench", "--shapes", "c9"], "unknown shape 'c9'"),
        (&["import", "Cargo.toml"], "Cargo.toml: onnx: not an ONNX model"),
        (&["export", "--out", "/tmp/never.onnx", "--opset", "9"], "opset 9 is not supported: Stride writes opsets 13 to 23"),
        (&["eval", "--model", "cnn"], "--weights is needed: cnn is built with fresh weights"),
        (&["eval", "--model", "/no/such/model.onnx"], "/no/such/model.onnx"),
    ];
    for (args, want) in cases {
        let o = stride(args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("panicked"), "{args:?} panicked");
    }
    let models = stride(&["models"]);
    assert!(text(&models).contains("cnn-bn"));
}

#[test]
fn image_folders_train_and_predict() {
    let dir = tmp("images");
    common::shapes(&dir);
    let run = dir.join("run");
    let out = stride(&[
        "train",
        "--model",
        "cnn-bn",
        "--data",
        dir.to_str().unwrap(),
        "--epochs",
        "5",
        "--batch-size",
        "8",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("5 epochs, batch 8, adamw lr 0.002 weight decay 0.05, cosine schedule"), "cnn-bn's recipe: {}", text(&out));
    let weights = run.join("model.safetensors");
    let predict = |extra: &[&str], images: &[&str]| {
        let mut args = vec!["predict", "--model", "cnn-bn", "--weights", weights.to_str().unwrap(), "--top", "2"];
        args.extend_from_slice(extra);
        let paths: Vec<String> = images.iter().map(|i| dir.join(i).to_str().unwrap().to_string()).collect();
        args.extend(paths.iter().map(String::as_str));
        stride(&args)
    };
    let p = predict(&[], &["square/05.png", "circle/07.png"]);
    let log = String::from_utf8_lossy(&p.stdout).to_string();
    assert!(p.status.success(), "{}", text(&p));
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(lines[0].contains("square/05.png: ") && lines[0].contains("circle") && lines[0].contains("square"), "{log}");
    let prob = |line: &str, class: &str| -> f64 {
        let part = line.split(": ").nth(1).unwrap().split(", ").find(|s| s.starts_with(class)).unwrap();
        part.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!((prob(lines[0], "square") + prob(lines[0], "circle") - 1.0).abs() < 1e-3, "two classes, probabilities add up: {log}");
    assert!(prob(lines[0], "square") > 0.5 && prob(lines[1], "circle") > 0.5, "easy shapes are learned in 5 epochs: {log}");
    // JSON lines: the same classes and probabilities.
    let js = predict(&["--json"], &["square/05.png"]);
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&js)));
    assert!(v["image"].as_str().unwrap().ends_with("square/05.png"), "{v}");
    let square = v["top"].as_array().unwrap().iter().find(|t| t["class"] == "square").unwrap();
    assert!((square["probability"].as_f64().unwrap() - prob(lines[0], "square")).abs() < 1e-4, "{v} vs {log}");
    // A folder: every image in it, in order, in batches; the same answer as one by one.
    let folder = predict(&[], &["square"]);
    let log = String::from_utf8_lossy(&folder.stdout).to_string();
    assert!(folder.status.success(), "{}", text(&folder));
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 30, "{log}");
    assert!(lines.iter().enumerate().all(|(i, l)| l.contains(&format!("square/{i:02}.png: "))), "{log}");
    assert_eq!(lines[5].split(": ").nth(1), String::from_utf8_lossy(&p.stdout).lines().next().unwrap().split(": ").nth(1), "{log}");
    // An unreadable image is named, the others still answered, and the run fails.
    std::fs::write(dir.join("square/99.png"), b"not a png").unwrap();
    let bad = predict(&[], &["square"]);
    assert!(!bad.status.success() && text(&bad).contains("99.png: cannot decode the image"), "{}", text(&bad));
    assert!(
        text(&bad).contains("1 of the 31 images could not be read") && String::from_utf8_lossy(&bad.stdout).lines().count() == 30,
        "{}",
        text(&bad)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn colour_images_are_standardised_per_channel_as_asked_and_eval_follows_the_header() {
    let dir = tmp("rgb");
    // Red discs and blue squares, 16x16 RGB.
    for (class, square) in [("disc", false), ("square", true)] {
        std::fs::create_dir_all(dir.join("data").join(class)).unwrap();
        for i in 0..20u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let (dx, dy) = (x as i32 - 8 + (i % 3) as i32 - 1, y as i32 - 8);
                let inside = if square { dx.abs() < 5 && dy.abs() < 5 } else { dx * dx + dy * dy < 25 };
                match (inside, square) {
                    (false, _) => image::Rgb([20, 30, 10]),
                    (true, false) => image::Rgb([230, 40, 30]),
                    (true, true) => image::Rgb([30, 60, 220]),
                }
            });
            img.save(dir.join("data").join(class).join(format!("{i:02}.png"))).unwrap();
        }
    }
    let data = dir.join("data");
    let data = data.to_str().unwrap();
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec!["train", "--model", "cnn-bn", "--data", data, "--epochs", "2", "--batch-size", "8", "--out", out];
        args.extend_from_slice(extra);
        stride(&args)
    };
    let header = |out: &Path| {
        let (_, meta) = stride_train::checkpoint::load_with_metadata(&out.join("model.safetensors")).unwrap();
        (meta["input_mean"].clone(), meta["input_std"].clone())
    };
    let given = dir.join("given");
    let out = run(given.to_str().unwrap(), &["--normalize", "imagenet"]);
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(log.contains("inputs standardised by mean 0.4850,0.4560,0.4060 std 0.2290,0.2240,0.2250"), "{log}");
    assert_eq!(header(&given), ("0.485,0.456,0.406".into(), "0.229,0.224,0.225".into()));
    // eval standardises as the header says: the last epoch's test figures again.
    let weights = given.join("model.safetensors");
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "--model", "cnn-bn", "--weights", weights.to_str().unwrap(), "--data", data];
        args.extend_from_slice(extra);
        let out = stride(&args);
        assert!(out.status.success(), "{}", text(&out));
        let log = String::from_utf8_lossy(&out.stdout).to_string();
        log.lines().next().unwrap().rsplit("loss ").next().unwrap().to_string()
    };
    let last_epoch = log.lines().find(|l| l.starts_with("epoch 2/2")).unwrap();
    let test_loss = last_epoch.split("test loss ").nth(1).unwrap().split(' ').next().unwrap();
    assert_eq!(eval(&[]), test_loss, "{log}");
    assert_ne!(eval(&["--normalize", "none"]), test_loss, "--normalize overrides the header");
    // Test-time augmentation: the mean of each image's and its mirror image's probabilities.
    let tta: f64 = eval(&["--tta"]).parse().unwrap();
    assert!(tta.is_finite() && tta > 0.0, "{tta}");
    let said = stride(&["predict", "--tta", "--json", "--model", "cnn-bn", "--weights", weights.to_str().unwrap(), &format!("{data}/square/00.png")]);
    let top: f64 = text(&said).split(r#""probability":"#).nth(1).and_then(|v| v.split(['}', ',']).next()?.parse().ok()).expect("a probability");
    assert!(said.status.success() && top > 0.0 && top <= 1.0, "{}", text(&said));
    // Exported to ONNX, the header travels as the model's metadata: eval and predict on the
    // file alone standardise as the run did and name its classes, and import carries it back.
    let onnx = dir.join("given.onnx");
    let ex = stride(&["export", "--model", "cnn-bn", "--weights", weights.to_str().unwrap(), "--out", onnx.to_str().unwrap()]);
    assert!(ex.status.success() && text(&ex).contains("metadata from the weights' header: input_mean, input_std"), "{}", text(&ex));
    let on_onnx = stride(&["eval", "--model", onnx.to_str().unwrap(), "--data", data]);
    assert!(on_onnx.status.success(), "{}", text(&on_onnx));
    let first = String::from_utf8_lossy(&on_onnx.stdout).lines().next().unwrap().to_string();
    assert_eq!(first.rsplit("loss ").next().unwrap(), test_loss, "{first}");
    let said = stride(&["predict", "--json", "--model", onnx.to_str().unwrap(), &format!("{data}/disc/00.png")]);
    let said = text(&said);
    assert!(said.contains(r#""class":"disc""#) && said.contains(r#""class":"square""#) && !said.contains("no Stride metadata"), "{said}");
    // Metadata that contradicts the graph (a file edited by hand) is refused, naming both.
    let mut edited = stride_onnx::read(&onnx).unwrap();
    for p in edited.metadata_props.iter_mut().filter(|p| p.key.as_deref() == Some("input_shape")) {
        p.value = Some("3x28x28".into());
    }
    let liar = dir.join("liar.onnx");
    std::fs::write(&liar, stride_onnx::encode(&edited)).unwrap();
    let e = stride(&["predict", "--model", liar.to_str().unwrap(), &format!("{data}/disc/00.png")]);
    assert!(text(&e).contains("its metadata describes 3x28x28 inputs and 2 classes, its graph 3x16x16 and 2"), "{}", text(&e));
    let back = dir.join("back.safetensors");
    let im = stride(&["import", onnx.to_str().unwrap(), "--out", back.to_str().unwrap()]);
    assert!(im.status.success() && text(&im).contains("with the run's header"), "{}", text(&im));
    let meta = |f: &Path| stride_train::checkpoint::load_with_metadata(f).unwrap().1;
    let (carried, trained) = (meta(&back), meta(&weights));
    for k in stride_train::HEADER_KEYS {
        assert!(trained.contains_key(k) && carried.get(k) == trained.get(k), "{k}: {:?} against {:?}", carried.get(k), trained.get(k));
    }
    // By default each channel by the training images' own statistics.
    let own = dir.join("own");
    assert!(run(own.to_str().unwrap(), &[]).status.success());
    let (mean, std) = header(&own);
    let means: Vec<f32> = mean.split(',').map(|v| v.parse().unwrap()).collect();
    assert!(means.len() == 3 && std.split(',').count() == 3 && means[0] > means[2] && means[1] < means[2], "{mean} {std}");
    // Statistics that do not fit, or do not parse, are named.
    let bad = stride(&["predict", "--model", "cnn-bn", "--weights", weights.to_str().unwrap(), "--normalize", "0.1,0.2:0.3,0.4", data]);
    assert!(text(&bad).contains("2 values per statistic") && text(&bad).contains("3 channels"), "{}", text(&bad));
    let bad = run(dir.join("bad").to_str().unwrap(), &["--normalize", "0.5:0"]);
    assert!(text(&bad).contains("standard deviation 0 is not a finite number > 0"), "{}", text(&bad));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_pretrained_network_gets_a_new_classifier_and_only_that_trains() {
    let dir = tmp("finetune");
    let (pre, tuned, shapes) = (dir.join("pre"), dir.join("tuned"), dir.join("shapes"));
    let path = |p: &Path| p.to_str().unwrap().to_string();
    // Trained on the digits (10 classes), then fine-tuned on two classes of shapes: the
    // classifier (layer 9) starts fresh for 2 classes, every other layer is frozen.
    let out = stride(&["train", "--epochs", "1", "--out", &path(&pre)]);
    assert!(out.status.success(), "{}", text(&out));
    common::shapes(&shapes);
    let weights = path(&pre.join("model.safetensors"));
    let tune = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            &shapes.to_str().unwrap(),
            "--resize",
            "28",
            "--epochs",
            "10",
            "--lr",
            "0.01",
            "--batch-size",
            "8",
            "--weights",
            &weights,
        ];
        args.extend_from_slice(extra);
        stride(&args)
    };
    let out = tune(&["--skip-mismatched", "--train-only", "9", "--out", &path(&tuned)]);
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        log.contains(
            "started fresh, their shapes differ from the weights': 9.weight [2, 128] (the weights' [10, 128]), 9.bias [2] (the weights' [10])"
        ),
        "{log}"
    );
    assert!(log.contains("frozen: 0, 3, 7 ("), "{log}");
    assert!(log.contains("parameters); training the other 258"), "{log}");
    // The frozen layers kept the digits' values bit for bit; the new classifier learned.
    let (a, b) = (load(&pre.join("model.safetensors")), load(&tuned.join("model.safetensors")));
    for (name, t) in &a {
        match name.starts_with("9.") {
            false => assert_eq!(Some(t), b.get(name), "{name} changed"),
            true => assert_eq!(b[name].shape()[0], 2, "{name}"),
        }
    }
    let acc: f64 = log.lines().last().unwrap().trim_start_matches("test accuracy ").parse().unwrap();
    assert!(acc >= 0.75, "the digits' features tell squares from circles: {log}");
    // Without --skip-mismatched the classifier's shape is refused; bad prefixes are named.
    let refused = tune(&["--out", &path(&dir.join("strict"))]);
    assert!(text(&refused).contains("'9.weight' has shape [10, 128], the model needs [2, 128]"), "{}", text(&refused));
    let nothing = tune(&["--skip-mismatched", "--train-only", "classifier"]);
    assert!(text(&nothing).contains("no parameter to train under 'classifier'"), "{}", text(&nothing));
    let all = tune(&["--skip-mismatched", "--freeze", "0,3,7,9"]);
    assert!(text(&all).contains("freezing 0, 3, 7, 9 leaves no parameter to train"), "{}", text(&all));
    let stray = tune(&["--skip-mismatched", "--freeze", "10"]);
    assert!(text(&stray).contains("no parameter to freeze under '10'; the model's top-level names are 0, 3, 7, 9"), "{}", text(&stray));
    std::fs::remove_dir_all(dir).unwrap();
}

fn load(p: &Path) -> std::collections::HashMap<String, stride_autograd::Tensor<f32>> {
    stride_train::checkpoint::load(p).unwrap()
}

#[test]
fn the_zoo_lists_counts_and_explains_sizes() {
    let out = stride(&["models"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for row in [("resnet18 ", "11,689,512"), ("vgg16_bn ", "138,365,992"), ("googlenet ", "6,624,904"), ("vae ", "1,930,082")] {
        let line = log.lines().find(|l| l.starts_with(row.0)).unwrap_or_else(|| panic!("no {} row: {log}", row.0));
        assert!(line.contains(row.1), "{line}");
    }
    // VGG halves 28x28 five times: a clear error with the way out.
    let out = stride(&["train", "--model", "vgg11", "--epochs", "1", "--out", tmp("vgg").to_str().unwrap()]);
    let log = text(&out);
    assert!(!out.status.success());
    assert!(log.contains("vgg11 cannot take 1x28x28 images (it needs at least 32x32; `stride train --resize N` resizes)"), "{log}");
    assert!(log.contains("layer features.20 (MaxPool2d"), "names the layer by its dotted path: {log}");
    assert!(text(&stride(&["train", "--resize", "0x5"])).contains("'0x5' is not a size"));
    assert!(text(&stride(&["train", "--model", "vae"])).contains("train it with `stride vae`"));
}

#[test]
fn a_pytorch_state_dict_starts_training_and_resized_eval_agrees() {
    let torch_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/tests/fixtures/lenet5_torch.safetensors");
    let tf = torch_file.to_str().unwrap();
    // Weights saved by PyTorch start a run; resizing the data changes lenet5's fc1 and is caught.
    let kept = tmp("weights");
    let out = stride(&["train", "--model", "lenet5", "--epochs", "1", "--weights", tf, "--keep-best", "--out", kept.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // --keep-best: the best epoch (here the only one) named, and its weights evaluate to its accuracy.
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    let best = kept.join("best.safetensors");
    assert!(log.contains("best epoch 1: test loss ") && log.contains(&format!("its weights: {}", best.display())), "{log}");
    let ev = stride(&["eval", "--model", "lenet5", "--weights", best.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&ev.stdout).lines().last(), log.lines().last(), "{}", text(&ev));
    let out = stride(&["train", "--model", "lenet5", "--epochs", "1", "--resize", "32", "--weights", tf, "--out", tmp("weights2").to_str().unwrap()]);
    assert!(text(&out).contains("'fc1.weight' has shape [120, 400], the model needs [120, 576]"), "{}", text(&out));
    // A run on resized images, evaluated on the same resizing, gives the same accuracy.
    let dir = tmp("resize");
    let out = stride(&["train", "--model", "lenet5", "--epochs", "1", "--resize", "32", "--out", dir.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success() && log.contains("at 32x32"), "{log}");
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
    let w = dir.join("model.safetensors");
    let ev = stride(&["eval", "--model", "lenet5", "--resize", "32", "--weights", w.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&ev.stdout).lines().last().unwrap(), last, "{}", text(&ev));
    // Weights for another model: every problem at once.
    let bad = stride(&["eval", "--model", "cnn", "--weights", tf]);
    let log = text(&bad);
    assert!(!bad.status.success());
    assert!(log.contains("missing '0.weight'") && log.contains("unexpected 'conv1.weight'") && log.contains("no name is the model's"), "{log}");
}

#[test]
fn a_validation_split_judges_epochs_and_tests_once_at_the_end() {
    let dir = tmp("validation");
    // With balanced class weights and accumulation, which the header states.
    let args = ["--validation-split", "0.2", "--keep-best", "--class-weights", "balanced", "--accumulate", "2", "--monitor", "f1"];
    let out = stride(&[&["train", "--epochs", "1", "--out", dir.to_str().unwrap()][..], &args].concat());
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(log.contains("6401 training / 1599 validation / 2000 test images") && log.contains("| val loss "), "{log}");
    // n / (classes x count) over the 6401 images trained on.
    let counts = stride_data::embedded_mnist().unwrap().train.training_class_counts(0.2);
    let weights: Vec<String> = counts.iter().map(|&k| format!("{:.3}", 6401.0 / (10.0 * k as f64))).collect();
    let header =
        format!("1 epoch, batch 64 x 2 accumulated per update, adam lr 0.002, cosine schedule, balanced class weights {}", weights.join(","));
    assert!(log.contains(&header), "{header}\n{log}");
    assert!(log.contains("validation accuracy ") && log.contains("best epoch 1: validation loss "), "{log}");
    assert!(log.lines().any(|l| l.starts_with("best epoch 1: ") && l.contains(" macro F1 0.")), "the figure it was chosen by: {log}");
    // report.html states the choices.
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    for fact in [
        "batch 64 x 2 accumulated per update",
        "standardised by the training images",
        "cross-entropy, balanced class weights",
        "best chosen by validation macro F1",
        "validation macro F1",
    ] {
        assert!(html.contains(fact), "{fact}");
    }
    // The test figures at the end are what `stride eval` gives for the weights they name.
    let eval_line = |file: &str| {
        let ev = stride(&["eval", "--weights", dir.join(file).to_str().unwrap()]);
        String::from_utf8_lossy(&ev.stdout).lines().last().unwrap_or_default().to_string()
    };
    let last = log.lines().last().unwrap();
    assert_eq!(last, format!("{} (last epoch's weights)", eval_line("model.safetensors")), "{log}");
    let best = eval_line("best.safetensors");
    assert!(log.contains(&format!("(test accuracy {})", best.trim_start_matches("test accuracy "))), "{best}: {log}");
    let bad = stride(&["train", "--validation-split", "1.5"]);
    assert!(text(&bad).contains("'1.5' is not a fraction of the training set: give a number between 0 and 1"), "{}", text(&bad));
}

#[test]
fn vae_trains_saves_grids_and_samples() {
    let dir = tmp("vae");
    let d = dir.to_str().unwrap();
    let out = stride(&["vae", "--epochs", "1", "--out", d]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let line = log.lines().find(|l| l.starts_with("epoch 1: L_tot = ")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(", L_likelihood = ") && line.contains(", L_KL = "), "{line}");
    assert!(dir.join("result1.png").is_file() && dir.join("vae.safetensors").is_file());
    let png = dir.join("s.png");
    let s = stride(&["sample", "--weights", dir.join("vae.safetensors").to_str().unwrap(), "--out", png.to_str().unwrap(), "--n", "8"]);
    assert!(s.status.success(), "{}", text(&s));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    // 4 columns x 2 rows of 28 pixels with 2-pixel gaps: 122 x 62.
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 122);
    assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 62);
    assert!(dir.join("latent.png").is_file() && dir.join("interpolation.png").is_file() && !dir.join("manifold.png").exists());
}

#[test]
fn a_vae_on_colour_images_draws_in_colour_and_its_weights_say_so() {
    let dir = tmp("vae-colour");
    for (class, rgb) in [("red", [200u8, 20, 20]), ("blue", [20, 20, 200])] {
        std::fs::create_dir_all(dir.join("images").join(class)).unwrap();
        for i in 0..12u8 {
            let img = image::RgbImage::from_fn(20, 20, |x, y| image::Rgb(rgb.map(|c| c.saturating_add(((x + y) as u8 + i) % 30))));
            img.save(dir.join("images").join(class).join(format!("{i:02}.png"))).unwrap();
        }
    }
    let run = dir.join("run");
    let o = stride(&["vae", "--data", dir.join("images").to_str().unwrap(), "--epochs", "1", "--batch-size", "8", "--out", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let rgb = |p: &std::path::Path| image::open(p).unwrap().color() == image::ColorType::Rgb8;
    assert!(rgb(&run.join("result1.png")) && rgb(&run.join("samples1.png")) && rgb(&run.join("interpolation.png")));
    // sample and export build a colour VAE from the weights alone.
    let w = run.join("vae.safetensors");
    let png = dir.join("s.png");
    let s = stride(&["sample", "--weights", w.to_str().unwrap(), "--out", png.to_str().unwrap(), "--n", "4"]);
    assert!(s.status.success() && rgb(&png), "{}", text(&s));
    let onnx = dir.join("g.onnx");
    let e = stride(&["export", "--model", "vae", "--weights", w.to_str().unwrap(), "--out", onnx.to_str().unwrap()]);
    assert!(e.status.success(), "{}", text(&e));
    let imported = stride_onnx::import(&stride_onnx::read(&onnx).unwrap()).unwrap();
    assert_eq!(imported.network.output_shape[1..], [Some(3), Some(32), Some(32)]);
}

#[test]
fn ctrl_c_stops_the_vae_at_a_step_and_resume_finishes() {
    use std::io::{BufRead, Read};
    let dir = tmp("vae-sigint");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stride"))
        .args(["vae", "--epochs", "2", "--out", dir.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut log = String::new();
    out.read_line(&mut log).unwrap();
    assert!(log.starts_with("training the VAE"), "{log}");
    // The handler is in place right after that line; an epoch takes seconds.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    out.read_to_string(&mut log).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{log}");
    if log.contains("interrupted during epoch") || log.contains("stopped after epoch 1") {
        assert!(log.contains("checkpoint saved") && log.contains("--resume"), "{log}");
        assert!(dir.join("vae_checkpoint.safetensors").is_file(), "{log}");
        let r = stride(&["vae", "--epochs", "2", "--out", dir.to_str().unwrap(), "--resume"]);
        let again = text(&r);
        assert!(r.status.success() && again.contains("epoch 2: L_tot"), "{again}");
    } else {
        // The signal came after the last step: the run simply finished.
        assert!(log.contains("epoch 2: L_tot"), "{log}");
    }
    let csv = std::fs::read_to_string(dir.join("vae_metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "two epochs in all: {csv}");
}

#[test]
fn a_vae_with_a_two_dimensional_code_maps_it_and_its_weights_say_their_size() {
    let dir = tmp("vae2");
    let d = dir.to_str().unwrap();
    let out = stride(&["vae", "--epochs", "1", "--latent", "2", "--beta", "0.5", "--out", d]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("a 2-d code, β 0.5") && log.contains("manifold.png"), "{log}");
    assert!(dir.join("manifold.png").is_file() && dir.join("latent.png").is_file());
    // sample and export read the code's size from the weights.
    let w = dir.join("vae.safetensors");
    let w = w.to_str().unwrap();
    let png = dir.join("s.png");
    let s = stride(&["sample", "--weights", w, "--out", png.to_str().unwrap(), "--n", "4"]);
    assert!(s.status.success(), "{}", text(&s));
    let onnx = dir.join("g.onnx");
    let e = stride(&["export", "--model", "vae", "--weights", w, "--out", onnx.to_str().unwrap()]);
    assert!(e.status.success(), "{}", text(&e));
    let imported = stride_onnx::import(&stride_onnx::read(&onnx).unwrap()).unwrap();
    assert_eq!(imported.network.input_shape[1..], [Some(2)], "the generator takes 2-d codes");
    // Going on from the weights with another code size is refused by name, as are sizes out
    // of range and a negative β, before any training.
    for (args, want) in [
        (vec!["vae", "--weights", w, "--latent", "3", "--out", d], "--latent 3: the weights in"),
        (vec!["vae", "--latent", "0", "--out", d], "the code size must be 1..=1024, got 0"),
        (vec!["vae", "--beta", "-1", "--out", d], "'-1' is not a weight in 0..=10000"),
        (vec!["vae", "--beta", "nan", "--out", d], "'nan' is not a weight in 0..=10000"),
    ] {
        let o = stride(&args);
        assert!(!o.status.success() && text(&o).contains(want), "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("epoch 1"), "{args:?} trained");
    }
    let e = text(&stride(&["sample", "--weights", dir.join("s.png").to_str().unwrap()]));
    assert!(e.contains("s.png"), "{e}");
    // --resume goes on from the finished epoch, the code's size taken from the checkpoint;
    // other settings than the run's are refused.
    let o = stride(&["vae", "--epochs", "2", "--beta", "0.5", "--resume", "--out", d]);
    let log = text(&o);
    assert!(o.status.success() && log.contains("epoch 2: L_tot") && !log.contains("epoch 1:") && log.contains("a 2-d code"), "{log}");
    assert_eq!(std::fs::read_to_string(dir.join("vae_metrics.csv")).unwrap().lines().count(), 3);
    let o = stride(&["vae", "--epochs", "3", "--resume", "--out", d]);
    assert!(!o.status.success() && text(&o).contains("was written with beta 0.5, this run has 1"), "{}", text(&o));
    for (args, want) in [(vec!["vae", "--resume"], "--out <OUT>"), (vec!["vae", "--resume", "--weights", w, "--out", d], "cannot be used with")] {
        let o = stride(&args);
        assert!(!o.status.success() && text(&o).contains(want), "{args:?}: {}", text(&o));
    }
}

#[test]
fn kill_9_at_any_moment_leaves_loadable_files_and_the_run_finishes() {
    let dir = tmp("kill9");
    let d = dir.to_str().unwrap();
    let (metrics, ckpt) = (dir.join("metrics.csv"), dir.join("checkpoint.safetensors"));
    let saved_epoch = || -> Option<usize> {
        let (_, meta) = stride_train::checkpoint::load_with_metadata(&ckpt).ok()?;
        meta["epoch"].parse::<usize>().ok()
    };
    // Each run is killed a little after an epoch's metrics row appears: the row is written just
    // before the weights and the checkpoint, so the kills land before, during and after those
    // writes; the first run is also killed once in the middle of an epoch. On a loaded machine
    // every one of those may land before the checkpoint, so the last run is killed only once a
    // new checkpoint is there (None: 400 ms in; Some(ms): ms after the row; u64::MAX: after
    // the checkpoint).
    for (i, delay_ms) in [None, Some(0u64), Some(3), Some(15), Some(40), Some(100), Some(u64::MAX)].into_iter().enumerate() {
        let next = if ckpt.exists() { saved_epoch().expect("the checkpoint loads") } else { 1 };
        let mut args = vec!["train", "--epochs", "8", "--out", d];
        if i > 0 && ckpt.exists() {
            args.push("--resume");
        }
        let mut child =
            Command::new(env!("CARGO_BIN_EXE_stride")).args(&args).env("RAYON_NUM_THREADS", "2").stdout(std::process::Stdio::null()).spawn().unwrap();
        match delay_ms {
            None => std::thread::sleep(Duration::from_millis(400)),
            Some(u64::MAX) => {
                let start = Instant::now();
                while saved_epoch().is_none_or(|e| e <= next) {
                    assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint after epoch {next}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Some(ms) => {
                let row = format!("\n{next},");
                assert!(wait_for(&metrics, |t| t.contains(&row), Duration::from_secs(300)), "epoch {next} never finished");
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(status.code().is_none_or(|c| c == 0), "{args:?} exited with {status}");
        // Whatever is there loads: the weights, and the checkpoint as weights and as a run.
        for p in [dir.join("model.safetensors"), ckpt.clone()] {
            if p.exists() {
                let ev = stride(&["eval", "--weights", p.to_str().unwrap()]);
                assert!(ev.status.success(), "{} after kill {i}: {}", p.display(), text(&ev));
            }
        }
    }
    assert!(ckpt.exists(), "no checkpoint was ever written");
    // The run then finishes, with one metrics row per epoch.
    let out = stride(&["train", "--epochs", "8", "--out", d, "--resume"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).lines().last().unwrap().starts_with("test accuracy "));
    let rows: Vec<String> = std::fs::read_to_string(&metrics).unwrap().lines().skip(1).map(|l| l.split(',').next().unwrap().to_string()).collect();
    assert_eq!(rows, ["1", "2", "3", "4", "5", "6", "7", "8"]);
    let left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp-")).collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

/// A build without the `mpi` feature started by `mpirun -np 2` would train twice into one run
/// folder: it stops and says how to build for MPI instead.
#[cfg(not(feature = "mpi"))]
#[test]
fn training_under_mpirun_without_mpi_support_is_refused() {
    let dir = tmp("no-mpi");
    // `stride train --data D` as one of `processes` that mpirun started.
    let under = |processes: &str, data: &str| {
        let args = ["train", "--epochs", "1", "--data", data, "--out", dir.to_str().unwrap()];
        Command::new(env!("CARGO_BIN_EXE_stride")).args(args).env("OMPI_COMM_WORLD_SIZE", processes).output().unwrap()
    };
    let out = under("2", "mnist");
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("built without MPI, so under mpirun each of the 2 processes would train alone") && log.contains("--features mpi"), "{log}");
    assert!(!dir.exists(), "nothing written: {log}");
    // One process (mpirun -np 1) goes on to train: here it gets as far as loading the data.
    let one = under("1", "/no/such/folder");
    let log = text(&one);
    assert!(!log.contains("MPI") && log.contains("not `mnist`, `fashion-mnist` or an existing folder"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lr_find_writes_its_sweep_and_suggests_a_rate_without_training() {
    let dir = tmp("lr-find");
    let out = stride(&["train", "--lr-find", "--out", dir.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    // "81 steps, up to lr 2.9e-1 (the loss blew up)": as many rows as steps.
    let steps: usize = log.lines().find_map(|l| l.split_once(" steps, up to lr ")).and_then(|(n, _)| n.parse().ok()).expect("the steps run");
    let csv = std::fs::read_to_string(dir.join("lr_find.csv")).unwrap();
    assert_eq!(csv.lines().next(), Some("step,lr,loss,smoothed_loss"));
    assert_eq!(csv.lines().count(), steps + 1, "{log}");
    let first: Vec<f64> = csv.lines().nth(1).unwrap().split(',').map(|v| v.parse().unwrap()).collect();
    assert_eq!(first[..2], [1.0, 1e-7]);
    let suggested: f64 = log.split("suggested --lr ").nth(1).and_then(|s| s.split_whitespace().next()?.parse().ok()).expect("a suggestion");
    assert!(csv.lines().skip(1).any(|l| l
        .split(',')
        .nth(1)
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(|lr| (lr - suggested).abs() <= 0.05 * lr)));
    let png = image::open(dir.join("lr_find.png")).unwrap();
    assert_eq!((png.width(), png.height()), (450, 380));
    // Nothing was trained or saved as a run.
    for f in ["model.safetensors", "checkpoint.safetensors", "metrics.csv"] {
        assert!(!dir.join(f).exists(), "{f} written by a range test");
    }
    assert!(!log.contains("schedule"), "the run's epochs and schedule do not apply: {log}");
    let e = stride(&["train", "--lr-find", "--resume", "--out", dir.to_str().unwrap()]);
    assert!(!e.status.success() && text(&e).contains("cannot be used with"), "{}", text(&e));
}

#[test]
fn augment_previews_a_spec_on_the_training_images() {
    let dir = tmp("augment");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("a.png");
    let o = stride(&["augment", "hflip,crop2", "--n", "2", "--versions", "3", "--out", png.to_str().unwrap()]);
    assert!(
        o.status.success() && text(&o).contains("2 of mnist's training images (1x28x28), each followed by 3 draws of hflip,crop2"),
        "{}",
        text(&o)
    );
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (2 + 4 * 58 + 4, 2 + 2 * 58));
    let o = stride(&["augment", "twirl", "--out", png.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("unknown augmentation 'twirl'"), "{}", text(&o));
}

/// `stride bench --bench onnx` times an ONNX file's inference (weights beside it too) as one
/// JSON line, with `--profile` where the planned pass spends its time, and says what it needs.
#[test]
fn bench_times_an_onnx_file() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../onnx/tests/torchvision/tiny_cnn.dynamo.onnx");
    let out = stride(&["bench", "--bench", "onnx", "--batch-size", "8", "--reps", "5", "--profile", "--model", fixture.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The profile: a line per kind of step, the product with its bias and ReLU among them;
    // then the slowest steps, the convolutions with their shapes (8 images of 1x28x28 into
    // the fixture's first layer) and GFLOP/s.
    let profile = String::from_utf8_lossy(&out.stderr);
    assert!(profile.contains("step (planned pass") && profile.contains("matmul +bias"), "{profile}");
    let slowest = profile.split_once("slowest steps").map(|s| s.1).unwrap_or_default();
    let conv = slowest.lines().find(|l| l.contains("conv2d") && l.contains(", 8x1x28x28 -> "));
    assert!(conv.is_some_and(|l| l.split_whitespace().nth(2).and_then(|r| r.parse::<f64>().ok()).is_some_and(|r| r > 0.0)), "{profile}");
    let line = String::from_utf8_lossy(&out.stdout);
    let rec: serde_json::Value = serde_json::from_str(line.lines().find(|l| l.starts_with('{')).expect("a JSON line")).unwrap();
    assert_eq!((rec["bench"].as_str(), rec["batch"].as_u64(), rec["input"].to_string().as_str()), (Some("onnx_infer"), Some(8), "[1,28,28]"));
    assert!(rec["value"].as_f64().is_some_and(|v| v > 0.0), "{rec}");
    let out = stride(&["bench", "--bench", "onnx"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--model FILE.onnx"));
}

/// `run` of an ONNX model with several outputs (a detector's boxes and mask prototypes) writes
/// each under its name in the file; with one, the tensor is `output`.
#[test]
fn run_writes_every_output_of_an_onnx_model() {
    use stride_onnx::proto::{tensor_shape_proto, type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TypeProto, ValueInfoProto};
    let dir = tmp("outputs");
    std::fs::create_dir_all(dir.to_str().unwrap()).unwrap();
    let value = |name: &str| {
        let dim = |d: Option<i64>| tensor_shape_proto::Dimension {
            value: Some(d.map_or(tensor_shape_proto::dimension::Value::DimParam("N".into()), tensor_shape_proto::dimension::Value::DimValue)),
            ..Default::default()
        };
        let shape = stride_onnx::proto::TensorShapeProto { dim: vec![dim(None), dim(Some(1)), dim(Some(2)), dim(Some(2))] };
        let t = type_proto::Tensor { elem_type: Some(1), shape: Some(shape) };
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(t)), ..Default::default() }),
            ..Default::default()
        }
    };
    let node = |op: &str, out: &str| NodeProto { op_type: Some(op.into()), input: vec!["x".into()], output: vec![out.into()], ..Default::default() };
    let model = |outputs: &[&str]| ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { version: Some(18), ..Default::default() }],
        graph: Some(GraphProto {
            node: vec![node("Relu", "pos"), node("Neg", "neg")],
            input: vec![value("x")],
            output: outputs.iter().map(|o| value(o)).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let input = dir.join("x.safetensors");
    let x = stride_autograd::Tensor::from_vec(vec![-1.0f32, 2.0, -3.0, 4.0], &[1, 1, 2, 2]).unwrap();
    stride_train::checkpoint::save(&input, &[("input".into(), x)]).unwrap();
    for (outputs, want) in [
        (&["pos", "neg"][..], &[("pos", [0.0, 2.0, 0.0, 4.0]), ("neg", [1.0, -2.0, 3.0, -4.0])][..]),
        (&["neg"], &[("output", [1.0, -2.0, 3.0, -4.0])]),
    ] {
        let onnx = dir.join("two.onnx");
        std::fs::write(&onnx, stride_onnx::encode(&model(outputs))).unwrap();
        let output = dir.join("y.safetensors");
        let r = stride(&["run", "--model", onnx.to_str().unwrap(), "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
        assert!(r.status.success(), "{}", text(&r));
        let got = stride_train::checkpoint::load(&output).unwrap();
        assert_eq!(got.len(), want.len(), "{}", text(&r));
        for (name, values) in want {
            assert_eq!(got[*name].data(), values, "{name}: {}", text(&r));
        }
    }
    // An ONNX model takes what its graph does (a 1-d CNN's [N, C, L]); a zoo model images.
    let seq = dir.join("seq.safetensors");
    let x = stride_autograd::Tensor::from_vec(vec![-1.0f32, 2.0, -3.0, 4.0], &[1, 2, 2]).unwrap();
    stride_train::checkpoint::save(&seq, &[("input".into(), x)]).unwrap();
    let (onnx, output) = (dir.join("two.onnx"), dir.join("y.safetensors"));
    let r = stride(&["run", "--model", onnx.to_str().unwrap(), "--input", seq.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r));
    let got = stride_train::checkpoint::load(&output).unwrap();
    assert_eq!((got["output"].shape(), got["output"].data()), (&[1usize, 2, 2][..], &[1.0f32, -2.0, 3.0, -4.0][..]));
    let r = stride(&["run", "--model", "cnn", "--input", seq.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains("'input' has shape [1, 2, 2], expected [N, C, H, W]"), "{}", text(&r));
    std::fs::remove_dir_all(dir).unwrap();
}
