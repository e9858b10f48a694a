//! Data-parallel training over several processes: the collectives the loop needs, behind one
//! trait, so the loop knows nothing of MPI. The `stride` binary built with `--features mpi`
//! implements it on Open MPI (rsmpi); one process needs no group at all.
//!
//! The rule that makes N processes equal one: every rank takes its even share of each global
//! batch (the same seeded shuffle everywhere), computes the mean loss of its share, and the
//! gradients are summed with weights share / batch, which is the gradient of the global batch's
//! mean. Every collective is called by every rank in the same order.

use std::rc::Rc;

use stride_autograd::{Device, Tensor, ToDevice, Var};
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
    /// Starts summing `buf` over all ranks and returns at once; the result comes from
    /// [`Pending::wait`]. Sums started on every rank in the same order may overlap other work
    /// (the backward pass). By default the sum is done before returning.
    fn start_sum_f32(&self, mut buf: Vec<f32>) -> Result<Pending> {
        self.sum_f32(&mut buf)?;
        Ok(Pending(Box::new(move || Ok(buf))))
    }
    /// Seconds this rank has spent in collectives so far (waiting included).
    fn collective_seconds(&self) -> f64 {
        0.0
    }
}

/// A sum in flight.
pub struct Pending(pub Box<dyn FnOnce() -> Result<Vec<f32>>>);

impl Pending {
    pub fn wait(self) -> Result<Vec<f32>> {
        (self.0)()
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
/// Every rank learns every rank's values (one sum of a table with one row per rank), so each
/// message names what differs where: when rank 0 exits first and the launcher kills the others
/// before they print, its message alone says why.
pub fn check_world(g: &dyn Group, what: &[(&str, f64)]) -> Result<()> {
    let k = what.len();
    let mut table = vec![0.0; g.size() * k];
    for (slot, w) in table[g.rank() * k..][..k].iter_mut().zip(what) {
        *slot = w.1;
    }
    g.sum_f64(&mut table)?;
    let (root, rows) = table.split_at(k);
    let mut bad = Vec::new();
    let mut reasons = Vec::new();
    for (r, row) in rows.chunks(k).enumerate().map(|(i, row)| (i + 1, row)) {
        let differs: Vec<String> = what
            .iter()
            .zip(row.iter().zip(root))
            .filter(|(_, (v, r0))| v != r0)
            .map(|((name, _), (v, r0))| format!("{name} {v} (rank 0: {r0})"))
            .collect();
        if !differs.is_empty() {
            bad.push(r);
            reasons.push(format!("rank {r} has {}", differs.join(", ")));
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    Err(TrainError::Config(format!("rank {}: ranks {bad:?} differ from rank 0 in model or data ({})", g.rank(), reasons.join("; "))))
}

/// Every parameter's and buffer's values from rank 0 (the initial weights, or batch norm's
/// running statistics after a step, as PyTorch's DDP broadcasts buffers), in one broadcast.
/// Rank 0 keeps its own tensors; the others get rank 0's values on the devices theirs were on.
pub fn broadcast_state(g: &dyn Group, model: &mut dyn Module, buffers_only: bool) -> Result<()> {
    let mut parts = Vec::new();
    model.visit("", &mut |_, slot| match slot {
        Slot::Param(v) if !buffers_only => parts.push(v.value()),
        Slot::Param(_) => {}
        Slot::Buffer(t) => parts.push(t.clone()),
    });
    if parts.is_empty() {
        return Ok(());
    }
    // The other ranks' values are only overwritten: they need not be read from their device.
    let mut flat = if g.rank() == 0 { to_host(&parts)? } else { vec![0.0; parts.iter().map(Tensor::numel).sum()] };
    g.broadcast_f32(&mut flat)?;
    if g.rank() == 0 {
        return Ok(());
    }
    let mut values = from_host(flat, &parts)?.into_iter();
    let mut err = None;
    model.visit("", &mut |_, slot| {
        let r = match slot {
            Slot::Param(v) if !buffers_only => values.next().map(|t| v.set_value(t).map_err(TrainError::from)),
            Slot::Param(_) => None,
            Slot::Buffer(t) => values.next().map(|new| {
                *t = new;
                Ok(())
            }),
        };
        if let Some(Err(e)) = r {
            err.get_or_insert(e);
        }
    });
    err.map_or(Ok(()), Err)
}

/// The elements of `parts`, each flattened, one after another in host memory. Parts that all
/// live on one device other than the CPU are joined there and read back in one copy (one wait
/// for the device instead of one per tensor).
fn to_host(parts: &[Tensor<f32>]) -> Result<Vec<f32>> {
    let total = parts.iter().map(Tensor::numel).sum();
    let mut flat = Vec::with_capacity(total);
    match one_device(parts.iter().map(Tensor::device)) {
        Some(_) if parts.len() > 1 => {
            let flats = parts.iter().map(|t| Ok(Var::constant(t.reshape(&[t.numel()])?))).collect::<Result<Vec<Var>>>()?;
            let joined = stride_autograd::no_grad(|| stride_autograd::concat(&flats.iter().collect::<Vec<_>>(), 0))?;
            flat.extend_from_slice(joined.value().to_host()?.data());
        }
        _ => {
            for t in parts {
                flat.extend_from_slice(t.to_host()?.data());
            }
        }
    }
    Ok(flat)
}

/// `flat` cut into tensors shaped and placed as `like`'s (the inverse of [`to_host`]): parts
/// that all live on one device other than the CPU go there in one copy and are cut there.
fn from_host(flat: Vec<f32>, like: &[Tensor<f32>]) -> Result<Vec<Tensor<f32>>> {
    let total: usize = like.iter().map(Tensor::numel).sum();
    if flat.len() != total {
        return Err(TrainError::Config(format!("a collective returned {} values where {total} were sent", flat.len())));
    }
    let mut out = Vec::with_capacity(like.len());
    let mut at = 0;
    match one_device(like.iter().map(Tensor::device)) {
        Some(device) if like.len() > 1 => {
            let all = Var::constant(Tensor::from_vec(flat, &[total])?.to(device)?);
            for t in like {
                let part = stride_autograd::no_grad(|| all.narrow(0, at, t.numel()))?;
                out.push(part.value().reshape(t.shape())?);
                at += t.numel();
            }
        }
        _ => {
            for t in like {
                out.push(Tensor::from_vec(flat[at..at + t.numel()].to_vec(), t.shape())?.to(t.device())?);
                at += t.numel();
            }
        }
    }
    Ok(out)
}

/// The device every one of `devices` is on, when that is one device other than the CPU.
fn one_device(mut devices: impl Iterator<Item = Device>) -> Option<Device> {
    let first = devices.next().filter(|d| !d.is_cpu())?;
    devices.all(|d| d == first).then_some(first)
}

/// Sums `weight` x each parameter's gradient over the ranks (a missing gradient counts as 0),
/// in buckets, after the backward pass, and stores the result as the gradient (the recompute
/// path, whose backward pass runs segment by segment).
pub fn reduce_gradients(g: &dyn Group, params: &[Var], plan: &BucketPlan, weight: f32) -> Result<()> {
    let mut sum = OverlappedSum::new(g, params, plan);
    sum.weight = weight;
    sum.finish()
}

/// Which parameters travel together: indices in reverse order (the order the backward pass
/// finishes them), ~`BUCKET` values a bucket. Made once per run; the same on every rank.
pub struct BucketPlan(Vec<Vec<usize>>);

impl BucketPlan {
    pub fn new(params: &[Var]) -> Self {
        Self::with_bucket(params, BUCKET)
    }

    /// With buckets of about `bucket` values.
    pub fn with_bucket(params: &[Var], bucket: usize) -> Self {
        let mut buckets: Vec<Vec<usize>> = vec![Vec::new()];
        let mut size = 0;
        for i in (0..params.len()).rev() {
            let n: usize = params[i].shape().iter().product();
            if size > 0 && size + n > bucket {
                buckets.push(Vec::new());
                size = 0;
            }
            buckets.last_mut().expect("a bucket").push(i);
            size += n;
        }
        BucketPlan(buckets)
    }
}

/// Gradients summed over the ranks in buckets that start as soon as their parameters'
/// gradients are complete, while the backward pass goes on (PyTorch DDP's scheme). Buckets
/// start strictly in the plan's order, so every rank issues the same sums in the same sequence
/// even where one finishes its gradients in another order or has no share of a batch.
pub struct OverlappedSum<'a> {
    g: &'a dyn Group,
    params: &'a [Var],
    buckets: &'a [Vec<usize>],
    ready: Vec<bool>,
    next: usize,
    pending: Vec<Pending>,
    /// Each gradient is multiplied by this before the sum.
    weight: f32,
}

impl<'a> OverlappedSum<'a> {
    pub fn new(g: &'a dyn Group, params: &'a [Var], plan: &'a BucketPlan) -> Self {
        OverlappedSum { g, params, buckets: &plan.0, ready: vec![false; params.len()], next: 0, pending: Vec::new(), weight: 1.0 }
    }

    /// The backward pass finished `leaf`'s gradient: start every bucket now complete.
    pub fn ready(&mut self, leaf: &Var) -> Result<()> {
        if let Some(i) = self.params.iter().position(|p| p.same(leaf)) {
            self.ready[i] = true;
        }
        while self.next < self.buckets.len() && self.buckets[self.next].iter().all(|&i| self.ready[i]) {
            self.start_next()?;
        }
        Ok(())
    }

    fn start_next(&mut self) -> Result<()> {
        // A parameter the backward pass did not reach adds zeros, made where its value lives so
        // that a bucket on a device stays on it.
        let parts = self.buckets[self.next]
            .iter()
            .map(|&i| {
                let p = &self.params[i];
                match p.grad() {
                    Some(g) => Ok(g),
                    None => Ok(Tensor::zeros(&p.shape())?.to(p.device())?),
                }
            })
            .collect::<Result<Vec<Tensor<f32>>>>()?;
        let mut buf = to_host(&parts)?;
        if self.weight != 1.0 {
            buf.iter_mut().for_each(|v| *v *= self.weight);
        }
        self.pending.push(self.g.start_sum_f32(buf)?);
        self.next += 1;
        Ok(())
    }

    /// After the backward pass: starts what is left (parameters it did not reach count as 0),
    /// waits for every sum and stores the sums as the gradients.
    pub fn finish(mut self) -> Result<()> {
        while self.next < self.buckets.len() {
            self.start_next()?;
        }
        for (bucket, pending) in self.buckets.iter().zip(self.pending) {
            let sum = pending.wait()?;
            // Each sum goes back to where its parameter lives.
            let like = bucket.iter().map(|&i| self.params[i].value()).collect::<Vec<_>>();
            for (&i, g) in bucket.iter().zip(from_host(sum, &like)?) {
                self.params[i].set_grad(g)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// Rank `rank` of a world whose other ranks hold `others` (rank -> their values, which a
    /// sum of f64 adds in as the real collective would); it records when each f32 sum starts:
    /// before or after the backward pass ended.
    struct Fake {
        rank: usize,
        size: usize,
        others: Vec<(usize, Vec<f64>)>,
        backward_done: Cell<bool>,
        starts: RefCell<Vec<(usize, bool)>>,
    }

    impl Fake {
        fn new(rank: usize, size: usize, others: Vec<(usize, Vec<f64>)>) -> Self {
            Fake { rank, size, others, backward_done: Cell::new(false), starts: RefCell::new(Vec::new()) }
        }
    }

    impl Group for Fake {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            self.starts.borrow_mut().push((buf.len(), self.backward_done.get()));
            Ok(())
        }
        fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            for (r, row) in &self.others {
                for (b, v) in buf[r * row.len()..][..row.len()].iter_mut().zip(row) {
                    *b += v;
                }
            }
            Ok(())
        }
        fn broadcast_f32(&self, _: &mut [f32]) -> Result<()> {
            Ok(())
        }
        fn broadcast_f64(&self, _: &mut [f64]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn gradient_sums_start_during_the_backward_pass_last_layer_first() {
        use stride_autograd::{linear, Rng};
        let mut rng = Rng::seed(1);
        // Three dense layers with different sizes, so the buckets can be told apart.
        let sizes = [(6, 5), (5, 4), (4, 3)];
        let params: Vec<Var> = sizes
            .iter()
            .flat_map(|&(i, o)| [Var::parameter(rng.normal(&[o, i], 0.0, 1.0).unwrap()), Var::parameter(rng.normal(&[o], 0.0, 1.0).unwrap())])
            .collect();
        let mut h = Var::constant(rng.normal(&[2, 6], 0.0, 1.0).unwrap());
        for l in params.chunks(2) {
            h = linear(&h, &l[0], Some(&l[1])).unwrap().tanh().unwrap();
        }
        let loss = h.sum_all().unwrap();
        let g = Fake::new(0, 1, Vec::new());
        // One parameter per bucket.
        let plan = BucketPlan::with_bucket(&params, 1);
        let mut o = OverlappedSum::new(&g, &params, &plan);
        loss.backward_hooked(&mut |leaf| o.ready(leaf).map_err(|e| stride_autograd::Error::arg("test", e.to_string()))).unwrap();
        g.backward_done.set(true);
        let before: Vec<Tensor<f32>> = params.iter().map(|p| p.grad().unwrap()).collect();
        o.finish().unwrap();
        let starts = g.starts.borrow();
        // Last layer first (its bias, then its weight), all six while the backward pass ran.
        let want: Vec<(usize, bool)> = [3, 12, 4, 20, 5, 30].iter().map(|&n| (n, false)).collect();
        assert_eq!(*starts, want);
        // A group of one sums nothing away: the gradients are unchanged.
        for (p, b) in params.iter().zip(&before) {
            assert_eq!(p.grad().unwrap().data(), b.data());
        }
    }

    #[test]
    fn every_rank_names_what_differs_on_which_rank() {
        let what = [("parameters", 100.0), ("seed", 0.0)];
        let same = vec![100.0, 0.0];
        // Rank 0's view of a world where rank 2 has another seed: its own message says why.
        let g = Fake::new(0, 3, vec![(1, same.clone()), (2, vec![100.0, 5.0])]);
        let e = check_world(&g, &what).unwrap_err().to_string();
        assert!(e.contains("rank 0: ranks [2] differ from rank 0 in model or data (rank 2 has seed 5 (rank 0: 0))"), "{e}");
        // Rank 1 of the same world says the same about rank 2.
        let g = Fake::new(1, 3, vec![(0, same.clone()), (2, vec![100.0, 5.0])]);
        let e = check_world(&g, &[("parameters", 100.0), ("seed", 0.0)]).unwrap_err().to_string();
        assert!(e.contains("rank 1: ranks [2] differ") && e.contains("rank 2 has seed 5"), "{e}");
        // Two ranks differing in different values are both named.
        let g = Fake::new(0, 3, vec![(1, vec![90.0, 0.0]), (2, vec![100.0, 5.0])]);
        let e = check_world(&g, &what).unwrap_err().to_string();
        assert!(e.contains("ranks [1, 2]") && e.contains("rank 1 has parameters 90 (rank 0: 100); rank 2 has seed 5"), "{e}");
        // All equal: no error.
        let g = Fake::new(2, 3, vec![(0, same.clone()), (1, same)]);
        assert!(check_world(&g, &what).is_ok());
    }

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
