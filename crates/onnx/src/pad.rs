//! ONNX's Pad in its four modes: a constant (Stride's zero padding, any value), and the border
//! made of the value's own entries: mirrored without the edge (`reflect`, PyTorch's
//! ReflectionPad2d, as CycleGAN's and style-transfer networks pad), the edge repeated (`edge`,
//! ReplicationPad2d) or the other end's entries (`wrap`, circular padding).
//!
//! The borders are gathers of the value's entries along each padded axis, so gradients go
//! back to the entries each border copies (summed where an entry is copied more than once) and
//! every device runs them.

use stride_autograd::{self as ag, Var};

use crate::indices::gather;

/// How the border is filled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum PadMode {
    Constant(f64),
    Reflect,
    Edge,
    Wrap,
}

impl PadMode {
    /// ONNX's `mode` attribute; None for a mode ONNX does not have.
    pub(crate) fn parse(mode: &str, value: f64) -> Option<PadMode> {
        Some(match mode {
            "constant" => PadMode::Constant(value),
            "reflect" => PadMode::Reflect,
            "edge" => PadMode::Edge,
            "wrap" => PadMode::Wrap,
            _ => return None,
        })
    }
}

/// `x` padded by `pads` (before, after) on each of its axes.
pub(crate) fn pad<T: ag::Elem>(x: &Var<T>, pads: &[(usize, usize)], mode: PadMode) -> ag::Result<Var<T>> {
    let s = x.shape();
    if pads.len() != s.len() {
        return Err(ag::Error::shape("Pad", format!("{} pads for a {}-d value", pads.len(), s.len())));
    }
    // Var::pad pads the last axes it is given: leading unpadded axes are left out.
    let first = pads.iter().position(|&p| p != (0, 0)).unwrap_or(pads.len());
    if first == pads.len() {
        return Ok(x.clone());
    }
    if let PadMode::Constant(value) = mode {
        return x.pad(&pads[first..], value);
    }
    let mut y = x.clone();
    for (axis, &(before, after)) in pads.iter().enumerate().filter(|(_, p)| **p != (0, 0)) {
        let n = s[axis] as i64;
        let (b, a) = (before as i64, after as i64);
        if n == 0 || (mode == PadMode::Reflect && (b >= n || a >= n)) {
            let why = format!("{mode:?} padding of axis {axis} ({n} long) by ({before}, {after}): each side must be shorter than the axis");
            return Err(ag::Error::shape("Pad", why));
        }
        let source = |i: i64| match mode {
            PadMode::Reflect if i < 0 => -i,
            PadMode::Reflect if i >= n => 2 * (n - 1) - i,
            PadMode::Edge => i.clamp(0, n - 1),
            PadMode::Wrap => i.rem_euclid(n),
            _ => i,
        };
        let at: Vec<i64> = (-b..n + a).map(source).collect();
        y = gather(&y, axis, &at, &[at.len()])?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_autograd::{gradcheck, Rng, Tensor};

    /// NumPy's np.pad on one row, by its definition.
    fn padded_row(row: &[f64], (b, a): (usize, usize), mode: PadMode) -> Vec<f64> {
        let n = row.len() as i64;
        (-(b as i64)..n + a as i64)
            .map(|i| match mode {
                PadMode::Constant(v) if i < 0 || i >= n => v,
                PadMode::Reflect if i < 0 => row[(-i) as usize],
                PadMode::Reflect if i >= n => row[(2 * (n - 1) - i) as usize],
                PadMode::Edge => row[i.clamp(0, n - 1) as usize],
                PadMode::Wrap => row[i.rem_euclid(n) as usize],
                _ => row[i as usize],
            })
            .collect()
    }

    #[test]
    fn each_mode_agrees_with_its_definition_and_its_gradient_with_finite_differences() {
        let mut rng = Rng::seed(3);
        let x = rng.normal::<f64>(&[2, 4, 5], 0.0, 1.0).unwrap();
        for mode in [PadMode::Constant(0.5), PadMode::Reflect, PadMode::Edge, PadMode::Wrap] {
            for pads in [[(0, 0), (0, 0), (2, 1)], [(0, 0), (3, 0), (1, 4)], [(1, 1), (0, 2), (0, 0)]] {
                if mode == PadMode::Reflect && pads.iter().zip(x.shape()).any(|(&(b, a), &n)| b >= n || a >= n) {
                    continue;
                }
                let y = pad(&Var::constant(x.clone()), &pads, mode).unwrap();
                // Pad the last axis of each row, then the middle, then the first: one axis at a time.
                let mut want = x.clone();
                for axis in (0..3).rev() {
                    let s = want.shape().to_vec();
                    let moved: Vec<usize> = (0..3).filter(|&a| a != axis).chain([axis]).collect();
                    let t = want.permute(&moved).unwrap();
                    let rows: Vec<f64> = t.data().chunks(s[axis]).flat_map(|r| padded_row(r, pads[axis], mode)).collect();
                    let mut ts: Vec<usize> = moved.iter().map(|&a| s[a]).collect();
                    ts[2] += pads[axis].0 + pads[axis].1;
                    let mut back = [0; 3];
                    for (i, &a) in moved.iter().enumerate() {
                        back[a] = i;
                    }
                    want = Tensor::from_vec(rows, &ts).unwrap().permute(&back).unwrap();
                }
                assert_eq!(y.shape(), want.shape(), "{mode:?} {pads:?}");
                assert_eq!(y.value().data(), want.data(), "{mode:?} {pads:?}");
                gradcheck(std::slice::from_ref(&x), 1e-6, |v| pad(&v[0], &pads, mode)?.square()).unwrap();
            }
        }
        let e = pad(&Var::constant(x.clone()), &[(0, 0), (0, 0), (5, 0)], PadMode::Reflect).unwrap_err().to_string();
        assert!(e.contains("axis 2 (5 long) by (5, 0)") && e.contains("shorter than the axis"), "{e}");
        let e = pad(&Var::constant(x), &[(0, 0), (1, 1)], PadMode::Edge).unwrap_err().to_string();
        assert!(e.contains("2 pads for a 3-d value"), "{e}");
    }
}
