//! ONNX's InstanceNormalization: each sample's channel shifted to mean 0 and scaled to variance
//! 1 over its positions (the biased variance, plus epsilon), then a scale and shift per
//! channel. PyTorch's GroupNorm exports to it (the channels viewed as [N, groups, rest], an
//! instance norm with unit scale, the per-channel affine after), as PoolFormer's and
//! MobileViT-v2's blocks and detection heads use it. And BatchNormalization in training mode,
//! the same over the batch too (the statistics of the values at hand, as NFNet's weight
//! standardisation writes it). Composite, so gradients and every device come from the ops it is
//! made of.

use stride_autograd::{self as ag, Var};

/// Instance normalisation of `x` ([N, C, ...], at least 3-d) with `scale` and `bias` of [C];
/// with `over_batch`, batch normalisation by the statistics of `x` itself (training mode).
pub(crate) fn normalize<T: ag::Elem>(x: &Var<T>, over_batch: bool, scale: &Var<T>, bias: &Var<T>, eps: f64) -> ag::Result<Var<T>> {
    let s = x.shape();
    let op = if over_batch { "BatchNormalization" } else { "InstanceNormalization" };
    if s.len() < 2 + usize::from(!over_batch) || scale.shape() != [s[1]] || bias.shape() != [s[1]] {
        let why = format!("takes [N, C, ...] with a scale and bias of [C]; got {s:?} with {:?} and {:?}", scale.shape(), bias.shape());
        return Err(ag::Error::shape(op, why));
    }
    let axes: Vec<usize> = (0..s.len()).filter(|&a| a >= 2 || (over_batch && a == 0)).collect();
    let centred = x.sub(&x.mean(&axes, true)?)?;
    let inv_std = centred.square()?.mean(&axes, true)?.add_scalar(eps)?.powf(-0.5)?;
    let per_channel: Vec<usize> = s.iter().enumerate().map(|(i, &d)| if i == 1 { d } else { 1 }).collect();
    centred.mul(&inv_std)?.mul(&scale.reshape(&per_channel)?)?.add(&bias.reshape(&per_channel)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_autograd::{gradcheck, Rng, Tensor};

    #[test]
    fn instance_norm_agrees_with_its_definition_and_its_gradient_with_finite_differences() {
        let mut rng = Rng::seed(5);
        for shape in [&[2, 3, 4, 5][..], &[3, 2, 7]] {
            let x = rng.normal::<f64>(shape, 1.0, 2.0).unwrap();
            let (scale, bias) = (rng.normal::<f64>(&[shape[1]], 1.0, 0.5).unwrap(), rng.normal::<f64>(&[shape[1]], 0.0, 0.5).unwrap());
            let y = normalize(&Var::constant(x.clone()), false, &Var::constant(scale.clone()), &Var::constant(bias.clone()), 1e-5).unwrap();
            let (c, len) = (shape[1], shape[2..].iter().product::<usize>());
            for (i, plane) in x.data().chunks(len).enumerate() {
                let mean = plane.iter().sum::<f64>() / len as f64;
                let var = plane.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / len as f64;
                for (j, v) in plane.iter().enumerate() {
                    let want = (v - mean) / (var + 1e-5).sqrt() * scale.data()[i % c] + bias.data()[i % c];
                    let got = y.value().data()[i * len + j];
                    assert!((got - want).abs() <= 1e-12 * (1.0 + want.abs()), "{shape:?} at {i}, {j}: {got} against {want}");
                }
            }
            gradcheck(&[x, scale, bias], 1e-6, |v| normalize(&v[0], false, &v[1], &v[2], 1e-5)).unwrap();
        }
        // Over the batch: each channel by its statistics over N and the positions.
        let x = rng.normal::<f64>(&[3, 2, 4], 0.5, 1.5).unwrap();
        let (scale, bias) = (rng.normal::<f64>(&[2], 1.0, 0.5).unwrap(), rng.normal::<f64>(&[2], 0.0, 0.5).unwrap());
        let y = normalize(&Var::constant(x.clone()), true, &Var::constant(scale.clone()), &Var::constant(bias.clone()), 1e-5).unwrap();
        for c in 0..2 {
            let at: Vec<usize> = (0..3).flat_map(|n| (0..4).map(move |p| (n * 2 + c) * 4 + p)).collect();
            let mean = at.iter().map(|&i| x.data()[i]).sum::<f64>() / 12.0;
            let var = at.iter().map(|&i| (x.data()[i] - mean).powi(2)).sum::<f64>() / 12.0;
            for &i in &at {
                let want = (x.data()[i] - mean) / (var + 1e-5).sqrt() * scale.data()[c] + bias.data()[c];
                assert!((y.value().data()[i] - want).abs() <= 1e-12 * (1.0 + want.abs()), "channel {c} at {i}");
            }
        }
        gradcheck(&[x, scale, bias], 1e-6, |v| normalize(&v[0], true, &v[1], &v[2], 1e-5)).unwrap();
        let v = |s: &[usize]| Var::constant(Tensor::<f32>::zeros(s).unwrap());
        let e = normalize(&v(&[2, 3]), false, &v(&[3]), &v(&[3]), 1e-5).unwrap_err().to_string();
        assert!(e.contains("takes [N, C, ...]") && e.contains("[2, 3]"), "{e}");
    }
}
