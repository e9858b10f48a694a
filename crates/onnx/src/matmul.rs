//! ONNX's MatMul of two values with NumPy's rules: 1-d operands as a row or a column, and
//! stacks of matrices ([..., M, K] x [..., K, N], the leading axes broadcast), as attention
//! blocks write them (YOLO11's C2PSA: queries times keys per head, then values times weights).
//!
//! A stack against one matrix is one product (the rows of the stack stacked); two stacks are a
//! product per matrix pair, each taken out of the stack and the results joined, so gradients
//! flow back through Stride's own product.

use stride_autograd::{self as ag, Var};

use crate::indices::MAX_RUNS;
use crate::select::{broadcast, widen};

/// `a` x `b` by NumPy's matmul rules.
pub(crate) fn matmul<T: ag::Elem>(a: &Var<T>, b: &Var<T>) -> ag::Result<Var<T>> {
    let (sa, sb) = (a.shape(), b.shape());
    if sa.is_empty() || sb.is_empty() {
        return Err(ag::Error::shape("MatMul", format!("needs at least 1-d operands; got {sa:?} and {sb:?}")));
    }
    // 1-d operands: a row on the left, a column on the right, the axis dropped afterwards.
    let a2 = if sa.len() == 1 { a.reshape(&[1, sa[0]])? } else { a.clone() };
    let b2 = if sb.len() == 1 { b.reshape(&[sb[0], 1])? } else { b.clone() };
    let (da, db) = (a2.shape(), b2.shape());
    let (m, k, n) = (da[da.len() - 2], da[da.len() - 1], db[db.len() - 1]);
    if db[db.len() - 2] != k {
        return Err(ag::Error::shape("MatMul", format!("{sa:?} x {sb:?}: the inner dimensions differ ({k} against {})", db[db.len() - 2])));
    }
    let batch = broadcast("MatMul", &da[..da.len() - 2], &db[..db.len() - 2])?;
    let count = batch
        .iter()
        .try_fold(1usize, |p, &d| p.checked_mul(d))
        .ok_or_else(|| ag::Error::shape("MatMul", format!("{sa:?} x {sb:?}: too many matrices")))?;
    let y = if db.len() == 2 {
        // A stack against one matrix: one product over all the stack's rows.
        a2.reshape(&[count * m, k])?.matmul(&b2)?
    } else {
        if count > MAX_RUNS {
            let why = format!("{sa:?} x {sb:?} is {count} products; Stride multiplies at most {MAX_RUNS} pairs of matrices");
            return Err(ag::Error::shape("MatMul", why));
        }
        let a3 = widen(&a2, &[&batch[..], &[m, k]].concat())?.reshape(&[count, m, k])?;
        let b3 = widen(&b2, &[&batch[..], &[k, n]].concat())?.reshape(&[count, k, n])?;
        let parts = (0..count)
            .map(|i| a3.narrow(0, i, 1)?.reshape(&[m, k])?.matmul(&b3.narrow(0, i, 1)?.reshape(&[k, n])?))
            .collect::<ag::Result<Vec<_>>>()?;
        ag::concat(&parts.iter().collect::<Vec<_>>(), 0)?
    };
    let mut out = batch;
    if sa.len() > 1 {
        out.push(m);
    }
    if sb.len() > 1 {
        out.push(n);
    }
    y.reshape(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_autograd::{gradcheck, Rng, Tensor};

    /// NumPy's matmul element by element.
    fn naive(a: &Tensor<f64>, b: &Tensor<f64>) -> (Vec<usize>, Vec<f64>) {
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        let da = if sa.len() == 1 { vec![1, sa[0]] } else { sa.clone() };
        let db = if sb.len() == 1 { vec![sb[0], 1] } else { sb.clone() };
        let (m, k, n) = (da[da.len() - 2], da[da.len() - 1], db[db.len() - 1]);
        let batch = broadcast("MatMul", &da[..da.len() - 2], &db[..db.len() - 2]).unwrap();
        // The flat index of matrix `idx` (a batch position) in a stack of `dims`.
        let start = |dims: &[usize], idx: &[usize]| {
            let bd = &dims[..dims.len() - 2];
            let skip = idx.len() - bd.len();
            bd.iter().zip(&idx[skip..]).fold(0, |f, (&d, &i)| f * d + if d == 1 { 0 } else { i }) * dims[dims.len() - 2] * dims[dims.len() - 1]
        };
        let count: usize = batch.iter().product();
        let mut vals = Vec::new();
        for mut f in 0..count {
            let mut idx = vec![0; batch.len()];
            for ax in (0..batch.len()).rev() {
                idx[ax] = f % batch[ax];
                f /= batch[ax];
            }
            let (oa, ob) = (start(&da, &idx), start(&db, &idx));
            for i in 0..m {
                for j in 0..n {
                    vals.push((0..k).map(|t| a.data()[oa + i * k + t] * b.data()[ob + t * n + j]).sum());
                }
            }
        }
        let mut out = batch;
        if sa.len() > 1 {
            out.push(m);
        }
        if sb.len() > 1 {
            out.push(n);
        }
        (out, vals)
    }

    #[test]
    fn matmul_agrees_with_numpy_rules_and_its_gradient_with_finite_differences() {
        let mut rng = Rng::seed(11);
        let cases: [(&[usize], &[usize]); 8] = [
            (&[3, 4], &[4, 2]),
            (&[4], &[4, 2]),
            (&[3, 4], &[4]),
            (&[2, 3, 4], &[4, 5]),
            (&[1, 2, 3, 4], &[1, 2, 4, 3]),
            (&[2, 1, 3, 4], &[3, 4, 2]),
            (&[4], &[2, 4, 3]),
            (&[2, 3, 4], &[4]),
        ];
        for (sa, sb) in cases {
            let a = rng.normal::<f64>(sa, 0.0, 1.0).unwrap();
            let b = rng.normal::<f64>(sb, 0.0, 1.0).unwrap();
            let got = matmul(&Var::constant(a.clone()), &Var::constant(b.clone())).unwrap();
            let (shape, want) = naive(&a, &b);
            assert_eq!(got.shape(), shape, "{sa:?} x {sb:?}");
            for (g, w) in got.value().data().iter().zip(&want) {
                assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()), "{sa:?} x {sb:?}: {g} against {w}");
            }
            gradcheck(&[a, b], 1e-6, |v| matmul(&v[0], &v[1])).unwrap_or_else(|e| panic!("{sa:?} x {sb:?}: {e}"));
        }
    }

    #[test]
    fn operands_that_do_not_fit_are_refused_with_their_shapes() {
        let v = |s: &[usize]| Var::constant(Tensor::<f32>::zeros(s).unwrap());
        let e = matmul(&v(&[2, 3, 4]), &v(&[2, 5, 6])).unwrap_err().to_string();
        assert!(e.contains("[2, 3, 4] x [2, 5, 6]: the inner dimensions differ (4 against 5)"), "{e}");
        let e = matmul(&v(&[2, 3, 4]), &v(&[3, 4, 6])).unwrap_err().to_string();
        assert!(e.contains("[2] and [3] do not broadcast"), "{e}");
        let e = matmul(&v(&[MAX_RUNS + 1, 1, 1]), &v(&[1, 1, 1])).unwrap_err().to_string();
        assert!(e.contains(&format!("is {} products", MAX_RUNS + 1)), "{e}");
        let e = matmul(&v(&[]), &v(&[2])).unwrap_err().to_string();
        assert!(e.contains("at least 1-d"), "{e}");
    }
}
