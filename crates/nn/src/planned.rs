//! Planned inference for any module (see `stride_autograd::plan`): [`compile`] records one
//! evaluation-mode pass and compiles it; [`Planned`] keeps a plan per input shape and replays
//! it, running eagerly where the planner refuses the network.

use std::collections::HashMap;

use stride_autograd::{no_grad, with_grad, Plan, Tensor, TrainPlan, Var};

use crate::{Ctx, Module, Result, Slot};

/// Compiles `m`'s evaluation-mode forward pass for inputs shaped like `x` (a sample batch:
/// its values only drive the recording). The plan snapshots the weights: recompile after
/// changing them.
pub fn compile(m: &mut dyn Module, x: &Tensor<f32>) -> Result<Plan> {
    let input = Var::parameter(x.clone());
    let y = with_grad(|| m.forward(&input, &mut Ctx::eval()))?;
    Ok(Plan::compile(&input, &y)?)
}

/// Input shapes whose plans are kept at once (a data set's last, smaller batch is a second).
const KEPT: usize = 4;

/// Plans by input shape, made on first use. Where the planner refuses a network (an op with
/// no planned form), the reason is kept and that shape runs eagerly.
#[derive(Default)]
pub struct Planned {
    plans: HashMap<Vec<usize>, std::result::Result<Plan, String>>,
}

impl Planned {
    pub fn new() -> Self {
        Self::default()
    }

    /// `m`'s evaluation-mode output for `x`, through the plan for `x`'s shape.
    pub fn forward(&mut self, m: &mut dyn Module, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let shape = x.shape().to_vec();
        if !self.plans.contains_key(&shape) {
            if self.plans.len() >= KEPT {
                self.plans.clear();
            }
            let plan = compile(m, x).map_err(|e| e.to_string());
            self.plans.insert(shape.clone(), plan);
        }
        match self.plans.get_mut(&shape).expect("inserted above") {
            Ok(plan) => Ok(plan.run(x)?),
            Err(_) => Ok(no_grad(|| m.forward(&Var::constant(x.clone()), &mut Ctx::eval()))?.value()),
        }
    }

    /// Why the plan for `shape` was refused, if it was.
    pub fn refusal(&self, shape: &[usize]) -> Option<&str> {
        self.plans.get(shape).and_then(|p| p.as_ref().err()).map(String::as_str)
    }

    /// Forgets every plan (after the weights change).
    pub fn clear(&mut self) {
        self.plans.clear();
    }
}

/// Every buffer of `m` (batch norm's running statistics), copied.
fn buffers(m: &mut dyn Module) -> Vec<Tensor<f32>> {
    let mut out = Vec::new();
    m.visit("", &mut |_, slot| {
        if let Slot::Buffer(t) = slot {
            out.push(t.clone());
        }
    });
    out
}

fn restore(m: &mut dyn Module, saved: Vec<Tensor<f32>>) {
    let mut it = saved.into_iter();
    m.visit("", &mut |_, slot| {
        if let Slot::Buffer(t) = slot {
            if let Some(v) = it.next() {
                *t = v;
            }
        }
    });
}

/// Compiles `m`'s training step (forward in training mode, softmax cross-entropy, backward)
/// for inputs shaped like `x`. Recording runs the network once; the running statistics it
/// changed are put back, so compiling leaves the module as it was.
pub fn compile_training(m: &mut dyn Module, x: &Tensor<f32>) -> Result<TrainPlan> {
    let saved = buffers(m);
    let input = Var::parameter(x.clone());
    let y = with_grad(|| m.forward(&input, &mut Ctx::train(0)));
    restore(m, saved);
    Ok(TrainPlan::compile(&input, &y?)?)
}

/// Training steps through a plan per input shape, made on first use; `None` from
/// [`TrainPlanned::step`] means the planner refused the network (the reason is kept) and the
/// caller trains that step eagerly.
#[derive(Default)]
pub struct TrainPlanned {
    plans: HashMap<Vec<usize>, PlanOrRefusal>,
}

/// A compiled training plan with its parameters' names, or why the planner refused.
type PlanOrRefusal = std::result::Result<(TrainPlan, Vec<String>), String>;

impl TrainPlanned {
    pub fn new() -> Self {
        Self::default()
    }

    /// One step on `x` with `labels`: sets the parameters' gradients (as `zero_grad` then
    /// `backward` would), updates batch norm's running statistics as the eager pass does, and
    /// returns the mean softmax cross-entropy.
    pub fn step(&mut self, m: &mut dyn Module, x: &Tensor<f32>, labels: &[usize]) -> Result<Option<f32>> {
        self.run(m, x, |plan| plan.step(x, labels))
    }

    /// One step towards a target mass [N, classes] (`TrainPlan::step_towards`: label
    /// smoothing, class weights, blended targets), the gradients scaled by `scale` and, with
    /// `accumulate`, added to the parameters' own; batch norm's running statistics as
    /// [`step`](Self::step). Returns the loss.
    /// `mass` makes the target mass for the logits' shape [N, classes].
    pub fn step_towards(
        &mut self,
        m: &mut dyn Module,
        x: &Tensor<f32>,
        mass: impl FnOnce([usize; 2]) -> stride_autograd::Result<Vec<f32>>,
        scale: f32,
        accumulate: bool,
    ) -> Result<Option<f32>> {
        self.run(m, x, |plan| plan.step_towards(x, &mass(plan.logits_shape())?, scale, accumulate))
    }

    /// Runs `step` on the plan for `x`'s shape (compiled on first use) and folds its batch
    /// statistics into the running ones; `None` where the planner refused the network.
    fn run(&mut self, m: &mut dyn Module, x: &Tensor<f32>, step: impl FnOnce(&mut TrainPlan) -> stride_autograd::Result<f32>) -> Result<Option<f32>> {
        let shape = x.shape().to_vec();
        if !self.plans.contains_key(&shape) {
            if self.plans.len() >= KEPT {
                self.plans.clear();
            }
            let plan = compile_training(m, x).map_err(|e| e.to_string()).and_then(|p| {
                let names = batch_norm_names(m, &p)?;
                Ok((p, names))
            });
            self.plans.insert(shape.clone(), plan);
        }
        let Ok((plan, names)) = self.plans.get_mut(&shape).expect("inserted above") else { return Ok(None) };
        let loss = step(plan)?;
        // Running statistics, found by their layer's name.
        let stats = plan.batch_norm_stats();
        m.visit("", &mut |name, slot| {
            let Slot::Buffer(t) = slot else { return };
            for (s, prefix) in stats.iter().zip(names.iter()) {
                let mom = s.momentum as f32;
                let update = |t: &mut Tensor<f32>, b: &[f32]| t.data_mut().iter_mut().zip(b).for_each(|(r, &v)| *r = (1.0 - mom) * *r + mom * v);
                if name == crate::join(prefix, "running_mean") {
                    update(t, s.mean);
                } else if name == crate::join(prefix, "running_var") {
                    update(t, s.var_unbiased);
                } else if name == crate::join(prefix, "num_batches_tracked") {
                    t.data_mut()[0] += 1.0;
                }
            }
        });
        Ok(Some(loss))
    }

    /// The logits of the last step run for inputs of `shape` (`None` before one has run, or
    /// where the planner refused the network).
    pub fn logits(&self, shape: &[usize]) -> Option<Tensor<f32>> {
        self.plans.get(shape)?.as_ref().ok()?.0.logits().ok()
    }

    /// Why the plan for `shape` was refused, if it was.
    pub fn refusal(&self, shape: &[usize]) -> Option<&str> {
        self.plans.get(shape).and_then(|p| p.as_ref().err()).map(String::as_str)
    }
}

/// The layer name of each batch norm of `plan` (the prefix of its weight's name).
fn batch_norm_names(m: &mut dyn Module, plan: &TrainPlan) -> std::result::Result<Vec<String>, String> {
    let stats = plan.batch_norm_stats();
    let mut names: Vec<Option<String>> = vec![None; stats.len()];
    m.visit("", &mut |name, slot| {
        if let Slot::Param(v) = slot {
            for (i, s) in stats.iter().enumerate() {
                if s.weight.same(v) {
                    names[i] = Some(name.strip_suffix(".weight").or(name.strip_suffix("weight")).unwrap_or(&name).to_string());
                }
            }
        }
    });
    names
        .into_iter()
        .map(|n| n.ok_or_else(|| "a batch norm's weight is not among the module's parameters: its running statistics have no name".to_string()))
        .collect()
}
