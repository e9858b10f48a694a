//! `stride summary`: the memory it predicts against the peak the same process reaches, on the
//! zoo; and its table.

use std::process::{Command, Output};

fn stride(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stride")).args(args).env("RAYON_NUM_THREADS", "2").output().expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The "(+1.2%)" of each `measured X, predicted Y (+1.2%)` line, by what it measured.
fn deviations(log: &str) -> Vec<(String, f64)> {
    log.lines()
        .filter(|l| l.contains("measured") && l.contains("predicted"))
        .map(|l| {
            let what = l.split_whitespace().next().unwrap_or("").to_string();
            let pct = l.rsplit('(').next().and_then(|p| p.trim_end_matches([')', '%']).parse::<f64>().ok());
            (what, pct.unwrap_or_else(|| panic!("no percentage in {l}")))
        })
        .collect()
}

#[test]
fn predicted_memory_is_within_ten_percent_of_measured_on_the_zoo() {
    // Every family, at sizes that keep the test quick.
    let cases = [
        ("cnn", "64x1x28x28"),
        ("cnn-bn", "32x1x28x28"),
        ("lenet5", "64x1x28x28"),
        ("allconv", "8x3x32x32"),
        ("alexnet", "2x3x64x64"),
        ("vgg11_bn", "2x3x32x32"),
        ("googlenet", "4x3x32x32"),
        ("resnet18_cifar", "8x3x32x32"),
        ("resnet50", "2x3x32x32"),
        ("se_resnet18", "4x3x32x32"),
        ("densenet_bc", "8x3x32x32"),
        ("mobilenet_v1", "4x3x32x32"),
        ("mobilenet_v2", "4x3x32x32"),
        ("shufflenet_v2_x1_0", "4x3x32x32"),
        ("xception", "2x3x71x71"),
        ("vae", "32x1x32x32"),
    ];
    let mut report = Vec::new();
    for (model, input) in cases {
        let measure = || {
            let out = stride(&["summary", model, "--input", input, "--classes", "10", "--measure"]);
            let log = text(&out);
            assert!(out.status.success(), "{model}: {log}");
            let d = deviations(&log);
            assert_eq!(d.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>(), ["inference", "training"], "{model}: {log}");
            (d, log)
        };
        let (mut d, mut log) = measure();
        // The prediction counts every worker's scratch at once; a run whose workers never
        // overlap (two tests share the two cores) peaks lower. The peak a model reaches is the
        // largest of a few runs, so one that stayed under the prediction is measured again.
        for _ in 0..2 {
            if d.iter().all(|(_, pct)| *pct <= 10.0) {
                break;
            }
            let (again, again_log) = measure();
            for ((_, pct), (_, new)) in d.iter_mut().zip(&again) {
                *pct = pct.min(*new);
            }
            log = again_log;
        }
        for (what, pct) in &d {
            assert!(pct.abs() <= 10.0, "{model} {what}: predicted {pct:+.1}% off the measured peak\n{log}");
        }
        report.push(format!("{model} {input}: {d:?}"));
    }
    eprintln!("{}", report.join("\n"));
}

/// The measured training peak of a run with activation recompute, against its prediction and
/// against the same model without it.
#[test]
fn recompute_predictions_hold_and_it_saves_memory() {
    for (model, input) in [("resnet18", "16x3x64x64"), ("densenet_bc", "16x3x32x32"), ("mobilenet_v2", "8x3x64x64"), ("vgg11_bn", "4x3x64x64")] {
        let peak = |extra: &[&str]| {
            let mut args = vec!["summary", model, "--input", input, "--classes", "10", "--measure"];
            args.extend(extra);
            let out = stride(&args);
            let log = text(&out);
            assert!(out.status.success(), "{model}: {log}");
            let line =
                log.lines().find(|l| l.trim_start().starts_with("training") && l.contains("measured")).unwrap_or_else(|| panic!("{log}")).to_string();
            // "measured  197.3 MiB, predicted ...": the number and its unit.
            let mut words = line.split("measured").nth(1).unwrap().split_whitespace();
            let v: f64 = words.next().and_then(|v| v.parse().ok()).unwrap();
            let unit = words.next().unwrap().trim_end_matches(',');
            let mib = v * match unit {
                "KiB" => 1.0 / 1024.0,
                "MiB" => 1.0,
                "GiB" => 1024.0,
                u => panic!("unit {u} in {line}"),
            };
            (mib, deviations(&log), log)
        };
        let (plain, _, _) = peak(&[]);
        let (with, dev, log) = peak(&["--recompute", "4"]);
        assert!(log.contains("activation recompute in"), "{log}");
        for (what, pct) in dev {
            assert!(pct.abs() <= 10.0, "{model} {what} with recompute: {pct:+.1}%\n{log}");
        }
        assert!(with < plain, "{model}: {with} MiB with recompute, {plain} MiB without");
        eprintln!("{model} {input}: training peak {plain} MiB, with --recompute 4 {with} MiB");
    }
}

#[test]
fn table_has_a_row_per_layer_and_the_totals() {
    let out = stride(&["summary", "cnn"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    // The tutorial CNN: ten layers, its receptive field grows 3 -> 4 -> 12 -> 14.
    let rows: Vec<&str> = log.lines().filter(|l| l.split_whitespace().next().is_some_and(|w| w.parse::<usize>().is_ok())).collect();
    assert_eq!(rows.len(), 10, "{log}");
    assert!(
        rows[3].starts_with("3 ") && rows[3].contains("Conv2d(20, 50, k5x5)") && rows[3].contains("50x9x9") && rows[3].contains("25,050"),
        "{}",
        rows[3]
    );
    let fields: Vec<&str> = rows[..6].iter().map(|r| r.split_whitespace().rev().nth(3).unwrap()).collect();
    assert_eq!(fields, ["3", "3", "4", "12", "12", "14"], "{log}");
    assert!(log.contains("total: 129,068 parameters"), "{log}");
    assert!(log.contains("inference") && log.contains("training (adam)"), "{log}");
}

#[test]
fn bad_input_is_refused_with_the_reason() {
    for (args, want) in [
        (vec!["summary", "cnn", "--input", "3x32"], "expected CxHxW or NxCxHxW"),
        (vec!["summary", "nosuchnet"], "unknown model 'nosuchnet'"),
        (vec!["summary", "vgg11", "--input", "3x16x16"], "vgg11 cannot take 3x16x16 images"),
        (vec!["summary", "cnn", "--batch-size", "0"], "'0' is not a whole number of at least 1"),
        (vec!["summary", "vae", "--input", "2x32x32"], "the VAE takes 1x32x32 or 3x32x32 images"),
        (vec!["summary", "vae", "--recompute", "2"], "needs a network that is a chain of layers"),
    ] {
        let out = stride(&args);
        // 1: an error of the run; 2: a flag clap refused. Never a panic's 101.
        assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    }
}

#[test]
fn the_colour_vae_is_summarised_for_three_channel_images() {
    let out = stride(&["summary", "vae", "--input", "3x32x32"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    // The encoder reads 3 x 1,024 values; the generator's last layers draw three planes.
    assert!(t.contains("Linear(3072, 500)") && t.contains("ConvTranspose2d(64, 3, k4x4, stride 4)") && t.contains("BatchNorm(3)"), "{t}");
}

/// An ONNX model whose output is not [N, classes] (a U-Net's segmentation map): summarised with
/// its declared input and output shape, measured on the mean of its output; the same file fixed
/// to one image (torch.onnx.export's default) is traced at that batch and measured only there.
#[test]
fn a_segmentation_model_from_onnx_is_summarised_and_a_fixed_batch_is_kept() {
    let unet = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../onnx/tests/torchvision/small_unet.dynamo.onnx");
    let o = stride(&["summary", unet.to_str().unwrap(), "--batch-size", "4", "--measure"]);
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("on 3x16x16 images, output Nx2x16x16 (trained on its mean"), "{log}");
    assert_eq!(deviations(&log).len(), 2, "{log}");
    // The same graph with its batch fixed to 1.
    let mut model = stride_onnx::read(&unet).unwrap();
    let input = &mut model.graph.as_mut().unwrap().input[0];
    let Some(stride_onnx::proto::type_proto::Value::TensorType(t)) = input.r#type.as_mut().and_then(|t| t.value.as_mut()) else {
        panic!("no tensor type")
    };
    t.shape.as_mut().unwrap().dim[0].value = Some(stride_onnx::proto::tensor_shape_proto::dimension::Value::DimValue(1));
    let dir = std::env::temp_dir().join(format!("stride-summary-fixed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixed = dir.join("unet1.onnx");
    std::fs::write(&fixed, stride_onnx::encode(&model)).unwrap();
    let o = stride(&["summary", fixed.to_str().unwrap(), "--batch-size", "1", "--measure"]);
    assert!(o.status.success() && deviations(&text(&o)).len() == 2, "{}", text(&o));
    let o = stride(&["summary", fixed.to_str().unwrap(), "--batch-size", "4", "--measure"]);
    assert!(!o.status.success() && text(&o).contains("declares a batch of 1: measure it with --batch-size 1"), "{}", text(&o));
    std::fs::remove_dir_all(dir).unwrap();
}
