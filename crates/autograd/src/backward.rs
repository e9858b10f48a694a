//! Reverse-mode sweep: topological order from the loss, then each node's rule once.

use std::collections::HashMap;
use std::rc::Rc;

use stride_tensor::{Device, Elem, Error, ErrorKind, Result, Tensor};

use crate::device::{accumulate, ToDevice};
use crate::var::{Node, Var};

/// Called with each parameter once its gradient is complete ([`Var::backward_hooked`]).
pub type LeafHook<'a, T> = &'a mut dyn FnMut(&Var<T>) -> Result<()>;

impl<T: Elem> Var<T> {
    /// Back-propagates from this scalar: fills `grad()` of every parameter it depends on,
    /// adding to gradients already there (call `zero_grad` between steps).
    pub fn backward(&self) -> Result<()> {
        self.backward_with(self.unit_seed("backward")?)
    }

    /// The seed gradient of a scalar (a one), or an error naming `op` for anything larger.
    fn unit_seed(&self, op: &'static str) -> Result<Tensor<T>> {
        let v = self.value();
        if v.numel() != 1 {
            return Err(Error::new(ErrorKind::Autograd, op, format!("needs a scalar (one element) to start from, got shape {:?}", v.shape())));
        }
        match v.device() {
            Device::Cpu => Tensor::ones(v.shape()),
            device => crate::device::backend::<T>(device)?.full(v.shape(), T::c(1.0)),
        }
    }

    /// Back-propagates a given output gradient (same shape as the value).
    pub fn backward_with(&self, grad: Tensor<T>) -> Result<()> {
        self.sweep(grad, &[], None).map(|_| ())
    }

    /// As [`Var::backward`], calling `on_leaf` with each parameter as soon as its gradient is
    /// complete (in reverse order of use), so data-parallel training can start summing early
    /// gradients over processes while the rest of the backward pass runs.
    pub fn backward_hooked(&self, on_leaf: LeafHook<'_, T>) -> Result<()> {
        self.sweep(self.unit_seed("backward")?, &[], Some(on_leaf)).map(|_| ())
    }

    /// The gradient of this scalar with respect to intermediate values `wrt` (PyTorch's
    /// `torch.autograd.grad`): `None` for a value it does not depend on. Parameters' gradients
    /// accumulate as in `backward`. Grad-CAM uses it for a layer's activations.
    pub fn gradients(&self, wrt: &[&Var<T>]) -> Result<Vec<Option<Tensor<T>>>> {
        self.sweep(self.unit_seed("gradients")?, wrt, None)
    }

    fn sweep(&self, grad: Tensor<T>, wrt: &[&Var<T>], mut on_leaf: Option<LeafHook<'_, T>>) -> Result<Vec<Option<Tensor<T>>>> {
        let grad = grad.to(self.device())?;
        if grad.shape() != self.value_ref().shape() {
            return Err(Error::new(
                ErrorKind::Autograd,
                "backward",
                format!("gradient shape {:?} differs from the value's {:?}", grad.shape(), self.shape()),
            ));
        }
        if !self.requires_grad() {
            return Err(Error::new(ErrorKind::Autograd, "backward", "this value does not depend on any parameter (was it computed under no_grad?)"));
        }
        let order = topo_order(self);
        let key = |v: &Var<T>| Rc::as_ptr(&v.0) as usize;
        let mut grads: HashMap<usize, Tensor<T>> = HashMap::new();
        grads.insert(key(self), grad);
        let mut captured: Vec<Option<Tensor<T>>> = vec![None; wrt.len()];
        for node in order.iter().rev() {
            let Some(g) = grads.remove(&key(node)) else {
                continue;
            };
            for (slot, w) in captured.iter_mut().zip(wrt) {
                if w.same(node) {
                    *slot = Some(g.clone());
                }
            }
            let Some(op) = &node.0.op else {
                // A leaf: accumulate. Every use of it is behind us, so its gradient is complete.
                {
                    let mut slot = node.0.grad.borrow_mut();
                    match slot.as_mut() {
                        Some(acc) => accumulate(acc, &g)?,
                        None => *slot = Some(g),
                    }
                }
                if let Some(f) = on_leaf.as_mut() {
                    f(node)?;
                }
                continue;
            };
            let inputs: Vec<Tensor<T>> = node.0.parents.iter().map(|p| p.value()).collect();
            let out = node.value();
            // Which inputs want a gradient: an op may skip the others (a network's first
            // convolution has no use for the gradient of its input images).
            let needs: Vec<bool> = node.0.parents.iter().map(|p| p.requires_grad()).collect();
            let pg = op.backward(&g, &inputs, &out, &needs)?;
            for (parent, pgrad) in node.0.parents.iter().zip(pg) {
                let Some(pgrad) = pgrad else { continue };
                if !parent.requires_grad() {
                    continue;
                }
                debug_assert_eq!(pgrad.shape(), parent.value_ref().shape(), "{} gradient shape", op.name());
                match grads.get_mut(&key(parent)) {
                    Some(acc) => accumulate(acc, &pgrad)?,
                    None => {
                        grads.insert(key(parent), pgrad);
                    }
                }
            }
        }
        Ok(captured)
    }
}

/// Nodes reachable from `root` that need gradients, each after all of its parents.
fn topo_order<T: Elem>(root: &Var<T>) -> Vec<Var<T>> {
    let mut order = Vec::new();
    let mut seen: std::collections::HashSet<*const Node<T>> = std::collections::HashSet::new();
    // Iterative post-order DFS: deep networks must not overflow the stack.
    let mut stack: Vec<(Var<T>, bool)> = vec![(root.clone(), false)];
    while let Some((v, expanded)) = stack.pop() {
        if expanded {
            order.push(v);
            continue;
        }
        if !seen.insert(Rc::as_ptr(&v.0)) {
            continue;
        }
        stack.push((v.clone(), true));
        for p in &v.0.parents {
            if p.requires_grad() && !seen.contains(&Rc::as_ptr(&p.0)) {
                stack.push((p.clone(), false));
            }
        }
    }
    order
}
