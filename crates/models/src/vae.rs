//! The convolutional variational autoencoder of the ADCME CNN article (bench/SPEC.md's B2): a
//! dense encoder to the mean and spread of a 100-dimensional code, and a generator of
//! transposed convolutions from the code back to a 32x32 image.

use stride_autograd::{binary_cross_entropy, gaussian_kl, Conv2dOptions, Padding, Reduction, Rng, ToDevice, Unary, Var};
use stride_nn::blocks::{ConvTranspose2d, Pad};
use stride_nn::layers::{Activation, BatchNorm, Dropout, Flatten, Linear, Sequential};
use stride_nn::{call, join, Ctx, Module, Result, Slot};

pub const ABOUT: &str = "the ADCME article's convolutional VAE: dense encoder (500 elu, 500 tanh, 200) to a 100-d code, generator of transposed convolutions (ngf 8) to 1x32x32";
/// Size of the code z.
pub const LATENT: usize = 100;
/// Side of the images the VAE reads and writes.
pub const SIDE: usize = 32;
/// Outputs are clipped to [CLIP, 1 - CLIP] before the likelihood (1e-8 rounds to 1.0 in f32).
pub const CLIP: f64 = 1e-7;

pub struct Vae {
    pub encoder: Sequential,
    pub generator: Sequential,
}

/// The three terms of the loss, batch means.
pub struct VaeLoss {
    pub total: Var,
    /// Summed binary cross-entropy per image.
    pub likelihood: Var,
    pub kl: Var,
}

impl Vae {
    pub fn new(rng: &mut Rng) -> Result<Self> {
        let encoder = Sequential::new()
            .push(Flatten)
            .push(Linear::new(rng, SIDE * SIDE, 500, true)?)
            .push(Activation(Unary::Elu(1.0)))
            .push(Dropout(0.1))
            .push(Linear::new(rng, 500, 500, true)?)
            .push(Activation(Unary::Tanh))
            .push(Dropout(0.1))
            .push(Linear::new(rng, 500, 2 * LATENT, true)?);
        let ngf = 8;
        let valid = Conv2dOptions::default();
        let relu = || Activation(Unary::Relu);
        let generator = Sequential::new()
            .push(ConvTranspose2d::new(rng, LATENT, ngf * 32, 4, valid, false)?) // 1x1 -> 4x4
            .push(BatchNorm::new(ngf * 32)?)
            .push(relu())
            .push(ConvTranspose2d::new(rng, ngf * 32, ngf * 16, 4, valid.padding(Padding::Same), false)?) // 4x4 -> 4x4
            .push(BatchNorm::new(ngf * 16)?)
            .push(relu())
            .push(ConvTranspose2d::new(rng, ngf * 16, ngf * 8, 4, valid, false)?) // 4x4 -> 7x7
            .push(Pad { pad: (0, 1, 0, 1), value: 0.0 }) // 7x7 -> 8x8
            .push(BatchNorm::new(ngf * 8)?)
            .push(relu())
            .push(ConvTranspose2d::new(rng, ngf * 8, 1, 4, valid.stride(4), false)?) // 8x8 -> 32x32
            .push(BatchNorm::new(1)?)
            .push(Activation(Unary::Sigmoid));
        Ok(Vae { encoder, generator })
    }

    /// x [N, 1, 32, 32] in [0, 1] -> (mu, sigma), each [N, 100]; sigma = 1e-6 + softplus(.).
    pub fn encode(&mut self, x: &Var, ctx: &mut Ctx) -> Result<(Var, Var)> {
        self.encode_parts(x, ctx).map(|(_, mu, sigma)| (mu, sigma))
    }

    /// The encoder's output [N, 200] as well as mu and sigma.
    fn encode_parts(&mut self, x: &Var, ctx: &mut Ctx) -> Result<(Var, Var, Var)> {
        let s = x.shape();
        if s.len() != 4 || s[1..] != [1, SIDE, SIDE] {
            return Err(stride_autograd::Error::shape("vae", format!("expects [N, 1, {SIDE}, {SIDE}] images, got {s:?}")).into());
        }
        let h = call(&mut self.encoder, "encoder", x, ctx)?;
        let mu = h.narrow(1, 0, LATENT)?;
        let sigma = h.narrow(1, LATENT, LATENT)?.softplus()?.add_scalar(1e-6)?;
        Ok((h, mu, sigma))
    }

    /// z [N, 100] -> images [N, 1, 32, 32] in (0, 1).
    pub fn generate(&mut self, z: &Var, ctx: &mut Ctx) -> Result<Var> {
        let n = z.shape()[0];
        let before = stride_autograd::tape_bytes();
        let z4 = z.reshape(&[n, LATENT, 1, 1])?;
        ctx.record_step("latent", || "z as a 100x1x1 image".into(), &[z], &z4, before, false);
        call(&mut self.generator, "generator", &z4, ctx)
    }

    /// Encodes, draws z = mu + sigma * eps with eps from `ctx.rng`, generates; returns the
    /// reconstruction and the loss against `x`.
    /// Writes the generator into `g` as ONNX operators, from a latent code `z` [N, 100]: what
    /// `stride export --model vae` writes.
    pub fn export_generator(&mut self, g: &mut stride_nn::export::Graph, z: &stride_nn::export::Value) -> Result<stride_nn::export::Value> {
        let n = z.shape()[0];
        let z4 = z.var.reshape(&[n, LATENT, 1, 1])?;
        let shape = g.ints("latent.shape", vec![0, LATENT as i64, 1, 1]);
        let z4 = g.op("Reshape", "latent", vec![z.name.clone(), shape], vec![], z4);
        g.child(&mut self.generator, "", "generator", &z4)
    }

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
