//! Your own layers: an activation (Mish) and a residual block with a learned gate (ReZero),
//! written from Stride's autograd ops, their gradient checked against finite differences,
//! trained beside the built-in layers by `stride_train::train` with a validation split and
//! early stopping, then saved and loaded by name (see README.md beside this file).
//!
//! ```sh
//! cargo run --release -p stride-cli --example custom-layer
//! ```

use stride_autograd::{gradcheck, no_grad, Conv2dOptions, Elem, Padding, Pool2dOptions, Rng, Tensor, Var};
use stride_data::embedded_mnist;
use stride_nn::layers::{BatchNorm, Conv2d, Flatten, Linear, Pool, Sequential};
use stride_nn::{call, join, Ctx, Module, Slot};
use stride_train::{checkpoint, train, TrainConfig};

/// Mish (Misra, 2019): x * tanh(softplus(x)). Written once, generic over the element type, so
/// the model runs it in f32 and the gradient check in f64; autograd derives the backward pass.
fn mish<T: Elem>(x: &Var<T>) -> stride_autograd::Result<Var<T>> {
    x.mul(&x.softplus()?.tanh()?)
}

/// Mish as a layer: no parameters, so `visit` has nothing to show.
struct Mish;

impl Module for Mish {
    fn forward(&mut self, x: &Var, _: &mut Ctx) -> stride_nn::Result<Var> {
        Ok(mish(x)?)
    }
    fn visit(&mut self, _: &str, _: &mut dyn FnMut(String, Slot<'_>)) {}
    fn describe(&self) -> String {
        "Mish".into()
    }
}

/// A residual block whose branch enters through a learned scalar that starts at zero (ReZero,
/// Bachlechner et al., 2020): y = x + alpha * body(x), so the block begins as the identity.
struct ReZero {
    body: Sequential,
    alpha: Var,
}

impl ReZero {
    fn new(rng: &mut Rng, channels: usize) -> stride_nn::Result<Self> {
        let same = Conv2dOptions::default().padding(Padding::Same);
        let body = Sequential::new()
            .push(Conv2d::new(rng, channels, channels, 3, same, false)?)
            .push(BatchNorm::new(channels)?)
            .push(Mish)
            .push(Conv2d::new(rng, channels, channels, 3, same, true)?);
        Ok(ReZero { body, alpha: Var::parameter(Tensor::zeros(&[1])?) })
    }
}

impl Module for ReZero {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> stride_nn::Result<Var> {
        // `call` runs a child under its name: errors and --debug lines carry the dotted path.
        let branch = call(&mut self.body, "body", x, ctx)?;
        Ok(x.add(&branch.mul(&self.alpha)?)?)
    }
    /// It runs other modules: its own line in debug output would repeat theirs.
    fn is_container(&self) -> bool {
        true
    }
    /// Every parameter and buffer under a stable name: what optimizers, checkpoints and
    /// `model.to(device)` see ("4.body.0.weight", ..., "4.alpha").
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>)) {
        self.body.visit(&join(prefix, "body"), f);
        f(join(prefix, "alpha"), Slot::Param(&self.alpha));
    }
    fn describe(&self) -> String {
        format!("ReZero({})", self.body.describe())
    }
}

/// conv 16 3x3 -> batch norm -> Mish -> max-pool -> ReZero -> max-pool -> ReZero -> dense 10.
fn network(rng: &mut Rng) -> stride_nn::Result<Sequential> {
    let same = Conv2dOptions::default().padding(Padding::Same);
    Ok(Sequential::new()
        .push(Conv2d::new(rng, 1, 16, 3, same, false)?)
        .push(BatchNorm::new(16)?)
        .push(Mish)
        .push(Pool::Max(Pool2dOptions::new(2))) // [N, 16, 14, 14]
        .push(ReZero::new(rng, 16)?)
        .push(Pool::Max(Pool2dOptions::new(2))) // [N, 16, 7, 7]
        .push(ReZero::new(rng, 16)?)
        .push(Flatten)
        .push(Linear::new(rng, 16 * 7 * 7, 10, true)?))
}

/// The learned gates, by name.
fn alphas(model: &mut dyn Module) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    model.visit("", &mut |name, slot| {
        if let (true, Slot::Param(v)) = (name.ends_with("alpha"), slot) {
            out.push((name, v.value().data()[0]));
        }
    });
    out
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The new function's gradient against finite differences, in f64.
    let x = Rng::seed(1).normal::<f64>(&[2, 3, 4, 4], 0.0, 2.0)?;
    gradcheck(std::slice::from_ref(&x), 1e-5, |v| mish(&v[0]))?;
    println!("1. mish: backward agrees with finite differences at 40 points");
    // A slip such as detaching the gate (x * tanh(softplus(x)) with tanh(...) held constant)
    // is caught, with the element and both values.
    let slip = gradcheck(std::slice::from_ref(&x), 1e-5, |v| v[0].mul(&v[0].softplus()?.tanh()?.detach()));
    println!("   a detached gate fails it: {}", slip.err().ok_or("the check missed a detached gate")?);

    // 2. The layers beside built-in ones; one batch with debug output shows every path.
    let mut model = network(&mut Rng::seed(0))?;
    let data = embedded_mnist()?;
    let mut ctx = Ctx::eval();
    ctx.debug = true;
    println!("2. shapes of one batch of 2 (on stderr, by layer path), {} parameters", model.num_parameters());
    let x = Var::constant(Tensor::zeros(&[2, 1, 28, 28])?);
    no_grad(|| model.forward(&x, &mut ctx))?;

    // 3. Trained by the library's loop: a tenth of the training digits held out to judge the
    //    epochs (and stop early), the test digits used once at the end.
    let out = std::env::temp_dir().join(format!("stride-custom-layer-{}", std::process::id()));
    let cfg = TrainConfig { epochs: 3, validation_split: Some(0.1), early_stopping: Some(2), out_dir: Some(out.clone()), ..TrainConfig::default() };
    let outcome = train(&mut model, &data, &cfg, false, None, |r| {
        println!("3. epoch {}: train loss {:.4}, validation loss {:.4} accuracy {:.4}", r.epoch, r.train_loss, r.test.loss, r.test.accuracy)
    })?;
    let test = outcome.test.ok_or("a run with a validation split reports its test set")?;
    println!("   test accuracy {:.4}; gates learned: {:?}", test.accuracy, alphas(&mut model));

    // 4. Saved and loaded by name into a fresh network: the same answers.
    let file = out.join("model.safetensors");
    let mut again = network(&mut Rng::seed(7))?;
    checkpoint::load_into(&mut again, &checkpoint::load(&file)?)?;
    let batch = Var::constant(Tensor::from_vec(data.test.images[..8 * 784].iter().map(|&b| b as f32 / 255.0).collect(), &[8, 1, 28, 28])?);
    let a = no_grad(|| model.forward(&batch, &mut Ctx::eval()))?;
    let b = no_grad(|| again.forward(&batch, &mut Ctx::eval()))?;
    if a.value() != b.value() {
        return Err(format!("the weights reloaded from {} give other logits", file.display()).into());
    }
    println!("4. reloaded by name into a fresh network: the same logits for 8 test digits");
    std::fs::remove_dir_all(out)?;
    Ok(())
}
