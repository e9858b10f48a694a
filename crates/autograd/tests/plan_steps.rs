//! The planned forms of what imported networks do between their convolutions give the eager
//! pass's values, and run as planned steps (no eager fallback): a squeeze-excitation gate (global
//! average pooling, a broadcast product), depthwise layers with their activation and a
//! residual, ConvNeXt's block (permutes, layer norm as one step, a dense layer on rows of a
//! 4-D value with GELU fused through the reshape), broadcast arithmetic with constants,
//! channel splits, concatenations placed instead of copied, and nearest upsampling.

use stride_autograd::ops::arith::unary;
use stride_autograd::*;

/// Compiles `f` for `x`, checks that no step falls back to the eager forward, and that the plan
/// gives the eager values for `x` and for a second input through the same arena.
fn planned_matches_eager(name: &str, x: Tensor<f32>, f: impl Fn(&Var<f32>) -> Result<Var<f32>>) -> Vec<String> {
    let input = Var::parameter(x.clone());
    let y = with_grad(|| f(&input)).unwrap();
    let mut plan = Plan::compile(&input, &y).unwrap_or_else(|e| panic!("{name}: {e}"));
    let steps = plan.describe();
    assert!(!steps.iter().any(|s| s.ends_with("(eager)")), "{name}: {steps:#?}");
    let second = Rng::seed(99).normal(x.shape(), 0.0, 1.0).unwrap();
    for x in [x, second] {
        let want = no_grad(|| f(&Var::constant(x.clone()))).unwrap().value();
        let have = plan.run(&x).unwrap();
        assert_eq!(have.shape(), want.shape(), "{name}");
        let scale = want.data().iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in have.data().iter().zip(want.data()).enumerate() {
            assert!((a - b).abs() <= 1e-5 * scale, "{name}: output {i} is {a} planned, {b} eager");
        }
    }
    steps
}

fn param(rng: &mut Rng, shape: &[usize]) -> Var<f32> {
    Var::parameter(rng.normal(shape, 0.0, 0.5).unwrap())
}

#[test]
fn squeeze_excitation_and_depthwise_blocks_plan() {
    let mut rng = Rng::seed(1);
    // 16 channels (two blocks of eight lanes) on 5x5 maps, 5x5 windows: most taps in the border.
    let dw = param(&mut rng, &[16, 1, 5, 5]);
    let db = param(&mut rng, &[16]);
    let (fc1, fc2) = (param(&mut rng, &[4, 16, 1, 1]), param(&mut rng, &[16, 4, 1, 1]));
    let opts = Conv2dOptions::default().groups(16).padding(Padding::Same);
    for n in [1, 3, 8] {
        let x = rng.normal(&[n, 16, 5, 5], 0.0, 1.0).unwrap();
        let steps = planned_matches_eager(&format!("SE, batch {n}"), x, |x| {
            let h = unary(&conv2d(x, &dw, Some(&db), &opts)?, Unary::HardSwish)?;
            let s = adaptive_avg_pool2d(&h, (1, 1))?;
            let s = unary(&conv2d(&s, &fc1, None, &Conv2dOptions::default())?, Unary::Relu)?;
            let s = unary(&conv2d(&s, &fc2, None, &Conv2dOptions::default())?, Unary::Sigmoid)?;
            // The gate [N, C, 1, 1] over [N, C, H, W], then the block's input added back.
            h.mul(&s)?.add(x)
        });
        assert!(steps.iter().any(|s| s.starts_with("conv2d Depthwise") && s.ends_with("+hardswish")), "{steps:#?}");
        assert!(steps.iter().any(|s| s == "adaptive_avg_pool2d"), "{steps:#?}");
        // The gate's dense layers run in the blocks around them: the only changes of layout
        // are the input's and the output's (there were two more, to NCHW and back).
        assert!(steps.iter().filter(|s| s.starts_with("relayout")).count() <= 2, "{steps:#?}");
    }
}

#[test]
fn convnext_block_plans() {
    let mut rng = Rng::seed(2);
    let c = 8;
    let dw = param(&mut rng, &[c, 1, 7, 7]);
    let (g, b) = (param(&mut rng, &[c]), param(&mut rng, &[c]));
    let (w1, b1) = (param(&mut rng, &[4 * c, c]), param(&mut rng, &[4 * c]));
    let (w2, b2) = (param(&mut rng, &[c, 4 * c]), param(&mut rng, &[c]));
    let opts = Conv2dOptions::default().groups(c).padding(Padding::uniform(3));
    let x = rng.normal(&[3, c, 6, 6], 0.0, 1.0).unwrap();
    let steps = planned_matches_eager("ConvNeXt block", x, |x| {
        let h = conv2d(x, &dw, None, &opts)?.permute(&[0, 2, 3, 1])?;
        let h = layer_norm(&h, &g, Some(&b), 1e-6)?;
        let h = unary(&linear(&h, &w1, Some(&b1))?, Unary::Gelu)?;
        let h = linear(&h, &w2, Some(&b2))?.permute(&[0, 3, 1, 2])?;
        h.add(x)
    });
    assert!(steps.iter().any(|s| s == "matmul +bias +gelu"), "{steps:#?}");
    assert_eq!(steps.iter().filter(|s| *s == "permute").count(), 2, "{steps:#?}");
    // The layer norm's eleven recorded ops are one step.
    assert!(steps.iter().any(|s| s == "layer_norm") && !steps.iter().any(|s| s == "sum"), "{steps:#?}");
}

#[test]
fn layer_norms_plan_as_one_step() {
    // Over two trailing axes, without a bias, and an epsilon large enough to matter.
    let mut rng = Rng::seed(6);
    let g = param(&mut rng, &[5, 7]);
    let x = rng.normal(&[3, 4, 5, 7], 0.0, 1.0).unwrap();
    let steps = planned_matches_eager("layer norm", x, |x| layer_norm(&x.mul_scalar(2.0)?, &g, None, 0.5));
    assert_eq!(steps, ["mul_scalar", "layer_norm"]);
}

#[test]
fn broadcast_arithmetic_plans() {
    let mut rng = Rng::seed(3);
    let row = Var::constant(rng.normal(&[7], 0.0, 1.0).unwrap());
    let per_channel = Var::constant(rng.uniform(&[1, 5, 1, 1], 0.5, 1.5).unwrap());
    let x = rng.normal(&[2, 5, 3, 7], 0.0, 1.0).unwrap();
    planned_matches_eager("broadcasts", x, |x| {
        let y = x.sub(&row)?.div(&per_channel)?;
        // A channel split, as ShuffleNet's blocks make.
        let y = concat(&[&y.narrow(1, 3, 2)?, &y.narrow(1, 0, 3)?], 1)?;
        // A computed value broadcast against another: [N, C, 1, 1] - [N, C, H, W].
        let m = adaptive_avg_pool2d(&y, (1, 1))?;
        m.sub(&y)?.mul(&per_channel)
    });
}

#[test]
fn shufflenet_units_gather_channels_in_blocks() {
    let mut rng = Rng::seed(4);
    let c = 8;
    let stem = param(&mut rng, &[c, 3, 1, 1]);
    let (w1, dw, w2) = (param(&mut rng, &[c / 2, c / 2, 1, 1]), param(&mut rng, &[c / 2, 1, 3, 3]), param(&mut rng, &[c / 2, c / 2, 1, 1]));
    let depthwise = Conv2dOptions::default().groups(c / 2).padding(Padding::Same);
    let unit = |x: &Var<f32>| -> Result<Var<f32>> {
        // ShuffleNetV2's stride-1 unit: half the channels through a branch, then shuffled.
        let (keep, rest) = (x.narrow(1, 0, c / 2)?, x.narrow(1, c / 2, c / 2)?);
        let b = unary(&conv2d(&rest, &w1, None, &Conv2dOptions::default())?, Unary::Relu)?;
        let b = conv2d(&conv2d(&b, &dw, None, &depthwise)?, &w2, None, &Conv2dOptions::default())?;
        concat(&[&keep, &unary(&b, Unary::Relu)?], 1)?.channel_shuffle(2)
    };
    for n in [1, 3, 8] {
        let x = rng.normal(&[n, 3, 5, 5], 0.0, 1.0).unwrap();
        let steps = planned_matches_eager(&format!("ShuffleNet units, batch {n}"), x, |x| {
            let x = conv2d(x, &stem, None, &Conv2dOptions::default())?;
            unit(&unit(&x)?)
        });
        // Split, concatenation and shuffle in the blocks, a gather merged into the one that
        // reads it: each unit's kept half, concatenation and shuffle are one copy; only the
        // branch's half (read by a convolution) is a gather of its own, and for one image
        // not even that: the convolution reads it where it lies in the unit's input.
        let count = |name: &str| steps.iter().filter(|s| s.split(' ').next() == Some(name)).count();
        let splits = if n == 1 { 0 } else { 2 };
        assert_eq!((count("narrow+concat+channel_shuffle"), count("narrow")), (2, splits), "{steps:#?}");
        assert!(!steps.iter().any(|s| s == "permute" || s == "concat"), "{steps:#?}");
        assert!(steps.iter().filter(|s| s.starts_with("relayout")).count() <= 2, "{steps:#?}");
    }
}

#[test]
fn dense_layers_with_activations_run_in_pieces() {
    // Rows enough for two pieces a thread (pieces of 128 rows at 1024 outputs a row), and a
    // last piece of 64 rows: each piece's product, bias and GELU.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rng = Rng::seed(5);
    let (w, b) = (param(&mut rng, &[1024, 16]), param(&mut rng, &[1024]));
    let x = rng.normal(&[4 * threads + 1, 8, 8, 16], 0.0, 1.0).unwrap();
    let steps = planned_matches_eager("dense layer + GELU", x, |x| unary(&linear(x, &w, Some(&b))?, Unary::Gelu));
    assert!(steps.iter().any(|s| s == "matmul +bias +gelu"), "{steps:#?}");
}

#[test]
fn one_image_against_large_weights_plans() {
    // Batch 1: a 1x1 convolution on a 2x2 map and a dense layer on four positions, each with
    // weights large enough to be read once (the convolution's row by row, gemm::skinny_into;
    // the dense layer's, over 512 KB, laid out in panels by the plan), with bias and activation.
    let mut rng = Rng::seed(9);
    let (w1, b1) = (param(&mut rng, &[1024, 96, 1, 1]), param(&mut rng, &[1024]));
    let (w2, b2) = (param(&mut rng, &[300, 1024]), param(&mut rng, &[300]));
    let x = rng.normal(&[1, 96, 2, 2], 0.0, 1.0).unwrap();
    let steps = planned_matches_eager("one image", x, |x| {
        let h = unary(&conv2d(x, &w1, Some(&b1), &Conv2dOptions::default())?, Unary::HardSwish)?;
        unary(&linear(&h.permute(&[0, 2, 3, 1])?, &w2, Some(&b2))?, Unary::Gelu)
    });
    assert!(steps.iter().any(|s| s == "matmul panels +bias +gelu") && steps.iter().any(|s| s.starts_with("conv2d Pointwise")), "{steps:#?}");
}

#[test]
fn one_image_concatenations_and_splits_are_placed_not_copied() {
    let mut rng = Rng::seed(6);
    let opts = Conv2dOptions::default().padding(Padding::Same);
    let (stem, wb, wc, wd) =
        (param(&mut rng, &[8, 3, 3, 3]), param(&mut rng, &[4, 4, 3, 3]), param(&mut rng, &[4, 4, 1, 1]), param(&mut rng, &[6, 16, 1, 1]));
    let (wf, wk) = (param(&mut rng, &[5, 25, 1, 1]), param(&mut rng, &[2, 22, 1, 1]));
    let net = |x: &Var<f32>| -> Result<Var<f32>> {
        // YOLO's C2f: a layer's output split in halves, the second through two layers, all four
        // concatenated; then DenseNet's concatenation of a layer's output and its input.
        let a = conv2d(x, &stem, None, &opts)?;
        let (h1, h2) = (a.narrow(1, 0, 4)?, a.narrow(1, 4, 4)?);
        let b = unary(&conv2d(&h2, &wb, None, &opts)?, Unary::Silu)?;
        let c = conv2d(&b, &wc, None, &opts)?;
        let cat = concat(&[&h1, &h2, &b, &c], 1)?;
        let d = conv2d(&cat, &wd, None, &opts)?;
        let e = concat(&[&d, &cat], 1)?;
        let k = conv2d(&e, &wk, None, &opts)?;
        // The plan's input and a buffer already placed in another concatenation stay copies.
        let f = concat(&[&e, x], 1)?;
        let g = conv2d(&f, &wf, None, &opts)?;
        // YOLO's neck upsamples by whole factors: a planned step.
        concat(&[&g, &d, &k], 1)?.upsample_nearest2d((2, 3))
    };
    for n in [1, 2] {
        let x = rng.normal(&[n, 3, 6, 5], 0.0, 1.0).unwrap();
        let steps = planned_matches_eager(&format!("concatenations, batch {n}"), x, net);
        let gathers = steps.iter().filter(|s| s.contains("concat") || s.starts_with("narrow")).count();
        // Batch 2: the split, the four concatenations (the first with the other half merged).
        // One image: only the two that cannot be placed.
        assert_eq!(gathers, if n == 1 { 2 } else { 5 }, "{steps:#?}");
        assert_eq!(steps.last().map(String::as_str), Some("upsample_nearest2d"), "{steps:#?}");
    }
}

#[test]
fn dense_blocks_concatenate_in_place_for_one_image() {
    let mut rng = Rng::seed(7);
    let opts = Conv2dOptions::default().padding(Padding::Same);
    let stem = param(&mut rng, &[4, 3, 3, 3]);
    let layers: Vec<Var<f32>> = (1..4).map(|i| param(&mut rng, &[2, 4 + 2 * (i - 1), 3, 3])).collect();
    let head = param(&mut rng, &[3, 10, 1, 1]);
    let net = |x: &Var<f32>| -> Result<Var<f32>> {
        // DenseNet's block: each layer reads the concatenation of every feature before it.
        let mut feats = vec![conv2d(x, &stem, None, &opts)?];
        for w in &layers {
            let input = if feats.len() == 1 { feats[0].clone() } else { concat(&feats.iter().collect::<Vec<_>>(), 1)? };
            feats.push(unary(&conv2d(&input, w, None, &opts)?, Unary::Relu)?);
        }
        conv2d(&concat(&feats.iter().collect::<Vec<_>>(), 1)?, &head, None, &opts)
    };
    for n in [1, 2] {
        let x = rng.normal(&[n, 3, 5, 4], 0.0, 1.0).unwrap();
        let steps = planned_matches_eager(&format!("dense block, batch {n}"), x, net);
        // One image: each concatenation holds the one before as its first part, so none copies.
        let gathers = steps.iter().filter(|s| s.contains("concat")).count();
        assert_eq!(gathers, if n == 1 { 0 } else { 3 }, "{steps:#?}");
    }
}

#[test]
fn softmax_plans_as_a_step() {
    let mut rng = Rng::seed(8);
    let w = param(&mut rng, &[16, 3, 1, 1]);
    for n in [1, 2] {
        let x = rng.normal(&[n, 3, 4, 7], 0.0, 1.0).unwrap();
        // YOLO's box distribution: a softmax over an inner axis; then one over rows.
        let steps = planned_matches_eager(&format!("softmax, batch {n}"), x, |x| {
            let y = conv2d(x, &w, None, &Conv2dOptions::default())?.reshape(&[n, 4, 4, 4 * 7])?;
            log_softmax(&softmax(&y, 1)?, 3)
        });
        assert_eq!(steps[steps.len() - 2..], ["softmax", "log_softmax"], "{steps:#?}");
    }
}
