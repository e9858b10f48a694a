//! Every op's gradient against central finite differences in f64, over random geometry.

mod common;

use common::{grad_check, randn};
use proptest::prelude::*;
use stride_autograd::*;
use stride_autograd::{Result, Rng};

fn padding() -> impl Strategy<Value = Padding> {
    prop_oneof![
        Just(Padding::Valid),
        Just(Padding::Same),
        Just(Padding::SameLower),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3).prop_map(|(top, bottom, left, right)| { Padding::Explicit { top, bottom, left, right } }),
    ]
}

fn conv_opts() -> impl Strategy<Value = Conv2dOptions> {
    (1usize..4, 1usize..4, 1usize..4, 1usize..4, padding(), 1usize..4).prop_map(|(sh, sw, dh, dw, padding, groups)| Conv2dOptions {
        stride: (sh, sw),
        dilation: (dh, dw),
        padding,
        groups,
        output_padding: (0, 0),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn conv2d_gradients(n in 1usize..3, cg in 1usize..3, kg in 1usize..3, h in 1usize..10, w in 1usize..10,
                        r in 1usize..4, s in 1usize..4, o in conv_opts(), bias in any::<bool>(), seed in 0u64..1000) {
        let mut rng = Rng::seed(seed);
        let x = randn(&mut rng, &[n, cg * o.groups, h, w]);
        let wt = randn(&mut rng, &[kg * o.groups, cg, r, s]);
        let b = randn(&mut rng, &[kg * o.groups]);
        if ConvGeom::conv2d(x.shape(), wt.shape(), &o).is_err() {
            return Ok(());
        }
        let res = grad_check(&[x, wt, b], |v| conv2d(&v[0], &v[1], bias.then_some(&v[2]), &o));
        prop_assert!(res.is_ok(), "{:?} with {:?}", res, o);
    }

    #[test]
    fn conv_transpose2d_gradients(n in 1usize..3, cg in 1usize..3, kg in 1usize..3, h in 1usize..6, w in 1usize..6,
                                  r in 1usize..4, s in 1usize..4, mut o in conv_opts(), op in 0usize..3, seed in 0u64..1000) {
        o.output_padding = (op.min(o.stride.0.max(o.dilation.0) - 1), op.min(o.stride.1.max(o.dilation.1) - 1));
        let mut rng = Rng::seed(seed);
        let x = randn(&mut rng, &[n, kg * o.groups, h, w]);
        let wt = randn(&mut rng, &[kg * o.groups, cg, r, s]);
        let b = randn(&mut rng, &[cg * o.groups]);
        if ConvGeom::conv_transpose2d(x.shape(), wt.shape(), &o).is_err() {
            return Ok(());
        }
        let res = grad_check(&[x, wt, b], |v| conv_transpose2d(&v[0], &v[1], Some(&v[2]), &o));
        prop_assert!(res.is_ok(), "{:?} with {:?}", res, o);
    }

    #[test]
    fn pooling_gradients(n in 1usize..3, c in 1usize..3, h in 1usize..9, w in 1usize..9, k in 1usize..4, st in 1usize..4,
                         pad in 0usize..2, same in any::<bool>(), ceil in any::<bool>(), cip in any::<bool>(), seed in 0u64..1000) {
        let mut rng = Rng::seed(seed);
        let x = randn(&mut rng, &[n, c, h, w]);
        let padding = if same { Padding::Same } else { Padding::uniform(pad.min(k / 2)) };
        let o = Pool2dOptions::new(k).stride(st).padding(padding).ceil_mode(ceil).count_include_pad(cip);
        if stride_kernels::pool::PoolGeom::new("t", x.shape(), &o).is_err() {
            return Ok(());
        }
        let xs = [x];
        prop_assert!(grad_check(&xs, |v| max_pool2d(&v[0], &o)).is_ok(), "max {:?}", o);
        prop_assert!(grad_check(&xs, |v| avg_pool2d(&v[0], &o)).is_ok(), "avg {:?}", o);
        prop_assert!(grad_check(&xs, |v| lp_pool2d(&v[0], 2.0, &o)).is_ok(), "lp2 {:?}", o);
        prop_assert!(grad_check(&xs, |v| lp_pool2d(&v[0], 3.0, &o)).is_ok(), "lp3 {:?}", o);
    }

    #[test]
    fn adaptive_and_channel_pooling_gradients(n in 1usize..3, c in 1usize..7, h in 1usize..9, w in 1usize..9,
                                              oh in 1usize..5, ow in 1usize..5, depth in 1usize..4, st in 1usize..3, seed in 0u64..1000) {
        let mut rng = Rng::seed(seed);
        let xs = [randn(&mut rng, &[n, c, h, w])];
        prop_assert!(grad_check(&xs, |v| adaptive_avg_pool2d(&v[0], (oh, ow))).is_ok());
        prop_assert!(grad_check(&xs, |v| adaptive_max_pool2d(&v[0], (oh, ow))).is_ok());
        if depth <= c {
            prop_assert!(grad_check(&xs, |v| channel_max_pool(&v[0], depth, st)).is_ok());
        }
    }
}

use stride_kernels::conv::ConvGeom;

#[test]
fn activation_gradients() {
    let mut rng = Rng::seed(1);
    // Keep away from the kinks at 0 (and relu6's at 6, hardswish's at +-3) by construction.
    let x = randn(&mut rng, &[3, 7]).map(|v| if v.abs() < 0.05 { v + 0.1 } else { v } * 4.0);
    let xs = [x.map(|v| if (v - 6.0).abs() < 0.05 || (v.abs() - 3.0).abs() < 0.05 { v + 0.2 } else { v })];
    type F = fn(&Var<f64>) -> Result<Var<f64>>;
    let fns: [(&str, F); 19] = [
        ("relu", |v| v.relu()),
        ("relu6", |v| v.relu6()),
        ("leaky_relu", |v| v.leaky_relu(0.1)),
        ("elu", |v| v.elu()),
        ("selu", |v| v.selu()),
        ("gelu", |v| v.gelu()),
        ("erf", |v| v.erf()),
        ("sin", |v| v.sin()),
        ("cos", |v| v.cos()),
        ("silu", |v| v.silu()),
        ("hardswish", |v| v.hardswish()),
        ("tanh", |v| v.tanh()),
        ("sigmoid", |v| v.sigmoid()),
        ("softplus", |v| v.softplus()),
        ("softplus_beta", |v| v.softplus_with(2.0, 5.0)),
        ("exp", |v| v.mul_scalar(0.3)?.exp()),
        ("square", |v| v.square()),
        ("abs", |v| v.abs()),
        ("clamp", |v| v.clamp(-1.0, 1.5)),
    ];
    for (name, f) in fns {
        if let Err(e) = grad_check(&xs, |v| f(&v[0])) {
            panic!("{name}: {e}");
        }
    }
    let pos = [xs[0].map(|v| v.abs() + 0.5)];
    for (name, f) in [("ln", (|v| v.ln()) as F), ("sqrt", |v| v.sqrt()), ("pow", |v| v.powf(2.5))] {
        if let Err(e) = grad_check(&pos, |v| f(&v[0])) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn layer_norm_gradients() {
    let mut rng = Rng::seed(5);
    let x = randn(&mut rng, &[2, 3, 4]);
    let (g, b) = (randn(&mut rng, &[3, 4]), randn(&mut rng, &[3, 4]));
    grad_check(&[x.clone(), g, b], |v| layer_norm(&v[0], &v[1], Some(&v[2]), 1e-5)).unwrap();
    grad_check(&[x, randn(&mut rng, &[4])], |v| layer_norm(&v[0], &v[1], None, 1e-2)).unwrap();
}

#[test]
fn broadcasting_arithmetic_gradients() {
    let mut rng = Rng::seed(2);
    let a = randn(&mut rng, &[2, 3, 4]);
    let b = randn(&mut rng, &[3, 1]);
    let c = randn(&mut rng, &[4]).map(|v| v.abs() + 0.5);
    grad_check(&[a, b, c], |v| v[0].add(&v[1])?.mul(&v[2])?.sub(&v[1])?.div(&v[2])).unwrap();
}

#[test]
fn reduction_and_shape_gradients() {
    let mut rng = Rng::seed(3);
    let x = randn(&mut rng, &[2, 3, 4, 5]);
    let xs = [x];
    grad_check(&xs, |v| v[0].sum(&[1, 3], false)).unwrap();
    grad_check(&xs, |v| v[0].mean(&[0, 2], true)).unwrap();
    grad_check(&xs, |v| v[0].max(2, false)).unwrap();
    grad_check(&xs, |v| v[0].max(3, true)).unwrap();
    grad_check(&xs, |v| v[0].sum_all()).unwrap();
    grad_check(&xs, |v| v[0].reshape(&[6, 20])).unwrap();
    grad_check(&xs, |v| v[0].permute(&[2, 0, 3, 1])).unwrap();
    grad_check(&xs, |v| v[0].narrow(3, 1, 3)).unwrap();
    grad_check(&xs, |v| v[0].pad(&[(1, 0), (2, 1)], 0.5)).unwrap();
    grad_check(&xs, |v| v[0].flatten()).unwrap();
    grad_check(&[randn(&mut rng, &[2, 6, 2, 3])], |v| v[0].channel_shuffle(3)).unwrap();
    grad_check(&xs, |v| v[0].upsample_nearest2d((2, 3))).unwrap();
    grad_check(&xs, |v| {
        let parts = v[0].split(1, &[1, 2])?;
        concat(&[&parts[1], &parts[0], &parts[1]], 1)
    })
    .unwrap();
}

#[test]
fn matmul_and_linear_gradients() {
    let mut rng = Rng::seed(4);
    let (x, w, b) = (randn(&mut rng, &[5, 7]), randn(&mut rng, &[3, 7]), randn(&mut rng, &[3]));
    grad_check(&[x.clone(), w.clone(), b], |v| linear(&v[0], &v[1], Some(&v[2]))).unwrap();
    grad_check(&[x, randn(&mut rng, &[7, 4])], |v| v[0].matmul(&v[1])).unwrap();
    // Large enough for the threaded product.
    grad_check(&[randn(&mut rng, &[100, 120]), randn(&mut rng, &[120, 110])], |v| v[0].matmul(&v[1])).unwrap();
    // x w^T without the transposed copy, small and threaded.
    grad_check(&[randn(&mut rng, &[5, 7]), randn(&mut rng, &[4, 7])], |v| v[0].matmul_t(&v[1])).unwrap();
    grad_check(&[randn(&mut rng, &[100, 120]), randn(&mut rng, &[110, 120])], |v| v[0].matmul_t(&v[1])).unwrap();
    let (a, b) = (randn(&mut rng, &[6, 9]), randn(&mut rng, &[5, 9]));
    let (a, b) = (Var::constant(a), Var::constant(b));
    let want = a.matmul(&b.permute(&[1, 0]).unwrap()).unwrap().value();
    assert!(a.matmul_t(&b).unwrap().value().max_abs_diff(&want).unwrap() < 1e-12);
}

#[test]
fn batch_norm_gradients_in_both_modes() {
    let mut rng = Rng::seed(5);
    for shape in [vec![4, 3], vec![3, 2, 4, 5]] {
        let c = shape[1];
        let x = randn(&mut rng, &shape);
        let (g, b) = (randn(&mut rng, &[c]), randn(&mut rng, &[c]));
        for training in [true, false] {
            let res = grad_check(&[x.clone(), g.clone(), b.clone()], |v| {
                let mut rm = Tensor::from_fn(&[c], |i| 0.1 * i as f64).unwrap();
                let mut rv = Tensor::from_fn(&[c], |i| 1.0 + 0.5 * i as f64).unwrap();
                batch_norm(&v[0], &v[1], &v[2], &mut rm, &mut rv, training, BatchNormOptions::default())
            });
            assert!(res.is_ok(), "{shape:?} training={training}: {res:?}");
        }
    }
}

#[test]
fn softmax_and_loss_gradients() {
    let mut rng = Rng::seed(6);
    let logits = randn(&mut rng, &[4, 5]);
    let t = [0, 4, 2, 2];
    grad_check(&[randn(&mut rng, &[2, 3, 4])], |v| softmax(&v[0], 1)).unwrap();
    grad_check(&[randn(&mut rng, &[2, 3, 4])], |v| log_softmax(&v[0], 2)).unwrap();
    grad_check(std::slice::from_ref(&logits), |v| nll_loss(&log_softmax(&v[0], 1)?, &t)).unwrap();
    grad_check(std::slice::from_ref(&logits), |v| cross_entropy(&v[0], &t, 0.0)).unwrap();
    grad_check(std::slice::from_ref(&logits), |v| cross_entropy(&v[0], &t, 0.1)).unwrap();
    let w = [0.5, 0.0, 3.0, 1.0, 2.0];
    grad_check(std::slice::from_ref(&logits), |v| weighted_cross_entropy(&v[0], &t, &w, 0.0)).unwrap();
    grad_check(std::slice::from_ref(&logits), |v| weighted_cross_entropy(&v[0], &t, &w, 0.1)).unwrap();
    let p = randn(&mut rng, &[3, 4]).map(|v| 1.0 / (1.0 + (-v).exp()));
    let y = randn(&mut rng, &[3, 4]).map(|v| if v > 0.0 { 1.0 } else { 0.3 });
    for r in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        grad_check(&[p.clone(), y.clone()], |v| binary_cross_entropy(&v[0], &v[1], r)).unwrap();
        grad_check(&[p.clone(), y.clone()], |v| binary_cross_entropy_with_logits(&v[0], &v[1], r)).unwrap();
        grad_check(&[p.clone(), y.clone()], |v| mse_loss(&v[0], &v[1], r)).unwrap();
        grad_check(&[p.clone(), y.clone()], |v| l1_loss(&v[0], &v[1], r)).unwrap();
    }
    let sigma = randn(&mut rng, &[3, 4]).map(|v| v.abs() + 0.1);
    grad_check(&[randn(&mut rng, &[3, 4]), sigma], |v| gaussian_kl(&v[0], &v[1])).unwrap();
}

#[test]
fn dropout_gradient_uses_the_same_mask() {
    let mut rng = Rng::seed(7);
    let x = randn(&mut rng, &[4, 6, 3, 3]);
    grad_check(std::slice::from_ref(&x), |v| dropout(&v[0], 0.3, true, &mut Rng::seed(11))).unwrap();
    grad_check(&[x], |v| dropout2d(&v[0], 0.5, true, &mut Rng::seed(12))).unwrap();
}

/// `gradients` with respect to an intermediate value: the gradient of loss = sum(tanh(h) * c)
/// at h = x * w equals finite differences taken by perturbing h itself.
#[test]
fn gradients_of_an_intermediate_value() {
    let mut rng = Rng::seed(3);
    let x = Var::parameter(randn(&mut rng, &[2, 3]));
    let w = Var::parameter(randn(&mut rng, &[2, 3]));
    let c = randn(&mut rng, &[2, 3]);
    let h = x.mul(&w).unwrap();
    let loss_of = |h: &Var<f64>| h.tanh().unwrap().mul(&Var::constant(c.clone())).unwrap().sum_all().unwrap();
    let g = loss_of(&h).gradients(&[&h, &x]).unwrap();
    let gh = g[0].as_ref().expect("h is on the path").data().to_vec();
    let eps = 1e-6;
    for i in 0..6 {
        let bump = |d: f64| {
            let mut v = h.value().data().to_vec();
            v[i] += d;
            loss_of(&Var::constant(Tensor::from_vec(v, &[2, 3]).unwrap())).value().item().unwrap()
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        assert!((fd - gh[i]).abs() < 1e-6, "element {i}: {fd} vs {}", gh[i]);
    }
    // A leaf in `wrt` gets the chain rule through h; the parameter also accumulates it.
    let gx = g[1].as_ref().unwrap().data().to_vec();
    let want: Vec<f64> = gh.iter().zip(w.value().data()).map(|(a, b)| a * b).collect();
    assert_eq!(gx, want);
    assert_eq!(x.grad().unwrap().data().to_vec(), want);
    // A value off the path has no gradient.
    let other = x.add(&w).unwrap();
    assert!(loss_of(&h).gradients(&[&other]).unwrap()[0].is_none());
}

/// Synchronised batch norm on one "process" holding x, with a second one's batch z summed in
/// by the reducer, equals plain batch norm over the concatenation [x; z] restricted to x: the
/// output, the running statistics and the input's gradient (the second process's loss does not
/// depend on x, so its backward sums are zero).
#[test]
fn synchronised_batch_norm_equals_batch_norm_over_all_processes_batches() {
    use std::cell::Cell;
    use std::rc::Rc;
    let mut rng = Rng::seed(8);
    let (n, m, c) = (3, 5, 4);
    let x = randn(&mut rng, &[n, c, 2, 3]);
    let z = randn(&mut rng, &[m, c, 2, 3]);
    let (g, b) = (randn(&mut rng, &[c]), randn(&mut rng, &[c]));
    let w = Var::constant(randn(&mut rng, &[n, c, 2, 3]));
    let opts = BatchNormOptions::default();
    let fresh = || (Tensor::from_fn(&[c], |i| 0.1 * i as f64).unwrap(), Tensor::from_fn(&[c], |i| 1.0 + 0.5 * i as f64).unwrap());

    // z's sums, as the other process would contribute them.
    let mut z_sums = vec![0.0; 2 * c + 1];
    for (i, v) in z.data().iter().enumerate() {
        let ch = (i / 6) % c;
        z_sums[2 * ch] += v;
        z_sums[2 * ch + 1] += v * v;
    }
    z_sums[2 * c] = (m * 6) as f64;
    let forward = Rc::new(Cell::new(true));
    let phase = forward.clone();
    let sync = SyncStats(Rc::new(move |buf: &mut [f64]| {
        if phase.get() {
            buf.iter_mut().zip(&z_sums).for_each(|(a, b)| *a += b);
        } else {
            buf[2 * c] += (m * 6) as f64;
        }
        Ok(())
    }));
    let xv = Var::parameter(x.clone());
    let (mut rm, mut rv) = fresh();
    let y = batch_norm_sync(&xv, &Var::constant(g.clone()), &Var::constant(b.clone()), &mut rm, &mut rv, true, opts, Some(&sync)).unwrap();
    forward.set(false);
    y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();

    let xr = Var::parameter(x.clone());
    let (mut rm2, mut rv2) = fresh();
    let all = concat(&[&xr, &Var::constant(z.clone())], 0).unwrap();
    let yr = batch_norm(&all, &Var::constant(g), &Var::constant(b), &mut rm2, &mut rv2, true, opts).unwrap().narrow(0, 0, n).unwrap();
    yr.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();

    assert!(y.value().max_abs_diff(&yr.value()).unwrap() < 1e-10, "outputs");
    assert!(rm.max_abs_diff(&rm2).unwrap() < 1e-10 && rv.max_abs_diff(&rv2).unwrap() < 1e-10, "running statistics");
    assert!(xv.grad().unwrap().max_abs_diff(&xr.grad().unwrap()).unwrap() < 1e-10, "the input's gradient");
}

#[test]
fn conv_weight_gradient_is_the_same_when_the_input_needs_none() {
    // A constant input (a network's first layer reading images) gets no input gradient; the
    // weight and bias gradients must not change because of it.
    let mut rng = Rng::seed(5);
    let (x, w, b) = (
        rng.normal::<f64>(&[2, 3, 9, 10], 0.0, 1.0).unwrap(),
        rng.normal::<f64>(&[4, 3, 3, 3], 0.0, 1.0).unwrap(),
        rng.normal::<f64>(&[4], 0.0, 1.0).unwrap(),
    );
    let o = Conv2dOptions::default().padding(Padding::Same);
    let grads = |x: Var<f64>| -> Vec<Tensor<f64>> {
        let (wv, bv) = (Var::parameter(w.clone()), Var::parameter(b.clone()));
        let y = conv2d(&x, &wv, Some(&bv), &o).unwrap();
        y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
        vec![wv.grad().unwrap(), bv.grad().unwrap()]
    };
    let (with, without) = (grads(Var::parameter(x.clone())), grads(Var::constant(x.clone())));
    for (a, b) in with.iter().zip(&without) {
        assert_eq!(a.data(), b.data());
    }
}

#[test]
fn a_frozen_parameter_records_nothing_and_gets_no_gradient() {
    let mut rng = Rng::seed(4);
    let x = Var::constant(randn(&mut rng, &[2, 3, 6, 6]));
    let (w1, w2) = (Var::parameter(randn(&mut rng, &[4, 3, 3, 3])), Var::parameter(randn(&mut rng, &[5, 4, 3, 3])));
    w1.set_requires_grad(false).unwrap();
    // The frozen first layer reads only constants: its output is a constant, so the backward
    // pass stops at the second layer's input.
    let h = conv2d(&x, &w1, None, &Conv2dOptions::default()).unwrap().relu().unwrap();
    assert!(!h.requires_grad() && h.is_leaf());
    let y = conv2d(&h, &w2, None, &Conv2dOptions::default()).unwrap().sum_all().unwrap();
    y.backward().unwrap();
    assert!(w1.grad().is_none() && w2.grad().is_some());
    // Unfrozen, it takes part again; an op's result cannot be frozen.
    w1.set_requires_grad(true).unwrap();
    let h = conv2d(&x, &w1, None, &Conv2dOptions::default()).unwrap();
    assert!(h.requires_grad() && !h.is_leaf());
    assert!(h.set_requires_grad(false).unwrap_err().to_string().contains("not a leaf"));
}
