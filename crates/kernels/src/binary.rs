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

use std::borrow::Cow;
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
enum Layout<'a, T: Clone> {
    /// Same shape as the output.
    Same,
    /// One value per run of `inner` consecutive outputs.
    Runs { inner: usize, values: Cow<'a, [T]> },
    /// Its values repeat every `period` outputs.
    Rows { period: usize },
}

/// How `small` (data of shape `s`, broadcast to `out`) lines up with it, or None for the
/// general gather.
fn layout<'a, T: Elem>(small: &'a [T], s: &[usize], out: &[usize]) -> Option<Layout<'a, T>> {
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
        if padded[..t] == *lead {
            // One value per run already, in order (a squeeze-excitation scale).
            return Some(Layout::Runs { inner, values: Cow::Borrowed(small) });
        }
        let strides = broadcast_strides(&padded[..t], lead);
        let outer: usize = lead.iter().product();
        let mut values = Vec::with_capacity(outer);
        let mut idx = vec![0usize; t];
        for _ in 0..outer {
            values.push(small[idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
            for a in (0..t).rev() {
                idx[a] += 1;
                if idx[a] < lead[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        return Some(Layout::Runs { inner, values: Cow::Owned(values) });
    }
    // Leading axes where `small` is 1, the rest equal to the output's: it repeats.
    let l = padded.iter().position(|&d| d != 1).unwrap_or(rank);
    (padded[l..] == out[l..]).then(|| Layout::Rows { period: out[l..].iter().product() })
}

/// A fast path's work: `fill(i, part)` writes chunk `i` (of `chunk` outputs) of the result.
struct Fast<'a, T: Clone> {
    op: BinOp,
    swap: bool,
    lay: Layout<'a, T>,
    chunk: usize,
}

impl<'a, T: Elem> Fast<'a, T> {
    /// The fast path for operands `a` and `b` broadcast to `out`, or None for the general
    /// gather.
    fn new(op: BinOp, (a, sa): (&'a [T], &[usize]), (b, sb): (&'a [T], &[usize]), out: &[usize]) -> Option<Self> {
        // The full-shaped operand and how the other lines up; `swap` when the full one is b.
        let (small, ss, swap) = if sa == out { (b, sb, false) } else { (a, sa, true) };
        if (if swap { sb } else { sa }) != out {
            return None;
        }
        let lay = layout(small, ss, out)?;
        let n: usize = out.iter().product();
        // Chunks for the pool: whole runs or periods, about a quarter of the output per thread.
        let unit = match &lay {
            Layout::Same => 1,
            Layout::Runs { inner, .. } => *inner,
            Layout::Rows { period } => *period,
        };
        let threads = rayon::current_num_threads().max(1);
        let chunk = if n < PAR_MIN { n.max(1) } else { (n.div_ceil(4 * threads)).max(PAR_MIN).div_ceil(unit) * unit };
        Some(Fast { op, swap, lay, chunk })
    }

    /// Chunk `i` of the output from the full operand `x` and the other one `y`. Writes every
    /// element of `part`: `zip` and `scalar` write all of their output, and the runs and
    /// periods of a part cover it (they divide chunks).
    fn fill(&self, x: &[T], y: &[T], i: usize, part: &mut [MaybeUninit<T>]) {
        let (op, swap) = (self.op, self.swap);
        let start = i * self.chunk;
        let xs = &x[start..start + part.len()];
        match &self.lay {
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
    }
}

/// `op(a, b)` broadcast as NumPy does (the output's shape is the broadcast of both).
pub fn binary<T: Elem>(op: BinOp, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
    let out = broadcast_shape(op.name(), a.shape(), b.shape())?;
    let Some(fast) = Fast::new(op, (a.data(), a.shape()), (b.data(), b.shape()), &out) else { return general(op, a, b) };
    let (x, y) = if fast.swap { (b.data(), a.data()) } else { (a.data(), b.data()) };
    // SAFETY: `Fast::fill` writes every element of its chunk.
    let data = unsafe { crate::simd::par_written(out.iter().product(), fast.chunk, |i, part| fast.fill(x, y, i, part)) };
    Tensor::from_vec(data, &out)
}

/// [`binary`] of `a` (shape `sa`) and `b` (shape `sb`) into `out`, which holds their broadcast
/// shape's elements: the same bits, for a caller that owns the output's memory (a plan).
pub fn binary_into<T: Elem>(op: BinOp, (a, sa): (&[T], &[usize]), (b, sb): (&[T], &[usize]), out: &mut [T]) -> Result<()> {
    let shape = broadcast_shape(op.name(), sa, sb)?;
    let n: usize = shape.iter().product();
    if a.len() != sa.iter().product::<usize>() || b.len() != sb.iter().product::<usize>() || out.len() != n {
        return Err(stride_tensor::Error::shape(
            op.name(),
            format!("{} and {} values for shapes {sa:?} and {sb:?}, {} outputs for {shape:?}", a.len(), b.len(), out.len()),
        ));
    }
    let Some(fast) = Fast::new(op, (a, sa), (b, sb), &shape) else {
        let y = general(op, &Tensor::from_vec(a.to_vec(), sa)?, &Tensor::from_vec(b.to_vec(), sb)?)?;
        out.copy_from_slice(y.data());
        return Ok(());
    };
    let (x, y) = if fast.swap { (b, a) } else { (a, b) };
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and only initialised values are written
    // through the view (`Fast::fill` writes with `MaybeUninit::write`).
    let out = unsafe { &mut *(out as *mut [T] as *mut [MaybeUninit<T>]) };
    if n <= fast.chunk {
        fast.fill(x, y, 0, out);
    } else {
        use rayon::prelude::*;
        out.par_chunks_mut(fast.chunk).enumerate().for_each(|(i, part)| fast.fill(x, y, i, part));
    }
    Ok(())
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
