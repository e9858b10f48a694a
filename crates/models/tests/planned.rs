//! Planned inference (`stride_autograd::plan`) against eager inference, for every zoo model
//! and the VAE's generator: every model plans (nothing refused), and the outputs agree within
//! 1e-5 for batches that run NCHW (1 image per thread or fewer) and batch-blocked.

use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_models::{InputSpec, ZOO};
use stride_nn::planned::{compile, Planned};
use stride_nn::{Ctx, Module, Slot};

fn eager(m: &mut dyn Module, x: &Tensor<f32>) -> Tensor<f32> {
    no_grad(|| m.forward(&Var::constant(x.clone()), &mut Ctx::eval())).expect("forward").value()
}

/// Largest difference relative to the output's scale.
fn close(name: &str, have: &Tensor<f32>, want: &Tensor<f32>) {
    assert_eq!(have.shape(), want.shape(), "{name}: output shapes");
    let scale = want.data().iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in have.data().iter().zip(want.data()).enumerate() {
        assert!((x - y).abs() <= 1e-5 * scale, "{name}: output {i} is {x} planned, {y} eager (scale {scale})");
    }
}

/// Running statistics and affine parameters as a trained network has them, so folding batch
/// norm into a convolution is tested with values that matter.
fn perturb_batch_norm(m: &mut dyn Module, rng: &mut Rng) {
    m.visit("", &mut |name, slot| match slot {
        Slot::Buffer(t) if name.ends_with("running_mean") => *t = rng.uniform(t.shape(), -0.5, 0.5).unwrap(),
        Slot::Buffer(t) if name.ends_with("running_var") => *t = rng.uniform(t.shape(), 0.5, 2.0).unwrap(),
        // Batch norm's weight and bias (and every other bias): away from 1 and 0.
        Slot::Param(v) if v.shape().len() == 1 => v.set_value(rng.uniform(&v.shape(), 0.5, 1.5).unwrap()).unwrap(),
        _ => {}
    });
}

#[test]
fn every_zoo_model_plans_and_matches_eager() {
    for e in ZOO {
        let s = InputSpec { classes: 10, ..e.input };
        let mut rng = Rng::seed(5);
        let mut model = stride_models::build(e.name, &mut rng, s).unwrap();
        perturb_batch_norm(&mut model, &mut rng);
        let batches: &[usize] = if s.height <= 32 { &[1, 3, 8] } else { &[1, 3] };
        for &n in batches {
            let x = rng.normal(&[n, s.channels, s.height, s.width], 0.0, 1.0).unwrap();
            let mut plan = compile(&mut model, &x).unwrap_or_else(|err| panic!("{} (batch {n}): refused: {err}", e.name));
            let want = eager(&mut model, &x);
            close(&format!("{} batch {n}", e.name), &plan.run(&x).unwrap(), &want);
            // A second batch through the same arena.
            let x2 = rng.normal(&[n, s.channels, s.height, s.width], 0.0, 1.0).unwrap();
            close(&format!("{} batch {n}, second run", e.name), &plan.run(&x2).unwrap(), &eager(&mut model, &x2));
        }
    }
}

#[test]
fn plans_fuse_fold_and_block() {
    let mut rng = Rng::seed(1);
    let spec = InputSpec { channels: 3, height: 32, width: 32, classes: 10 };
    let mut resnet = stride_models::build("resnet18_cifar", &mut rng, spec).unwrap();
    let x = rng.normal(&[8, 3, 32, 32], 0.0, 1.0).unwrap();
    let steps = compile(&mut resnet, &x).unwrap().describe();
    // Every batch norm folded into its convolution: none left as a step of its own.
    assert!(!steps.iter().any(|s| s.contains("batch_norm")), "{steps:#?}");
    // Each basic block's second convolution takes the shortcut and the relu.
    assert_eq!(steps.iter().filter(|s| s.starts_with("conv2d") && s.contains("+residual +relu")).count(), 8, "{steps:#?}");
    let mnist = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let mut cnn = stride_models::build("cnn", &mut rng, mnist).unwrap();
    let x = rng.normal(&[64, 1, 28, 28], 0.0, 1.0).unwrap();
    let steps = compile(&mut cnn, &x).unwrap().describe();
    assert!(steps.iter().filter(|s| s.contains("Blocked") && s.contains("+bias +relu")).count() == 2, "{steps:#?}");
    // Each 2x2 average pooling is done inside the convolution before it.
    assert_eq!(steps.iter().filter(|s| s.starts_with("conv2d") && s.ends_with("+relu +avg_pool2d")).count(), 2, "{steps:#?}");
    assert!(!steps.iter().any(|s| s == "avg_pool2d"), "{steps:#?}");
    assert!(steps.iter().any(|s| s == "matmul +bias +relu"), "{steps:#?}");
    // And the fused plan gives what the layers give one by one, at the benchmark's batch.
    let mut plan = compile(&mut cnn, &x).unwrap();
    close("cnn batch 64", &plan.run(&x).unwrap(), &eager(&mut cnn, &x));
}

#[test]
fn a_plan_refuses_other_shapes_and_training_mode() {
    let mut rng = Rng::seed(2);
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let mut model = stride_models::build("cnn-bn", &mut rng, spec).unwrap();
    let x = rng.normal(&[4, 1, 28, 28], 0.0, 1.0).unwrap();
    let mut plan = compile(&mut model, &x).unwrap();
    let err = plan.run(&rng.normal(&[5, 1, 28, 28], 0.0, 1.0).unwrap()).unwrap_err().to_string();
    assert!(err.contains("[4, 1, 28, 28]") && err.contains("[5, 1, 28, 28]"), "{err}");
    // Recorded in training mode, batch norm uses batch statistics: not a plan.
    let input = Var::parameter(x.clone());
    let y = model.forward(&input, &mut Ctx::train(0)).unwrap();
    let err = stride_autograd::Plan::compile(&input, &y).err().expect("refused").to_string();
    assert!(err.contains("training mode"), "{err}");
    // Planned keeps a plan per shape and gives eager results for each.
    let mut planned = Planned::new();
    for n in [4, 5, 4] {
        let x = rng.normal(&[n, 1, 28, 28], 0.0, 1.0).unwrap();
        close("Planned", &planned.forward(&mut model, &x).unwrap(), &eager(&mut model, &x));
        assert_eq!(planned.refusal(&[n, 1, 28, 28]), None);
    }
}

#[test]
fn the_vae_generator_plans() {
    let mut rng = Rng::seed(3);
    let mut vae = stride_models::vae::Vae::new(&mut rng).unwrap();
    perturb_batch_norm(&mut vae.generator, &mut rng);
    let z = rng.normal(&[8, stride_models::vae::LATENT], 0.0, 1.0).unwrap();
    let input = Var::parameter(z.clone());
    let y = stride_autograd::with_grad(|| vae.generate(&input, &mut Ctx::eval())).unwrap();
    let mut plan = stride_autograd::Plan::compile(&input, &y).unwrap();
    let want = no_grad(|| vae.generate(&Var::constant(z.clone()), &mut Ctx::eval())).unwrap().value();
    close("vae generator", &plan.run(&z).unwrap(), &want);
}
