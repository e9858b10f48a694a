//! TOML model files: they build what they say, and their errors name the layer and the field.

use stride_autograd::{Rng, Tensor, Var};
use stride_models::{build, build_any, from_toml, InputSpec};
use stride_nn::{Ctx, Module};

const MNIST: InputSpec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };

fn example(name: &str) -> String {
    format!("{}/../../examples/models/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_tutorial_file_equals_the_zoo_model() {
    let mut a = build_any(&example("tutorial-cnn.toml"), &mut Rng::seed(3), MNIST).unwrap();
    let mut b = build("cnn", &mut Rng::seed(3), MNIST).unwrap();
    assert_eq!(a.num_parameters(), 129_068);
    assert_eq!(a.num_parameters(), b.num_parameters());
    // Same layers in the same order with the same seed: the same initial weights.
    let (pa, pb) = (a.parameters(), b.parameters());
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(x.value(), y.value());
    }
}

#[test]
fn blocks_build_and_run() {
    let mut m = build_any(&example("small-resnet.toml"), &mut Rng::seed(0), MNIST).unwrap();
    let y = m.forward(&Var::constant(Tensor::zeros(&[2, 1, 28, 28]).unwrap()), &mut Ctx::train(0)).unwrap();
    assert_eq!(y.shape(), [2, 10]);
    let mut names = Vec::new();
    m.visit("", &mut |n, _| names.push(n));
    assert!(names.contains(&"3.body.0.weight".to_string()) && names.contains(&"6.2.1.bias".to_string()), "{names:?}");
}

#[test]
fn errors_name_the_file_layer_and_field() {
    let err = |text: &str| from_toml("m.toml", text, &mut Rng::seed(0), MNIST).unwrap_err().to_string();
    assert!(err("layers = [").contains("m.toml: not valid TOML"));
    assert!(err("x = 1").contains("unknown top-level key 'x'"));
    assert!(err("layers = []").contains("the list of layers is empty"));
    let e = err("[[layers]]\ntype = \"conv2d\"\nout_channels = 8\n");
    assert_eq!(e, "model file: m.toml: layer 0 (conv2d): field 'kernel' is required");
    let e = err("[[layers]]\ntype = \"conv2d\"\nout_channels = 8\nkernel = 3\nkernal_size = 2\n");
    assert!(e.contains("layer 0 (conv2d): unknown field 'kernal_size'"), "{e}");
    let e = err("[[layers]]\ntype = \"conv2d\"\nout_channels = -3\nkernel = 3\n");
    assert!(e.contains("field 'out_channels' must be an integer from 1 to 65536, got -3"), "{e}");
    let e = err("[[layers]]\ntype = \"conv2d\"\nout_channels = 8\nkernel = 3\npadding = \"full\"\n");
    assert!(e.contains("field 'padding' must be"), "{e}");
    let e = err("[[layers]]\ntype = \"linear\"\nout_features = 10\n");
    assert!(e.contains("layer 0 (linear): needs a flat input [F] (add a flatten layer before it)"), "{e}");
    let e = err("[[layers]]\ntype = \"conv2d\"\nout_channels = 8\nkernel = 30\n");
    assert!(e.contains("layer 0") && e.contains("kernel 30 is larger than the padded input 28"), "{e}");
    let e = err("[[layers]]\ntype = \"warp\"\n");
    assert!(e.contains("layer 0: unknown layer type 'warp'"), "{e}");
    let e = err("[[layers]]\ntype = \"residual\"\nlayers = [{ type = \"conv2d\", out_channels = 4, kernel = 3 }]\n");
    assert!(e.contains("the block gives [1, 4, 26, 26] but the shortcut gives [1, 1, 28, 28]"), "{e}");
    let e = err("[[layers]]\ntype = \"concat\"\nbranches = [[{ type = \"relu\", alpha = 1 }]]\n");
    assert!(e.contains("layer 0 (concat), branch 0 layer 0 (relu): unknown field 'alpha' (this layer takes: none)"), "{e}");
    assert!(build_any("/no/such/model.toml", &mut Rng::seed(0), MNIST).unwrap_err().to_string().contains("/no/such/model.toml"));
}

#[test]
fn sizes_are_checked_before_anything_is_allocated() {
    let layers = |body: &str| format!("[[layers]]\n{body}");
    let cases = [
        // 65,536 x 65,536 weights: 16 GiB.
        (
            format!(
                "{}\n{}",
                layers("type = \"conv2d\"\nout_channels = 65536\nkernel = 1"),
                layers("type = \"conv2d\"\nout_channels = 65536\nkernel = 1")
            ),
            "layer 1 (conv2d): the model's parameter count would be 4295163904, more than the 268435456",
        ),
        (
            format!("{}\n{}", layers("type = \"flatten\""), layers("type = \"linear\"\nout_features = 1048576")),
            "layer 1 (linear): the model's parameter count would be 823132160",
        ),
        (
            format!("{}\n{}", layers("type = \"conv2d\"\nout_channels = 400\nkernel = 1"), layers("type = \"pad\"\npadding = 1024")),
            "layer 1 (pad): the output per image would be 1723910400",
        ),
        (
            format!(
                "{}\n{}",
                layers("type = \"conv_transpose2d\"\nout_channels = 4\nkernel = 64\nstride = 64"),
                layers("type = \"conv_transpose2d\"\nout_channels = 4\nkernel = 64\nstride = 64")
            ),
            "layer 1 (conv_transpose2d): the output per image would be",
        ),
        (
            format!("{}\n{}", layers("type = \"conv2d\"\nout_channels = 60000\nkernel = 1"), layers("type = \"adaptive_avg_pool2d\"\nsize = 4096")),
            "layer 1 (adaptive_avg_pool2d): the output per image would be 1006632960000",
        ),
        // Small enough to hold, too slow to build: 16 filters of 64x64 over a 1,052-pixel square.
        (
            format!("{}\n{}", layers("type = \"pad\"\npadding = 512"), layers("type = \"conv2d\"\nout_channels = 16\nkernel = 64")),
            "layer 1 (conv2d): the multiply-adds per image would be",
        ),
    ];
    for (text, want) in cases {
        let e = from_toml("big.toml", &text, &mut Rng::seed(0), MNIST).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(want), "{want}\n  got: {e}");
    }
}
