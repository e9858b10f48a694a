//! Activation recompute: the same weights bit for bit as ordinary training (dropout masks and
//! batch-norm statistics replayed), less memory kept, and plans that make sense.

mod common;

use common::{cfg, small};
use stride_autograd::{Conv2dOptions, Padding, Pool2dOptions, Rng, Unary};
use stride_models::InputSpec;
use stride_nn::blocks::Dropout2d;
use stride_nn::layers::{Activation, BatchNorm, Conv2d, Dropout, Flatten, Linear, Pool, Sequential};
use stride_train::{checkpoint, inspect, recompute, train, TrainConfig};

/// Nested chains, batch norm and dropout: everything recompute has to replay.
fn net(seed: u64) -> Sequential {
    let mut rng = Rng::seed(seed);
    let same = Conv2dOptions { padding: Padding::uniform(1), ..Conv2dOptions::default() };
    let block = |rng: &mut Rng, i, o| {
        Sequential::new()
            .push(Conv2d::new(rng, i, o, 3, same, false).unwrap())
            .push(BatchNorm::new(o).unwrap())
            .push(Activation(Unary::Relu))
            .push(Dropout2d(0.2))
            .push(Pool::Max(Pool2dOptions::new(2)))
    };
    Sequential::new()
        .push_named("block1", block(&mut rng, 1, 8))
        .push_named("block2", block(&mut rng, 8, 16))
        .push(Flatten)
        .push(Linear::new(&mut rng, 16 * 7 * 7, 32, true).unwrap())
        .push(Activation(Unary::Relu))
        .push(Dropout(0.3))
        .push(Linear::new(&mut rng, 32, 10, true).unwrap())
}

#[test]
fn recompute_gives_the_same_weights_bit_for_bit() {
    let data = small(640, 64);
    // Eager steps (the network's dropout would keep it off training plans anyway).
    let plain = TrainConfig { eager: true, ..cfg(2, None) };
    let mut a = net(3);
    let ra = train(&mut a, &data, &plain, false, None, |_| {}).unwrap();
    for k in [2, 3, 5] {
        let mut b = net(3);
        let rb = train(&mut b, &data, &TrainConfig { recompute: Some(k), ..plain.clone() }, false, None, |_| {}).unwrap();
        assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b), "{k} segments: weights and running statistics");
        let losses = |r: &stride_train::Outcome| r.reports.iter().map(|e| (e.train_loss, e.test.loss)).collect::<Vec<_>>();
        assert_eq!(losses(&ra), losses(&rb), "{k} segments");
    }
    // Label smoothing reaches the loss both ways: the same bits with and without recompute,
    // other weights than without smoothing, and a larger training loss (the uniform term).
    let smooth = TrainConfig { label_smoothing: 0.1, ..plain.clone() };
    let (mut s1, mut s2) = (net(3), net(3));
    let r1 = train(&mut s1, &data, &smooth, false, None, |_| {}).unwrap();
    let r2 = train(&mut s2, &data, &TrainConfig { recompute: Some(2), ..smooth.clone() }, false, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut s1), checkpoint::state_dict(&mut s2), "smoothing with recompute");
    assert_eq!(r1.reports[0].train_loss, r2.reports[0].train_loss);
    assert_ne!(checkpoint::state_dict(&mut s1), checkpoint::state_dict(&mut a), "smoothing changed nothing");
    assert!(r1.reports[0].train_loss > ra.reports[0].train_loss, "{} <= {}", r1.reports[0].train_loss, ra.reports[0].train_loss);
    // Class weights and gradient accumulation reach the segments too: the same bits.
    let both = TrainConfig { class_weights: stride_train::ClassWeights::Balanced, accumulate: 3, ..plain.clone() };
    let (mut w1, mut w2) = (net(3), net(3));
    train(&mut w1, &data, &both, false, None, |_| {}).unwrap();
    train(&mut w2, &data, &TrainConfig { recompute: Some(2), ..both.clone() }, false, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut w1), checkpoint::state_dict(&mut w2), "class weights and accumulation with recompute");
    assert_ne!(checkpoint::state_dict(&mut w1), checkpoint::state_dict(&mut a));
}

#[test]
fn plans_cut_where_it_pays_and_keep_less() {
    let spec = InputSpec { channels: 3, height: 64, width: 64, classes: 10 };
    let mut m = stride_models::build("resnet18", &mut Rng::seed(0), spec).unwrap();
    let points = recompute::cut_points(&mut m).unwrap();
    // Nested chains are opened: ResNet's stages are chains of blocks.
    assert_eq!(points[..6], ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1.1"]);
    assert_eq!(points.len(), 4 + 8 + 3);
    let s = inspect::summarize(&mut m, [3, 64, 64]).unwrap();
    let one = recompute::plan_from(&s, &points, 1).unwrap();
    assert_eq!(one.starts, [0]);
    assert_eq!(one.tape[0], s.rows.iter().map(|r| r.tape_bytes).sum::<u64>());
    let four = recompute::plan_from(&s, &points, 4).unwrap();
    assert!(four.starts.len() > 1 && four.starts.len() <= 4 && four.starts[0] == 0, "{:?}", four.starts);
    assert!(four.starts.windows(2).all(|w| w[0] < w[1]));
    assert!(four.kept_per_image() * 2 < one.kept_per_image(), "{} vs {}", four.kept_per_image(), one.kept_per_image());
    // Every segment's tape sums to the whole; each input is the previous unit's output.
    assert_eq!(four.tape.iter().sum::<u64>(), one.tape[0]);
    assert_eq!(four.inputs[0], 3 * 64 * 64 * 4);
    assert!(recompute::plan_from(&s, &points, 0).is_err());
}

#[test]
fn a_network_that_is_no_chain_is_refused() {
    let mut m = stride_nn::blocks::Residual::new(Box::new(net(0)), None);
    let e = recompute::cut_points(&mut m).unwrap_err().to_string();
    assert!(e.contains("needs a network that is a chain of layers"), "{e}");
}
