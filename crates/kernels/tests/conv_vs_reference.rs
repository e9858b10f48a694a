//! Every convolution algorithm against the naive reference, over random geometry.

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use stride_kernels::conv::{self, reference, Algo, Conv2dOptions, ConvGeom, Padding};
use stride_tensor::Rng;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    cg: usize,
    kg: usize,
    groups: usize,
    h: usize,
    w: usize,
    r: usize,
    s: usize,
    stride: (usize, usize),
    dilation: (usize, usize),
    padding: Padding,
    bias: bool,
}

fn padding() -> impl Strategy<Value = Padding> {
    prop_oneof![
        Just(Padding::Valid),
        Just(Padding::Same),
        Just(Padding::SameLower),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3).prop_map(|(top, bottom, left, right)| { Padding::Explicit { top, bottom, left, right } }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..4, 1usize..4, 1usize..4, 1usize..4),
        (1usize..10, 1usize..10, 1usize..5, 1usize..5),
        (1usize..4, 1usize..4, 1usize..4, 1usize..4),
        padding(),
        any::<bool>(),
    )
        .prop_map(|((n, cg, kg, groups), (h, w, r, s), (sh, sw, dh, dw), padding, bias)| Case {
            n,
            cg,
            kg,
            groups,
            h,
            w,
            r,
            s,
            stride: (sh, sw),
            dilation: (dh, dw),
            padding,
            bias,
        })
}

static VALID: AtomicUsize = AtomicUsize::new(0);

fn check(c: &Case) -> Result<(), TestCaseError> {
    let opts = Conv2dOptions { stride: c.stride, dilation: c.dilation, padding: c.padding, groups: c.groups, output_padding: (0, 0) };
    let x_shape = [c.n, c.cg * c.groups, c.h, c.w];
    let w_shape = [c.kg * c.groups, c.cg, c.r, c.s];
    let Ok(g) = ConvGeom::conv2d(&x_shape, &w_shape, &opts) else {
        // Geometry errors are tested elsewhere; here only valid geometry matters.
        return Ok(());
    };
    VALID.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng::seed(7);
    let x = rng.normal::<f64>(&x_shape, 0.0, 1.0).unwrap();
    let w = rng.normal::<f64>(&w_shape, 0.0, 1.0).unwrap();
    let b = rng.normal::<f64>(&[g.k], 0.0, 1.0).unwrap();
    let dy = rng.normal::<f64>(&g.small_shape(), 0.0, 1.0).unwrap();
    let bias = c.bias.then_some(b.data());
    let close = |a: &[f64], b: &[f64], what: &str| -> Result<(), TestCaseError> {
        prop_assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            prop_assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()), "{} [{}]: {} vs {} ({:?}, {:?})", what, i, x, y, g, Algo::choose(&g));
        }
        Ok(())
    };
    close(&conv::forward(&g, x.data(), w.data(), bias), &reference::forward(&g, x.data(), w.data(), bias), "forward")?;
    close(&conv::backward_data(&g, dy.data(), w.data()), &reference::backward_data(&g, dy.data(), w.data()), "backward_data")?;
    close(&conv::backward_filter(&g, x.data(), dy.data()), &reference::backward_filter(&g, x.data(), dy.data()), "backward_filter")?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn fast_conv_matches_reference(c in case()) {
        check(&c)?;
    }
}

/// Depthwise layers of whole blocks of eight channels, as mobile networks have (the forward
/// pass takes eight channels at a time there, on small, strided or dilated maps).
fn depthwise_case() -> impl Strategy<Value = Case> {
    ((1usize..3, 1usize..4), (1usize..20, 1usize..20, 1usize..6, 1usize..6), (1usize..4, 1usize..4, 1usize..3, 1usize..3), padding(), any::<bool>())
        .prop_map(|((n, blocks), (h, w, r, s), (sh, sw, dh, dw), padding, bias)| Case {
            n,
            cg: 1,
            kg: 1,
            groups: 8 * blocks,
            h,
            w,
            r,
            s,
            stride: (sh, sw),
            dilation: (dh, dw),
            padding,
            bias,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn depthwise_blocks_of_eight_match_reference(c in depthwise_case()) {
        check(&c)?;
    }
}

#[test]
fn most_random_cases_have_valid_geometry() {
    // Runs the property over a fixed sample and checks it did not just skip everything.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..200 {
        let c = case().new_tree(&mut runner).unwrap().current();
        check(&c).unwrap();
    }
    assert!(VALID.load(Ordering::Relaxed) >= 100, "only {} of 200 cases had valid geometry", VALID.load(Ordering::Relaxed));
}

#[test]
fn every_algorithm_is_exercised() {
    let geo = |x: [usize; 4], w: [usize; 4], o: Conv2dOptions| Algo::choose(&ConvGeom::conv2d(&x, &w, &o).unwrap());
    assert_eq!(geo([2, 8, 5, 5], [4, 8, 1, 1], Conv2dOptions::default()), Algo::Pointwise);
    assert_eq!(geo([2, 8, 5, 5], [8, 1, 3, 3], Conv2dOptions::default().groups(8)), Algo::Depthwise);
    assert_eq!(geo([2, 1, 5, 5], [6, 1, 3, 3], Conv2dOptions::default()), Algo::Im2col);
    assert_eq!(geo([2, 1, 28, 28], [20, 1, 5, 5], Conv2dOptions::default()), Algo::Depthwise);
    assert_eq!(geo([2, 4, 5, 5], [8, 1, 3, 3], Conv2dOptions::default().groups(4)), Algo::Depthwise);
    assert_eq!(geo([2, 8, 5, 5], [4, 8, 3, 3], Conv2dOptions::default()), Algo::Im2col);
    assert_eq!(geo([2, 16, 2, 2], [16, 16, 3, 3], Conv2dOptions::default().padding(Padding::Same)), Algo::Taps);
    assert_eq!(geo([2, 3, 4, 5], [6, 3, 4, 5], Conv2dOptions::default()), Algo::Dense);
    assert_eq!(geo([2, 3, 4, 5], [6, 3, 4, 5], Conv2dOptions::default().stride(3)), Algo::Dense);
    assert_eq!(geo([2, 3, 4, 4], [6, 3, 4, 4], Conv2dOptions::default().padding(Padding::uniform(1))), Algo::Im2col);
}

#[test]
fn filter_gradients_over_many_columns_match_reference() {
    // Lowered filter gradients summing over at least 2,048 columns (N*P*Q) with more rows of
    // columns than filters are summed transposed and turned round: 5x5 windows (im2col), two
    // groups, a strided layer, a 1x1 one with more channels than filters; and, not turned,
    // more filters than rows of columns.
    let case = |n, (cg, kg, groups), (h, w), (r, s), stride| Case {
        n,
        cg,
        kg,
        groups,
        h,
        w,
        r,
        s,
        stride,
        dilation: (1, 1),
        padding: Padding::Valid,
        bias: true,
    };
    let cases = [
        case(4, (3, 4, 1), (30, 30), (5, 5), (1, 1)),
        case(3, (2, 3, 2), (36, 34), (3, 5), (1, 1)),
        case(9, (5, 16, 1), (33, 31), (3, 3), (2, 2)),
        case(3, (20, 6, 1), (27, 27), (1, 1), (1, 1)),
        case(3, (1, 12, 1), (30, 30), (3, 3), (1, 1)),
    ];
    for c in &cases {
        let g = ConvGeom::conv2d(
            &[c.n, c.cg * c.groups, c.h, c.w],
            &[c.kg * c.groups, c.cg, c.r, c.s],
            &Conv2dOptions { stride: c.stride, groups: c.groups, ..Conv2dOptions::default() },
        )
        .unwrap();
        assert!(
            g.n * g.p * g.q >= 2048 && matches!(Algo::choose(&g), Algo::Im2col | Algo::Pointwise | Algo::Direct | Algo::Depthwise),
            "{c:?}: {:?}",
            Algo::choose(&g)
        );
        check(c).unwrap();
    }
}

#[test]
fn images_side_by_side_match_reference() {
    // Small maps put several images' columns side by side in one product, fewer where the
    // filters have many rows (C*R*S > 2,048: 64 columns a block, not 256): 2x2 and 4x4 outputs,
    // batches whose shares end in a partial block.
    let case =
        |n, cg, (h, w)| Case { n, cg, kg: 8, groups: 1, h, w, r: 4, s: 4, stride: (1, 1), dilation: (1, 1), padding: Padding::Valid, bias: true };
    for c in [case(40, 144, (5, 5)), case(10, 130, (7, 7)), case(7, 20, (5, 5))] {
        let g = ConvGeom::conv2d(&[c.n, c.cg, c.h, c.w], &[c.kg, c.cg, c.r, c.s], &Conv2dOptions::default()).unwrap();
        assert_eq!(Algo::choose(&g), Algo::Im2col, "{c:?}");
        let (held, columns) = (conv::backward_data_workspace(&g).held_images, (g.p * g.q) as u64);
        if c.cg * c.r * c.s > 2048 {
            assert!(held * columns <= 64 + columns, "{c:?}: {held} images of {columns} columns");
        }
        check(&c).unwrap();
    }
}

#[test]
fn tap_by_tap_matches_reference() {
    // Tap by tap needs 16 channels and much padding, which the random cases never have:
    // small maps with "same", explicit, strided (rows, and rows and columns) and dilated padding, batches that split over
    // the threads unevenly and not at all.
    let case =
        |n, (cg, kg), (h, w), (r, s), stride, dilation, padding| Case { n, cg, kg, groups: 1, h, w, r, s, stride, dilation, padding, bias: true };
    let cases = [
        case(3, (16, 20), (4, 4), (4, 4), (1, 1), (1, 1), Padding::Same),
        // K*C not a multiple of the filter copy's blocks of 16.
        case(2, (17, 19), (4, 4), (4, 4), (1, 1), (1, 1), Padding::Same),
        case(2, (24, 16), (2, 3), (3, 3), (1, 1), (1, 1), Padding::uniform(1)),
        case(5, (16, 17), (5, 4), (3, 2), (2, 1), (1, 1), Padding::Explicit { top: 2, bottom: 1, left: 0, right: 3 }),
        case(1, (17, 16), (3, 3), (3, 3), (1, 1), (2, 2), Padding::uniform(2)),
        case(4, (16, 16), (1, 1), (5, 5), (1, 1), (1, 1), Padding::Same),
        // Strided columns: each of a window's positions is its own row of channels.
        case(3, (16, 18), (4, 4), (3, 3), (2, 2), (1, 1), Padding::uniform(2)),
    ];
    for c in &cases {
        let (xs, ws) = ([c.n, c.cg, c.h, c.w], [c.kg, c.cg, c.r, c.s]);
        let opts = Conv2dOptions { stride: c.stride, dilation: c.dilation, padding: c.padding, groups: 1, output_padding: (0, 0) };
        assert_eq!(Algo::choose(&ConvGeom::conv2d(&xs, &ws, &opts).unwrap()), Algo::Taps, "{c:?}");
        check(c).unwrap();
    }
    // The VAE generator's "same" transposed convolution, whose forward pass is the data gradient.
    let o = Conv2dOptions::default().padding(Padding::Same);
    let g = ConvGeom::conv_transpose2d(&[3, 16, 4, 4], &[16, 24, 4, 4], &o).unwrap();
    assert_eq!(Algo::choose(&g), Algo::Taps);
    let mut rng = Rng::seed(3);
    let dy = rng.normal::<f64>(&g.small_shape(), 0.0, 1.0).unwrap();
    let w = rng.normal::<f64>(&[16, 24, 4, 4], 0.0, 1.0).unwrap();
    let (fast, slow) = (conv::backward_data(&g, dy.data(), w.data()), reference::backward_data(&g, dy.data(), w.data()));
    for (a, b) in fast.iter().zip(&slow) {
        assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[test]
fn strided_windows_through_row_phases_match_reference() {
    // Strided windows that overlap (R*S*P*Q >= 2*H*W) go through each row's phases in im2col
    // and col2im: odd and even widths (phases of unequal length), padding on either side,
    // dilation, column strides 2 and 3, a row stride alone, and B3's c7 in small.
    let case =
        |(cg, kg), (h, w), (r, s), stride, dilation, padding| Case { n: 3, cg, kg, groups: 1, h, w, r, s, stride, dilation, padding, bias: true };
    let cases = [
        case((5, 4), (9, 11), (3, 3), (2, 2), (1, 1), Padding::Same),
        case((3, 6), (8, 10), (3, 3), (2, 2), (1, 1), Padding::uniform(1)),
        case((2, 3), (7, 13), (2, 5), (1, 3), (1, 1), Padding::Explicit { top: 0, bottom: 1, left: 2, right: 1 }),
        case((4, 2), (10, 9), (3, 3), (2, 2), (2, 2), Padding::uniform(2)),
        case((3, 5), (6, 7), (4, 4), (3, 2), (1, 1), Padding::Explicit { top: 1, bottom: 2, left: 0, right: 3 }),
        case((2, 2), (8, 8), (3, 3), (2, 1), (1, 1), Padding::Same),
    ];
    for c in &cases {
        let opts = Conv2dOptions { stride: c.stride, dilation: c.dilation, padding: c.padding, groups: 1, output_padding: (0, 0) };
        let g = ConvGeom::conv2d(&[c.n, c.cg, c.h, c.w], &[c.kg, c.cg, c.r, c.s], &opts).unwrap();
        assert_eq!(Algo::choose(&g), Algo::Im2col, "{c:?}");
        assert!(g.r * g.s * g.p * g.q >= 2 * g.h * g.w, "{c:?} reads each value less than twice");
        check(c).unwrap();
    }
}

#[test]
fn whole_input_windows_match_reference() {
    // The window covers the input: one product for the batch (a transposed convolution from a
    // 1x1 code is this layer's data gradient, which `check` compares too).
    let case =
        |n, (cg, kg), (h, w), stride, bias| Case { n, cg, kg, groups: 1, h, w, r: h, s: w, stride, dilation: (1, 1), padding: Padding::Valid, bias };
    for c in [case(3, (3, 5), (4, 5), (1, 1), true), case(2, (7, 2), (3, 3), (2, 3), false), case(5, (4, 9), (1, 1), (1, 1), true)] {
        let opts = Conv2dOptions { stride: c.stride, dilation: c.dilation, padding: c.padding, groups: 1, output_padding: (0, 0) };
        assert_eq!(Algo::choose(&ConvGeom::conv2d(&[c.n, c.cg, c.h, c.w], &[c.kg, c.cg, c.r, c.s], &opts).unwrap()), Algo::Dense, "{c:?}");
        check(&c).unwrap();
    }
}

/// [`check`] in f32 (the precision of the AVX2 kernels) against the f64 reference.
fn check_f32(c: &Case) {
    let opts = Conv2dOptions { stride: c.stride, dilation: c.dilation, padding: c.padding, groups: c.groups, output_padding: (0, 0) };
    let (x_shape, w_shape) = ([c.n, c.cg * c.groups, c.h, c.w], [c.kg * c.groups, c.cg, c.r, c.s]);
    let g = ConvGeom::conv2d(&x_shape, &w_shape, &opts).unwrap();
    let mut rng = Rng::seed(11);
    let x = rng.normal::<f64>(&x_shape, 0.0, 1.0).unwrap();
    let w = rng.normal::<f64>(&w_shape, 0.0, 1.0).unwrap();
    let b = rng.normal::<f64>(&[g.k], 0.0, 1.0).unwrap();
    let dy = rng.normal::<f64>(&g.small_shape(), 0.0, 1.0).unwrap();
    let f = |t: &[f64]| t.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (xf, wf, bf, dyf) = (f(x.data()), f(w.data()), f(b.data()), f(dy.data()));
    let close = |fast: Vec<f32>, slow: Vec<f64>, what: &str| {
        assert_eq!(fast.len(), slow.len());
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what} [{i}]: {a} vs {b} ({c:?})");
        }
    };
    close(conv::forward(&g, &xf, &wf, Some(&bf)), reference::forward(&g, x.data(), w.data(), Some(b.data())), "forward");
    close(conv::backward_data(&g, &dyf, &wf), reference::backward_data(&g, dy.data(), w.data()), "backward_data");
    close(conv::backward_filter(&g, &xf, &dyf), reference::backward_filter(&g, x.data(), dy.data()), "backward_filter");
}

#[test]
fn strided_f32_direct_matches_reference() {
    // f32, ungrouped, strided, output channels a multiple of 16, rows of at least 8 outputs:
    // the direct kernel's register tiles (where the CPU has AVX-512F). Channel groups of 16,
    // 32, 48 (a pair and a single), 64 and 80; rows of 8, 15, 17, 19, 29 and 33 positions
    // (whole tiles of 14 and short last ones); one image (tasks split over channel groups) or
    // several; "same" and asymmetric padding, padding several positions deep on every side,
    // dilation, strides (2, 2), (2, 1), (1, 2) and (3, 2); B3's c7 in small; 16, 32 and 37
    // input channels (the kernel's chunks of 16).
    let case =
        |n, (cg, kg), (h, w), (r, s), stride, dilation, padding| Case { n, cg, kg, groups: 1, h, w, r, s, stride, dilation, padding, bias: true };
    let cases = [
        case(3, (5, 32), (11, 16), (3, 3), (2, 2), (1, 1), Padding::uniform(1)),
        case(1, (3, 48), (20, 33), (3, 3), (2, 2), (1, 1), Padding::Same),
        case(2, (4, 16), (9, 30), (3, 2), (2, 1), (2, 1), Padding::Explicit { top: 2, bottom: 0, left: 1, right: 3 }),
        case(2, (2, 64), (7, 58), (5, 3), (1, 2), (1, 1), Padding::Explicit { top: 0, bottom: 2, left: 1, right: 0 }),
        case(3, (6, 80), (10, 31), (2, 2), (3, 2), (1, 1), Padding::Valid),
        // Padding on every side, several rows and columns deep.
        case(2, (5, 32), (9, 12), (3, 3), (2, 2), (1, 1), Padding::Explicit { top: 3, bottom: 3, left: 4, right: 2 }),
        case(1, (3, 16), (4, 17), (5, 5), (2, 2), (2, 2), Padding::uniform(4)),
        case(5, (3, 32), (12, 40), (4, 4), (2, 2), (1, 1), Padding::Valid),
        // Input channels in chunks of 16 (partial sums kept between chunks): one whole chunk,
        // two, and two plus a short one.
        case(1, (16, 16), (8, 17), (3, 3), (2, 2), (1, 1), Padding::Same),
        case(2, (32, 48), (9, 30), (3, 3), (2, 2), (1, 1), Padding::uniform(1)),
        case(2, (37, 32), (10, 19), (3, 3), (2, 1), (1, 1), Padding::uniform(1)),
    ];
    // Unless `STRIDE_NO_AVX512` turns the AVX-512 kernels off.
    let direct = stride_kernels::simd::has_avx512();
    for c in &cases {
        let opts = Conv2dOptions { stride: c.stride, dilation: c.dilation, padding: c.padding, groups: 1, output_padding: (0, 0) };
        let g = ConvGeom::conv2d(&[c.n, c.cg, c.h, c.w], &[c.kg, c.cg, c.r, c.s], &opts).unwrap();
        assert_eq!(Algo::choose(&g), if direct { Algo::Direct } else { Algo::Im2col }, "{c:?}");
        check_f32(c);
        check(c).unwrap();
    }
    // Rows of fewer than 8 outputs, and 1x1 windows, stay lowered (they ran slower direct).
    let geo =
        |x: [usize; 4], w: [usize; 4]| ConvGeom::conv2d(&x, &w, &Conv2dOptions::default().stride(2).padding(Padding::uniform(w[2] / 2))).unwrap();
    assert_eq!(Algo::choose(&geo([2, 8, 8, 8], [16, 8, 3, 3])), Algo::Im2col, "rows of 4");
    assert_eq!(Algo::choose(&geo([2, 8, 32, 32], [16, 8, 1, 1])), Algo::Im2col, "1x1");
}

#[test]
fn unpadded_f32_rows_match_reference() {
    // f32, unpadded, stride 1: the lowering copies each row's runs of Q values with AVX-512
    // loads and stores where the CPU has them, the last one masked. Runs of 1, 7, 9 (LeNet's
    // second layer), 15, 16, 17, 26 (its first), 32 and 35 values, several channels.
    for (w, s) in [(3, 3), (11, 5), (13, 5), (17, 3), (16, 1), (19, 3), (28, 3), (34, 3), (37, 3)] {
        let c = Case { n: 2, cg: 3, kg: 4, groups: 1, h: 6, w, r: 2, s, stride: (1, 1), dilation: (1, 1), padding: Padding::Valid, bias: true };
        let g = ConvGeom::conv2d(&[c.n, c.cg, c.h, c.w], &[c.kg, c.cg, c.r, c.s], &Conv2dOptions::default()).unwrap();
        assert_eq!(Algo::choose(&g), Algo::Im2col, "{c:?}");
        check_f32(&c);
    }
}

#[test]
fn depthwise_3x3_tiles_match_reference() {
    // f32 3x3 and 5x5 direct windows with stride and dilation 1 on maps at least 8 wide go
    // through AVX2 register tiles of two rows by 16 or 8 columns, the last one overlapping its
    // neighbour: widths that are and are not multiples of 8, odd and single rows, asymmetric
    // padding, and a channel multiplier of 2 (whose data gradient takes the portable path).
    let case =
        |n, kg, groups, (h, w), padding| Case { n, cg: 1, kg, groups, h, w, r: 3, s: 3, stride: (1, 1), dilation: (1, 1), padding, bias: true };
    let cases = [
        case(2, 1, 3, (8, 8), Padding::Same),
        case(1, 1, 4, (7, 9), Padding::Same),
        case(2, 1, 2, (5, 17), Padding::uniform(1)),
        case(1, 1, 3, (1, 31), Padding::Same),
        case(2, 1, 2, (6, 10), Padding::Valid),
        case(1, 1, 2, (9, 24), Padding::Explicit { top: 2, bottom: 0, left: 0, right: 2 }),
        case(2, 2, 3, (4, 13), Padding::Same),
        case(1, 1, 2, (3, 16), Padding::Explicit { top: 0, bottom: 1, left: 1, right: 0 }),
        // 5x5 windows (ten, then five, filter-gradient sums per pass), and single-channel
        // ungrouped inputs with several filters (B3's c1, LeNet's first layer).
        Case { r: 5, s: 5, ..case(2, 1, 2, (9, 12), Padding::Valid) },
        Case { r: 5, s: 5, ..case(1, 1, 3, (4, 19), Padding::Same) },
        Case { r: 5, s: 5, ..case(3, 20, 1, (12, 12), Padding::Valid) },
        case(2, 7, 1, (10, 28), Padding::Valid),
        case(1, 4, 1, (5, 9), Padding::Same),
    ];
    for c in &cases {
        let opts = Conv2dOptions { stride: c.stride, dilation: c.dilation, padding: c.padding, groups: c.groups, output_padding: (0, 0) };
        let g = ConvGeom::conv2d(&[c.n, c.groups, c.h, c.w], &[c.kg * c.groups, 1, c.r, c.s], &opts).unwrap();
        assert_eq!(Algo::choose(&g), Algo::Depthwise, "{c:?}");
        assert!(g.q >= 8 && g.w >= 8, "{c:?} is too narrow for the tiles");
        check_f32(c);
        // The portable kernels (f64) on the same geometry.
        check(c).unwrap();
    }
}

#[test]
fn depthwise_stride_2_matches_reference() {
    // f32 square windows of 2 to 7 at stride 2 (dilation 1) into rows of at least 24 outputs
    // go plane by plane through the AVX-512 kernel (where the CPU has it), each input row split
    // into its even and odd columns, sixteen outputs a vector, rows two at a time where their
    // windows lie inside the plane: rows of 24 (a whole vector and a short one), 31, 32 (two
    // whole), 33, 56 (three whole and a short 8), 64 (four) and 71 (four and a short 7); odd
    // and even input widths and heights; "same" (asymmetric at stride 2), none, and padding
    // deeper than the window's half, on the left up to the kernel's limit of 16 and past it;
    // blocks of eight channels and a channel multiplier of 2. Narrower rows (8, 15, 16, 17)
    // take the lanes or the portable kernel.
    let case =
        |n, kg, groups, (h, w), k, padding| Case { n, cg: 1, kg, groups, h, w, r: k, s: k, stride: (2, 2), dilation: (1, 1), padding, bias: true };
    let cases = [
        case(1, 1, 8, (16, 48), 3, Padding::Same),
        case(2, 1, 3, (9, 62), 3, Padding::uniform(1)),
        case(1, 1, 8, (12, 64), 3, Padding::Same),
        case(1, 1, 2, (7, 67), 3, Padding::Valid),
        case(1, 2, 3, (10, 62), 5, Padding::Same),
        case(1, 1, 8, (5, 112), 3, Padding::Same),
        case(1, 1, 2, (6, 128), 5, Padding::uniform(2)),
        case(2, 1, 2, (4, 141), 3, Padding::uniform(1)),
        case(1, 1, 2, (8, 48), 2, Padding::Valid),
        case(1, 1, 2, (17, 60), 7, Padding::uniform(3)),
        case(1, 1, 2, (9, 58), 4, Padding::Explicit { top: 3, bottom: 0, left: 4, right: 1 }),
        case(1, 1, 2, (5, 41), 3, Padding::Explicit { top: 0, bottom: 2, left: 16, right: 5 }),
        case(1, 1, 2, (5, 41), 3, Padding::Explicit { top: 1, bottom: 0, left: 17, right: 0 }),
        // Narrower rows.
        case(1, 1, 8, (16, 16), 3, Padding::Same),
        case(2, 1, 3, (9, 30), 3, Padding::uniform(1)),
        case(1, 1, 8, (12, 32), 3, Padding::Same),
        case(1, 1, 2, (7, 35), 3, Padding::Valid),
    ];
    for c in &cases {
        let opts = Conv2dOptions { stride: c.stride, dilation: c.dilation, padding: c.padding, groups: c.groups, output_padding: (0, 0) };
        let g = ConvGeom::conv2d(&[c.n, c.groups, c.h, c.w], &[c.kg * c.groups, 1, c.r, c.s], &opts).unwrap();
        assert_eq!(Algo::choose(&g), Algo::Depthwise, "{c:?}");
        check_f32(c);
        check(c).unwrap();
    }
}

#[test]
fn strided_stems_match_reference() {
    // A few images of at most four channels into 16 filters or more at stride 2, rows of at
    // least 24 outputs: the stem kernel (where the CPU has AVX-512F), vectorised over
    // positions from rows split into even and odd columns, eight filters by three vectors at
    // a time: MobileNet's and YOLO's 3 -> 16 and 3 -> 32 under 3x3, ResNet's 7x7 with padding
    // 3, a 2x2 window, odd sizes and "same" padding, two and four images, one and four input
    // channels, 48 filters (a group of 32 and one of 16); rows of 25, 30, 32, 39 and 40
    // outputs (whole and short vectors), and past the limits (rows of 23, five images, five
    // channels: the direct kernel).
    let case = |n, (cg, kg), (h, w), r, padding| Case { n, cg, kg, groups: 1, h, w, r, s: r, stride: (2, 2), dilation: (1, 1), padding, bias: true };
    let cases = [
        case(1, (3, 16), (64, 64), 3, Padding::uniform(1)),
        case(2, (3, 32), (70, 77), 3, Padding::Same),
        case(1, (3, 64), (45, 60), 7, Padding::uniform(3)),
        case(1, (3, 16), (48, 50), 2, Padding::Valid),
        case(4, (4, 48), (50, 49), 3, Padding::Same),
        case(1, (1, 16), (33, 80), 5, Padding::Explicit { top: 0, bottom: 3, left: 2, right: 1 }),
        case(1, (3, 16), (31, 48), 3, Padding::Valid),
        case(5, (3, 16), (20, 48), 3, Padding::uniform(1)),
        case(1, (5, 16), (20, 48), 3, Padding::uniform(1)),
    ];
    for c in &cases {
        check_f32(c);
        check(c).unwrap();
    }
}
