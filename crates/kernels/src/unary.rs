//! Element-wise functions and their derivatives, side by side.

use rayon::prelude::*;
use stride_tensor::Elem;

use crate::vmath;

/// An element-wise function y = f(x). Parameters are stored as f64 and converted per element
/// type. `grad` returns dy/dx from x and y (whichever is cheaper).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Relu,
    /// min(max(x, 0), 6)
    Relu6,
    /// x if x > 0 else slope * x
    LeakyRelu(f64),
    /// x if x > 0 else alpha * (exp(x) - 1)
    Elu(f64),
    /// scale * elu(x, alpha) with the self-normalising constants
    Selu,
    /// x * Phi(x) with erf, as PyTorch's default (in f32 through `vmath::erf`, within a few ulp)
    Gelu,
    /// x * sigmoid(x)
    Silu,
    /// x * relu6(x + 3) / 6
    HardSwish,
    Tanh,
    Sigmoid,
    /// log(1 + exp(beta x)) / beta, linear above `threshold` (PyTorch's rule)
    Softplus {
        beta: f64,
        threshold: f64,
    },
    Exp,
    /// Natural log.
    Log,
    Sqrt,
    Neg,
    Abs,
    Square,
    /// x^p for a constant p.
    Pow(f64),
    /// x + c
    AddScalar(f64),
    /// x * c
    MulScalar(f64),
    /// min(max(x, lo), hi); the gradient is 1 inside [lo, hi] and 0 outside.
    Clamp(f64, f64),
    /// The error function (ONNX's Erf; GELU's graphs as PyTorch exports them).
    Erf,
    /// Sine and cosine (ONNX's Sin and Cos: oriented boxes' angles, positional encodings).
    Sin,
    Cos,
}

const SELU_ALPHA: f64 = 1.673_263_242_354_377_3;
const SELU_SCALE: f64 = 1.050_700_987_355_480_5;

/// `fast(x)` when `T` is f32 (the vectorisable functions of `vmath`), `exact(x)` (libm's) for
/// f64, whose gradient checks want every digit. The choice is made at compile time.
#[inline(always)]
fn pick<T: Elem>(x: T, fast: fn(f32) -> f32, exact: fn(T) -> T) -> T {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        T::c(fast(x.to_f32().unwrap_or(f32::NAN)) as f64)
    } else {
        exact(x)
    }
}

/// GELU in f32 through `vmath::erf`.
#[inline(always)]
fn gelu_f32(v: f32) -> f32 {
    v * 0.5 * (1.0 + vmath::erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU's derivative in f32, Phi(v) + v phi(v), through `vmath` (in f64 through libm it took
/// 10.8 ns a value on 2 threads).
#[inline(always)]
fn gelu_grad_f32(v: f32) -> f32 {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + vmath::erf(v * std::f32::consts::FRAC_1_SQRT_2)) + v * vmath::exp(-0.5 * v * v) * FRAC_1_SQRT_2PI
}

#[inline(always)]
pub(crate) fn exp<T: Elem>(x: T) -> T {
    pick(x, vmath::exp, T::exp)
}

#[inline(always)]
fn exp_m1<T: Elem>(x: T) -> T {
    pick(x, vmath::exp_m1, T::exp_m1)
}

#[inline(always)]
fn sigmoid<T: Elem>(x: T) -> T {
    pick(x, vmath::sigmoid, |x| T::one() / (T::one() + (-x).exp()))
}

impl Unary {
    #[inline(always)]
    pub fn apply<T: Elem>(self, x: T) -> T {
        let zero = T::zero();
        match self {
            Unary::Relu => x.max(zero),
            Unary::Relu6 => x.max(zero).min(T::c(6.0)),
            Unary::LeakyRelu(a) => {
                if x > zero {
                    x
                } else {
                    T::c(a) * x
                }
            }
            Unary::Elu(a) => {
                if x > zero {
                    x
                } else {
                    T::c(a) * exp_m1(x)
                }
            }
            Unary::Selu => T::c(SELU_SCALE) * if x > zero { x } else { T::c(SELU_ALPHA) * exp_m1(x) },
            Unary::Gelu => pick(x, gelu_f32, |x| x * T::c(0.5 * (1.0 + libm::erf(x.as_f64() / std::f64::consts::SQRT_2)))),
            Unary::Silu => x * sigmoid(x),
            Unary::HardSwish => x * (x + T::c(3.0)).max(zero).min(T::c(6.0)) / T::c(6.0),
            Unary::Tanh => pick(x, vmath::tanh, T::tanh),
            Unary::Sigmoid => sigmoid(x),
            Unary::Softplus { beta, threshold } => {
                let bx = T::c(beta) * x;
                if bx > T::c(threshold) {
                    x
                } else {
                    bx.exp().ln_1p() / T::c(beta)
                }
            }
            Unary::Exp => exp(x),
            Unary::Log => pick(x, vmath::ln, T::ln),
            Unary::Sqrt => x.sqrt(),
            Unary::Neg => -x,
            Unary::Abs => x.abs(),
            Unary::Square => x * x,
            Unary::Pow(p) => x.powf(T::c(p)),
            Unary::AddScalar(c) => x + T::c(c),
            Unary::MulScalar(c) => x * T::c(c),
            Unary::Clamp(lo, hi) => x.max(T::c(lo)).min(T::c(hi)),
            Unary::Erf => pick(x, vmath::erf, |x| T::c(libm::erf(x.as_f64()))),
            Unary::Sin => x.sin(),
            Unary::Cos => x.cos(),
        }
    }

    /// dy/dx at x, where y = self.apply(x).
    #[inline(always)]
    pub fn grad<T: Elem>(self, x: T, y: T) -> T {
        let (zero, one) = (T::zero(), T::one());
        let step = |c: bool| if c { one } else { zero };
        match self {
            Unary::Relu => step(x > zero),
            Unary::Relu6 => step(x > zero && x < T::c(6.0)),
            Unary::LeakyRelu(a) => {
                if x > zero {
                    one
                } else {
                    T::c(a)
                }
            }
            Unary::Elu(a) => {
                if x > zero {
                    one
                } else {
                    T::c(a) * exp(x)
                }
            }
            Unary::Selu => T::c(SELU_SCALE) * if x > zero { one } else { T::c(SELU_ALPHA) * exp(x) },
            Unary::Gelu => pick(x, gelu_grad_f32, |x| {
                let xf = x.as_f64();
                let cdf = 0.5 * (1.0 + libm::erf(xf / std::f64::consts::SQRT_2));
                let pdf = (-0.5 * xf * xf).exp() / (2.0 * std::f64::consts::PI).sqrt();
                T::c(cdf + xf * pdf)
            }),
            Unary::Silu => {
                let s = sigmoid(x);
                s * (one + x * (one - s))
            }
            Unary::HardSwish => {
                if x < T::c(-3.0) {
                    zero
                } else if x > T::c(3.0) {
                    one
                } else {
                    (T::c(2.0) * x + T::c(3.0)) / T::c(6.0)
                }
            }
            Unary::Tanh => one - y * y,
            Unary::Sigmoid => y * (one - y),
            Unary::Softplus { beta, threshold } => {
                let bx = T::c(beta) * x;
                if bx > T::c(threshold) {
                    one
                } else {
                    sigmoid(bx)
                }
            }
            Unary::Exp => y,
            Unary::Log => one / x,
            Unary::Sqrt => T::c(0.5) / y,
            Unary::Neg => -one,
            Unary::Abs => x.signum() * step(x != zero),
            Unary::Square => T::c(2.0) * x,
            Unary::Pow(p) => T::c(p) * x.powf(T::c(p - 1.0)),
            Unary::AddScalar(_) => one,
            Unary::MulScalar(c) => T::c(c),
            Unary::Clamp(lo, hi) => step(x >= T::c(lo) && x <= T::c(hi)),
            Unary::Erf => {
                let xf = x.as_f64();
                T::c(std::f64::consts::FRAC_2_SQRT_PI * (-xf * xf).exp())
            }
            Unary::Sin => x.cos(),
            Unary::Cos => -x.sin(),
        }
    }

    /// Short lower-case name, for errors and debug output.
    pub fn name(self) -> &'static str {
        match self {
            Unary::Relu => "relu",
            Unary::Relu6 => "relu6",
            Unary::LeakyRelu(_) => "leaky_relu",
            Unary::Elu(_) => "elu",
            Unary::Selu => "selu",
            Unary::Gelu => "gelu",
            Unary::Silu => "silu",
            Unary::HardSwish => "hardswish",
            Unary::Tanh => "tanh",
            Unary::Sigmoid => "sigmoid",
            Unary::Softplus { .. } => "softplus",
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Sqrt => "sqrt",
            Unary::Neg => "neg",
            Unary::Abs => "abs",
            Unary::Square => "square",
            Unary::Pow(_) => "pow",
            Unary::AddScalar(_) => "add_scalar",
            Unary::MulScalar(_) => "mul_scalar",
            Unary::Clamp(..) => "clamp",
            Unary::Erf => "erf",
            Unary::Sin => "sin",
            Unary::Cos => "cos",
        }
    }
}

/// Elements per task when an element-wise pass is split over threads; shorter passes stay on
/// one thread, where the split would cost more than it saves.
const PAR_CHUNK: usize = 1 << 15;

/// Elements [`Unary::apply_in_place`] copies aside at a time (4 KiB of f32, on the stack).
const IN_PLACE_RUN: usize = 1024;

impl Unary {
    /// `y[i] = f(x[i])` on all cores for long slices. The functions networks use most get a loop
    /// of their own (no per-element match, so it vectorises); results equal `apply`'s.
    pub fn apply_slice<T: Elem>(self, x: &[T], y: &mut [T]) {
        assert_eq!(x.len(), y.len(), "apply_slice: lengths");
        let chunk = |x: &[T], y: &mut [T]| {
            if !apply_fast(self, x, y) {
                y.iter_mut().zip(x).for_each(|(o, &v)| *o = self.apply(v));
            }
        };
        if x.len() < 2 * PAR_CHUNK {
            chunk(x, y);
        } else {
            y.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(|(y, x)| chunk(x, y));
        }
    }

    /// [`apply_slice`](Self::apply_slice) into a new buffer, each task's part zeroed by the
    /// thread that writes it (see `simd::par_filled`).
    pub fn apply_new<T: Elem>(self, x: &[T]) -> Vec<T> {
        crate::simd::par_filled(x.len(), PAR_CHUNK, |i, y| self.apply_slice(&x[i * PAR_CHUNK..][..y.len()], y))
    }

    /// [`grad_slice`](Self::grad_slice) into a new buffer, as [`apply_new`](Self::apply_new).
    pub fn grad_new<T: Elem>(self, g: &[T], x: &[T], y: &[T]) -> Vec<T> {
        assert!(g.len() == x.len() && x.len() == y.len(), "grad_new: lengths");
        crate::simd::par_filled(x.len(), PAR_CHUNK, |i, out| {
            let at = i * PAR_CHUNK..i * PAR_CHUNK + out.len();
            self.grad_slice(&g[at.clone()], &x[at.clone()], &y[at], out)
        })
    }

    /// `y[i] = f(y[i])` on all cores for long slices ([`apply_slice`](Self::apply_slice) over
    /// its own output).
    pub fn apply_slice_in_place<T: Elem>(self, y: &mut [T]) {
        if y.len() < 2 * PAR_CHUNK {
            self.apply_in_place(y);
        } else {
            y.par_chunks_mut(PAR_CHUNK).for_each(|y| self.apply_in_place(y));
        }
    }

    /// `y[i] = f(y[i])`, serially: for a piece of output still in cache (planned execution's
    /// epilogues), inside a thread's share of the work. Results equal `apply`'s.
    pub fn apply_in_place<T: Elem>(self, y: &mut [T]) {
        match self {
            Unary::Relu => relu_in_place(y),
            // Through the functions' own loops, a short run at a time copied aside (the loops
            // read one slice and write another), in a buffer no longer than needed: zeroing a
            // 4 KiB one for each row of a 7x7 plane took 2% of EfficientNet-B0's pass.
            f if y.len() <= 64 => f.in_place_runs::<T, 64>(y),
            f if y.len() <= 256 => f.in_place_runs::<T, 256>(y),
            f => f.in_place_runs::<T, IN_PLACE_RUN>(y),
        }
    }

    fn in_place_runs<T: Elem, const N: usize>(self, y: &mut [T]) {
        let mut x = [T::zero(); N];
        for run in y.chunks_mut(N) {
            let x = &mut x[..run.len()];
            x.copy_from_slice(run);
            if !apply_fast(self, x, run) {
                run.iter_mut().for_each(|v| *v = self.apply(*v));
            }
        }
    }

    /// `out[i] = g[i] * f'(x[i])` where y = f(x), on all cores for long slices; equals
    /// `g * grad(x, y)` element by element.
    pub fn grad_slice<T: Elem>(self, g: &[T], x: &[T], y: &[T], out: &mut [T]) {
        assert!(g.len() == x.len() && x.len() == y.len() && y.len() == out.len(), "grad_slice: lengths");
        let chunk = |g: &[T], x: &[T], y: &[T], out: &mut [T]| {
            if !grad_fast(self, g, x, y, out) {
                out.iter_mut().zip(g).zip(x.iter().zip(y)).for_each(|((o, &g), (&x, &y))| *o = g * self.grad(x, y));
            }
        };
        if x.len() < 2 * PAR_CHUNK {
            chunk(g, x, y, out);
        } else {
            out.par_chunks_mut(PAR_CHUNK)
                .zip(g.par_chunks(PAR_CHUNK))
                .zip(x.par_chunks(PAR_CHUNK).zip(y.par_chunks(PAR_CHUNK)))
                .for_each(|((out, g), (x, y))| chunk(g, x, y, out));
        }
    }
}

crate::multiversion! {
    /// y[i] = u.apply(x[i]) in a loop of its own for the functions networks use most (the
    /// variant fixed, so the loop vectorises, with AVX2 where the CPU has it); false for the
    /// others. Results equal `apply`'s.
    fn apply_fast<T: Elem>(u: Unary, x: &[T], y: &mut [T]) -> bool {
        // A `for` loop, not `for_each`: with a long function inside, `for_each`'s `fold` was left
        // out of line and so ran without AVX2, value by value (the longest functions have loops
        // of their own, `slice_fn!` below).
        #[inline(always)]
        fn each<T: Copy>(x: &[T], y: &mut [T], f: impl Fn(T) -> T) {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = f(v);
            }
        }
        match u {
            Unary::Relu => relu_into(x, y),
            Unary::Relu6 => each(x, y, |v| Unary::Relu6.apply(v)),
            Unary::HardSwish => each(x, y, |v| Unary::HardSwish.apply(v)),
            Unary::Gelu => gelu_slice(x, y),
            Unary::Erf => erf_slice(x, y),
            Unary::LeakyRelu(a) => each(x, y, |v| Unary::LeakyRelu(a).apply(v)),
            Unary::Elu(a) => each(x, y, |v| Unary::Elu(a).apply(v)),
            Unary::Silu => silu_slice(x, y),
            Unary::Tanh => tanh_slice(x, y),
            Unary::Sigmoid => sigmoid_slice(x, y),
            Unary::Exp => exp_slice(x, y),
            Unary::Log => log_slice(x, y),
            Unary::Neg => each(x, y, |v| -v),
            Unary::Square => each(x, y, |v| v * v),
            Unary::AddScalar(c) => each(x, y, |v| Unary::AddScalar(c).apply(v)),
            Unary::MulScalar(c) => each(x, y, |v| Unary::MulScalar(c).apply(v)),
            Unary::Clamp(lo, hi) => each(x, y, |v| Unary::Clamp(lo, hi).apply(v)),
            _ => return false,
        }
        true
    }
}

/// `y[i] = f(x[i])` for one of the longer functions, in a multiversioned function of its own
/// (with an AVX-512 build: they compute more than they move): inside `apply_fast`'s many arms
/// the inliner gave up on some (a call per value, without AVX2: GELU 3.4 ns a value on 2
/// threads, 0.6 on its own, 0.3 with AVX-512).
macro_rules! slice_fn {
    ($($name:ident: $f:expr;)*) => {$(
        crate::multiversion_wide! {
            fn $name<T: Elem>(x: &[T], y: &mut [T]) {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = $f.apply(v);
                }
            }
        }
    )*};
}

crate::multiversion_wide! {
    /// `out[i] = g[i] * gelu'(x[i])`, as [`slice_fn!`]'s functions (GELU's derivative reads
    /// only x).
    fn gelu_grad_slice<T: Elem>(g: &[T], x: &[T], out: &mut [T]) {
        for ((o, &g), &x) in out.iter_mut().zip(g).zip(x) {
            *o = g * Unary::Gelu.grad(x, x);
        }
    }
}

slice_fn! {
    gelu_slice: Unary::Gelu;
    erf_slice: Unary::Erf;
    tanh_slice: Unary::Tanh;
    sigmoid_slice: Unary::Sigmoid;
    silu_slice: Unary::Silu;
    exp_slice: Unary::Exp;
    log_slice: Unary::Log;
}

crate::multiversion! {
    /// out[i] = g[i] * u.grad(x[i], y[i]) in a loop of its own per function, as [`apply_fast`].
    fn grad_fast<T: Elem>(u: Unary, g: &[T], x: &[T], y: &[T], out: &mut [T]) -> bool {
        #[inline(always)]
        fn each<T: Elem>(g: &[T], x: &[T], y: &[T], out: &mut [T], f: impl Fn(T, T) -> T) {
            // A `for` loop, as in `apply_fast`.
            for ((o, &g), (&x, &y)) in out.iter_mut().zip(g).zip(x.iter().zip(y)) {
                *o = g * f(x, y);
            }
        }
        match u {
            Unary::Relu => relu_grad_into(g, x, out),
            Unary::Gelu => gelu_grad_slice(g, x, out),
            Unary::Relu6 => each(g, x, y, out, |x, y| Unary::Relu6.grad(x, y)),
            Unary::HardSwish => each(g, x, y, out, |x, y| Unary::HardSwish.grad(x, y)),
            Unary::LeakyRelu(a) => each(g, x, y, out, |x, y| Unary::LeakyRelu(a).grad(x, y)),
            Unary::Elu(a) => each(g, x, y, out, |x, y| Unary::Elu(a).grad(x, y)),
            Unary::Silu => each(g, x, y, out, |x, y| Unary::Silu.grad(x, y)),
            Unary::Tanh => each(g, x, y, out, |x, y| Unary::Tanh.grad(x, y)),
            Unary::Sigmoid => each(g, x, y, out, |x, y| Unary::Sigmoid.grad(x, y)),
            Unary::Exp => each(g, x, y, out, |x, y| Unary::Exp.grad(x, y)),
            Unary::Log => each(g, x, y, out, |x, y| Unary::Log.grad(x, y)),
            Unary::Neg => each(g, x, y, out, |x, y| Unary::Neg.grad(x, y)),
            Unary::Square => each(g, x, y, out, |x, y| Unary::Square.grad(x, y)),
            Unary::AddScalar(c) => each(g, x, y, out, |x, y| Unary::AddScalar(c).grad(x, y)),
            Unary::MulScalar(c) => each(g, x, y, out, |x, y| Unary::MulScalar(c).grad(x, y)),
            Unary::Clamp(lo, hi) => each(g, x, y, out, |x, y| Unary::Clamp(lo, hi).grad(x, y)),
            _ => return false,
        }
        true
    }
}

crate::multiversion! {
    /// y[i] = max(x[i], 0), written as a comparison (NaN gives 0, as `max` does) so that the
    /// loop vectorises; in an AVX2 build where the CPU has it.
    fn relu_into<T: Elem>(x: &[T], y: &mut [T]) {
        let zero = T::zero();
        y.iter_mut().zip(x).for_each(|(o, &v)| *o = if v > zero { v } else { zero });
    }
}

crate::multiversion! {
    /// [`relu_into`] in place.
    pub(crate) fn relu_in_place<T: Elem>(y: &mut [T]) {
        let zero = T::zero();
        y.iter_mut().for_each(|v| *v = if *v > zero { *v } else { zero });
    }
}

/// The gradient through a ReLU in place of its output: `y[i] = g[i]` where `y[i] > 0`, else 0
/// (a plan's backward step, where nothing reads the output after it). In parallel over large
/// buffers.
pub fn relu_grad_over_output<T: Elem>(y: &mut [T], g: &[T]) {
    assert_eq!(y.len(), g.len(), "relu_grad_over_output: lengths");
    if y.len() < 2 * PAR_CHUNK {
        relu_mask(y, g);
    } else {
        y.par_chunks_mut(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK)).for_each(|(y, g)| relu_mask(y, g));
    }
}

crate::multiversion! {
    /// y[i] = g[i] where y[i] > 0, else 0 (one thread; see [`relu_grad_over_output`]).
    pub(crate) fn relu_mask<T: Elem>(y: &mut [T], g: &[T]) {
        let zero = T::zero();
        y.iter_mut().zip(g).for_each(|(o, &g)| *o = if *o > zero { g } else { zero });
    }
}

crate::multiversion! {
    /// out[i] = g[i] * (1 if x[i] > 0 else 0).
    fn relu_grad_into<T: Elem>(g: &[T], x: &[T], out: &mut [T]) {
        let (zero, one) = (T::zero(), T::one());
        out.iter_mut().zip(g).zip(x).for_each(|((o, &g), &x)| *o = g * if x > zero { one } else { zero });
    }
}
