//! Activation recompute ("gradient checkpointing", Chen et al. 2016): trade compute for memory.
//!
//! The network's chain of layers is cut into segments. The forward pass keeps only each
//! segment's input; the backward pass runs each segment forward again, this time recording,
//! and back-propagates through it before moving to the one before. Training then keeps the
//! segment inputs plus one segment's activations instead of every activation, for about one
//! extra forward pass. Dropout masks and batch-norm statistics are replayed exactly (the random
//! state and the running statistics are restored before each recompute), so the weights after
//! a step are bit-identical to a step without recompute.

use std::ops::Range;

use stride_autograd::{no_grad, Rng, Tensor, Var};
use stride_nn::{call, Ctx, Module};

use crate::inspect::{self, Summary};
use crate::{Result, TrainError};

/// Where the chain is cut, and what each segment keeps per image.
#[derive(Clone, Debug, PartialEq)]
pub struct Segments {
    /// Index of each segment's first layer; the first is 0.
    pub starts: Vec<usize>,
    pub layers: usize,
    /// Tape bytes per image of each segment (what training keeps for it when it runs).
    pub tape: Vec<u64>,
    /// Bytes per image of each segment's input (the network's input for the first).
    pub inputs: Vec<u64>,
}

impl Segments {
    fn range(&self, s: usize) -> Range<usize> {
        self.starts[s]..self.starts.get(s + 1).copied().unwrap_or(self.layers)
    }
    /// Bytes per image training keeps at its peak: every segment input, plus the tape of the
    /// largest segment while it is recomputed.
    pub fn kept_per_image(&self) -> u64 {
        self.inputs.iter().sum::<u64>() + self.tape.iter().copied().max().unwrap_or(0)
    }
}

fn no_chain() -> TrainError {
    TrainError::Config("activation recompute needs a network that is a chain of layers (a Sequential, as every zoo model is)".into())
}

/// The layers of `m`'s chain with nested chains opened (a ResNet's `layer1` is a chain of
/// blocks, VGG's `features` a chain of layers), in order, by dotted path: the places the
/// network may be cut.
fn units<'a>(m: &'a mut dyn Module, prefix: &str, out: &mut Vec<(&'a mut dyn Module, String)>) {
    let Some((layers, names)) = m.chain() else { return };
    for (l, name) in layers.iter_mut().zip(names) {
        let path = stride_nn::join(prefix, name);
        if l.chain().is_some() {
            units(l.as_mut(), &path, out);
        } else {
            out.push((l.as_mut(), path));
        }
    }
}

/// The dotted paths where `model` may be cut (see `units`), or an error if it is no chain.
pub fn cut_points(model: &mut dyn Module) -> Result<Vec<String>> {
    let mut out = Vec::new();
    units(model, "", &mut out);
    if out.is_empty() {
        return Err(no_chain());
    }
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// Cuts `model`'s chain into `k` segments of about equal tape, from a trace of one training
/// step on `input` ([C, H, W]).
pub fn plan(model: &mut dyn Module, input: [usize; 3], k: usize) -> Result<Segments> {
    let s = inspect::summarize(model, input)?;
    plan_from(&s, &cut_points(model)?, k)
}

/// As [`plan`], from a summary already made and the cut points.
pub fn plan_from(s: &Summary, names: &[String], k: usize) -> Result<Segments> {
    if k == 0 {
        return Err(TrainError::Config("activation recompute needs at least one segment".into()));
    }
    fn under<'a>(s: &'a Summary, name: &'a str) -> impl Iterator<Item = &'a stride_nn::Row> + 'a {
        s.rows.iter().filter(move |r| r.path == name || r.path.strip_prefix(name).is_some_and(|rest| rest.starts_with('.')))
    }
    let cost: Vec<u64> = names.iter().map(|n| under(s, n).map(|r| r.tape_bytes).sum()).collect();
    let image = s.input.iter().product::<usize>() as u64 * 4;
    // input[i]: bytes per image of unit i's input (unit i-1's output; the image for unit 0).
    let input: Vec<u64> = (0..names.len())
        .map(|i| match i {
            0 => image,
            i => under(s, &names[i - 1]).last().map_or(0, |r| r.output.iter().skip(1).product::<usize>() as u64 * 4),
        })
        .collect();
    let starts = best_cuts(&cost, &input, k.min(names.len().max(1)));
    let inputs = starts.iter().map(|&i| input[i]).collect();
    let mut seg = Segments { starts, layers: names.len(), tape: Vec::new(), inputs };
    seg.tape = (0..seg.starts.len()).map(|j| seg.range(j).map(|i| cost[i]).sum()).collect();
    Ok(seg)
}

type Units<'a> = [(&'a mut dyn Module, String)];

/// Segment starts (at most `k` segments) that minimise what training keeps: the sum of the
/// segments' inputs plus the largest segment's tape. For each candidate bound on a segment's
/// tape, a dynamic programme finds the cheapest inputs; the best bound wins.
fn best_cuts(cost: &[u64], input: &[u64], k: usize) -> Vec<usize> {
    let n = cost.len();
    let mut prefix = vec![0u64; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + cost[i];
    }
    let tape = |a: usize, e: usize| prefix[e] - prefix[a];
    let mut bounds: Vec<u64> = (0..n).flat_map(|a| (a + 1..=n).map(move |e| (a, e))).map(|(a, e)| tape(a, e)).collect();
    bounds.sort_unstable();
    bounds.dedup();
    // At most 64 bounds, spread over the sorted candidates (always including the whole tape).
    let step = bounds.len().div_ceil(64).max(1);
    let candidates: Vec<u64> = bounds.iter().copied().enumerate().filter(|(i, _)| i % step == 0 || i + 1 == bounds.len()).map(|(_, b)| b).collect();
    let mut best = (u64::MAX, vec![0]);
    for bound in candidates {
        // f[j][e]: least summed input of j segments covering units [0, e), each within bound.
        let mut f = vec![vec![(u64::MAX, usize::MAX); n + 1]; k + 1];
        f[0][0] = (0, 0);
        for j in 1..=k {
            for e in 1..=n {
                for a in 0..e {
                    if f[j - 1][a].0 == u64::MAX || tape(a, e) > bound {
                        continue;
                    }
                    let v = f[j - 1][a].0 + input[a];
                    if v < f[j][e].0 {
                        f[j][e] = (v, a);
                    }
                }
            }
        }
        let Some(j) = (1..=k).filter(|&j| f[j][n].0 != u64::MAX).min_by_key(|&j| f[j][n].0) else { continue };
        if f[j][n].0 + bound < best.0 {
            let mut starts = Vec::with_capacity(j);
            let (mut e, mut jj) = (n, j);
            while jj > 0 {
                let a = f[jj][e].1;
                starts.push(a);
                e = a;
                jj -= 1;
            }
            starts.reverse();
            best = (f[j][n].0 + bound, starts);
        }
    }
    best.1
}

fn run(layers: &mut Units<'_>, x: &Var, ctx: &mut Ctx) -> Result<Var> {
    let mut h = x.clone();
    for (l, path) in layers {
        h = call(*l, path, &h, ctx)?;
    }
    Ok(h)
}

fn buffers(layers: &mut Units<'_>) -> Vec<Tensor<f32>> {
    layers.iter_mut().flat_map(|(l, _)| inspect::buffers(*l)).collect()
}

fn restore(layers: &mut Units<'_>, saved: &[Tensor<f32>]) {
    let mut saved = saved.iter();
    for (l, _) in layers {
        inspect::restore(*l, &mut saved);
    }
}

/// One training step's forward and backward pass (`loss` towards `targets`, scaled by `scale`)
/// in segments: parameters' gradients accumulate as `loss.backward()` would leave them. Returns
/// the loss and the logits (detached).
pub fn forward_backward(
    model: &mut dyn Module,
    x: &Var,
    targets: crate::Targets,
    loss: &crate::Loss,
    scale: f64,
    ctx: &mut Ctx,
    seg: &Segments,
) -> Result<(f32, Var)> {
    let mut all = Vec::new();
    units(model, "", &mut all);
    let layers = &mut all[..];
    if layers.len() != seg.layers {
        return Err(TrainError::Config(format!("the recompute plan is for {} layers, the network has {}", seg.layers, layers.len())));
    }
    let k = seg.starts.len();
    // Forward: all segments but the last without recording, keeping each one's input, the
    // random state and the running statistics it started from.
    let mut inputs = vec![x.clone()];
    let mut replay: Vec<(Rng, Vec<Tensor<f32>>)> = Vec::with_capacity(k);
    for s in 0..k - 1 {
        let r = seg.range(s);
        replay.push((ctx.rng.clone(), buffers(&mut layers[r.clone()])));
        let h = no_grad(|| run(&mut layers[r], &inputs[s], ctx))?;
        inputs.push(Var::parameter(h.value()));
    }
    // The last segment records; its backward starts the chain of gradients.
    let (loss_value, logits, mut grad) = {
        let top = &inputs[k - 1];
        let logits = run(&mut layers[seg.range(k - 1)], top, ctx)?;
        let l = loss.of_targets(&logits, targets)?;
        let lv = l.value().item()?;
        if scale == 1.0 {
            l.backward()?;
        } else {
            l.mul_scalar(scale)?.backward()?;
        }
        (lv, Var::constant(logits.value()), top.grad())
    };
    // Backward through the others, last first: replay the segment's forward, recording, and
    // back-propagate the gradient of its output.
    for s in (0..k - 1).rev() {
        let Some(g) = grad.take() else { break };
        let r = seg.range(s);
        let (rng, bufs) = &replay[s];
        restore(&mut layers[r.clone()], bufs);
        let mut again = ctx.clone();
        again.rng = rng.clone();
        let y = run(&mut layers[r], &inputs[s], &mut again)?;
        y.backward_with(g)?;
        grad = if s > 0 { inputs[s].grad() } else { None };
    }
    Ok((loss_value, logits))
}
