//! The slice forms of the element-wise functions (vectorised and threaded, and in place) equal the scalar
//! definitions bit for bit (NaN for NaN), on short slices and on long ones split over threads.

use stride_kernels::unary::Unary;
use stride_tensor::Rng;

const ALL: [Unary; 26] = [
    Unary::Relu,
    Unary::Relu6,
    Unary::LeakyRelu(0.01),
    Unary::Elu(1.0),
    Unary::Selu,
    Unary::Gelu,
    Unary::Silu,
    Unary::HardSwish,
    Unary::Tanh,
    Unary::Sigmoid,
    Unary::Softplus { beta: 1.0, threshold: 20.0 },
    Unary::Exp,
    Unary::Log,
    Unary::Sqrt,
    Unary::Neg,
    Unary::Abs,
    Unary::Square,
    Unary::Pow(1.5),
    Unary::AddScalar(0.25),
    Unary::MulScalar(-3.0),
    Unary::Clamp(-0.5, 0.5),
    Unary::Relu,
    Unary::Elu(0.5),
    Unary::Erf,
    Unary::Sin,
    Unary::Cos,
];

/// The same bits, or NaN for NaN: a vector loop may turn a NaN input into the CPU's default
/// NaN, whose sign differs.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn slices_equal_the_scalar_functions_bit_for_bit() {
    // In place, runs go through buffers of 64, 256 and 1,024 values by length: each side of each.
    for n in [0, 1, 7, 64, 65, 200, 256, 257, 1000, 1025, (1 << 16) + 5, 200_003] {
        let x: Vec<f32> = Rng::seed(n as u64).normal(&[n], 0.0, 2.0).unwrap().data().to_vec();
        let mut x = x;
        // Special values: signed zeros, infinities and NaN where there is room.
        for (i, v) in [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN].into_iter().enumerate() {
            if i < n {
                x[i] = v;
            }
        }
        let g: Vec<f32> = Rng::seed(7).normal(&[n], 0.0, 1.0).unwrap().data().to_vec();
        for f in ALL {
            let mut y = vec![0.0f32; n];
            f.apply_slice(&x, &mut y);
            let want: Vec<f32> = x.iter().map(|&v| f.apply(v)).collect();
            assert!(y.iter().zip(&want).all(|(&a, &b)| same(a, b)), "{f:?} forward, n = {n}");
            let mut z = x.clone();
            f.apply_in_place(&mut z);
            assert!(z.iter().zip(&want).all(|(&a, &b)| same(a, b)), "{f:?} in place, n = {n}");
            let mut z = x.clone();
            f.apply_slice_in_place(&mut z);
            assert!(z.iter().zip(&want).all(|(&a, &b)| same(a, b)), "{f:?} slice in place, n = {n}");
            let mut d = vec![0.0f32; n];
            f.grad_slice(&g, &x, &y, &mut d);
            let want: Vec<f32> = g.iter().zip(x.iter().zip(&y)).map(|(&g, (&x, &y))| g * f.grad(x, y)).collect();
            assert!(d.iter().zip(&want).all(|(&a, &b)| same(a, b)), "{f:?} backward, n = {n}");
        }
    }
}

/// The ReLU gradient written over the ReLU's output (a training plan's backward step) passes
/// the gradient where the output is positive and zero elsewhere, as `grad_slice` does, short
/// and split over threads.
#[test]
fn relu_gradient_over_its_output_matches_grad_slice() {
    // In place, runs go through buffers of 64, 256 and 1,024 values by length: each side of each.
    for n in [0, 1, 7, 64, 65, 200, 256, 257, 1000, 1025, (1 << 16) + 5, 200_003] {
        let x: Vec<f32> = Rng::seed(n as u64 + 1).normal(&[n], 0.0, 2.0).unwrap().data().to_vec();
        let g: Vec<f32> = Rng::seed(8).normal(&[n], 0.0, 1.0).unwrap().data().to_vec();
        let mut y = vec![0.0f32; n];
        Unary::Relu.apply_slice(&x, &mut y);
        let mut want = vec![0.0f32; n];
        Unary::Relu.grad_slice(&g, &x, &y, &mut want);
        stride_kernels::unary::relu_grad_over_output(&mut y, &g);
        assert!(y.iter().zip(&want).all(|(a, b)| a == b), "n = {n}");
        assert!(y.iter().zip(&x).zip(&g).all(|((&d, &x), &g)| if x > 0.0 { d == g } else { d == 0.0 }), "n = {n}");
    }
}

/// GELU's derivative in f32 (through the vectorisable exp and erf) follows the f64 one (libm)
/// within a few units in the last place of its scale, over [-10, 10].
#[test]
fn gelu_derivative_in_f32_follows_f64() {
    let mut worst = 0.0f64;
    for i in 0..=200_000 {
        let x = (-10.0 + 20.0 * i as f64 / 200_000.0) as f32;
        let (got, want) = (Unary::Gelu.grad(x, 0.0) as f64, Unary::Gelu.grad(x as f64, 0.0));
        worst = worst.max((got - want).abs());
    }
    // The derivative runs from about -0.13 to 1.13: 2e-7 is two units in the last place at 1.
    assert!(worst < 2.5e-7, "worst difference {worst}");
}

/// `STRIDE_NO_AVX512` turns the AVX-512 builds off (CI runs this file once more with it set,
/// so the tests above go through the AVX2 builds on a machine that has both).
#[test]
fn the_avx512_switch_is_read() {
    if std::env::var_os("STRIDE_NO_AVX512").is_some() {
        assert!(!stride_kernels::simd::has_avx512());
    }
}
