//! An exponential moving average of a model's weights (`TrainConfig::ema`): timm's `ModelEma`,
//! Keras's `use_ema`, PyTorch's `AveragedModel` with an EMA. The averaged weights are smoother
//! than the last step's and usually evaluate better; the run evaluates and saves them while the
//! optimizer goes on with the raw ones.

use stride_autograd::{no_grad, Tensor, ToDevice, Var};
use stride_nn::{Module, Slot};

use crate::{Result, TrainError};

/// The average of every parameter and buffer (batch norm's running statistics too, as timm
/// averages them; a batch counter is copied, not averaged), in `visit` order, on the model's
/// device.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    updates: usize,
    avg: Vec<(String, Tensor<f32>)>,
}

impl Ema {
    /// Starts the average at `model`'s current weights. `decay` must be in [0, 1).
    pub fn new(model: &mut dyn Module, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(TrainError::Config(format!("the weight average's decay must be in [0, 1), such as 0.999; got {decay}")));
        }
        Ok(Ema { decay, updates: 0, avg: crate::checkpoint::named_tensors(model) })
    }

    /// The weight of the past at update `n` (counted from 0): `decay`, but no more than
    /// (1 + n) / (10 + n) (TensorFlow's `ExponentialMovingAverage` with `num_updates`), so
    /// the first updates do not leave the average stuck at the initial weights.
    pub fn decay_at(&self, n: usize) -> f64 {
        self.decay.min((1.0 + n as f64) / (10.0 + n as f64))
    }

    /// Updates so far (the optimizer's steps since the average started).
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// Folds `model`'s weights after an optimizer step into the average.
    pub fn update(&mut self, model: &mut dyn Module) -> Result<()> {
        let d = self.decay_at(self.updates);
        let now = crate::checkpoint::named_tensors(model);
        if now.len() != self.avg.len() {
            return Err(TrainError::Config(format!("the weight average holds {} tensors, the model {}", self.avg.len(), now.len())));
        }
        for ((name, avg), (_, cur)) in self.avg.iter_mut().zip(now) {
            *avg = if name.ends_with("num_batches_tracked") { cur } else { blend(avg, &cur, d)? };
        }
        self.updates += 1;
        Ok(())
    }

    /// Exchanges the model's weights with the averages: after one call the model holds the
    /// averaged weights, after a second its own again (no copies: the tensors trade places).
    pub fn swap(&mut self, model: &mut dyn Module) -> Result<()> {
        let mut result = Ok(());
        let mut avg = self.avg.iter_mut();
        model.visit("", &mut |name, slot| {
            let Some((_, t)) = avg.next().filter(|(n, _)| *n == name) else {
                result = Err(TrainError::Config(format!("the weight average has no '{name}' where the model has it")));
                return;
            };
            match slot {
                Slot::Param(v) => {
                    let mine = v.value();
                    if let Err(e) = v.set_value(std::mem::replace(t, mine)) {
                        result = Err(e.into());
                    }
                }
                Slot::Buffer(b) => std::mem::swap(b, t),
            }
        });
        if let Some((name, _)) = avg.next() {
            return Err(TrainError::Config(format!("the weight average's '{name}' is not the model's")));
        }
        result
    }

    /// The averages by name, for a checkpoint.
    pub fn tensors(&self) -> &[(String, Tensor<f32>)] {
        &self.avg
    }

    /// Puts back averages and a count saved by [`tensors`](Self::tensors) and
    /// [`updates`](Self::updates): every tensor of the model must be there, in its shape.
    pub fn restore(&mut self, mut saved: std::collections::HashMap<String, Tensor<f32>>, updates: usize) -> Result<()> {
        let mut avg = Vec::with_capacity(self.avg.len());
        for (name, now) in &self.avg {
            match saved.remove(name) {
                Some(t) if t.shape() == now.shape() => avg.push((name.clone(), if t.device() == now.device() { t } else { t.to(now.device())? })),
                Some(t) => {
                    return Err(TrainError::Checkpoint(format!(
                        "the weight average's '{name}' has shape {:?}, the model's {:?}",
                        t.shape(),
                        now.shape()
                    )))
                }
                None => return Err(TrainError::Checkpoint(format!("the weight average has no '{name}'"))),
            }
        }
        if let Some(extra) = saved.keys().next() {
            return Err(TrainError::Checkpoint(format!("the weight average's '{extra}' is not the model's")));
        }
        self.avg = avg;
        self.updates = updates;
        Ok(())
    }
}

/// `avg + (1 - d) * (cur - avg)`, which is `d * avg + (1 - d) * cur` but leaves a weight that
/// has not moved (a frozen one) exactly as it is (PyTorch's `lerp_`, as timm updates): in place
/// on the CPU, by the device's element-wise kernels on a GPU.
fn blend(avg: &mut Tensor<f32>, cur: &Tensor<f32>, d: f64) -> Result<Tensor<f32>> {
    if avg.device().is_cpu() && cur.device().is_cpu() {
        let e = (1.0 - d) as f32;
        let mut out = std::mem::replace(avg, Tensor::zeros(&[0])?);
        out.data_mut().iter_mut().zip(cur.data()).for_each(|(a, &c)| *a += e * (c - *a));
        return Ok(out);
    }
    let a = Var::constant(avg.clone());
    Ok(no_grad(|| a.add(&Var::constant(cur.clone()).sub(&a)?.mul_scalar(1.0 - d)?))?.value())
}
