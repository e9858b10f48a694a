//! Learning-rate schedules, stepped once per epoch, with PyTorch's formulas.

/// A learning-rate schedule. `lr(epoch)` is the rate for 0-based `epoch` given the base rate.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// lr * gamma^(epoch / step_size) (StepLR)
    Step {
        step_size: usize,
        gamma: f64,
    },
    /// lr * gamma^(number of milestones <= epoch) (MultiStepLR)
    MultiStep {
        milestones: Vec<usize>,
        gamma: f64,
    },
    /// lr * gamma^epoch (ExponentialLR)
    Exponential {
        gamma: f64,
    },
    /// eta_min + (lr - eta_min) * (1 + cos(pi * epoch / t_max)) / 2 (CosineAnnealingLR)
    Cosine {
        t_max: usize,
        eta_min: f64,
    },
    /// Linear warm-up from lr * start_factor to lr over `epochs` epochs, then `then`.
    Warmup {
        epochs: usize,
        start_factor: f64,
        then: Box<Schedule>,
    },
    /// One-cycle (per epoch): cosine rise from lr / div_factor to lr over the first
    /// `pct_start` of `total` epochs, then cosine fall to lr / (div_factor * final_div_factor).
    OneCycle {
        total: usize,
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
    },
}

impl Schedule {
    pub fn lr(&self, base: f64, epoch: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Step { step_size, gamma } => base * gamma.powi((epoch / (*step_size).max(1)) as i32),
            Schedule::MultiStep { milestones, gamma } => base * gamma.powi(milestones.iter().filter(|&&m| m <= epoch).count() as i32),
            Schedule::Exponential { gamma } => base * gamma.powi(epoch as i32),
            Schedule::Cosine { t_max, eta_min } => {
                let t = epoch.min(*t_max) as f64 / (*t_max).max(1) as f64;
                eta_min + (base - eta_min) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
            }
            Schedule::OneCycle { total, pct_start, div_factor, final_div_factor } => {
                let (start, end) = (base / div_factor, base / (div_factor * final_div_factor));
                let up = ((*total as f64) * pct_start).max(1.0);
                let e = epoch as f64;
                let cos = |from: f64, to: f64, t: f64| to + (from - to) * (1.0 + (std::f64::consts::PI * t.clamp(0.0, 1.0)).cos()) / 2.0;
                if e < up {
                    cos(start, base, e / up)
                } else {
                    cos(base, end, (e - up) / ((*total as f64 - 1.0 - up).max(1.0)))
                }
            }
            Schedule::Warmup { epochs, start_factor, then } => {
                if epoch < *epochs {
                    base * (start_factor + (1.0 - start_factor) * epoch as f64 / *epochs as f64)
                } else {
                    then.lr(base, epoch - epochs)
                }
            }
        }
    }
}

/// ReduceLROnPlateau (mode "min"): multiplies the rate by `factor` when the monitored value
/// has not improved by more than `threshold` (relative) for more than `patience` epochs.
#[derive(Clone, Debug, PartialEq)]
pub struct ReduceOnPlateau {
    pub factor: f64,
    pub patience: usize,
    pub threshold: f64,
    pub min_lr: f64,
    best: f64,
    bad_epochs: usize,
}

impl ReduceOnPlateau {
    /// PyTorch's defaults are factor 0.1, patience 10, threshold 1e-4.
    pub fn new(factor: f64, patience: usize, threshold: f64, min_lr: f64) -> Self {
        ReduceOnPlateau { factor, patience, threshold, min_lr, best: f64::INFINITY, bad_epochs: 0 }
    }
    /// The state to save in a checkpoint: (best metric, epochs without improvement).
    pub fn state(&self) -> (f64, usize) {
        (self.best, self.bad_epochs)
    }
    /// Restores [`ReduceOnPlateau::state`].
    pub fn set_state(&mut self, best: f64, bad_epochs: usize) {
        self.best = best;
        self.bad_epochs = bad_epochs;
    }
    /// Feeds one epoch's metric; returns the new learning rate.
    pub fn step(&mut self, metric: f64, lr: f64) -> f64 {
        if metric < self.best * (1.0 - self.threshold) {
            self.best = metric;
            self.bad_epochs = 0;
            return lr;
        }
        self.bad_epochs += 1;
        if self.bad_epochs > self.patience {
            self.bad_epochs = 0;
            return (lr * self.factor).max(self.min_lr);
        }
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_pytorch_formulas() {
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        let s = Schedule::Step { step_size: 3, gamma: 0.1 };
        let got: Vec<f64> = (0..7).map(|e| s.lr(1.0, e)).collect();
        for (g, w) in got.iter().zip([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01]) {
            close(*g, w);
        }
        let m = Schedule::MultiStep { milestones: vec![2, 5], gamma: 0.5 };
        close(m.lr(0.2, 1), 0.2);
        close(m.lr(0.2, 2), 0.1);
        close(m.lr(0.2, 6), 0.05);
        close(Schedule::Exponential { gamma: 0.9 }.lr(2.0, 3), 2.0 * 0.729);
        let c = Schedule::Cosine { t_max: 10, eta_min: 0.0 };
        close(c.lr(0.1, 0), 0.1);
        close(c.lr(0.1, 5), 0.05);
        close(c.lr(0.1, 10), 0.0);
        let w = Schedule::Warmup { epochs: 2, start_factor: 0.5, then: Box::new(Schedule::Constant) };
        close(w.lr(1.0, 0), 0.5);
        close(w.lr(1.0, 1), 0.75);
        close(w.lr(1.0, 2), 1.0);
        let o = Schedule::OneCycle { total: 10, pct_start: 0.3, div_factor: 25.0, final_div_factor: 1e4 };
        close(o.lr(1.0, 0), 1.0 / 25.0);
        close(o.lr(1.0, 3), 1.0);
        close(o.lr(1.0, 9), 1.0 / 25.0 / 1e4);
        assert!(o.lr(1.0, 1) < o.lr(1.0, 2) && o.lr(1.0, 5) > o.lr(1.0, 7));
    }

    #[test]
    fn plateau_waits_for_patience_then_reduces() {
        let mut p = ReduceOnPlateau::new(0.1, 2, 1e-4, 1e-6);
        let mut lr = 1.0;
        for (metric, want) in [(1.0, 1.0), (0.9, 1.0), (0.95, 1.0), (0.92, 1.0), (0.91, 0.1), (0.99, 0.1), (0.5, 0.1)] {
            lr = p.step(metric, lr);
            assert!((lr - want).abs() < 1e-12, "metric {metric}: lr {lr}, want {want}");
        }
    }
}
