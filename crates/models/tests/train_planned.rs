//! Planned training steps (`stride_autograd::train_plan`) against eager ones: the same loss,
//! the same gradient for every parameter and the same running statistics afterwards.

use stride_autograd::{cross_entropy, Conv2dOptions, Padding, Pool2dOptions, Rng, Tensor, Unary, Var};
use stride_models::InputSpec;
use stride_nn::blocks::{OtherPool, Residual};
use stride_nn::layers::{Activation, BatchNorm, Conv2d, Flatten, Linear, Pool, Sequential};
use stride_nn::planned::TrainPlanned;
use stride_nn::{Ctx, Module, Slot};

fn grads_and_buffers(m: &mut dyn Module) -> Vec<(String, Tensor<f32>)> {
    let mut out = Vec::new();
    m.visit("", &mut |name, slot| match slot {
        Slot::Param(v) => out.push((format!("{name} (grad)"), v.grad().expect("every parameter has a gradient"))),
        Slot::Buffer(t) => out.push((name, t.clone())),
    });
    out
}

fn zero_grads(m: &mut dyn Module) {
    m.visit("", &mut |_, slot| {
        if let Slot::Param(v) = slot {
            v.zero_grad();
        }
    });
}

/// How closely planned gradients must follow eager ones.
#[derive(Clone, Copy)]
enum Agree {
    /// Every element within this fraction of the tensor's largest magnitude.
    Elements(f32),
    /// Per tensor: cosine similarity at least 1 - .0, and norms within .1. For deep networks,
    /// where a pre-activation within rounding of zero may take the other side of a ReLU in one
    /// of the two runs, moving one channel's gradient by one element's share.
    Direction(f64, f64),
}

/// One eager step and one planned step from the same weights, compared.
fn check(name: &str, spec: InputSpec, n: usize, agree: Agree) {
    let build = || stride_models::build(name, &mut Rng::seed(9), spec).unwrap();
    compare(name, &mut build(), &mut build(), spec, n, agree);
}

fn compare(name: &str, model: &mut dyn Module, twin: &mut dyn Module, spec: InputSpec, n: usize, agree: Agree) {
    let mut rng = Rng::seed(10);
    let x = rng.normal(&[n, spec.channels, spec.height, spec.width], 0.0, 1.0).unwrap();
    let labels: Vec<usize> = (0..n).map(|i| (i * 7) % spec.classes).collect();
    // Eager.
    let logits = model.forward(&Var::constant(x.clone()), &mut Ctx::train(0)).unwrap();
    let loss = cross_entropy(&logits, &labels, 0.0).unwrap();
    loss.backward().unwrap();
    let want = grads_and_buffers(model);
    // Planned, on the twin (same seed, same weights).
    zero_grads(twin);
    let mut planned = TrainPlanned::new();
    let have_loss = planned.step(twin, &x, &labels).unwrap().unwrap_or_else(|| panic!("{name}: refused: {:?}", planned.refusal(x.shape())));
    let have = grads_and_buffers(twin);
    let l = loss.value().item().unwrap();
    assert!((have_loss - l).abs() <= 1e-5 * (1.0 + l.abs()), "{name}: loss {have_loss} planned, {l} eager");
    assert_eq!(have.len(), want.len());
    for ((hn, h), (wn, w)) in have.iter().zip(&want) {
        assert_eq!(hn, wn);
        match agree {
            Agree::Elements(tol) => {
                let scale = w.data().iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in h.data().iter().zip(w.data()).enumerate() {
                    assert!((a - b).abs() <= tol * scale, "{name}: {hn}[{i}] is {a} planned, {b} eager (scale {scale})");
                }
            }
            Agree::Direction(cos_tol, norm_tol) => {
                let dot = |p: &Tensor<f32>, q: &Tensor<f32>| p.data().iter().zip(q.data()).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
                let (hh, ww, hw) = (dot(h, h).sqrt(), dot(w, w).sqrt(), dot(h, w));
                if ww == 0.0 {
                    assert!(hh == 0.0, "{name}: {hn} is zero eager, not planned");
                    continue;
                }
                let cos = hw / (hh * ww).max(f64::MIN_POSITIVE);
                assert!(cos >= 1.0 - cos_tol && (hh - ww).abs() <= norm_tol * ww, "{name}: {hn}: cosine {cos}, norms {hh} planned and {ww} eager");
            }
        }
    }
}

#[test]
fn planned_training_steps_match_eager_ones() {
    let mnist = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    check("cnn", mnist, 64, Agree::Elements(2e-4));
    check("cnn", mnist, 3, Agree::Elements(2e-4));
    // ResNet-18: blocked and Winograd convolutions, batch norm in both layouts, residual sums
    // and global pooling, 20 layers deep: compared by direction (see `Agree`). Measured:
    // cosine >= 0.99998, norms within 1.1e-3; leaving out one term of batch norm's input
    // gradient gives cosine 0.96.
    check("resnet18_cifar", InputSpec { channels: 3, height: 32, width: 32, classes: 10 }, 8, Agree::Direction(1e-4, 5e-3));
}

#[test]
fn networks_with_dropout_are_refused_and_left_untouched() {
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let mut model = stride_models::build("cnn-bn", &mut Rng::seed(1), spec).unwrap();
    let before = grads_or_values(&mut model);
    let x = Rng::seed(2).normal(&[8, 1, 28, 28], 0.0, 1.0).unwrap();
    let mut planned = TrainPlanned::new();
    assert_eq!(planned.step(&mut model, &x, &[0; 8]).unwrap(), None);
    let why = planned.refusal(x.shape()).unwrap();
    assert!(why.contains("dropout"), "{why}");
    // Recording ran the network in training mode; its running statistics are as they were.
    assert!(grads_or_values(&mut model) == before);
}

/// x * s for a learned scalar s (a gate such as ReZero's).
struct Scale(Var);

impl Module for Scale {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> stride_nn::Result<Var> {
        Ok(x.mul(&self.0)?)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        f(stride_nn::join(prefix, "s"), Slot::Param(&self.0));
    }
    fn describe(&self) -> String {
        "Scale".into()
    }
}

#[test]
fn a_learned_scale_is_refused_by_what_it_is() {
    let mut model = Sequential::new()
        .push(Flatten)
        .push(Linear::new(&mut Rng::seed(1), 16, 4, true).unwrap())
        .push(Scale(Var::parameter(Tensor::from_vec(vec![0.5], &[1]).unwrap())));
    let x = Rng::seed(2).normal(&[2, 1, 4, 4], 0.0, 1.0).unwrap();
    let mut planned = TrainPlanned::new();
    assert_eq!(planned.step(&mut model, &x, &[0, 3]).unwrap(), None);
    let why = planned.refusal(x.shape()).unwrap();
    assert!(why.contains("mul with a parameter operand") && !why.contains("dropout"), "{why}");
}

fn grads_or_values(m: &mut dyn Module) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    m.visit("", &mut |_, slot| match slot {
        Slot::Param(v) => out.push(v.value().data().to_vec()),
        Slot::Buffer(t) => out.push(t.data().to_vec()),
    });
    out
}

/// Small networks that put each planned gradient in a known place: a strided convolution run
/// batch-blocked with batch norm in that layout, a Winograd convolution, residual blocks with
/// an identity and a projected shortcut, global pooling.
fn small_net(which: usize) -> (Sequential, usize) {
    let mut rng = Rng::seed(3);
    let o = Conv2dOptions::default();
    let same = o.padding(Padding::Same);
    let conv = |rng: &mut Rng, i, k, size, opts| Conv2d::new(rng, i, k, size, opts, false).unwrap();
    let block = |rng: &mut Rng, i: usize, c: usize, stride: usize| {
        let body = Sequential::new()
            .push(conv(rng, i, c, 3, o.stride(stride).padding(Padding::Explicit { top: 1, bottom: 1, left: 1, right: 1 })))
            .push(BatchNorm::new(c).unwrap())
            .push(Activation(Unary::Relu))
            .push(conv(rng, c, c, 3, same))
            .push(BatchNorm::new(c).unwrap());
        let shortcut: Option<Box<dyn Module>> = (stride > 1 || i != c)
            .then(|| Box::new(Sequential::new().push(conv(rng, i, c, 1, o.stride(stride))).push(BatchNorm::new(c).unwrap())) as Box<dyn Module>);
        Residual::new(Box::new(body), shortcut).then(Unary::Relu)
    };
    let stem =
        |rng: &mut Rng, c: usize| Sequential::new().push(conv(rng, 3, c, 3, same)).push(BatchNorm::new(c).unwrap()).push(Activation(Unary::Relu));
    match which {
        0 => (
            Sequential::new()
                .push(conv(&mut rng, 3, 8, 3, o.stride(2).padding(Padding::Same)))
                .push(BatchNorm::new(8).unwrap())
                .push(Activation(Unary::Relu)),
            8 * 4 * 4,
        ),
        1 => (stem(&mut rng, 16).push(conv(&mut rng, 16, 16, 3, same)), 16 * 8 * 8),
        2 => {
            let s = stem(&mut rng, 16);
            let b1 = block(&mut rng, 16, 16, 1);
            let b2 = block(&mut rng, 16, 16, 1);
            (s.push(b1).push(b2), 16 * 8 * 8)
        }
        // Max pools: 2x2 (cnn-bn's), then 3x3 stride 2 padded (ResNet's stem), whose windows
        // share inputs.
        4 => (
            stem(&mut rng, 16)
                .push(Pool::Max(Pool2dOptions::new(2)))
                .push(conv(&mut rng, 16, 16, 3, same))
                .push(Pool::Max(Pool2dOptions::new(3).stride(2).padding(Padding::Explicit { top: 1, bottom: 1, left: 1, right: 1 }))),
            16 * 2 * 2,
        ),
        _ => {
            let s = stem(&mut rng, 16);
            let b1 = block(&mut rng, 16, 32, 2);
            let b2 = block(&mut rng, 32, 32, 1);
            (s.push(b1).push(b2).push(OtherPool::GlobalAvg), 32)
        }
    }
}

#[test]
fn planned_gradients_match_eager_ones_in_small_networks() {
    for which in 0..5 {
        let build = || {
            let (body, features) = small_net(which);
            body.push(Flatten).push(Linear::new(&mut Rng::seed(4), features, 10, true).unwrap())
        };
        let spec = InputSpec { channels: 3, height: 8, width: 8, classes: 10 };
        compare(&format!("small network {which}"), &mut build(), &mut build(), spec, 16, Agree::Elements(1e-4));
    }
}
