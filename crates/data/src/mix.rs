//! Mixing images within a batch (torchvision's v2 `MixUp` and `CutMix`, timm's `Mixup`): each
//! image is blended with, or has a box pasted in from, its partner (the image before it, the
//! first with the last), and trains towards both labels in proportion.

use stride_tensor::Rng;

/// Which batch mixing to apply; each is off at 0.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchMix {
    /// MixUp's alpha: the images are blended by λ ~ Beta(alpha, alpha) (timm's default 0.8).
    pub mixup: f64,
    /// CutMix's alpha: a box of about 1 - λ of the area (λ ~ Beta(alpha, alpha)) comes from the
    /// partner (timm's default 1.0). With both on, each batch takes one of the two at random.
    pub cutmix: f64,
}

/// The most either alpha may be (a Beta(alpha, alpha) of 100 is all but always 1/2).
pub const MAX_ALPHA: f64 = 100.0;

impl BatchMix {
    pub fn is_off(&self) -> bool {
        self.mixup == 0.0 && self.cutmix == 0.0
    }

    /// Both alphas are 0 (off) or in (0, [`MAX_ALPHA`]].
    pub fn check(&self) -> Result<(), String> {
        for (name, a) in [("mixup", self.mixup), ("cutmix", self.cutmix)] {
            if !(a == 0.0 || (a > 0.0 && a <= MAX_ALPHA)) {
                return Err(format!("{name}'s alpha must be 0 (off) or in (0, {MAX_ALPHA}], such as 0.8; got {a}"));
            }
        }
        Ok(())
    }

    /// Mixes the batch `images` ([n, c, h, w], standardised) in place, with draws from `rng`:
    /// returns λ, the share of each image that is its own (and of the loss its own label
    /// carries); its partner's label ([`partners`]) carries the rest. `None` when off or for a
    /// batch of one image.
    pub fn apply(&self, images: &mut [f32], [n, c, h, w]: [usize; 4], rng: &mut Rng) -> Result<Option<f64>, String> {
        self.check()?;
        if self.is_off() || n < 2 {
            return Ok(None);
        }
        let cut = match (self.mixup > 0.0, self.cutmix > 0.0) {
            (true, true) => rng.uniform01() < 0.5,
            (cut, _) => !cut,
        };
        let alpha = if cut { self.cutmix } else { self.mixup };
        let lam = rng.beta(alpha, alpha).map_err(|e| e.to_string())?;
        let image = c * h * w;
        // The partners are the images before: image 0's is the last. Keep the originals.
        let before: Vec<f32> = images.to_vec();
        let partner = |i: usize| &before[((i + n - 1) % n) * image..((i + n - 1) % n + 1) * image];
        if !cut {
            let (own, other) = (lam as f32, (1.0 - lam) as f32);
            for (i, img) in images.chunks_exact_mut(image).enumerate() {
                img.iter_mut().zip(partner(i)).for_each(|(v, &p)| *v = own * *v + other * p);
            }
            return Ok(Some(lam));
        }
        // A box with sides sqrt(1 - λ) of the image's around a uniform centre, cut at the edges;
        // λ becomes the share of the image left outside it.
        let r = 0.5 * (1.0 - lam).sqrt();
        let (cy, cx) = (rng.below(h), rng.below(w));
        let (dh, dw) = ((r * h as f64) as usize, (r * w as f64) as usize);
        let (y0, y1) = (cy.saturating_sub(dh), (cy + dh).min(h));
        let (x0, x1) = (cx.saturating_sub(dw), (cx + dw).min(w));
        for (i, img) in images.chunks_exact_mut(image).enumerate() {
            let from = partner(i);
            for plane in 0..c {
                for y in y0..y1 {
                    let row = plane * h * w + y * w;
                    img[row + x0..row + x1].copy_from_slice(&from[row + x0..row + x1]);
                }
            }
        }
        Ok(Some(1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64))
    }
}

/// Each image's partner's label under [`BatchMix::apply`]: the label before it (the first
/// image's is the last's).
pub fn partners(labels: &[usize]) -> Vec<usize> {
    (0..labels.len()).map(|i| labels[(i + labels.len() - 1) % labels.len()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four 1x4x4 images, image k filled with k + 1.
    fn batch() -> Vec<f32> {
        (0..4).flat_map(|k| std::iter::repeat_n(k as f32 + 1.0, 16)).collect()
    }

    #[test]
    fn mixup_blends_each_image_with_the_one_before_by_lambda() {
        let mut x = batch();
        let lam = BatchMix { mixup: 0.4, cutmix: 0.0 }.apply(&mut x, [4, 1, 4, 4], &mut Rng::seed(3)).unwrap().unwrap();
        assert!((0.0..=1.0).contains(&lam));
        for (i, img) in x.chunks(16).enumerate() {
            let (own, other) = ((i + 1) as f64, ((i + 3) % 4 + 1) as f64);
            let want = lam * own + (1.0 - lam) * other;
            assert!(img.iter().all(|&v| (v as f64 - want).abs() < 1e-5), "image {i}: {img:?}, want {want}");
        }
        assert_eq!(partners(&[7, 1, 2, 5]), [5, 7, 1, 2]);
    }

    #[test]
    fn cutmix_pastes_one_box_from_the_partner_and_lambda_is_what_is_left() {
        for seed in 0..20 {
            let mut x = batch();
            let lam = BatchMix { mixup: 0.0, cutmix: 1.0 }.apply(&mut x, [4, 1, 4, 4], &mut Rng::seed(seed)).unwrap().unwrap();
            for (i, img) in x.chunks(16).enumerate() {
                let (own, other) = ((i + 1) as f32, ((i + 3) % 4 + 1) as f32);
                assert!(img.iter().all(|&v| v == own || v == other), "seed {seed} image {i}: {img:?}");
                let kept = img.iter().filter(|&&v| v == own).count();
                assert_eq!(kept as f64 / 16.0, lam, "seed {seed} image {i}");
                // The pasted pixels form one rectangle, the same in every image.
                let pasted: Vec<usize> = (0..16).filter(|&p| img[p] == other).collect();
                if let (Some(&a), Some(&b)) = (pasted.first(), pasted.last()) {
                    let (rows, cols) = ((a / 4)..=(b / 4), (a % 4).min(b % 4)..=(a % 4).max(b % 4));
                    assert_eq!(pasted.len(), rows.clone().count() * cols.clone().count(), "seed {seed}: {pasted:?}");
                }
            }
        }
    }

    #[test]
    fn off_single_images_and_bad_alphas() {
        let mut x = batch();
        assert_eq!(BatchMix::default().apply(&mut x, [4, 1, 4, 4], &mut Rng::seed(0)), Ok(None));
        assert_eq!(BatchMix { mixup: 1.0, cutmix: 1.0 }.apply(&mut x[..16], [1, 1, 4, 4], &mut Rng::seed(0)), Ok(None));
        assert_eq!(x, batch());
        let e = BatchMix { mixup: -1.0, cutmix: 0.0 }.apply(&mut x, [4, 1, 4, 4], &mut Rng::seed(0)).unwrap_err();
        assert!(e.contains("mixup's alpha must be 0 (off) or in (0, 100], such as 0.8; got -1"), "{e}");
        assert!(BatchMix { mixup: 0.0, cutmix: f64::NAN }.check().unwrap_err().contains("cutmix's alpha"));
    }

    #[test]
    fn both_on_take_each_about_half_the_time() {
        let mix = BatchMix { mixup: 1.0, cutmix: 1.0 };
        let mut cut = 0;
        for seed in 0..400 {
            let mut x = batch();
            mix.apply(&mut x, [4, 1, 4, 4], &mut Rng::seed(seed)).unwrap();
            // A blend leaves no pixel of image 0 at exactly 1 or 4 unless λ is 0 or 1.
            cut += usize::from(x[..16].iter().all(|&v| v == 1.0 || v == 4.0));
        }
        assert!((150..=250).contains(&cut), "{cut} of 400 batches cut");
    }
}
