//! Data-parallel training over several processes: the collectives the loop needs, behind one
//! trait, so the loop knows nothing of MPI. The `stride` binary built with `--features mpi`
//! implements it on Open MPI (rsmpi); one process needs no group at all.
//!
//! The rule that makes N processes equal one: every rank takes its even share of each global
//! batch (the same seeded shuffle everywhere), computes the mean loss of its share, and the
//! gradients are summed with weights share / batch, which is the gradient of the global batch's
//! mean. Every collective is called by every rank in the same order.

use std::rc::Rc;

use stride_autograd::{Tensor, Var};
use stride_nn::{Module, Slot};

use crate::{Result, TrainError};

/// The processes one training run is spread over.
pub trait Group {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, in place.
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank 0's values to every rank, in place.
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn broadcast_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Seconds this rank has spent in collectives so far (waiting included).
    fn collective_seconds(&self) -> f64 {
        0.0
    }
}

/// A group in a [`crate::TrainConfig`].
#[derive(Clone)]
pub struct DataParallel(pub Rc<dyn Group>);

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataParallel(rank {} of {})", self.0.rank(), self.0.size())
    }
}

/// Gradients travel in buckets of this many values (~25 MB, PyTorch DDP's default).
pub const BUCKET: usize = 25 * 1024 * 1024 / 4;

/// Rows `start..start + len` of a global batch of `n` that rank `r` of `size` trains on: even
/// shares, the first `n % size` ranks one row more.
pub fn shard(n: usize, r: usize, size: usize) -> (usize, usize) {
    let (base, extra) = (n / size, n % size);
    (r * base + r.min(extra), base + usize::from(r < extra))
}

/// Checks that every rank built the same run (model, data, batch, seed): a rank that differs
/// stops the job with what differs, on every rank, instead of hanging in a collective later.
pub fn check_world(g: &dyn Group, what: &[(&str, f64)]) -> Result<()> {
    let mine: Vec<f64> = what.iter().map(|w| w.1).collect();
    let mut root = mine.clone();
    g.broadcast_f64(&mut root)?;
    let differs: Vec<String> =
        what.iter().zip(&root).filter(|((_, v), r)| v != *r).map(|((name, v), r)| format!("{name} {v} (rank 0: {r})")).collect();
    let mut flags = vec![0.0; g.size()];
    flags[g.rank()] = if differs.is_empty() { 0.0 } else { 1.0 };
    g.sum_f64(&mut flags)?;
    let bad: Vec<usize> = flags.iter().enumerate().filter(|(_, f)| **f > 0.0).map(|(r, _)| r).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let why = if differs.is_empty() { "see their messages".to_string() } else { format!("this rank has {}", differs.join(", ")) };
    Err(TrainError::Config(format!("rank {}: ranks {bad:?} differ from rank 0 in model or data ({why})", g.rank())))
}

/// Every parameter's and buffer's values from rank 0 (the initial weights, or batch norm's
/// running statistics after a step, as PyTorch's DDP broadcasts buffers).
pub fn broadcast_state(g: &dyn Group, model: &mut dyn Module, buffers_only: bool) -> Result<()> {
    let mut err = None;
    model.visit("", &mut |_, slot| {
        if err.is_some() {
            return;
        }
        let r = match slot {
            Slot::Param(v) if !buffers_only => {
                let mut t = v.value();
                g.broadcast_f32(t.data_mut()).and_then(|_| v.set_value(t).map_err(|e| TrainError::Config(e.to_string())))
            }
            Slot::Param(_) => Ok(()),
            Slot::Buffer(t) => g.broadcast_f32(t.data_mut()),
        };
        if let Err(e) = r {
            err = Some(e);
        }
    });
    err.map_or(Ok(()), Err)
}

/// Sums `weight` x each parameter's gradient over the ranks (a missing gradient counts as 0),
/// in buckets, and stores the result as the gradient.
pub fn reduce_gradients(g: &dyn Group, params: &[Var], weight: f32) -> Result<()> {
    let mut bucket: Vec<f32> = Vec::new();
    let mut members: Vec<&Var> = Vec::new();
    let flush = |bucket: &mut Vec<f32>, members: &mut Vec<&Var>| -> Result<()> {
        g.sum_f32(bucket)?;
        let mut at = 0;
        for p in members.drain(..) {
            let shape = p.shape();
            let n: usize = shape.iter().product();
            let t = Tensor::from_vec(bucket[at..at + n].to_vec(), &shape).map_err(|e| TrainError::Config(e.to_string()))?;
            p.set_grad(t).map_err(|e| TrainError::Config(e.to_string()))?;
            at += n;
        }
        bucket.clear();
        Ok(())
    };
    for p in params {
        let n: usize = p.shape().iter().product();
        match p.grad() {
            Some(gr) => bucket.extend(gr.data().iter().map(|v| v * weight)),
            None => bucket.extend(std::iter::repeat_n(0.0, n)),
        }
        members.push(p);
        if bucket.len() >= BUCKET {
            flush(&mut bucket, &mut members)?;
        }
    }
    if !members.is_empty() {
        flush(&mut bucket, &mut members)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_evenly_and_in_order() {
        for n in 0..40 {
            for size in 1..6 {
                let mut next = 0;
                for r in 0..size {
                    let (start, len) = shard(n, r, size);
                    assert_eq!(start, next, "n {n} size {size} rank {r}");
                    assert!(len == n / size || len == n / size + 1);
                    next += len;
                }
                assert_eq!(next, n);
            }
        }
    }
}
