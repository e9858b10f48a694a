//! Every zoo model and the VAE's generator, written to ONNX and read back: the imported network
//! has the same `state_dict` (names and values) and gives the same outputs.

use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_models::{InputSpec, ZOO};
use stride_nn::{Ctx, Module, Slot};

fn state(m: &mut dyn Module) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    m.visit("", &mut |name, slot| {
        let t = match slot {
            Slot::Param(v) => v.value(),
            Slot::Buffer(t) => t.clone(),
        };
        out.push((name, t.shape().to_vec(), t.data().to_vec()));
    });
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn run(m: &mut dyn Module, x: &Tensor<f32>) -> Tensor<f32> {
    no_grad(|| m.forward(&Var::constant(x.clone()), &mut Ctx::eval())).expect("forward").value()
}

fn close(name: &str, a: &Tensor<f32>, b: &Tensor<f32>) {
    assert_eq!(a.shape(), b.shape(), "{name}: output shapes");
    for (i, (x, y)) in a.data().iter().zip(b.data()).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{name}: output {i} is {x} after the round trip, {y} before");
    }
}

/// Batch norm's running statistics as a trained network has them (not the initial 0 and 1),
/// so a mix-up of mean and variance, or of epsilon, shows.
fn perturb_buffers(m: &mut dyn Module, rng: &mut Rng) {
    m.visit("", &mut |name, slot| {
        if let Slot::Buffer(t) = slot {
            if name.ends_with("running_mean") {
                *t = rng.uniform(t.shape(), -0.5, 0.5).unwrap();
            } else if name.ends_with("running_var") {
                *t = rng.uniform(t.shape(), 0.5, 2.0).unwrap();
            }
        }
    });
}

#[test]
fn every_zoo_model_survives_an_onnx_round_trip() {
    for e in ZOO {
        // The design input (VGG's adaptive pool has an ONNX form only where it divides the map),
        // ten classes to keep the dense layers small.
        let s = InputSpec { classes: 10, ..e.input };
        let mut rng = Rng::seed(7);
        let mut model = stride_models::build(e.name, &mut rng, s).unwrap();
        perturb_buffers(&mut model, &mut rng);
        let bytes = stride_onnx::export(&mut model, &[s.channels, s.height, s.width], stride_onnx::DEFAULT_OPSET)
            .unwrap_or_else(|err| panic!("{}: export: {err}", e.name));
        let imported = stride_onnx::import(&stride_onnx::decode(&bytes).unwrap()).unwrap_or_else(|err| panic!("{}: import: {err}", e.name));
        let mut back = imported.network;
        assert_eq!(back.input_shape, vec![None, Some(s.channels), Some(s.height), Some(s.width)], "{}", e.name);
        assert!(state(&mut back) == state(&mut model), "{}: the state_dict changed in the round trip", e.name);
        let x = rng.normal(&[2, s.channels, s.height, s.width], 0.0, 1.0).unwrap();
        close(e.name, &run(&mut back, &x), &run(&mut model, &x));
    }
}

#[test]
fn the_vae_generator_survives_an_onnx_round_trip() {
    let mut rng = Rng::seed(3);
    let mut vae = stride_models::vae::Vae::new(&mut rng).unwrap();
    perturb_buffers(&mut vae.generator, &mut rng);
    let z = rng.normal(&[3, stride_models::vae::LATENT], 0.0, 1.0).unwrap();
    let bytes = stride_onnx::export_with(Tensor::zeros(&[1, stride_models::vae::LATENT]).unwrap(), 17, |g, x| vae.export_generator(g, x)).unwrap();
    let mut back = stride_onnx::import(&stride_onnx::decode(&bytes).unwrap()).unwrap().network;
    let want = no_grad(|| vae.generate(&Var::constant(z.clone()), &mut Ctx::eval())).unwrap().value();
    let have = run(&mut back, &z);
    assert_eq!(have.shape(), [3, 1, 32, 32]);
    close("vae generator", &have, &want);
    // The generator's parameters keep their names.
    let names: Vec<String> = state(&mut back).into_iter().map(|(n, ..)| n).collect();
    assert!(names.contains(&"generator.0.weight".to_string()), "{names:?}");
}
