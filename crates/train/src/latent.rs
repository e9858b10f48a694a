//! Looking inside a trained VAE's code: where the encoder puts each class (the means of the
//! codes on a plane), how the generator morphs one digit into another along a straight line
//! between their codes, and, for a two-dimensional code, the whole map of what the generator
//! draws (Kingma and Welling's figure 4, Keras's `plot_latent_space`).

use stride_autograd::{no_grad, Tensor, ToDevice, Var};
use stride_data::{Batches, Dataset};
use stride_models::vae::Vae;
use stride_nn::Ctx;

use crate::{Result, TrainError};

/// The most held-out images [`codes`] encodes for a picture of the code: enough to show every
/// class's cloud, few enough that the principal axes of a 1,024-d code cost a few seconds.
pub const MAX_POINTS: usize = 2000;

/// The means of the codes of `indices` of `ds` (the encoder in evaluation mode, no draw):
/// [len, latent].
pub fn codes(model: &mut Vae, ds: &Dataset, indices: &[usize]) -> Result<Tensor<f32>> {
    let sub = ds.subset(indices).map_err(|e| TrainError::Config(e.to_string()))?;
    let device = stride_nn::device_of(model);
    let mut all = Vec::with_capacity(indices.len() * model.latent());
    no_grad(|| -> Result<()> {
        for b in Batches::new(&sub, 250, None, false) {
            let (mu, _) = model.encode(&Var::constant(b.images.to(device)?), &mut Ctx::eval())?;
            all.extend_from_slice(mu.value().to_host()?.data());
        }
        Ok(())
    })?;
    Ok(Tensor::from_vec(all, &[indices.len(), model.latent()])?)
}

/// Up to `max` indices spread evenly over `len` (a class-sorted set shows every class).
pub fn spread(len: usize, max: usize) -> Vec<usize> {
    let k = len.min(max);
    (0..k).map(|i| i * len / k).collect()
}

/// Points on a plane and what its two axes are.
#[derive(Clone, Debug, PartialEq)]
pub struct Plane {
    pub points: Vec<[f64; 2]>,
    /// The axes' names: "z1", "z2" for a two-dimensional code, else the principal components
    /// with the share of the codes' variance each carries, such as "pc1 (31%)".
    pub axes: [String; 2],
}

/// Codes [N, latent] on a plane: a two-dimensional code as it is, a one-dimensional one along
/// the horizontal axis, a longer one projected on its first two principal axes.
pub fn plane(codes: &Tensor<f32>) -> Result<Plane> {
    let &[n, d] = codes.shape() else {
        return Err(TrainError::Config(format!("codes must be [N, latent], got {:?}", codes.shape())));
    };
    let x: Vec<f64> = codes.data().iter().map(|&v| v as f64).collect();
    let at = |i: usize, j: usize| x[i * d + j];
    match d {
        1 => Ok(Plane { points: (0..n).map(|i| [at(i, 0), 0.0]).collect(), axes: ["z1".into(), String::new()] }),
        2 => Ok(Plane { points: (0..n).map(|i| [at(i, 0), at(i, 1)]).collect(), axes: ["z1".into(), "z2".into()] }),
        _ => {
            // Fewer points than two give fewer axes: the missing ones read 0.
            let Principal { axes, shares, mean } = principal(&x, n, d, 2);
            let project = |i: usize, k: usize| axes.get(k).map_or(0.0, |a| (0..d).map(|j| (at(i, j) - mean[j]) * a[j]).sum::<f64>());
            let share = |k: usize| 100.0 * shares.get(k).copied().unwrap_or(0.0);
            Ok(Plane {
                points: (0..n).map(|i| [project(i, 0), project(i, 1)]).collect(),
                axes: [format!("pc1 ({:.0}%)", share(0)), format!("pc2 ({:.0}%)", share(1))],
            })
        }
    }
}

/// The first `k` principal axes of the rows of `x` ([n, d], row-major): unit vectors, each
/// with the share of the total variance along it. Power iteration on the smaller of the
/// covariance (d x d) and the Gram matrix of the centred rows (n x n, whose eigenvectors give
/// the same axes through x: a layer of 13,520 values over 2,000 images costs a 2,000-square
/// matrix, not a 13,520-square one), each axis kept orthogonal to those before; an axis's sign
/// puts its largest entry positive, so the same codes always give the same picture.
pub fn principal_axes(x: &[f64], n: usize, d: usize, k: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
    let p = principal(x, n, d, k);
    (p.axes, p.shares)
}

/// [`principal_axes`] with the rows' mean they are centred on.
struct Principal {
    axes: Vec<Vec<f64>>,
    shares: Vec<f64>,
    mean: Vec<f64>,
}

fn principal(x: &[f64], n: usize, d: usize, k: usize) -> Principal {
    let mean: Vec<f64> = (0..d).map(|j| (0..n).map(|i| x[i * d + j]).sum::<f64>() / n.max(1) as f64).collect();
    let centred: Vec<f64> = x.chunks_exact(d.max(1)).flat_map(|row| row.iter().zip(&mean).map(|(v, m)| v - m)).collect();
    let none = |mean| Principal { axes: Vec::new(), shares: Vec::new(), mean };
    let Ok(xc) = Tensor::from_vec(centred, &[n, d]) else { return none(mean) };
    // The Gram matrix where there are fewer rows than columns.
    let gram = n < d;
    let Ok(m) = stride_autograd::matmul_tensors(&xc, !gram, &xc, gram) else { return none(mean) };
    let size = n.min(d);
    let m = m.data();
    let total: f64 = (0..size).map(|j| m[j * size + j]).sum();
    let orthogonal = |v: &mut Vec<f64>, axes: &[Vec<f64>]| {
        for a in axes {
            let p: f64 = v.iter().zip(a).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(a).for_each(|(x, y)| *x -= p * y);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        norm
    };
    let (mut eig, mut shares) = (Vec::<Vec<f64>>::new(), Vec::new());
    for j in 0..k.min(size) {
        // A start no axis of a real data set is orthogonal to.
        let mut v: Vec<f64> = (0..size).map(|i| 1.0 + 0.37 * ((i * 7 + j * 3) % 11) as f64).collect();
        orthogonal(&mut v, &eig);
        let mut lambda = 0.0;
        for _ in 0..1000 {
            let mut w: Vec<f64> = m.chunks_exact(size).map(|row| row.iter().zip(&v).map(|(c, x)| c * x).sum()).collect();
            lambda = orthogonal(&mut w, &eig);
            if lambda == 0.0 {
                break;
            }
            let moved = w.iter().zip(&v).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            v = w;
            if moved < 1e-12 {
                break;
            }
        }
        if lambda == 0.0 {
            // No variance left: any unit vector orthogonal to the ones before.
            v = (0..size).map(|i| if i == j { 1.0 } else { 0.0 }).collect();
            orthogonal(&mut v, &eig);
        }
        shares.push(if total > 0.0 { lambda / total } else { 0.0 });
        eig.push(v);
    }
    let axes = eig
        .into_iter()
        .enumerate()
        .map(|(j, e)| {
            // From the Gram matrix's eigenvector u, the axis is x^T u, normalised.
            let mut a = if gram { (0..d).map(|c| (0..n).map(|r| xc.data()[r * d + c] * e[r]).sum()).collect() } else { e };
            let norm = a.iter().map(|x: &f64| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                a.iter_mut().for_each(|x| *x /= norm);
            } else {
                a = (0..d).map(|i| if i == j { 1.0 } else { 0.0 }).collect();
            }
            let largest = a.iter().copied().fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
            if largest < 0.0 {
                a.iter_mut().for_each(|x| *x = -*x);
            }
            a
        })
        .collect();
    Principal { axes, shares, mean }
}

/// Morphs between held-out images of neighbouring classes (0 into 1, 2 into 3, ...; up to
/// `rows` pairs, each the first image of its class): `steps` images a row, generated from
/// evenly spaced points on the straight line between the two images' code means, the first
/// and last being the two reconstructions. Returns the images [rows x steps, 1, 32, 32] and
/// how many rows there are.
pub fn interpolation(model: &mut Vae, ds: &Dataset, rows: usize, steps: usize) -> Result<(Tensor<f32>, usize)> {
    if steps < 2 {
        return Err(TrainError::Config(format!("an interpolation needs at least 2 steps, got {steps}")));
    }
    let first = |c: usize| ds.labels.iter().position(|&l| l as usize == c);
    let pairs: Vec<[usize; 2]> = (0..ds.classes / 2).filter_map(|p| Some([first(2 * p)?, first(2 * p + 1)?])).take(rows).collect();
    if pairs.is_empty() {
        return Err(TrainError::Config(format!("no two neighbouring classes with images among the {} held-out ones", ds.len())));
    }
    let ends = codes(model, ds, &pairs.concat())?;
    let d = model.latent();
    let mut z = Vec::with_capacity(pairs.len() * steps * d);
    for p in 0..pairs.len() {
        let (a, b) = (&ends.data()[2 * p * d..(2 * p + 1) * d], &ends.data()[(2 * p + 1) * d..(2 * p + 2) * d]);
        for s in 0..steps {
            let t = s as f32 / (steps - 1) as f32;
            z.extend(a.iter().zip(b).map(|(&a, &b)| a + t * (b - a)));
        }
    }
    let z = Tensor::from_vec(z, &[pairs.len() * steps, d])?;
    Ok((generate(model, z)?, pairs.len()))
}

/// What the generator draws over a `side` x `side` grid of two-dimensional codes, z1 from -2
/// to 2 left to right and z2 from 2 to -2 top to bottom (about 95% of the prior each way), as
/// [side², 1, 32, 32] in rows. Only for a VAE with a two-dimensional code.
pub fn manifold(model: &mut Vae, side: usize) -> Result<Tensor<f32>> {
    if model.latent() != 2 {
        return Err(TrainError::Config(format!("the map of the code needs a two-dimensional code (--latent 2); this VAE's has {}", model.latent())));
    }
    if !(2..=64).contains(&side) {
        return Err(TrainError::Config(format!("the map of the code is 2..=64 images a side, asked for {side}")));
    }
    let at = |k: usize| -2.0 + 4.0 * k as f32 / (side - 1) as f32;
    let z: Vec<f32> = (0..side).flat_map(|r| (0..side).flat_map(move |c| [at(c), at(side - 1 - r)])).collect();
    generate(model, Tensor::from_vec(z, &[side * side, 2])?)
}

/// The generator in evaluation mode on codes `z`, back on the host.
fn generate(model: &mut Vae, z: Tensor<f32>) -> Result<Tensor<f32>> {
    let z = Var::constant(z.to(stride_nn::device_of(model))?);
    Ok(no_grad(|| model.generate(&z, &mut Ctx::eval()))?.value().to_host()?)
}
