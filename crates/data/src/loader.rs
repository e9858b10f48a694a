//! Batching: seeded shuffling, fixed batch size, optional drop-last, bytes to f32 in [0, 1].

use stride_tensor::{Rng, Tensor};

use crate::{Augment, Dataset, Normalize, Result};

/// One batch: images [B, C, H, W] scaled to [0, 1] (then standardised if asked), and their
/// class indices.
#[derive(Clone, Debug)]
pub struct Batch {
    pub images: Tensor<f32>,
    pub labels: Vec<usize>,
}

/// An iterator over the batches of one epoch.
pub struct Batches<'a> {
    ds: &'a Dataset,
    order: Vec<usize>,
    pos: usize,
    batch_size: usize,
    drop_last: bool,
    /// How pixels are standardised after scaling to [0, 1].
    norm: Normalize,
    /// Augmentation and the seed its draws derive from (with each image's place in the epoch).
    augment: Option<(Augment, u64)>,
}

impl<'a> Batches<'a> {
    /// Batches of `batch_size` (at least 1) in a shuffled order when `rng` is given, else in
    /// file order. `drop_last` skips a final partial batch.
    pub fn new(ds: &'a Dataset, batch_size: usize, rng: Option<&mut Rng>, drop_last: bool) -> Self {
        let mut order: Vec<usize> = (0..ds.len()).collect();
        if let Some(rng) = rng {
            rng.shuffle(&mut order);
        }
        Batches { ds, order, pos: 0, batch_size: batch_size.max(1), drop_last, norm: Normalize::identity(), augment: None }
    }

    /// Standardises pixels: `(x / 255 - mean[c]) / std[c]`; an error when `norm` has values for
    /// another number of channels than the images.
    pub fn normalized(mut self, norm: &Normalize) -> Result<Self> {
        norm.check(self.ds.channels)?;
        self.norm = norm.clone();
        Ok(self)
    }

    /// Augments every image; the draws for the image at position i of the epoch come from
    /// (seed, i), so a resumed epoch sees the same images.
    pub fn augmented(mut self, augment: &Augment, seed: u64) -> Self {
        if !augment.is_identity() {
            self.augment = Some((augment.clone(), seed));
        }
        self
    }

    /// How many batches this epoch yields.
    pub fn num_batches(&self) -> usize {
        let n = self.order.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }
}

impl Iterator for Batches<'_> {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        let rest = self.order.len() - self.pos;
        if rest == 0 || (self.drop_last && rest < self.batch_size) {
            return None;
        }
        let idx = &self.order[self.pos..self.pos + rest.min(self.batch_size)];
        self.pos += idx.len();
        let ds = self.ds;
        let per = ds.channels * ds.height * ds.width;
        let mut pixels = Vec::with_capacity(idx.len() * per);
        let mut scratch = vec![0u8; per];
        for (k, &i) in idx.iter().enumerate() {
            let img = match &self.augment {
                Some((a, seed)) => {
                    // The image's place in the epoch picks its draws.
                    let place = (self.pos - idx.len() + k) as u64;
                    let mut rng = Rng::seed(seed ^ place.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    a.apply(ds.image(i), ds.channels, ds.height, ds.width, &mut rng, &mut scratch);
                    &scratch[..]
                }
                None => ds.image(i),
            };
            self.norm.extend(img, ds.channels, ds.height * ds.width, &mut pixels);
        }
        let images = Tensor::from_vec(pixels, &[idx.len(), ds.channels, ds.height, ds.width]).expect("batch shape matches its pixels");
        Some(Batch { images, labels: idx.iter().map(|&i| ds.labels[i] as usize).collect() })
    }
}
