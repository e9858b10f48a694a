//! Frozen parameters (`TrainConfig::frozen`): which parameters a run trains, and the guard
//! that makes the others constants for the length of a run.

use stride_autograd::Var;
use stride_nn::{Module, Slot};

use crate::{Result, TrainError};

/// Every parameter with its dotted name, in `visit` order.
fn named_parameters(model: &mut dyn Module) -> Vec<(String, Var)> {
    let mut named = Vec::new();
    model.visit("", &mut |name, slot| {
        if let Slot::Param(v) = slot {
            named.push((name, v.clone()));
        }
    });
    named
}

/// A parameter's dotted name is under `prefix` (itself, or a path inside it).
fn under(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// (the parameters to train, in `visit` order; the frozen ones) for the prefixes of
/// [`TrainConfig::frozen`](crate::TrainConfig::frozen). A prefix that names no parameter, or
/// freezing every one, is refused.
pub fn split_frozen(model: &mut dyn Module, frozen: &[String]) -> Result<(Vec<Var>, Vec<Var>)> {
    let named = named_parameters(model);
    if let Some(p) = frozen.iter().find(|p| !named.iter().any(|(n, _)| under(n, p))) {
        let mut tops: Vec<&str> = named.iter().map(|(n, _)| n.split('.').next().unwrap_or(n)).collect();
        tops.dedup();
        return Err(TrainError::Config(format!("no parameter to freeze under '{p}'; the model's top-level names are {}", tops.join(", "))));
    }
    let (cold, warm): (Vec<_>, Vec<_>) = named.into_iter().partition(|(n, _)| frozen.iter().any(|p| under(n, p)));
    if warm.is_empty() && !cold.is_empty() {
        return Err(TrainError::Config(format!("freezing {} leaves no parameter to train", frozen.join(", "))));
    }
    Ok((warm.into_iter().map(|(_, v)| v).collect(), cold.into_iter().map(|(_, v)| v).collect()))
}

/// The prefixes [`TrainConfig::frozen`](crate::TrainConfig::frozen) needs so that only the
/// parameters under `train_only` train: for every other parameter, the shortest dotted prefix
/// of its name with no trained parameter under it (ResNet-18 with `fc`: conv1, bn1, layer1,
/// layer2, layer3, layer4). Each prefix of `train_only` must name at least one parameter.
pub fn freeze_all_but(model: &mut dyn Module, train_only: &[String]) -> Result<Vec<String>> {
    let names: Vec<String> = named_parameters(model).into_iter().map(|(n, _)| n).collect();
    if let Some(p) = train_only.iter().find(|p| !names.iter().any(|n| under(n, p))) {
        return Err(TrainError::Config(format!("no parameter to train under '{p}'")));
    }
    let trained = |prefix: &str| names.iter().any(|n| under(n, prefix) && train_only.iter().any(|p| under(n, p)));
    let mut out: Vec<String> = Vec::new();
    for n in names.iter().filter(|n| !train_only.iter().any(|p| under(n, p))) {
        let cuts = n.match_indices('.').map(|(i, _)| i).chain([n.len()]);
        let prefix = cuts.map(|i| &n[..i]).find(|p| !trained(p)).unwrap_or(n);
        if !out.iter().any(|o| o == prefix) {
            out.push(prefix.to_string());
        }
    }
    Ok(out)
}

/// Frozen parameters for the length of a run: made constants, and parameters again when it
/// ends however it ends.
pub(crate) struct Frozen(Vec<Var>);

impl Frozen {
    pub(crate) fn new(vars: Vec<Var>) -> Result<Frozen> {
        for v in &vars {
            v.set_requires_grad(false)?;
            v.zero_grad();
        }
        Ok(Frozen(vars))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for v in &self.0 {
            // Each was a leaf when frozen, so this cannot fail.
            let _ = v.set_requires_grad(true);
        }
    }
}
