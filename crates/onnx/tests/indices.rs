//! Gather of the data flowing through by integers the graph computes from its batch (Range,
//! Mul, Unsqueeze, Add: how PyTorch's newer exporter writes `as_strided`), forward, backward and
//! planned, at batches other than the exported one; and what such graphs (and Expand) may not
//! ask for.

use stride_autograd::{no_grad, Tensor, Var};
use stride_nn::{Ctx, Module};
use stride_onnx::proto::{AttributeProto, ModelProto};

mod common;
use common::{ints, model, node};

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), i: Some(v), r#type: Some(2), ..Default::default() }
}

/// x [N, 2, 3] to y [N, 6]: each image's six values in reverse, gathered from the flattened
/// batch by Range(0, N) * 6 + [5, 4, 3, 2, 1, 0].
fn reverse_each_image() -> ModelProto {
    let mut shape = node("Shape", &["x"], "s");
    shape.attribute = vec![int_attr("start", 0), int_attr("end", 1)];
    let nodes = vec![
        shape,
        node("Squeeze", &["s", "zero_axis"], "n"),
        node("Reshape", &["x", "flat_shape"], "flat"),
        node("Range", &["zero", "n", "one"], "r"),
        node("Mul", &["r", "six"], "m"),
        node("Unsqueeze", &["m", "one_axis"], "u"),
        node("Add", &["u", "offsets"], "idx"),
        node("Gather", &["flat", "idx"], "y"),
    ];
    let init = vec![
        ints("zero_axis", &[1], &[0]),
        ints("one_axis", &[1], &[1]),
        ints("flat_shape", &[1], &[-1]),
        ints("zero", &[], &[0]),
        ints("one", &[], &[1]),
        ints("six", &[], &[6]),
        ints("offsets", &[1, 6], &[5, 4, 3, 2, 1, 0]),
    ];
    model(nodes, init, &[-1, 2, 3], &[-1, 6])
}

#[test]
fn indices_computed_from_the_batch_follow_it_forward_backward_and_planned() {
    let mut net = stride_onnx::import(&reverse_each_image()).unwrap().network;
    for n in [1, 2, 5] {
        let data: Vec<f32> = (0..n * 6).map(|i| i as f32 * 0.5 - 3.0).collect();
        let x = Tensor::from_vec(data.clone(), &[n, 2, 3]).unwrap();
        let want: Vec<f32> = data.chunks(6).flat_map(|c| c.iter().rev().copied()).collect();
        let y = no_grad(|| net.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap().value();
        assert_eq!((y.shape(), y.data()), (&[n, 6][..], &want[..]), "batch of {n}");
        // The gradient goes back to where each value came from.
        let xv = Var::parameter(x.clone());
        let w: Vec<f32> = (0..n * 6).map(|i| i as f32 + 1.0).collect();
        net.forward(&xv, &mut Ctx::train(0)).unwrap().backward_with(Tensor::from_vec(w.clone(), &[n, 6]).unwrap()).unwrap();
        let g = xv.grad().unwrap();
        let want_g: Vec<f32> = w.chunks(6).flat_map(|c| c.iter().rev().copied()).collect();
        assert_eq!((g.shape(), g.data()), (&[n, 2, 3][..], &want_g[..]), "gradient, batch of {n}");
        let mut plan = stride_nn::planned::compile(&mut net, &x).unwrap();
        assert_eq!(plan.run(&x).unwrap().data(), &want[..], "planned, batch of {n}");
    }
}

#[test]
fn indices_out_of_range_and_unbounded_ranges_are_clear_errors() {
    // Constant indices beyond the axis: refused when the network runs, naming them.
    let m = model(vec![node("Gather", &["x", "idx"], "y")], vec![ints("idx", &[2], &[0, 7])], &[-1, 3], &[2, 3]);
    let mut net = stride_onnx::import(&m).unwrap().network;
    let e = no_grad(|| net.forward(&Var::constant(Tensor::<f32>::zeros(&[4, 3]).unwrap()), &mut Ctx::eval())).unwrap_err().to_string();
    assert!(e.contains("index 7") && e.contains("4 long"), "{e}");
    // A constant Range of 2^40 values: refused on import, before anything is made.
    let m = model(
        vec![node("Range", &["zero", "big", "one"], "r"), node("Gather", &["x", "r"], "y")],
        vec![ints("zero", &[], &[0]), ints("big", &[], &[1 << 40]), ints("one", &[], &[1])],
        &[-1, 3],
        &[-1, 3],
    );
    let e = stride_onnx::import(&m).err().unwrap().to_string();
    assert!(e.contains("Range") && e.contains("1099511627776"), "{e}");
    // Range over floats, and Squeeze of computed indices without axes.
    let m = model(
        vec![node("Range", &["half", "two", "one"], "r"), node("Gather", &["x", "r"], "y")],
        vec![stride_onnx::to_tensor_proto("half", &Tensor::scalar(0.5)), ints("two", &[], &[2]), ints("one", &[], &[1])],
        &[-1, 3],
        &[-1, 3],
    );
    let e = stride_onnx::import(&m).err().unwrap().to_string();
    assert!(e.contains("start 'half' is float data"), "{e}");
    let mut shape = node("Shape", &["x"], "s");
    shape.attribute = vec![int_attr("start", 0), int_attr("end", 1)];
    let m = model(
        vec![shape, node("Range", &["zero", "s", "one"], "r"), node("Squeeze", &["r"], "q"), node("Gather", &["x", "q"], "y")],
        vec![ints("zero", &[], &[0]), ints("one", &[], &[1])],
        &[-1, 3],
        &[-1, 3],
    );
    let e = stride_onnx::import(&m).err().unwrap().to_string();
    assert!(e.contains("Squeeze without axes"), "{e}");
    // Expand to 3 x 2^26 values from a value of 3: refused when the network runs, before the
    // values are made; to the input's own size, fine.
    for (shape, ok) in [([1i64 << 13, 1 << 13, 3], false), ([1, 4, 3], true)] {
        let m = model(vec![node("Expand", &["x", "shape"], "y")], vec![ints("shape", &[3], &shape)], &[-1, 3], &[-1, 3]);
        let mut net = stride_onnx::import(&m).unwrap().network;
        let y = no_grad(|| net.forward(&Var::constant(Tensor::<f32>::zeros(&[1, 3]).unwrap()), &mut Ctx::eval()));
        match (y, ok) {
            (Ok(y), true) => assert_eq!(y.shape(), [1, 4, 3]),
            (Err(e), false) => assert!(e.to_string().contains("[8192, 8192, 3] (201326592 values) is larger than any value"), "{e}"),
            (y, _) => panic!("Expand to {shape:?}: {:?}", y.map(|v| v.shape())),
        }
    }
}

/// Integers computed from a value's shape, cast to float, as data (attention's scale, 1 / sqrt of
/// the head size, as the TorchScript exporter writes it): worked out as the network runs.
#[test]
fn dimensions_cast_to_float_are_data() {
    let mut shape = node("Shape", &["x"], "s");
    shape.attribute = vec![int_attr("start", -1)];
    let mut cast = node("Cast", &["s"], "f");
    cast.attribute = vec![int_attr("to", 1)];
    let nodes = vec![shape, cast, node("Sqrt", &["f"], "r"), node("Div", &["x", "r"], "y")];
    for width in [4usize, 9] {
        let m = model(nodes.clone(), vec![], &[-1, width as i64], &[-1, width as i64]);
        let mut net = stride_onnx::import(&m).unwrap_or_else(|e| panic!("{e}")).network;
        let x = Tensor::from_vec((0..2 * width).map(|i| i as f32).collect(), &[2, width]).unwrap();
        let y = no_grad(|| net.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap().value();
        let scale = (width as f32).sqrt();
        assert!(y.data().iter().zip(x.data()).all(|(a, b)| (a - b / scale).abs() < 1e-6), "width {width}: {:?}", y.data());
    }
    let mut cast = node("Cast", &["s"], "f");
    cast.attribute = vec![int_attr("to", 11)];
    let e = stride_onnx::import(&model(vec![node("Shape", &["x"], "s"), cast, node("Relu", &["x"], "y")], vec![], &[-1, 3], &[-1, 3]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("Cast of integers to double"), "{e}");
}

/// Bounds computed with Mod, as a window attention pads to whole windows (`(w - h % w) % w`):
/// H cropped to a whole number of 4-row windows (H - H % 4), and W to W + (-W mod 3) - 3, where
/// Mod's two rules differ: the divisor's sign (fmod 0, Python's %) gives 2 for -7 mod 3, the
/// dividend's (fmod 1) -1.
#[test]
fn bounds_computed_with_mod_follow_both_of_its_rules() {
    for (fmod, w_end) in [(0, 6), (1, 3)] {
        let mut h = node("Shape", &["x"], "h");
        h.attribute = vec![int_attr("start", 2), int_attr("end", 3)];
        let mut w = node("Shape", &["x"], "w");
        w.attribute = vec![int_attr("start", 3), int_attr("end", 4)];
        let mut h_mod = node("Mod", &["h", "four"], "h_mod");
        h_mod.attribute = vec![int_attr("fmod", fmod)];
        let mut w_mod = node("Mod", &["minus_w", "three"], "w_mod");
        w_mod.attribute = vec![int_attr("fmod", fmod)];
        let mut ends = node("Concat", &["h_end", "w_end"], "ends");
        ends.attribute = vec![int_attr("axis", 0)];
        let nodes = vec![
            h,
            w,
            h_mod,
            node("Sub", &["h", "h_mod"], "h_end"),
            node("Sub", &["zero", "w"], "minus_w"),
            w_mod,
            node("Add", &["w", "w_mod"], "w_wide"),
            node("Sub", &["w_wide", "three"], "w_end"),
            ends,
            node("Slice", &["x", "starts", "ends", "axes"], "y"),
        ];
        let init = vec![
            ints("four", &[1], &[4]),
            ints("three", &[1], &[3]),
            ints("zero", &[1], &[0]),
            ints("starts", &[2], &[0, 0]),
            ints("axes", &[2], &[2, 3]),
        ];
        let m = model(nodes, init, &[-1, 1, 10, 7], &[-1, 1, -1, -1]);
        let mut net = stride_onnx::import(&m).unwrap_or_else(|e| panic!("fmod {fmod}: {e}")).network;
        let x = Tensor::from_vec((0..140).map(|v| v as f32).collect(), &[2, 1, 10, 7]).unwrap();
        let y = no_grad(|| net.forward(&Var::constant(x), &mut Ctx::eval())).unwrap().value();
        assert_eq!(y.shape(), [2, 1, 8, w_end], "fmod {fmod}");
        assert_eq!(y.data()[..w_end], (0..w_end).map(|v| v as f32).collect::<Vec<_>>()[..], "fmod {fmod}");
    }
}
