//! ONNX's Where with a constant condition: each output element is taken from one branch or the
//! other, as PyTorch's `masked_fill` and the new exporter's adaptive pooling (masks of the
//! windows' second cell) write it.
//!
//! The condition is known when the file is read, so the choice is a fixed pattern of runs:
//! over the axes where the condition varies (the leading axes where it is 1, the batch and
//! channels, repeat the pattern) the output is the branches' slices joined. Copies only, so
//! infinite or NaN values stay where they are (a blend `c * x + (1 - c) * y` would spread them)
//! and gradients go to the branch each element came from.

use stride_autograd::{self as ag, Tensor, Var};

use crate::indices::{MAX_INDICES, MAX_RUNS};

/// The shape `a` and `b` broadcast to (NumPy's rule, either way round).
pub(crate) fn broadcast(op: &'static str, a: &[usize], b: &[usize]) -> ag::Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let at = |v: &[usize], i: usize| if i + v.len() >= rank { v[i + v.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => Err(ag::Error::shape(op, format!("{a:?} and {b:?} do not broadcast (axis {i}: {x} against {y})"))),
        })
        .collect()
}

/// Refuses a broadcast shape larger than `most` values (the largest the network holds) and
/// than 2^24: a file cannot make Stride allocate out of proportion to its input.
pub(crate) fn within(op: &'static str, what: &str, dims: &[usize], most: usize) -> ag::Result<()> {
    match dims.iter().try_fold(1usize, |p, &d| p.checked_mul(d)) {
        Some(n) if n <= most.max(MAX_INDICES) => Ok(()),
        n => {
            let n = n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
            let why = format!("{what} {dims:?} ({n} values) is larger than any value the network has computed and than {MAX_INDICES}; Stride broadcasts at most that far");
            Err(ag::Error::shape(op, why))
        }
    }
}

/// `x` broadcast to `dims` (which it broadcasts to).
pub(crate) fn widen<T: ag::Elem>(x: &Var<T>, dims: &[usize]) -> ag::Result<Var<T>> {
    if x.shape() == dims {
        return Ok(x.clone());
    }
    x.add(&Var::constant(Tensor::zeros(dims)?))
}

/// Where(cond, x, y): x where the condition holds, y elsewhere, all three broadcast together.
/// `most` bounds the output's size (the largest value the network holds); the condition over
/// the axes where it varies may have at most 2^24 elements and 4,096 runs.
pub(crate) fn select<T: ag::Elem>(cond: &[bool], cdims: &[usize], x: &Var<T>, y: &Var<T>, most: usize) -> ag::Result<Var<T>> {
    let out = broadcast("Where", &broadcast("Where", cdims, &x.shape())?, &y.shape())?;
    within("Where", "the branches and condition broadcast to", &out, most)?;
    if out.contains(&0) {
        return Ok(Var::constant(Tensor::zeros(&out)?));
    }
    // The condition right-aligned to the output; the pattern repeats over the leading axes
    // where it is 1.
    let rank = out.len();
    let c: Vec<usize> = (0..rank).map(|i| if i + cdims.len() >= rank { cdims[i + cdims.len() - rank] } else { 1 }).collect();
    let k = c.iter().position(|&d| d != 1).unwrap_or(rank);
    let (b, t): (usize, usize) = (out[..k].iter().product(), out[k..].iter().product());
    if t > MAX_INDICES {
        let why = format!("the condition {cdims:?} varies over {:?} ({t} elements); Stride selects over at most {MAX_INDICES}", &out[k..]);
        return Err(ag::Error::shape("Where", why));
    }
    // Each element of the repeating pattern, in order, and the runs of equal choices.
    let mut runs: Vec<(bool, usize, usize)> = Vec::new();
    let mut idx = vec![0usize; rank - k];
    for p in 0..t {
        let mut flat = 0;
        for (j, &i) in idx.iter().enumerate() {
            flat = flat * c[k + j] + if c[k + j] == 1 { 0 } else { i };
        }
        let take_x = cond[flat];
        match runs.last_mut() {
            Some((v, _, len)) if *v == take_x => *len += 1,
            _ => runs.push((take_x, p, 1)),
        }
        for j in (0..idx.len()).rev() {
            idx[j] += 1;
            if idx[j] < out[k + j] {
                break;
            }
            idx[j] = 0;
        }
    }
    match runs[..] {
        [(true, ..)] => return widen(x, &out),
        [(false, ..)] => return widen(y, &out),
        _ => {}
    }
    if runs.len() > MAX_RUNS {
        let why = format!("the condition {cdims:?} makes {} runs of one choice over {:?}; Stride selects at most {MAX_RUNS}", runs.len(), &out[k..]);
        return Err(ag::Error::shape("Where", why));
    }
    let (x2, y2) = (widen(x, &out)?.reshape(&[b, t])?, widen(y, &out)?.reshape(&[b, t])?);
    let parts = runs.iter().map(|&(from_x, start, len)| if from_x { &x2 } else { &y2 }.narrow(1, start, len)).collect::<ag::Result<Vec<_>>>()?;
    ag::concat(&parts.iter().collect::<Vec<_>>(), 1)?.reshape(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_autograd::{gradcheck, Rng};

    /// Element by element with NumPy's broadcasting.
    fn naive(cond: &[bool], cdims: &[usize], x: &Tensor<f64>, y: &Tensor<f64>) -> (Vec<usize>, Vec<f64>) {
        let out = broadcast("Where", &broadcast("Where", cdims, x.shape()).unwrap(), y.shape()).unwrap();
        let at = |dims: &[usize], idx: &[usize]| {
            let skip = idx.len() - dims.len();
            dims.iter().zip(&idx[skip..]).fold(0, |f, (&d, &i)| f * d + if d == 1 { 0 } else { i })
        };
        let n: usize = out.iter().product();
        let vals = (0..n)
            .map(|mut f| {
                let mut idx = vec![0; out.len()];
                for a in (0..out.len()).rev() {
                    idx[a] = f % out[a];
                    f /= out[a];
                }
                if cond[at(cdims, &idx)] {
                    x.data()[at(x.shape(), &idx)]
                } else {
                    y.data()[at(y.shape(), &idx)]
                }
            })
            .collect();
        (out, vals)
    }

    #[test]
    fn select_agrees_with_an_element_loop_and_its_gradient_with_finite_differences() {
        let mut rng = Rng::seed(3);
        // (condition, x, y): masks over trailing axes as the exporter writes them, a scalar
        // fill, a condition as large as the output, broadcasting both ways.
        let cases: [(&[usize], &[usize], &[usize]); 5] = [
            (&[3, 2, 1, 1], &[], &[2, 4, 3, 2, 3, 2]),
            (&[3, 2], &[2, 3, 3, 2], &[]),
            (&[2, 3], &[2, 3], &[2, 3]),
            (&[4, 1], &[1, 5], &[4, 5]),
            (&[1, 1], &[2, 2], &[2, 2]),
        ];
        for (cdims, xs, ys) in cases {
            let n: usize = cdims.iter().product();
            let cond: Vec<bool> = (0..n).map(|i| (i * 7 + 3) % 5 < 2).collect();
            let x = rng.normal::<f64>(xs, 0.0, 1.0).unwrap();
            let y = rng.normal::<f64>(ys, 0.0, 1.0).unwrap();
            let got = select(&cond, cdims, &Var::constant(x.clone()), &Var::constant(y.clone()), 1 << 20).unwrap();
            let (out, want) = naive(&cond, cdims, &x, &y);
            assert_eq!(got.shape(), out, "{cdims:?} {xs:?} {ys:?}");
            assert_eq!(got.value().data(), want, "{cdims:?} {xs:?} {ys:?}");
            gradcheck(&[x, y], 1e-6, |v| select(&cond, cdims, &v[0], &v[1], 1 << 20)).unwrap_or_else(|e| panic!("{cdims:?}: {e}"));
        }
    }

    #[test]
    fn infinities_and_nans_stay_in_their_branch() {
        let x = Var::constant(Tensor::from_vec(vec![0.0f32], &[]).unwrap());
        let y = Var::constant(Tensor::from_vec(vec![f32::INFINITY, f32::NAN, 1.0, -f32::INFINITY], &[4]).unwrap());
        let got = select(&[true, true, false, false], &[4], &x, &y, 16).unwrap();
        let d = got.value().data().to_vec();
        assert_eq!(d[..3], [0.0, 0.0, 1.0]);
        assert_eq!(d[3], f32::NEG_INFINITY);
    }

    #[test]
    fn shapes_that_do_not_broadcast_and_too_many_runs_are_refused_with_their_sizes() {
        let v = |s: &[usize]| Var::constant(Tensor::<f32>::zeros(s).unwrap());
        let e = select(&[true; 3], &[3], &v(&[4]), &v(&[3]), 16).unwrap_err().to_string();
        assert!(e.contains("[3] and [4] do not broadcast"), "{e}");
        let n = 2 * MAX_RUNS + 2;
        let alternate: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let e = select(&alternate, &[n], &v(&[]), &v(&[n]), n).unwrap_err().to_string();
        assert!(e.contains(&format!("makes {n} runs")), "{e}");
        let e = select(&[true], &[1, 1], &v(&[1, 1 << 13]), &v(&[1 << 12, 1]), 16).unwrap_err().to_string();
        assert!(e.contains("[4096, 8192]") && e.contains("33554432"), "{e}");
    }
}
