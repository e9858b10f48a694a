//! `summary`'s numbers against hand computations: receptive fields, effective strides and
//! multiply-adds of LeNet-5 and ResNet-18, the field rules for dilation and transposed
//! convolution, and the memory model's parts.

use stride_autograd::{Conv2dOptions, Padding, Rng, Tensor, Var};
use stride_models::InputSpec;
use stride_nn::blocks::ConvTranspose2d;
use stride_nn::layers::{Conv2d, Sequential};
use stride_nn::{Ctx, Module, Slot};
use stride_train::inspect::{self, Summary};
use stride_train::OptimizerKind;

fn zoo(name: &str, c: usize, side: usize, classes: usize) -> Summary {
    let spec = InputSpec { channels: c, height: side, width: side, classes };
    let mut m = stride_models::build(name, &mut Rng::seed(0), spec).unwrap();
    inspect::summarize(&mut m, [c, side, side]).unwrap()
}

fn row<'a>(s: &'a Summary, path: &str) -> &'a stride_nn::Row {
    s.rows.iter().find(|r| r.path == path).unwrap_or_else(|| panic!("no row {path}: {:?}", s.rows.iter().map(|r| &r.path).collect::<Vec<_>>()))
}

#[test]
fn lenet5_by_hand() {
    let s = zoo("lenet5", 1, 28, 10);
    // (layer, receptive field, jump): conv 5x5 adds 4 x jump, a 2x2 pool adds 1 x jump and
    // doubles it.
    for (path, field, jump) in [("conv1", 5.0, 1.0), ("pool1", 6.0, 2.0), ("conv2", 6.0 + 4.0 * 2.0, 2.0), ("pool2", 14.0 + 2.0, 4.0)] {
        let r = row(&s, path);
        assert_eq!((r.field.size, r.field.jump, r.field.whole), ([field; 2], [jump; 2], false), "{path}");
    }
    assert!(row(&s, "fc1").field.whole, "a dense layer sees the whole image");
    // Multiply-adds: outputs x weights per output.
    let by_hand = [("conv1", 6 * 28 * 28 * 25), ("conv2", 16 * 10 * 10 * (6 * 25)), ("fc1", 120 * 400), ("fc2", 84 * 120), ("fc3", 10 * 84)];
    for (path, macs) in by_hand {
        assert_eq!(row(&s, path).macs, macs as u64, "{path}");
    }
    assert_eq!(s.macs(), by_hand.iter().map(|(_, m)| *m as u64).sum::<u64>());
    assert_eq!(s.macs(), 416_520);
    assert_eq!(s.params, 61_706);
    assert_eq!(row(&s, "pool2").output, vec![2, 16, 5, 5], "rows carry the traced batch of two");
}

#[test]
fn resnet18_by_hand() {
    let s = zoo("resnet18", 3, 224, 1000);
    // conv1 7x7/2: 7, jump 2; maxpool 3x3/2: 7 + 2*2 = 11, jump 4; each 3x3 conv adds 2 x jump;
    // the first conv of stages 2-4 has stride 2.
    let expect = [
        ("conv1", 7.0, 2.0),
        ("maxpool", 11.0, 4.0),
        ("layer1.0.conv1", 19.0, 4.0),
        ("layer1.1.conv2", 11.0 + 4.0 * 8.0, 4.0),
        ("layer2.0.conv1", 43.0 + 2.0 * 4.0, 8.0),
        ("layer2.1.conv2", 51.0 + 3.0 * 16.0, 8.0),
        ("layer2.0.downsample.0", 43.0, 8.0),
        ("layer3.1.conv2", 99.0 + 2.0 * 8.0 + 3.0 * 32.0, 16.0),
        ("layer4.1.conv2", 211.0 + 2.0 * 16.0 + 3.0 * 64.0, 32.0),
    ];
    for (path, field, jump) in expect {
        let r = row(&s, path);
        assert_eq!((r.field.size, r.field.jump), ([field; 2], [jump; 2]), "{path}");
    }
    // The residual sum takes the larger field of its two branches.
    assert_eq!(row(&s, "layer2.0").field.size, [67.0; 2]);
    assert_eq!(row(&s, "layer4.1").field.size, [435.0; 2], "ResNet-18's well-known 435");
    // Multiply-adds, stage by stage: a 3x3 conv at C channels on an S x S map costs
    // C * S * S * C * 9; a stage's first conv halves S from C/2 channels; downsample 1x1.
    let conv3 = |c: u64, s: u64| c * s * s * c * 9;
    let stage = |c: u64, s: u64| (c * s * s * (c / 2) * 9) + 3 * conv3(c, s) + c * s * s * (c / 2);
    let by_hand = 64 * 112 * 112 * 3 * 49 + 4 * conv3(64, 56) + stage(128, 28) + stage(256, 14) + stage(512, 7) + 512 * 1000;
    assert_eq!(s.macs(), by_hand);
    assert_eq!(by_hand, 1_814_073_344, "torchvision's documented 1.81 GFLOPS (multiply-adds)");
    assert_eq!(s.params, 11_689_512);
}

#[test]
fn dilated_and_transposed_fields() {
    let mut rng = Rng::seed(0);
    let dil = Conv2dOptions { dilation: (2, 2), padding: Padding::uniform(2), ..Conv2dOptions::default() };
    let up = Conv2dOptions { stride: (2, 2), ..Conv2dOptions::default() };
    let mut m = Sequential::new()
        .push(Conv2d::new(&mut rng, 1, 2, 3, dil, true).unwrap())
        .push(Conv2d::new(&mut rng, 2, 2, 3, Conv2dOptions { stride: (2, 2), ..dil }, true).unwrap())
        .push(ConvTranspose2d::new(&mut rng, 2, 2, 4, up, true).unwrap());
    let s = inspect::summarize(&mut m, [1, 16, 16]).unwrap();
    // Dilation 2 spreads a 3-tap kernel over 5 pixels: 1 + 2*2 = 5, then 5 + 2*2 = 9 (jump 2).
    assert_eq!(s.rows[0].field.size, [5.0; 2]);
    assert_eq!((s.rows[1].field.size, s.rows[1].field.jump), ([9.0; 2], [2.0; 2]));
    // A 4-tap stride-2 transposed conv: each output reads 2 inputs (9 + 1*2 = 11), jump 1.
    assert_eq!((s.rows[2].field.size, s.rows[2].field.jump), ([11.0; 2], [1.0; 2]));
    // Multiply-adds of the transposed conv: every input value meets 2 x 4 x 4 weights.
    assert_eq!(s.rows[2].macs, 2 * 8 * 8 * (2 * 4 * 4));
}

#[test]
fn summary_leaves_the_model_unchanged() {
    let spec = InputSpec { channels: 1, height: 28, width: 28, classes: 10 };
    let mut m = stride_models::build("cnn-bn", &mut Rng::seed(0), spec).unwrap();
    let state = |m: &mut Sequential| {
        let mut out: Vec<(String, Vec<f32>)> = Vec::new();
        m.visit("", &mut |name, s| match s {
            Slot::Param(p) => out.push((name, p.value().data().to_vec())),
            Slot::Buffer(b) => out.push((name, b.data().to_vec())),
        });
        out
    };
    let before = state(&mut m);
    inspect::summarize(&mut m, [1, 28, 28]).unwrap();
    assert_eq!(state(&mut m), before, "running statistics restored");
    assert!(m.parameters().iter().all(|p| p.grad().is_none()), "no gradients left behind");
}

#[test]
fn memory_model_parts() {
    let s = zoo("cnn", 1, 28, 10);
    let weights = 129_068 * 4;
    let t = inspect::training_memory(&s, 32, OptimizerKind::Adam, None);
    assert_eq!((t.weights, t.gradients, t.optimizer), (weights, weights, 2 * weights));
    assert_eq!(t.activations, 32 * s.tape_per_image);
    let sgd = inspect::training_memory(&s, 32, OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, None);
    assert_eq!(sgd.optimizer, 0);
    // Training keeps every layer's tape; the tape of the tutorial CNN per image is at least
    // its activations (20x26x26 conv + relu ...) and the input.
    let outputs: u64 = s.rows.iter().filter(|r| r.layer != "Flatten").map(|r| r.output.iter().skip(1).product::<usize>() as u64 * 4).sum();
    assert!(s.tape_per_image >= outputs + 28 * 28 * 4, "{} < {outputs}", s.tape_per_image);
    // Inference holds about two layers plus the running layer's scratch. For one image the
    // peak is at conv2: the input (28x28), pool1's output (20x13x13) and conv2's (50x9x9), and
    // its im2col columns (20*5*5 rows x 9*9 columns); conv1 and its relu hold less
    // (28x28 + 2 x 20x26x26 + 9 x 26x26 columns).
    let i = inspect::inference_memory(&s, 1);
    let conv2 = (28 * 28 + 20 * 13 * 13 + 50 * 9 * 9 + 500 * 81) * 4;
    let relu1 = (28 * 28 + 2 * 20 * 26 * 26) * 4;
    assert!(relu1 < conv2);
    assert_eq!(i.activations, conv2);
    // Memory grows linearly in the batch, minus the per-thread scratch.
    let big = inspect::training_memory(&s, 320, OptimizerKind::Adam, None);
    assert_eq!(big.activations, 10 * t.activations);
}

#[test]
fn input_sizes_parse_and_refuse() {
    assert_eq!(inspect::parse_input("1x3x224x224").unwrap(), (Some(1), [3, 224, 224]));
    assert_eq!(inspect::parse_input("3x32x32").unwrap(), (None, [3, 32, 32]));
    for bad in ["3x32", "ax3x3", "0x3x32x32", "3x0x32", "1x2x3x4x5", "3x65536x65536"] {
        let e = inspect::parse_input(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn shape_errors_name_the_dotted_path_and_the_formula() {
    let mut rng = Rng::seed(0);
    let mut m = Sequential::new().push_named(
        "features",
        Sequential::new()
            .push(Conv2d::new(&mut rng, 1, 4, 3, Conv2dOptions::default(), true).unwrap())
            .push_named("conv3", Conv2d::new(&mut rng, 4, 4, 5, Conv2dOptions::default(), true).unwrap()),
    );
    let x = Var::constant(Tensor::zeros(&[1, 1, 6, 6]).unwrap());
    let e = m.forward(&x, &mut Ctx::eval()).unwrap_err().to_string();
    assert!(e.starts_with("layer features.conv3 (Conv2d(4, 4, k5x5)): "), "{e}");
    assert!(e.contains("kernel 5 is larger than the padded input 4 along height (input 4 + padding 0+0)"), "{e}");
}
