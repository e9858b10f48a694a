//! Nearest-neighbour upsampling of NCHW planes by whole factors (U-Nets' and feature
//! pyramids' `nn.Upsample`, YOLO's necks) and its gradient: rows built once and copied, planes
//! in parallel.

use stride_tensor::Elem;

use crate::pool::planes;

/// `x` ([planes, h, w]) upsampled to [planes, h * sh, w * sw], each value repeated in a sh x sw
/// block.
pub fn upsample_nearest<T: Elem>(x: &[T], h: usize, w: usize, scale: (usize, usize)) -> Vec<T> {
    let mut y = vec![T::zero(); x.len() / (h * w).max(1) * h * scale.0 * w * scale.1];
    upsample_nearest_into(x, h, w, scale, &mut y);
    y
}

/// [`upsample_nearest`] into `y` (every value written): a plan's step, in any layout whose
/// planes lie whole and in the same order in input and output.
pub fn upsample_nearest_into<T: Elem>(x: &[T], h: usize, w: usize, (sh, sw): (usize, usize), y: &mut [T]) {
    let (oh, ow) = (h * sh, w * sw);
    assert_eq!(y.len(), x.len() / (h * w).max(1) * oh * ow, "upsample_nearest_into: output length");
    planes(x, h * w, y, oh * ow, |out, plane| {
        for (r, row) in plane.chunks_exact(w).enumerate() {
            let block = &mut out[r * sh * ow..(r + 1) * sh * ow];
            let (first, rest) = block.split_at_mut(ow);
            for (o, &v) in first.chunks_exact_mut(sw).zip(row) {
                o.fill(v);
            }
            for copy in rest.chunks_exact_mut(ow) {
                copy.copy_from_slice(first);
            }
        }
    });
}

/// The gradient of [`upsample_nearest`]: each input's sh x sw block of `g` summed, row by row
/// and left to right (the order of the output's elements).
pub fn upsample_nearest_backward<T: Elem>(g: &[T], h: usize, w: usize, (sh, sw): (usize, usize)) -> Vec<T> {
    let (oh, ow) = (h * sh, w * sw);
    let mut dx = vec![T::zero(); g.len() / (oh * ow).max(1) * h * w];
    planes(g, oh * ow, &mut dx, h * w, |out, plane| {
        for (orow, grow) in plane.chunks_exact(ow).enumerate() {
            let r = orow / sh;
            for (d, block) in out[r * w..(r + 1) * w].iter_mut().zip(grow.chunks_exact(sw)) {
                for &v in block {
                    *d += v;
                }
            }
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_and_its_gradient_agree_with_index_arithmetic() {
        for (p, h, w, s) in [(3, 2, 3, (2, 2)), (2, 3, 1, (1, 3)), (1, 1, 1, (3, 1)), (40, 5, 7, (2, 3))] {
            let x: Vec<f64> = (0..p * h * w).map(|i| (i as f64 * 0.37).sin()).collect();
            let (oh, ow) = (h * s.0, w * s.1);
            let want: Vec<f64> = (0..p * oh * ow).map(|i| x[(i / (oh * ow)) * h * w + (i % (oh * ow) / ow / s.0) * w + (i % ow) / s.1]).collect();
            assert_eq!(upsample_nearest(&x, h, w, s), want, "{p}x{h}x{w} by {s:?}");
            let g: Vec<f64> = (0..p * oh * ow).map(|i| (i as f64 * 0.11).cos()).collect();
            let mut dx = vec![0.0; x.len()];
            for (i, &v) in g.iter().enumerate() {
                dx[(i / (oh * ow)) * h * w + (i % (oh * ow) / ow / s.0) * w + (i % ow) / s.1] += v;
            }
            assert_eq!(upsample_nearest_backward(&g, h, w, s), dx, "{p}x{h}x{w} by {s:?}");
        }
    }
}
