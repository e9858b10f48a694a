//! Training on a device through the seam (a `HostMirror` standing in for a GPU): the same
//! run as on the CPU, a checkpoint that resumes on the device, and a clear refusal of what
//! does not run there yet.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use stride_autograd::device::{self, HostMirror};
use stride_autograd::{Device, Rng};
use stride_models::{build, InputSpec};
use stride_nn::Module;
use stride_train::{checkpoint, train, TrainConfig};

mod common;
use common::{cfg, small, tmp};

fn mirror() -> Device {
    static M: OnceLock<()> = OnceLock::new();
    let dev = Device::Cuda(94);
    M.get_or_init(|| device::register::<f32>(Arc::new(HostMirror::new(dev))));
    dev
}

fn cnn_bn(seed: u64) -> stride_nn::layers::Sequential {
    build("cnn-bn", &mut Rng::seed(seed), InputSpec { channels: 1, height: 28, width: 28, classes: 10 }).unwrap()
}

#[test]
fn a_run_on_a_device_equals_the_run_on_the_cpu() {
    let dev = mirror();
    let data = small(256, 64);
    let on = |device: Device| TrainConfig { device, ..cfg(2, None) };
    let (mut a, mut b) = (cnn_bn(3), cnn_bn(3));
    let cpu = train(&mut a, &data, &on(Device::Cpu), false, None, |_| {}).unwrap();
    let gpu = train(&mut b, &data, &on(dev), false, None, |_| {}).unwrap();
    for (x, y) in cpu.reports.iter().zip(&gpu.reports) {
        assert_eq!(x.train_loss, y.train_loss, "epoch {}: training loss", x.epoch);
        assert_eq!(x.train_accuracy, y.train_accuracy, "epoch {}", x.epoch);
        // Evaluation runs through plans on the CPU and eagerly on the device.
        assert!((x.test.loss - y.test.loss).abs() < 1e-5, "epoch {}: test loss {} vs {}", x.epoch, x.test.loss, y.test.loss);
    }
    assert!(b.parameters().iter().all(|p| p.device() == dev), "the model stays on {dev}");
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));
}

#[test]
fn a_run_on_a_device_resumes_on_the_device() {
    let dev = mirror();
    let data = small(192, 32);
    let c = |dir| TrainConfig { device: dev, ..cfg(2, Some(dir)) };
    let whole = tmp("device-whole");
    let mut a = cnn_bn(5);
    train(&mut a, &data, &c(whole.clone()), false, None, |_| {}).unwrap();
    let parts = tmp("device-parts");
    let stop = AtomicBool::new(true);
    train(&mut cnn_bn(5), &data, &c(parts.clone()), false, Some(&stop), |_| {}).unwrap();
    let mut b = cnn_bn(6);
    train(&mut b, &data, &c(parts.clone()), true, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));
    let mut buffers_on_device = true;
    b.visit("", &mut |_, s| {
        if let stride_nn::Slot::Buffer(t) = s {
            buffers_on_device &= t.device() == dev;
        }
    });
    assert!(buffers_on_device, "a resumed model's buffers are back on {dev}");
    for d in [whole, parts] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_device_without_a_backend_is_refused_before_training() {
    let data = small(64, 16);
    let e = train(&mut cnn_bn(1), &data, &TrainConfig { device: Device::Cuda(61), ..cfg(1, None) }, false, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("cuda:61"), "{e}");
}
