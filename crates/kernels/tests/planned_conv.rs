//! Planned convolution (`conv::planned`) against the naive reference: every algorithm, NCHW
//! and batch-blocked layouts, with bias, residual and activation fused in.

use proptest::prelude::*;
use stride_kernels::conv::planned::{self, Epilogue, Layout, Prepared};
use stride_kernels::conv::{reference, Algo, Conv2dOptions, ConvGeom, Padding};
use stride_kernels::pool::{Pool2dOptions, PoolGeom};
use stride_kernels::unary::Unary;
use stride_tensor::{Rng, Tensor};

/// The reference: act(conv(x) + bias + residual), all NCHW.
fn expected(g: &ConvGeom, x: &[f64], w: &[f64], bias: Option<&[f64]>, res: Option<&[f64]>, act: Option<Unary>) -> Vec<f64> {
    let mut y = reference::forward(g, x, w, bias);
    if let Some(r) = res {
        y.iter_mut().zip(r).for_each(|(o, v)| *o += v);
    }
    if let Some(a) = act {
        y.iter_mut().for_each(|v| *v = a.apply(*v));
    }
    y
}

fn to(layout: Layout, x: &[f64], n: usize, c: usize, plane: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    planned::relayout(x, Layout::Nchw, &mut y, layout, n, c, plane);
    y
}

fn from(layout: Layout, x: &[f64], n: usize, c: usize, plane: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    planned::relayout(x, layout, &mut y, Layout::Nchw, n, c, plane);
    y
}

/// Random input, filters, bias and residual for `g` (normal, from `seed`).
fn operands(g: &ConvGeom, x_shape: [usize; 4], w_shape: [usize; 4], seed: u64) -> [Tensor<f64>; 4] {
    let mut rng = Rng::seed(seed);
    let mut draw = |shape: &[usize]| rng.normal::<f64>(shape, 0.0, 1.0).unwrap();
    [draw(&x_shape), draw(&w_shape), draw(&[g.k]), draw(&g.small_shape())]
}

fn check(
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    opts: Conv2dOptions,
    b: usize,
    bias: bool,
    residual: bool,
    act: Option<Unary>,
) -> Result<(), TestCaseError> {
    let Ok(g) = ConvGeom::conv2d(&x_shape, &w_shape, &opts) else { return Ok(()) };
    let layout = if b > 1 && planned::blocks_forward(&g) { Layout::Blocked(b) } else { Layout::Nchw };
    let [x, w, bv, rv] = operands(&g, x_shape, w_shape, 11);
    let (bias, res) = (bias.then_some(bv.data()), residual.then_some(rv.data()));
    let want = expected(&g, x.data(), w.data(), bias, res, act);
    let (n, pq) = (g.n, g.p * g.q);
    let xl = to(layout, x.data(), n, g.c, g.h * g.w);
    let rl = res.map(|r| to(layout, r, n, g.k, pq));
    let mut y = vec![f64::NAN; want.len()];
    let prep = Prepared::new(&g, w.data());
    planned::forward_into(&g, layout, &xl, &prep, Epilogue { bias, residual: rl.as_deref(), act }, &mut y);
    let got = from(layout, &y, n, g.k, pq);
    for (i, (a, e)) in got.iter().zip(&want).enumerate() {
        prop_assert!((a - e).abs() <= 1e-9 * (1.0 + e.abs()), "[{}] {} vs {} ({:?}, {:?}, {:?})", i, a, e, g, prep.algo(), layout);
    }
    Ok(())
}

/// `backward_into` against the reference gradients, in both layouts.
fn check_backward(x_shape: [usize; 4], w_shape: [usize; 4], opts: Conv2dOptions, b: usize) -> Result<(), TestCaseError> {
    let Ok(g) = ConvGeom::conv2d(&x_shape, &w_shape, &opts) else { return Ok(()) };
    let layout = if b > 1 && planned::blocks(&g) { Layout::Blocked(b) } else { Layout::Nchw };
    let mut rng = Rng::seed(12);
    let x = rng.normal::<f64>(&x_shape, 0.0, 1.0).unwrap();
    let w = rng.normal::<f64>(&w_shape, 0.0, 1.0).unwrap();
    let dy = rng.normal::<f64>(&g.small_shape(), 0.0, 1.0).unwrap();
    let (n, pq) = (g.n, g.p * g.q);
    let (xl, dyl) = (to(layout, x.data(), n, g.c, g.h * g.w), to(layout, dy.data(), n, g.k, pq));
    let (mut dx, mut dw, mut db) = (vec![f64::NAN; x.numel()], vec![f64::NAN; w.numel()], vec![f64::NAN; g.k]);
    planned::backward_into(&g, layout, &xl, w.data(), &dyl, Some(&mut dx), &mut dw, Some(&mut db));
    let dx = from(layout, &dx, n, g.c, g.h * g.w);
    let want_db: Vec<f64> =
        (0..g.k).map(|k| (0..n).map(|i| dy.data()[(i * g.k + k) * pq..(i * g.k + k + 1) * pq].iter().sum::<f64>()).sum()).collect();
    for (what, have, want) in [
        ("dx", dx, reference::backward_data(&g, dy.data(), w.data())),
        ("dw", dw, reference::backward_filter(&g, x.data(), dy.data())),
        ("db", db, want_db),
    ] {
        for (i, (a, e)) in have.iter().zip(&want).enumerate() {
            prop_assert!((a - e).abs() <= 1e-9 * (1.0 + e.abs()), "{} [{}] {} vs {} ({:?}, {:?})", what, i, a, e, g, layout);
        }
    }
    // With a ReLU after the convolution: `y` (its output, about half of it zero) becomes the
    // gradient before it, and the gradients are those of that masked gradient.
    let y: Vec<f64> = rng.normal::<f64>(&g.small_shape(), 0.0, 1.0).unwrap().data().iter().map(|&v| v.max(0.0)).collect();
    let dz: Vec<f64> = y.iter().zip(dy.data()).map(|(&y, &d)| if y > 0.0 { d } else { 0.0 }).collect();
    let mut yl = to(layout, &y, n, g.k, pq);
    let (mut dx, mut dw, mut db) = (vec![f64::NAN; x.numel()], vec![f64::NAN; w.numel()], vec![f64::NAN; g.k]);
    planned::backward_relu_into(&g, layout, &xl, w.data(), &mut yl, &dyl, Some(&mut dx), &mut dw, Some(&mut db));
    let want_db: Vec<f64> = (0..g.k).map(|k| (0..n).map(|i| dz[(i * g.k + k) * pq..(i * g.k + k + 1) * pq].iter().sum::<f64>()).sum()).collect();
    for (what, have, want) in [
        ("relu dz", from(layout, &yl, n, g.k, pq), dz.clone()),
        ("relu dx", from(layout, &dx, n, g.c, g.h * g.w), reference::backward_data(&g, &dz, w.data())),
        ("relu dw", dw, reference::backward_filter(&g, x.data(), &dz)),
        ("relu db", db, want_db),
    ] {
        for (i, (a, e)) in have.iter().zip(&want).enumerate() {
            prop_assert!((a - e).abs() <= 1e-9 * (1.0 + e.abs()), "{} [{}] {} vs {} ({:?}, {:?})", what, i, a, e, g, layout);
        }
    }
    Ok(())
}

fn act() -> impl Strategy<Value = Option<Unary>> {
    prop_oneof![Just(None), Just(Some(Unary::Relu)), Just(Some(Unary::Tanh)), Just(Some(Unary::HardSwish))]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn planned_conv_matches_reference(
        (n, c, k, groups) in (1usize..7, 1usize..5, 1usize..5, 1usize..3),
        (h, w, r, s) in (1usize..9, 1usize..9, 1usize..4, 1usize..4),
        (stride, dil, pad) in (1usize..3, 1usize..3, 0usize..2),
        b in 1usize..5, bias in any::<bool>(), residual in any::<bool>(), act in act(),
    ) {
        let opts = Conv2dOptions { stride: (stride, stride), dilation: (dil, 1), padding: Padding::Explicit { top: pad, bottom: 0, left: pad, right: 1 }, groups, output_padding: (0, 0) };
        check([n, c * groups, h, w], [k * groups, c, r, s], opts, b, bias, residual, act)?;
        check_backward([n, c * groups, h, w], [k * groups, c, r, s], opts, b)?;
    }
}

#[test]
fn every_algorithm_runs_planned() {
    let d = Conv2dOptions::default();
    let cases = [
        ([5, 8, 6, 6], [4, 8, 1, 1], d, Algo::Pointwise),
        // A squeeze-excitation block's dense layer: planned as a 1x1 product per block.
        ([5, 8, 1, 1], [4, 8, 1, 1], d, Algo::Dense),
        ([5, 3, 7, 7], [6, 3, 3, 3], d, Algo::Im2col),
        ([5, 8, 6, 5], [8, 1, 3, 3], d.groups(8), Algo::Depthwise),
        // Mobile networks' depthwise layers on small maps, eight channels at a time: most taps of
        // a 5x5 window over a 2x2 map read only border; strided.
        ([3, 16, 2, 2], [16, 1, 5, 5], d.groups(16).padding(Padding::Same), Algo::Depthwise),
        ([3, 24, 7, 7], [24, 1, 5, 5], d.groups(24).padding(Padding::uniform(2)).stride(2), Algo::Depthwise),
        // Larger maps, eight channels at a time (the cases above are small products: see
        // depthwise.rs's test of which kernel takes which), and an 8x8 map as one product.
        ([3, 16, 9, 9], [16, 1, 3, 3], d.groups(16).padding(Padding::uniform(1)).stride(2), Algo::Depthwise),
        ([2, 8, 8, 8], [8, 1, 3, 3], d.groups(8).padding(Padding::uniform(1)).stride(2), Algo::Depthwise),
        ([2, 8, 8, 8], [8, 1, 5, 5], d.groups(8).padding(Padding::Same), Algo::Depthwise),
        ([3, 16, 8, 8], [16, 16, 3, 3], d.padding(Padding::Same), Algo::Winograd),
        ([6, 4, 9, 9], [6, 2, 3, 3], d.groups(2), Algo::Im2col),
        // ResNet-18's strided layer into 2x2 maps (64x64 inputs): tap by tap, its filters made
        // tap-major once by the plan.
        ([2, 16, 4, 4], [16, 16, 3, 3], d.padding(Padding::uniform(1)).stride(2), Algo::Taps),
        // One image on a 2x2 map: the threads take runs of the filters through every tap (40
        // filters: a run of 32 and one of 8).
        ([1, 16, 2, 2], [40, 16, 3, 3], d.padding(Padding::Same), Algo::Taps),
    ];
    // Two threads whatever the machine, so one image's products are split.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| every_case_runs_planned(&cases));
}

fn every_case_runs_planned(cases: &[([usize; 4], [usize; 4], Conv2dOptions, Algo)]) {
    for &(xs, ws, o, algo) in cases {
        let g = ConvGeom::conv2d(&xs, &ws, &o).unwrap();
        assert_eq!(Algo::choose(&g), algo);
        if algo == Algo::Dense {
            assert_eq!(Prepared::new(&g, &[0.0; 32]).algo(), Algo::Pointwise);
            assert!(planned::blocks(&g));
        }
        for b in [1, 2, 4] {
            // ReLU fused per row; others once over a piece of short rows.
            check(xs, ws, o, b, true, true, Some(Unary::Relu)).unwrap();
            check(xs, ws, o, b, true, false, Some(Unary::HardSwish)).unwrap();
            check_backward(xs, ws, o, b).unwrap();
        }
    }
}

#[test]
fn small_winograd_layers_are_lowered_to_columns() {
    let same = Conv2dOptions::default().padding(Padding::Same);
    // One image of 4x4 maps: a plan too is lowered to columns (reading 36 transformed values
    // per filter pair costs more than the products save), so it may run blocked.
    let one = ConvGeom::conv2d(&[1, 16, 4, 4], &[16, 16, 3, 3], &same).unwrap();
    assert_eq!(Algo::choose(&one), Algo::Winograd);
    assert_eq!(Prepared::new(&one, &[0.0; 16 * 16 * 9]).algo(), Algo::Im2col);
    assert!(planned::blocks(&one));
    check([1, 16, 4, 4], [16, 16, 3, 3], same, 1, true, true, Some(Unary::Relu)).unwrap();
    // One image of 16x16 (16 tiles) is one share, whose transforms run on one thread: columns
    // for a plan; two images share the threads by image: Winograd.
    for (n, algo) in [(1, Algo::Im2col), (2, Algo::Winograd)] {
        let g = ConvGeom::conv2d(&[n, 64, 16, 16], &[64, 64, 3, 3], &same).unwrap();
        assert_eq!(Prepared::new(&g, &[0.0; 64 * 64 * 9]).algo(), algo, "{n} images");
    }
    check([1, 64, 16, 16], [64, 64, 3, 3], same, 1, true, true, Some(Unary::Relu)).unwrap();
    // Three images of 8x8 (12 tiles): a plan transforms the filters once (Winograd); a training
    // step, whose weights change before the next, takes columns, in NCHW as the plan laid it out.
    let (xs, ws) = ([3, 16, 8, 8], [16, 16, 3, 3]);
    let g = ConvGeom::conv2d(&xs, &ws, &same).unwrap();
    let [x, w, bv, rv] = operands(&g, xs, ws, 3);
    assert_eq!(Prepared::new(&g, w.data()).algo(), Algo::Winograd);
    assert!(!planned::blocks(&g));
    let step = Prepared::for_step(&g, w.data());
    assert_eq!(step.algo(), Algo::Im2col);
    let want = expected(&g, x.data(), w.data(), Some(bv.data()), Some(rv.data()), Some(Unary::Relu));
    let mut y = vec![f64::NAN; want.len()];
    let epi = Epilogue { bias: Some(bv.data()), residual: Some(rv.data()), act: Some(Unary::Relu) };
    planned::forward_into(&g, Layout::Nchw, x.data(), &step, epi, &mut y);
    for (i, (a, e)) in y.iter().zip(&want).enumerate() {
        assert!((a - e).abs() <= 1e-9 * (1.0 + e.abs()), "[{i}] {a} vs {e}");
    }
}

#[test]
fn one_image_is_lowered_by_every_thread() {
    // A product the threads split (one image) has its columns lowered by channel runs split
    // between the threads too (41 channels: 21 and 20): padded, strided, and unpadded (the
    // AVX-512 gather).
    let o = Conv2dOptions::default();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    // With no more filters than positions, each thread lowers its own output rows instead and
    // multiplies every filter into them: padded, strided, unpadded, dilated, padded unevenly.
    let uneven = Padding::Explicit { top: 0, bottom: 3, left: 2, right: 0 };
    for (x, w, opts) in [
        ([1, 41, 8, 8], [96, 41, 3, 3], o.padding(Padding::Same)),
        ([1, 41, 16, 16], [64, 41, 3, 3], o.padding(Padding::Same)),
        ([1, 41, 16, 16], [48, 41, 3, 3], o.padding(Padding::uniform(1)).stride(2)),
        ([1, 41, 14, 14], [64, 41, 3, 3], o),
        ([1, 41, 16, 16], [64, 41, 3, 3], o.padding(Padding::uniform(2)).dilation(2)),
        ([1, 41, 16, 16], [64, 41, 3, 3], o.padding(uneven)),
    ] {
        let g = ConvGeom::conv2d(&x, &w, &opts).unwrap();
        assert_eq!(Prepared::new(&g, &vec![0.0; w.iter().product()]).algo(), Algo::Im2col, "{g:?}");
        pool.install(|| check(x, w, opts, 1, true, true, Some(Unary::Relu))).unwrap();
    }
}

#[test]
fn few_positions_against_large_weights_read_them_in_panels() {
    // A plan of at most four positions (one image on a 2x2 map, two of 1x2 in a block) whose
    // 1x1 layer has weights too large for the cache lays them out in panels of 64 outputs
    // (700: the last panel padded); three positions on smaller weights keep them as given.
    let o = Conv2dOptions::default();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    // A strided 1x1 layer into a 2x2 map (ResNet-18's last shortcut at 64x64) lowers its
    // columns and turns them into rows for the panels.
    let s2 = o.stride(2);
    for (x, w, opts, b, algo, panels) in [
        ([1, 192, 2, 2], [700, 192, 1, 1], o, 1, Algo::Pointwise, true),
        ([2, 192, 1, 2], [700, 192, 1, 1], o, 2, Algo::Pointwise, true),
        ([1, 96, 1, 3], [576, 96, 1, 1], o, 1, Algo::Pointwise, false),
        ([1, 256, 4, 3], [520, 256, 1, 1], s2, 1, Algo::Im2col, true),
    ] {
        let g = ConvGeom::conv2d(&x, &w, &opts).unwrap();
        let weights = vec![0.0; w.iter().product()];
        let prep = Prepared::new(&g, &weights);
        assert_eq!((prep.algo(), prep.in_panels()), (algo, panels), "{g:?}");
        pool.install(|| check(x, w, opts, b, true, true, Some(Unary::HardSwish))).unwrap();
    }
}

#[test]
fn large_blocks_are_lowered_in_chunks() {
    // 576 x 256 columns per image: each image is a chunk of its own inside a block of 4.
    let o = Conv2dOptions::default();
    // 144 x 256 columns per image: chunks of 3 images and 1 in blocks of 4.
    check([8, 16, 16, 16], [8, 16, 3, 3], o.padding(Padding::Same), 4, true, true, Some(Unary::Relu)).unwrap();
    check_backward([8, 16, 16, 16], [8, 16, 3, 3], o.padding(Padding::Same), 4).unwrap();
    let x = [8, 64, 16, 16];
    for (w, opts) in [([8, 64, 3, 3], o.padding(Padding::Same).stride(1).groups(1)), ([8, 64, 3, 3], o.stride(2)), ([8, 64, 1, 1], o)] {
        let g = ConvGeom::conv2d(&x, &w, &opts).unwrap();
        assert!(planned::blocks(&g) || Algo::choose(&g) == Algo::Winograd);
        check(x, w, opts, 4, true, true, Some(Unary::Relu)).unwrap();
        check_backward(x, w, opts, 4).unwrap();
    }
}

#[test]
fn filter_gradients_over_many_columns_match_reference() {
    // At least 2,048 columns (N*P*Q) and more rows of columns than filters: the blocks' filter
    // gradients are summed transposed and turned round (5x5 im2col and 1x1 layers, blocks of
    // 2 and 4 images, and NCHW).
    let o = Conv2dOptions::default();
    for (x, w) in [([4, 3, 30, 30], [4, 3, 5, 5]), ([5, 12, 24, 24], [5, 12, 1, 1])] {
        for b in [1, 2, 4] {
            check_backward(x, w, o, b).unwrap();
        }
    }
}

#[test]
fn relayout_round_trips_and_places_channels() {
    let (n, c, plane) = (5, 3, 4);
    let x: Vec<f64> = (0..n * c * plane).map(|i| i as f64).collect();
    let b = to(Layout::Blocked(2), &x, n, c, plane);
    // Block 0 holds images 0 and 1, channel-major: channel 0 of image 0, then of image 1.
    assert_eq!(&b[0..plane], &x[0..plane]);
    assert_eq!(&b[plane..2 * plane], &x[c * plane..c * plane + plane]);
    // The last block has one image: NCHW for it.
    assert_eq!(&b[4 * c * plane..], &x[4 * c * plane..]);
    assert_eq!(from(Layout::Blocked(2), &b, n, c, plane), x);
    let mut runs = Vec::new();
    Layout::Blocked(2).channel_runs(n, c, |ch, k| runs.push((ch, k)));
    assert_eq!(runs, [(0, 2), (1, 2), (2, 2), (0, 2), (1, 2), (2, 2), (0, 1), (1, 1), (2, 1)]);
}

#[test]
fn pick_channels_gathers_in_every_layout() {
    // Two sources of 3 and 2 channels; picks that concatenate, split, shuffle and repeat.
    let (n, plane) = (5, 3);
    let a: Vec<f64> = (0..n * 3 * plane).map(|i| i as f64).collect();
    let bsrc: Vec<f64> = (0..n * 2 * plane).map(|i| 1000.0 + i as f64).collect();
    let picks = [(1, 1), (0, 0), (0, 2), (1, 0), (0, 0), (0, 1)];
    let want: Vec<f64> = (0..n)
        .flat_map(|i| picks.iter().flat_map(move |&(s, ch)| (0..plane).map(move |p| (s, i, ch, p))))
        .map(|(s, i, ch, p)| if s == 0 { a[(i * 3 + ch) * plane + p] } else { bsrc[(i * 2 + ch) * plane + p] })
        .collect();
    for layout in [Layout::Nchw, Layout::Blocked(2), Layout::Blocked(4), Layout::Blocked(8)] {
        let (al, bl) = (to(layout, &a, n, 3, plane), to(layout, &bsrc, n, 2, plane));
        let mut y = vec![f64::NAN; n * picks.len() * plane];
        planned::pick_channels(&[(&al, 3), (&bl, 2)], &picks, layout, n, plane, &mut y);
        assert_eq!(from(layout, &y, n, picks.len(), plane), want, "{layout:?}");
    }
}

#[test]
fn f32_blocked_layers_match_reference() {
    // f32 takes the AVX-512 run copies of the unpadded lowering (when the CPU has them) and
    // the vectorised bias + residual + ReLU pass: LeNet's two layers (rows of 26 and 9
    // values), a row of exactly 16 and one of 17, with every epilogue combination.
    let d = Conv2dOptions::default();
    let cases = [([6, 1, 28, 28], [5, 1, 3, 3]), ([6, 20, 13, 13], [7, 20, 5, 5]), ([4, 3, 18, 18], [4, 3, 3, 3]), ([4, 2, 9, 21], [3, 2, 2, 5])];
    for (xs, ws) in cases {
        let g = ConvGeom::conv2d(&xs, &ws, &d).unwrap();
        for (b, bias, residual, act) in [
            (3, true, false, Some(Unary::Relu)),
            (4, true, true, Some(Unary::Relu)),
            (2, false, true, None),
            (1, true, false, Some(Unary::Tanh)),
            (6, false, false, None),
        ] {
            let layout = if b > 1 { Layout::Blocked(b) } else { Layout::Nchw };
            check_f32(&g, (xs, ws), layout, (bias, residual, act));
        }
    }
}

/// `forward_into` in f32 against the f64 reference (to 1e-4; Winograd see below), in `layout`, with the bias,
/// residual and activation `epi` asks for.
fn check_f32(g: &ConvGeom, (xs, ws): ([usize; 4], [usize; 4]), layout: Layout, epi: (bool, bool, Option<Unary>)) {
    let (bias, residual, act) = epi;
    let [x, w, bv, rv] = operands(g, xs, ws, 5);
    let (bias64, res64) = (bias.then_some(bv.data()), residual.then_some(rv.data()));
    let want = expected(g, x.data(), w.data(), bias64, res64, act);
    let f = |t: &[f64]| t.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (n, pq) = (g.n, g.p * g.q);
    let xl = f(&to(layout, x.data(), n, g.c, g.h * g.w));
    let rl = res64.map(|r| f(&to(layout, r, n, g.k, pq)));
    let (wf, bf) = (f(w.data()), f(bv.data()));
    let mut y = vec![f32::NAN; want.len()];
    let prep = Prepared::new(g, &wf);
    let epi = Epilogue { bias: bias.then_some(&bf[..]), residual: rl.as_deref(), act };
    planned::forward_into(g, layout, &xl, &prep, epi, &mut y);
    let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    let got = from(layout, &y64, n, g.k, pq);
    // Winograd's transforms mix a tile's values, so its rounding goes with the largest of them
    // (to 1e-5 of it, as tests/winograd.rs checks it); a CPU without AVX-512 runs some of
    // these layers so (`STRIDE_NO_AVX512`).
    let spread = if prep.algo() == Algo::Winograd { 1e-5 * want.iter().fold(0.0f64, |m, v| m.max(v.abs())) } else { 0.0 };
    for (i, (a, e)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - e).abs() <= 1e-4 * (1.0 + e.abs()) + spread,
            "[{i}] {a} vs {e} ({g:?}, {:?}, {layout:?}, bias {bias}, residual {residual}, {act:?})",
            prep.algo()
        );
    }
}

/// Whether the CPU runs the AVX-512 kernels (the direct and grouped kernels among them):
/// `STRIDE_NO_AVX512` turns them off, and CI runs this file with it too, so the paths a CPU
/// without them takes are checked on a machine that has them.
fn avx512() -> bool {
    stride_kernels::simd::has_avx512()
}

/// Whether the CPU runs the grouped kernel: its AVX-512 build, or its AVX2 one (where
/// `STRIDE_NO_AVX512` turns the first off).
fn grouped_kernel() -> bool {
    avx512() || stride_kernels::simd::has_avx2_fma()
}

#[test]
fn one_f32_image_takes_the_direct_kernel() {
    // One image's f32 layers run the direct kernel (where the CPU has AVX-512F), reading the
    // image in place, split by output rows where there are few groups of 32 filters: strided
    // ones as eager mode runs them (`Algo::choose` says Direct: YOLO's 3 -> 16 stem, one
    // group; an RGB stem into rows of 30, which the stem kernel takes; 48 filters, a group
    // of 32 and one of 16; dilated; rows the threads share unevenly, 17 rows over 2 and 3
    // threads), and stride-1 ones that eager mode gives Winograd (ResNet's 3x3 layers, "same"
    // and "valid", a 5x5 window, rows of exactly 8; rows of fewer than 8 at stride 1 in
    // tiles that span rows: 7 x 7 "same" over 40 channels, chunks of 16, 16 and 8; 4 x 4 into
    // 48 filters; dilated rows of 4; more padding below and right than "same"). f64,
    // batches, strided rows of fewer than 8 and maps of fewer than 16 outputs are not.
    let o = Conv2dOptions::default().stride(2);
    let one = Conv2dOptions::default();
    let cases = [
        ([1, 3, 35, 34], [16, 3, 3, 3], o.padding(Padding::uniform(1)), true),
        ([1, 3, 64, 60], [32, 3, 3, 3], o.padding(Padding::uniform(1)), true),
        ([1, 20, 17, 18], [48, 20, 3, 3], o.padding(Padding::Same), true),
        ([1, 8, 21, 20], [32, 8, 3, 3], o.dilation(2), true),
        ([1, 17, 40, 33], [64, 17, 5, 5], o.padding(Padding::uniform(2)), true),
        ([1, 24, 19, 23], [64, 24, 3, 3], one.padding(Padding::Same), true),
        ([1, 33, 12, 10], [32, 33, 3, 3], one, true),
        ([1, 16, 14, 12], [48, 16, 5, 5], one.padding(Padding::uniform(2)), true),
        ([1, 40, 7, 7], [64, 40, 3, 3], one.padding(Padding::Same), true),
        ([1, 16, 6, 6], [48, 16, 3, 3], one, true),
        ([1, 16, 9, 8], [32, 16, 3, 3], one.dilation(2), true),
        ([1, 16, 6, 5], [32, 16, 3, 3], one.padding(Padding::Explicit { top: 1, bottom: 2, left: 0, right: 2 }), true),
        ([1, 16, 14, 13], [32, 16, 3, 3], o.padding(Padding::uniform(1)), false),
        ([1, 16, 5, 5], [32, 16, 3, 3], one, false),
    ];
    // The same pools for every case: each thread's buffers come from the case before, holding
    // its values where this case's border must be zero.
    let pools = [2, 3].map(|threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap());
    // A row-spanning case first on threads of its own, whose buffers are then exactly its
    // size: its last tile's window reaches past the bordered image (`direct::bordered_len`).
    let valid = ConvGeom::conv2d(&[1, 16, 9, 9], &[32, 16, 3, 3], &one).unwrap();
    let fresh = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    fresh.install(|| check_f32(&valid, ([1, 16, 9, 9], [32, 16, 3, 3]), Layout::Nchw, (true, true, Some(Unary::Relu))));
    for (xs, ws, o, fits) in cases {
        let g = ConvGeom::conv2d(&xs, &ws, &o).unwrap();
        let direct = avx512() && fits;
        assert_eq!(Prepared::new(&g, &vec![0f32; ws.iter().product()]).algo() == Algo::Direct, direct, "{g:?}");
        assert_ne!(Prepared::new(&g, &vec![0f64; ws.iter().product()]).algo(), Algo::Direct, "{g:?}");
        for pool in &pools {
            for epi in [(true, true, Some(Unary::Silu)), (false, false, None), (true, false, Some(Unary::Relu))] {
                pool.install(|| check_f32(&g, (xs, ws), Layout::Nchw, epi));
            }
        }
        let two = ConvGeom { n: 2, ..g };
        assert_ne!(Prepared::new(&two, &vec![0f32; ws.iter().product()]).algo(), Algo::Direct, "{two:?}");
    }
}

#[test]
fn pooled_layers_match_reference() {
    // A convolution with its 2x2 average pooling done piece by piece inside it, against the
    // reference convolution then the pooling's definition: LeNet's two layers (the first by
    // the direct single-channel kernel), odd output sizes (the last row and column have no
    // window), 1x1, and one image that the direct kernel takes in f32 (its output pooled
    // afterwards), in f32 and f64, NCHW and blocked, with and without a residual.
    let d = Conv2dOptions::default();
    let cases = [
        ([6, 1, 28, 28], [5, 1, 3, 3]),
        ([6, 20, 13, 13], [7, 20, 5, 5]),
        ([5, 1, 12, 11], [3, 1, 5, 5]),
        ([4, 6, 7, 9], [5, 6, 1, 1]),
        ([1, 8, 12, 13], [16, 8, 3, 3]),
    ];
    for (xs, ws) in cases {
        let g = ConvGeom::conv2d(&xs, &ws, &d).unwrap();
        let pool = PoolGeom::new("avg_pool2d", &g.small_shape(), &Pool2dOptions::new(2)).unwrap();
        assert!(planned::fuses_pool(&g, &pool), "{g:?}");
        let f32_algo = Prepared::new(&g, &vec![0f32; ws.iter().product()]).algo();
        assert!(g.n > 1 || !avx512() || f32_algo == Algo::Direct, "{g:?}: {f32_algo:?}");
        for (b, residual) in [(1, false), (2, true), (3, false), (4, true)] {
            let layout = if b > 1 { Layout::Blocked(b) } else { Layout::Nchw };
            let [x, w, bv, rv] = operands(&g, xs, ws, 7);
            let res64 = residual.then_some(rv.data());
            let conv = expected(&g, x.data(), w.data(), Some(bv.data()), res64, Some(Unary::Relu));
            let (n, pq, ppq) = (g.n, g.p * g.q, pool.p * pool.q);
            let mut want = vec![0.0; n * g.k * ppq];
            for (plane, out) in want.chunks_exact_mut(ppq).enumerate() {
                for (o, v) in out.iter_mut().enumerate() {
                    let (i, j) = (o / pool.q, o % pool.q);
                    let at = |r: usize, s: usize| conv[plane * pq + (2 * i + r) * g.q + 2 * j + s];
                    *v = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) / 4.0;
                }
            }
            // f64 to the last bits, f32 within rounding.
            let xl = to(layout, x.data(), n, g.c, g.h * g.w);
            let rl = res64.map(|r| to(layout, r, n, g.k, pq));
            let mut y = vec![f64::NAN; want.len()];
            let epi = Epilogue { bias: Some(bv.data()), residual: rl.as_deref(), act: Some(Unary::Relu) };
            planned::forward_pool_into(&g, layout, &xl, &Prepared::new(&g, w.data()), epi, &pool, &mut y);
            let got = from(layout, &y, n, g.k, ppq);
            for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                assert!((a - e).abs() <= 1e-12 * (1.0 + e.abs()), "f64 [{i}] {a} vs {e} ({g:?}, {layout:?}, residual {residual})");
            }
            let f = |t: &[f64]| t.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let (wf, bf, rf) = (f(w.data()), f(bv.data()), rl.as_deref().map(f));
            let mut y = vec![f32::NAN; want.len()];
            let epi = Epilogue { bias: Some(&bf[..]), residual: rf.as_deref(), act: Some(Unary::Relu) };
            planned::forward_pool_into(&g, layout, &f(&xl), &Prepared::new(&g, &wf), epi, &pool, &mut y);
            let got = from(layout, &y.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, g.k, ppq);
            for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "f32 [{i}] {a} vs {e} ({g:?}, {layout:?}, residual {residual})");
            }
        }
    }
}

#[test]
fn f32_depthwise_stride_2_layers_match_reference() {
    // Depthwise layers of stride 2 into rows of 24 outputs or more run plane by plane through
    // the AVX-512 kernel (where the CPU has it) in both layouts, with every epilogue: MobileNet's
    // 3x3 and EfficientNet's 5x5 downsampling, "same" padding, blocks of two images.
    let d = Conv2dOptions::default().stride(2).padding(Padding::Same);
    for (xs, ws) in [([2, 16, 49, 52], [16, 1, 3, 3]), ([3, 8, 60, 57], [8, 1, 5, 5])] {
        let g = ConvGeom::conv2d(&xs, &ws, &d.groups(xs[1])).unwrap();
        assert_eq!(Algo::choose(&g), Algo::Depthwise);
        for layout in [Layout::Nchw, Layout::Blocked(2)] {
            for epi in [(true, true, Some(Unary::Silu)), (false, false, None), (true, false, Some(Unary::Relu6))] {
                check_f32(&g, (xs, ws), layout, epi);
            }
        }
    }
}

#[test]
fn grouped_layers_take_the_grouped_kernel() {
    // Grouped f32 layers of 2 to 64 channels a group in a plan, any batch, stride 1 or 2, run
    // the grouped kernel (where the CPU has AVX-512F or AVX2): RegNet's groups of 8 strided and not,
    // 6 filters a group (a tile's last channels unused), 32 filters a group of 16 channels
    // under a 5x5 window, padding only below and left, a grouped 1x1 layer, and a batch of
    // three, strided and not. Dilated, depthwise and f64 layers are not.
    let d = Conv2dOptions::default();
    let uneven = Padding::Explicit { top: 0, bottom: 2, left: 1, right: 0 };
    let cases = [
        ([1, 48, 23, 21], [48, 8, 3, 3], d.groups(6).stride(2).padding(Padding::uniform(1)), true),
        ([1, 104, 14, 14], [104, 8, 3, 3], d.groups(13).padding(Padding::Same), true),
        ([1, 40, 9, 11], [60, 4, 3, 3], d.groups(10), true),
        ([1, 32, 12, 13], [64, 16, 5, 5], d.groups(2).stride(2).padding(Padding::uniform(2)), true),
        ([1, 24, 7, 7], [24, 8, 3, 3], d.groups(3).padding(uneven), true),
        ([1, 12, 8, 8], [12, 3, 1, 1], d.groups(4), true),
        ([3, 16, 10, 9], [32, 8, 3, 3], d.groups(2), true),
        ([3, 16, 10, 9], [32, 8, 3, 3], d.groups(2).stride(2), true),
        ([1, 16, 10, 10], [16, 8, 3, 3], d.groups(2).dilation(2), false),
        ([1, 16, 10, 10], [16, 1, 3, 3], d.groups(16), false),
    ];
    let pools = [1, 2, 3].map(|threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap());
    for (xs, ws, o, fits) in cases {
        let g = ConvGeom::conv2d(&xs, &ws, &o).unwrap();
        let grouped = grouped_kernel() && fits;
        assert_eq!(Prepared::new(&g, &vec![0f32; ws.iter().product()]).algo() == Algo::Grouped, grouped, "{g:?}");
        assert_ne!(Prepared::new(&g, &vec![0f64; ws.iter().product()]).algo(), Algo::Grouped, "{g:?}");
        for pool in &pools {
            for epi in [(true, true, Some(Unary::Relu)), (false, false, None), (true, false, Some(Unary::Silu))] {
                pool.install(|| check_f32(&g, (xs, ws), Layout::Nchw, epi));
            }
        }
    }
}
