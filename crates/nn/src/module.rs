//! The `Module` trait: forward, and one way to visit named parameters and buffers.

use stride_autograd::{tape_bytes, Device, Rng, Tensor, ToDevice, Var};

use crate::export::{Graph, Value};
use crate::trace::{Field, Row, Scratch, Trace};
use crate::Result;

/// What a forward pass needs besides the input: the mode and the random source for dropout.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Training mode: batch norm uses batch statistics and updates running ones; dropout drops.
    pub training: bool,
    pub rng: Rng,
    /// Print each layer's output shape as the data flows (`net(X, debug=True)`).
    pub debug: bool,
    /// When set, every layer leaves a [`Row`] here (`stride summary`).
    pub trace: Option<Trace>,
    /// Synchronised batch norm: training statistics over every process's batch (`--sync-bn`).
    pub sync_bn: Option<stride_autograd::SyncStats>,
    /// Names of the containers and the layer now running, outermost first.
    path: Vec<String>,
}

impl Ctx {
    pub fn train(seed: u64) -> Self {
        Ctx { training: true, rng: Rng::seed(seed), debug: false, trace: None, sync_bn: None, path: Vec::new() }
    }
    pub fn eval() -> Self {
        Ctx { training: false, rng: Rng::seed(0), debug: false, trace: None, sync_bn: None, path: Vec::new() }
    }
    /// The dotted path of the layer now running (`layer1.0.conv1`), as its parameters are named.
    pub fn path(&self) -> String {
        self.path.iter().filter(|p| !p.is_empty()).cloned().collect::<Vec<_>>().join(".")
    }
    /// Records where a block's branches meet (`what`, e.g. `add, relu`, made only when
    /// tracing): the field is the largest of the inputs', the tape bytes those since
    /// `tape_before`. `intermediate` says the merge made one value of the output's size on the
    /// way (the sum before a relu), which inference holds for a moment.
    pub fn record_merge(&mut self, what: impl FnOnce() -> String, inputs: &[&Var], output: &Var, tape_before: u64, intermediate: bool) {
        self.record_step("", what, inputs, output, tape_before, intermediate);
    }
    /// As `record_merge`, for a step a model takes between its layers, named `name` under the
    /// current path (the VAE's sampling of z).
    pub fn record_step(&mut self, name: &str, what: impl FnOnce() -> String, inputs: &[&Var], output: &Var, tape_before: u64, intermediate: bool) {
        if self.trace.is_none() {
            return;
        }
        let path = join(&self.path(), name);
        let Some(t) = self.trace.as_mut() else { return };
        let field = inputs.iter().map(|v| t.field_of(v)).reduce(Field::max).unwrap_or(Field::PIXEL);
        let n = output.shape().first().copied().unwrap_or(1).max(1) as u64;
        let row = Row {
            path,
            layer: what(),
            input: inputs.first().map_or(Vec::new(), |v| v.shape()),
            output: output.shape(),
            params: 0,
            macs: 0,
            scratch: Scratch::per_image(if intermediate { output.shape().iter().skip(1).product::<usize>() as u64 * 4 } else { 0 }),
            field,
            tape_bytes: (tape_bytes() - tape_before) / n,
            inputs: inputs.iter().map(|v| t.producer(v)).collect(),
        };
        t.push(row, output);
    }
}

/// Runs child `m` of a container under `name`: the one place layers are entered, so errors
/// carry the layer's full dotted path (`layer features.20 (MaxPool2d...)`), `--debug` prints
/// every layer's output shape, and a trace gets one row per layer.
pub fn call(m: &mut dyn Module, name: &str, x: &Var, ctx: &mut Ctx) -> Result<Var> {
    ctx.path.push(name.to_string());
    let before = tape_bytes();
    let result = m.forward(x, ctx);
    // The dotted path is joined only when something reads it (an error, --debug, a trace).
    let wanted = !m.is_container() && (result.is_err() || ctx.debug || ctx.trace.is_some());
    let path = if wanted { ctx.path() } else { String::new() };
    ctx.path.pop();
    if m.is_container() {
        if let Some(t) = ctx.trace.as_mut() {
            // The caller holds x until the whole block has run.
            let until = t.rows.len().saturating_sub(1);
            let held = t.producer(x);
            t.holds.push((held, until));
        }
        return result;
    }
    let y = result.map_err(|e| e.context(format!("layer {path} ({})", m.describe())))?;
    if ctx.debug {
        eprintln!("{path:>16} {:<48} -> {:?}", m.describe(), y.shape());
    }
    if let Some(t) = ctx.trace.as_mut() {
        let (input, output) = (x.shape(), y.shape());
        let n = input.first().copied().unwrap_or(1).max(1);
        let row = Row {
            path,
            layer: m.describe(),
            field: m.field(t.field_of(x), &input),
            macs: m.macs(&input, &output) / n as u64,
            params: m.num_parameters(),
            scratch: m.scratch(&input, &output),
            tape_bytes: (tape_bytes() - before) / n as u64,
            inputs: vec![t.producer(x)],
            input,
            output,
        };
        t.push(row, &y);
    }
    Ok(y)
}

/// A named parameter or buffer, as PyTorch's `state_dict` names it (`features.0.weight`).
pub enum Slot<'a> {
    /// Trainable: gradients flow into it.
    Param(&'a Var),
    /// State that is saved but not trained (`bn1.running_mean`).
    Buffer(&'a mut Tensor<f32>),
}

/// A chain's layers and their names.
pub type Chain<'a> = (&'a mut [Box<dyn Module>], &'a [String]);

/// A layer or a network of layers.
pub trait Module {
    fn forward(&mut self, x: &Var, ctx: &mut Ctx) -> Result<Var>;
    /// Calls `f` with the full name and slot of every parameter and buffer, in a fixed order.
    fn visit(&mut self, prefix: &str, f: &mut dyn FnMut(String, Slot<'_>));
    /// A short description for summaries and debug output, e.g. `Conv2d(1, 20, k3)`.
    fn describe(&self) -> String;

    /// Whether this runs other modules (through [`call`]) rather than being one layer.
    fn is_container(&self) -> bool {
        false
    }
    /// For a plain chain of layers (`Sequential`): the layers and their names, so training can
    /// run it in segments (activation recompute).
    fn chain(&mut self) -> Option<Chain<'_>> {
        None
    }
    /// Multiply-adds for one forward pass from `input` to `output` (whole batch).
    fn macs(&self, _input: &[usize], _output: &[usize]) -> u64 {
        0
    }
    /// Memory the forward pass holds besides its input and output. Max pooling keeps its
    /// argmax (per image); convolution its working memory (im2col columns per thread, or
    /// Winograd's transformed filters and tiles).
    fn scratch(&self, _input: &[usize], _output: &[usize]) -> Scratch {
        Scratch::default()
    }
    /// The receptive field after this layer, given the field of its input.
    fn field(&self, input: Field, _input_shape: &[usize]) -> Field {
        input
    }

    /// Writes this layer into `g` as ONNX operators reading `x`, under `name` (its
    /// `state_dict` prefix, so initializers carry the parameters' names), and returns its
    /// output. Layers run forward on `x`'s example value as they write.
    fn export(&mut self, _g: &mut Graph, _name: &str, _x: &Value) -> Result<Value> {
        Err(crate::export::unsupported(&self.describe()))
    }

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
    /// Moves every parameter and buffer to `device` (PyTorch's `model.to(device)`). Parameters
    /// stay the same variables, so an optimizer built on them follows.
    fn to(&mut self, device: Device) -> Result<()> {
        let mut failed = None;
        self.visit("", &mut |name, s| {
            let moved = match s {
                Slot::Param(v) => v.to_device(device),
                Slot::Buffer(t) => t.to(device).map(|m| *t = m),
            };
            if let Err(e) = moved {
                failed.get_or_insert(crate::Error::from(e).context(format!("moving {name} to {device}")));
            }
        });
        failed.map_or(Ok(()), Err)
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

/// The device a model's parameters are on (the CPU for a model without parameters).
pub fn device_of(model: &mut dyn Module) -> Device {
    model.parameters().first().map_or(Device::Cpu, |p| p.device())
}
