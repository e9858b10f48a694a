//! Input standardisation: pixels scaled to [0, 1], then `(x - mean[c]) / std[c]` per channel,
//! as torchvision's `transforms.Normalize(mean, std)`.

use std::fmt;

use crate::error::{DataError, Result};
use crate::Dataset;

/// Per-channel mean and standard deviation that inputs are standardised with after scaling to
/// [0, 1]. A single value stands for every channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// ImageNet's channel statistics (RGB), which torchvision's pretrained weights expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Normalize {
    /// `mean` and `std` of equal length (1, or one per channel), finite, every std > 0.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Self> {
        let bad = |what: String| Err(DataError::Other(format!("input standardisation: {what}")));
        if mean.is_empty() || mean.len() != std.len() {
            return bad(format!("{} means and {} standard deviations: give one of each per channel (or one for all)", mean.len(), std.len()));
        }
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            return bad(format!("mean {m} is not a finite number"));
        }
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return bad(format!("standard deviation {s} is not a finite number > 0"));
        }
        Ok(Normalize { mean, std })
    }

    /// Pixels only scaled to [0, 1].
    pub fn identity() -> Self {
        Normalize { mean: vec![0.0], std: vec![1.0] }
    }

    /// [`IMAGENET_MEAN`] and [`IMAGENET_STD`].
    pub fn imagenet() -> Self {
        Normalize { mean: IMAGENET_MEAN.to_vec(), std: IMAGENET_STD.to_vec() }
    }

    /// Each channel's mean and standard deviation over `ds`'s pixels (a constant channel keeps
    /// std 1, so it is only shifted).
    pub fn of(ds: &Dataset) -> Self {
        let c = ds.channels.max(1);
        let plane = ds.height * ds.width;
        let (mut sum, mut sq) = (vec![0u64; c], vec![0u64; c]);
        if plane > 0 {
            for (k, p) in ds.images.chunks_exact(plane).enumerate() {
                // Sums of bytes and their squares are exact in u64 for any image set that fits
                // in memory (255^2 * 2^40 < 2^64).
                sum[k % c] += p.iter().map(|&b| b as u64).sum::<u64>();
                sq[k % c] += p.iter().map(|&b| (b as u64) * (b as u64)).sum::<u64>();
            }
        }
        let n = (ds.len() * plane).max(1) as f64;
        let (mut mean, mut std) = (Vec::with_capacity(c), Vec::with_capacity(c));
        for (s, q) in sum.iter().zip(&sq) {
            let m = *s as f64 / n;
            let var = (*q as f64 / n - m * m).max(0.0);
            mean.push((m / 255.0) as f32);
            let sd = (var.sqrt() / 255.0) as f32;
            std.push(if sd > 0.0 { sd } else { 1.0 });
        }
        Normalize { mean, std }
    }

    /// Parses what `--normalize` takes: `imagenet`, `none` (pixels in [0, 1]), or
    /// `MEAN,...:STD,...` such as `0.5,0.5,0.5:0.25,0.25,0.25` or `0.1307:0.3081`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "imagenet" => Ok(Self::imagenet()),
            "none" => Ok(Self::identity()),
            spec => {
                let (mean, std) = spec.split_once(':').ok_or_else(|| {
                    DataError::Other(format!("'{s}' is not a standardisation: give imagenet, none or MEAN,...:STD,... (such as 0.5:0.25)"))
                })?;
                Self::from_lists(mean, std)
            }
        }
    }

    /// From comma-separated lists, as [`Normalize::header`] writes them.
    pub fn from_lists(mean: &str, std: &str) -> Result<Self> {
        let list = |s: &str| -> Result<Vec<f32>> {
            s.split(',')
                .map(|v| v.trim().parse::<f32>().map_err(|_| DataError::Other(format!("input standardisation: '{v}' is not a number"))))
                .collect()
        };
        Self::new(list(mean)?, list(std)?)
    }

    /// The means and standard deviations as comma-separated lists (for a weights' header).
    pub fn header(&self) -> (String, String) {
        let join = |v: &[f32]| v.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
        (join(&self.mean), join(&self.std))
    }

    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    pub fn std(&self) -> &[f32] {
        &self.std
    }

    /// Whether this applies to images of `channels` channels (one value each, or one for all).
    pub fn check(&self, channels: usize) -> Result<()> {
        if self.mean.len() == 1 || self.mean.len() == channels {
            return Ok(());
        }
        Err(DataError::Other(format!(
            "the input standardisation has {} values per statistic ({self}) but the images have {channels} channel{}",
            self.mean.len(),
            if channels == 1 { "" } else { "s" }
        )))
    }

    /// Channel `c`'s (mean, 1 / std).
    fn channel(&self, c: usize) -> (f32, f32) {
        let k = if self.mean.len() == 1 { 0 } else { c };
        (self.mean[k], 1.0 / self.std[k])
    }

    /// Appends the standardised pixels of planar images (each `channels` planes of `plane`
    /// bytes) to `out`.
    pub fn extend(&self, pixels: &[u8], channels: usize, plane: usize, out: &mut Vec<f32>) {
        if plane == 0 {
            return;
        }
        for (k, p) in pixels.chunks_exact(plane).enumerate() {
            let (mean, inv_std) = self.channel(k % channels.max(1));
            out.extend(p.iter().map(|&b| (b as f32 * (1.0 / 255.0) - mean) * inv_std));
        }
    }
}

impl Default for Normalize {
    fn default() -> Self {
        Self::identity()
    }
}

/// `mean 0.1307 std 0.3081`, or with lists for several channels.
impl fmt::Display for Normalize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[f32]| v.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(",");
        write!(f, "mean {} std {}", list(&self.mean), list(&self.std))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(images: Vec<u8>, channels: usize) -> Dataset {
        let n = images.len() / (channels * 4);
        Dataset { images, labels: vec![0; n], channels, height: 2, width: 2, classes: 1 }
    }

    #[test]
    fn statistics_are_per_channel_and_match_a_direct_computation() {
        // Two RGB images of 2x2: red varies, green is constant, blue is one value per image.
        let images: Vec<u8> = [[0, 255, 10, 20], [7; 4], [100; 4], [30, 60, 90, 120], [7; 4], [200; 4]].concat();
        let n = Normalize::of(&set(images.clone(), 3));
        for c in 0..3 {
            let vals: Vec<f64> = (0..2).flat_map(|i| images[(i * 3 + c) * 4..(i * 3 + c + 1) * 4].to_vec()).map(|b| b as f64 / 255.0).collect();
            let m = vals.iter().sum::<f64>() / 8.0;
            let sd = (vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 8.0).sqrt();
            assert!((n.mean()[c] as f64 - m).abs() < 1e-6, "channel {c} mean {} vs {m}", n.mean()[c]);
            let want = if sd > 1e-9 { sd } else { 1.0 };
            assert!((n.std()[c] as f64 - want).abs() < 1e-6, "channel {c} std {} vs {want}", n.std()[c]);
        }
        assert_eq!(n.std()[1], 1.0, "a constant channel keeps std 1");
        // One channel: the same as the all-pixel statistics.
        let grey = set(vec![0, 51, 102, 255, 17, 34, 68, 200], 1);
        let (m, s) = grey.pixel_stats();
        let g = Normalize::of(&grey);
        assert!((g.mean()[0] - m).abs() < 1e-6 && (g.std()[0] - s).abs() < 1e-6, "{g} vs {m} {s}");
    }

    #[test]
    fn extend_standardises_each_plane_by_its_channel() {
        let n = Normalize::new(vec![0.0, 0.5], vec![1.0, 0.25]).unwrap();
        let mut out = Vec::new();
        n.extend(&[255, 0, 255, 0, 51, 51, 0, 0], 2, 2, &mut out);
        let want = [1.0, 0.0, 2.0, -2.0, 0.2, 0.2, -2.0, -2.0];
        assert_eq!(out.len(), 8);
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
        // One pair for every channel.
        let mut one = Vec::new();
        Normalize::new(vec![0.5], vec![0.5]).unwrap().extend(&[255, 0, 255, 0], 2, 2, &mut one);
        assert_eq!(one, vec![1.0, -1.0, 1.0, -1.0]);
    }

    #[test]
    fn parsing_takes_presets_and_lists_and_names_what_is_wrong() {
        assert_eq!(Normalize::parse("imagenet").unwrap(), Normalize::imagenet());
        assert_eq!(Normalize::parse("none").unwrap(), Normalize::identity());
        let n = Normalize::parse("0.5,0.4,0.3:0.2,0.2,0.1").unwrap();
        assert_eq!((n.mean(), n.std()), (&[0.5, 0.4, 0.3][..], &[0.2, 0.2, 0.1][..]));
        let (m, s) = n.header();
        assert_eq!(Normalize::from_lists(&m, &s).unwrap(), n, "a header reads back");
        for (bad, says) in [
            ("0.5", "MEAN,...:STD,..."),
            ("0.5,0.5:0.2", "2 means and 1 standard deviations"),
            ("0.5:0", "standard deviation 0 is not a finite number > 0"),
            ("0.5:-1", "standard deviation -1"),
            ("x:1", "'x' is not a number"),
            ("NaN:1", "mean NaN is not a finite number"),
        ] {
            let e = Normalize::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(n.check(3).is_ok() && Normalize::identity().check(3).is_ok());
        let e = n.check(1).unwrap_err().to_string();
        assert!(e.contains("3 values per statistic") && e.contains("1 channel"), "{e}");
    }
}
