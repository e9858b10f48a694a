//! Pictures of what a network computes: feature maps and filters as image grids, and Grad-CAM
//! heat maps over the input (Selvaraju et al., 2017).

use std::path::Path;

use image::{GrayImage, Luma, Rgb, RgbImage};
use stride_autograd::{Tensor, ToDevice, Var};
use stride_nn::{Ctx, Module, Trace};

use crate::{checkpoint, Result, TrainError};

/// Tiles smaller than this many pixels a side are enlarged (by whole pixels) to be visible.
const MIN_TILE: usize = 48;
const GAP: usize = 2;

/// Runs `model` (evaluation mode, gradients recorded) on `x` [1, C, H, W] with a trace. A
/// failure after some layers ran (an image size the dense head cannot take) still returns the
/// layers traced before it, with the error.
pub fn traced(model: &mut dyn Module, x: &Var) -> (Trace, Option<Var>, Option<crate::TrainError>) {
    let mut ctx = Ctx::eval();
    ctx.trace = Some(Trace::new());
    let out = model.forward(x, &mut ctx);
    let trace = ctx.trace.take().unwrap_or_default();
    match out {
        Ok(y) => (trace, Some(y), None),
        Err(e) => (trace, None, Some(e.into())),
    }
}

/// Scales `v` linearly so its minimum is 0 and maximum 1 (all 0.5 when flat).
fn unit(v: &[f32]) -> Vec<f32> {
    let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
    if hi - lo <= f32::EPSILON * hi.abs().max(1.0) || !lo.is_finite() || !hi.is_finite() {
        return vec![0.5; v.len()];
    }
    v.iter().map(|&x| (x - lo) / (hi - lo)).collect()
}

fn scale_for(h: usize, w: usize) -> usize {
    MIN_TILE.div_ceil(h.max(w).max(1)).max(1)
}

/// Feature maps [1, C, H, W] as a grayscale grid of the first `max` channels, each scaled to
/// its own range (white = its largest activation), on a mid-gray background.
pub fn feature_grid(maps: &Tensor<f32>, max: usize) -> Result<GrayImage> {
    let &[_, c, h, w] = maps.shape() else {
        return Err(TrainError::Config(format!("feature maps must be [N, C, H, W], got {:?}", maps.shape())));
    };
    let n = c.min(max.max(1));
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let s = scale_for(h, w);
    let (th, tw) = (h * s, w * s);
    let mut grid = GrayImage::from_pixel((cols * (tw + GAP) + GAP) as u32, (rows * (th + GAP) + GAP) as u32, Luma([128]));
    for (i, plane) in maps.data().chunks_exact(h * w).take(n).enumerate() {
        let v = unit(plane);
        let (x0, y0) = (GAP + (i % cols) * (tw + GAP), GAP + (i / cols) * (th + GAP));
        for y in 0..th {
            for x in 0..tw {
                let p = (v[(y / s) * w + x / s] * 255.0).round() as u8;
                grid.put_pixel((x0 + x) as u32, (y0 + y) as u32, Luma([p]));
            }
        }
    }
    Ok(grid)
}

/// Filters [K, C, R, S] as a grid of K tiles: in colour when C is 3 (RGB inputs), otherwise
/// the mean over input channels; each scaled to its own range, enlarged to be visible.
pub fn filter_grid(weight: &Tensor<f32>) -> Result<RgbImage> {
    let &[k, c, r, s] = weight.shape() else {
        return Err(TrainError::Config(format!("filters must be [K, C, R, S], got {:?}", weight.shape())));
    };
    let cols = (k as f64).sqrt().ceil() as usize;
    let rows = k.div_ceil(cols.max(1));
    let z = scale_for(r, s).max(4);
    let (th, tw) = (r * z, s * z);
    let mut grid = RgbImage::from_pixel((cols * (tw + GAP) + GAP) as u32, (rows * (th + GAP) + GAP) as u32, Rgb([128, 128, 128]));
    for (i, f) in weight.data().chunks_exact(c * r * s).enumerate() {
        let planes: Vec<Vec<f32>> = if c == 3 {
            let v = unit(f);
            v.chunks_exact(r * s).map(<[f32]>::to_vec).collect()
        } else {
            let mean: Vec<f32> = (0..r * s).map(|j| (0..c).map(|ci| f[ci * r * s + j]).sum::<f32>() / c as f32).collect();
            vec![unit(&mean); 3]
        };
        let (x0, y0) = (GAP + (i % cols) * (tw + GAP), GAP + (i / cols) * (th + GAP));
        for y in 0..th {
            for x in 0..tw {
                let j = (y / z) * s + x / z;
                let px = |p: &Vec<f32>| (p[j] * 255.0).round() as u8;
                grid.put_pixel((x0 + x) as u32, (y0 + y) as u32, Rgb([px(&planes[0]), px(&planes[1]), px(&planes[2])]));
            }
        }
    }
    Ok(grid)
}

/// Grad-CAM of `class` at the layer that produced `maps` [1, K, H, W] (an output recorded in
/// `score`'s graph): each map weighted by the mean gradient of the class score over it,
/// summed, negative parts dropped, scaled to [0, 1]. Returns the H x W map.
pub fn grad_cam(score: &Var, maps: &Var) -> Result<Vec<f32>> {
    let &[1, k, h, w] = &maps.shape()[..] else {
        return Err(TrainError::Config(format!("Grad-CAM needs the feature maps of one image [1, K, H, W], got {:?}", maps.shape())));
    };
    let grad = score.gradients(&[maps])?.pop().flatten().ok_or_else(|| TrainError::Config("the class score does not depend on that layer".into()))?;
    let (a, g) = (maps.value(), grad);
    let mut cam = vec![0.0f32; h * w];
    for ch in 0..k {
        let gp = &g.data()[ch * h * w..(ch + 1) * h * w];
        let alpha = gp.iter().sum::<f32>() / (h * w) as f32;
        for (c, &v) in cam.iter_mut().zip(&a.data()[ch * h * w..(ch + 1) * h * w]) {
            *c += alpha * v;
        }
    }
    let top = cam.iter().fold(0.0f32, |m, &v| m.max(v));
    Ok(cam.iter().map(|&v| if top > 0.0 { v.max(0.0) / top } else { 0.0 }).collect())
}

/// A blue-cyan-yellow-red ramp for t in [0, 1].
fn heat(t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0);
    let stops = [[0.0, 0.0, 0.5], [0.0, 0.6, 1.0], [1.0, 0.9, 0.0], [0.9, 0.0, 0.0]];
    let x = t * (stops.len() - 1) as f32;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f32;
    [0, 1, 2].map(|c| stops[i][c] * (1.0 - f) + stops[i + 1][c] * f)
}

/// The heat map `cam` (ch x cw, in [0, 1]) blended over `image`, bilinearly enlarged.
pub fn overlay(image: &RgbImage, cam: &[f32], ch: usize, cw: usize) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let sample = |y: f32, x: f32| -> f32 {
        // Centre-aligned bilinear sampling of the cam grid.
        let fy = ((y + 0.5) * ch as f32 / h as f32 - 0.5).clamp(0.0, (ch - 1) as f32);
        let fx = ((x + 0.5) * cw as f32 / w as f32 - 0.5).clamp(0.0, (cw - 1) as f32);
        let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
        let (y1, x1) = ((y0 + 1).min(ch - 1), (x0 + 1).min(cw - 1));
        let (dy, dx) = (fy - y0 as f32, fx - x0 as f32);
        let at = |yy: usize, xx: usize| cam[yy * cw + xx];
        (at(y0, x0) * (1.0 - dx) + at(y0, x1) * dx) * (1.0 - dy) + (at(y1, x0) * (1.0 - dx) + at(y1, x1) * dx) * dy
    };
    let mut out = image.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        let t = sample(y as f32, x as f32);
        let c = heat(t);
        let a = 0.25 + 0.5 * t;
        *p = Rgb([0, 1, 2].map(|i| ((1.0 - a) * p.0[i] as f32 + a * 255.0 * c[i]).round() as u8));
    }
    out
}

/// What `augment` does to training images: a row per image (`images` of them, spread over
/// `ds`), the image itself first, then `versions` augmented copies (draws seeded by `seed`),
/// each tile enlarged to at least 56 pixels, a wider gap after the originals.
pub fn augmentation_grid(ds: &stride_data::Dataset, augment: &stride_data::Augment, images: usize, versions: usize, seed: u64) -> Result<RgbImage> {
    if ds.is_empty() || !(1..=64).contains(&images) || !(1..=32).contains(&versions) {
        return Err(TrainError::Config(format!(
            "an augmentation grid shows 1..=64 images in 1..=32 versions each from a set with images; asked for {images} x {versions} of {}",
            ds.len()
        )));
    }
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    let tile = picture(ds.image(0), c, h, w, 56).dimensions();
    let (tw, th) = (tile.0 as usize, tile.1 as usize);
    let rows = crate::latent::spread(ds.len(), images);
    let (gw, gh) = (GAP + (versions + 1) * (tw + GAP) + 2 * GAP, GAP + rows.len() * (th + GAP));
    let mut grid = RgbImage::from_pixel(gw as u32, gh as u32, Rgb([255, 255, 255]));
    let mut rng = stride_autograd::Rng::seed(seed);
    let mut out = vec![0u8; c * h * w];
    for (r, &i) in rows.iter().enumerate() {
        let y = (GAP + r * (th + GAP)) as i64;
        image::imageops::replace(&mut grid, &picture(ds.image(i), c, h, w, 56), GAP as i64, y);
        for v in 0..versions {
            augment.apply(ds.image(i), c, h, w, &mut rng, &mut out);
            let x = (GAP + (v + 1) * (tw + GAP) + 2 * GAP) as i64;
            image::imageops::replace(&mut grid, &picture(&out, c, h, w, 56), x, y);
        }
    }
    Ok(grid)
}

/// Planar bytes [C, H, W] (C 1 or 3) as an RGB picture, enlarged by whole pixels to at least
/// `min_side`.
pub fn picture(bytes: &[u8], c: usize, h: usize, w: usize, min_side: usize) -> RgbImage {
    let z = min_side.div_ceil(h.max(w).max(1)).max(1);
    RgbImage::from_fn((w * z) as u32, (h * z) as u32, |x, y| {
        let j = (y as usize / z) * w + x as usize / z;
        let ch = |i: usize| bytes[if c == 3 { i * h * w + j } else { j }];
        Rgb([ch(0), ch(1), ch(2)])
    })
}

/// A picture encoded as PNG.
pub fn png_bytes<P, C>(img: &image::ImageBuffer<P, C>) -> std::result::Result<Vec<u8>, image::ImageError>
where
    P: image::Pixel + image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// Writes a PNG atomically.
pub fn save_png<P, C>(path: &Path, img: &image::ImageBuffer<P, C>) -> Result<()>
where
    P: image::Pixel + image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let bytes = png_bytes(img).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    checkpoint::write_atomic(path, &bytes)
}

/// How [`patterns`] climbs: `steps` of gradient ascent on the input, each moving it by `rate`
/// along the gradient scaled to unit RMS (Chollet's "visualizing convnet filters"), from a mid
/// grey image with noise drawn by `seed`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ascent {
    pub steps: usize,
    pub rate: f32,
    pub seed: u64,
}

impl Default for Ascent {
    fn default() -> Self {
        Ascent { steps: 40, rate: 0.2, seed: 0 }
    }
}

/// A channel's mean activation before and after [`patterns`]' climb.
pub type Climb = (f32, f32);

/// The most steps [`patterns`] climbs and the most channels it draws at once.
pub const MAX_STEPS: usize = 10_000;
pub const MAX_PATTERNS: usize = 1024;
/// The most input values [`patterns`] climbs at once (64 inputs of 3 x 224 x 224 fit).
pub const MAX_INPUT_VALUES: usize = 1 << 24;

/// What excites the network's units most: for each of `channels` of the layer at dotted
/// `layer`, an input of `chw` grown by gradient ascent (Erhan et al., 2009) to raise the
/// channel's mean activation (a feature map's mean over its positions, or one unit of a dense
/// layer: for the logits, the image the network finds most like that class). The inputs are
/// standardised by `norm`, as the network was trained; all channels climb together as one
/// batch (the network in evaluation mode, so each image's gradient is its own), the
/// parameters frozen meanwhile. Returns the inputs as pixels in [0, 1], [K, C, H, W] (each
/// stretched for display: mean 0.5, spread 0.15, clipped), and each channel's activation
/// before and after the climb.
pub fn patterns(
    model: &mut dyn Module,
    layer: &str,
    channels: &[usize],
    chw: [usize; 3],
    norm: &stride_data::Normalize,
    how: Ascent,
) -> Result<(Tensor<f32>, Vec<Climb>)> {
    let k = channels.len();
    if k == 0 || k > MAX_PATTERNS {
        return Err(TrainError::Config(format!("patterns: 1..={MAX_PATTERNS} channels at a time, asked for {k}")));
    }
    if how.steps == 0 || how.steps > MAX_STEPS || !(how.rate.is_finite() && how.rate > 0.0) {
        return Err(TrainError::Config(format!("patterns: 1..={MAX_STEPS} steps at a rate > 0, got {} at {}", how.steps, how.rate)));
    }
    let [c, h, w] = chw;
    norm.check(c).map_err(|e| TrainError::Config(e.to_string()))?;
    // The batch of inputs; the activations it carries through the network scale with it.
    if k.saturating_mul(c).saturating_mul(h).saturating_mul(w) > MAX_INPUT_VALUES {
        return Err(TrainError::Config(format!(
            "patterns: {k} inputs of {c}x{h}x{w} are more than {MAX_INPUT_VALUES} values at once; ask for fewer channels or a smaller size"
        )));
    }
    let device = stride_nn::device_of(model);
    let params = model.parameters();
    let _frozen = crate::freeze::Frozen::new(params)?;
    // A mid grey image with a little noise, standardised as the network's inputs were.
    let noise: Tensor<f32> = stride_autograd::Rng::seed(how.seed).uniform(&[k, c, h, w], -0.1, 0.1)?;
    let plane = h * w;
    let (mean, std) = (norm.mean(), norm.std());
    let at = |ch: usize, v: &[f32]| v[if v.len() == 1 { 0 } else { ch }];
    let mut x: Vec<f32> = noise.data().iter().enumerate().map(|(i, &n)| (0.5 + n - at(i / plane % c, mean)) / at(i / plane % c, std)).collect();
    let mut scores = vec![(0.0f32, 0.0f32); k];
    for step in 0..=how.steps {
        let input = Var::parameter(Tensor::from_vec(x.clone(), &[k, c, h, w])?.to(device)?);
        let (trace, _, err) = traced(model, &input);
        let row = trace.find(layer).map_err(|e| {
            TrainError::Config(match &err {
                Some(cause) => format!("{e} (the network stopped early: {cause})"),
                None => e,
            })
        })?;
        let y = trace.output(row).ok_or_else(|| TrainError::Config(format!("layer {layer} left no output")))?.clone();
        let shape = y.shape();
        let (units, per) = match *shape.as_slice() {
            [_, u, ph, pw] => (u, ph * pw),
            [_, u] => (u, 1),
            _ => return Err(TrainError::Config(format!("layer {layer} gives {shape:?}: neither feature maps [N, C, H, W] nor units [N, F]"))),
        };
        if let Some(&bad) = channels.iter().find(|&&ch| ch >= units) {
            return Err(TrainError::Config(format!("layer {layer} has {units} channels; there is no channel {bad}")));
        }
        // Each image's own channel, averaged over its positions: one sum over the batch.
        let mut pick = vec![0.0f32; k * units];
        for (i, &ch) in channels.iter().enumerate() {
            pick[i * units + ch] = 1.0 / per as f32;
        }
        let mut mask_shape = vec![k, units];
        mask_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
        let mask = Var::constant(Tensor::from_vec(pick, &mask_shape)?.to(y.device())?);
        let picked = y.mul(&mask)?;
        let means = picked.value().to_host()?;
        for (i, s) in scores.iter_mut().enumerate() {
            let v: f32 = means.data()[i * units * per..(i + 1) * units * per].iter().sum();
            if step == 0 {
                s.0 = v;
            }
            s.1 = v;
        }
        if step == how.steps {
            break;
        }
        picked.sum_all()?.backward()?;
        let g = input.grad().ok_or_else(|| TrainError::Config(format!("no gradient reaches the input from layer {layer}")))?.to_host()?;
        for (xi, gi) in x.chunks_exact_mut(c * plane).zip(g.data().chunks_exact(c * plane)) {
            let rms = (gi.iter().map(|v| v * v).sum::<f32>() / gi.len() as f32).sqrt();
            if rms.is_finite() && rms > 0.0 {
                xi.iter_mut().zip(gi).for_each(|(x, g)| *x += how.rate * g / (rms + 1e-5));
            }
        }
    }
    // Back to pixels, then each image stretched for display.
    let mut pixels: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v * at(i / plane % c, std) + at(i / plane % c, mean)).collect();
    for img in pixels.chunks_exact_mut(c * plane) {
        let n = img.len() as f32;
        let m = img.iter().sum::<f32>() / n;
        let s = (img.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / n).sqrt();
        img.iter_mut().for_each(|v| *v = (0.5 + 0.15 * (*v - m) / (s + 1e-5)).clamp(0.0, 1.0));
    }
    Ok((Tensor::from_vec(pixels, &[k, c, h, w])?, scores))
}

/// Occlusion sensitivity (Zeiler and Fergus, 2014): how much the probability of `class` falls
/// when a `patch` x `patch` square of the image is hidden, the square slid by `stride` over
/// `x` ([1, C, H, W], standardised; a hidden pixel is set to 0, the training images' mean).
/// Each pixel gets the mean fall over the squares that cover it, [H x W] row by row (negative
/// where hiding it raised the class), with the class's probability on the whole image. Works
/// on any network, needing only its outputs; the occluded images run in batches of 64.
pub fn occlusion(model: &mut dyn Module, x: &Tensor<f32>, class: usize, patch: usize, stride: usize) -> Result<(Vec<f32>, f32)> {
    let &[1, c, h, w] = x.shape() else {
        return Err(TrainError::Config(format!("occlusion takes one image [1, C, H, W], got {:?}", x.shape())));
    };
    if patch == 0 || stride == 0 || patch > h.min(w) {
        return Err(TrainError::Config(format!(
            "occlusion: a patch of 1..={} pixels and a stride of at least 1, got {patch} and {stride}",
            h.min(w)
        )));
    }
    let device = stride_nn::device_of(model);
    let mut probability = |batch: &[f32], n: usize| -> Result<Vec<f32>> {
        let input = Var::constant(Tensor::from_vec(batch.to_vec(), &[n, c, h, w])?.to(device)?);
        let y = stride_autograd::no_grad(|| model.forward(&input, &mut Ctx::eval()))?;
        let p = stride_autograd::softmax(&y, 1)?.value().to_host()?;
        let k = p.shape().get(1).copied().unwrap_or(0);
        if class >= k {
            return Err(TrainError::Config(format!("occlusion: class {class} of a network with {k} outputs")));
        }
        Ok((0..n).map(|i| p.data()[i * k + class]).collect())
    };
    let base = probability(x.data(), 1)?[0];
    let corners: Vec<(usize, usize)> =
        (0..=(h - patch) / stride).flat_map(|i| (0..=(w - patch) / stride).map(move |j| (i * stride, j * stride))).collect();
    let (mut fall, mut cover) = (vec![0.0f32; h * w], vec![0u32; h * w]);
    for chunk in corners.chunks(64) {
        let mut batch = Vec::with_capacity(chunk.len() * c * h * w);
        for &(top, left) in chunk {
            let start = batch.len();
            batch.extend_from_slice(x.data());
            for ch in 0..c {
                for r in top..top + patch {
                    let row = start + (ch * h + r) * w;
                    batch[row + left..row + left + patch].fill(0.0);
                }
            }
        }
        for (&(top, left), p) in chunk.iter().zip(probability(&batch, chunk.len())?) {
            for r in top..top + patch {
                for q in left..left + patch {
                    fall[r * w + q] += base - p;
                    cover[r * w + q] += 1;
                }
            }
        }
    }
    Ok((fall.iter().zip(&cover).map(|(&f, &n)| if n > 0 { f / n as f32 } else { 0.0 }).collect(), base))
}
