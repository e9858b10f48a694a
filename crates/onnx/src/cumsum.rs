//! ONNX's CumSum: running sums along one axis, as position encodings count positions
//! (`mask.cumsum(1)` in EdgeNeXt's and DETR's sine encodings).
//!
//! The axis moved last, its rows multiplied by a 0/1 triangular matrix: one product, so
//! every device runs it and the gradient (the running sum the other way) comes from the
//! product's. The matrix is `n` x `n` for an axis of `n` entries, so the axis may be at most
//! [`MAX_LEN`] long.

use stride_autograd::{self as ag, Tensor, ToDevice, Var};

/// The longest axis Stride sums along (its matrix: 4,096^2 values).
pub(crate) const MAX_LEN: usize = 4096;

/// Running sums of `x` along `axis`: each entry the sum of those before it and itself (without
/// itself when `exclusive`; those after it when `reverse`).
pub(crate) fn cumsum<T: ag::Elem>(x: &Var<T>, axis: usize, exclusive: bool, reverse: bool) -> ag::Result<Var<T>> {
    let s = x.shape();
    let n = *s.get(axis).ok_or_else(|| ag::Error::arg("CumSum", format!("axis {axis} is out of range for a {}-d value", s.len())))?;
    if n > MAX_LEN {
        return Err(ag::Error::shape("CumSum", format!("axis {axis} of {s:?} has {n} entries; Stride sums along at most {MAX_LEN}")));
    }
    if s.contains(&0) {
        return Ok(x.clone());
    }
    // Entry j of the input counts towards entry i of the output where the matrix's (j, i) is 1.
    let counts = |j: usize, i: usize| match (exclusive, reverse) {
        (false, false) => j <= i,
        (true, false) => j < i,
        (false, true) => j >= i,
        (true, true) => j > i,
    };
    let m: Vec<T> = (0..n * n).map(|k| if counts(k / n, k % n) { T::one() } else { T::zero() }).collect();
    let m = Var::constant(Tensor::from_vec(m, &[n, n])?.to(x.device())?);
    let last = s.len() - 1;
    let mut perm: Vec<usize> = (0..s.len()).filter(|&a| a != axis).collect();
    perm.push(axis);
    let moved = if axis == last { x.clone() } else { x.permute(&perm)? };
    let ms = moved.shape();
    let rows = ms[..last].iter().product::<usize>();
    let y = moved.reshape(&[rows, n])?.matmul(&m)?.reshape(&ms)?;
    if axis == last {
        return Ok(y);
    }
    let mut back = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        back[p] = i;
    }
    y.permute(&back)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_autograd::{gradcheck, Rng};

    /// The running sums by their definition, one axis at a time.
    fn naive(x: &Tensor<f64>, axis: usize, exclusive: bool, reverse: bool) -> Vec<f64> {
        let s = x.shape();
        let (outer, n, inner) = (s[..axis].iter().product::<usize>(), s[axis], s[axis + 1..].iter().product::<usize>());
        let mut out = vec![0.0; x.numel()];
        for o in 0..outer {
            for r in 0..inner {
                let at = |i: usize| (o * n + i) * inner + r;
                for i in 0..n {
                    let take = |j: usize| if reverse { j > i || (!exclusive && j == i) } else { j < i || (!exclusive && j == i) };
                    out[at(i)] = (0..n).filter(|&j| take(j)).map(|j| x.data()[at(j)]).sum();
                }
            }
        }
        out
    }

    #[test]
    fn cumsum_agrees_with_its_definition_and_its_gradient_with_finite_differences() {
        let mut rng = Rng::seed(11);
        for shape in [&[5][..], &[3, 4], &[2, 3, 4]] {
            let x = rng.normal::<f64>(shape, 0.0, 1.0).unwrap();
            for axis in 0..shape.len() {
                for (exclusive, reverse) in [(false, false), (true, false), (false, true), (true, true)] {
                    let y = cumsum(&Var::constant(x.clone()), axis, exclusive, reverse).unwrap();
                    assert_eq!(y.shape(), shape);
                    let want = naive(&x, axis, exclusive, reverse);
                    for (i, (g, w)) in y.value().data().iter().zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-12, "{shape:?} axis {axis} exclusive {exclusive} reverse {reverse} at {i}: {g} against {w}");
                    }
                    gradcheck(std::slice::from_ref(&x), 1e-6, |v| cumsum(&v[0], axis, exclusive, reverse)?.mul(&v[0])).unwrap();
                }
            }
        }
        let v = Var::constant(Tensor::<f32>::zeros(&[2, MAX_LEN + 1]).unwrap());
        let e = cumsum(&v, 1, false, false).unwrap_err().to_string();
        assert!(e.contains("4097 entries") && e.contains("at most 4096"), "{e}");
        let e = cumsum(&v, 2, false, false).unwrap_err().to_string();
        assert!(e.contains("axis 2 is out of range for a 2-d value"), "{e}");
    }
}
