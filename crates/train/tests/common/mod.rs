//! Helpers shared by the training tests: small splits of the embedded MNIST, the tutorial
//! CNN, run folders and a quick configuration.
#![allow(dead_code)]

use stride_autograd::Rng;
use stride_data::{embedded_mnist, Dataset, Split};
use stride_models::{build, InputSpec};
use stride_nn::layers::Sequential;
use stride_nn::schedule::Schedule;
use stride_train::{OptimizerKind, TrainConfig};

pub fn take(ds: &Dataset, n: usize) -> Dataset {
    let per = ds.channels * ds.height * ds.width;
    Dataset { images: ds.images[..n * per].to_vec(), labels: ds.labels[..n].to_vec(), ..ds.clone() }
}

pub fn small(train_n: usize, test_n: usize) -> Split {
    let s = embedded_mnist().unwrap();
    Split { name: "mnist-small".into(), train: take(&s.train, train_n), test: take(&s.test, test_n), class_names: s.class_names.clone() }
}

pub fn model(seed: u64) -> Sequential {
    build("cnn", &mut Rng::seed(seed), InputSpec { channels: 1, height: 28, width: 28, classes: 10 }).unwrap()
}

pub fn tmp(name: &str) -> Scratch {
    Scratch::new("stride-train", name)
}

pub fn cfg(epochs: usize, out: Option<std::path::PathBuf>) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        lr: 2e-3,
        optimizer: OptimizerKind::Adam,
        schedule: Schedule::Constant,
        out_dir: out,
        ..TrainConfig::default()
    }
}

/// Opens `html` in headless Chromium (Debian's `chromium`): returns the `<body ...>` tag after
/// the load event (the report records there whether its pictures decoded and any error) and a
/// screenshot. `None` when no Chromium is installed, unless `CI` is set: CI installs it
/// (`.ci/run`), so there its absence fails the test instead of skipping the check.
pub fn chromium(html: &std::path::Path) -> Option<(String, image::RgbImage)> {
    let exe = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|e| std::process::Command::new(e).arg("--version").output().is_ok_and(|o| o.status.success()));
    let Some(exe) = exe else {
        assert!(std::env::var_os("CI").is_none(), "CI must have Chromium for the report test: apt-get install chromium");
        eprintln!("NOTE: no chromium on this machine; the browser check of {} is skipped (apt-get install chromium)", html.display());
        return None;
    };
    let profile = html.with_extension("chromium-profile");
    let url = format!("file://{}", std::fs::canonicalize(html).unwrap().display());
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(exe)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,1600"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium runs");
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let dom = String::from_utf8_lossy(&run(&["--dump-dom"]).stdout).into_owned();
    let body = dom.find("<body").map(|i| dom[i..].split_once('>').map_or("", |(b, _)| b).to_string() + ">").unwrap_or_default();
    let shot = html.with_extension("png");
    run(&[&format!("--screenshot={}", shot.display())]);
    let img = image::open(&shot).expect("a screenshot").to_rgb8();
    let _ = std::fs::remove_dir_all(&profile);
    Some((body, img))
}

mod scratch;
pub use scratch::Scratch;
