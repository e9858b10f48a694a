//! Element-wise arithmetic's own loops (equal shapes, runs, repeating rows, both ways round, on
//! one thread and split over threads) give the general broadcast's results bit for bit.

use proptest::prelude::*;
use stride_kernels::binary::{binary, binary_into, BinOp};
use stride_tensor::{Rng, Tensor};

fn reference(op: BinOp, a: &Tensor<f32>, b: &Tensor<f32>) -> Tensor<f32> {
    a.zip_map(b, "reference", |x, y| match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div => x / y,
    })
    .unwrap()
}

fn same_bits(a: &Tensor<f32>, b: &Tensor<f32>) -> bool {
    a.shape() == b.shape() && a.data().iter().zip(b.data()).all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// An output shape and, per axis, whether the smaller operand keeps it (else 1); `drop` leading
/// axes of the smaller operand are left out altogether, as NumPy allows.
fn shapes() -> impl Strategy<Value = (Vec<usize>, Vec<bool>, usize)> {
    (1usize..5).prop_flat_map(|rank| (prop::collection::vec(1usize..7, rank), prop::collection::vec(any::<bool>(), rank), 0..rank))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn broadcasts_equal_the_general_gather((out, keep, drop) in shapes(), scale in 1usize..3, seed in 0u64..1000) {
        // `scale` multiplies the first axis so some outputs pass the threaded length.
        let mut out = out;
        out[0] *= if scale == 2 { 4096 } else { 1 };
        let small: Vec<usize> = out.iter().zip(&keep).skip(drop).map(|(&d, &k)| if k { d } else { 1 }).collect();
        let mut rng = Rng::seed(seed);
        let full: Tensor<f32> = rng.normal(&out, 0.0, 1.0).unwrap();
        let part: Tensor<f32> = rng.normal(&small, 0.0, 1.0).unwrap().map(|v| if v == 0.0 { 0.5 } else { v });
        for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
            for (a, b) in [(&full, &part), (&part, &full), (&full, &full)] {
                let got = binary(op, a, b).unwrap();
                prop_assert!(same_bits(&got, &reference(op, a, b)), "{:?} {:?} {:?}", op, a.shape(), b.shape());
                // Into memory the caller owns (NaN first, so a value left unwritten shows).
                let mut into = Tensor::from_vec(vec![f32::NAN; got.numel()], got.shape()).unwrap();
                binary_into(op, (a.data(), a.shape()), (b.data(), b.shape()), into.data_mut()).unwrap();
                prop_assert!(same_bits(&into, &got), "into: {:?} {:?} {:?}", op, a.shape(), b.shape());
            }
        }
    }
}

#[test]
fn shapes_that_do_not_broadcast_are_refused_by_name() {
    let a = Tensor::<f32>::zeros(&[2, 3]).unwrap();
    let b = Tensor::<f32>::zeros(&[4]).unwrap();
    let e = binary(BinOp::Mul, &a, &b).unwrap_err().to_string();
    assert!(e.contains("mul") && e.contains("[2, 3]") && e.contains("[4]"), "{e}");
    // Neither operand full-shaped ([2, 1] with [1, 3]): the general path.
    let (c, d) = (Tensor::from_vec(vec![1.0f32, 2.0], &[2, 1]).unwrap(), Tensor::from_vec(vec![10.0f32, 20.0, 30.0], &[1, 3]).unwrap());
    assert_eq!(binary(BinOp::Add, &c, &d).unwrap().data(), &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
    let mut out = [0.0f32; 6];
    binary_into(BinOp::Add, (c.data(), c.shape()), (d.data(), d.shape()), &mut out).unwrap();
    assert_eq!(out, [11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
    // An output of the wrong length is an error that names both shapes, not a panic.
    let e = binary_into(BinOp::Add, (c.data(), c.shape()), (d.data(), d.shape()), &mut out[..5]).unwrap_err().to_string();
    assert!(e.contains("[2, 1]") && e.contains("[1, 3]") && e.contains("5 outputs"), "{e}");
}
