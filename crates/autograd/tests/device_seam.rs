//! The device seam: every primitive, forward and backward, reaches a non-CPU device's backend
//! through the one dispatch point and gives the CPU's results. The device here is a
//! [`HostMirror`] (CPU kernels behind the seam, buffers kept apart), so this runs without a GPU;
//! `scripts/gpu-check.sh` runs the same comparison against the CUDA backend.

use std::sync::{Arc, OnceLock};

use stride_autograd::conformance;
use stride_autograd::device::{self, HostMirror};
use stride_autograd::*;

/// The mirror device of this test binary (registered once for f64).
fn mirror() -> (&'static Arc<HostMirror>, Device) {
    static M: OnceLock<Arc<HostMirror>> = OnceLock::new();
    let dev = Device::Cuda(91);
    let m = M.get_or_init(|| {
        let m = Arc::new(HostMirror::new(dev));
        device::register::<f64>(m.clone());
        m
    });
    (m, dev)
}

#[test]
fn every_primitive_runs_through_the_seam_and_matches_the_cpu() {
    let (m, dev) = mirror();
    let report = conformance::check::<f64>(dev).unwrap();
    let plain = report.iter().filter(|a| a.case.is_empty()).count();
    assert_eq!(plain, PRIMITIVES.len() - 1 + 3, "one case per primitive but reshape, and the three updates");
    let convolutions: Vec<&str> = report.iter().filter(|a| !a.case.is_empty() && !a.primitive.ends_with("_update")).map(|a| a.primitive).collect();
    assert!(convolutions.len() >= 8 && convolutions.iter().all(|p| p.starts_with("conv")), "{convolutions:?}");
    // Last, the three updates, then Adam's over a list of parameters at once.
    let last: Vec<(&str, bool)> = report.iter().rev().take(4).map(|a| (a.primitive, a.case.is_empty())).collect();
    assert_eq!(last, [("adam_update", false), ("rmsprop_update", true), ("adam_update", true), ("sgd_update", true)]);
    for a in &report {
        // The mirror runs the CPU's kernels: anything but identical is a seam bug.
        assert_eq!((a.forward, a.backward), (0.0, 0.0), "{}: cpu and {dev} differ", a.primitive);
    }
    // Every primitive but reshape (a view of the same storage on any device) reached the
    // backend, forward and backward.
    let seen = m.calls();
    for p in PRIMITIVES.iter().filter(|&&p| p != "reshape") {
        assert!(seen.get(p).is_some_and(|c| c.0 > 0 && c.1 > 0), "primitive {p} never reached the backend: {seen:?}");
    }
}

#[test]
fn the_check_sees_a_wrong_backend() {
    // A backend that gets one primitive wrong (relu as the identity) is reported, by name.
    struct Wrong(HostMirror);
    impl Backend<f64> for Wrong {
        fn device(&self) -> Device {
            Backend::<f64>::device(&self.0)
        }
        fn describe(&self) -> String {
            "wrong".into()
        }
        fn upload(&self, host: &[f64]) -> Result<std::sync::Arc<dyn DeviceBuffer<f64>>> {
            self.0.upload(host)
        }
        fn forward(&self, prim: &Prim, x: &[Tensor<f64>]) -> Result<device::Forward<f64>> {
            match prim {
                Prim::Unary(Unary::Relu) => self.0.forward(&Prim::Unary(Unary::MulScalar(1.0)), x),
                _ => self.0.forward(prim, x),
            }
        }
        fn backward(
            &self,
            prim: &Prim,
            saved: &dyn std::any::Any,
            g: &Tensor<f64>,
            x: &[Tensor<f64>],
            y: &Tensor<f64>,
        ) -> Result<Vec<Option<Tensor<f64>>>> {
            self.0.backward(prim, saved, g, x, y)
        }
    }
    let dev = Device::Cuda(93);
    device::register::<f64>(Arc::new(Wrong(HostMirror::new(dev))));
    let report = conformance::check::<f64>(dev).unwrap();
    let bad: Vec<&str> = report.iter().filter(|a| a.forward > 1e-4 || a.backward > 1e-4).map(|a| a.primitive).collect();
    assert_eq!(bad, ["unary"], "{report:?}");
}

#[test]
fn inputs_on_two_devices_are_refused_by_name() {
    let (_, dev) = mirror();
    let a = Var::parameter(Tensor::<f64>::ones(&[2, 2]).unwrap());
    let b = Var::parameter(Tensor::<f64>::ones(&[2, 2]).unwrap().to(dev).unwrap());
    let e = a.matmul(&b).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Device);
    assert!(e.to_string().contains("cpu") && e.to_string().contains("cuda:91"), "{e}");
}

#[test]
fn a_device_without_a_backend_says_so() {
    let e = Tensor::<f64>::ones(&[2]).unwrap().to(Device::Cuda(57)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Device);
    assert!(e.to_string().contains("cuda:57"), "{e}");
    // f32 has no mirror registered in this binary, even on the mirror's ordinal.
    assert!(Tensor::<f32>::ones(&[2]).unwrap().to(mirror().1).is_err());
}

#[test]
fn leaves_stay_on_their_device_when_assigned() {
    let (_, dev) = mirror();
    let p = Var::parameter(Tensor::<f64>::zeros(&[3]).unwrap());
    p.to_device(dev).unwrap();
    // Loading host weights into a parameter on a device keeps it there.
    p.set_value(Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3]).unwrap()).unwrap();
    assert_eq!(p.device(), dev);
    // An optimizer's in-place update too.
    p.update_value(|w| w.iter_mut().for_each(|v| *v *= 2.0)).unwrap();
    assert_eq!(p.device(), dev);
    assert_eq!(p.value().to_host().unwrap().data(), &[2.0, 4.0, 6.0]);
    p.to_device(Device::Cpu).unwrap();
    assert_eq!(p.device(), Device::Cpu);
}

#[test]
fn device_names_parse_as_pytorch_spells_them() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("CUDA:3".parse::<Device>().unwrap(), Device::Cuda(3));
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    for bad in ["tpu", "cuda:", "cuda:-1", "cuda:x", ""] {
        let e = bad.parse::<Device>().unwrap_err();
        assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
    }
}

#[test]
fn synchronised_batch_norm_on_a_device_matches_the_cpu() {
    // As if a second process held the same batch: every all-reduce doubles. The device composes
    // the statistics from its primitives and an all-sum; the CPU has its own kernel: forward,
    // all three gradients and the running statistics must agree.
    let (_, dev) = mirror();
    let sync = SyncStats(std::rc::Rc::new(|buf: &mut [f64]| {
        buf.iter_mut().for_each(|v| *v *= 2.0);
        Ok(())
    }));
    let mut rng = Rng::seed(4);
    let x = rng.normal(&[3, 4, 5, 2], 0.5, 2.0).unwrap();
    let gamma = rng.normal(&[4], 1.0, 0.3).unwrap();
    let beta = rng.normal(&[4], 0.0, 0.3).unwrap();
    let dy = rng.normal(&[3, 4, 5, 2], 0.0, 1.0).unwrap();
    let opts = BatchNormOptions { eps: 1e-5, momentum: 0.1 };
    let run = |device: Device| {
        let on = |t: &Tensor<f64>| t.to(device).unwrap();
        let (x, gamma, beta) = (Var::parameter(on(&x)), Var::parameter(on(&gamma)), Var::parameter(on(&beta)));
        let (mut rm, mut rv) = (on(&Tensor::zeros(&[4]).unwrap()), on(&Tensor::ones(&[4]).unwrap()));
        let y = batch_norm_sync(&x, &gamma, &beta, &mut rm, &mut rv, true, opts, Some(&sync)).unwrap();
        y.mul(&Var::constant(on(&dy))).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(y.value().device(), device);
        [y.value(), x.grad().unwrap(), gamma.grad().unwrap(), beta.grad().unwrap(), rm, rv].map(|t| t.to_host().unwrap().into_vec())
    };
    let (cpu, gpu) = (run(Device::Cpu), run(dev));
    for (what, (a, b)) in ["y", "dx", "dgamma", "dbeta", "running mean", "running var"].iter().zip(cpu.iter().zip(&gpu)) {
        let worst = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-10, "{what}: the device's synchronised batch norm differs from the CPU's by {worst:e}");
    }
}
