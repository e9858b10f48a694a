//! Tensor data movement, broadcasting and reductions against index arithmetic done by hand.

use proptest::prelude::*;
use stride_tensor::{ErrorKind, Rng, Tensor};

fn t(shape: &[usize]) -> Tensor<f64> {
    Tensor::from_fn(shape, |i| i as f64 * 0.5 - 3.0).unwrap()
}

/// Element of a contiguous tensor at a multi-index.
fn at(x: &Tensor<f64>, idx: &[usize]) -> f64 {
    let mut flat = 0;
    for (d, i) in x.shape().iter().zip(idx) {
        flat = flat * d + i;
    }
    x.data()[flat]
}

/// All multi-indices of a shape, in row-major order.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for &d in shape {
        out = out.into_iter().flat_map(|p| (0..d).map(move |i| [p.clone(), vec![i]].concat())).collect();
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn permute_moves_every_element(shape in prop::collection::vec(1usize..5, 1..5), seed in 0u64..100) {
        let x = t(&shape);
        let mut perm: Vec<usize> = (0..shape.len()).collect();
        let mut rng = Rng::seed(seed);
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let y = x.permute(&perm).unwrap();
        for idx in indices(y.shape()) {
            let mut src = vec![0; shape.len()];
            for (o, &p) in perm.iter().enumerate() {
                src[p] = idx[o];
            }
            prop_assert_eq!(at(&y, &idx), at(&x, &src));
        }
    }

    #[test]
    fn sum_and_max_reduce_the_right_axes(shape in prop::collection::vec(1usize..5, 1..4), axis_seed in 0usize..8) {
        let x = t(&shape).map(|v| (v * 7.3).sin());
        let axis = axis_seed % shape.len();
        let s = x.sum_axes(&[axis], true).unwrap();
        let (m, arg) = x.max_axis(axis, true).unwrap();
        for (j, idx) in indices(s.shape()).into_iter().enumerate() {
            let vals: Vec<f64> = (0..shape[axis]).map(|k| { let mut i = idx.clone(); i[axis] = k; at(&x, &i) }).collect();
            prop_assert!((at(&s, &idx) - vals.iter().sum::<f64>()).abs() < 1e-12);
            let best = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            prop_assert_eq!(at(&m, &idx), best);
            prop_assert_eq!(vals[arg[j]], best);
        }
    }

    #[test]
    fn sum_over_any_set_of_axes_matches_the_index_arithmetic(shape in prop::collection::vec(0usize..12, 0..5), mask in 0u32..32, keepdim in any::<bool>()) {
        // Any subset of axes (trailing runs reduced or kept, runs of size-1 and empty axes,
        // blocks longer than eight), against a sum per output element done by hand.
        let x = t(&shape).map(|v| (v * 7.3).sin());
        let axes: Vec<usize> = (0..shape.len()).filter(|&a| mask & (1 << a) != 0).collect();
        let s = x.sum_axes(&axes, true).unwrap();
        let kept: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
        prop_assert_eq!(s.shape(), &kept[..]);
        for idx in indices(&kept) {
            let want: f64 = indices(&shape).into_iter().filter(|i| i.iter().enumerate().all(|(a, &v)| axes.contains(&a) || v == idx[a])).map(|i| at(&x, &i)).sum();
            prop_assert!((at(&s, &idx) - want).abs() < 1e-9, "shape {:?} axes {:?} at {:?}: {} vs {}", shape, axes, idx, at(&s, &idx), want);
        }
        let d = x.sum_axes(&axes, keepdim).unwrap();
        prop_assert_eq!(d.data(), s.data());
        prop_assert_eq!(d.shape().len(), if keepdim { shape.len() } else { shape.len() - axes.len() });
    }

    #[test]
    fn pad_then_unpad_and_split_then_concat_are_identities(shape in prop::collection::vec(1usize..5, 1..4), b in 0usize..3, a in 0usize..3) {
        let x = t(&shape);
        let pads: Vec<(usize, usize)> = shape.iter().map(|_| (b, a)).collect();
        let p = x.pad(&pads, -100.0).unwrap();
        prop_assert_eq!(p.unpad(&pads).unwrap(), x.clone());
        let border = p.data().iter().filter(|&&v| v == -100.0).count();
        prop_assert_eq!(border, p.numel() - x.numel());
        let last = shape.len() - 1;
        let d = shape[last];
        let parts = x.split(last, &[d / 2, d - d / 2]).unwrap();
        prop_assert_eq!(Tensor::concat(&[&parts[0], &parts[1]], last).unwrap(), x);
    }

    #[test]
    fn unpad_is_a_narrow_per_axis(shape in prop::collection::vec(1usize..6, 1..5), cut in prop::collection::vec((0usize..3, 0usize..3), 1..5)) {
        // Different amounts per axis, fewer pairs than axes (the last axes), and cuts that
        // take a whole axis away or more than it has.
        let x = t(&shape);
        let pads: Vec<(usize, usize)> = cut.into_iter().take(shape.len()).collect();
        let off = shape.len() - pads.len();
        let mut want = Some(x.clone());
        for (i, &(b, a)) in pads.iter().enumerate() {
            let d = shape[off + i];
            want = want.and_then(|w| (b + a <= d).then(|| w.narrow(off + i, b, d - b - a).unwrap()));
        }
        match want {
            Some(w) => prop_assert_eq!(x.unpad(&pads).unwrap(), w),
            None => prop_assert!(x.unpad(&pads).is_err()),
        }
    }
}

#[test]
fn broadcasting_follows_numpy() {
    let a = t(&[2, 1, 3]);
    let b = t(&[4, 1]);
    let c = a.add(&b).unwrap();
    assert_eq!(c.shape(), [2, 4, 3]);
    for idx in indices(c.shape()) {
        assert_eq!(at(&c, &idx), at(&a, &[idx[0], 0, idx[2]]) + at(&b, &[idx[1], 0]));
    }
    // The adjoint: summing the broadcast back gives each source element times its copies.
    let ones = Tensor::<f64>::ones(&[2, 4, 3]).unwrap();
    assert_eq!(ones.sum_to(&[4, 1]).unwrap().data(), &[6.0; 4]);
    assert_eq!(a.broadcast_to(&[2, 4, 3]).unwrap().sum_to(&[2, 1, 3]).unwrap(), a.scale(4.0));
    assert!(a.add(&t(&[3, 2])).is_err());
}

#[test]
fn seeded_random_tensors_repeat_and_have_the_right_moments() {
    let a = Rng::seed(5).normal::<f64>(&[20000], 1.0, 2.0).unwrap();
    let b = Rng::seed(5).normal::<f64>(&[20000], 1.0, 2.0).unwrap();
    assert_eq!(a, b);
    let mean = a.data().iter().sum::<f64>() / 20000.0;
    let var = a.data().iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 20000.0;
    assert!((mean - 1.0).abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05, "mean {mean} std {}", var.sqrt());
    let u = Rng::seed(6).uniform::<f32>(&[10000], -1.0, 3.0).unwrap();
    assert!(u.data().iter().all(|&v| (-1.0..3.0).contains(&v)));
    assert_ne!(Rng::seed(6).uniform::<f32>(&[8], 0.0, 1.0).unwrap(), Rng::seed(7).uniform::<f32>(&[8], 0.0, 1.0).unwrap());
    assert!(Rng::seed(1).normal::<f32>(&[2], 0.0, -1.0).is_err());
    assert!(Rng::seed(1).uniform::<f32>(&[2], 1.0, 1.0).is_err());
}

#[test]
fn constructors_check_sizes() {
    assert_eq!(Tensor::<f32>::from_vec(vec![1.0; 5], &[2, 3]).unwrap_err().to_string(), "Tensor::from_vec: shape [2, 3] needs 6 elements, got 5");
    assert_eq!(Tensor::<f32>::zeros(&[1 << 40]).unwrap_err().kind, ErrorKind::TooLarge);
    assert!(t(&[2, 3]).item().is_err());
    assert_eq!(Tensor::scalar(2.5f32).item().unwrap(), 2.5);
    let x = t(&[2, 3]);
    let mut y = x.clone();
    y.data_mut()[0] = 100.0;
    assert_ne!(x.data()[0], 100.0, "mutation must not leak into clones");
}
