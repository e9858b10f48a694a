//! Bad input gets an error that names the op and the values, never a panic.

use stride_autograd::Result;
use stride_autograd::*;

fn zeros(shape: &[usize]) -> Var<f32> {
    Var::constant(Tensor::zeros(shape).unwrap())
}

fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn conv2d_errors_name_the_values() {
    let o = Conv2dOptions::default();
    let e = err(conv2d(&zeros(&[1, 50, 8, 8]), &zeros(&[20, 20, 3, 3]), None, &o));
    assert_eq!(e, "conv2d: input has 50 channels but the weight expects 20 (weight [20, 20, 3, 3], groups 1)");
    let e = err(conv2d(&zeros(&[1, 3, 4, 4]), &zeros(&[8, 3, 5, 5]), None, &o));
    assert_eq!(e, "conv2d: kernel 5 is larger than the padded input 4 along height (input 4 + padding 0+0)");
    let e = err(conv2d(&zeros(&[1, 6, 8, 8]), &zeros(&[4, 2, 3, 3]), None, &o.groups(4)));
    assert!(e.contains("groups 4 must divide both the input channels 6 and the output channels 4"), "{e}");
    assert!(err(conv2d(&zeros(&[1, 3, 8, 8]), &zeros(&[4, 3, 3, 3]), None, &o.stride(0))).contains("stride must be at least 1"));
    assert!(err(conv2d(&zeros(&[1, 3, 8, 8]), &zeros(&[4, 3, 3, 3]), None, &o.dilation(0))).contains("dilation must be at least 1"));
    assert!(err(conv2d(&zeros(&[3, 8, 8]), &zeros(&[4, 3, 3, 3]), None, &o)).contains("input must be 4-D, got shape [3, 8, 8]"));
    assert!(err(conv2d(&zeros(&[1, 3, 8, 8]), &zeros(&[4, 3, 3, 3]), Some(&zeros(&[5])), &o)).contains("bias has shape [5], expected [4]"));
    let e = err(conv2d(&zeros(&[1, 3, 4, 4]), &zeros(&[4, 3, 3, 3]), None, &o.dilation(2)));
    assert!(e.contains("kernel 3 (dilation 2: effective 5) is larger than the padded input 4"), "{e}");
}

#[test]
fn conv_transpose2d_errors() {
    let o = Conv2dOptions::default();
    assert!(err(conv_transpose2d(&zeros(&[1, 4, 3, 3]), &zeros(&[5, 2, 3, 3]), None, &o)).contains("input has 4 channels but the weight expects 5"));
    assert!(err(conv_transpose2d(&zeros(&[1, 4, 3, 3]), &zeros(&[4, 2, 3, 3]), None, &o.output_padding(1)))
        .contains("output_padding (1, 1) must be smaller than the stride"));
    assert!(err(conv_transpose2d(&zeros(&[1, 4, 1, 1]), &zeros(&[4, 2, 1, 1]), None, &o.padding(Padding::uniform(1)))).contains("would be empty"));
    assert!(
        err(conv_transpose2d(&zeros(&[1, 3, 3, 3]), &zeros(&[3, 2, 3, 3]), None, &o.groups(2))).contains("groups 2 must divide the input channels 3")
    );
}

#[test]
fn pooling_errors() {
    let x = zeros(&[1, 2, 4, 4]);
    assert!(err(max_pool2d(&x, &Pool2dOptions::new(5))).contains("kernel 5 is larger than the padded input 4"));
    assert!(err(max_pool2d(&x, &Pool2dOptions::new(2).padding(Padding::uniform(2)))).contains("at most half the kernel"));
    assert!(err(avg_pool2d(&x, &Pool2dOptions::new(0))).contains("must be at least 1"));
    assert!(err(max_pool2d(&x, &Pool2dOptions::new(2).stride(0))).contains("must be at least 1"));
    assert!(err(lp_pool2d(&x, 0.5, &Pool2dOptions::new(2))).contains("at least 1, got 0.5"));
    assert!(err(adaptive_avg_pool2d(&x, (0, 2))).contains("must be non-zero"));
    assert!(err(channel_max_pool(&x, 3, 1)).contains("depth window 3 is larger than the 2 channels"));
    assert!(err(max_pool2d(&zeros(&[2, 4, 4]), &Pool2dOptions::new(2))).contains("4-D"));
}

#[test]
fn shape_and_loss_errors() {
    let a = zeros(&[2, 3]);
    assert!(err(a.add(&zeros(&[4]))).contains("do not broadcast"));
    assert!(err(a.reshape(&[4])).contains("cannot reshape [2, 3] (6 elements) to [4]"));
    assert!(err(a.permute(&[0, 0])).contains("not a permutation"));
    assert!(err(a.narrow(1, 2, 2)).contains("outside axis 1 of size 3"));
    assert!(err(a.matmul(&zeros(&[2, 3]))).contains("inner dimensions differ"));
    assert!(err(linear(&a, &zeros(&[4, 5]), None)).contains("input has 3 features but the weight expects 5"));
    assert!(err(cross_entropy(&a, &[0, 3], 0.0)).contains("target 3 at position 1 is not a class index below 3"));
    assert!(err(cross_entropy(&a, &[0], 0.0)).contains("1 targets for a batch of 2"));
    assert!(err(weighted_cross_entropy(&a, &[0, 1], &[1.0, 2.0], 0.0)).contains("2 class weights for 3 classes"));
    assert!(err(weighted_cross_entropy(&a, &[0, 1], &[1.0, -2.0, 1.0], 0.0)).contains("class 1's weight -2 is not a finite number >= 0"));
    assert!(err(weighted_cross_entropy(&a, &[0, 0], &[0.0, 1.0, 1.0], 0.0)).contains("the batch's classes all have weight 0"));
    assert!(err(mse_loss(&a, &zeros(&[3, 2]), Reduction::Mean)).contains("prediction has shape [2, 3] but the target has [3, 2]"));
    assert!(err(concat(&[&a, &zeros(&[3, 3])], 1)).contains("does not match"));
    assert!(err(a.sum_all().and_then(|s| s.backward())).contains("does not depend on any parameter"));
    let p = Var::parameter(Tensor::<f32>::zeros(&[2]).unwrap());
    assert!(err(p.mul(&p).and_then(|v| v.backward())).contains("needs a scalar"));
    let (mut rm, mut rv) = (Tensor::zeros(&[3]).unwrap(), Tensor::ones(&[3]).unwrap());
    let e = err(batch_norm(&zeros(&[2, 4, 2, 2]), &zeros(&[3]), &zeros(&[3]), &mut rm, &mut rv, true, BatchNormOptions::default()));
    assert!(e.contains("weight has shape [3] but the input has 4 channels"), "{e}");
    assert!(err(batch_norm(&zeros(&[1, 3]), &zeros(&[3]), &zeros(&[3]), &mut rm, &mut rv, true, BatchNormOptions::default()))
        .contains("more than one value per channel"));
    assert!(err(dropout(&a, 1.5, true, &mut Rng::seed(0))).contains("probability must be in [0, 1]"));
}

#[test]
fn huge_shapes_are_errors_not_allocations() {
    let e = Tensor::<f32>::zeros(&[1 << 20, 1 << 20, 1 << 20]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge);
    let e = Tensor::<f32>::zeros(&[usize::MAX, 2]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge);
    // A convolution whose output would be enormous is refused before allocating.
    let o = Conv2dOptions::default().padding(Padding::uniform(1 << 20));
    let e = err(conv2d(&zeros(&[1, 1, 1, 1]), &zeros(&[1 << 12, 1, 1, 1]), None, &o));
    assert!(e.contains("elements"), "{e}");
}
