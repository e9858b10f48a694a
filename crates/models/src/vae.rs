//! The convolutional variational autoencoder of the ADCME CNN article (bench/SPEC.md's B2): a
//! dense encoder to the mean and spread of a 100-dimensional code (or one of a size chosen with
//! [`Vae::with_latent`], such as 2 for a code that can be drawn on a page), and a generator of
//! transposed convolutions from the code back to a 32x32 image: one channel, as the article's
//! digits, or three for colour photographs ([`Vae::for_images`]).

use std::collections::HashMap;

use stride_autograd::{binary_cross_entropy, gaussian_kl, Conv2dOptions, Padding, Reduction, Rng, ToDevice, Unary, Var};
use stride_nn::blocks::{ConvTranspose2d, Pad};
use stride_nn::layers::{Activation, BatchNorm, Dropout, Flatten, Linear, Sequential};
use stride_nn::{call, join, Ctx, Module, Result, Slot};

pub const ABOUT: &str = "the ADCME article's convolutional VAE: dense encoder (500 elu, 500 tanh, 200) to a 100-d code, generator of transposed convolutions (ngf 8) to 1x32x32";
/// Size of the code z in the article (and B2).
pub const LATENT: usize = 100;
/// The largest code [`Vae::with_latent`] builds.
pub const MAX_LATENT: usize = 1024;
/// The weight whose first dimension is the code size: the generator's first transposed
/// convolution, [latent, 256, 4, 4].
const CODE_WEIGHT: &str = "generator.0.weight";
/// The weight whose second dimension is the image's channels: the generator's last transposed
/// convolution, [64, channels, 4, 4].
const IMAGE_WEIGHT: &str = "generator.10.weight";
/// Whether [`Vae::for_images`] builds for images of `channels`: grey (1) or colour (3).
fn drawable(channels: usize) -> bool {
    channels == 1 || channels == 3
}
/// Side of the images the VAE reads and writes.
pub const SIDE: usize = 32;
/// Outputs are clipped to [CLIP, 1 - CLIP] before the likelihood (1e-8 rounds to 1.0 in f32).
pub const CLIP: f64 = 1e-7;

pub struct Vae {
    pub encoder: Sequential,
    pub generator: Sequential,
    latent: usize,
    channels: usize,
}

/// The three terms of the loss, batch means.
pub struct VaeLoss {
    pub total: Var,
    /// Summed binary cross-entropy per image.
    pub likelihood: Var,
    pub kl: Var,
}

impl Vae {
    /// The article's VAE, with a 100-d code.
    pub fn new(rng: &mut Rng) -> Result<Self> {
        Self::with_latent(rng, LATENT)
    }

    /// The same network with a `latent`-dimensional code (1..=[`MAX_LATENT`]): the encoder's
    /// last layer gives 2 x `latent` values and the generator starts from `latent` channels.
    pub fn with_latent(rng: &mut Rng, latent: usize) -> Result<Self> {
        Self::for_images(rng, 1, latent)
    }

    /// The same network for `channels`-channel images (1, or 3 for colour photographs such as
    /// CIFAR-10's): the encoder reads channels x 32 x 32 values and the
    /// generator's last layer draws that many planes.
    pub fn for_images(rng: &mut Rng, channels: usize, latent: usize) -> Result<Self> {
        if !(1..=MAX_LATENT).contains(&latent) {
            return Err(stride_autograd::Error::arg("vae", format!("the code size must be 1..={MAX_LATENT}, got {latent}")).into());
        }
        if !drawable(channels) {
            return Err(stride_autograd::Error::arg("vae", format!("reads images of 1 (grey) or 3 (colour) channels, got {channels}")).into());
        }
        let encoder = Sequential::new()
            .push(Flatten)
            .push(Linear::new(rng, channels * SIDE * SIDE, 500, true)?)
            .push(Activation(Unary::Elu(1.0)))
            .push(Dropout(0.1))
            .push(Linear::new(rng, 500, 500, true)?)
            .push(Activation(Unary::Tanh))
            .push(Dropout(0.1))
            .push(Linear::new(rng, 500, 2 * latent, true)?);
        let ngf = 8;
        let valid = Conv2dOptions::default();
        let relu = || Activation(Unary::Relu);
        let generator = Sequential::new()
            .push(ConvTranspose2d::new(rng, latent, ngf * 32, 4, valid, false)?) // 1x1 -> 4x4
            .push(BatchNorm::new(ngf * 32)?)
            .push(relu())
            .push(ConvTranspose2d::new(rng, ngf * 32, ngf * 16, 4, valid.padding(Padding::Same), false)?) // 4x4 -> 4x4
            .push(BatchNorm::new(ngf * 16)?)
            .push(relu())
            .push(ConvTranspose2d::new(rng, ngf * 16, ngf * 8, 4, valid, false)?) // 4x4 -> 7x7
            .push(Pad { pad: (0, 1, 0, 1), value: 0.0 }) // 7x7 -> 8x8
            .push(BatchNorm::new(ngf * 8)?)
            .push(relu())
            .push(ConvTranspose2d::new(rng, ngf * 8, channels, 4, valid.stride(4), false)?) // 8x8 -> 32x32
            .push(BatchNorm::new(channels)?)
            .push(Activation(Unary::Sigmoid));
        Ok(Vae { encoder, generator, latent, channels })
    }

    /// The size of the code z.
    pub fn latent(&self) -> usize {
        self.latent
    }

    /// The channels of the images it reads and draws.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// x [N, channels, 32, 32] in [0, 1] -> (mu, sigma), each [N, latent]; sigma = 1e-6 +
    /// softplus(.).
    pub fn encode(&mut self, x: &Var, ctx: &mut Ctx) -> Result<(Var, Var)> {
        self.encode_parts(x, ctx).map(|(_, mu, sigma)| (mu, sigma))
    }

    /// The encoder's output [N, 200] as well as mu and sigma.
    fn encode_parts(&mut self, x: &Var, ctx: &mut Ctx) -> Result<(Var, Var, Var)> {
        let s = x.shape();
        if s.len() != 4 || s[1..] != [self.channels, SIDE, SIDE] {
            return Err(stride_autograd::Error::shape("vae", format!("expects [N, {}, {SIDE}, {SIDE}] images, got {s:?}", self.channels)).into());
        }
        let h = call(&mut self.encoder, "encoder", x, ctx)?;
        let mu = h.narrow(1, 0, self.latent)?;
        let sigma = h.narrow(1, self.latent, self.latent)?.softplus()?.add_scalar(1e-6)?;
        Ok((h, mu, sigma))
    }

    /// z [N, latent] -> images [N, channels, 32, 32] in (0, 1).
    pub fn generate(&mut self, z: &Var, ctx: &mut Ctx) -> Result<Var> {
        let s = z.shape();
        if s.len() != 2 || s[1] != self.latent {
            return Err(stride_autograd::Error::shape("vae", format!("the generator expects codes [N, {}], got {s:?}", self.latent)).into());
        }
        let before = stride_autograd::tape_bytes();
        let z4 = z.reshape(&[s[0], self.latent, 1, 1])?;
        let latent = self.latent;
        ctx.record_step("latent", || format!("z as a {latent}x1x1 image"), &[z], &z4, before, false);
        call(&mut self.generator, "generator", &z4, ctx)
    }

    /// Writes the generator into `g` as ONNX operators, from a latent code `z` [N, latent]:
    /// what `stride export --model vae` writes.
    pub fn export_generator(&mut self, g: &mut stride_nn::export::Graph, z: &stride_nn::export::Value) -> Result<stride_nn::export::Value> {
        let n = z.shape()[0];
        let z4 = z.var.reshape(&[n, self.latent, 1, 1])?;
        let shape = g.ints("latent.shape", vec![0, self.latent as i64, 1, 1]);
        let z4 = g.op("Reshape", "latent", vec![z.name.clone(), shape], vec![], z4);
        g.child(&mut self.generator, "", "generator", &z4)
    }

    /// Encodes, draws z = mu + sigma * eps with eps from `ctx.rng`, generates; returns the
    /// reconstruction and the loss against `x`.
    pub fn forward_loss(&mut self, x: &Var, ctx: &mut Ctx) -> Result<(Var, VaeLoss)> {
        let (h, mu, sigma) = self.encode_parts(x, ctx)?;
        let before = stride_autograd::tape_bytes();
        let eps = Var::constant(ctx.rng.normal(&mu.shape(), 0.0, 1.0)?.to(mu.device())?);
        let z = mu.add(&sigma.mul(&eps)?)?;
        // mu and sigma are parts of the encoder's output h, which the trace knows.
        ctx.record_step("sample", || "z = mu + sigma * eps".into(), &[&h], &z, before, false);
        let y = self.generate(&z, ctx)?;
        let n = x.shape()[0] as f64;
        let likelihood = binary_cross_entropy(&y.clamp(CLIP, 1.0 - CLIP)?, x, Reduction::Sum)?.mul_scalar(1.0 / n)?;
        let kl = gaussian_kl(&mu, &sigma)?;
        let total = likelihood.add(&kl)?;
        Ok((y, VaeLoss { total, likelihood, kl }))
    }
}

impl VaeLoss {
    /// What a β-VAE minimises: L_likelihood + β L_KL (β = 1 is `total`, the negative evidence
    /// lower bound; β > 1 presses the code towards the prior, β < 1 lets it carry more).
    pub fn objective(&self, beta: f64) -> Result<Var> {
        if beta == 1.0 {
            return Ok(self.total.clone());
        }
        Ok(self.likelihood.add(&self.kl.mul_scalar(beta)?)?)
    }
}

/// The channels of the images VAE weights are for, from the generator's last weight: what
/// [`Vae::for_images`] must be given to load them (with [`latent_of`]).
pub fn channels_of(tensors: &HashMap<String, stride_autograd::Tensor<f32>>) -> Result<usize> {
    let w =
        tensors.get(IMAGE_WEIGHT).ok_or_else(|| stride_autograd::Error::arg("vae", format!("these weights have no {IMAGE_WEIGHT}: not a VAE's")))?;
    match *w.shape() {
        [64, c, 4, 4] if drawable(c) => Ok(c),
        ref s => Err(stride_autograd::Error::shape("vae", format!("{IMAGE_WEIGHT} is {s:?}; a VAE's is [64, channels (1 or 3), 4, 4]")).into()),
    }
}

/// The code size of VAE weights (a `vae.safetensors` read into tensors by name), from the
/// generator's first weight: what [`Vae::with_latent`] must be given to load them.
pub fn latent_of(tensors: &HashMap<String, stride_autograd::Tensor<f32>>) -> Result<usize> {
    let w =
        tensors.get(CODE_WEIGHT).ok_or_else(|| stride_autograd::Error::arg("vae", format!("these weights have no {CODE_WEIGHT}: not a VAE's")))?;
    match *w.shape() {
        [latent, _, 4, 4] if (1..=MAX_LATENT).contains(&latent) => Ok(latent),
        ref s => {
            Err(stride_autograd::Error::shape("vae", format!("{CODE_WEIGHT} is {s:?}; a VAE's is [latent (1..={MAX_LATENT}), 256, 4, 4]")).into())
        }
    }
}

impl Module for Vae {
    /// The reconstruction of x.
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var> {
        Ok(self.forward_loss(x, ctx)?.0)
    }
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        self.encoder.visit(&join(prefix, "encoder"), f);
        self.generator.visit(&join(prefix, "generator"), f);
    }
    fn describe(&self) -> String {
        "Vae".into()
    }
}
