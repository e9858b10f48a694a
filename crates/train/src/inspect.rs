//! Looking inside a network before training it: one row per layer (shape, parameters,
//! multiply-adds, receptive field, what training keeps) and the memory a batch will need,
//! for inference and for training.

use stride_autograd::{cross_entropy, tape_bytes, Rng, Tensor, Var};
use stride_nn::{Ctx, Module, Row, Slot, Trace};

use crate::{OptimizerKind, Result, TrainError};

const F32: u64 = 4;

/// A traced network: its rows and totals, per image.
#[derive(Clone, Debug)]
pub struct Summary {
    pub rows: Vec<Row>,
    /// One image: [channels, height, width].
    pub input: [usize; 3],
    pub params: usize,
    /// Bytes per image one training forward pass (and its loss) puts on the tape.
    pub tape_per_image: u64,
    /// Values blocks hold until their last row (see `Trace::holds`).
    pub holds: Vec<(Option<usize>, usize)>,
}

impl Summary {
    /// Multiply-adds per image.
    pub fn macs(&self) -> u64 {
        self.rows.iter().map(|r| r.macs).sum()
    }
}

/// Traces one training-mode forward pass of two images (batch norm needs more than one) and
/// the loss. Buffers (batch norm's running statistics) are restored afterwards, so the model
/// is unchanged.
pub fn summarize(model: &mut dyn Module, input: [usize; 3]) -> Result<Summary> {
    summarize_batch(model, input, 2)
}

/// [`summarize`] on `n` images: a model that runs only at one batch size (an ONNX file
/// exported for one) is traced at that one. Figures stay per image.
pub fn summarize_batch(model: &mut dyn Module, input: [usize; 3], n: usize) -> Result<Summary> {
    let saved = buffers(model);
    let x = Var::constant(Rng::seed(0).normal(&[n.max(1), input[0], input[1], input[2]], 0.0, 1.0)?);
    let mut ctx = Ctx::train(0);
    ctx.trace = Some(Trace::new());
    let before = tape_bytes();
    let y = model.forward(&x, &mut ctx);
    restore(model, &mut saved.iter());
    let y = y?;
    if let [n, _] = y.shape()[..] {
        cross_entropy(&y, &vec![0; n], 0.0)?;
    }
    let tape_per_image = (tape_bytes() - before) / n.max(1) as u64;
    let trace = ctx.trace.take().unwrap_or_default();
    Ok(Summary { rows: trace.rows, holds: trace.holds, input, params: model.num_parameters(), tape_per_image })
}

/// Copies of `model`'s buffers (batch norm's running statistics), in `visit` order.
pub(crate) fn buffers(model: &mut dyn Module) -> Vec<Tensor<f32>> {
    let mut out = Vec::new();
    model.visit("", &mut |_, s| {
        if let Slot::Buffer(b) = s {
            out.push(b.clone());
        }
    });
    out
}

/// Puts buffers taken by [`buffers`] back, taking them from `saved` in `visit` order.
pub(crate) fn restore<'a>(model: &mut dyn Module, saved: &mut impl Iterator<Item = &'a Tensor<f32>>) {
    model.visit("", &mut |_, s| {
        if let Slot::Buffer(b) = s {
            if let Some(t) = saved.next() {
                *b = t.clone();
            }
        }
    });
}

/// Bytes of the largest set of activations alive at once in an inference pass over `batch`
/// images, when values are freed as soon as their last reader has run: about two consecutive
/// layers, plus the inputs that residual and concatenating blocks hold for their other
/// branches, plus the running layer's scratch (max pooling's argmax, a convolution's
/// working memory).
pub fn live_peak(s: &Summary, batch: usize) -> u64 {
    let input_bytes = s.input.iter().product::<usize>() as u64 * F32;
    live_sets(s, batch).into_iter().max().unwrap_or(input_bytes * batch as u64)
}

/// For each row, the bytes alive while it runs (see [`live_peak`]).
fn live_sets(s: &Summary, batch: usize) -> Vec<u64> {
    let bytes = |shape: &[usize]| shape.iter().skip(1).product::<usize>() as u64 * F32;
    let input_bytes = s.input.iter().product::<usize>() as u64 * F32;
    // Last reader of each row's output. The caller holds the input batch throughout.
    let mut last: Vec<usize> = (0..s.rows.len()).collect();
    let reads = s.rows.iter().enumerate().flat_map(|(i, r)| r.inputs.iter().map(move |p| (*p, i)));
    for (p, i) in reads.chain(s.holds.iter().copied()) {
        if let Some(j) = p {
            last[j] = last[j].max(i);
        }
    }
    let input_last = s.rows.len();
    let (n, threads) = (batch as u64, rayon::current_num_threads());
    (0..s.rows.len())
        .map(|i| {
            let held: u64 = (0..=i).filter(|&j| last[j] >= i).map(|j| bytes(&s.rows[j].output)).sum();
            let held = held + if input_last >= i { input_bytes } else { 0 };
            held * n + s.rows[i].scratch.bytes(batch, threads)
        })
        .collect()
}

/// The backward pass's working set beyond the tape and the full set of parameter gradients:
/// the live set at each layer as the pass walks back, less the gradients of the layers before
/// it, which do not exist yet (they are made as the pass reaches them).
fn backward_working_set(s: &Summary, batch: usize) -> u64 {
    let not_yet = s.rows.iter().scan(0u64, |made, r| {
        let before = *made;
        *made += r.params as u64 * F32;
        Some(before)
    });
    live_sets(s, batch).into_iter().zip(not_yet).map(|(live, missing)| live.saturating_sub(missing)).max().unwrap_or(0)
}

/// Predicted peak memory of one batch, by part (bytes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Memory {
    pub batch: usize,
    pub weights: u64,
    /// Training: one gradient per parameter.
    pub gradients: u64,
    /// Training: the optimizer's state per parameter (Adam 2, SGD with momentum 1).
    pub optimizer: u64,
    /// Inference: the live set (about two layers); training: everything the tape keeps.
    pub activations: u64,
    /// Training: gradients of activations and working memory in flight during the backward
    /// pass (the live set again, walked in reverse, less the parameter gradients not made yet).
    pub backward: u64,
}

impl Memory {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.backward
    }
}

/// Optimizer state per parameter.
pub fn optimizer_slots(kind: OptimizerKind) -> u64 {
    match kind {
        OptimizerKind::Adam | OptimizerKind::AdamW => 2,
        OptimizerKind::Sgd { momentum, .. } if momentum > 0.0 => 1,
        OptimizerKind::Sgd { .. } => 0,
    }
}

pub fn inference_memory(s: &Summary, batch: usize) -> Memory {
    let weights = s.params as u64 * F32;
    Memory { batch, weights, gradients: 0, optimizer: 0, activations: live_peak(s, batch), backward: 0 }
}

/// Training memory; with `segments` (activation recompute) the activations kept are the
/// segment inputs plus the largest segment's tape instead of the whole tape.
pub fn training_memory(s: &Summary, batch: usize, optimizer: OptimizerKind, segments: Option<&crate::recompute::Segments>) -> Memory {
    let weights = s.params as u64 * F32;
    let n = batch as u64;
    Memory {
        batch,
        weights,
        gradients: weights,
        optimizer: weights * optimizer_slots(optimizer),
        activations: segments.map_or(s.tape_per_image, |g| g.kept_per_image()) * n,
        backward: backward_working_set(s, batch),
    }
}

/// Parses `CxHxW` or `NxCxHxW` (the batch size first).
pub fn parse_input(s: &str) -> Result<(Option<usize>, [usize; 3])> {
    let dims: Vec<usize> = s.split('x').map(|d| d.trim().parse::<usize>()).collect::<std::result::Result<_, _>>().map_err(|_| bad_input(s))?;
    let (n, chw) = match dims[..] {
        [c, h, w] => (None, [c, h, w]),
        [n, c, h, w] => (Some(n), [c, h, w]),
        _ => return Err(bad_input(s)),
    };
    if chw.contains(&0) || n == Some(0) || chw.iter().product::<usize>() > 1 << 28 {
        return Err(TrainError::Config(format!("--input {s}: every size must be at least 1 and one image at most 2^28 values")));
    }
    Ok((n, chw))
}

fn bad_input(s: &str) -> TrainError {
    TrainError::Config(format!("--input {s}: expected CxHxW or NxCxHxW, e.g. 3x224x224 or 1x3x224x224"))
}

/// 1536 -> "1.5 KiB"
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else if u >= 3 {
        format!("{v:.2} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// 1820000000 -> "1.82 G"
pub fn count(c: u64) -> String {
    match c {
        0 => "-".into(),
        c if c >= 1_000_000_000 => format!("{:.2} G", c as f64 / 1e9),
        c if c >= 1_000_000 => format!("{:.1} M", c as f64 / 1e6),
        c if c >= 1_000 => format!("{:.1} K", c as f64 / 1e3),
        c => c.to_string(),
    }
}
