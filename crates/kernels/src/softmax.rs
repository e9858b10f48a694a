//! Softmax and log-softmax along one axis of a tensor viewed as [outer, dim, inner].

use stride_tensor::Elem;

/// Calls `f(at)` once per softmax row, where `at(k)` is the flat index of the row's k-th entry.
fn each_row(outer: usize, dim: usize, inner: usize, mut f: impl FnMut(&dyn Fn(usize) -> usize)) {
    for o in 0..outer {
        for i in 0..inner {
            f(&|k| (o * dim + k) * inner + i);
        }
    }
}

/// log_softmax(x)_k = x_k - max - log(sum exp(x - max)).
pub fn log_softmax<T: Elem>(x: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    each_row(outer, dim, inner, |at| {
        let m = (0..dim).map(|k| x[at(k)]).fold(T::neg_infinity(), T::max);
        let lse = m + (0..dim).map(|k| (x[at(k)] - m).exp()).sum::<T>().ln();
        for k in 0..dim {
            let i = at(k);
            y[i] = x[i] - lse;
        }
    });
    y
}

pub fn softmax<T: Elem>(x: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    log_softmax(x, outer, dim, inner).into_iter().map(|v| v.exp()).collect()
}

/// dx = y * (dy - sum(dy * y)) for y = softmax(x).
pub fn softmax_backward<T: Elem>(y: &[T], dy: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    each_row(outer, dim, inner, |at| {
        let dot: T = (0..dim).map(|k| dy[at(k)] * y[at(k)]).sum();
        for k in 0..dim {
            let i = at(k);
            dx[i] = y[i] * (dy[i] - dot);
        }
    });
    dx
}

/// dx = dy - softmax * sum(dy) for y = log_softmax(x).
pub fn log_softmax_backward<T: Elem>(y: &[T], dy: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    each_row(outer, dim, inner, |at| {
        let s: T = (0..dim).map(|k| dy[at(k)]).sum();
        for k in 0..dim {
            let i = at(k);
            dx[i] = dy[i] - y[i].exp() * s;
        }
    });
    dx
}
