//! A device backend checked against the CPU: one small case per primitive, forward and
//! backward, on random inputs. `stride devices --check` runs it on a GPU; the tests run it on a
//! [`HostMirror`](crate::device::HostMirror), where the results must be identical.

use stride_kernels::conv::{Conv2dOptions, Padding};
use stride_kernels::pool::Pool2dOptions;
use stride_tensor::{Device, Elem, Result, Rng, Tensor};

use crate::device::{self, ToDevice, Update};
use crate::ops::norm::BatchNormOptions;
use crate::*;

/// How far one primitive's results on a device are from the CPU's: the largest difference of
/// any element, relative to the largest magnitude of the CPU's tensor (at least 1e-30).
#[derive(Clone, Debug, PartialEq)]
pub struct Agreement {
    /// The primitive the case exercises (its name in [`crate::PRIMITIVES`]), or `sgd_update`,
    /// `adam_update` or `rmsprop_update` for an optimizer's update.
    pub primitive: &'static str,
    /// Which of several cases of one primitive this is (the convolutions' geometries, which a
    /// backend may route differently); empty for the one case of the others.
    pub case: &'static str,
    pub forward: f64,
    /// Over every input's gradient.
    pub backward: f64,
}

/// A function of the case's inputs.
type Net<T> = dyn Fn(&[Var<T>]) -> Result<Var<T>>;
type Case<T> = (&'static str, Vec<Tensor<T>>, Box<Net<T>>);
/// A case with a label: one of several of its primitive.
type Labelled<T> = (&'static str, &'static str, Vec<Tensor<T>>, Box<Net<T>>);

/// One case per primitive (reshape, which shares storage on any device, rides along in others).
fn cases<T: Elem>() -> Result<Vec<Case<T>>> {
    let mut rng = Rng::seed(7);
    let mut r = |s: &[usize]| rng.normal::<T>(s, 0.0, 1.0);
    let conv = Conv2dOptions { stride: (2, 1), padding: Padding::Same, dilation: (1, 2), groups: 2, output_padding: (0, 0) };
    let tconv = Conv2dOptions {
        stride: (2, 2),
        padding: Padding::Explicit { top: 1, bottom: 0, left: 0, right: 1 },
        dilation: (1, 1),
        groups: 1,
        output_padding: (1, 0),
    };
    let pool = Pool2dOptions {
        kernel: (3, 2),
        stride: Some((2, 2)),
        padding: Padding::Explicit { top: 1, bottom: 1, left: 0, right: 0 },
        ceil_mode: true,
        ..Pool2dOptions::new(3)
    };
    let positive = r(&[2, 3])?.map(|v| v.abs() + T::c(0.5));
    Ok(vec![
        ("add", vec![r(&[2, 3, 4])?, r(&[3, 1])?], Box::new(|v| v[0].add(&v[1]))),
        ("sub", vec![r(&[2, 3])?, r(&[2, 3])?], Box::new(|v| v[0].sub(&v[1]))),
        ("mul", vec![r(&[2, 3])?, r(&[1, 3])?], Box::new(|v| v[0].mul(&v[1]))),
        ("div", vec![r(&[2, 3])?, positive], Box::new(|v| v[0].div(&v[1]))),
        (
            "unary",
            vec![r(&[4, 5])?],
            Box::new(|v| {
                v[0].elu()?.add(&v[0].relu()?)?.tanh()?.softplus()?.sigmoid()?.erf()?.mul_scalar(3.0)?.gelu()?.silu()?.square()?.sin()?.cos()
            }),
        ),
        ("sum", vec![r(&[2, 3, 4])?], Box::new(|v| v[0].sum(&[0, 2], true))),
        ("max", vec![r(&[3, 5])?], Box::new(|v| v[0].max(1, false))),
        ("permute", vec![r(&[2, 3, 4])?], Box::new(|v| v[0].permute(&[2, 0, 1])?.reshape(&[4, 6]))),
        ("narrow", vec![r(&[3, 6])?], Box::new(|v| v[0].narrow(1, 2, 3))),
        ("pad", vec![r(&[1, 2, 3, 3])?], Box::new(|v| v[0].pad(&[(1, 0), (2, 1)], 0.5))),
        ("concat", vec![r(&[2, 1, 3])?, r(&[2, 2, 3])?], Box::new(|v| concat(&[&v[0], &v[1]], 1))),
        ("upsample_nearest2d", vec![r(&[1, 2, 2, 3])?], Box::new(|v| v[0].upsample_nearest2d((2, 3)))),
        ("matmul", vec![r(&[3, 4])?, r(&[4, 2])?, r(&[5, 4])?], Box::new(|v| v[0].matmul(&v[1])?.add(&v[0].matmul_t(&v[2])?.narrow(1, 0, 2)?))),
        ("conv2d", vec![r(&[2, 4, 5, 6])?, r(&[6, 2, 3, 2])?, r(&[6])?], Box::new(move |v| conv2d(&v[0], &v[1], Some(&v[2]), &conv))),
        (
            "conv_transpose2d",
            vec![r(&[2, 3, 3, 4])?, r(&[3, 2, 3, 3])?, r(&[2])?],
            Box::new(move |v| conv_transpose2d(&v[0], &v[1], Some(&v[2]), &tconv)),
        ),
        ("max_pool2d", vec![r(&[2, 2, 7, 6])?], Box::new(move |v| max_pool2d(&v[0], &pool))),
        ("avg_pool2d", vec![r(&[2, 2, 7, 6])?], Box::new(move |v| avg_pool2d(&v[0], &pool))),
        ("lp_pool2d", vec![r(&[1, 2, 6, 6])?], Box::new(|v| lp_pool2d(&v[0], 2.0, &Pool2dOptions::new(2)))),
        ("adaptive_avg_pool2d", vec![r(&[2, 3, 7, 5])?], Box::new(|v| adaptive_avg_pool2d(&v[0], (3, 2)))),
        ("adaptive_max_pool2d", vec![r(&[2, 3, 7, 5])?], Box::new(|v| adaptive_max_pool2d(&v[0], (2, 3)))),
        ("channel_max_pool", vec![r(&[2, 5, 3, 3])?], Box::new(|v| channel_max_pool(&v[0], 3, 2))),
        ("batch_norm", vec![r(&[4, 3, 2, 2])?, r(&[3])?, r(&[3])?], Box::new(|v| batch_norm_both_modes(v))),
        ("softmax", vec![r(&[3, 4])?], Box::new(|v| softmax(&v[0], 1))),
        ("log_softmax", vec![r(&[3, 4])?], Box::new(|v| log_softmax(&v[0], 0))),
        ("nll_loss", vec![r(&[3, 4])?], Box::new(|v| cross_entropy(&v[0], &[1, 3, 0], 0.1))),
    ])
}

/// More convolutions: the geometries of LeNet, ResNet, MobileNet and the VAE, which a GPU
/// backend may send down different routes (cuDNN, or columns where cuDNN's symmetric padding
/// cannot say the same thing), each checked forward and backward.
fn convolution_cases<T: Elem>() -> Result<Vec<Labelled<T>>> {
    let mut rng = Rng::seed(17);
    let mut r = |s: &[usize]| rng.normal::<T>(s, 0.0, 1.0);
    let o = Conv2dOptions::default;
    let conv = |label, x, w, bias: Option<Tensor<T>>, opts: Conv2dOptions| {
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        let net: Box<Net<T>> = Box::new(move |v: &[Var<T>]| conv2d(&v[0], &v[1], v.get(2), &opts));
        ("conv2d", label, inputs, net)
    };
    let tconv = |label, x, w, opts: Conv2dOptions| {
        let net: Box<Net<T>> = Box::new(move |v: &[Var<T>]| conv_transpose2d(&v[0], &v[1], None, &opts));
        ("conv_transpose2d", label, vec![x, w], net)
    };
    Ok(vec![
        conv("5x5 valid, bias (LeNet)", r(&[2, 3, 9, 9])?, r(&[4, 3, 5, 5])?, Some(r(&[4])?), o()),
        conv("3x3 pad 1, bias", r(&[2, 8, 6, 6])?, r(&[8, 8, 3, 3])?, Some(r(&[8])?), o().padding(Padding::uniform(1))),
        conv("3x3 stride 2 pad 1 (ResNet)", r(&[2, 4, 7, 7])?, r(&[6, 4, 3, 3])?, None, o().stride(2).padding(Padding::uniform(1))),
        conv("1x1 stride 2 (ResNet shortcut)", r(&[2, 4, 6, 6])?, r(&[6, 4, 1, 1])?, None, o().stride(2)),
        conv("3x3 depthwise same", r(&[2, 4, 5, 5])?, r(&[4, 1, 3, 3])?, None, o().padding(Padding::Same).groups(4)),
        conv("3x3 same stride 2, even size", r(&[1, 2, 6, 6])?, r(&[3, 2, 3, 3])?, None, o().stride(2).padding(Padding::Same)),
        tconv("4x4 from 1x1 (VAE)", r(&[2, 5, 1, 1])?, r(&[5, 3, 4, 4])?, o()),
        tconv("4x4 stride 2 pad 1 (VAE)", r(&[2, 4, 3, 3])?, r(&[4, 3, 4, 4])?, o().stride(2).padding(Padding::uniform(1))),
        tconv("4x4 same (VAE)", r(&[2, 4, 4, 4])?, r(&[4, 3, 4, 4])?, o().padding(Padding::Same)),
        tconv(
            "3x3 stride 2 pad 1 output padding 1, groups 2",
            r(&[2, 4, 3, 3])?,
            r(&[4, 2, 3, 3])?,
            o().stride(2).padding(Padding::uniform(1)).output_padding(1).groups(2),
        ),
    ])
}

/// Training-mode batch norm, then an eval-mode pass with the running statistics it moved (so
/// they are checked too), summed.
fn batch_norm_both_modes<T: Elem>(v: &[Var<T>]) -> Result<Var<T>> {
    let dev = v[0].device();
    let (mut rm, mut rv) = (Tensor::zeros(&[3])?.to(dev)?, Tensor::ones(&[3])?.to(dev)?);
    let t = batch_norm(&v[0], &v[1], &v[2], &mut rm, &mut rv, true, BatchNormOptions::default())?;
    for s in [&rm, &rv] {
        if s.device() != dev {
            stride_tensor::bail!(device, "batch_norm", "running statistics moved to {}, the input is on {dev}", s.device());
        }
    }
    let e = batch_norm(&v[0], &v[1], &v[2], &mut rm, &mut rv, false, BatchNormOptions::default())?;
    t.add(&e)
}

/// Output and input gradients of `f` with the inputs on `dev`, read back to the host.
fn run<T: Elem>(inputs: &[Tensor<T>], dev: Device, f: &Net<T>) -> Result<(Tensor<T>, Vec<Tensor<T>>)> {
    let vars = inputs.iter().map(|t| Ok(Var::parameter(t.to(dev)?))).collect::<Result<Vec<Var<T>>>>()?;
    let out = f(&vars)?;
    let weights = Rng::seed(3).normal::<T>(&out.shape(), 0.0, 1.0)?;
    out.backward_with(weights)?;
    let mut grads = Vec::new();
    for v in &vars {
        let g = v.grad().ok_or_else(|| Error::device("conformance", "an input got no gradient"))?;
        for (what, t) in [("result", out.value()), ("gradient", g.clone())] {
            if t.device() != dev {
                stride_tensor::bail!(device, "conformance", "a {what} landed on {}, the inputs are on {dev}", t.device());
            }
        }
        grads.push(g.to_host()?);
    }
    Ok((out.value().to_host()?, grads))
}

fn relative<T: Elem>(have: &Tensor<T>, want: &Tensor<T>) -> f64 {
    if have.shape() != want.shape() {
        return f64::INFINITY;
    }
    let scale = want.data().iter().fold(1e-30f64, |m, v| m.max(v.as_f64().abs()));
    have.data().iter().zip(want.data()).fold(0.0f64, |m, (a, b)| {
        let d = (a.as_f64() - b.as_f64()).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d / scale)
        }
    })
}

/// Runs every case on the CPU and on `device` and reports how far apart they are. An error
/// from the device (a missing kernel, a device fault) is returned with the primitive named.
pub fn check<T: Elem>(device: Device) -> Result<Vec<Agreement>> {
    let mut out = Vec::new();
    let labelled = cases::<T>()?.into_iter().map(|(name, inputs, f)| (name, "", inputs, f));
    for (name, case, inputs, f) in labelled.chain(convolution_cases::<T>()?) {
        let (y_cpu, g_cpu) = run(&inputs, Device::Cpu, f.as_ref())?;
        let what = if case.is_empty() { name.to_string() } else { format!("{name} ({case})") };
        let (y_dev, g_dev) = run(&inputs, device, f.as_ref()).map_err(|e| Error::device("conformance", format!("{what} on {device}: {e}")))?;
        let backward = g_cpu.iter().zip(&g_dev).fold(0.0f64, |m, (a, b)| m.max(relative(b, a)));
        out.push(Agreement { primitive: name, case, forward: relative(&y_dev, &y_cpu), backward });
    }
    // The optimizers' updates (not primitives, but run by the backend too): the new weight as
    // "forward", the new state as "backward".
    let mut rng = Rng::seed(11);
    let (w, g) = (rng.normal::<T>(&[7, 9], 0.0, 1.0)?, rng.normal::<T>(&[7, 9], 0.0, 1.0)?);
    let momentum = rng.normal::<T>(&[7, 9], 0.0, 0.1)?;
    let moments = [rng.normal::<T>(&[7, 9], 0.0, 0.1)?, rng.uniform::<T>(&[7, 9], 0.0, 0.1)?];
    let sgd = Update::Sgd { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4, first: false };
    let adam = Update::Adam { lr: 1e-3, betas: (0.9, 0.999), c1: 0.19, c2: 0.002, eps: 1e-8, weight_decay: 1e-2, decoupled: true };
    let rmsprop = Update::RmsProp { lr: 1e-2, alpha: 0.99, eps: 1e-8, momentum: 0.9, weight_decay: 1e-3 };
    let (square, buffer) = (rng.uniform::<T>(&[7, 9], 0.0, 0.1)?, rng.normal::<T>(&[7, 9], 0.0, 0.1)?);
    for (name, rule, state) in
        [("sgd_update", sgd, vec![momentum]), ("adam_update", adam, moments.to_vec()), ("rmsprop_update", rmsprop, vec![square, buffer])]
    {
        let (w_cpu, s_cpu) = device::update(Device::Cpu, &rule, &w, &g, &state)?;
        let moved = |t: &Tensor<T>| t.to(device);
        let (w_dev, s_dev) = device::update(device, &rule, &moved(&w)?, &moved(&g)?, &state.iter().map(moved).collect::<Result<Vec<_>>>()?)
            .map_err(|e| Error::device("conformance", format!("{name} on {device}: {e}")))?;
        let backward =
            s_cpu.iter().zip(&s_dev).map(|(a, b)| Ok(relative(&b.to_host()?, a))).collect::<Result<Vec<f64>>>()?.into_iter().fold(0.0, f64::max);
        out.push(Agreement { primitive: name, case: "", forward: relative(&w_dev.to_host()?, &w_cpu), backward });
    }
    // An optimizer's step over many parameters in one call (a GPU updates lists of them per
    // launch): more than one list, empty ones among them, and one larger than a tensor's share
    // of a launch's blocks (its threads loop), each against the CPU's update of it alone.
    let sizes = (0..37).map(|i| [5, 0, 1, 257, 300][i % 5]).chain([300_000]);
    let params = sizes
        .map(|n| {
            Ok([
                rng.normal::<T>(&[n], 0.0, 1.0)?,
                rng.normal::<T>(&[n], 0.0, 1.0)?,
                rng.normal::<T>(&[n], 0.0, 0.1)?,
                rng.uniform::<T>(&[n], 0.0, 0.1)?,
            ])
        })
        .collect::<Result<Vec<_>>>()?;
    let on_dev = params.iter().map(|p| p.iter().map(|t| t.to(device)).collect::<Result<Vec<_>>>()).collect::<Result<Vec<_>>>()?;
    let items = on_dev.iter().map(|p| (&p[0], &p[1], &p[2..])).collect::<Vec<_>>();
    let updated =
        device::update_many(device, &adam, &items).map_err(|e| Error::device("conformance", format!("adam_update of a list on {device}: {e}")))?;
    let (mut forward, mut backward) = (0.0f64, 0.0f64);
    for (p, (w_dev, s_dev)) in params.iter().zip(&updated) {
        let (w_cpu, s_cpu) = device::update(Device::Cpu, &adam, &p[0], &p[1], &p[2..])?;
        forward = forward.max(relative(&w_dev.to_host()?, &w_cpu));
        for (a, b) in s_cpu.iter().zip(s_dev) {
            backward = backward.max(relative(&b.to_host()?, a));
        }
    }
    out.push(Agreement { primitive: "adam_update", case: "38 tensors at once, 0 to 300,000 elements", forward, backward });
    Ok(out)
}
