//! Masks and running counts as position encodings write them (EdgeNeXt's and DETR's sine
//! encodings: `~zeros(b, h, w).bool()`, then `cumsum`), and Slice with steps (`pos[..., 0::2]`).

use stride_autograd::{no_grad, Tensor, Var};
use stride_nn::{Ctx, Module};
use stride_onnx::proto::{AttributeProto, ModelProto, NodeProto};

mod common;
use common::{ints, model, node};

fn int_attr(n: &mut NodeProto, name: &str, v: i64) {
    n.attribute.push(AttributeProto { name: Some(name.into()), r#type: Some(2), i: Some(v), ..Default::default() });
}

fn cast(input: &str, output: &str, to: i64) -> NodeProto {
    let mut n = node("Cast", &[input], output);
    int_attr(&mut n, "to", to);
    n
}

fn run(m: &ModelProto, x: &Tensor<f32>) -> Tensor<f32> {
    let mut net = stride_onnx::import(m).unwrap_or_else(|e| panic!("{e}")).network;
    no_grad(|| net.forward(&Var::constant(x.clone()), &mut Ctx::eval())).unwrap().value()
}

fn input(dims: &[usize]) -> Tensor<f32> {
    let n = dims.iter().product::<usize>();
    Tensor::from_vec((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), dims).unwrap()
}

/// The mask of ones over [N, H, W] of the input (a shape known only as the network runs),
/// counted along H (inclusive) and along W (exclusive, from the end), the sum projected to each
/// channel by a 1x1 convolution (weights 1 and 2, as EdgeNeXt projects its encoding) and added:
/// y[n, c, h, w] = x + (c + 1) * ((h + 1) + (W - 1 - w)). Eagerly and through a compiled plan,
/// where the encoding, computed from the input's shape alone, is a constant.
#[test]
fn a_mask_of_a_computed_shape_is_cast_negated_and_counted() {
    let mut fill = node("ConstantOfShape", &["nhw"], "zeros");
    fill.attribute.push(AttributeProto {
        name: Some("value".into()),
        r#type: Some(4),
        t: Some(common::floats("v", &[1], &[0.0])),
        ..Default::default()
    });
    let mut along_w = node("CumSum", &["ones", "two"], "count_w");
    int_attr(&mut along_w, "exclusive", 1);
    int_attr(&mut along_w, "reverse", 1);
    let nodes = vec![
        node("Shape", &["x"], "shape"),
        node("Gather", &["shape", "which"], "nhw"),
        fill,
        cast("zeros", "mask", 9),
        node("Not", &["mask"], "not_mask"),
        cast("not_mask", "ones", 1),
        node("CumSum", &["ones", "one"], "count_h"),
        along_w,
        node("Add", &["count_h", "count_w"], "counts"),
        node("Unsqueeze", &["counts", "one_axis"], "one_channel"),
        node("Conv", &["one_channel", "project"], "per_channel"),
        node("Add", &["x", "per_channel"], "y"),
    ];
    let consts = vec![
        ints("which", &[3], &[0, 2, 3]),
        ints("one", &[], &[1]),
        ints("two", &[], &[2]),
        ints("one_axis", &[1], &[1]),
        common::floats("project", &[2, 1, 1, 1], &[1.0, 2.0]),
    ];
    let m = model(nodes, consts, &[-1, 2, 3, 4], &[-1, 2, 3, 4]);
    for dims in [[1, 2, 3, 4], [3, 2, 5, 2]] {
        let x = input(&dims);
        let check = |y: &Tensor<f32>, how: &str| {
            assert_eq!(y.shape(), dims, "{how}");
            let (ch, h, w) = (dims[1], dims[2], dims[3]);
            for (i, (&got, &xv)) in y.data().iter().zip(x.data()).enumerate() {
                let (k, r, c) = ((i / (h * w)) % ch, (i / w) % h, i % w);
                let want = xv + (k + 1) as f32 * ((r + 1) as f32 + (w - 1 - c) as f32);
                assert!((got - want).abs() < 1e-5, "{how}, {dims:?} at {i}: {got} against {want}");
            }
        };
        check(&run(&m, &x), "eager");
        let mut net = stride_onnx::import(&m).unwrap().network;
        let mut plan = stride_nn::planned::compile(&mut net, &x).unwrap_or_else(|e| panic!("the planner refused it: {e}"));
        check(&plan.run(&x).unwrap(), "planned");
    }
}

/// The same of a shape known when the file is read: worked out then (a boolean constant
/// negated, cast back to floats).
#[test]
fn a_constant_mask_is_cast_and_negated_on_reading() {
    let nodes = vec![
        cast("zeros", "mask", 9),
        node("Not", &["mask"], "not_mask"),
        cast("not_mask", "ones", 1),
        node("CumSum", &["ones", "last"], "count"),
        node("Add", &["x", "count"], "y"),
    ];
    let m = model(nodes, vec![common::floats("zeros", &[3], &[0.0, 2.0, 0.0]), ints("last", &[1], &[-1])], &[2, 3], &[2, 3]);
    let x = input(&[2, 3]);
    let y = run(&m, &x);
    // Not of [false, true, false] is [1, 0, 1]; its running sum [1, 1, 2].
    for (i, (&got, &xv)) in y.data().iter().zip(x.data()).enumerate() {
        let want = xv + [1.0, 1.0, 2.0][i % 3];
        assert!((got - want).abs() < 1e-6, "at {i}: {got} against {want}");
    }
}

/// Every second and every third entry along the last axis (`x[..., 0::2]`, `x[..., 1::3]`),
/// where the step divides the slice and where it does not, and on two axes at once.
#[test]
fn slices_with_steps_take_every_kth_entry() {
    for (len, start, step) in [(8, 0, 2), (7, 0, 2), (7, 1, 3), (5, 4, 2), (6, 0, 9)] {
        let m = model(
            vec![node("Slice", &["x", "starts", "ends", "axes", "steps"], "y")],
            vec![ints("starts", &[1], &[start]), ints("ends", &[1], &[i64::MAX]), ints("axes", &[1], &[-1]), ints("steps", &[1], &[step])],
            &[2, 3, len],
            &[-1, -1, -1],
        );
        let x = input(&[2, 3, len as usize]);
        let y = run(&m, &x);
        let kept: Vec<usize> = (start as usize..len as usize).step_by(step as usize).collect();
        assert_eq!(y.shape(), [2, 3, kept.len()], "len {len} from {start} by {step}");
        let want: Vec<f32> = x.data().chunks(len as usize).flat_map(|row| kept.iter().map(|&k| row[k])).collect();
        assert_eq!(y.data(), want, "len {len} from {start} by {step}");
    }
    let m = model(
        vec![node("Slice", &["x", "starts", "ends", "axes", "steps"], "y")],
        vec![ints("starts", &[2], &[1, 0]), ints("ends", &[2], &[5, 4]), ints("axes", &[2], &[1, 2]), ints("steps", &[2], &[2, 3])],
        &[1, 5, 4],
        &[1, 2, 2],
    );
    let x = input(&[1, 5, 4]);
    let y = run(&m, &x);
    let want: Vec<f32> = [1usize, 3].iter().flat_map(|&r| [0usize, 3].map(|c| x.data()[r * 4 + c])).collect();
    assert_eq!((y.shape(), y.data()), (&[1usize, 2, 2][..], &want[..]));
}

#[test]
fn what_stride_cannot_do_is_refused_with_the_node() {
    let refused = |nodes: Vec<NodeProto>, consts| match stride_onnx::import(&model(nodes, consts, &[2, 3], &[2, 3])) {
        Ok(_) => panic!("imported"),
        Err(e) => e.to_string(),
    };
    let e = refused(vec![node("Not", &["x"], "y")], vec![]);
    assert!(e.contains("node 'y' (Not") && e.contains("Stride negates booleans known when the file is read"), "{e}");
    let e = refused(
        vec![node("Slice", &["x", "s", "e", "a", "st"], "y")],
        vec![ints("s", &[1], &[2]), ints("e", &[1], &[0]), ints("a", &[1], &[1]), ints("st", &[1], &[-1])],
    );
    assert!(e.contains("steps [-1] for 1 axes") && e.contains("Stride slices forwards"), "{e}");
    let e = refused(vec![node("CumSum", &["x", "ax"], "y")], vec![ints("ax", &[2], &[0, 1])]);
    assert!(e.contains("CumSum's axis is [0, 1]"), "{e}");
    // An axis too long for the running-sum matrix is refused as the network runs.
    let m = model(vec![node("CumSum", &["x", "ax"], "y")], vec![ints("ax", &[], &[1])], &[1, 5000], &[1, 5000]);
    let mut net = stride_onnx::import(&m).unwrap().network;
    let e = no_grad(|| net.forward(&Var::constant(Tensor::zeros(&[1, 5000]).unwrap()), &mut Ctx::eval())).unwrap_err().to_string();
    assert!(e.contains("5000 entries") && e.contains("at most 4096"), "{e}");
}
