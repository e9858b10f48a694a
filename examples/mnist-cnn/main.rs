//! The tutorial CNN trained on the embedded MNIST, written with Stride's layers, optimizer and
//! data loader, and run as the same program on every device named on the command line, so the
//! gap between a CPU and a GPU shows (see README.md beside this file).
//!
//! ```sh
//! cargo run --release -p stride-cli --example mnist-cnn               # on the CPU
//! cargo run --release -p stride-cli --example mnist-cnn -- cpu cuda   # on both, one after the other
//! cargo run --release -p stride-cli --example mnist-cnn -- --digits 1000 cuda:1
//! ```

use std::time::Instant;

use stride_autograd::{cross_entropy, Conv2dOptions, Device, Pool2dOptions, Rng, ToDevice, Unary, Var};
use stride_data::{embedded_mnist, Batches, Normalize};
use stride_nn::layers::{Activation, Conv2d, Flatten, Linear, Pool, Sequential};
use stride_nn::optim::{zero_grad, Adam, Optimizer};
use stride_nn::{Ctx, Module};

const EPOCHS: usize = 2;
const BATCH: usize = 64;

/// conv 20 3x3 -> relu -> avg-pool 2 -> conv 50 5x5 -> relu -> avg-pool 2 -> dense 128 -> relu
/// -> dense 10, for 1x28x28 digits.
fn tutorial_cnn(rng: &mut Rng) -> stride_nn::Result<Sequential> {
    let valid = Conv2dOptions::default();
    Ok(Sequential::new()
        .push(Conv2d::new(rng, 1, 20, 3, valid, true)?) // [N, 20, 26, 26]
        .push(Activation(Unary::Relu))
        .push(Pool::Avg(Pool2dOptions::new(2))) // [N, 20, 13, 13]
        .push(Conv2d::new(rng, 20, 50, 5, valid, true)?) // [N, 50, 9, 9]
        .push(Activation(Unary::Relu))
        .push(Pool::Avg(Pool2dOptions::new(2))) // [N, 50, 4, 4]
        .push(Flatten) // [N, 800]
        .push(Linear::new(rng, 50 * 4 * 4, 128, true)?)
        .push(Activation(Unary::Relu))
        .push(Linear::new(rng, 128, 10, true)?))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Arguments: devices (cpu, cuda, cuda:N), and `--digits N` to train on the first N digits.
    let (mut devices, mut digits) = (Vec::new(), None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--digits" {
            let n = args.next().ok_or("--digits needs a number")?;
            digits = Some(n.parse::<usize>().map_err(|e| format!("--digits {n}: {e}"))?);
        } else {
            devices.push(a.parse::<Device>()?);
        }
    }
    if devices.is_empty() {
        devices.push(Device::Cpu);
    }
    for &device in devices.iter().filter(|d| !d.is_cpu()) {
        // Once per GPU: finds the driver (a clear error without one) and compiles the kernels.
        stride_cuda::init(device)?;
    }
    let mut data = embedded_mnist()?;
    if let Some(n) = digits.filter(|&n| n < data.train.len()) {
        let train = &mut data.train;
        train.labels.truncate(n);
        train.images.truncate(n * train.channels * train.height * train.width);
    }
    let norm = Normalize::of(&data.train);
    println!("{} training and {} test digits of 28x28", data.train.len(), data.test.len());
    let mut speeds = Vec::new();
    for &device in &devices {
        // The same seeds on every device: the same initial weights and the same batches.
        let (mut init, mut shuffle) = (Rng::seed(0), Rng::seed(1));
        let mut model = tutorial_cnn(&mut init)?;
        model.to(device)?;
        let mut optimizer = Adam::default_with_lr(2e-3)?;
        let mut ctx = Ctx::train(0);
        for epoch in 1..=EPOCHS {
            let start = Instant::now();
            let (mut loss_sum, mut seen) = (0.0, 0);
            for batch in Batches::new(&data.train, BATCH, Some(&mut shuffle), false).normalized(&norm)? {
                let params = model.parameters();
                zero_grad(&params);
                let logits = model.forward(&Var::constant(batch.images.to(device)?), &mut ctx)?;
                let loss = cross_entropy(&logits, &batch.labels, 0.0)?;
                loss.backward()?;
                optimizer.step(&params)?;
                // Reading the loss back waits for the device, so the clock below is honest.
                loss_sum += loss.value().item()? as f64 * batch.labels.len() as f64;
                seen += batch.labels.len();
            }
            let speed = seen as f64 / start.elapsed().as_secs_f64();
            let test = stride_train::evaluate(&mut model, &data.test, 128, &norm)?;
            let loss = loss_sum / seen as f64;
            println!("{device}: epoch {epoch}: train loss {loss:.4}, test accuracy {:.4}, {speed:.0} images/s", test.accuracy);
            if epoch == EPOCHS {
                speeds.push(speed);
            }
        }
    }
    if let [first, .., last] = speeds[..] {
        println!("{} trains {:.2}x as fast as {}", devices[devices.len() - 1], last / first, devices[0]);
    }
    Ok(())
}
