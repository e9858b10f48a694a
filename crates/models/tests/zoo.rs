//! The zoo: parameter counts against the published ones, size checks, and a short training
//! run per family that must lower the loss.

use stride_autograd::{cross_entropy, Rng, Var};
use stride_models::{InputSpec, ZOO};
use stride_nn::optim::{zero_grad, Adam, Optimizer};
use stride_nn::{Ctx, Module};

/// Parameters of the zoo model built (without the dry run) for its design input.
fn count(name: &str) -> usize {
    let e = stride_models::entry(name).unwrap();
    (e.build)(&mut Rng::seed(0), e.input).unwrap().num_parameters()
}

#[test]
fn parameter_counts_match_the_published_ones() {
    // torchvision 0.29 (`sum(p.numel() for p in m.parameters())`, 1000 classes; googlenet with
    // aux_logits=False); Keras for mobilenet_v1 and xception (trainable parameters).
    for (name, want) in [
        ("alexnet", 61_100_840),
        ("vgg11", 132_863_336),
        ("vgg11_bn", 132_868_840),
        ("vgg16", 138_357_544),
        ("vgg16_bn", 138_365_992),
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("densenet121", 7_978_856),
        ("mobilenet_v2", 3_504_872),
        ("shufflenet_v2_x1_0", 2_278_604),
        ("googlenet", 6_624_904),
        ("mobilenet_v1", 4_231_976),
        ("xception", 22_855_952),
        // LeNet-5 on 28x28 (padding 2): 156 + 2,416 + 48,120 + 10,164 + 850.
        ("lenet5", 61_706),
        // The CIFAR ResNet-18 with 10 classes as the usual CIFAR code bases count it.
        ("resnet18_cifar", 11_173_962),
        // SE units add 2*C*C/16 + C/16 + C per block: 25,392 + 133,248 + 792,960 + 1,579,392
        // over ResNet-50 (timm's seresnet50 has the same 28,088,024).
        ("se_resnet50", 25_557_032 + 2_530_992),
        // 580*2 + 2,184*2 + 8,464*2 + 33,312*2 over ResNet-18.
        ("se_resnet18", 11_689_512 + 89_080),
    ] {
        assert_eq!(count(name), want, "{name}");
    }
}

#[test]
fn every_model_takes_its_smallest_size_and_refuses_smaller() {
    for e in ZOO {
        let at = |side: usize| InputSpec { height: side, width: side, classes: 7, ..e.input };
        stride_models::build(e.name, &mut Rng::seed(1), at(e.min_size)).unwrap_or_else(|err| panic!("{} at {}: {err}", e.name, e.min_size));
        if e.min_size > 1 {
            let err = stride_models::build(e.name, &mut Rng::seed(1), at(e.min_size - 1))
                .err()
                .unwrap_or_else(|| panic!("{} took {}", e.name, e.min_size - 1))
                .to_string();
            assert!(err.contains(&format!("needs at least {0}x{0}", e.min_size)), "{}: {err}", e.name);
        }
    }
}

/// Trains `name` for a few Adam steps on one fixed batch and returns the first and last losses.
fn short_run(name: &str, spec: InputSpec, steps: usize, lr: f64) -> (f32, f32) {
    let rng = &mut Rng::seed(5);
    let mut m = stride_models::build(name, rng, spec).unwrap();
    // A learnable batch: each class's images are its own random pattern plus noise.
    let shape = [spec.channels, spec.height, spec.width];
    let patterns: Vec<_> = (0..spec.classes).map(|_| rng.normal::<f32>(&shape, 0.0, 1.0).unwrap()).collect();
    let y: Vec<usize> = (0..8).map(|i| i % spec.classes).collect();
    let mut data = Vec::new();
    for &c in &y {
        let noise = rng.normal::<f32>(&shape, 0.0, 0.5).unwrap();
        data.extend(patterns[c].data().iter().zip(noise.data()).map(|(p, n)| p + n));
    }
    let x = Var::constant(stride_autograd::Tensor::from_vec(data, &[8, spec.channels, spec.height, spec.width]).unwrap());
    let params = m.parameters();
    let mut opt = Adam::new(lr, (0.9, 0.999), 1e-8, 0.0, false).unwrap();
    let mut losses = Vec::new();
    for step in 0..steps {
        zero_grad(&params);
        let out = m.forward(&x, &mut Ctx::train(step as u64)).unwrap();
        let loss = cross_entropy(&out, &y, 0.0).unwrap();
        losses.push(loss.value().data()[0]);
        loss.backward().unwrap();
        opt.step(&params).unwrap();
    }
    // The mean of the last three, as single steps of the nets with dropout are noisy.
    (losses[0], losses[steps - 3..].iter().sum::<f32>() / 3.0)
}

#[test]
fn a_short_run_lowers_the_loss_in_every_family() {
    let cifar = |side| InputSpec { channels: 3, height: side, width: side, classes: 4 };
    for (name, spec, steps) in [
        ("lenet5", InputSpec { channels: 1, height: 28, width: 28, classes: 4 }, 15),
        ("allconv", cifar(16), 10),
        ("vgg11_bn", cifar(32), 6),
        ("googlenet", cifar(32), 8),
        ("resnet18_cifar", cifar(16), 6),
        ("se_resnet18", cifar(32), 6),
        ("densenet_bc", cifar(16), 8),
        ("mobilenet_v1", cifar(32), 8),
        ("mobilenet_v2", cifar(32), 8),
        ("shufflenet_v2_x1_0", cifar(32), 8),
        ("xception", cifar(32), 6),
    ] {
        // The nets without batch norm take a smaller step.
        let lr = match name {
            "vgg11_bn" => 1e-4,
            _ => 1e-3,
        };
        let (first, last) = short_run(name, spec, steps, lr);
        eprintln!("{name}: loss {first} -> {last}");
        assert!(last.is_finite() && last < 0.8 * first, "{name}: loss {first} -> {last}");
    }
}
