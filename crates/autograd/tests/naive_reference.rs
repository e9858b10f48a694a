//! Forward results against naive loop implementations written from the definitions, over
//! random geometry; and output sizes that PyTorch cannot make (TensorFlow's "same").

mod common;

use common::{assert_close, randn};
use proptest::prelude::*;
use stride_autograd::*;
use stride_autograd::{Result, Rng};
use stride_kernels::conv::ConvGeom;

/// Transposed convolution from its definition: scatter every input pixel times the kernel
/// into a full-size buffer, then crop the padding. Independent of `ConvGeom`'s arithmetic.
fn naive_conv_transpose(x: &Tensor<f64>, w: &Tensor<f64>, o: &Conv2dOptions) -> Tensor<f64> {
    let [n, ci, h, wd] = x.shape()[..] else { unreachable!() };
    let [_, cog, r, s] = w.shape()[..] else { unreachable!() };
    let Padding::Explicit { top, bottom, left, right } = o.padding else { unreachable!() };
    let g = o.groups;
    let cig = ci / g;
    let (fh, fw) = (
        (h - 1) * o.stride.0 + (r - 1) * o.dilation.0 + 1 + o.output_padding.0,
        (wd - 1) * o.stride.1 + (s - 1) * o.dilation.1 + 1 + o.output_padding.1,
    );
    let co = cog * g;
    let mut full = vec![0.0; n * co * fh * fw];
    for b in 0..n {
        for c in 0..ci {
            let grp = c / cig;
            for oc in 0..cog {
                for i in 0..h {
                    for j in 0..wd {
                        for a in 0..r {
                            for e in 0..s {
                                let (y, z) = (i * o.stride.0 + a * o.dilation.0, j * o.stride.1 + e * o.dilation.1);
                                full[((b * co + grp * cog + oc) * fh + y) * fw + z] +=
                                    x.data()[((b * ci + c) * h + i) * wd + j] * w.data()[((c * cog + oc) * r + a) * s + e];
                            }
                        }
                    }
                }
            }
        }
    }
    let t = Tensor::from_vec(full, &[n, co, fh, fw]).unwrap();
    t.narrow(2, top, fh - top - bottom).unwrap().narrow(3, left, fw - left - right).unwrap()
}

/// Pooling from the definition: every output looks at its window in a padded copy. None when
/// no window fits (PyTorch's error).
fn naive_pool(x: &Tensor<f64>, k: usize, st: usize, pad: usize, ceil: bool, kind: &str, cip: bool) -> Option<Tensor<f64>> {
    let [n, c, h, w] = x.shape()[..] else { unreachable!() };
    let size = |len: usize| {
        let span = ((len + 2 * pad) as f64 - k as f64) / st as f64;
        let mut out = if ceil { span.ceil() } else { span.floor() } as isize + 1;
        if ceil && out >= 1 && (out as usize - 1) * st >= len + pad {
            out -= 1;
        }
        (out >= 1).then_some(out as usize)
    };
    let (p, q) = (size(h)?, size(w)?);
    let mut out = Vec::new();
    for b in 0..n {
        for ch in 0..c {
            for i in 0..p {
                for j in 0..q {
                    let (mut best, mut sum, mut real, mut total) = (f64::NEG_INFINITY, 0.0, 0, 0);
                    for a in 0..k {
                        for e in 0..k {
                            let (y, z) = ((i * st + a) as isize - pad as isize, (j * st + e) as isize - pad as isize);
                            // Positions past the right padding do not count (PyTorch's divisor).
                            if y >= (h + pad) as isize || z >= (w + pad) as isize {
                                continue;
                            }
                            total += 1;
                            if y < 0 || z < 0 || y >= h as isize || z >= w as isize {
                                continue;
                            }
                            let v = x.data()[((b * c + ch) * h + y as usize) * w + z as usize];
                            best = best.max(v);
                            sum += if kind == "lp" { v * v } else { v };
                            real += 1;
                        }
                    }
                    out.push(match kind {
                        "max" => best,
                        "lp" => sum.sqrt(),
                        _ => sum / if cip { total } else { real } as f64,
                    });
                }
            }
        }
    }
    Some(Tensor::from_vec(out, &[n, c, p, q]).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn conv_transpose2d_matches_definition(n in 1usize..3, cig in 1usize..3, cog in 1usize..3, g in 1usize..3, h in 1usize..6, w in 1usize..6,
                                           r in 1usize..4, s in 1usize..4, st in 1usize..4, d in 1usize..3, pad in 0usize..3, op in 0usize..3, seed in 0u64..1000) {
        let o = Conv2dOptions { stride: (st, st), dilation: (d, d), padding: Padding::uniform(pad), groups: g, output_padding: (op.min(st.max(d) - 1), 0) };
        let mut rng = Rng::seed(seed);
        let x = randn(&mut rng, &[n, cig * g, h, w]);
        let wt = randn(&mut rng, &[cig * g, cog, r, s]);
        if ConvGeom::conv_transpose2d(x.shape(), wt.shape(), &o).is_err() {
            return Ok(());
        }
        let got = conv_transpose2d(&Var::constant(x.clone()), &Var::constant(wt.clone()), None, &o).unwrap().value();
        let want = naive_conv_transpose(&x, &wt, &o);
        prop_assert_eq!(got.shape(), want.shape());
        prop_assert!(got.max_abs_diff(&want).unwrap() < 1e-9);
    }

    #[test]
    fn pooling_matches_definition(n in 1usize..3, c in 1usize..3, h in 1usize..10, w in 1usize..10, k in 1usize..4, st in 1usize..4,
                                  pad in 0usize..2, ceil in any::<bool>(), cip in any::<bool>(), seed in 0u64..1000) {
        let pad = pad.min(k / 2);
        let mut rng = Rng::seed(seed);
        let x = randn(&mut rng, &[n, c, h, w]);
        let o = Pool2dOptions::new(k).stride(st).padding(Padding::uniform(pad)).ceil_mode(ceil).count_include_pad(cip);
        let xv = Var::constant(x.clone());
        for (kind, got) in [("max", max_pool2d(&xv, &o)), ("avg", avg_pool2d(&xv, &o)), ("lp", lp_pool2d(&xv, 2.0, &o))] {
            let Some(want) = naive_pool(&x, k, st, pad, ceil, kind, cip) else {
                prop_assert!(got.is_err(), "{} took a {}x{} input with kernel {} padding {}", kind, h, w, k, pad);
                continue;
            };
            let got = got.unwrap().value();
            prop_assert_eq!(got.shape(), want.shape(), "{}", kind);
            prop_assert!(got.max_abs_diff(&want).unwrap() < 1e-9, "{}", kind);
        }
    }
}

#[test]
fn batch_norm_matches_definition() {
    let mut rng = Rng::seed(1);
    let x = randn(&mut rng, &[3, 2, 4, 5]).map(|v| 3.0 * v + 1.0);
    let (g, b) = (randn(&mut rng, &[2]), randn(&mut rng, &[2]));
    let (mut rm, mut rv) = (Tensor::zeros(&[2]).unwrap(), Tensor::ones(&[2]).unwrap());
    let y = batch_norm(
        &Var::constant(x.clone()),
        &Var::constant(g.clone()),
        &Var::constant(b.clone()),
        &mut rm,
        &mut rv,
        true,
        BatchNormOptions::default(),
    )
    .unwrap()
    .value();
    for c in 0..2 {
        let vals: Vec<(usize, f64)> = (0..3).flat_map(|n| (0..20).map(move |i| (n * 2 + c) * 20 + i)).map(|i| (i, x.data()[i])).collect();
        let m = vals.iter().map(|v| v.1).sum::<f64>() / 60.0;
        let var = vals.iter().map(|v| (v.1 - m).powi(2)).sum::<f64>() / 60.0;
        for (i, v) in vals {
            let want = g.data()[c] * (v - m) / (var + 1e-5).sqrt() + b.data()[c];
            assert!((y.data()[i] - want).abs() < 1e-10);
        }
        assert!((rm.data()[c] - 0.1 * m).abs() < 1e-12);
        assert!((rv.data()[c] - (0.9 + 0.1 * var * 60.0 / 59.0)).abs() < 1e-12);
    }
    // Evaluation mode uses the running statistics and leaves them alone.
    let before = (rm.clone(), rv.clone());
    let y = batch_norm(
        &Var::constant(x.clone()),
        &Var::constant(g.clone()),
        &Var::constant(b.clone()),
        &mut rm,
        &mut rv,
        false,
        BatchNormOptions::default(),
    )
    .unwrap()
    .value();
    assert_eq!((rm.clone(), rv.clone()), before);
    let want = (x.data()[0] - rm.data()[0]) / (rv.data()[0] + 1e-5).sqrt() * g.data()[0] + b.data()[0];
    assert!((y.data()[0] - want).abs() < 1e-10);
}

#[test]
fn layer_norm_matches_definition() {
    let mut rng = Rng::seed(4);
    // [2, 3, 4, 5] normalised over its last two axes, and over its last one.
    let x = randn(&mut rng, &[2, 3, 4, 5]).map(|v| 2.0 * v - 0.5);
    for (tail, inner) in [(&[4usize, 5][..], 20usize), (&[5][..], 5)] {
        let (g, b) = (randn(&mut rng, tail), randn(&mut rng, tail));
        let y = layer_norm(&Var::constant(x.clone()), &Var::constant(g.clone()), Some(&Var::constant(b.clone())), 1e-3).unwrap().value();
        for group in 0..x.numel() / inner {
            let vals = &x.data()[group * inner..(group + 1) * inner];
            let m = vals.iter().sum::<f64>() / inner as f64;
            let var = vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / inner as f64;
            for (i, v) in vals.iter().enumerate() {
                let want = (v - m) / (var + 1e-3).sqrt() * g.data()[i] + b.data()[i];
                assert!((y.data()[group * inner + i] - want).abs() < 1e-10, "{tail:?} group {group} element {i}");
            }
        }
    }
    // A weight that is not the input's tail is refused with both shapes.
    let e = layer_norm(&Var::constant(x), &Var::constant(Tensor::ones(&[4]).unwrap()), None, 1e-5).unwrap_err().to_string();
    assert!(e.contains("[4]") && e.contains("[2, 3, 4, 5]"), "{e}");
}

#[test]
// Indices are spelled out as ((n * C + c) * H + h) * W + w, with n = 1 written too.
#[allow(clippy::identity_op)]
fn small_ops_match_definitions() {
    let mut rng = Rng::seed(2);
    let x = randn(&mut rng, &[2, 6, 3, 2]);
    let xv = Var::constant(x.clone());
    // Channel max pool, depth 3 stride 2: channels {0,1,2}, {2,3,4}.
    let y = channel_max_pool(&xv, 3, 2).unwrap().value();
    assert_eq!(y.shape(), [2, 2, 3, 2]);
    for (n, j, pix) in (0..2).flat_map(|n| (0..2).flat_map(move |j| (0..6).map(move |p| (n, j, p)))) {
        let want = (j * 2..j * 2 + 3).map(|c| x.data()[(n * 6 + c) * 6 + pix]).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(y.data()[(n * 2 + j) * 6 + pix], want);
    }
    // Upsampling copies each pixel into a block.
    let u = xv.upsample_nearest2d((2, 3)).unwrap().value();
    assert_eq!(u.shape(), [2, 6, 6, 6]);
    assert_eq!(u.data()[((1 * 6 + 4) * 6 + 5) * 6 + 4], x.data()[((1 * 6 + 4) * 3 + 2) * 2 + 1]);
    // Channel shuffle with 2 groups of 3: new order 0,3,1,4,2,5.
    let sh = xv.channel_shuffle(2).unwrap().value();
    for (new, old) in [0, 3, 1, 4, 2, 5].into_iter().enumerate() {
        assert_eq!(sh.narrow(1, new, 1).unwrap(), x.narrow(1, old, 1).unwrap());
    }
    // Softmax rows sum to one and keep order.
    let logits = randn(&mut rng, &[4, 7]);
    let sm = softmax(&Var::constant(logits.clone()), 1).unwrap().value();
    for row in 0..4 {
        let r = &sm.data()[row * 7..row * 7 + 7];
        assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let e: Vec<f64> = logits.data()[row * 7..row * 7 + 7].iter().map(|v| v.exp()).collect();
        assert_close(r, &e.iter().map(|v| v / e.iter().sum::<f64>()).collect::<Vec<_>>(), 1e-12, "softmax");
    }
    // Softmax does not overflow on large logits.
    let big = log_softmax(&Var::constant(Tensor::from_vec(vec![1000.0f32, 0.0], &[1, 2]).unwrap()), 1).unwrap().value();
    assert!(big.data().iter().all(|v| v.is_finite()));
    // Binary cross-entropy on probabilities 0 and 1 is finite (log floored at -100).
    let p = Var::constant(Tensor::from_vec(vec![0.0f32, 1.0], &[2]).unwrap());
    let y1 = Var::constant(Tensor::from_vec(vec![1.0f32, 0.0], &[2]).unwrap());
    assert_eq!(binary_cross_entropy(&p, &y1, Reduction::Sum).unwrap().value().item().unwrap(), 200.0);
}

#[test]
fn same_padding_follows_tensorflow_also_with_stride_and_even_kernels() {
    // (input, kernel, stride) -> (output, pad before, pad after), TensorFlow's rule.
    for (h, k, s, out, before, after) in
        [(7, 4, 2, 4, 1, 2), (8, 4, 2, 4, 1, 1), (5, 2, 1, 5, 0, 1), (6, 3, 2, 3, 0, 1), (7, 3, 2, 4, 1, 1), (4, 4, 1, 4, 1, 2), (1, 3, 3, 1, 1, 1)]
    {
        let o = Conv2dOptions::default().stride(s).padding(Padding::Same);
        let g = ConvGeom::conv2d(&[1, 1, h, h], &[1, 1, k, k], &o).unwrap();
        assert_eq!((g.p, g.pad.0, g.pad.1), (out, before, after), "h {h} k {k} s {s}");
        let pg = stride_kernels::pool::PoolGeom::new("t", &[1, 1, h, h], &Pool2dOptions::new(k).stride(s).padding(Padding::Same)).unwrap();
        assert_eq!(pg.p, out, "pool h {h} k {k} s {s}");
        // ONNX's SAME_LOWER: the same output, the odd pixel first.
        let g = ConvGeom::conv2d(&[1, 1, h, h], &[1, 1, k, k], &o.padding(Padding::SameLower)).unwrap();
        assert_eq!((g.p, g.pad.0, g.pad.1), (out, after, before), "same_lower h {h} k {k} s {s}");
    }
    // Transposed "same": output = input * stride (the VAE generator's 4x4 -> 4x4, k4 s1).
    for (h, k, s) in [(4, 4, 1), (8, 4, 4), (5, 3, 2), (3, 2, 3)] {
        let o = Conv2dOptions::default().stride(s).padding(Padding::Same);
        let g = ConvGeom::conv_transpose2d(&[1, 1, h, h], &[1, 1, k, k], &o).unwrap();
        assert_eq!(g.h, h * s, "h {h} k {k} s {s}");
    }
}

#[test]
fn no_grad_records_nothing() -> Result<()> {
    let w = Var::parameter(Tensor::<f32>::ones(&[2, 2])?);
    let y = no_grad(|| w.mul(&w))?;
    assert!(y.is_leaf() && !y.requires_grad());
    assert!(y.backward().is_err());
    let z = w.mul(&w)?.sum_all()?;
    assert_eq!(z.op_name(), "sum");
    z.backward()?;
    z.backward()?;
    // Gradients accumulate: d(sum w^2)/dw = 2w, twice.
    assert_eq!(w.grad().unwrap().data(), &[4.0; 4]);
    w.zero_grad();
    assert!(w.grad().is_none());
    assert_eq!(PRIMITIVES.len(), 26);
    Ok(())
}
