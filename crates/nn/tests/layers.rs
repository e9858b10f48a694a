//! Layers: shapes, PyTorch parameter names and counts, modes, and their errors.

use stride_autograd::{Conv2dOptions, Padding, Pool2dOptions, Rng, Tensor, Unary, Var};
use stride_nn::blocks::{Concat, ConvTranspose2d, DenseBlock, DepthwiseSeparableConv2d, Dropout2d, OtherPool, Pad, Residual, SqueezeExcite};
use stride_nn::layers::{Activation, BatchNorm, Conv2d, Dropout, Flatten, Linear, Pool, Sequential};
use stride_nn::{Ctx, Module, Slot};

fn names(m: &mut dyn Module) -> Vec<String> {
    let mut v = Vec::new();
    m.visit("", &mut |n, _| v.push(n));
    v
}

fn input(shape: &[usize]) -> Var {
    Var::constant(Rng::seed(1).normal(shape, 0.0, 1.0).unwrap())
}

#[test]
fn sequential_names_and_counts_follow_pytorch() {
    let rng = &mut Rng::seed(0);
    let mut m = Sequential::new()
        .push(Conv2d::new(rng, 3, 8, 3, Conv2dOptions::default().padding(Padding::Same), false).unwrap())
        .push(BatchNorm::new(8).unwrap())
        .push(Activation(Unary::Relu))
        .push(Pool::Max(Pool2dOptions::new(2)))
        .push(Flatten)
        .push(Linear::new(rng, 8 * 4 * 4, 10, true).unwrap());
    assert_eq!(names(&mut m), ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked", "5.weight", "5.bias"]);
    // Same counts as torch: 3*8*9 + 8 + 8 + 128*10 + 10.
    assert_eq!(m.num_parameters(), 216 + 16 + 1290);
    let y = m.forward(&input(&[2, 3, 8, 8]), &mut Ctx::train(0)).unwrap();
    assert_eq!(y.shape(), [2, 10]);
    // PyTorch's default init bound for Linear(128, 10): 1/sqrt(128).
    let w = m.parameters()[3].value();
    assert!(w.data().iter().all(|v| v.abs() <= 1.0 / 128f32.sqrt()));
}

#[test]
fn batch_norm_and_dropout_follow_the_mode() {
    let mut bn = BatchNorm::new(3).unwrap();
    let x = input(&[4, 3, 5, 5]);
    bn.forward(&x, &mut Ctx::eval()).unwrap();
    assert_eq!(bn.running_mean.data(), &[0.0; 3], "evaluation leaves running statistics alone");
    bn.forward(&x, &mut Ctx::train(0)).unwrap();
    assert!(bn.running_mean.data().iter().any(|&v| v != 0.0));
    assert_eq!(bn.num_batches_tracked.data(), &[1.0]);
    let mut buffers = 0;
    bn.visit("bn1", &mut |n, s| {
        if let Slot::Buffer(_) = s {
            buffers += 1;
            assert!(n.starts_with("bn1."));
        }
    });
    assert_eq!(buffers, 3);
    let mut d = Dropout(0.5);
    assert_eq!(d.forward(&x, &mut Ctx::eval()).unwrap().value(), x.value());
    let dropped = d.forward(&x, &mut Ctx::train(3)).unwrap().value();
    let zeros = dropped.data().iter().filter(|&&v| v == 0.0).count();
    assert!((100..200).contains(&zeros), "{zeros} of 300 dropped");
    let ch = Dropout2d(0.5).forward(&x, &mut Ctx::train(4)).unwrap().value();
    for plane in ch.data().chunks(25) {
        assert!(plane.iter().all(|&v| v == 0.0) || plane.iter().all(|&v| v != 0.0), "whole channels drop");
    }
}

#[test]
fn frozen_batch_norm_normalises_by_its_running_statistics_in_training_too() {
    let mut bn = BatchNorm::new(3).unwrap();
    bn.forward(&input(&[4, 3, 5, 5]), &mut Ctx::train(0)).unwrap();
    let (mean, var, count) = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone());
    let x = Var::parameter(Rng::seed(7).normal(&[2, 3, 4, 4], 1.0, 2.0).unwrap());
    let eval = bn.forward(&x, &mut Ctx::eval()).unwrap().value();
    for v in [&bn.weight, &bn.bias] {
        v.set_requires_grad(false).unwrap();
    }
    let y = bn.forward(&x, &mut Ctx::train(1)).unwrap();
    assert_eq!(y.value(), eval, "frozen, it normalises as in evaluation");
    assert_eq!((&bn.running_mean, &bn.running_var, &bn.num_batches_tracked), (&mean, &var, &count), "and keeps its statistics");
    // The input's gradient is the per-channel scale gamma / sqrt(running_var + eps).
    y.sum_all().unwrap().backward().unwrap();
    let g = x.grad().unwrap();
    for (i, v) in g.data().iter().enumerate() {
        let c = i / 16 % 3;
        let want = bn.weight.value().data()[c] / (var.data()[c] + 1e-5).sqrt();
        assert!((v - want).abs() < 1e-5, "x.grad[{i}] = {v}, want {want}");
    }
    // Only the bias frozen: it still trains by the batch.
    bn.weight.set_requires_grad(true).unwrap();
    bn.forward(&x, &mut Ctx::train(2)).unwrap();
    assert_ne!(bn.running_mean, mean);
}

#[test]
fn blocks_have_the_right_shapes() {
    let rng = &mut Rng::seed(2);
    let ctx = &mut Ctx::train(0);
    let x = input(&[2, 4, 6, 6]);
    let mut t = ConvTranspose2d::new(rng, 4, 3, 4, Conv2dOptions::default().stride(2).padding(Padding::uniform(1)), true).unwrap();
    assert_eq!(t.forward(&x, ctx).unwrap().shape(), [2, 3, 12, 12]);
    assert_eq!(names(&mut t), ["weight", "bias"]);
    let mut s = DepthwiseSeparableConv2d::new(rng, 4, 8, 3, Conv2dOptions::default().padding(Padding::Same), false).unwrap();
    assert_eq!(s.forward(&x, ctx).unwrap().shape(), [2, 8, 6, 6]);
    assert_eq!(names(&mut s), ["depthwise.weight", "pointwise.weight"]);
    assert_eq!(s.num_parameters(), 4 * 9 + 4 * 8);
    for (mut p, shape) in [
        (OtherPool::Lp(2.0, Pool2dOptions::new(2)), [2, 4, 3, 3]),
        (OtherPool::AdaptiveAvg(2, 3), [2, 4, 2, 3]),
        (OtherPool::AdaptiveMax(1, 1), [2, 4, 1, 1]),
        (OtherPool::GlobalAvg, [2, 4, 1, 1]),
        (OtherPool::GlobalMax, [2, 4, 1, 1]),
        (OtherPool::ChannelMax { depth: 2, stride: 2 }, [2, 2, 6, 6]),
    ] {
        assert_eq!(p.forward(&x, ctx).unwrap().shape(), shape, "{}", p.describe());
    }
    assert_eq!(Pad { pad: (0, 1, 0, 1), value: 0.0 }.forward(&x, ctx).unwrap().shape(), [2, 4, 7, 7]);
    let conv =
        |rng: &mut Rng, o| Box::new(Conv2d::new(rng, 4, o, 3, Conv2dOptions::default().padding(Padding::Same), false).unwrap()) as Box<dyn Module>;
    let mut r = Residual::new(conv(rng, 4), None);
    assert_eq!(r.forward(&x, ctx).unwrap().shape(), [2, 4, 6, 6]);
    assert_eq!(names(&mut r), ["body.weight"]);
    let mut bad = Residual::new(conv(rng, 5), None);
    assert!(bad.forward(&x, ctx).unwrap_err().to_string().contains("the block gives [2, 5, 6, 6] but the shortcut gives [2, 4, 6, 6]"));
    let mut c = Concat::new(vec![conv(rng, 2), conv(rng, 3)]);
    assert_eq!(c.forward(&x, ctx).unwrap().shape(), [2, 5, 6, 6]);
    assert_eq!(names(&mut c), ["0.weight", "1.weight"]);
}

#[test]
fn shape_errors_name_the_layer() {
    let rng = &mut Rng::seed(0);
    let mut m = Sequential::new()
        .push(Conv2d::new(rng, 1, 20, 3, Conv2dOptions::default(), true).unwrap())
        .push(Conv2d::new(rng, 50, 20, 3, Conv2dOptions::default(), true).unwrap());
    let e = m.forward(&input(&[1, 1, 8, 8]), &mut Ctx::eval()).unwrap_err().to_string();
    assert!(e.starts_with("layer 1 (Conv2d(50, 20, k3x3"), "{e}");
    assert!(e.contains("conv2d: input has 20 channels but the weight expects 50"), "{e}");
    assert!(Conv2d::new(rng, 6, 4, 3, Conv2dOptions::default().groups(4), true).is_err());
    let _ = Tensor::<f32>::zeros(&[1]).unwrap();
}

#[test]
fn initialisers_have_the_documented_spread() {
    use stride_nn::init;
    let rng = &mut Rng::seed(9);
    let shape = [64, 32, 3, 3]; // fan_in 288, fan_out 576
    assert_eq!(init::fans(&shape), (288, 576));
    let std = |t: &Tensor<f32>| (t.data().iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / t.numel() as f64).sqrt();
    let close = |got: f64, want: f64| assert!((got / want - 1.0).abs() < 0.05, "std {got} vs {want}");
    close(std(&init::kaiming_normal(rng, &shape).unwrap()), (2.0f64 / 288.0).sqrt());
    close(std(&init::xavier_normal(rng, &shape).unwrap()), (2.0f64 / 864.0).sqrt());
    // Uniform(-b, b) has std b / sqrt(3).
    close(std(&init::kaiming_uniform(rng, &shape, 0.0).unwrap()), (2.0f64).sqrt() * (3.0f64 / 288.0).sqrt() / 3f64.sqrt());
    close(std(&init::xavier_uniform(rng, &shape).unwrap()), (6.0f64 / 864.0).sqrt() / 3f64.sqrt());
    let (w, b) = init::torch_default(rng, &shape).unwrap();
    let bound = 1.0 / 288f32.sqrt();
    assert!(w.data().iter().chain(b.data()).all(|v| v.abs() <= bound));
    assert_eq!(b.shape(), [64]);
}

/// Values of `v` as f64.
fn vals(v: &Var) -> Vec<f64> {
    v.value().data().iter().map(|&x| x as f64).collect()
}

#[test]
fn named_blocks_compute_what_they_say() {
    let rng = &mut Rng::seed(4);
    let ctx = &mut Ctx::eval();
    let x = input(&[2, 3, 5, 5]);
    let conv = |rng: &mut Rng, i, o| Conv2d::new(rng, i, o, 3, Conv2dOptions::default().padding(Padding::Same), true).unwrap();

    // Residual with torchvision names and a relu after the sum: relu(body(x) + x).
    let body = Sequential::new().push_named("conv1", conv(rng, 3, 3)).push_named("relu", Activation(Unary::Relu));
    let mut r = Residual::new(Box::new(body), None).named("", "downsample").then(Unary::Relu);
    assert_eq!(names(&mut r), ["conv1.weight", "conv1.bias"]);
    let mut c1 =
        Conv2d { weight: r.parameters()[0].clone(), bias: Some(r.parameters()[1].clone()), opts: Conv2dOptions::default().padding(Padding::Same) };
    let want: Vec<f64> = vals(&c1.forward(&x, ctx).unwrap()).iter().zip(vals(&x)).map(|(b, x)| (b.max(0.0) + x).max(0.0)).collect();
    for (g, w) in vals(&r.forward(&x, ctx).unwrap()).iter().zip(&want) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }

    // Dense block: layer 2 sees [x, y1]; the output is [x, y1, y2].
    let (l1, l2) = (conv(rng, 3, 2), conv(rng, 5, 2));
    let (w1, w2) = (l1.weight.clone(), l2.weight.clone());
    let mut d = DenseBlock { layers: vec![Box::new(l1), Box::new(l2)], names: vec!["denselayer1".into(), "denselayer2".into()] };
    assert_eq!(names(&mut d), ["denselayer1.weight", "denselayer1.bias", "denselayer2.weight", "denselayer2.bias"]);
    let y = d.forward(&x, ctx).unwrap();
    assert_eq!(y.shape(), [2, 7, 5, 5]);
    let y1 = y.narrow(1, 3, 2).unwrap();
    let mut again = Conv2d { weight: w2, bias: Some(d.parameters()[3].clone()), opts: Conv2dOptions::default().padding(Padding::Same) };
    let y2 = again.forward(&stride_autograd::concat(&[&x, &y1], 1).unwrap(), ctx).unwrap();
    assert_eq!(vals(&y.narrow(1, 5, 2).unwrap()), vals(&y2));
    assert_eq!(vals(&y.narrow(1, 0, 3).unwrap()), vals(&x));
    assert_eq!(w1.shape(), [2, 3, 3, 3]);

    // Squeeze-excite by hand: per (image, channel) scale sigmoid(W2 relu(W1 mean + b1) + b2).
    let mut se = SqueezeExcite::new(rng, 3, 2).unwrap();
    assert_eq!(names(&mut se), ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
    let p: Vec<Vec<f64>> = se.parameters().iter().map(vals).collect();
    let xv = vals(&x);
    let got = vals(&se.forward(&x, ctx).unwrap());
    for n in 0..2 {
        let mean: Vec<f64> = (0..3).map(|c| xv[(n * 3 + c) * 25..][..25].iter().sum::<f64>() / 25.0).collect();
        let h: Vec<f64> = (0..2).map(|j| ((0..3).map(|c| p[0][j * 3 + c] * mean[c]).sum::<f64>() + p[1][j]).max(0.0)).collect();
        for c in 0..3 {
            let s = 1.0 / (1.0 + (-((0..2).map(|j| p[2][c * 2 + j] * h[j]).sum::<f64>() + p[3][c])).exp());
            for i in 0..25 {
                let k = (n * 3 + c) * 25 + i;
                assert!((got[k] - xv[k] * s).abs() < 1e-5, "n{n} c{c}: {} vs {}", got[k], xv[k] * s);
            }
        }
    }
    assert!(SqueezeExcite::new(rng, 3, 0).err().unwrap().to_string().contains("squeeze to 0"));
}
