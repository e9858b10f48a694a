//! Optimizers and schedules against PyTorch (tests/fixtures/make_optim_refs.py).

use serde_json::Value;
use stride_autograd::{Tensor, Var};
use stride_nn::optim::{clip_grad_norm, clip_grad_value, Adam, Optimizer, RmsProp, Sgd};
use stride_nn::schedule::Schedule;

fn refs() -> Value {
    serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/optim_refs.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn optimizers_match_pytorch_step_by_step() {
    let r = refs();
    let cases: Vec<(&str, Box<dyn Optimizer>)> = vec![
        ("sgd", Box::new(Sgd::new(0.1, 0.0, false, 0.0).unwrap())),
        ("sgd_momentum_wd", Box::new(Sgd::new(0.1, 0.9, false, 0.01).unwrap())),
        ("sgd_nesterov", Box::new(Sgd::new(0.05, 0.8, true, 0.0).unwrap())),
        ("adam", Box::new(Adam::new(0.01, (0.9, 0.999), 1e-8, 0.0, false).unwrap())),
        ("adam_wd", Box::new(Adam::new(0.01, (0.8, 0.99), 1e-6, 0.1, false).unwrap())),
        ("adamw", Box::new(Adam::new(0.01, (0.9, 0.999), 1e-8, 0.1, true).unwrap())),
        ("rmsprop", Box::new(RmsProp::new(0.01, 0.99, 1e-8, 0.0, 0.0).unwrap())),
        ("rmsprop_momentum_wd", Box::new(RmsProp::new(0.01, 0.9, 1e-8, 0.5, 0.05).unwrap())),
    ];
    for (name, mut opt) in cases {
        let p = Var::parameter(Tensor::from_vec(floats(&r["p0"]), &[5]).unwrap());
        for (step, (g, want)) in r["grads"].as_array().unwrap().iter().zip(r["optimizers"][name].as_array().unwrap()).enumerate() {
            p.set_grad(Tensor::from_vec(floats(g), &[5]).unwrap()).unwrap();
            opt.step(std::slice::from_ref(&p)).unwrap();
            for (a, b) in p.value().data().iter().zip(floats(want)) {
                assert!((a - b).abs() < 2e-6, "{name} step {}: {a} vs {b}", step + 1);
            }
        }
    }
}

#[test]
fn schedules_match_pytorch() {
    let r = refs();
    let cases = [
        ("step_3_0.5", Schedule::Step { step_size: 3, gamma: 0.5 }),
        ("multistep_2_7_0.1", Schedule::MultiStep { milestones: vec![2, 7], gamma: 0.1 }),
        ("exponential_0.9", Schedule::Exponential { gamma: 0.9 }),
        ("cosine_10_0.001", Schedule::Cosine { t_max: 10, eta_min: 0.001 }),
    ];
    for (name, s) in cases {
        for (epoch, want) in r["schedules"][name].as_array().unwrap().iter().enumerate() {
            let got = s.lr(0.1, epoch);
            assert!((got - want.as_f64().unwrap()).abs() < 1e-12, "{name} epoch {epoch}: {got} vs {want}");
        }
    }
}

#[test]
fn gradient_clipping() {
    let p = Var::parameter(Tensor::from_vec(vec![0.0f32; 2], &[2]).unwrap());
    p.set_grad(Tensor::from_vec(vec![3.0, 4.0], &[2]).unwrap()).unwrap();
    let before = clip_grad_norm(std::slice::from_ref(&p), 1.0).unwrap();
    assert!((before - 5.0).abs() < 1e-9);
    let g = p.grad().unwrap();
    assert!((g.data()[0] - 0.6).abs() < 1e-5 && (g.data()[1] - 0.8).abs() < 1e-5);
    p.set_grad(Tensor::from_vec(vec![-3.0, 0.5], &[2]).unwrap()).unwrap();
    clip_grad_value(std::slice::from_ref(&p), 1.0).unwrap();
    assert_eq!(p.grad().unwrap().data(), &[-1.0, 0.5]);
}

#[test]
fn clipping_refuses_limits_that_are_not_limits() {
    let p = Var::parameter(Tensor::from_vec(vec![0.0f32; 2], &[2]).unwrap());
    p.set_grad(Tensor::from_vec(vec![3.0, 4.0], &[2]).unwrap()).unwrap();
    let ps = std::slice::from_ref(&p);
    for bad in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
        let e = clip_grad_norm(ps, bad).unwrap_err().to_string();
        assert!(e.contains("clip_grad_norm") && e.contains(&format!("got {bad}")), "{e}");
    }
    for bad in [-1.0, f64::NAN, f64::NEG_INFINITY] {
        let e = clip_grad_value(ps, bad).unwrap_err().to_string();
        assert!(e.contains("clip_grad_value") && e.contains(&format!("got {bad}")), "{e}");
    }
    // Refused before touching anything.
    assert_eq!(p.grad().unwrap().data(), &[3.0, 4.0]);
}

#[test]
fn bad_hyper_parameters_are_errors() {
    assert!(Sgd::new(-0.1, 0.0, false, 0.0).unwrap_err().to_string().contains("learning rate"));
    assert!(Sgd::new(0.1, 0.0, true, 0.0).unwrap_err().to_string().contains("Nesterov"));
    assert!(Adam::new(0.1, (1.0, 0.9), 1e-8, 0.0, false).unwrap_err().to_string().contains("betas"));
    assert!(RmsProp::new(0.1, 0.99, 0.0, 0.0, 0.0).is_err());
}

/// A stand-in device whose optimizer updates fail while `FAIL` is set: otherwise the mirror.
struct Flaky(stride_autograd::device::HostMirror);

static FAIL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl stride_autograd::Backend<f32> for Flaky {
    fn device(&self) -> stride_autograd::Device {
        stride_autograd::Backend::<f32>::device(&self.0)
    }
    fn describe(&self) -> String {
        "flaky".into()
    }
    fn upload(&self, host: &[f32]) -> stride_autograd::Result<std::sync::Arc<dyn stride_autograd::DeviceBuffer<f32>>> {
        self.0.upload(host)
    }
    fn forward(&self, prim: &stride_autograd::Prim, x: &[Tensor<f32>]) -> stride_autograd::Result<stride_autograd::device::Forward<f32>> {
        self.0.forward(prim, x)
    }
    fn backward(
        &self,
        prim: &stride_autograd::Prim,
        saved: &dyn std::any::Any,
        g: &Tensor<f32>,
        x: &[Tensor<f32>],
        y: &Tensor<f32>,
    ) -> stride_autograd::Result<Vec<Option<Tensor<f32>>>> {
        self.0.backward(prim, saved, g, x, y)
    }
    fn update_many(
        &self,
        rule: &stride_autograd::Update,
        items: &[stride_autograd::device::UpdateItem<'_, f32>],
    ) -> stride_autograd::Result<Vec<stride_autograd::device::Updated<f32>>> {
        if FAIL.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(stride_autograd::Error::device("update", "out of memory (on purpose)"));
        }
        self.0.update_many(rule, items)
    }
}

#[test]
fn a_failed_device_update_loses_no_state() {
    use std::sync::atomic::Ordering::SeqCst;
    use stride_autograd::{Device, ToDevice};
    let dev = Device::Cuda(57);
    stride_autograd::device::register::<f32>(std::sync::Arc::new(Flaky(stride_autograd::device::HostMirror::new(dev))));
    let grads = [vec![0.5f32, -1.0, 2.0], vec![0.1, 0.2, -0.3]];
    // Three steps of each optimizer with momentum state, the second failing once (and taken
    // again) on the device: the weights end as three steps on the CPU leave them.
    let optimizers: [fn() -> Box<dyn Optimizer>; 3] = [
        || Box::new(Sgd::new(0.1, 0.9, false, 0.0).unwrap()),
        || Box::new(Adam::default_with_lr(0.1).unwrap()),
        || Box::new(RmsProp::new(0.01, 0.99, 1e-8, 0.0, 0.9).unwrap()),
    ];
    for make in optimizers {
        let run = |device: Device, fail_at: Option<usize>| -> Vec<f32> {
            let p = Var::parameter(Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap().to(device).unwrap());
            let mut opt = make();
            for (step, g) in grads.iter().chain(&grads[..1]).enumerate() {
                p.set_grad(Tensor::from_vec(g.clone(), &[3]).unwrap().to(device).unwrap()).unwrap();
                if fail_at == Some(step) {
                    FAIL.store(true, SeqCst);
                    let e = opt.step(std::slice::from_ref(&p)).unwrap_err().to_string();
                    FAIL.store(false, SeqCst);
                    assert!(e.contains("on purpose"), "{e}");
                }
                opt.step(std::slice::from_ref(&p)).unwrap();
            }
            p.value().to_host().unwrap().data().to_vec()
        };
        let cpu = run(Device::Cpu, None);
        assert_eq!(run(dev, None), cpu);
        assert_eq!(run(dev, Some(1)), cpu, "a step that failed on the device changed what the next ones do");
    }
}
