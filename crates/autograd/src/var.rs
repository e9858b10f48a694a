//! `Var`: a tensor on the tape. Leaves are inputs and parameters; every other `Var` remembers
//! the primitive that made it and its inputs, until it is dropped.

use std::cell::{Cell, Ref, RefCell};
use std::rc::Rc;

use stride_tensor::{Elem, Result, Tensor};

use crate::device::ToDevice;
use crate::op::Op;

pub(crate) struct Node<T: Elem> {
    pub(crate) value: RefCell<Tensor<T>>,
    pub(crate) grad: RefCell<Option<Tensor<T>>>,
    pub(crate) requires_grad: Cell<bool>,
    pub(crate) op: Option<Op<T>>,
    pub(crate) parents: Vec<Var<T>>,
}

/// A tensor that takes part in automatic differentiation. Cloning shares the same node.
pub struct Var<T: Elem = f32>(pub(crate) Rc<Node<T>>);

impl<T: Elem> Clone for Var<T> {
    fn clone(&self) -> Self {
        Var(self.0.clone())
    }
}

impl<T: Elem> std::fmt::Debug for Var<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = self.0.op.as_ref().map_or("leaf", |o| o.name());
        write!(f, "Var({op}, {:?})", self.0.value.borrow())
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    static TAPE_BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Bytes this thread has put on the tape so far (a running total, never decreasing): the value
/// of every recorded op, what the op keeps for its backward (argmax indices, batch statistics),
/// and the constants it holds (inputs, dropout masks). A value that shares its parent's storage
/// (a reshape) counts nothing. The difference across a forward pass is the memory that pass
/// keeps alive for the backward pass; `summary` reports it per layer.
pub fn tape_bytes() -> u64 {
    TAPE_BYTES.with(|b| b.get())
}

/// While alive, ops record nothing (inference mode): every result is a leaf, so each
/// intermediate is freed as soon as the next op has used it. Restores the previous mode on drop.
pub struct NoGradGuard(bool);

impl NoGradGuard {
    pub fn new() -> Self {
        NoGradGuard(GRAD_ENABLED.with(|g| g.replace(false)))
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

/// Runs `f` with recording off (see [`NoGradGuard`]).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Runs `f` with recording on, whatever the mode around it (compiling a plan records a pass).
pub fn with_grad<R>(f: impl FnOnce() -> R) -> R {
    let before = GRAD_ENABLED.with(|g| g.replace(true));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Whether ops are being recorded on this thread.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

impl<T: Elem> Var<T> {
    fn leaf(value: Tensor<T>, requires_grad: bool) -> Self {
        Var(Rc::new(Node {
            value: RefCell::new(value),
            grad: RefCell::new(None),
            requires_grad: Cell::new(requires_grad),
            op: None,
            parents: Vec::new(),
        }))
    }
    /// A constant: no gradient flows into it.
    pub fn constant(value: Tensor<T>) -> Self {
        Self::leaf(value, false)
    }
    /// A trainable parameter (or an input whose gradient you want): gradients accumulate in it.
    pub fn parameter(value: Tensor<T>) -> Self {
        Self::leaf(value, true)
    }

    /// The result of primitive `op` on `parents`. Recorded only when gradients are enabled and
    /// some parent needs one; otherwise a constant.
    pub(crate) fn from_op(value: Tensor<T>, op: Op<T>, parents: &[&Var<T>]) -> Self {
        let record = is_grad_enabled() && parents.iter().any(|p| p.requires_grad());
        if !record {
            return Self::constant(value);
        }
        let own = if matches!(op, Op::Reshape) { 0 } else { value.numel() };
        let constants: usize = parents.iter().filter(|p| !p.requires_grad()).map(|p| p.value_ref().numel()).sum();
        let bytes = ((own + constants) * std::mem::size_of::<T>() + op.saved_bytes()) as u64;
        TAPE_BYTES.with(|b| b.set(b.get() + bytes));
        Var(Rc::new(Node {
            value: RefCell::new(value),
            grad: RefCell::new(None),
            requires_grad: Cell::new(true),
            op: Some(op),
            parents: parents.iter().map(|&p| p.clone()).collect(),
        }))
    }

    /// The current value (cheap: the storage is shared).
    pub fn value(&self) -> Tensor<T> {
        self.0.value.borrow().clone()
    }
    /// Borrow the value without cloning.
    pub fn value_ref(&self) -> Ref<'_, Tensor<T>> {
        self.0.value.borrow()
    }
    pub fn shape(&self) -> Vec<usize> {
        self.0.value.borrow().shape().to_vec()
    }
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad.get()
    }
    /// Freezes (`false`) or unfreezes a leaf (PyTorch's `requires_grad_`): ops on a frozen
    /// parameter record nothing for it, so no gradient is computed for it or, where nothing
    /// before it needs one, for anything it feeds. Refused for an op's result, whose gradient
    /// is its inputs' business.
    pub fn set_requires_grad(&self, on: bool) -> Result<()> {
        if !self.is_leaf() {
            stride_tensor::bail!(arg, "set_requires_grad", "{} is the result of an op, not a leaf (a parameter or a constant)", self.op_name());
        }
        self.0.requires_grad.set(on);
        Ok(())
    }
    pub fn is_leaf(&self) -> bool {
        self.0.op.is_none()
    }
    /// The accumulated gradient of a parameter, if `backward` has reached it.
    pub fn grad(&self) -> Option<Tensor<T>> {
        self.0.grad.borrow().clone()
    }
    /// Removes and returns the accumulated gradient (a training plan takes its buffer back).
    pub fn take_grad(&self) -> Option<Tensor<T>> {
        self.0.grad.borrow_mut().take()
    }
    pub fn zero_grad(&self) {
        *self.0.grad.borrow_mut() = None;
    }
    /// Replaces the accumulated gradient (gradient clipping, tests); the shape must match.
    pub fn set_grad(&self, grad: Tensor<T>) -> Result<()> {
        if grad.shape() != self.value_ref().shape() {
            stride_tensor::bail!(shape, "set_grad", "gradient has shape {:?}, the variable has {:?}", grad.shape(), self.shape());
        }
        *self.0.grad.borrow_mut() = Some(grad);
        Ok(())
    }
    /// Replaces the value of a leaf (optimizer steps, loading weights); shapes must agree.
    pub fn set_value(&self, value: Tensor<T>) -> Result<()> {
        if !self.is_leaf() {
            stride_tensor::bail!(arg, "set_value", "only leaves (parameters, constants) can be assigned");
        }
        let mut v = self.0.value.borrow_mut();
        if v.shape() != value.shape() {
            stride_tensor::bail!(shape, "set_value", "new value has shape {:?}, the variable has {:?}", value.shape(), v.shape());
        }
        // A leaf stays where it is (loading weights into a model on a GPU keeps it there).
        let device = v.device();
        *v = if value.device() == device { value } else { value.to(device)? };
        Ok(())
    }
    /// Changes a leaf's values in place (optimizer steps): no copy unless the value is shared
    /// with a live graph.
    pub fn update_value(&self, f: impl FnOnce(&mut [T])) -> Result<()> {
        if !self.is_leaf() {
            stride_tensor::bail!(arg, "update_value", "only leaves (parameters, constants) can be assigned");
        }
        let mut v = self.0.value.borrow_mut();
        let device = v.device();
        f(v.data_mut());
        if !device.is_cpu() {
            // Updated on the host (a round trip): the leaf goes back to its device.
            *v = v.to(device)?;
        }
        Ok(())
    }
    /// The same value cut from the tape: a constant.
    pub fn detach(&self) -> Var<T> {
        Var::constant(self.value())
    }
    /// Whether two handles name the same node.
    pub fn same(&self, other: &Var<T>) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }
    /// Name of the primitive that produced this value ("leaf" for leaves).
    pub fn op_name(&self) -> &'static str {
        self.0.op.as_ref().map_or("leaf", |o| o.name())
    }
}
