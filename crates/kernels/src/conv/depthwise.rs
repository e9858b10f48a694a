//! Direct kernels for one input channel per group (depthwise convolution, and single-channel
//! inputs such as MNIST's first layer). Each output plane is a sum of R*S shifted, scaled
//! copies of one input plane: no lowering, no zeros multiplied, and the inner loop runs over
//! the padding-free interior of a row.

use rayon::prelude::*;
use stride_tensor::Elem;

use super::im2col::valid_range;
use super::ConvGeom;

/// Calls `f(out_index, in_index)` for each (output q, input column) pair of one kernel tap
/// and output row, or nothing when the row falls in the padding.
#[inline(always)]
fn for_tap(
    g: &ConvGeom,
    r: usize,
    s: usize,
    op: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let ih = (op * g.stride.0 + r * g.dilation.0) as isize - g.pad.0 as isize;
    if ih < 0 || ih >= g.h as isize {
        return;
    }
    let off_w = (s * g.dilation.1) as isize - g.pad.2 as isize;
    let (q0, q1) = valid_range(g.q, g.stride.1, off_w, g.w);
    if q0 < q1 {
        let start = ih as usize * g.w + (q0 as isize * g.stride.1 as isize + off_w) as usize;
        f(op * g.q + q0, start, q1 - q0, g.stride.1);
    }
}

/// y[n, k] = bias[k] + sum_{r,s} w[k, 0, r, s] * shifted x[n, k / (K/groups)].
pub(crate) fn forward<T: Elem>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (pq, hw, rs) = (g.p * g.q, g.h * g.w, g.r * g.s);
    let mut y = vec![T::zero(); g.n * g.k * pq];
    y.par_chunks_mut(pq.max(1))
        .enumerate()
        .for_each(|(plane, out)| {
            let (n, k) = (plane / g.k, plane % g.k);
            let c = k / g.kg();
            let xin = &x[(n * g.c + c) * hw..(n * g.c + c + 1) * hw];
            out.fill(bias.map_or(T::zero(), |b| b[k]));
            for r in 0..g.r {
                for s in 0..g.s {
                    let wv = w[k * rs + r * g.s + s];
                    for op in 0..g.p {
                        for_tap(g, r, s, op, |o, i, len, st| {
                            let dst = &mut out[o..o + len];
                            if st == 1 {
                                for (d, &v) in dst.iter_mut().zip(&xin[i..i + len]) {
                                    *d += wv * v;
                                }
                            } else {
                                for (j, d) in dst.iter_mut().enumerate() {
                                    *d += wv * xin[i + j * st];
                                }
                            }
                        });
                    }
                }
            }
        });
    y
}

/// dx[n, c] = sum over the K/groups output channels of group c of the taps scattered back.
pub(crate) fn backward_data<T: Elem>(g: &ConvGeom, dy: &[T], w: &[T]) -> Vec<T> {
    let (pq, hw, rs, kg) = (g.p * g.q, g.h * g.w, g.r * g.s, g.kg());
    let mut dx = vec![T::zero(); g.n * g.c * hw];
    dx.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(plane, out)| {
            let (n, c) = (plane / g.c, plane % g.c);
            for k in c * kg..(c + 1) * kg {
                let dyk = &dy[(n * g.k + k) * pq..(n * g.k + k + 1) * pq];
                for r in 0..g.r {
                    for s in 0..g.s {
                        let wv = w[k * rs + r * g.s + s];
                        for op in 0..g.p {
                            for_tap(g, r, s, op, |o, i, len, st| {
                                for (j, &v) in dyk[o..o + len].iter().enumerate() {
                                    out[i + j * st] += wv * v;
                                }
                            });
                        }
                    }
                }
            }
        });
    dx
}

/// dw[k, 0, r, s] = sum_n sum_{p,q} dy[n, k, p, q] * x[n, c(k), p*sh + r*dh - pt, q*sw + s*dw - pl].
pub(crate) fn backward_filter<T: Elem>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
    let (pq, hw, rs) = (g.p * g.q, g.h * g.w, g.r * g.s);
    let mut dw = vec![T::zero(); g.k * rs];
    dw.par_chunks_mut(rs).enumerate().for_each(|(k, out)| {
        let c = k / g.kg();
        for n in 0..g.n {
            let dyk = &dy[(n * g.k + k) * pq..(n * g.k + k + 1) * pq];
            let xin = &x[(n * g.c + c) * hw..(n * g.c + c + 1) * hw];
            for r in 0..g.r {
                for s in 0..g.s {
                    let mut acc = T::zero();
                    for op in 0..g.p {
                        for_tap(g, r, s, op, |o, i, len, st| {
                            let d = &dyk[o..o + len];
                            if st == 1 {
                                acc += d
                                    .iter()
                                    .zip(&xin[i..i + len])
                                    .map(|(&a, &b)| a * b)
                                    .sum::<T>();
                            } else {
                                acc += d
                                    .iter()
                                    .enumerate()
                                    .map(|(j, &a)| a * xin[i + j * st])
                                    .sum::<T>();
                            }
                        });
                    }
                    out[r * g.s + s] += acc;
                }
            }
        }
    });
    dw
}
