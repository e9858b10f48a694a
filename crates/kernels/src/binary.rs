//! Element-wise arithmetic of two tensors with NumPy's broadcasting, in loops of their own for
//! the shapes networks make, on all cores for long outputs:
//! - equal shapes (a residual sum, x * gate);
//! - the smaller operand constant over runs of the output's trailing axes (a squeeze-excitation
//!   scale `[N, C, 1, 1]` over `[N, C, H, W]`, a per-channel `[C, 1, 1]` shift);
//! - the smaller operand repeating along the output's leading axes (a bias row `[F]` over
//!   `[N, F]`).
//!
//! Anything else goes through the general gather of [`Tensor::zip_map`]. Every path computes
//! `op(a[i], b[i])` for each element, so all give the same bits.

use std::mem::MaybeUninit;

use stride_tensor::shape::{broadcast_shape, broadcast_strides};
use stride_tensor::{Elem, Result, Tensor};

/// The four element-wise operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    #[inline(always)]
    fn apply<T: Elem>(self, a: T, b: T) -> T {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
        }
    }
    fn name(self) -> &'static str {
        match self {
            BinOp::Add => "add",
            BinOp::Sub => "sub",
            BinOp::Mul => "mul",
            BinOp::Div => "div",
        }
    }
}

/// Outputs shorter than this stay on one thread.
const PAR_MIN: usize = 1 << 15;

/// How the smaller operand lines up with the output.
enum Layout<T> {
    /// Same shape as the output.
    Same,
    /// One value per run of `inner` consecutive outputs.
    Runs { inner: usize, values: Vec<T> },
    /// Its values repeat every `period` outputs.
    Rows { period: usize },
}

/// How `small` (broadcast to `out`) lines up with it, or None for the general gather.
fn layout<T: Elem>(small: &Tensor<T>, out: &[usize]) -> Option<Layout<T>> {
    let s = small.shape();
    if s == out {
        return Some(Layout::Same);
    }
    let rank = out.len();
    let padded: Vec<usize> = std::iter::repeat_n(1, rank - s.len()).chain(s.iter().copied()).collect();
    // Trailing axes where `small` is 1: it is constant over runs of their product.
    let t = padded.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    let inner: usize = out[t..].iter().product();
    if inner > 1 {
        let lead = &out[..t];
        let strides = broadcast_strides(&padded[..t], lead);
        let outer: usize = lead.iter().product();
        let mut values = Vec::with_capacity(outer);
        let mut idx = vec![0usize; t];
        for _ in 0..outer {
            values.push(small.data()[idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
            for a in (0..t).rev() {
                idx[a] += 1;
                if idx[a] < lead[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        return Some(Layout::Runs { inner, values });
    }
    // Leading axes where `small` is 1, the rest equal to the output's: it repeats.
    let l = padded.iter().position(|&d| d != 1).unwrap_or(rank);
    (padded[l..] == out[l..]).then(|| Layout::Rows { period: out[l..].iter().product() })
}

/// `op(a, b)` broadcast as NumPy does (the output's shape is the broadcast of both).
pub fn binary<T: Elem>(op: BinOp, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
    let out = broadcast_shape(op.name(), a.shape(), b.shape())?;
    // The full-shaped operand and how the other lines up; `swap` when the full one is b.
    let (full, small, swap) = if a.shape() == out { (a, b, false) } else { (b, a, true) };
    if full.shape() != out {
        return general(op, a, b);
    }
    let Some(lay) = layout(small, &out) else { return general(op, a, b) };
    let n = full.numel();
    // Chunks for the pool: whole runs or periods, about a quarter of the output per thread.
    let unit = match &lay {
        Layout::Same => 1,
        Layout::Runs { inner, .. } => *inner,
        Layout::Rows { period } => *period,
    };
    let threads = rayon::current_num_threads().max(1);
    let chunk = if n < PAR_MIN { n.max(1) } else { (n.div_ceil(4 * threads)).max(PAR_MIN).div_ceil(unit) * unit };
    let (x, y) = (full.data(), small.data());
    let fill = |i: usize, part: &mut [MaybeUninit<T>]| {
        let start = i * chunk;
        let xs = &x[start..start + part.len()];
        match &lay {
            Layout::Same => zip(op, swap, xs, &y[start..start + part.len()], part),
            Layout::Runs { inner, values } => {
                for (k, (o, xr)) in part.chunks_mut(*inner).zip(xs.chunks(*inner)).enumerate() {
                    scalar(op, swap, xr, values[start / inner + k], o);
                }
            }
            Layout::Rows { period } => {
                for (o, xr) in part.chunks_mut(*period).zip(xs.chunks(*period)) {
                    zip(op, swap, xr, &y[..xr.len()], o);
                }
            }
        }
    };
    // SAFETY: every path of `fill` writes each element of its chunk: `zip` and `scalar` write
    // all of their output, and the chunks of a part cover it (runs and periods divide chunks).
    let data = unsafe { crate::simd::par_written(n, chunk, fill) };
    Tensor::from_vec(data, &out)
}

/// The general path: both operands gathered to the output's shape.
fn general<T: Elem>(op: BinOp, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
    a.zip_map(b, op.name(), move |x, y| op.apply(x, y))
}

crate::multiversion! {
    /// out[i] = op(x[i], y[i]), or op(y[i], x[i]) when `swap`.
    fn zip<T: Elem>(op: BinOp, swap: bool, x: &[T], y: &[T], out: &mut [MaybeUninit<T>]) {
        #[inline(always)]
        fn each<T: Elem>(x: &[T], y: &[T], out: &mut [MaybeUninit<T>], f: impl Fn(T, T) -> T) {
            for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
                o.write(f(a, b));
            }
        }
        match (op, swap) {
            (BinOp::Add, _) => each(x, y, out, |a, b| a + b),
            (BinOp::Mul, _) => each(x, y, out, |a, b| a * b),
            (BinOp::Sub, false) => each(x, y, out, |a, b| a - b),
            (BinOp::Sub, true) => each(x, y, out, |a, b| b - a),
            (BinOp::Div, false) => each(x, y, out, |a, b| a / b),
            (BinOp::Div, true) => each(x, y, out, |a, b| b / a),
        }
    }
}

crate::multiversion! {
    /// out[i] = op(x[i], s), or op(s, x[i]) when `swap`.
    fn scalar<T: Elem>(op: BinOp, swap: bool, x: &[T], s: T, out: &mut [MaybeUninit<T>]) {
        #[inline(always)]
        fn each<T: Elem>(x: &[T], out: &mut [MaybeUninit<T>], f: impl Fn(T) -> T) {
            for (o, &a) in out.iter_mut().zip(x) {
                o.write(f(a));
            }
        }
        match (op, swap) {
            (BinOp::Add, _) => each(x, out, |a| a + s),
            (BinOp::Mul, _) => each(x, out, |a| a * s),
            (BinOp::Sub, false) => each(x, out, |a| a - s),
            (BinOp::Sub, true) => each(x, out, |a| s - a),
            (BinOp::Div, false) => each(x, out, |a| a / s),
            (BinOp::Div, true) => each(x, out, |a| s / a),
        }
    }
}
