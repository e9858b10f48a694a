//! Whole networks on a device through the seam: `model.to(device)`, a training step (forward,
//! loss, backward, optimizer) and an evaluation pass give the CPU's numbers bit for bit, every
//! parameter, gradient and buffer stays on the device, and neither a training step nor an
//! evaluation pass reads anything back to the host. The device is a `HostMirror`
//! (CPU kernels behind the seam), so nothing above autograd can compute on a device tensor
//! without the test noticing: the result would land on the CPU and the next op would refuse
//! to mix devices.

use std::sync::{Arc, OnceLock};

use stride_autograd::device::{self, HostMirror};
use stride_autograd::{cross_entropy, no_grad, Device, Rng, Tensor, ToDevice, Var};
use stride_models::vae::Vae;
use stride_models::{InputSpec, ZOO};
use stride_nn::optim::{Adam, Optimizer, RmsProp, Sgd};
use stride_nn::{Ctx, Module, Slot};

fn mirror() -> Device {
    static M: OnceLock<Arc<HostMirror>> = OnceLock::new();
    let dev = Device::Cuda(92);
    M.get_or_init(|| {
        let m = Arc::new(HostMirror::new(dev));
        device::register::<f32>(m.clone());
        m
    });
    dev
}

/// Every parameter, gradient and buffer, by name, checked to be on `dev` and read back.
fn state(m: &mut dyn Module, dev: Device) -> Vec<(String, Tensor<f32>)> {
    let mut out = Vec::new();
    m.visit("", &mut |name, slot| {
        let mut put = |what: String, t: Tensor<f32>| {
            assert_eq!(t.device(), dev, "{what} is on {}, the model on {dev}", t.device());
            out.push((what, t.to_host().unwrap()));
        };
        match slot {
            Slot::Param(v) => {
                put(name.clone(), v.value());
                if let Some(g) = v.grad() {
                    put(format!("{name} (grad)"), g);
                }
            }
            Slot::Buffer(t) => put(name, t.clone()),
        }
    });
    out
}

/// The losses, the evaluation logits and the final state of a run.
type Run = (Vec<f32>, Tensor<f32>, Vec<(String, Tensor<f32>)>);

/// Two training steps and an evaluation on `dev` with optimizer number `opt` (SGD, Adam,
/// RMSprop); returns the losses, logits and final state.
fn train_steps(model: &mut dyn Module, dev: Device, x: &Tensor<f32>, labels: &[usize], opt: usize) -> Run {
    model.to(dev).unwrap();
    let params = model.parameters();
    let mut opt: Box<dyn Optimizer> = match opt % 3 {
        0 => Box::new(Sgd::new(0.05, 0.9, false, 5e-4).unwrap()),
        1 => Box::new(Adam::new(1e-3, (0.9, 0.999), 1e-8, 1e-4, true).unwrap()),
        _ => Box::new(RmsProp::new(1e-3, 0.99, 1e-8, 0.9, 1e-4).unwrap()),
    };
    let xv = Var::constant(x.to(dev).unwrap());
    let mut losses = Vec::new();
    for step in 0..2 {
        for p in &params {
            p.zero_grad();
        }
        let reads = HostMirror::reads();
        let logits = model.forward(&xv, &mut Ctx::train(step)).unwrap();
        let loss = cross_entropy(&logits, labels, 0.0).unwrap();
        assert_eq!(loss.device(), dev);
        loss.backward().unwrap();
        opt.step(&params).unwrap();
        // Nothing in a step is read back to the host (on a GPU each read waits for the queue).
        assert_eq!(HostMirror::reads() - reads, 0, "a training step on {dev} read {} tensors back", HostMirror::reads() - reads);
        losses.push(loss.value().item().unwrap());
    }
    let reads = HostMirror::reads();
    let eval = no_grad(|| model.forward(&xv, &mut Ctx::eval())).unwrap().value();
    assert_eq!(eval.device(), dev);
    assert_eq!(HostMirror::reads() - reads, 0, "an evaluation pass on {dev} read tensors back");
    (losses, eval.to_host().unwrap(), state(model, dev))
}

#[test]
fn every_zoo_model_trains_on_a_device_as_on_the_cpu() {
    let dev = mirror();
    for (i, e) in ZOO.iter().enumerate() {
        // The smallest input each model takes keeps this quick; the geometry is what matters.
        let side = e.min_size.max(32).min(e.input.height);
        let s = InputSpec { classes: 10, height: side, width: side, ..e.input };
        let t0 = std::time::Instant::now();
        let build = || stride_models::build(e.name, &mut Rng::seed(5), s).unwrap();
        let x = Rng::seed(6).normal(&[2, s.channels, s.height, s.width], 0.0, 1.0).unwrap();
        let labels = [3, 7];
        // AlexNet and the VGGs (over 100M parameters in their dense layers) add minutes and
        // no layer type that the rest lack.
        if build().num_parameters() > 20_000_000 {
            continue;
        }
        let cpu = train_steps(&mut build(), Device::Cpu, &x, &labels, i);
        let on_dev = train_steps(&mut build(), dev, &x, &labels, i);
        assert_eq!(cpu.0, on_dev.0, "{}: losses", e.name);
        assert_eq!(cpu.1, on_dev.1, "{}: evaluation logits", e.name);
        assert_eq!(cpu.2.len(), on_dev.2.len(), "{}: state entries", e.name);
        for ((name, a), (_, b)) in cpu.2.iter().zip(&on_dev.2) {
            assert_eq!(a, b, "{}: {name} differs between cpu and {dev}", e.name);
        }
        eprintln!("{}: {side}x{side}, {:.1} s", e.name, t0.elapsed().as_secs_f64());
    }
}

#[test]
fn the_vae_trains_on_a_device_as_on_the_cpu() {
    let dev = mirror();
    let x = Rng::seed(8).uniform(&[3, 1, 32, 32], 0.0, 1.0).unwrap();
    let run = |dev: Device| {
        let mut vae = Vae::new(&mut Rng::seed(2)).unwrap();
        vae.to(dev).unwrap();
        let params = vae.parameters();
        let mut opt = Adam::new(1e-3, (0.9, 0.999), 1e-8, 0.0, false).unwrap();
        let xv = Var::constant(x.to(dev).unwrap());
        let reads = HostMirror::reads();
        let (_, loss) = vae.forward_loss(&xv, &mut Ctx::train(4)).unwrap();
        let loss = loss.total;
        loss.backward().unwrap();
        opt.step(&params).unwrap();
        assert_eq!(HostMirror::reads() - reads, 0, "the VAE's training step on {dev} read tensors back");
        (loss.value().item().unwrap(), state(&mut vae, dev))
    };
    let (cpu, on_dev) = (run(Device::Cpu), run(dev));
    assert_eq!(cpu.0, on_dev.0, "vae loss");
    for ((name, a), (_, b)) in cpu.1.iter().zip(&on_dev.1) {
        assert_eq!(a, b, "vae: {name} differs between cpu and {dev}");
    }
}

#[test]
fn a_cpu_batch_into_a_model_on_a_device_names_both() {
    let dev = mirror();
    let s = InputSpec { classes: 10, ..stride_models::entry("cnn").unwrap().input };
    let mut m = stride_models::build("cnn", &mut Rng::seed(1), s).unwrap();
    m.to(dev).unwrap();
    let x = Var::constant(Tensor::zeros(&[1, s.channels, s.height, s.width]).unwrap());
    let e = m.forward(&x, &mut Ctx::eval()).unwrap_err().to_string();
    assert!(e.contains("cpu") && e.contains("cuda:92") && e.contains("layer 0"), "{e}");
}
