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

pub fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("stride-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
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
