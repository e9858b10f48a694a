//! ONNX's Resize (and the older Upsample) of [N, C, H, W] values: nearest and linear sampling
//! under each coordinate rule PyTorch and Keras export (`F.interpolate`, `nn.Upsample`, U-Nets'
//! and segmentation heads' upsampling).
//!
//! Nearest by whole factors from the top-left corner (PyTorch's default) is Stride's own
//! upsampling. Everything else is a fixed linear map per spatial axis, y = A_H x A_W^T with A
//! [out, in] holding each output's one weight (nearest) or two (linear) per input position,
//! applied as two products with constant matrices, so the gradient flows back through Stride's
//! own product. Exact for finite values; an infinite or NaN input spreads along its row, where
//! a gather would keep it to the outputs that read it.

use stride_autograd::{self as ag, Tensor, Var};

use crate::indices::MAX_INDICES;

/// ONNX's coordinate_transformation_mode: where output position o samples the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coord {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
}

/// ONNX's nearest_mode: how a fractional source position picks a pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Nearest {
    Floor,
    Ceil,
    RoundPreferFloor,
    RoundPreferCeil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sample {
    Nearest(Nearest),
    Linear,
}

/// Where output position `o` samples an axis of `len`, `scale` the factor the file gives (or
/// out / len when it gives sizes). As ONNX's reference, the resized length in these rules is
/// len x scale, not rounded: with factors, align_corners meets the ends of that length.
fn source(o: usize, len: usize, scale: f64, coord: Coord) -> f64 {
    let (o, out) = (o as f64, len as f64 * scale);
    match coord {
        Coord::HalfPixel => (o + 0.5) / scale - 0.5,
        Coord::PytorchHalfPixel if out > 1.0 => (o + 0.5) / scale - 0.5,
        Coord::PytorchHalfPixel => 0.0,
        Coord::AlignCorners if out > 1.0 => o * (len as f64 - 1.0) / (out - 1.0),
        Coord::AlignCorners => 0.0,
        Coord::Asymmetric => o / scale,
    }
}

/// The [out, len] matrix of one axis: row o holds the weights output o gives each input.
fn weights(out: usize, len: usize, scale: f64, coord: Coord, sample: Sample) -> Vec<f64> {
    let mut a = vec![0.0f64; out * len];
    let last = len as f64 - 1.0;
    for o in 0..out {
        let x = source(o, len, scale, coord);
        let row = &mut a[o * len..(o + 1) * len];
        match sample {
            Sample::Nearest(mode) => {
                let frac = x - x.floor();
                let i = match mode {
                    Nearest::Floor => x.floor(),
                    Nearest::Ceil => x.ceil(),
                    Nearest::RoundPreferFloor if frac == 0.5 => x.floor(),
                    Nearest::RoundPreferCeil if frac == 0.5 => x.ceil(),
                    Nearest::RoundPreferFloor | Nearest::RoundPreferCeil => x.round(),
                };
                row[i.clamp(0.0, last) as usize] = 1.0;
            }
            Sample::Linear => {
                let x = x.clamp(0.0, last);
                let x0 = x.floor();
                let f = x - x0;
                let (i0, i1) = (x0 as usize, (x0 as usize + 1).min(len - 1));
                row[i0] += 1.0 - f;
                row[i1] += f;
            }
        }
    }
    a
}

/// The whole factor `out / len` when output o reads input o / factor (nearest, from the top-left
/// corner, rounding down), else None.
fn whole_factor(out: usize, len: usize, scale: f64, coord: Coord, sample: Sample) -> Option<usize> {
    if sample != Sample::Nearest(Nearest::Floor) || coord != Coord::Asymmetric || !out.is_multiple_of(len) || scale != (out / len) as f64 {
        return None;
    }
    Some(out / len)
}

/// `x` [N, C, H, W] resized to `size` (H', W'), `scales` the factors the file gave (or None:
/// from the sizes). `most` is the largest value the network has computed: the output may not be
/// more than 64 times that (or 2^24 values).
pub(crate) fn resize<T: ag::Elem>(
    x: &Var<T>,
    size: (usize, usize),
    scales: Option<(f64, f64)>,
    coord: Coord,
    sample: Sample,
    most: usize,
) -> ag::Result<Var<T>> {
    let s = x.shape();
    let [n, c, h, w] = s[..] else {
        return Err(ag::Error::shape("Resize", format!("Stride resizes [N, C, H, W] values; got {s:?}")));
    };
    let (oh, ow) = size;
    let bound = most.saturating_mul(64).max(MAX_INDICES);
    let values = [n, c, oh, ow].iter().try_fold(1usize, |p, &d| p.checked_mul(d)).filter(|&v| v <= bound);
    if oh == 0 || ow == 0 || values.is_none() || oh.saturating_mul(h) > bound || ow.saturating_mul(w) > bound {
        return Err(ag::Error::shape(
            "Resize",
            format!("{s:?} to {oh}x{ow}: empty, or over 64 times the largest value computed ({most}) and over {MAX_INDICES} values"),
        ));
    }
    let (sh, sw) = scales.unwrap_or((oh as f64 / h as f64, ow as f64 / w as f64));
    if let (Some(fh), Some(fw)) = (whole_factor(oh, h, sh, coord, sample), whole_factor(ow, w, sw, coord, sample)) {
        return x.upsample_nearest2d((fh, fw));
    }
    // Along W: [N C H, W] x A_W^T; then along H with H made the last axis.
    let matrix = |out: usize, len: usize, scale: f64| -> ag::Result<Var<T>> {
        Ok(Var::constant(Tensor::from_vec(weights(out, len, scale, coord, sample).into_iter().map(T::c).collect(), &[out, len])?))
    };
    let (a_w, a_h) = (matrix(ow, w, sw)?, matrix(oh, h, sh)?);
    let y = if ow == w && sw == 1.0 { x.clone() } else { x.reshape(&[n * c * h, w])?.matmul_t(&a_w)?.reshape(&[n, c, h, ow])? };
    if oh == h && sh == 1.0 {
        return Ok(y);
    }
    let t = y.permute(&[0, 1, 3, 2])?.reshape(&[n * c * ow, h])?.matmul_t(&a_h)?;
    t.reshape(&[n, c, ow, oh])?.permute(&[0, 1, 3, 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One axis resized by a direct loop of the coordinate rule (the ONNX reference's way).
    fn reference(x: &[f32], out: usize, scale: f64, coord: Coord, sample: Sample) -> Vec<f32> {
        let len = x.len();
        (0..out)
            .map(|o| {
                let s = source(o, len, scale, coord);
                match sample {
                    Sample::Linear => {
                        let s = s.clamp(0.0, len as f64 - 1.0);
                        let (i, f) = (s.floor() as usize, s - s.floor());
                        let j = (i + 1).min(len - 1);
                        (x[i] as f64 * (1.0 - f) + x[j] as f64 * f) as f32
                    }
                    Sample::Nearest(_) => {
                        let a = weights(out, len, scale, coord, sample);
                        x[a[o * len..(o + 1) * len].iter().position(|&v| v == 1.0).unwrap()]
                    }
                }
            })
            .collect()
    }

    #[test]
    fn linear_follows_each_coordinate_rule_and_pytorchs_known_values() {
        // F.interpolate([1, 2, 3, 4], scale_factor=2, mode="linear", align_corners=False):
        // 1, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75, 4 (PyTorch's output).
        let x = Var::constant(Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[1, 1, 1, 4]).unwrap());
        let y = resize(&x, (1, 8), Some((1.0, 2.0)), Coord::HalfPixel, Sample::Linear, 4).unwrap();
        assert_eq!(y.value().data(), [1.0, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75, 4.0]);
        // align_corners=True, size 7: the ends meet the ends, steps of 0.5.
        let y = resize(&x, (1, 7), None, Coord::AlignCorners, Sample::Linear, 4).unwrap();
        assert_eq!(y.value().data(), [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]);
        // Every rule, up and down, against the one-axis loop, on a 2-d map (both axes).
        let data: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let x = Var::constant(Tensor::from_vec(data.clone(), &[1, 1, 5, 6]).unwrap());
        for coord in [Coord::HalfPixel, Coord::PytorchHalfPixel, Coord::AlignCorners, Coord::Asymmetric] {
            for sample in [Sample::Linear, Sample::Nearest(Nearest::RoundPreferFloor), Sample::Nearest(Nearest::Ceil)] {
                for (oh, ow) in [(10, 9), (3, 4), (5, 13)] {
                    let y = resize(&x, (oh, ow), None, coord, sample, 30).unwrap().value();
                    assert_eq!(y.shape(), [1, 1, oh, ow]);
                    let rows: Vec<Vec<f32>> = data.chunks(6).map(|r| reference(r, ow, ow as f64 / 6.0, coord, sample)).collect();
                    for j in 0..ow {
                        let col: Vec<f32> = rows.iter().map(|r| r[j]).collect();
                        let want = reference(&col, oh, oh as f64 / 5.0, coord, sample);
                        for (i, w) in want.iter().enumerate() {
                            let got = y.data()[i * ow + j];
                            assert!((got - w).abs() <= 1e-5, "{coord:?} {sample:?} to {oh}x{ow} at ({i}, {j}): {got} against {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_gradient_agrees_with_finite_differences() {
        let x = stride_autograd::Rng::seed(2).normal::<f64>(&[2, 2, 3, 4], 0.0, 1.0).unwrap();
        for (coord, sample, size) in [
            (Coord::HalfPixel, Sample::Linear, (6, 8)),
            (Coord::AlignCorners, Sample::Linear, (2, 7)),
            (Coord::Asymmetric, Sample::Nearest(Nearest::Floor), (6, 8)),
            (Coord::HalfPixel, Sample::Nearest(Nearest::RoundPreferCeil), (5, 3)),
        ] {
            stride_autograd::gradcheck(std::slice::from_ref(&x), 1e-6, |v| resize(&v[0], size, None, coord, sample, 48))
                .unwrap_or_else(|e| panic!("{coord:?} {sample:?} to {size:?}: {e}"));
        }
    }

    #[test]
    fn nearest_by_whole_factors_is_strides_upsampling_and_the_output_is_bounded() {
        let x = Var::constant(Tensor::from_vec((0..12).map(|v| v as f32).collect(), &[1, 3, 2, 2]).unwrap());
        let y = resize(&x, (4, 6), Some((2.0, 3.0)), Coord::Asymmetric, Sample::Nearest(Nearest::Floor), 12).unwrap();
        assert_eq!(y.value(), x.upsample_nearest2d((2, 3)).unwrap().value());
        assert!(whole_factor(4, 2, 2.0, Coord::Asymmetric, Sample::Nearest(Nearest::Floor)).is_some());
        assert!(whole_factor(4, 2, 2.0, Coord::HalfPixel, Sample::Nearest(Nearest::Floor)).is_none());
        let e = resize(&x, (1 << 20, 1 << 20), None, Coord::Asymmetric, Sample::Linear, 12).unwrap_err().to_string();
        assert!(e.contains("1048576x1048576"), "{e}");
        assert!(resize(&x, (0, 3), None, Coord::Asymmetric, Sample::Linear, 12).is_err());
        let flat = Var::constant(Tensor::from_vec(vec![1.0f32; 4], &[2, 2]).unwrap());
        assert!(resize(&flat, (4, 4), None, Coord::Asymmetric, Sample::Linear, 4).unwrap_err().to_string().contains("[N, C, H, W]"));
    }
}
