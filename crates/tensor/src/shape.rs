//! Shape arithmetic: element counts with overflow checks, strides, broadcasting.

use crate::{Error, ErrorKind, Result};

/// The largest tensor Stride will allocate, in elements (16 GiB of f32). A shape past this is
/// an error, never an allocation: shapes come from files and flags.
pub const MAX_ELEMENTS: usize = 1 << 32;

/// Number of elements of `shape`, refusing overflow and sizes past [`MAX_ELEMENTS`].
pub fn numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    let mut n: usize = 1;
    for &d in shape {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| Error::new(ErrorKind::TooLarge, op, format!("shape {shape:?} has more than {MAX_ELEMENTS} elements")))?;
    }
    Ok(n)
}

/// Row-major strides of a contiguous tensor of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The shape two operands broadcast to, NumPy's rule: align on the right, sizes equal or 1.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(Error::shape(op, format!("shapes {a:?} and {b:?} do not broadcast (axis {i}: {da} vs {db})"))),
        };
    }
    Ok(out)
}

/// Strides for reading a tensor of shape `from` as if it had the broadcast shape `to`:
/// broadcast axes get stride 0.
pub fn broadcast_strides(from: &[usize], to: &[usize]) -> Vec<usize> {
    let own = strides(from);
    let off = to.len() - from.len();
    (0..to.len()).map(|i| if i < off || from[i - off] == 1 { 0 } else { own[i - off] }).collect()
}

/// Checks that `axis < rank`.
pub fn check_axis(op: &'static str, axis: usize, shape: &[usize]) -> Result<()> {
    if axis >= shape.len() {
        return Err(Error::arg(op, format!("axis {axis} is out of range for shape {shape:?} (rank {})", shape.len())));
    }
    Ok(())
}
