//! The naive convolution, straight from the definition, with plain loops. Slow and obviously
//! right: the oracle every fast path is tested against.

use stride_tensor::Elem;

use super::ConvGeom;

/// Visits every (image, output channel, output pixel, input channel of the group, tap) with
/// the flat indices of x, w and y; taps that land in the padding are skipped.
fn each_tap(g: &ConvGeom, mut f: impl FnMut(usize, usize, usize)) {
    for n in 0..g.n {
        for k in 0..g.k {
            let grp = k / g.kg();
            for p in 0..g.p {
                for q in 0..g.q {
                    let yi = ((n * g.k + k) * g.p + p) * g.q + q;
                    for cl in 0..g.cg() {
                        let c = grp * g.cg() + cl;
                        for r in 0..g.r {
                            for s in 0..g.s {
                                let ih = (p * g.stride.0 + r * g.dilation.0) as isize - g.pad.0 as isize;
                                let iw = (q * g.stride.1 + s * g.dilation.1) as isize - g.pad.2 as isize;
                                if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize {
                                    continue;
                                }
                                let xi = ((n * g.c + c) * g.h + ih as usize) * g.w + iw as usize;
                                let wi = ((k * g.cg() + cl) * g.r + r) * g.s + s;
                                f(xi, wi, yi);
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let pq = g.p * g.q;
    let mut y: Vec<T> = (0..g.n * g.k * pq).map(|i| bias.map_or(T::zero(), |b| b[(i / pq) % g.k])).collect();
    each_tap(g, |xi, wi, yi| y[yi] += x[xi] * w[wi]);
    y
}

pub fn backward_data<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T]) -> Vec<T> {
    let mut dx = vec![T::zero(); g.n * g.c * g.h * g.w];
    each_tap(g, |xi, wi, yi| dx[xi] += dy[yi] * w[wi]);
    dx
}

pub fn backward_filter<T: Elem>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
    let mut dw = vec![T::zero(); g.k * g.cg() * g.r * g.s];
    each_tap(g, |xi, wi, yi| dw[wi] += dy[yi] * x[xi]);
    dw
}
