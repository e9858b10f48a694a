//! Models as data: a CNN described in a TOML file as a list of layers, so command-line users
//! can define their own network without Rust. Input channels and features are inferred by
//! running a zero batch through each layer as it is built, so a file only states what it
//! chooses. Every error names the file, the layer and the field.
//!
//! ```toml
//! [[layers]]
//! type = "conv2d"
//! out_channels = 20
//! kernel = 3
//! [[layers]]
//! type = "relu"
//! [[layers]]
//! type = "max_pool2d"
//! kernel = 2
//! [[layers]]
//! type = "flatten"
//! [[layers]]
//! type = "linear"
//! out_features = "classes"
//! ```
//! Blocks: `type = "residual"` with `layers = [...]` (and optionally `shortcut = [...]`), and
//! `type = "concat"` with `branches = [[...], [...]]`, each entry an inline table as above.

use stride_autograd::{no_grad, Conv2dOptions, Error, Padding, Pool2dOptions, Rng, Tensor, Unary, Var};
use stride_nn::blocks::{Concat, ConvTranspose2d, DepthwiseSeparableConv2d, Dropout2d, OtherPool, Pad, Residual};
use stride_nn::layers::{Activation, BatchNorm, Conv2d, Dropout, Flatten, Linear, Pool, Sequential};
use stride_nn::{Ctx, Module, Result};
use toml::{Table, Value};

use crate::InputSpec;

/// The largest sizes a file may ask for (a typo must not allocate terabytes).
const MAX_CHANNELS: usize = 1 << 16;
const MAX_LAYERS: usize = 10_000;
/// The most parameters a model file may declare in all, and the most values one layer's output
/// may hold for one image: 2^28 each (1 GiB of f32), far above the zoo's largest (VGG-16, 138M
/// parameters). Both are checked before anything is allocated.
const MAX_PARAMS: u128 = 1 << 28;
const MAX_ACTIVATION: u128 = 1 << 28;
/// The most multiply-adds one layer may cost per image (2^36, about 30 s of one core; VGG-16's
/// largest layer costs 1.8e9). Building a model runs it once, so this bounds the build's time.
const MAX_MACS: u128 = 1 << 36;

/// Fails when `n` exceeds `max`, naming what was asked for.
fn within(f: &Fields, what: &str, n: u128, max: u128) -> Result<()> {
    if n > max {
        return Err(f.err(format!("{what} would be {n}, more than the {max} a model file may ask for")));
    }
    Ok(())
}

/// Rows and columns a convolution's padding adds, at most.
fn pad_hw(p: Padding, reach: usize) -> (usize, usize) {
    match p {
        Padding::Valid => (0, 0),
        Padding::Same | Padding::SameLower => (reach, reach),
        Padding::Explicit { top, bottom, left, right } => (top + bottom, left + right),
    }
}

struct Fields<'a> {
    t: &'a Table,
    at: String,
}

impl Fields<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> stride_nn::Error {
        Error::arg("model file", format!("{}: {msg}", self.at)).into()
    }
    fn usize_or(&self, key: &str, default: Option<usize>, max: usize) -> Result<usize> {
        match self.t.get(key) {
            None => default.ok_or_else(|| self.err(format!("field '{key}' is required"))),
            Some(Value::Integer(v)) if *v >= 1 && (*v as u64) <= max as u64 => Ok(*v as usize),
            Some(v) => Err(self.err(format!("field '{key}' must be an integer from 1 to {max}, got {v}"))),
        }
    }
    fn f64_or(&self, key: &str, default: f64, range: std::ops::RangeInclusive<f64>) -> Result<f64> {
        let v = match self.t.get(key) {
            None => return Ok(default),
            Some(Value::Float(f)) => *f,
            Some(Value::Integer(i)) => *i as f64,
            Some(v) => return Err(self.err(format!("field '{key}' must be a number, got {v}"))),
        };
        if !range.contains(&v) {
            return Err(self.err(format!("field '{key}' must be in [{}, {}], got {v}", range.start(), range.end())));
        }
        Ok(v)
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.t.get(key) {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("field '{key}' must be true or false, got {v}"))),
        }
    }
    fn padding(&self) -> Result<Padding> {
        match self.t.get("padding") {
            None => Ok(Padding::Valid),
            Some(Value::String(s)) if s == "valid" => Ok(Padding::Valid),
            Some(Value::String(s)) if s == "same" => Ok(Padding::Same),
            Some(Value::Integer(p)) if (0..=1024).contains(p) => Ok(Padding::uniform(*p as usize)),
            Some(Value::Array(a)) if a.len() == 4 => {
                let v: Vec<usize> = a.iter().filter_map(|x| x.as_integer()).filter(|x| (0..=1024).contains(x)).map(|x| x as usize).collect();
                if v.len() != 4 {
                    return Err(self.err("field 'padding' as a list needs four integers [top, bottom, left, right] from 0 to 1024"));
                }
                Ok(Padding::Explicit { top: v[0], bottom: v[1], left: v[2], right: v[3] })
            }
            Some(v) => Err(self.err(format!("field 'padding' must be \"valid\", \"same\", an integer or [top, bottom, left, right], got {v}"))),
        }
    }
    fn list(&self, key: &str) -> Result<&[Value]> {
        match self.t.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(v) => Err(self.err(format!("field '{key}' must be a list of layers, got {v}"))),
            None => Err(self.err(format!("field '{key}' is required"))),
        }
    }
    /// Fails on any field outside `known` (a typo must not be silently ignored).
    fn only(&self, known: &[&str]) -> Result<()> {
        if let Some(k) = self.t.keys().find(|k| *k != "type" && !known.contains(&k.as_str())) {
            let list = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            return Err(self.err(format!("unknown field '{k}' (this layer takes: {list})")));
        }
        Ok(())
    }
}

fn conv_opts(f: &Fields) -> Result<Conv2dOptions> {
    let stride = f.usize_or("stride", Some(1), 64)?;
    let dilation = f.usize_or("dilation", Some(1), 64)?;
    let groups = f.usize_or("groups", Some(1), MAX_CHANNELS)?;
    let mut o = Conv2dOptions::default().stride(stride).dilation(dilation).groups(groups).padding(f.padding()?);
    if let Some(op) = f.t.get("output_padding") {
        let Some(v) = op.as_integer().filter(|v| (0..64).contains(v)) else {
            return Err(f.err(format!("field 'output_padding' must be an integer from 0 to 63, got {op}")));
        };
        o = o.output_padding(v as usize);
    }
    Ok(o)
}

fn pool_opts(f: &Fields) -> Result<Pool2dOptions> {
    let k = f.usize_or("kernel", None, 64)?;
    let s = f.usize_or("stride", Some(k), 64)?;
    Ok(Pool2dOptions::new(k)
        .stride(s)
        .padding(f.padding()?)
        .ceil_mode(f.bool_or("ceil_mode", false)?)
        .count_include_pad(f.bool_or("count_include_pad", true)?))
}

/// Builds one layer for an input of `shape` ([C, H, W] or [F], without the batch).
/// Parameters the file has declared so far, against [`MAX_PARAMS`].
struct Budget(u128);

fn layer(item: &Value, at: String, rng: &mut Rng, shape: &[usize], classes: usize, depth: usize, budget: &mut Budget) -> Result<Box<dyn Module>> {
    let Some(t) = item.as_table() else {
        return Err(Error::arg("model file", format!("{at}: expected a table with a 'type', got {item}")).into());
    };
    let kind = match t.get("type") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(Error::arg("model file", format!("{at}: field 'type' (a string such as \"conv2d\") is required")).into()),
    };
    let f = Fields { t, at: format!("{at} ({kind})") };
    let channels = || -> Result<usize> {
        match shape {
            [c, _, _] => Ok(*c),
            _ => Err(f.err(format!("needs an image input [C, H, W], but the previous layer gives {shape:?}"))),
        }
    };
    let act = |u: Unary| -> Result<Box<dyn Module>> {
        f.only(&[])?;
        Ok(Box::new(Activation(u)))
    };
    Ok(match kind {
        "conv2d" | "conv_transpose2d" | "separable_conv2d" => {
            f.only(&["out_channels", "kernel", "stride", "padding", "dilation", "groups", "bias", "output_padding"])?;
            let (cin, cout, k) = (channels()?, f.usize_or("out_channels", None, MAX_CHANNELS)?, f.usize_or("kernel", None, 64)?);
            let (opts, bias) = (conv_opts(&f)?, f.bool_or("bias", true)?);
            // Sizes first: the weights this asks for and the largest output it can give.
            let (h, w) = (shape[1] as u128, shape[2] as u128);
            let (cin_, cout_, k_, g) = (cin as u128, cout as u128, k as u128, opts.groups.max(1) as u128);
            let reach = opts.dilation.0 * (k - 1);
            let (ph, pw) = pad_hw(opts.padding, reach);
            let (params, out) = match kind {
                "conv2d" => (cout_ * (cin_ / g) * k_ * k_ + cout_, cout_ * (h + ph as u128) * (w + pw as u128)),
                "conv_transpose2d" => {
                    let grow = |n: u128| n * opts.stride.0 as u128 + reach as u128 + 1 + opts.output_padding.0 as u128;
                    (cin_ * (cout_ / g) * k_ * k_ + cout_, cout_ * grow(h) * grow(w))
                }
                _ => (cin_ * k_ * k_ + cin_ * cout_ + cin_ + cout_, (cin_ + cout_) * (h + ph as u128) * (w + pw as u128)),
            };
            budget.0 += params;
            within(&f, "the model's parameter count", budget.0, MAX_PARAMS)?;
            within(&f, "the output per image", out, MAX_ACTIVATION)?;
            // Each output value costs at most (cin / groups) * k * k multiply-adds.
            let per_out = if kind == "separable_conv2d" { (k_ * k_).max(cin_) } else { (cin_ / g).max(1) * k_ * k_ };
            within(&f, "the multiply-adds per image", out * per_out, MAX_MACS)?;
            match kind {
                "conv2d" => Box::new(Conv2d::new(rng, cin, cout, k, opts, bias).map_err(|e| e.context(f.at.clone()))?),
                "conv_transpose2d" => Box::new(ConvTranspose2d::new(rng, cin, cout, k, opts, bias).map_err(|e| e.context(f.at.clone()))?),
                _ => Box::new(DepthwiseSeparableConv2d::new(rng, cin, cout, k, opts, bias).map_err(|e| e.context(f.at.clone()))?),
            }
        }
        "linear" => {
            f.only(&["out_features", "bias"])?;
            let [fin] = shape else {
                return Err(f.err(format!("needs a flat input [F] (add a flatten layer before it), but the previous layer gives {shape:?}")));
            };
            let out = match t.get("out_features") {
                Some(Value::String(s)) if s == "classes" => classes,
                _ => f.usize_or("out_features", None, 1 << 20)?,
            };
            budget.0 += (*fin as u128 + 1) * out as u128;
            within(&f, "the model's parameter count", budget.0, MAX_PARAMS)?;
            Box::new(Linear::new(rng, *fin, out, f.bool_or("bias", true)?)?)
        }
        "batch_norm" => {
            f.only(&[])?;
            let c = *shape.first().ok_or_else(|| f.err("needs an input with channels"))?;
            Box::new(BatchNorm::new(c)?)
        }
        "relu" => act(Unary::Relu)?,
        "relu6" => act(Unary::Relu6)?,
        "elu" => act(Unary::Elu(1.0))?,
        "selu" => act(Unary::Selu)?,
        "gelu" => act(Unary::Gelu)?,
        "silu" => act(Unary::Silu)?,
        "hardswish" => act(Unary::HardSwish)?,
        "tanh" => act(Unary::Tanh)?,
        "sigmoid" => act(Unary::Sigmoid)?,
        "softplus" => act(Unary::Softplus { beta: 1.0, threshold: 20.0 })?,
        "leaky_relu" => {
            f.only(&["slope"])?;
            Box::new(Activation(Unary::LeakyRelu(f.f64_or("slope", 0.01, 0.0..=1.0)?)))
        }
        "max_pool2d" | "avg_pool2d" => {
            f.only(&["kernel", "stride", "padding", "ceil_mode", "count_include_pad"])?;
            let o = pool_opts(&f)?;
            Box::new(if kind == "max_pool2d" { Pool::Max(o) } else { Pool::Avg(o) })
        }
        "lp_pool2d" => {
            f.only(&["p", "kernel", "stride", "padding", "ceil_mode"])?;
            Box::new(OtherPool::Lp(f.f64_or("p", 2.0, 1.0..=64.0)?, pool_opts(&f)?))
        }
        "adaptive_avg_pool2d" | "adaptive_max_pool2d" => {
            f.only(&["size"])?;
            let s = f.usize_or("size", None, 4096)?;
            within(&f, "the output per image", channels()? as u128 * (s * s) as u128, MAX_ACTIVATION)?;
            Box::new(if kind == "adaptive_avg_pool2d" { OtherPool::AdaptiveAvg(s, s) } else { OtherPool::AdaptiveMax(s, s) })
        }
        "global_avg_pool2d" => {
            f.only(&[])?;
            Box::new(OtherPool::GlobalAvg)
        }
        "global_max_pool2d" => {
            f.only(&[])?;
            Box::new(OtherPool::GlobalMax)
        }
        "channel_max_pool" => {
            f.only(&["depth", "stride"])?;
            let d = f.usize_or("depth", None, MAX_CHANNELS)?;
            Box::new(OtherPool::ChannelMax { depth: d, stride: f.usize_or("stride", Some(d), MAX_CHANNELS)? })
        }
        "dropout" | "dropout2d" => {
            f.only(&["p"])?;
            let p = f.f64_or("p", 0.5, 0.0..=1.0)?;
            if kind == "dropout" {
                Box::new(Dropout(p))
            } else {
                Box::new(Dropout2d(p))
            }
        }
        "flatten" => {
            f.only(&[])?;
            Box::new(Flatten)
        }
        "pad" => {
            f.only(&["padding", "value"])?;
            let Padding::Explicit { top, bottom, left, right } = f.padding()? else {
                return Err(f.err("field 'padding' must be an integer or [top, bottom, left, right]"));
            };
            let [c, h, w] = shape else {
                return Err(f.err(format!("needs an image input [C, H, W], but the previous layer gives {shape:?}")));
            };
            within(&f, "the output per image", *c as u128 * (h + top + bottom) as u128 * (w + left + right) as u128, MAX_ACTIVATION)?;
            Box::new(Pad { pad: (top, bottom, left, right), value: f.f64_or("value", 0.0, f64::MIN..=f64::MAX)? })
        }
        "residual" => {
            f.only(&["layers", "shortcut"])?;
            let (body, _) = sequence(f.list("layers")?, &format!("{}, body ", f.at), rng, shape, classes, depth + 1, budget)?;
            let shortcut = match t.get("shortcut") {
                Some(_) => {
                    let (s, _) = sequence(f.list("shortcut")?, &format!("{}, shortcut ", f.at), rng, shape, classes, depth + 1, budget)?;
                    Some(Box::new(s) as Box<dyn Module>)
                }
                None => None,
            };
            Box::new(Residual::new(Box::new(body), shortcut))
        }
        "concat" => {
            f.only(&["branches"])?;
            let mut branches: Vec<Box<dyn Module>> = Vec::new();
            let mut total: u128 = 0;
            for (i, b) in f.list("branches")?.iter().enumerate() {
                let Some(items) = b.as_array() else {
                    return Err(f.err(format!("branch {i} must be a list of layers")));
                };
                let (seq, out) = sequence(items, &format!("{}, branch {i} ", f.at), rng, shape, classes, depth + 1, budget)?;
                total += out.iter().map(|&d| d as u128).product::<u128>();
                within(&f, "the concatenated output per image", total, MAX_ACTIVATION)?;
                branches.push(Box::new(seq));
            }
            if branches.is_empty() {
                return Err(f.err("field 'branches' needs at least one branch"));
            }
            Box::new(Concat::new(branches))
        }
        other => return Err(Error::arg("model file", format!("{at}: unknown layer type '{other}'")).into()),
    })
}

/// Builds a list of layers, tracking the shape through each; returns the output shape too.
fn sequence(
    items: &[Value],
    prefix: &str,
    rng: &mut Rng,
    input: &[usize],
    classes: usize,
    depth: usize,
    budget: &mut Budget,
) -> Result<(Sequential, Vec<usize>)> {
    if depth > 32 || items.len() > MAX_LAYERS {
        return Err(Error::arg("model file", format!("{prefix}: blocks nested deeper than 32 or more than {MAX_LAYERS} layers")).into());
    }
    let mut seq = Sequential::new();
    let mut shape = input.to_vec();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{prefix}layer {i}");
        let mut l = layer(item, at.clone(), rng, &shape, classes, depth, budget)?;
        let mut dims = vec![1];
        dims.extend(&shape);
        let x = Var::constant(Tensor::zeros(&dims)?);
        let y = no_grad(|| l.forward(&x, &mut Ctx::eval())).map_err(|e| e.context(format!("{at} ({})", l.describe())))?;
        shape = y.shape()[1..].to_vec();
        seq = seq.push_boxed(l);
    }
    Ok((seq, shape))
}

/// Builds the network a TOML model file describes, for images of `spec`. `file` names the
/// file in errors.
pub fn from_toml(file: &str, text: &str, rng: &mut Rng, spec: InputSpec) -> Result<Sequential> {
    let doc: Table = text.parse().map_err(|e: toml::de::Error| Error::arg("model file", format!("{file}: not valid TOML: {}", e.message())))?;
    if let Some(k) = doc.keys().find(|k| *k != "layers" && *k != "name") {
        return Err(Error::arg("model file", format!("{file}: unknown top-level key '{k}' (expected 'name' and 'layers')")).into());
    }
    let Some(Value::Array(items)) = doc.get("layers") else {
        return Err(Error::arg("model file", format!("{file}: needs a list of layers ([[layers]] tables)")).into());
    };
    if items.is_empty() {
        return Err(Error::arg("model file", format!("{file}: the list of layers is empty")).into());
    }
    Ok(sequence(items, &format!("{file}: "), rng, &[spec.channels, spec.height, spec.width], spec.classes, 0, &mut Budget(0))?.0)
}
