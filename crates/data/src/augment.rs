//! Seeded data augmentation on byte images [C, H, W]: flips, random crop with padding
//! (translation), small rotations, random erasing.

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
}

impl Augment {
    pub fn is_identity(&self) -> bool {
        *self == Augment::default()
    }

    /// Parses a comma-separated list: `hflip`, `vflip`, `crop<N>`, `rotate<DEG>`, `erase<P>`,
    /// or `none`.
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
                _ if item.starts_with("erase") => {
                    a.erase_p = num("erase")?;
                    if !(0.0..=1.0).contains(&a.erase_p) {
                        return Err(format!("augmentation '{item}': the probability must be from 0 to 1"));
                    }
                }
                _ => return Err(format!("unknown augmentation '{item}' (known: hflip, vflip, crop<N>, rotate<DEG>, erase<P>, none)")),
            }
        }
        Ok(a)
    }

    /// Writes the augmented copy of `img` ([c, h, w] bytes) into `out`.
    pub fn apply(&self, img: &[u8], c: usize, h: usize, w: usize, rng: &mut Rng, out: &mut [u8]) {
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
        assert!(Augment::parse("erase2").is_err() && Augment::parse("cropx").is_err());
    }
}
