//! Element-wise arithmetic with broadcasting, and element-wise functions (activations).

use stride_kernels::binary::{self as kernel, BinOp};
use stride_kernels::unary::Unary;
use stride_tensor::{Elem, Result, Tensor};

use crate::device::{route, Prim};
use crate::op::Op;
use crate::Var;

fn binary<T: Elem>(a: &Var<T>, b: &Var<T>, op: Op<T>) -> Result<Var<T>> {
    if let Some(y) = route(
        || match op {
            Op::Add => Prim::Add,
            Op::Sub => Prim::Sub,
            Op::Mul => Prim::Mul,
            _ => Prim::Div,
        },
        &[a, b],
    )? {
        return Ok(y);
    }
    let (x, y) = (a.value(), b.value());
    let v = kernel::binary(
        match op {
            Op::Add => BinOp::Add,
            Op::Sub => BinOp::Sub,
            Op::Mul => BinOp::Mul,
            _ => BinOp::Div,
        },
        &x,
        &y,
    )?;
    Ok(Var::from_op(v, op, &[a, b]))
}

pub(crate) fn binary_backward<T: Elem>(op: &Op<T>, g: &Tensor<T>, a: &Tensor<T>, b: &Tensor<T>, needs: &[bool]) -> Result<Vec<Option<Tensor<T>>>> {
    // Only the gradients asked for: one factor is often a constant (a dropout mask, the
    // targets in a loss), whose product with g would be computed and dropped.
    let need = |i: usize| needs.get(i).copied().unwrap_or(true);
    let (ga, gb) = match op {
        Op::Add => (need(0).then(|| g.clone()), need(1).then(|| g.clone())),
        Op::Sub => (need(0).then(|| g.clone()), need(1).then(|| g.scale(-T::one()))),
        Op::Mul => (need(0).then(|| kernel::binary(BinOp::Mul, g, b)).transpose()?, need(1).then(|| kernel::binary(BinOp::Mul, g, a)).transpose()?),
        _ => {
            // d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
            let ga = g.div(b)?;
            let gb = need(1).then(|| Ok::<_, stride_tensor::Error>(ga.mul(a)?.div(b)?.scale(-T::one()))).transpose()?;
            (need(0).then_some(ga), gb)
        }
    };
    Ok(vec![ga.map(|v| v.sum_to(a.shape())).transpose()?, gb.map(|v| v.sum_to(b.shape())).transpose()?])
}

/// y = f(x) for an element-wise function.
pub fn unary<T: Elem>(x: &Var<T>, f: Unary) -> Result<Var<T>> {
    if let Some(y) = route(|| Prim::Unary(f), &[x])? {
        return Ok(y);
    }
    let xv = x.value_ref();
    let v = Tensor::from_vec(f.apply_new(xv.data()), xv.shape())?;
    drop(xv);
    Ok(Var::from_op(v, Op::Unary(f), &[x]))
}

pub(crate) fn unary_backward<T: Elem>(f: Unary, g: &Tensor<T>, x: &Tensor<T>, y: &Tensor<T>) -> Result<Tensor<T>> {
    Tensor::from_vec(f.grad_new(g.data(), x.data(), y.data()), x.shape())
}

macro_rules! unary_methods {
    ($($(#[$doc:meta])* $name:ident => $u:expr;)*) => {
        impl<T: Elem> Var<T> {
            $($(#[$doc])* pub fn $name(&self) -> Result<Var<T>> { unary(self, $u) })*
        }
    };
}

unary_methods! {
    relu => Unary::Relu;
    relu6 => Unary::Relu6;
    /// ELU with alpha 1.
    elu => Unary::Elu(1.0);
    selu => Unary::Selu;
    /// Exact GELU (erf form).
    gelu => Unary::Gelu;
    /// The error function.
    erf => Unary::Erf;
    sin => Unary::Sin;
    cos => Unary::Cos;
    silu => Unary::Silu;
    hardswish => Unary::HardSwish;
    tanh => Unary::Tanh;
    sigmoid => Unary::Sigmoid;
    /// softplus with beta 1, threshold 20 (PyTorch's defaults).
    softplus => Unary::Softplus { beta: 1.0, threshold: 20.0 };
    exp => Unary::Exp;
    ln => Unary::Log;
    sqrt => Unary::Sqrt;
    neg => Unary::Neg;
    abs => Unary::Abs;
    square => Unary::Square;
}

impl<T: Elem> Var<T> {
    pub fn add(&self, o: &Var<T>) -> Result<Var<T>> {
        binary(self, o, Op::Add)
    }
    pub fn sub(&self, o: &Var<T>) -> Result<Var<T>> {
        binary(self, o, Op::Sub)
    }
    pub fn mul(&self, o: &Var<T>) -> Result<Var<T>> {
        binary(self, o, Op::Mul)
    }
    pub fn div(&self, o: &Var<T>) -> Result<Var<T>> {
        binary(self, o, Op::Div)
    }
    pub fn leaky_relu(&self, slope: f64) -> Result<Var<T>> {
        unary(self, Unary::LeakyRelu(slope))
    }
    pub fn elu_alpha(&self, alpha: f64) -> Result<Var<T>> {
        unary(self, Unary::Elu(alpha))
    }
    pub fn softplus_with(&self, beta: f64, threshold: f64) -> Result<Var<T>> {
        if beta <= 0.0 || !beta.is_finite() {
            stride_tensor::bail!(arg, "softplus", "beta must be positive and finite, got {beta}");
        }
        unary(self, Unary::Softplus { beta, threshold })
    }
    pub fn powf(&self, p: f64) -> Result<Var<T>> {
        unary(self, Unary::Pow(p))
    }
    pub fn add_scalar(&self, c: f64) -> Result<Var<T>> {
        unary(self, Unary::AddScalar(c))
    }
    pub fn mul_scalar(&self, c: f64) -> Result<Var<T>> {
        unary(self, Unary::MulScalar(c))
    }
    /// Limits every element to [lo, hi].
    pub fn clamp(&self, lo: f64, hi: f64) -> Result<Var<T>> {
        if lo > hi || lo.is_nan() || hi.is_nan() {
            stride_tensor::bail!(arg, "clamp", "needs lo <= hi, got [{lo}, {hi}]");
        }
        unary(self, Unary::Clamp(lo, hi))
    }
}
