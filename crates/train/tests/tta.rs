//! Test-time augmentation in evaluation: against each image and its mirror image classified
//! one by one, and unchanged by mirroring the data set itself.

use stride_autograd::{no_grad, softmax, Tensor, Var};
use stride_data::{Dataset, Normalize};
use stride_nn::{Ctx, Module};
use stride_train::{evaluate, evaluate_with, EVAL_BATCH};

mod common;
use common::{model, small};

/// `ds` with every image mirrored left-right, by index arithmetic on the bytes.
fn mirror_set(ds: &Dataset) -> Dataset {
    let w = ds.width;
    let images = (0..ds.images.len()).map(|i| ds.images[i - i % w + (w - 1 - i % w)]).collect();
    Dataset { images, ..ds.clone() }
}

#[test]
fn tta_averages_each_image_and_its_mirror_image() {
    let data = small(64, 40);
    let mut m = model(2);
    // A little training, so that the mirror images are classified differently.
    stride_train::train(&mut m, &data, &common::cfg(1, None), false, None, |_| {}).unwrap();
    let norm = Normalize::of(&data.train);
    let test = &data.test;
    let with = evaluate_with(&mut m, test, EVAL_BATCH, &norm, true).unwrap();
    // Directly: every image and its mirror image through the eager forward pass.
    let mut probs = |ds: &Dataset| -> Vec<f32> {
        let (c, h, w) = (ds.channels, ds.height, ds.width);
        let mut x = Vec::new();
        norm.extend(&ds.images, c, h * w, &mut x);
        let x = Tensor::from_vec(x, &[ds.len(), c, h, w]).unwrap();
        let logits = no_grad(|| m.forward(&Var::constant(x), &mut Ctx::eval())).unwrap();
        softmax(&logits, 1).unwrap().value().data().to_vec()
    };
    let (p, q) = (probs(test), probs(&mirror_set(test)));
    let k = test.classes;
    let (mut loss, mut right) = (0.0, 0);
    for (i, &t) in test.labels.iter().enumerate() {
        let avg: Vec<f64> = (0..k).map(|c| 0.5 * (p[i * k + c] as f64 + q[i * k + c] as f64)).collect();
        loss -= avg[t as usize].ln() / test.len() as f64;
        let best = (0..k).max_by(|&a, &b| avg[a].total_cmp(&avg[b])).unwrap();
        right += usize::from(best == t as usize);
    }
    assert!((with.loss - loss).abs() < 1e-5 * loss, "loss {} against {loss}", with.loss);
    assert_eq!(with.accuracy, right as f64 / test.len() as f64);
    let without = evaluate(&mut m, test, EVAL_BATCH, &norm).unwrap();
    assert_ne!(with.loss, without.loss, "mirrored digits are classified differently");
    // A set and its mirror image give the same pairs.
    let mirrored = evaluate_with(&mut m, &mirror_set(test), EVAL_BATCH, &norm, true).unwrap();
    assert!((mirrored.loss - with.loss).abs() < 1e-6 * with.loss);
    assert_eq!((mirrored.accuracy, &mirrored.confusion), (with.accuracy, &with.confusion));
}
