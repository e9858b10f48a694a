//! Integer tensors a graph computes for Gather's indices: constants, ONNX's Range over a value's
//! dimensions, element-wise arithmetic with NumPy's broadcasting, and unit axes added, removed
//! or reshaped. PyTorch's newer exporter writes `as_strided` this way (ConvNeXt's classifier with
//! a free batch gathers its pooled values by `Range(0, N) * 768 + offsets`). Like [`Dim`], they
//! are kept as expressions and worked out as the network runs, so the batch stays free.

use stride_autograd::{self as ag, Var};

use crate::network::{reshape_dims, Dim, IntOp, ValueId};

/// The most integers such a tensor may hold: a file cannot make Stride allocate without bound.
pub(crate) const MAX_INDICES: usize = 1 << 24;

/// The most runs of consecutive indices one Gather takes (each becomes a slice of its input).
pub(crate) const MAX_RUNS: usize = 4096;

#[derive(Clone, Debug)]
pub(crate) enum IntTensor {
    Const {
        data: Vec<i64>,
        dims: Vec<usize>,
    },
    /// A list of dimensions (a shape, or part of one): 1-d.
    Dims(Vec<Dim>),
    /// ONNX's Range: start, start + delta, ... short of limit; 1-d.
    Range {
        start: Dim,
        limit: Dim,
        delta: Dim,
    },
    Bin(IntOp, Box<IntTensor>, Box<IntTensor>),
    /// Unit axes at these positions of the result (sorted, distinct).
    Unsqueeze(Box<IntTensor>, Vec<usize>),
    /// The axes at these positions removed (sorted, distinct; each must be 1 long).
    Squeeze(Box<IntTensor>, Vec<usize>),
    /// ONNX's Reshape rule (0 copies a dimension, -1 takes what is left).
    Reshape(Box<IntTensor>, Vec<i64>),
}

fn too_many(what: &'static str, n: impl std::fmt::Display) -> ag::Error {
    ag::Error::arg(what, format!("{n} integers are more than the {MAX_INDICES} Stride computes for indices"))
}

impl IntTensor {
    /// The number of axes, known before the network runs.
    pub(crate) fn rank(&self) -> usize {
        match self {
            IntTensor::Const { dims, .. } => dims.len(),
            IntTensor::Dims(_) | IntTensor::Range { .. } => 1,
            IntTensor::Bin(_, a, b) => a.rank().max(b.rank()),
            IntTensor::Unsqueeze(t, axes) => t.rank() + axes.len(),
            IntTensor::Squeeze(t, axes) => t.rank() - axes.len(),
            IntTensor::Reshape(_, shape) => shape.len(),
        }
    }

    /// The values whose shapes the integers are computed from.
    pub(crate) fn refs(&self, out: &mut Vec<ValueId>) {
        match self {
            IntTensor::Const { .. } => {}
            IntTensor::Dims(d) => d.iter().for_each(|d| d.refs(out)),
            IntTensor::Range { start, limit, delta } => [start, limit, delta].iter().for_each(|d| d.refs(out)),
            IntTensor::Bin(_, a, b) => {
                a.refs(out);
                b.refs(out);
            }
            IntTensor::Unsqueeze(t, _) | IntTensor::Squeeze(t, _) | IntTensor::Reshape(t, _) => t.refs(out),
        }
    }

    /// The integers and their dimensions, given every value's shape so far (none needed when
    /// [`IntTensor::refs`] finds none).
    pub(crate) fn eval(&self, shapes: &[Vec<usize>]) -> ag::Result<(Vec<i64>, Vec<usize>)> {
        Ok(match self {
            IntTensor::Const { data, dims } => (data.clone(), dims.clone()),
            IntTensor::Dims(d) => {
                let data = d.iter().map(|d| d.eval(shapes)).collect::<ag::Result<Vec<_>>>()?;
                let n = data.len();
                (data, vec![n])
            }
            IntTensor::Range { start, limit, delta } => {
                let (s, l, d) = (start.eval(shapes)?, limit.eval(shapes)?, delta.eval(shapes)?);
                if d == 0 {
                    return Err(ag::Error::arg("Range", format!("from {s} to {l} by 0 never ends")));
                }
                // ceil((limit - start) / delta), at least 0, in i128 so that no input overflows.
                let (span, step) = ((l as i128) - (s as i128), d as i128);
                let n = ((span + step - step.signum()) / step).max(0);
                if n > MAX_INDICES as i128 {
                    return Err(too_many("Range", format!("from {s} to {l} by {d}: {n}")));
                }
                let data: Vec<i64> = (0..n).map(|i| (s as i128 + i * step) as i64).collect();
                (data, vec![n as usize])
            }
            IntTensor::Bin(op, a, b) => broadcast(*op, &a.eval(shapes)?, &b.eval(shapes)?)?,
            IntTensor::Unsqueeze(t, axes) => {
                let (data, dims) = t.eval(shapes)?;
                let mut inner = dims.into_iter();
                let out = (0..self.rank()).map(|i| if axes.contains(&i) { 1 } else { inner.next().unwrap_or(1) }).collect();
                (data, out)
            }
            IntTensor::Squeeze(t, axes) => {
                let (data, dims) = t.eval(shapes)?;
                if let Some(&i) = axes.iter().find(|&&i| dims[i] != 1) {
                    return Err(ag::Error::shape("Squeeze", format!("axis {i} of the integers' {dims:?} is not 1 long")));
                }
                let out = dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
                (data, out)
            }
            IntTensor::Reshape(t, shape) => {
                let (data, dims) = t.eval(shapes)?;
                let out = reshape_dims(&dims, shape)?;
                (data, out)
            }
        })
    }
}

/// `op` on two integer tensors with NumPy's broadcasting (ONNX's Add, Sub, Mul, Div; integer
/// division truncates, as ONNX Runtime's does).
fn broadcast(op: IntOp, (a, da): &(Vec<i64>, Vec<usize>), (b, db): &(Vec<i64>, Vec<usize>)) -> ag::Result<(Vec<i64>, Vec<usize>)> {
    let rank = da.len().max(db.len());
    let pad = |d: &[usize]| -> Vec<usize> { std::iter::repeat_n(1, rank - d.len()).chain(d.iter().copied()).collect() };
    let (pa, pb) = (pad(da), pad(db));
    let mut dims = Vec::with_capacity(rank);
    for (&x, &y) in pa.iter().zip(&pb) {
        if x != y && x != 1 && y != 1 {
            return Err(ag::Error::shape("integer arithmetic", format!("dimensions {da:?} and {db:?} do not broadcast together")));
        }
        dims.push(if x == 1 { y } else { x });
    }
    let n = dims.iter().try_fold(1usize, |p, &d| p.checked_mul(d)).filter(|&n| n <= MAX_INDICES);
    let n = n.ok_or_else(|| too_many("integer arithmetic", format!("dimensions {dims:?}")))?;
    // Row-major strides of each operand, 0 along the axes it is broadcast over.
    let strides = |p: &[usize]| -> Vec<usize> {
        let mut s = vec![0; rank];
        let mut acc = 1;
        for i in (0..rank).rev() {
            s[i] = if p[i] == 1 { 0 } else { acc };
            acc *= p[i];
        }
        s
    };
    let (sa, sb) = (strides(&pa), strides(&pb));
    let mut at = vec![0usize; rank];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ia: usize = at.iter().zip(&sa).map(|(i, s)| i * s).sum();
        let ib: usize = at.iter().zip(&sb).map(|(i, s)| i * s).sum();
        let (x, y) = (a[ia], b[ib]);
        out.push(op.apply(x, y).ok_or_else(|| ag::Error::arg("integer arithmetic", format!("{x} {op:?} {y} has no int64 result")))?);
        for i in (0..rank).rev() {
            at[i] += 1;
            if at[i] < dims[i] {
                break;
            }
            at[i] = 0;
        }
    }
    Ok((out, dims))
}

/// ONNX's Gather of `x` along `axis` by `indices` of dimensions `dims` (negative from the end):
/// the runs of consecutive indices are slices of `x`, joined and reshaped, so the gradient flows
/// back through Stride's own slice and concatenation.
pub(crate) fn gather<T: ag::Elem>(x: &Var<T>, axis: usize, indices: &[i64], dims: &[usize]) -> ag::Result<Var<T>> {
    let s = x.shape();
    let n = s[axis];
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in indices {
        let j = if i < 0 { i + n as i64 } else { i };
        if j < 0 || j >= n as i64 {
            return Err(ag::Error::arg("Gather", format!("index {i} is out of range for axis {axis} ({n} long) of a value of shape {s:?}")));
        }
        let j = j as usize;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == j => *len += 1,
            _ => runs.push((j, 1)),
        }
    }
    if runs.is_empty() {
        return Err(ag::Error::arg("Gather", "no indices: the result would be empty, which Stride does not make"));
    }
    if runs.len() > MAX_RUNS {
        return Err(ag::Error::arg(
            "Gather",
            format!("{} indices in {} runs of consecutive ones: Stride gathers at most {MAX_RUNS} runs", indices.len(), runs.len()),
        ));
    }
    let parts = runs.iter().map(|&(start, len)| if len == n { Ok(x.clone()) } else { x.narrow(axis, start, len) }).collect::<ag::Result<Vec<_>>>()?;
    let joined = match &parts[..] {
        [one] => one.clone(),
        _ => ag::concat(&parts.iter().collect::<Vec<_>>(), axis)?,
    };
    let shape: Vec<usize> = s[..axis].iter().chain(dims).chain(&s[axis + 1..]).copied().collect();
    joined.reshape(&shape)
}

/// ONNX's GatherND with batch_dims 0: each row of the last axis of `indices` (of dimensions
/// `dims`) picks one slice of `x` by its first `k` axes (negative from the end), k the last
/// dimension; done as [`gather`] on `x` with those axes made one.
pub(crate) fn gather_nd<T: ag::Elem>(x: &Var<T>, indices: &[i64], dims: &[usize]) -> ag::Result<Var<T>> {
    let s = x.shape();
    let (&k, rows) = dims.split_last().ok_or_else(|| ag::Error::arg("GatherND", "the indices are a scalar; they need at least one axis"))?;
    if k == 0 || k > s.len() {
        return Err(ag::Error::arg("GatherND", format!("index rows of {k} for a value of shape {s:?} (1 to {} axes)", s.len())));
    }
    let mut flat = Vec::with_capacity(indices.len() / k);
    for row in indices.chunks_exact(k) {
        let mut at = 0i64;
        for (j, (&i, &n)) in row.iter().zip(&s).enumerate() {
            let v = if i < 0 { i + n as i64 } else { i };
            if v < 0 || v >= n as i64 {
                return Err(ag::Error::arg("GatherND", format!("index {i} is out of range for axis {j} ({n} long) of a value of shape {s:?}")));
            }
            at = at * n as i64 + v;
        }
        flat.push(at);
    }
    let merged: Vec<usize> = std::iter::once(s[..k].iter().product()).chain(s[k..].iter().copied()).collect();
    gather(&x.reshape(&merged)?, 0, &flat, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_autograd::{gradcheck, Rng, Tensor};

    fn range(start: i64, limit: i64, delta: i64) -> ag::Result<(Vec<i64>, Vec<usize>)> {
        IntTensor::Range { start: Dim::Const(start), limit: Dim::Const(limit), delta: Dim::Const(delta) }.eval(&[])
    }

    fn konst(data: &[i64], dims: &[usize]) -> Box<IntTensor> {
        Box::new(IntTensor::Const { data: data.to_vec(), dims: dims.to_vec() })
    }

    #[test]
    fn range_counts_as_onnx_says() {
        // max(ceil((limit - start) / delta), 0) values.
        assert_eq!(range(0, 5, 1).unwrap(), (vec![0, 1, 2, 3, 4], vec![5]));
        assert_eq!(range(1, 8, 3).unwrap(), (vec![1, 4, 7], vec![3]));
        assert_eq!(range(10, 4, -3).unwrap(), (vec![10, 7], vec![2]));
        assert_eq!(range(5, 0, -2).unwrap(), (vec![5, 3, 1], vec![3]));
        assert_eq!(range(3, 3, 1).unwrap(), (vec![], vec![0]));
        assert_eq!(range(3, 1, 1).unwrap(), (vec![], vec![0]));
        assert_eq!(range(i64::MIN, i64::MIN + 2, 1).unwrap().0, [i64::MIN, i64::MIN + 1]);
        let e = range(0, 9, 0).unwrap_err().to_string();
        assert!(e.contains("from 0 to 9 by 0"), "{e}");
        // From the most negative to the most positive int64: refused, not allocated.
        let e = range(i64::MIN, i64::MAX, 1).unwrap_err().to_string();
        assert!(e.contains("18446744073709551615") && e.contains(&MAX_INDICES.to_string()), "{e}");
    }

    #[test]
    fn dimensions_come_from_the_values_shapes() {
        // Range(0, N) * 3 + [[0], [1], [2]]: as_strided's indices over a batch of N.
        let n = IntTensor::Range { start: Dim::Const(0), limit: Dim::Of(1, 0), delta: Dim::Const(1) };
        let t = IntTensor::Bin(
            IntOp::Add,
            Box::new(IntTensor::Unsqueeze(Box::new(IntTensor::Bin(IntOp::Mul, Box::new(n), konst(&[3], &[]))), vec![0])),
            konst(&[0, 1, 2], &[3, 1]),
        );
        let mut refs = Vec::new();
        t.refs(&mut refs);
        assert_eq!((refs, t.rank()), (vec![1], 2));
        let shapes = [vec![], vec![2, 3]];
        assert_eq!(t.eval(&shapes).unwrap(), (vec![0, 3, 1, 4, 2, 5], vec![3, 2]));
        let squeezed = IntTensor::Squeeze(Box::new(IntTensor::Unsqueeze(Box::new(t.clone()), vec![1])), vec![1]);
        assert_eq!(squeezed.eval(&shapes).unwrap().1, [3, 2]);
        let e = IntTensor::Squeeze(Box::new(t.clone()), vec![0]).eval(&shapes).unwrap_err().to_string();
        assert!(e.contains("axis 0") && e.contains("[3, 2]"), "{e}");
        assert_eq!(IntTensor::Reshape(Box::new(t), vec![-1]).eval(&shapes).unwrap().1, [6]);
    }

    #[test]
    fn arithmetic_broadcasts_as_numpy_and_refuses_overflow() {
        let sub = IntTensor::Bin(IntOp::Sub, konst(&[10, 20], &[2, 1]), konst(&[1, 2, 3], &[3]));
        assert_eq!(sub.eval(&[]).unwrap(), (vec![9, 8, 7, 19, 18, 17], vec![2, 3]));
        // Division truncates towards zero.
        let div = IntTensor::Bin(IntOp::Div, konst(&[-7, 7], &[2]), konst(&[2], &[1]));
        assert_eq!(div.eval(&[]).unwrap().0, [-3, 3]);
        let e = IntTensor::Bin(IntOp::Add, konst(&[1, 2], &[2]), konst(&[1, 2, 3], &[3])).eval(&[]).unwrap_err().to_string();
        assert!(e.contains("[2] and [3]"), "{e}");
        let e = IntTensor::Bin(IntOp::Mul, konst(&[i64::MAX], &[]), konst(&[2], &[])).eval(&[]).unwrap_err().to_string();
        assert!(e.contains("no int64 result"), "{e}");
        let e = IntTensor::Bin(IntOp::Div, konst(&[1], &[]), konst(&[0], &[])).eval(&[]).unwrap_err().to_string();
        assert!(e.contains("Div 0"), "{e}");
        // 2^13 x 2^13 values from two short lists: refused before they are made.
        let (a, b) = (vec![0; 1 << 13], vec![0; 1 << 13]);
        let e = IntTensor::Bin(IntOp::Add, konst(&a, &[1 << 13, 1]), konst(&b, &[1 << 13])).eval(&[]).unwrap_err().to_string();
        assert!(e.contains("[8192, 8192]"), "{e}");
    }

    /// Gather by a loop over every output element, for comparison.
    fn naive(x: &Tensor<f64>, axis: usize, idx: &[i64], dims: &[usize]) -> Vec<f64> {
        let s = x.shape();
        let (outer, n, inner): (usize, usize, usize) = (s[..axis].iter().product(), s[axis], s[axis + 1..].iter().product());
        let mut out = Vec::new();
        for o in 0..outer {
            for &i in idx {
                let j = if i < 0 { i + n as i64 } else { i } as usize;
                out.extend_from_slice(&x.data()[(o * n + j) * inner..(o * n + j + 1) * inner]);
            }
        }
        assert_eq!(out.len(), outer * dims.iter().product::<usize>() * inner);
        out
    }

    #[test]
    fn gather_nd_picks_rows_by_leading_axes() {
        let x = Rng::seed(4).normal::<f64>(&[2, 3, 4], 0.0, 1.0).unwrap();
        let at = |i: usize, j: usize| x.data()[(i * 3 + j) * 4..(i * 3 + j + 1) * 4].to_vec();
        // Rows of two indices pick [4]-long slices; [2, 2, 2] indices give [2, 2, 4].
        let y = gather_nd(&Var::constant(x.clone()), &[1, 2, 0, 0, -1, -3, 0, 1], &[2, 2, 2]).unwrap();
        assert_eq!(y.shape(), [2, 2, 4]);
        assert_eq!(y.value().data(), [at(1, 2), at(0, 0), at(1, 0), at(0, 1)].concat());
        // Rows of one index pick whole [3, 4] blocks (one row alone: the block itself); of
        // three, single values.
        assert_eq!(gather_nd(&Var::constant(x.clone()), &[1], &[1]).unwrap().shape(), [3, 4]);
        assert_eq!(gather_nd(&Var::constant(x.clone()), &[1, 0], &[2, 1]).unwrap().shape(), [2, 3, 4]);
        let y = gather_nd(&Var::constant(x.clone()), &[0, 1, 3, 1, 0, 0], &[2, 3]).unwrap();
        assert_eq!(y.value().data(), [at(0, 1)[3], at(1, 0)[0]]);
        gradcheck(std::slice::from_ref(&x), 1e-6, |v| gather_nd(&v[0], &[1, 2, 0, 0, 1, 2], &[3, 2])).unwrap();
        let e = gather_nd(&Var::constant(x.clone()), &[0, 3], &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("index 3") && e.contains("axis 1"), "{e}");
        let e = gather_nd(&Var::constant(x.clone()), &[0; 4], &[1, 4]).unwrap_err().to_string();
        assert!(e.contains("index rows of 4"), "{e}");
    }

    #[test]
    fn gather_agrees_with_a_loop_and_its_gradient_with_finite_differences() {
        let x = Rng::seed(3).normal::<f64>(&[2, 5, 3], 0.0, 1.0).unwrap();
        // Runs, a repeat, a negative index, a scalar index, all of an axis.
        let cases: [(usize, &[i64], &[usize]); 5] =
            [(1, &[4, 0, 1, 2], &[2, 2]), (1, &[3, 3, -1], &[3]), (1, &[-5], &[]), (0, &[1, 0], &[2]), (2, &[0, 1, 2], &[1, 3])];
        for (axis, idx, dims) in cases {
            let y = gather(&Var::constant(x.clone()), axis, idx, dims).unwrap();
            let mut want_shape = x.shape()[..axis].to_vec();
            want_shape.extend(dims);
            want_shape.extend(&x.shape()[axis + 1..]);
            assert_eq!(y.shape(), want_shape, "{idx:?} along {axis}");
            assert_eq!(y.value().data(), naive(&x, axis, idx, dims), "{idx:?} along {axis}");
            gradcheck(std::slice::from_ref(&x), 1e-6, |v| gather(&v[0], axis, idx, dims)).unwrap();
        }
        let e = gather(&Var::constant(x.clone()), 1, &[5], &[1]).unwrap_err().to_string();
        assert!(e.contains("index 5") && e.contains("5 long") && e.contains("[2, 5, 3]"), "{e}");
        let e = gather(&Var::constant(x.clone()), 1, &[-6], &[1]).unwrap_err().to_string();
        assert!(e.contains("index -6"), "{e}");
        assert!(gather(&Var::constant(x.clone()), 1, &[], &[0]).unwrap_err().to_string().contains("empty"));
        // Every other index of a long axis: more runs than Stride slices.
        let long = Var::constant(Tensor::<f64>::zeros(&[2 * MAX_RUNS + 2]).unwrap());
        let every_other: Vec<i64> = (0..=MAX_RUNS as i64).map(|i| 2 * i).collect();
        let e = gather(&long, 0, &every_other, &[every_other.len()]).unwrap_err().to_string();
        assert!(e.contains(&format!("{} runs", MAX_RUNS + 1)), "{e}");
    }
}
