//! Convolution from the ground up with Stride's autograd (see README.md beside this file):
//! 1. a convolution's output is the weighted sum over one window, the same filter everywhere;
//! 2. its input gradient is a convolution of the output's gradient with the filters flipped;
//! 3. a small CNN written as functions of parameter variables learns digits with plain SGD.
//!
//! ```sh
//! cargo run --release -p stride-cli --example conv-from-scratch
//! ```

use stride_autograd::{conv2d, cross_entropy, linear, max_pool2d, Conv2dOptions, Padding, Pool2dOptions, Rng, Tensor, Var};
use stride_data::{embedded_mnist, Batches, Normalize};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut rng = Rng::seed(0);
    // x [N=1, C=2, H=5, W=5], w [K=3, C=2, R=3, S=3]: "valid" gives y [1, 3, 3, 3].
    let x = Var::parameter(rng.normal(&[1, 2, 5, 5], 0.0, 1.0)?);
    let w = Var::parameter(rng.normal(&[3, 2, 3, 3], 0.0, 1.0)?);
    let y = conv2d(&x, &w, None, &Conv2dOptions::default())?;

    // 1. y[0, k, p, q] = sum over c, r, s of x[0, c, p + r, q + s] * w[k, c, r, s].
    let (xv, wv, yv) = (x.value(), w.value(), y.value());
    let at = |t: &Tensor<f32>, i: [usize; 4]| {
        let s = t.shape();
        t.data()[((i[0] * s[1] + i[1]) * s[2] + i[2]) * s[3] + i[3]]
    };
    let (k, p, q) = (2, 1, 0);
    let mut by_hand = 0.0;
    for c in 0..2 {
        for r in 0..3 {
            for s in 0..3 {
                by_hand += at(&xv, [0, c, p + r, q + s]) * at(&wv, [k, c, r, s]);
            }
        }
    }
    println!("1. y[0, {k}, {p}, {q}] = {:.6}; the window's weighted sum by hand = {by_hand:.6}", at(&yv, [0, k, p, q]));

    // 2. Backpropagate a gradient g for y (the loss sum(y * g) has exactly that gradient).
    let g = rng.normal::<f32>(&[1, 3, 3, 3], 0.0, 1.0)?;
    y.mul(&Var::constant(g.clone()))?.sum_all()?.backward()?;
    let dx = x.grad().ok_or("x has no gradient")?;
    // The same gradient as a forward convolution: g padded by R-1 = 2 on every side, with the
    // filters turned 180 degrees and their input and output channels swapped.
    let mut flipped = vec![0.0f32; 2 * 3 * 3 * 3];
    for k in 0..3 {
        for c in 0..2 {
            for r in 0..3 {
                for s in 0..3 {
                    flipped[((c * 3 + k) * 3 + (2 - r)) * 3 + (2 - s)] = at(&wv, [k, c, r, s]);
                }
            }
        }
    }
    let flipped = Var::constant(Tensor::from_vec(flipped, &[2, 3, 3, 3])?);
    let full = Conv2dOptions::default().padding(Padding::Explicit { top: 2, bottom: 2, left: 2, right: 2 });
    let dx_as_conv = conv2d(&Var::constant(g), &flipped, None, &full)?.value();
    println!("2. x's gradient from backward() and as a convolution with flipped filters differ by {:.1e}", dx.max_abs_diff(&dx_as_conv)?);

    // 3. conv 8 5x5 -> relu -> max-pool 2 -> dense 10, on 2,048 of the embedded digits.
    let data = embedded_mnist()?;
    let norm = Normalize::of(&data.train);
    let w1 = Var::parameter(rng.normal(&[8, 1, 5, 5], 0.0, (2.0f64 / 25.0).sqrt())?);
    let b1 = Var::parameter(Tensor::zeros(&[8])?);
    let w2 = Var::parameter(rng.normal(&[10, 8 * 12 * 12], 0.0, (1.0f64 / 1152.0).sqrt())?);
    let b2 = Var::parameter(Tensor::zeros(&[10])?);
    let params = [&w1, &b1, &w2, &b2];
    let net = |images: Tensor<f32>| -> stride_autograd::Result<Var> {
        let h = conv2d(&Var::constant(images), &w1, Some(&b1), &Conv2dOptions::default())?.relu()?; // [N, 8, 24, 24]
        let h = max_pool2d(&h, &Pool2dOptions::new(2))?.flatten()?; // [N, 8 * 12 * 12]
        linear(&h, &w2, Some(&b2)) // [N, 10]
    };
    let lr = 0.05f32;
    for (step, batch) in Batches::new(&data.train, 32, Some(&mut rng), true).normalized(&norm)?.take(64).enumerate() {
        for p in params {
            p.zero_grad();
        }
        let loss = cross_entropy(&net(batch.images)?, &batch.labels, 0.0)?;
        loss.backward()?;
        // Plain SGD: every parameter moves against its gradient.
        for p in params {
            let grad = p.grad().ok_or("a parameter without a gradient")?;
            p.update_value(|v| v.iter_mut().zip(grad.data()).for_each(|(v, g)| *v -= lr * g))?;
        }
        if step % 16 == 15 {
            println!("3. step {:2}: loss {:.4}", step + 1, loss.value().item()?);
        }
    }
    let test = Batches::new(&data.test, data.test.len(), None, false).normalized(&norm)?.next().ok_or("no test digits")?;
    let predicted = net(test.images)?.argmax(1)?;
    let right = predicted.iter().zip(&test.labels).filter(|(p, t)| p == t).count();
    println!("   after 64 steps of 32 digits: {right} of {} test digits right", test.labels.len());
    Ok(())
}
