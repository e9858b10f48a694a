//! Seeded data augmentation on byte images [C, H, W]: random resized crops, flips, random
//! crop with padding (translation), small rotations, colour jitter, random erasing.

use stride_tensor::Rng;

/// Which augmentations to apply to each training image (all off by default).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Augment {
    /// Mirror left-right with probability 1/2.
    pub hflip: bool,
    /// Mirror top-bottom with probability 1/2.
    pub vflip: bool,
    /// Pad by this many zero pixels on every side, then crop back at a random offset.
    pub crop_pad: usize,
    /// Rotate by a uniform angle in [-deg, deg] (nearest neighbour, zero fill).
    pub rotate_deg: f64,
    /// With this probability, blank a random rectangle of 2%-33% of the image (aspect 0.3-3.3).
    pub erase_p: f64,
    /// Random resized crop (torchvision's `RandomResizedCrop(scale=(s, 1))`): a box of a
    /// uniform share in [s, 1] of the area and an aspect ratio in [3/4, 4/3] (log-uniform),
    /// resized back to the image's size (bilinear). 0 turns it off.
    pub resized_crop: f64,
    /// Colour jitter (torchvision's `ColorJitter(b, b, b)`): brightness, contrast and (for
    /// colour images) saturation each scaled by a uniform factor in [1 - b, 1 + b].
    pub jitter: f64,
}

/// The spec [`Augment::parse`] reads back: `hflip,crop4,rotate10`, or `none`.
impl std::fmt::Display for Augment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut items = Vec::new();
        if self.resized_crop > 0.0 {
            items.push(format!("resizedcrop{}", self.resized_crop));
        }
        for (on, name) in [(self.hflip, "hflip"), (self.vflip, "vflip")] {
            if on {
                items.push(name.to_string());
            }
        }
        if self.crop_pad > 0 {
            items.push(format!("crop{}", self.crop_pad));
        }
        if self.rotate_deg > 0.0 {
            items.push(format!("rotate{}", self.rotate_deg));
        }
        if self.jitter > 0.0 {
            items.push(format!("jitter{}", self.jitter));
        }
        if self.erase_p > 0.0 {
            items.push(format!("erase{}", self.erase_p));
        }
        if items.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&items.join(","))
    }
}

impl Augment {
    pub fn is_identity(&self) -> bool {
        *self == Augment::default()
    }

    /// Parses a comma-separated list: `hflip`, `vflip`, `crop<N>`, `rotate<DEG>`, `erase<P>`,
    /// `resizedcrop<S>`, `jitter<B>`, or `none`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut a = Augment::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let num =
                |prefix: &str| item[prefix.len()..].parse::<f64>().map_err(|_| format!("augmentation '{item}': expected a number after '{prefix}'"));
            match item {
                "none" => {}
                "hflip" => a.hflip = true,
                "vflip" => a.vflip = true,
                _ if item.starts_with("crop") => {
                    let n = num("crop")?;
                    if !(0.0..=64.0).contains(&n) || n.fract() != 0.0 {
                        return Err(format!("augmentation '{item}': crop padding must be a whole number from 0 to 64"));
                    }
                    a.crop_pad = n as usize;
                }
                _ if item.starts_with("rotate") => {
                    a.rotate_deg = num("rotate")?;
                    if !(0.0..=180.0).contains(&a.rotate_deg) {
                        return Err(format!("augmentation '{item}': the angle must be from 0 to 180 degrees"));
                    }
                }
                _ if item.starts_with("resizedcrop") => {
                    a.resized_crop = num("resizedcrop")?;
                    if !(a.resized_crop > 0.0 && a.resized_crop <= 1.0) {
                        return Err(format!("augmentation '{item}': the smallest share of the area must be in (0, 1], such as 0.35"));
                    }
                }
                _ if item.starts_with("jitter") => {
                    a.jitter = num("jitter")?;
                    if !(0.0..1.0).contains(&a.jitter) {
                        return Err(format!("augmentation '{item}': the jitter must be in [0, 1), such as 0.4"));
                    }
                }
                _ if item.starts_with("erase") => {
                    a.erase_p = num("erase")?;
                    if !(0.0..=1.0).contains(&a.erase_p) {
                        return Err(format!("augmentation '{item}': the probability must be from 0 to 1"));
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown augmentation '{item}' (known: hflip, vflip, crop<N>, rotate<DEG>, erase<P>, resizedcrop<S>, jitter<B>, none)"
                    ))
                }
            }
        }
        Ok(a)
    }

    /// Writes the augmented copy of `img` ([c, h, w] bytes) into `out`.
    pub fn apply(&self, img: &[u8], c: usize, h: usize, w: usize, rng: &mut Rng, out: &mut [u8]) {
        // The resized crop first: the other steps read from it.
        let cropped;
        let img = if self.resized_crop > 0.0 {
            cropped = resized_crop(img, c, h, w, self.resized_crop, rng);
            &cropped[..]
        } else {
            img
        };
        let flip_h = self.hflip && rng.uniform01() < 0.5;
        let flip_v = self.vflip && rng.uniform01() < 0.5;
        let (dy, dx) = if self.crop_pad > 0 {
            let p = self.crop_pad as isize;
            (rng.below(2 * self.crop_pad + 1) as isize - p, rng.below(2 * self.crop_pad + 1) as isize - p)
        } else {
            (0, 0)
        };
        let angle = if self.rotate_deg > 0.0 { (rng.uniform01() * 2.0 - 1.0) * self.rotate_deg.to_radians() } else { 0.0 };
        let (sin, cos) = angle.sin_cos();
        let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
        // Each output pixel reads the source pixel it comes from (inverse mapping).
        for y in 0..h {
            for x in 0..w {
                let (mut sy, mut sx) = (y as isize + dy, x as isize + dx);
                if angle != 0.0 {
                    let (ry, rx) = (sy as f64 - cy, sx as f64 - cx);
                    sy = (cy + cos * ry - sin * rx).round() as isize;
                    sx = (cx + sin * ry + cos * rx).round() as isize;
                }
                if flip_v {
                    sy = h as isize - 1 - sy;
                }
                if flip_h {
                    sx = w as isize - 1 - sx;
                }
                let inside = sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w;
                for ch in 0..c {
                    out[(ch * h + y) * w + x] = if inside { img[(ch * h + sy as usize) * w + sx as usize] } else { 0 };
                }
            }
        }
        if self.jitter > 0.0 {
            jitter(out, c, h * w, self.jitter, rng);
        }
        if self.erase_p > 0.0 && rng.uniform01() < self.erase_p {
            let area = (h * w) as f64 * (0.02 + rng.uniform01() * 0.31);
            let aspect = (0.3f64.ln() + rng.uniform01() * (3.3f64.ln() - 0.3f64.ln())).exp();
            let eh = ((area * aspect).sqrt().round() as usize).clamp(1, h);
            let ew = ((area / aspect).sqrt().round() as usize).clamp(1, w);
            let (y0, x0) = (rng.below(h - eh + 1), rng.below(w - ew + 1));
            for ch in 0..c {
                for y in y0..y0 + eh {
                    out[(ch * h + y) * w + x0..(ch * h + y) * w + x0 + ew].fill(0);
                }
            }
        }
    }
}

/// A box of a uniform share in [`min_share`, 1] of the area with a log-uniform aspect ratio in
/// [3/4, 4/3], at a uniform place, resized to h x w by bilinear sampling. After ten boxes that
/// do not fit, the whole image (torchvision's fallback is a centre crop of the nearest aspect
/// ratio; for the image's own ratio, the whole image).
fn resized_crop(img: &[u8], c: usize, h: usize, w: usize, min_share: f64, rng: &mut Rng) -> Vec<u8> {
    let area = (h * w) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let mut chosen = (0.0, 0.0, h as f64, w as f64);
    for _ in 0..10 {
        let target = area * (min_share + rng.uniform01() * (1.0 - min_share));
        let ratio = (lo + rng.uniform01() * (hi - lo)).exp();
        let (bw, bh) = ((target * ratio).sqrt().round(), (target / ratio).sqrt().round());
        if bw >= 1.0 && bh >= 1.0 && bw <= w as f64 && bh <= h as f64 {
            let y0 = rng.below(h - bh as usize + 1) as f64;
            let x0 = rng.below(w - bw as usize + 1) as f64;
            chosen = (y0, x0, bh, bw);
            break;
        }
    }
    let (y0, x0, bh, bw) = chosen;
    let mut out = vec![0u8; c * h * w];
    for y in 0..h {
        // The centre of output pixel y in the box's coordinates (half-pixel centres, as
        // torchvision's antialias-free bilinear resize).
        let sy = (y0 + (y as f64 + 0.5) * bh / h as f64 - 0.5).clamp(0.0, h as f64 - 1.0);
        let (y1, fy) = (sy.floor() as usize, sy.fract());
        let y2 = (y1 + 1).min(h - 1);
        for x in 0..w {
            let sx = (x0 + (x as f64 + 0.5) * bw / w as f64 - 0.5).clamp(0.0, w as f64 - 1.0);
            let (x1, fx) = (sx.floor() as usize, sx.fract());
            let x2 = (x1 + 1).min(w - 1);
            for ch in 0..c {
                let p = |yy: usize, xx: usize| img[(ch * h + yy) * w + xx] as f64;
                let top = p(y1, x1) * (1.0 - fx) + p(y1, x2) * fx;
                let bottom = p(y2, x1) * (1.0 - fx) + p(y2, x2) * fx;
                out[(ch * h + y) * w + x] = (top * (1.0 - fy) + bottom * fy).round() as u8;
            }
        }
    }
    out
}

/// Brightness, contrast and (with three channels) saturation, each by a uniform factor in
/// [1 - b, 1 + b], in that order, clamped to bytes.
fn jitter(img: &mut [u8], c: usize, plane: usize, b: f64, rng: &mut Rng) {
    let mut factor = || 1.0 - b + 2.0 * b * rng.uniform01();
    let (brightness, contrast, saturation) = (factor(), factor(), factor());
    let mut v: Vec<f64> = img.iter().map(|&p| p as f64 * brightness).collect();
    // Contrast blends with the mean grey level (of the luma, for colour images).
    let grey = |v: &[f64], i: usize| if c == 3 { 0.299 * v[i] + 0.587 * v[plane + i] + 0.114 * v[2 * plane + i] } else { v[i] };
    let mean = (0..plane).map(|i| grey(&v, i)).sum::<f64>() / plane.max(1) as f64;
    v.iter_mut().for_each(|p| *p = mean + (*p - mean) * contrast);
    if c == 3 {
        for i in 0..plane {
            let g = grey(&v, i);
            for ch in 0..3 {
                v[ch * plane + i] = g + (v[ch * plane + i] - g) * saturation;
            }
        }
    }
    for (p, x) in img.iter_mut().zip(v) {
        *p = x.round().clamp(0.0, 255.0) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> Vec<u8> {
        (0..2 * 5 * 4).map(|i| i as u8 + 1).collect()
    }

    fn run(a: &Augment, seed: u64) -> Vec<u8> {
        let mut out = vec![0; 40];
        a.apply(&img(), 2, 5, 4, &mut Rng::seed(seed), &mut out);
        out
    }

    #[test]
    fn identity_and_flips() {
        assert_eq!(run(&Augment::default(), 1), img());
        let h = Augment { hflip: true, ..Augment::default() };
        let outs: Vec<Vec<u8>> = (0..20).map(|s| run(&h, s)).collect();
        assert!(outs.iter().any(|o| *o == img()), "some draws keep the image");
        let flipped = outs.iter().find(|o| **o != img()).expect("some draws flip");
        for ch in 0..2 {
            for y in 0..5 {
                for x in 0..4 {
                    assert_eq!(flipped[(ch * 5 + y) * 4 + x], img()[(ch * 5 + y) * 4 + 3 - x]);
                }
            }
        }
    }

    #[test]
    fn crops_translate_rotations_keep_pixels_and_erasing_blanks() {
        let c = Augment { crop_pad: 1, ..Augment::default() };
        for s in 0..10 {
            let o = run(&c, s);
            // A shift by at most one pixel: every kept pixel value exists in the source.
            assert!(o.iter().filter(|&&v| v != 0).all(|v| img().contains(v)));
            assert!(o.iter().filter(|&&v| v != 0).count() >= 2 * 4 * 3);
        }
        assert_eq!(run(&c, 3), run(&c, 3), "seeded");
        let r = Augment { rotate_deg: 0.0, ..Augment::default() };
        assert_eq!(run(&r, 0), img());
        let e = Augment { erase_p: 1.0, ..Augment::default() };
        let o = run(&e, 4);
        assert!(o.iter().filter(|&&v| v == 0).count() >= 2);
        assert_eq!(
            Augment::parse("hflip, crop4,rotate10,erase0.5").unwrap(),
            Augment { hflip: true, crop_pad: 4, rotate_deg: 10.0, erase_p: 0.5, ..Augment::default() }
        );
        assert!(Augment::parse("shear").unwrap_err().contains("unknown augmentation 'shear'"));
        assert_eq!(Augment::parse("resizedcrop0.35,jitter0.4").unwrap(), Augment { resized_crop: 0.35, jitter: 0.4, ..Augment::default() });
        assert!(Augment::parse("resizedcrop0").is_err() && Augment::parse("resizedcrop1.5").is_err() && Augment::parse("jitter1").is_err());
        assert!(Augment::parse("erase2").is_err() && Augment::parse("cropx").is_err());
    }

    #[test]
    fn resized_crops_zoom_in_and_keep_the_values_between_their_neighbours() {
        // A horizontal ramp, 3 channels of 16x16.
        let (c, h, w) = (3, 16, 16);
        let ramp: Vec<u8> = (0..c * h * w).map(|i| ((i % w) * 16) as u8).collect();
        let a = Augment { resized_crop: 0.25, ..Augment::default() };
        let mut zoomed = 0;
        for seed in 0..20 {
            let mut out = vec![0; c * h * w];
            a.apply(&ramp, c, h, w, &mut Rng::seed(seed), &mut out);
            for row in out.chunks_exact(w) {
                // Still a ramp, non-decreasing along x, within the source's range.
                assert!(row.windows(2).all(|p| p[0] <= p[1]) && row.iter().all(|&v| v <= 240), "{row:?}");
            }
            // A box narrower than the image stretches the ramp: a smaller step from pixel to pixel.
            zoomed += usize::from(out[w - 1] - out[0] < 240);
            let mut again = vec![0; c * h * w];
            a.apply(&ramp, c, h, w, &mut Rng::seed(seed), &mut again);
            assert_eq!(out, again, "seeded");
        }
        assert!(zoomed >= 15, "{zoomed} of 20 crops zoomed in");
        // The whole area with a square image: only the whole image fits, unchanged.
        let whole = Augment { resized_crop: 1.0, ..Augment::default() };
        let mut out = vec![0; c * h * w];
        whole.apply(&ramp, c, h, w, &mut Rng::seed(1), &mut out);
        assert_eq!(out, ramp);
    }

    #[test]
    fn jitter_scales_brightness_contrast_and_saturation_within_bounds() {
        let (c, plane) = (3, 4);
        let img: Vec<u8> = vec![10, 200, 120, 60, 30, 180, 120, 90, 250, 20, 120, 30];
        let a = Augment { jitter: 0.5, ..Augment::default() };
        let mut seen_change = false;
        for seed in 0..10 {
            let mut out = vec![0; 12];
            a.apply(&img, c, 2, 2, &mut Rng::seed(seed), &mut out);
            seen_change |= out != img;
            // Reference: the same three factors, drawn in the same order.
            let mut rng = Rng::seed(seed);
            let f: Vec<f64> = (0..3).map(|_| 0.5 + rng.uniform01()).collect();
            let b: Vec<f64> = img.iter().map(|&p| p as f64 * f[0]).collect();
            let grey = |v: &[f64], i: usize| 0.299 * v[i] + 0.587 * v[plane + i] + 0.114 * v[2 * plane + i];
            let mean = (0..plane).map(|i| grey(&b, i)).sum::<f64>() / plane as f64;
            let ct: Vec<f64> = b.iter().map(|p| mean + (p - mean) * f[1]).collect();
            let mut want = ct.clone();
            for i in 0..plane {
                let g = grey(&ct, i);
                for ch in 0..3 {
                    want[ch * plane + i] = g + (ct[ch * plane + i] - g) * f[2];
                }
            }
            for (o, w) in out.iter().zip(&want) {
                assert_eq!(*o, w.round().clamp(0.0, 255.0) as u8, "seed {seed}: {out:?} vs {want:?}");
            }
        }
        assert!(seen_change);
        // A grey image keeps its grey under contrast and saturation: only brightness moves it.
        let flat = vec![100u8; 4];
        let mut out = vec![0; 4];
        a.apply(&flat, 1, 2, 2, &mut Rng::seed(3), &mut out);
        assert!(out.iter().all(|&v| v == out[0]), "{out:?}");
    }
}
