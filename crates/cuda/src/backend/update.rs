//! The optimizers' updates on the GPU, one kernel per rule (the CPU's formulas in f32).

use cudarc::driver::{CudaSlice, PushKernelArg};
use stride_autograd::Update;
use stride_tensor::{Error, Result, Tensor};

use super::{grid, CudaBackend};

impl CudaBackend {
    pub(super) fn update_on(
        &self,
        rule: &Update,
        w: &Tensor<f32>,
        g: &Tensor<f32>,
        state: &[Tensor<f32>],
    ) -> Result<(Tensor<f32>, Vec<Tensor<f32>>)> {
        let n = w.numel();
        let (sw, sg) = (self.slice(w)?, self.slice(g)?);
        let mut w_out = self.fresh(n)?;
        let wrap = |s: CudaSlice<f32>| self.wrap(s, w.shape());
        match *rule {
            Update::Sgd { lr, momentum, nesterov, weight_decay, first } => {
                let mut b_out = self.fresh(if state.is_empty() { 0 } else { n })?;
                let has = i32::from(!state.is_empty());
                let b = match state.first() {
                    Some(t) => self.slice(t)?,
                    None => sg,
                };
                if n > 0 {
                    launch!(
                        self,
                        "sgd_update",
                        grid(n),
                        sw,
                        sg,
                        b,
                        &mut w_out,
                        &mut b_out,
                        &(n as i64),
                        &(lr as f32),
                        &(momentum as f32),
                        &(weight_decay as f32),
                        &i32::from(nesterov),
                        &i32::from(first),
                        &has
                    );
                }
                Ok((wrap(w_out)?, if state.is_empty() { Vec::new() } else { vec![wrap(b_out)?] }))
            }
            Update::Adam { lr, betas, c1, c2, eps, weight_decay, decoupled } => {
                let [m, v] = state else {
                    return Err(Error::arg("update", "Adam takes two state tensors"));
                };
                let (mut m_out, mut v_out) = (self.fresh(n)?, self.fresh(n)?);
                if n > 0 {
                    launch!(
                        self,
                        "adam_update",
                        grid(n),
                        sw,
                        sg,
                        self.slice(m)?,
                        self.slice(v)?,
                        &mut w_out,
                        &mut m_out,
                        &mut v_out,
                        &(n as i64),
                        &lr,
                        &betas.0,
                        &betas.1,
                        &c1,
                        &c2,
                        &eps,
                        &weight_decay,
                        &i32::from(decoupled)
                    );
                }
                Ok((wrap(w_out)?, vec![wrap(m_out)?, wrap(v_out)?]))
            }
            Update::RmsProp { lr, alpha, eps, momentum, weight_decay } => {
                let (v, b) = match state {
                    [v] => (v, None),
                    [v, b] => (v, Some(b)),
                    _ => return Err(Error::arg("update", "RMSprop takes one state tensor, two with momentum")),
                };
                let (mut v_out, mut b_out) = (self.fresh(n)?, self.fresh(if b.is_some() { n } else { 0 })?);
                let sv = self.slice(v)?;
                if n > 0 {
                    launch!(
                        self,
                        "rmsprop_update",
                        grid(n),
                        sw,
                        sg,
                        sv,
                        b.map(|b| self.slice(b)).transpose()?.unwrap_or(sv),
                        &mut w_out,
                        &mut v_out,
                        &mut b_out,
                        &(n as i64),
                        &lr,
                        &alpha,
                        &eps,
                        &momentum,
                        &weight_decay,
                        &i32::from(b.is_some())
                    );
                }
                let mut state = vec![wrap(v_out)?];
                if b.is_some() {
                    state.push(wrap(b_out)?);
                }
                Ok((wrap(w_out)?, state))
            }
        }
    }
}
