//! Winograd F(4x4, 3x3) against the naive reference: forward (with and without bias) and both
//! gradients, over sizes that are and are not multiples of the tile, every padding it
//! takes, batches that split over threads or not, and chunks of several images.

use stride_kernels::conv::{self, reference, Algo, Conv2dOptions, ConvGeom, Padding};
use stride_tensor::{Elem, Rng};

/// Largest |fast - reference| relative to the largest |reference|.
fn rel_err<T: Elem>(fast: &[T], slow: &[T]) -> f64 {
    assert_eq!(fast.len(), slow.len());
    let scale = slow.iter().fold(0.0f64, |m, v| m.max(v.as_f64().abs())).max(1e-30);
    fast.iter().zip(slow).fold(0.0f64, |m, (a, b)| m.max((a.as_f64() - b.as_f64()).abs())) / scale
}

fn check<T: Elem>(x_shape: [usize; 4], k: usize, padding: Padding, tol: f64) {
    let g = ConvGeom::conv2d(&x_shape, &[k, x_shape[1], 3, 3], &Conv2dOptions::default().padding(padding)).unwrap();
    assert_eq!(Algo::choose(&g), Algo::Winograd, "{g:?}");
    let mut rng = Rng::seed(11);
    let x = rng.normal::<T>(&x_shape, 0.0, 1.0).unwrap();
    let w = rng.normal::<T>(&g.weight_shape(), 0.0, 0.2).unwrap();
    let b = rng.normal::<T>(&[k], 0.0, 1.0).unwrap();
    let dy = rng.normal::<T>(&g.small_shape(), 0.0, 1.0).unwrap();
    for bias in [None, Some(b.data())] {
        let e = rel_err(&conv::forward_by(&g, Algo::Winograd, x.data(), w.data(), bias), &reference::forward(&g, x.data(), w.data(), bias));
        assert!(e <= tol, "forward {x_shape:?} k {k} {padding:?} bias {}: relative error {e:e}", bias.is_some());
    }
    let e = rel_err(&conv::backward_data_by(&g, Algo::Winograd, dy.data(), w.data()), &reference::backward_data(&g, dy.data(), w.data()));
    assert!(e <= tol, "backward_data {x_shape:?} k {k} {padding:?}: relative error {e:e}");
    let e = rel_err(&conv::backward_filter_by(&g, Algo::Winograd, x.data(), dy.data()), &reference::backward_filter(&g, x.data(), dy.data()));
    assert!(e <= tol, "backward_filter {x_shape:?} k {k} {padding:?}: relative error {e:e}");
}

const PADDINGS: [Padding; 4] = [
    Padding::Valid,
    Padding::Same,
    Padding::Explicit { top: 2, bottom: 0, left: 1, right: 2 },
    Padding::Explicit { top: 0, bottom: 1, left: 2, right: 0 },
];

#[test]
fn matches_reference_in_f64() {
    // 1 image (products split over threads), 3 and 5 (split by image, unevenly), output
    // sizes that are and are not whole tiles, rows that are and are not whole quads.
    for (n, h, w) in [(1, 10, 10), (1, 12, 9), (3, 11, 17), (2, 14, 12), (5, 13, 10), (3, 9, 16), (1, 8, 8), (2, 6, 8)] {
        for padding in PADDINGS {
            check::<f64>([n, 16, h, w], 17, padding, 1e-12);
        }
    }
    // One tile per plane (ResNet's last stage): rows of a single quad.
    check::<f64>([3, 16, 4, 4], 17, Padding::Same, 1e-12);
}

#[test]
fn matches_reference_in_f32_over_many_chunks() {
    // 40 images of 3x3 tiles: each thread's group spans several chunks of whole images.
    check::<f32>([40, 16, 10, 11], 16, Padding::Same, 1e-5);
    // Wide channels, as ResNet's: the error stays at a few float roundings.
    check::<f32>([2, 64, 14, 14], 64, Padding::uniform(1), 1e-5);
    // Past 256 x 256 channels the filter gradient sums the whole batch in one share. The
    // transforms' constants (up to 8 and 1/24) amplify f32 rounding over long sums; in f64
    // the same code is exact to 1e-12 (above), so this bound is about rounding alone.
    check::<f32>([3, 260, 5, 4], 257, Padding::Same, 1e-4);
}

#[test]
fn used_only_where_it_applies() {
    let algo = |x: [usize; 4], w: [usize; 4], o: Conv2dOptions| Algo::choose(&ConvGeom::conv2d(&x, &w, &o).unwrap());
    let same = Conv2dOptions::default().padding(Padding::Same);
    assert_eq!(algo([2, 16, 8, 8], [16, 16, 3, 3], same), Algo::Winograd);
    assert_ne!(algo([2, 8, 8, 8], [16, 8, 3, 3], same), Algo::Winograd, "few input channels");
    assert_ne!(algo([2, 16, 8, 8], [16, 16, 3, 3], same.stride(2)), Algo::Winograd, "stride 2");
    assert_ne!(algo([2, 16, 8, 8], [16, 16, 3, 3], same.dilation(2)), Algo::Winograd, "dilation 2");
    assert_ne!(algo([2, 32, 8, 8], [32, 16, 3, 3], same.groups(2)), Algo::Winograd, "groups 2");
    assert_ne!(algo([2, 16, 8, 8], [16, 16, 5, 5], same), Algo::Winograd, "5x5");
    assert_ne!(algo([2, 16, 8, 8], [16, 16, 3, 3], same.padding(Padding::uniform(3))), Algo::Winograd, "padding 3");
    assert_eq!(algo([64, 512, 4, 4], [512, 512, 3, 3], same), Algo::Winograd, "4x4 maps");
    assert_ne!(algo([64, 512, 3, 3], [512, 512, 3, 3], same), Algo::Winograd, "3x3 maps");
}

#[test]
fn a_call_too_small_to_repay_the_filter_transform_takes_another_algorithm() {
    use conv::Pass::{Data, Filter, Forward};
    let same = Conv2dOptions::default().padding(Padding::Same);
    let passes = |n: usize, c: usize, hw: usize| {
        let g = ConvGeom::conv2d(&[n, c, hw, hw], &[c, c, 3, 3], &same).unwrap();
        assert_eq!(Algo::choose(&g), Algo::Winograd, "{g:?}");
        [Forward, Data, Filter].map(|pass| Algo::for_pass(&g, pass))
    };
    // ResNet-18's last stage at batch 32 (one tile per image): Winograd forward, taps for both
    // gradients; at 128 images everything is Winograd again; one image is lowered to columns.
    assert_eq!(passes(32, 512, 4), [Algo::Winograd, Algo::Taps, Algo::Taps]);
    assert_eq!(passes(128, 512, 4), [Algo::Winograd; 3]);
    assert_eq!(passes(1, 512, 4), [Algo::Im2col; 3]);
    // 8x8 maps: taps do not apply (too few products with padding), so im2col below ~20 tiles.
    assert_eq!(passes(1, 256, 8), [Algo::Im2col; 3]);
    assert_eq!(passes(32, 256, 8), [Algo::Winograd; 3]);
    assert_eq!(passes(1, 64, 32), [Algo::Winograd; 3], "64 tiles in one image");

    // Whatever a pass takes, it computes the convolution.
    for n in [1, 6, 40] {
        let g = ConvGeom::conv2d(&[n, 32, 4, 4], &[24, 32, 3, 3], &same).unwrap();
        let mut rng = Rng::seed(5);
        let x = rng.normal::<f32>(&[n, 32, 4, 4], 0.0, 1.0).unwrap();
        let w = rng.normal::<f32>(&g.weight_shape(), 0.0, 0.2).unwrap();
        let dy = rng.normal::<f32>(&g.small_shape(), 0.0, 1.0).unwrap();
        let what = |pass| format!("n {n} {pass:?} by {:?}", Algo::for_pass(&g, pass));
        let e = rel_err(&conv::forward(&g, x.data(), w.data(), None), &reference::forward(&g, x.data(), w.data(), None));
        assert!(e <= 1e-5, "{}: {e:e}", what(Forward));
        let e = rel_err(&conv::backward_data(&g, dy.data(), w.data()), &reference::backward_data(&g, dy.data(), w.data()));
        assert!(e <= 1e-5, "{}: {e:e}", what(Data));
        let e = rel_err(&conv::backward_filter(&g, x.data(), dy.data()), &reference::backward_filter(&g, x.data(), dy.data()));
        assert!(e <= 1e-5, "{}: {e:e}", what(Filter));
    }
}
