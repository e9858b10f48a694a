//! The optimizers' updates on the GPU: one kernel per rule (the CPU's formulas in f32), each
//! launch updating a list of up to [`LIST`] parameters, so an optimizer's step over a network's
//! parameters is a few launches rather than one per parameter.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg};
use stride_autograd::device::{UpdateItem, Updated};
use stride_autograd::Update;
use stride_tensor::{Error, Result};

use super::{CudaBackend, THREADS};

/// Tensors per launch: `UPDATE_LIST` in kernels.cu.
const LIST: usize = 32;
/// Blocks one tensor gets at most (its elements loop over them).
const BLOCKS_PER_TENSOR: usize = 1 << 10;

/// kernels.cu's `UpdateList`, field for field (C's layout: the i64 and pointer arrays start at
/// 136 bytes, 8-aligned): passed by value, 2,184 bytes of the 4 KiB a launch's arguments may take.
#[repr(C)]
#[derive(Clone, Copy)]
struct UpdateList {
    count: i32,
    first_block: [i32; LIST + 1],
    n: [i64; LIST],
    w: [u64; LIST],
    g: [u64; LIST],
    s0: [u64; LIST],
    s1: [u64; LIST],
    w_out: [u64; LIST],
    s0_out: [u64; LIST],
    s1_out: [u64; LIST],
}

// SAFETY: plain integers in kernels.cu's layout (above), copied into the launch's arguments.
unsafe impl DeviceRepr for UpdateList {}
const _: () = assert!(std::mem::size_of::<UpdateList>() == 4 + 4 * (LIST + 1) + 8 * LIST * 8);

/// One parameter's outputs: the new weight and the new state.
struct Outputs {
    w: CudaSlice<f32>,
    state: Vec<CudaSlice<f32>>,
}

impl CudaBackend {
    /// `rule` on every `(w, g, state)` of `items`: a launch per [`LIST`] of them. Each needs a
    /// gradient and the rule's number of state tensors of its weight's size.
    pub(super) fn update_many_on(&self, rule: &Update, items: &[UpdateItem<'_, f32>]) -> Result<Vec<Updated<f32>>> {
        let states = rule.state_len();
        for (w, g, s) in items {
            // The kernels read and write n elements of each.
            if s.len() != states || g.numel() != w.numel() || s.iter().any(|t| t.numel() != w.numel()) {
                return Err(Error::arg(
                    "update",
                    format!("{rule:?} takes a gradient and {states} state tensors of the weight's shape {:?}", w.shape()),
                ));
            }
        }
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(LIST) {
            for ((w, _, _), o) in chunk.iter().zip(self.launch_update(rule, chunk)?) {
                let state = o.state.into_iter().map(|s| self.wrap(s, w.shape())).collect::<Result<_>>()?;
                out.push((self.wrap(o.w, w.shape())?, state));
            }
        }
        Ok(out)
    }

    /// One launch of `rule`'s kernel over `chunk` (at most [`LIST`] items): their new weights
    /// and state.
    fn launch_update(&self, rule: &Update, chunk: &[UpdateItem<'_, f32>]) -> Result<Vec<Outputs>> {
        let mut outputs = chunk
            .iter()
            .map(|(w, _, s)| Ok(Outputs { w: self.fresh(w.numel())?, state: s.iter().map(|_| self.fresh(w.numel())).collect::<Result<_>>()? }))
            .collect::<Result<Vec<_>>>()?;
        let s = &self.stream;
        let mut list = UpdateList {
            count: chunk.len() as i32,
            first_block: [0; LIST + 1],
            n: [0; LIST],
            w: [0; LIST],
            g: [0; LIST],
            s0: [0; LIST],
            s1: [0; LIST],
            w_out: [0; LIST],
            s0_out: [0; LIST],
            s1_out: [0; LIST],
        };
        // The device pointers' guards record nothing here (the backend's one stream orders all
        // work), but are kept until the launch is queued all the same.
        let mut guards = Vec::new();
        let mut blocks = 0usize;
        for (t, ((w, g, state), o)) in chunk.iter().zip(outputs.iter_mut()).enumerate() {
            let n = w.numel();
            list.n[t] = n as i64;
            list.first_block[t] = blocks as i32;
            blocks += n.div_ceil(THREADS as usize).min(BLOCKS_PER_TENSOR);
            let (p, guard) = self.slice(w)?.device_ptr(s);
            list.w[t] = p;
            guards.push(guard);
            let (p, guard) = self.slice(g)?.device_ptr(s);
            list.g[t] = p;
            guards.push(guard);
            for (i, st) in state.iter().enumerate() {
                let (p, guard) = self.slice(st)?.device_ptr(s);
                if i == 0 {
                    list.s0[t] = p
                } else {
                    list.s1[t] = p
                }
                guards.push(guard);
            }
            let (p, guard) = o.w.device_ptr_mut(s);
            list.w_out[t] = p;
            guards.push(guard);
            for (i, st) in o.state.iter_mut().enumerate() {
                let (p, guard) = st.device_ptr_mut(s);
                if i == 0 {
                    list.s0_out[t] = p
                } else {
                    list.s1_out[t] = p
                }
                guards.push(guard);
            }
        }
        list.first_block[chunk.len()] = blocks as i32;
        let cfg = cudarc::driver::LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        match *rule {
            // Nothing to update (every tensor empty).
            _ if blocks == 0 => {}
            Update::Sgd { lr, momentum, nesterov, weight_decay, first } => {
                let has = i32::from(momentum > 0.0);
                launch!(
                    self,
                    "sgd_update",
                    cfg,
                    &list,
                    &(lr as f32),
                    &(momentum as f32),
                    &(weight_decay as f32),
                    &i32::from(nesterov),
                    &i32::from(first),
                    &has
                );
            }
            Update::Adam { lr, betas, c1, c2, eps, weight_decay, decoupled } => {
                launch!(self, "adam_update", cfg, &list, &lr, &betas.0, &betas.1, &c1, &c2, &eps, &weight_decay, &i32::from(decoupled));
            }
            Update::RmsProp { lr, alpha, eps, momentum, weight_decay } => {
                let has = i32::from(momentum > 0.0);
                launch!(self, "rmsprop_update", cfg, &list, &lr, &alpha, &eps, &momentum, &weight_decay, &has);
            }
        }
        drop(guards);
        Ok(outputs)
    }
}
