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

/// log_softmax(x)_k = (x_k - max) - log(sum exp(x - max)). The difference to the maximum is
/// taken first: it is exact, where x_k - (max + log sum) would round to the spacing of large
/// logits (0.001 at 10,000).
pub fn log_softmax<T: Elem>(x: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    each_row(outer, dim, inner, |at| {
        let m = (0..dim).map(|k| x[at(k)]).fold(T::neg_infinity(), T::max);
        let log_sum = (0..dim).map(|k| (x[at(k)] - m).exp()).sum::<T>().ln();
        for k in 0..dim {
            let i = at(k);
            y[i] = (x[i] - m) - log_sum;
        }
    });
    y
}

/// softmax(x)_k = exp(x_k - max) / sum exp(x - max).
pub fn softmax<T: Elem>(x: &[T], outer: usize, dim: usize, inner: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    each_row(outer, dim, inner, |at| {
        let m = (0..dim).map(|k| x[at(k)]).fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for k in 0..dim {
            let i = at(k);
            y[i] = (x[i] - m).exp();
            sum += y[i];
        }
        let inv = T::one() / sum;
        for k in 0..dim {
            y[at(k)] *= inv;
        }
    });
    y
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

#[cfg(test)]
mod large_logits {
    /// Logits near 10,000 are spaced 0.001 apart in f32: the result must not round to that
    /// spacing (ONNX's test_softmax_large_number caught x - (max + log sum) doing so).
    #[test]
    fn softmax_and_log_softmax_keep_precision_for_large_logits() {
        let x = [10000.0f32, 10001.0, 10002.0, 10003.0];
        let exact: Vec<f64> = {
            let e: Vec<f64> = (0..4).map(|k| (k as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        let y = super::softmax(&x, 1, 4, 1);
        let ly = super::log_softmax(&x, 1, 4, 1);
        for k in 0..4 {
            assert!((y[k] as f64 - exact[k]).abs() < 1e-6 * exact[k], "softmax {k}: {} vs {}", y[k], exact[k]);
            assert!((ly[k] as f64 - exact[k].ln()).abs() < 1e-6, "log_softmax {k}: {} vs {}", ly[k], exact[k].ln());
        }
    }
}
