//! Batch norm over axis 1 of [N, C, ...]: the backend's kernels, or cuDNN when it is on
//! (`dnn.rs`).

use cudarc::driver::{CudaSlice, PushKernelArg};
use stride_autograd::device::Forward;
use stride_autograd::BatchNormOptions;
use stride_tensor::{Result, Tensor};

use super::dnn::{self, NormBackward, NormForward, NormInference};
use super::{grid, int, per_block, CudaBackend, Saved};

impl CudaBackend {
    pub(super) fn batch_norm(&self, x: &[Tensor<f32>], training: bool, opts: &BatchNormOptions) -> Result<Forward<f32>> {
        const OP: &str = "batch_norm";
        if x.len() != 5 {
            stride_tensor::bail!(arg, OP, "takes x, weight, bias, running mean and variance, got {} tensors", x.len());
        }
        let s = x[0].shape();
        if s.len() < 2 {
            stride_tensor::bail!(shape, OP, "expects at least [N, C], got shape {s:?}");
        }
        let (n, c, l) = (s[0], s[1], s[2..].iter().product::<usize>());
        for (name, t) in ["weight", "bias", "running_mean", "running_var"].iter().zip(&x[1..]) {
            if t.shape() != [c] {
                stride_tensor::bail!(shape, OP, "{name} has shape {:?} but the input has {c} channels (input {s:?})", t.shape());
            }
        }
        if training && n * l <= 1 {
            stride_tensor::bail!(shape, OP, "training needs more than one value per channel, got input {s:?}");
        }
        let (mom, m) = (opts.momentum as f32, (n * l) as f32);
        if let (true, Some(dnn), Some(shape)) = (training && opts.eps > 0.0, &self.dnn, dnn::norm_shape(s)) {
            let (mut y, mut mean, mut invstd) = (self.fresh(x[0].numel())?, self.fresh(c)?, self.fresh(c)?);
            let (x0, gamma, beta) = (self.slice(&x[0])?, self.slice(&x[1])?, self.slice(&x[2])?);
            dnn.norm_forward(shape, opts.eps, NormForward { x: x0, gamma, beta, y: &mut y, mean: &mut mean, invstd: &mut invstd })?;
            // The running statistics are tensors of their own (cuDNN would move them in place):
            // new ones, from what cuDNN saved.
            let (mut rm, mut rv) = (self.fresh(c)?, self.fresh(c)?);
            let (eps, ci) = (opts.eps as f32, int(OP, c)?);
            launch!(self, "bn_running", grid(c), &mean, &invstd, &eps, &ci, &mom, &m, self.slice(&x[3])?, self.slice(&x[4])?, &mut rm, &mut rv);
            let state = vec![self.wrap(rm, &[c])?, self.wrap(rv, &[c])?];
            return Ok(Forward { y: self.wrap(y, s)?, state, saved: Box::new(Saved::Stats { mean, invstd }) });
        }
        let ci = int(OP, c)?;
        if !training {
            let total = x[0].numel();
            let mut y = self.fresh(total)?;
            let [x0, gamma, beta, running_mean, running_var] = [&x[0], &x[1], &x[2], &x[3], &x[4]].map(|t| self.slice(t));
            let (x0, gamma, beta, running_mean, running_var) = (x0?, gamma?, beta?, running_mean?, running_var?);
            match (&self.dnn, dnn::norm_shape(s)) {
                (Some(dnn), Some(shape)) if opts.eps > 0.0 => {
                    dnn.norm_inference(shape, opts.eps, NormInference { x: x0, gamma, beta, running_mean, running_var, y: &mut y })?
                }
                _ if total > 0 => {
                    let eps = opts.eps as f32;
                    launch!(
                        self,
                        "bn_eval",
                        grid(total),
                        x0,
                        running_mean,
                        running_var,
                        gamma,
                        beta,
                        &mut y,
                        &eps,
                        &ci,
                        &(l as i64),
                        &(total as i64)
                    );
                }
                _ => {}
            }
            // A backward pass (rare in evaluation mode) works 1/sqrt(var + eps) out from these.
            let saved = Saved::Running { mean: x[3].clone(), var: x[4].clone() };
            return Ok(Forward { y: self.wrap(y, s)?, state: Vec::new(), saved: Box::new(saved) });
        }
        // Per channel: the mean, 1/sqrt(var + eps) and the running statistics' new values.
        let (mut mean, mut invstd, mut rm, mut rv) = (self.fresh(c)?, self.fresh(c)?, self.fresh(c)?, self.fresh(c)?);
        launch!(
            self,
            "bn_stats",
            per_block(c),
            self.slice(&x[0])?,
            &mut mean,
            &mut invstd,
            &int(OP, n)?,
            &ci,
            &(l as i64),
            &(opts.eps as f32),
            &mom,
            self.slice(&x[3])?,
            self.slice(&x[4])?,
            &mut rm,
            &mut rv
        );
        let state = vec![self.wrap(rm, &[c])?, self.wrap(rv, &[c])?];
        let total = x[0].numel();
        let mut y = self.fresh(total)?;
        if total > 0 {
            launch!(
                self,
                "bn_normalize",
                grid(total),
                self.slice(&x[0])?,
                &mean,
                &invstd,
                self.slice(&x[1])?,
                self.slice(&x[2])?,
                &mut y,
                &ci,
                &(l as i64),
                &(total as i64)
            );
        }
        Ok(Forward { y: self.wrap(y, s)?, state, saved: Box::new(Saved::Stats { mean, invstd }) })
    }

    /// The gradients after an evaluation-mode forward pass, which saved the running statistics it
    /// normalised with.
    pub(super) fn batch_norm_backward_running(
        &self,
        opts: &BatchNormOptions,
        (running_mean, running_var): (&Tensor<f32>, &Tensor<f32>),
        g: &Tensor<f32>,
        x: &[Tensor<f32>],
    ) -> Result<Vec<Option<Tensor<f32>>>> {
        let c = running_var.numel();
        let (mean, rv) = (self.slice(running_mean)?, self.slice(running_var)?);
        let mut invstd = self.fresh(c)?;
        launch!(self, "bn_invstd", grid(c), rv, &mut invstd, &(opts.eps as f32), &int("batch_norm", c)?);
        self.batch_norm_backward(false, opts, mean, &invstd, g, x)
    }

    /// The gradients of x, the weight and the bias, from the statistics the forward pass saved
    /// (the batch's in training, the running ones in evaluation).
    pub(super) fn batch_norm_backward(
        &self,
        training: bool,
        opts: &BatchNormOptions,
        mean: &CudaSlice<f32>,
        invstd: &CudaSlice<f32>,
        g: &Tensor<f32>,
        x: &[Tensor<f32>],
    ) -> Result<Vec<Option<Tensor<f32>>>> {
        let s = x[0].shape();
        let (n, c, l) = (s[0], s[1], s[2..].iter().product::<usize>());
        let total = x[0].numel();
        let (mut dx, mut dgamma, mut dbeta) = (self.fresh(total)?, self.fresh(c)?, self.fresh(c)?);
        let (sg, sx) = (self.slice(g)?, self.slice(&x[0])?);
        if let (true, Some(dnn), Some(shape)) = (training && opts.eps > 0.0, &self.dnn, dnn::norm_shape(s)) {
            let buffers =
                NormBackward { x: sx, dy: sg, gamma: self.slice(&x[1])?, mean, invstd, dx: &mut dx, dgamma: &mut dgamma, dbeta: &mut dbeta };
            dnn.norm_backward(shape, opts.eps, buffers)?;
        } else {
            let (ci, li) = (int("batch_norm", c)?, l as i64);
            launch!(self, "bn_sums", per_block(c), sg, sx, mean, invstd, &mut dgamma, &mut dbeta, &int("batch_norm", n)?, &ci, &li);
            if total > 0 {
                let batch = training as i32;
                launch!(
                    self,
                    "bn_dx",
                    grid(total),
                    sg,
                    sx,
                    mean,
                    invstd,
                    self.slice(&x[1])?,
                    &dgamma,
                    &dbeta,
                    &batch,
                    &((n * l) as f32),
                    &mut dx,
                    &ci,
                    &li,
                    &(total as i64)
                );
            }
        }
        Ok(vec![Some(self.wrap(dx, s)?), Some(self.wrap(dgamma, &[c])?), Some(self.wrap(dbeta, &[c])?)])
    }
}
