//! Feature-map and filter grids, and Grad-CAM against the class activation map it reduces to
//! when global average pooling feeds the classifier.

use stride_autograd::{Conv2dOptions, Rng, Tensor, Unary, Var};
use stride_nn::blocks::OtherPool;
use stride_nn::layers::{Activation, Conv2d, Flatten, Linear, Sequential};
use stride_train::visual;

/// conv(1 -> 3, 3x3) -> relu -> global average pool -> flatten -> linear(3 -> 2).
fn gap_net() -> Sequential {
    let mut rng = Rng::seed(7);
    Sequential::new()
        .push(Conv2d::new(&mut rng, 1, 3, 3, Conv2dOptions::default(), true).unwrap())
        .push(Activation(Unary::Relu))
        .push(OtherPool::GlobalAvg)
        .push(Flatten)
        .push(Linear::new(&mut rng, 3, 2, true).unwrap())
}

#[test]
fn grad_cam_equals_the_class_activation_map_under_global_pooling() {
    let mut m = gap_net();
    let x = Var::constant(Rng::seed(1).normal(&[1, 1, 8, 8], 0.0, 1.0).unwrap());
    let (trace, y, err) = visual::traced(&mut m, &x);
    assert!(err.is_none());
    let y = y.unwrap();
    let a = trace.output(1).unwrap().value(); // relu maps [1, 3, 6, 6]
    let w = m.layers[4].parameters()[0].value(); // [2, 3]
    for class in 0..2 {
        let score = y.narrow(1, class, 1).unwrap().sum_all().unwrap();
        let cam = visual::grad_cam(&score, trace.output(1).unwrap()).unwrap();
        // d score / d A_k(i, j) = w[class, k] / 36, so Grad-CAM = relu(sum_k w[class, k] A_k)
        // up to the positive factor, which the scaling to [0, 1] removes.
        let raw: Vec<f32> = (0..36).map(|p| (0..3).map(|k| w.data()[class * 3 + k] * a.data()[k * 36 + p]).sum::<f32>().max(0.0)).collect();
        let top = raw.iter().cloned().fold(0.0, f32::max);
        assert!(top > 0.0, "some evidence for class {class}");
        for (got, want) in cam.iter().zip(&raw) {
            assert!((got - want / top).abs() < 1e-5, "class {class}: {got} vs {}", want / top);
        }
        assert!(cam.contains(&1.0) && cam.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }
}

#[test]
fn a_failing_layer_keeps_the_rows_before_it() {
    let mut m = gap_net().push(Linear::new(&mut Rng::seed(0), 5, 2, true).unwrap());
    let x = Var::constant(Tensor::zeros(&[1, 1, 8, 8]).unwrap());
    let (trace, y, err) = visual::traced(&mut m, &x);
    assert!(y.is_none());
    assert!(err.unwrap().to_string().starts_with("layer 5 (Linear(5, 2))"));
    assert_eq!(trace.rows.len(), 5, "the five layers that ran are traced");
    assert_eq!(trace.find("1"), Ok(1));
    assert!(trace.find("conv9").unwrap_err().contains("the layers are: 0, 1, 2, 3, 4"));
}

#[test]
fn grids_have_the_promised_size_and_show_the_data() {
    // 20 maps of 26x26: 5 columns x 4 rows of tiles enlarged x2 to 52, 2-pixel gaps.
    let maps = Rng::seed(2).normal(&[1, 20, 26, 26], 0.0, 1.0).unwrap();
    let g = visual::feature_grid(&maps, 64).unwrap();
    assert_eq!(g.dimensions(), (5 * 54 + 2, 4 * 54 + 2));
    // Each tile spans the full range (each map is scaled to its own).
    let tile = |i: u32| (0..52).flat_map(move |y| (0..52).map(move |x| (2 + (i % 5) * 54 + x, 2 + (i / 5) * 54 + y)));
    for i in 0..20 {
        let px: Vec<u8> = tile(i).map(|(x, y)| g.get_pixel(x, y).0[0]).collect();
        assert_eq!((px.iter().min(), px.iter().max()), (Some(&0), Some(&255)), "tile {i}");
    }
    // --max-channels limits the tiles.
    assert_eq!(visual::feature_grid(&maps, 4).unwrap().dimensions(), (2 * 54 + 2, 2 * 54 + 2));
    // Colour filters: 3 input channels give coloured tiles of 3x3 taps enlarged x16.
    let w = Rng::seed(3).normal(&[8, 3, 3, 3], 0.0, 1.0).unwrap();
    let f = visual::filter_grid(&w).unwrap();
    assert_eq!(f.dimensions(), (3 * 50 + 2, 3 * 50 + 2));
    assert!(f.pixels().any(|p| p.0[0] != p.0[1] || p.0[1] != p.0[2]), "RGB filters are in colour");
    // A flat map is drawn mid-gray, not as noise.
    let flat = Tensor::from_vec(vec![3.0; 16], &[1, 1, 4, 4]).unwrap();
    assert!(visual::feature_grid(&flat, 1).unwrap().pixels().all(|p| p.0[0] == 128));
    assert!(visual::feature_grid(&Tensor::zeros(&[4, 4]).unwrap(), 1).is_err());
}

#[test]
fn overlay_marks_where_the_heat_is() {
    let base = image::RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
    // Heat only in the top-left cell of a 2x2 map.
    let out = visual::overlay(&base, &[1.0, 0.0, 0.0, 0.0], 2, 2);
    let (hot, cold) = (out.get_pixel(4, 4).0, out.get_pixel(60, 60).0);
    assert!(hot[0] > 180 && hot[2] < 100, "red where the map is 1: {hot:?}");
    assert!(cold[2] > cold[0], "blue where it is 0: {cold:?}");
}

/// Pearson correlation of two equal-length vectors.
fn correlation(a: &[f32], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().map(|&v| v as f64).sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - ma) * (y - mb)).sum();
    let (va, vb) = (a.iter().map(|&x| (x as f64 - ma).powi(2)).sum::<f64>(), b.iter().map(|y| (y - mb).powi(2)).sum::<f64>());
    cov / (va * vb).sqrt()
}

/// On linear layers the ascent's direction is known: the gradient of the channel's mean with
/// respect to the input, the same at every step. The patterns must follow it (the noise they
/// start from is small beside 40 steps), and each channel's activation must rise.
#[test]
fn patterns_climb_along_the_known_gradient_of_linear_layers() {
    let norm = stride_data::Normalize::identity();
    // Logits: class k's pattern is the k-th row of the weights.
    let mut m = Sequential::new().push(Flatten).push(Linear::new(&mut Rng::seed(3), 36, 3, true).unwrap());
    let w = m.layers[1].parameters()[0].value();
    let (p, scores) = visual::patterns(&mut m, "1", &[0, 2], [1, 6, 6], &norm, visual::Ascent::default()).unwrap();
    assert_eq!(p.shape(), [2, 1, 6, 6]);
    for (i, k) in [0usize, 2].into_iter().enumerate() {
        let row: Vec<f64> = w.data()[k * 36..(k + 1) * 36].iter().map(|&v| v as f64).collect();
        let r = correlation(&p.data()[i * 36..(i + 1) * 36], &row);
        assert!(r > 0.99, "class {k}: the pattern correlates {r} with its weights");
        assert!(scores[i].1 > scores[i].0 + 1.0, "class {k}: {:?}", scores[i]);
    }
    // A convolution's channel: d mean / d x[i, j] sums the kernel taps that reach (i, j), over
    // the output positions, divided by their count.
    let mut m = Sequential::new().push(Conv2d::new(&mut Rng::seed(4), 1, 2, 3, Conv2dOptions::default(), false).unwrap());
    let k = m.layers[0].parameters()[0].value(); // [2, 1, 3, 3]
    let (p, _) = visual::patterns(&mut m, "0", &[1], [1, 7, 7], &norm, visual::Ascent::default()).unwrap();
    let mut d = vec![0.0f64; 49];
    for (oy, ox) in (0..5).flat_map(|y| (0..5).map(move |x| (y, x))) {
        for (ky, kx) in (0..3).flat_map(|y| (0..3).map(move |x| (y, x))) {
            d[(oy + ky) * 7 + ox + kx] += k.data()[9 + ky * 3 + kx] as f64 / 25.0;
        }
    }
    let r = correlation(p.data(), &d);
    assert!(r > 0.99, "the conv pattern correlates {r} with the gradient");
    // Bad requests are refused by name.
    for (layer, chans, want) in [("0", vec![2], "layer 0 has 2 channels; there is no channel 2"), ("5", vec![0], "no layer '5'")] {
        let e = visual::patterns(&mut m, layer, &chans, [1, 7, 7], &norm, visual::Ascent::default()).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let e = visual::patterns(&mut m, "0", &[0], [1, 7, 7], &norm, visual::Ascent { steps: 0, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("1..=10000 steps"), "{e}");
    let e = visual::patterns(&mut m, "0", &[0; 16], [1, 4096, 4096], &norm, visual::Ascent::default()).unwrap_err().to_string();
    assert!(e.contains("16 inputs of 1x4096x4096 are more than 16777216 values at once"), "{e}");
    // The parameters are trainable again afterwards, with no gradient left on them.
    assert!(stride_nn::Module::parameters(&mut m).iter().all(|p| p.requires_grad() && p.grad().is_none()));
}

/// Occlusion on a network whose answer is known: class 0's logit is 5 x pixel (0, 0) and class
/// 1's is 0, on an image of ones, so hiding that pixel takes class 0 from sigmoid(5) to 1/2 and
/// hiding any other changes nothing. Each pixel gets the mean fall over the squares covering it.
#[test]
fn occlusion_finds_the_one_pixel_a_class_reads() {
    let mut m = Sequential::new().push(Flatten).push(Linear::new(&mut Rng::seed(1), 16, 2, false).unwrap());
    let mut w = vec![0.0f32; 32];
    w[0] = 5.0;
    m.layers[1].parameters()[0].set_value(Tensor::from_vec(w, &[2, 16]).unwrap()).unwrap();
    let x = Tensor::from_vec(vec![1.0f32; 16], &[1, 1, 4, 4]).unwrap();
    let drop = 1.0 / (1.0 + (-5.0f32).exp()) - 0.5;
    let (fall, base) = visual::occlusion(&mut m, &x, 0, 1, 1).unwrap();
    assert!((base - (drop + 0.5)).abs() < 1e-6);
    assert!((fall[0] - drop).abs() < 1e-6 && fall[1..].iter().all(|&f| f.abs() < 1e-6), "{fall:?}");
    // 2x2 squares, stride 1: (0, 0) is under one square, (0, 1) under two, (1, 1) under four,
    // and only the top-left square hides (0, 0).
    let (fall, _) = visual::occlusion(&mut m, &x, 0, 2, 1).unwrap();
    for (i, want) in [(0, drop), (1, drop / 2.0), (4, drop / 2.0), (5, drop / 4.0), (2, 0.0), (15, 0.0)] {
        assert!((fall[i] - want).abs() < 1e-6, "pixel {i}: {} against {want}", fall[i]);
    }
    for (class, patch, stride, want) in
        [(2, 1, 1, "class 2 of a network with 2 outputs"), (0, 5, 1, "a patch of 1..=4 pixels"), (0, 2, 0, "a stride of at least 1")]
    {
        let e = visual::occlusion(&mut m, &x, class, patch, stride).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}
