//! The `Module` trait: forward, and one way to visit named parameters and buffers.

use stride_autograd::{Rng, Tensor, Var};

use crate::Result;

/// What a forward pass needs besides the input: the mode and the random source for dropout.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Training mode: batch norm uses batch statistics and updates running ones; dropout drops.
    pub training: bool,
    pub rng: Rng,
    /// Print each layer's output shape as the data flows (`net(X, debug=True)`).
    pub debug: bool,
}

impl Ctx {
    pub fn train(seed: u64) -> Self {
        Ctx { training: true, rng: Rng::seed(seed), debug: false }
    }
    pub fn eval() -> Self {
        Ctx { training: false, rng: Rng::seed(0), debug: false }
    }
}

/// A named parameter or buffer, as PyTorch's `state_dict` names it (`features.0.weight`).
pub enum Slot<'a> {
    /// Trainable: gradients flow into it.
    Param(&'a Var),
    /// State that is saved but not trained (`bn1.running_mean`).
    Buffer(&'a mut Tensor<f32>),
}

/// A layer or a network of layers.
pub trait Module {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var>;
    /// Calls `f` with the full name and slot of every parameter and buffer, in a fixed order.
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>));
    /// A short description for summaries and debug output, e.g. `Conv2d(1, 20, k3)`.
    fn describe(&self) -> String;

    /// The trainable parameters, in `visit` order.
    fn parameters(&mut self) -> Vec<Var> {
        let mut out = Vec::new();
        self.visit("", &mut |_, s| {
            if let Slot::Param(v) = s {
                out.push(v.clone());
            }
        });
        out
    }
    /// Number of trainable scalars.
    fn num_parameters(&mut self) -> usize {
        self.parameters().iter().map(|p| p.value_ref().numel()).sum()
    }
}

/// `prefix.name`, or `name` at the top level, or `prefix` for an unnamed (flattened) child.
pub fn join(prefix: &str, name: &str) -> String {
    if name.is_empty() {
        prefix.to_string()
    } else if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Visits `weight` and an optional `bias` under `prefix`, as every weighted layer names them.
pub(crate) fn visit_weight_bias(prefix: &str, weight: &Var, bias: Option<&Var>, f: &mut dyn FnMut(String, Slot<'_>)) {
    f(join(prefix, "weight"), Slot::Param(weight));
    if let Some(b) = bias {
        f(join(prefix, "bias"), Slot::Param(b));
    }
}
