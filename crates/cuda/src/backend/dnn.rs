//! Convolution, batch norm and pooling through cuDNN. Convolution: the forward pass, the
//! input's gradient and the filter's, for plain, grouped, dilated and transposed convolution
//! (a transposed convolution is cuDNN's data gradient run forward), when cuDNN can describe the
//! geometry ([`DnnShape::of`]; `conv.rs` pads the image first where only the padding differs);
//! anything else goes through the columns of `conv.rs`, as does every convolution when cuDNN is
//! off. Batch norm: cuDNN's spatial mode forward and backward in training (the running
//! statistics then moved as PyTorch moves them, into new tensors, by a kernel of `norm.rs`),
//! and its forward in evaluation mode. Max and average pooling: `dnn/pool.rs`.
//!
//! [`Cudnn::Fp32`] (`stride --cudnn fp32`) turns it on in FP32 (cuDNN restricted to FMA kernels,
//! so results stay within the CPU's 1e-4); [`Cudnn::Tf32`] lets it use tensor cores in TF32, as
//! PyTorch does by default. It is off unless asked for until `scripts/gpu-check.sh` has passed
//! with it on a GPU (this route has run only on the CPU emulator, `crates/cuda/emulator`, whose
//! cuDNN follows the documentation). Algorithms come from cuDNN's
//! heuristics (PyTorch's default too, `benchmark=False`), once per geometry and pass.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex};

use cudarc::cudnn::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use stride_kernels::conv::ConvGeom;
use stride_tensor::{Error, Result};

use sys::cudnnMathType_t as Math;

use crate::Cudnn;

mod pool;
pub(crate) use pool::PoolShape;

/// The most workspace one algorithm may ask for; faster ones that want more are passed over.
const WORKSPACE_CAP: usize = 1 << 30;

/// One convolution as cuDNN sees it: x [N, C, H, W] (the large side), w [K, C/g, R, S], y [N,
/// K, P, Q] (the small side), symmetric padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DnnShape {
    x: [c_int; 4],
    w: [c_int; 4],
    y: [c_int; 4],
    pad: [c_int; 2],
    stride: [c_int; 2],
    dilation: [c_int; 2],
    groups: c_int,
}

impl DnnShape {
    /// The cuDNN form of `g`, if there is one: no empty side, every size and tensor within
    /// 32-bit ints, and cuDNN's output size with the top and left padding on both sides equal
    /// to `g`'s. (Output row p reads input rows from p*stride - top, so the bottom and right
    /// padding only set how many rows there are; where they change that count cuDNN, which pads
    /// symmetrically, cannot say the same thing.)
    pub(crate) fn of(g: &ConvGeom) -> Option<DnnShape> {
        let i = |v: usize| c_int::try_from(v).ok().filter(|&v| v > 0);
        let (x, w, y) = ([g.n, g.c, g.h, g.w], [g.k, g.cg(), g.r, g.s], [g.n, g.k, g.p, g.q]);
        if !(fits_c_int(x) && fits_c_int(w) && fits_c_int(y)) {
            return None;
        }
        let out = |size: usize, pad: usize, k: usize, dil: usize, stride: usize| {
            let span = (k - 1) * dil + 1;
            (size + 2 * pad).checked_sub(span).map(|room| room / stride + 1)
        };
        if out(g.h, g.pad.0, g.r, g.dilation.0, g.stride.0) != Some(g.p) || out(g.w, g.pad.2, g.s, g.dilation.1, g.stride.1) != Some(g.q) {
            return None;
        }
        let four = |d: [usize; 4]| Some([i(d[0])?, i(d[1])?, i(d[2])?, i(d[3])?]);
        let c = c_int::try_from;
        Some(DnnShape {
            x: four(x)?,
            w: four(w)?,
            y: four(y)?,
            pad: [c(g.pad.0).ok()?, c(g.pad.2).ok()?],
            stride: [i(g.stride.0)?, i(g.stride.1)?],
            dilation: [i(g.dilation.0)?, i(g.dilation.1)?],
            groups: i(g.groups)?,
        })
    }
}

/// Whether a tensor of these dimensions has at most `c_int::MAX` elements (cuDNN counts them in
/// 32-bit ints).
fn fits_c_int(dims: [usize; 4]) -> bool {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_some_and(|n| n <= c_int::MAX as usize)
}

/// The three passes of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Pass {
    /// y from x and w.
    Forward,
    /// x's gradient from y's and w (a transposed convolution's forward pass).
    Data,
    /// w's gradient from x and y's.
    Filter,
}

/// An algorithm cuDNN's heuristics listed: its number in the pass's enum, whether it can run,
/// its workspace and the arithmetic it uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Candidate {
    pub algo: u32,
    pub ok: bool,
    pub memory: usize,
    pub math: Math,
}

/// cuDNN's candidates (best first) that run, fit [`WORKSPACE_CAP`] and keep to FP32 unless TF32
/// is allowed (tensor-op kernels would round the operands to TF32), in cuDNN's order.
pub(crate) fn usable(candidates: &[Candidate], tf32: bool) -> impl Iterator<Item = Candidate> + '_ {
    candidates
        .iter()
        .copied()
        .filter(move |c| c.ok && c.memory <= WORKSPACE_CAP && (tf32 || matches!(c.math, Math::CUDNN_DEFAULT_MATH | Math::CUDNN_FMA_MATH)))
}

/// The algorithm picked for one geometry and pass, with the descriptors it runs with (kept, so
/// a call does not build them again).
struct Choice {
    algo: u32,
    workspace: usize,
    descs: Descs,
}

struct State {
    handle: sys::cudnnHandle_t,
    /// Grown to the largest workspace asked for; every pass is queued on the one stream, so
    /// one buffer serves them all in turn.
    workspace: Option<CudaSlice<u8>>,
    /// `None`: cuDNN offered nothing usable, so that pass goes through columns.
    chosen: HashMap<(DnnShape, Pass), Option<Choice>>,
    /// Batch norm's descriptors by input shape [N, C, L, 1].
    norms: HashMap<[c_int; 4], NormDescs>,
    /// Pooling descriptors by geometry.
    pools: HashMap<PoolShape, pool::PoolDescs>,
}

/// Batch norm's descriptors: the input (and output) [N, C, L, 1] and the per-channel [1, C, 1, 1].
struct NormDescs {
    x: sys::cudnnTensorDescriptor_t,
    per_channel: sys::cudnnTensorDescriptor_t,
}

impl Drop for NormDescs {
    fn drop(&mut self) {
        // SAFETY: created by `NormDescs::new` (null if never created), destroyed once, here.
        unsafe {
            for d in [self.x, self.per_channel] {
                if !d.is_null() {
                    let _ = result::destroy_tensor_descriptor(d);
                }
            }
        }
    }
}

impl NormDescs {
    fn new(x: [c_int; 4]) -> std::result::Result<NormDescs, result::CudnnError> {
        use sys::cudnnDataType_t::CUDNN_DATA_FLOAT as F32;
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let mut d = NormDescs { x: std::ptr::null_mut(), per_channel: std::ptr::null_mut() };
        d.x = result::create_tensor_descriptor()?;
        d.per_channel = result::create_tensor_descriptor()?;
        // SAFETY: both were just created and live until `d` drops.
        unsafe {
            result::set_tensor4d_descriptor(d.x, NCHW, F32, x)?;
            result::set_tensor4d_descriptor(d.per_channel, NCHW, F32, [1, x[1], 1, 1])?;
        }
        Ok(d)
    }
}

/// Training-mode batch norm's buffers: what it reads, and what it writes (the output, and the
/// batch's mean and 1/sqrt(var + eps), which the backward pass and `bn_running` read).
pub(crate) struct NormForward<'a> {
    pub x: &'a CudaSlice<f32>,
    pub gamma: &'a CudaSlice<f32>,
    pub beta: &'a CudaSlice<f32>,
    pub y: &'a mut CudaSlice<f32>,
    pub mean: &'a mut CudaSlice<f32>,
    pub invstd: &'a mut CudaSlice<f32>,
}

/// Batch norm's backward pass after a training-mode forward: what it reads and the three
/// gradients it writes.
pub(crate) struct NormBackward<'a> {
    pub x: &'a CudaSlice<f32>,
    pub dy: &'a CudaSlice<f32>,
    pub gamma: &'a CudaSlice<f32>,
    pub mean: &'a CudaSlice<f32>,
    pub invstd: &'a CudaSlice<f32>,
    pub dx: &'a mut CudaSlice<f32>,
    pub dgamma: &'a mut CudaSlice<f32>,
    pub dbeta: &'a mut CudaSlice<f32>,
}

/// Evaluation-mode batch norm's buffers: what it reads and the output it writes.
pub(crate) struct NormInference<'a> {
    pub x: &'a CudaSlice<f32>,
    pub gamma: &'a CudaSlice<f32>,
    pub beta: &'a CudaSlice<f32>,
    pub running_mean: &'a CudaSlice<f32>,
    pub running_var: &'a CudaSlice<f32>,
    pub y: &'a mut CudaSlice<f32>,
}

/// Batch norm over `x` [N, C, ...] in cuDNN's form [N, C, L, 1] (L the product of the rest),
/// if every size fits its 32-bit ints and none is empty.
pub(crate) fn norm_shape(x: &[usize]) -> Option<[c_int; 4]> {
    let (n, c, l) = (*x.first()?, *x.get(1)?, x[2..].iter().product::<usize>());
    let total = n.checked_mul(c)?.checked_mul(l)?;
    let i = |v: usize| c_int::try_from(v).ok().filter(|&v| v > 0);
    i(total)?;
    Some([i(n)?, i(c)?, i(l)?, 1])
}

// SAFETY: a cuDNN handle may be used from any thread, one at a time (cuDNN's thread-safety
// rule); `Dnn` only touches it with its mutex held.
unsafe impl Send for State {}

impl Drop for State {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `create_handle` and is destroyed once, here.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// cuDNN on the backend's stream.
pub(crate) struct Dnn {
    state: Mutex<State>,
    stream: Arc<CudaStream>,
    tf32: bool,
    version: usize,
}

/// The descriptors of one geometry and pass (x, y, w and the convolution), destroyed with it.
struct Descs {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each was created by its `create_*` call in `Descs::new` (null if that call
        // never ran) and is destroyed once, here.
        unsafe {
            if !self.x.is_null() {
                let _ = result::destroy_tensor_descriptor(self.x);
            }
            if !self.y.is_null() {
                let _ = result::destroy_tensor_descriptor(self.y);
            }
            if !self.w.is_null() {
                let _ = result::destroy_filter_descriptor(self.w);
            }
            if !self.conv.is_null() {
                let _ = result::destroy_convolution_descriptor(self.conv);
            }
        }
    }
}

impl Descs {
    fn new(s: &DnnShape, math: Math) -> std::result::Result<Descs, result::CudnnError> {
        use std::ptr::null_mut;
        use sys::cudnnDataType_t::CUDNN_DATA_FLOAT as F32;
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let mut d = Descs { x: null_mut(), y: null_mut(), w: null_mut(), conv: null_mut() };
        d.x = result::create_tensor_descriptor()?;
        d.y = result::create_tensor_descriptor()?;
        d.w = result::create_filter_descriptor()?;
        d.conv = result::create_convolution_descriptor()?;
        // SAFETY: the descriptors were just created and are alive until `d` drops.
        unsafe {
            result::set_tensor4d_descriptor(d.x, NCHW, F32, s.x)?;
            result::set_tensor4d_descriptor(d.y, NCHW, F32, s.y)?;
            result::set_filter4d_descriptor(d.w, F32, NCHW, s.w)?;
            let [ph, pw] = s.pad;
            let [sh, sw] = s.stride;
            let [dh, dw] = s.dilation;
            result::set_convolution2d_descriptor(d.conv, ph, pw, sh, sw, dh, dw, sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION, F32)?;
            result::set_convolution_group_count(d.conv, s.groups)?;
            result::set_convolution_math_type(d.conv, math)?;
        }
        Ok(d)
    }
}

fn dnn_err(what: &str, e: impl std::fmt::Debug) -> Error {
    crate::err(&format!("cuDNN {what}"), e)
}

/// Up to `$n` of cuDNN's heuristic picks for a pass, best first, as [`Candidate`]s.
macro_rules! candidates {
    ($perf:ty, $n:expr, $get:expr, $handle:expr, $a:expr, $b:expr, $conv:expr, $c:expr) => {{
        // SAFETY: all-zero bytes are a valid perf struct (every enum field has a 0 variant);
        // cuDNN fills the first `count` entries.
        let mut perf: [$perf; $n] = unsafe { std::mem::zeroed() };
        let mut count: c_int = 0;
        // SAFETY: the handle and descriptors are alive; `perf` holds `$n` entries.
        unsafe { $get($handle, $a, $b, $conv, $c, $n as c_int, &mut count, perf.as_mut_ptr()) }.map(|()| {
            perf[..(count.max(0) as usize).min($n)]
                .iter()
                .map(|p| Candidate {
                    algo: p.algo as u32,
                    ok: p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS,
                    memory: p.memory,
                    math: p.mathType,
                })
                .collect::<Vec<Candidate>>()
        })
    }};
}

/// Every cuDNN function this module calls.
const SYMBOLS: [&str; 32] = [
    "cudnnCreate",
    "cudnnDestroy",
    "cudnnSetStream",
    "cudnnGetVersion",
    "cudnnCreateTensorDescriptor",
    "cudnnSetTensor4dDescriptor",
    "cudnnDestroyTensorDescriptor",
    "cudnnCreateFilterDescriptor",
    "cudnnSetFilter4dDescriptor",
    "cudnnDestroyFilterDescriptor",
    "cudnnCreateConvolutionDescriptor",
    "cudnnSetConvolution2dDescriptor",
    "cudnnSetConvolutionGroupCount",
    "cudnnSetConvolutionMathType",
    "cudnnDestroyConvolutionDescriptor",
    "cudnnGetConvolutionForwardAlgorithm_v7",
    "cudnnGetConvolutionBackwardDataAlgorithm_v7",
    "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
    "cudnnGetConvolutionForwardWorkspaceSize",
    "cudnnGetConvolutionBackwardDataWorkspaceSize",
    "cudnnGetConvolutionBackwardFilterWorkspaceSize",
    "cudnnConvolutionForward",
    "cudnnConvolutionBackwardData",
    "cudnnConvolutionBackwardFilter",
    "cudnnBatchNormalizationForwardTraining",
    "cudnnBatchNormalizationBackward",
    "cudnnBatchNormalizationForwardInference",
    "cudnnCreatePoolingDescriptor",
    "cudnnSetPooling2dDescriptor",
    "cudnnDestroyPoolingDescriptor",
    "cudnnPoolingForward",
    "cudnnPoolingBackward",
];

/// The pass's algorithm enum value numbered `n` (one cuDNN listed, so in range).
fn fwd_algo(n: u32) -> sys::cudnnConvolutionFwdAlgo_t {
    use sys::cudnnConvolutionFwdAlgo_t::*;
    [
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ][n as usize]
}

fn data_algo(n: u32) -> sys::cudnnConvolutionBwdDataAlgo_t {
    use sys::cudnnConvolutionBwdDataAlgo_t::*;
    [
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
    ][n as usize]
}

fn filter_algo(n: u32) -> sys::cudnnConvolutionBwdFilterAlgo_t {
    use sys::cudnnConvolutionBwdFilterAlgo_t::*;
    [
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
    ][n as usize]
}

/// Whether cuDNN's library (libcudnn.so.9, or another name cudarc knows) can be opened.
pub(crate) fn library_found() -> bool {
    // SAFETY: only tries to open the library by name, and closes it again.
    unsafe { sys::is_culib_present() }
}

impl Dnn {
    /// cuDNN on `stream`, or `None` when `mode` is off or no cuDNN library is found (then every
    /// convolution goes through columns, which `describe` says).
    pub(crate) fn new(stream: &Arc<CudaStream>, mode: Cudnn) -> Result<Option<Dnn>> {
        if mode == Cudnn::Off || !library_found() {
            return Ok(None);
        }
        // cudarc looks each function up on first call and panics if it is missing: look first.
        // SAFETY: the library opens as above; `get` only looks a name up.
        let lib = unsafe { sys::culib() };
        if let Some(missing) = SYMBOLS.iter().find(|f| unsafe { lib.get::<unsafe extern "C" fn()>(f.as_bytes()) }.is_err()) {
            return Err(dnn_err("library", format!("it has no {missing} (cuDNN 9 is needed)")));
        }
        stream.context().bind_to_thread().map_err(|e| crate::err("binding the context", e))?;
        let handle = result::create_handle().map_err(|e| dnn_err("starting", e))?;
        let state = State { handle, workspace: None, chosen: HashMap::new(), norms: HashMap::new(), pools: HashMap::new() };
        // SAFETY: a live handle and the backend's live stream (the handle is dropped first:
        // the backend owns both and `Dnn` holds a clone of the stream).
        unsafe { result::set_stream(handle, stream.cu_stream() as sys::cudaStream_t) }.map_err(|e| dnn_err("setting the stream", e))?;
        Ok(Some(Dnn { state: Mutex::new(state), stream: stream.clone(), tf32: mode == Cudnn::Tf32, version: result::get_version() }))
    }

    /// Whether tensor cores may run convolutions in TF32.
    pub(crate) fn tf32(&self) -> bool {
        self.tf32
    }

    /// "cuDNN 9.13.0 (FP32)".
    pub(crate) fn describe(&self) -> String {
        let v = self.version;
        format!("cuDNN {}.{}.{} ({})", v / 10_000, v / 100 % 100, v % 100, if self.tf32 { "TF32 allowed" } else { "FP32" })
    }

    /// Runs one pass of the convolution `s`: `a` and `b` are its inputs and `out` its result,
    /// all dense NCHW (Forward: x, w -> y; Data: w, dy -> dx; Filter: x, dy -> dw). `Ok(false)`
    /// when cuDNN offers no usable algorithm for it: `out` is untouched and the caller computes
    /// it another way.
    pub(crate) fn run(&self, s: &DnnShape, pass: Pass, a: &CudaSlice<f32>, b: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<bool> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.stream.context().bind_to_thread().map_err(|e| crate::err("binding the context", e))?;
        let key = (*s, pass);
        if !st.chosen.contains_key(&key) {
            let c = self.pick(st.handle, s, pass)?;
            st.chosen.insert(key, c);
        }
        let State { handle, workspace, chosen, .. } = &mut *st;
        let Some(Some(choice)) = chosen.get(&key) else {
            return Ok(false);
        };
        if workspace.as_ref().map_or(0, |w| w.len()) < choice.workspace {
            *workspace = None;
            // SAFETY: scratch space that cuDNN writes before it reads.
            *workspace = Some(
                unsafe { self.stream.alloc::<u8>(choice.workspace) }
                    .map_err(|e| super::alloc_err("allocating cuDNN's workspace of", choice.workspace, e))?,
            );
        }
        let handle = *handle;
        let stream = &*self.stream;
        let (ws, _ws_guard) = match workspace.as_mut() {
            Some(w) if choice.workspace > 0 => {
                let (p, g) = w.device_ptr_mut(stream);
                (p as *mut c_void, Some(g))
            }
            _ => (std::ptr::null_mut(), None),
        };
        let (pa, _ga) = a.device_ptr(stream);
        let (pb, _gb) = b.device_ptr(stream);
        let (po, _go) = out.device_ptr_mut(stream);
        let (pa, pb, po) = (pa as *const c_void, pb as *const c_void, po as *mut c_void);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (al, be) = ((&alpha as *const f32).cast::<c_void>(), (&beta as *const f32).cast::<c_void>());
        let d = &choice.descs;
        // SAFETY: live handle and descriptors describing the buffers' shapes (the callers pass
        // buffers of at least those sizes, from the same geometry), a workspace of at least
        // `choice.workspace` bytes, and host scalars that outlive the calls.
        let r = unsafe {
            match pass {
                Pass::Forward => {
                    result::convolution_forward(handle, al, d.x, pa, d.w, pb, d.conv, fwd_algo(choice.algo), ws, choice.workspace, be, d.y, po)
                }
                Pass::Data => {
                    result::convolution_backward_data(handle, al, d.w, pa, d.y, pb, d.conv, data_algo(choice.algo), ws, choice.workspace, be, d.x, po)
                }
                Pass::Filter => result::convolution_backward_filter(
                    handle,
                    al,
                    d.x,
                    pa,
                    d.y,
                    pb,
                    d.conv,
                    filter_algo(choice.algo),
                    ws,
                    choice.workspace,
                    be,
                    d.w,
                    po,
                ),
            }
        };
        match r {
            Ok(()) => Ok(true),
            // Declined before any work (the arithmetic asked for does not fit the algorithm):
            // columns from now on for this pass.
            Err(result::CudnnError(sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED)) => {
                chosen.insert(key, None);
                Ok(false)
            }
            Err(e) => Err(dnn_err(&format!("{pass:?} pass (algorithm {}) of {s:?}", choice.algo), e)),
        }
    }

    /// Training-mode batch norm of `shape` (from [`norm_shape`]): cuDNN's spatial mode, leaving
    /// the running statistics to the caller.
    pub(crate) fn norm_forward(&self, shape: [c_int; 4], eps: f64, b: NormForward<'_>) -> Result<()> {
        self.with_norm(shape, |handle, d, stream| {
            let (x, _g1) = b.x.device_ptr(stream);
            let (gamma, _g2) = b.gamma.device_ptr(stream);
            let (beta, _g3) = b.beta.device_ptr(stream);
            let (y, _g4) = b.y.device_ptr_mut(stream);
            let (mean, _g7) = b.mean.device_ptr_mut(stream);
            let (invstd, _g8) = b.invstd.device_ptr_mut(stream);
            let (one, zero) = (1.0f32, 0.0f32);
            // SAFETY: a live handle and descriptors of these buffers' shapes (the caller sizes them
            // from the same input shape: x and y N*C*L, the rest C); host scalars outlive the call.
            unsafe {
                sys::cudnnBatchNormalizationForwardTraining(
                    handle,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    (&one as *const f32).cast(),
                    (&zero as *const f32).cast(),
                    d.x,
                    x as *const c_void,
                    d.x,
                    y as *mut c_void,
                    d.per_channel,
                    gamma as *const c_void,
                    beta as *const c_void,
                    // No running statistics here: the caller moves them (`bn_running`).
                    0.0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    eps,
                    mean as *mut c_void,
                    invstd as *mut c_void,
                )
            }
            .result()
            .map_err(|e| dnn_err(&format!("batch norm of {shape:?}"), e))
        })
    }

    /// Batch norm's gradients after [`Dnn::norm_forward`], from the mean and 1/sqrt(var + eps)
    /// it saved.
    pub(crate) fn norm_backward(&self, shape: [c_int; 4], eps: f64, b: NormBackward<'_>) -> Result<()> {
        self.with_norm(shape, |handle, d, stream| {
            let (x, _g1) = b.x.device_ptr(stream);
            let (dy, _g2) = b.dy.device_ptr(stream);
            let (gamma, _g3) = b.gamma.device_ptr(stream);
            let (mean, _g4) = b.mean.device_ptr(stream);
            let (invstd, _g5) = b.invstd.device_ptr(stream);
            let (dx, _g6) = b.dx.device_ptr_mut(stream);
            let (dgamma, _g7) = b.dgamma.device_ptr_mut(stream);
            let (dbeta, _g8) = b.dbeta.device_ptr_mut(stream);
            let (one, zero) = (1.0f32, 0.0f32);
            let (one, zero) = ((&one as *const f32).cast::<c_void>(), (&zero as *const f32).cast::<c_void>());
            // SAFETY: as in `norm_forward`; the gradients are written in full (betas 0).
            unsafe {
                sys::cudnnBatchNormalizationBackward(
                    handle,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    one,
                    zero,
                    one,
                    zero,
                    d.x,
                    x as *const c_void,
                    d.x,
                    dy as *const c_void,
                    d.x,
                    dx as *mut c_void,
                    d.per_channel,
                    gamma as *const c_void,
                    dgamma as *mut c_void,
                    dbeta as *mut c_void,
                    eps,
                    mean as *const c_void,
                    invstd as *const c_void,
                )
            }
            .result()
            .map_err(|e| dnn_err(&format!("batch norm's gradient of {shape:?}"), e))
        })
    }

    /// Evaluation-mode batch norm of `shape` (from [`norm_shape`]): y from the running
    /// statistics, every element written.
    pub(crate) fn norm_inference(&self, shape: [c_int; 4], eps: f64, b: NormInference<'_>) -> Result<()> {
        self.with_norm(shape, |handle, d, stream| {
            let (x, _g1) = b.x.device_ptr(stream);
            let (gamma, _g2) = b.gamma.device_ptr(stream);
            let (beta, _g3) = b.beta.device_ptr(stream);
            let (mean, _g4) = b.running_mean.device_ptr(stream);
            let (var, _g5) = b.running_var.device_ptr(stream);
            let (y, _g6) = b.y.device_ptr_mut(stream);
            let (one, zero) = (1.0f32, 0.0f32);
            // SAFETY: as in `norm_forward`.
            unsafe {
                sys::cudnnBatchNormalizationForwardInference(
                    handle,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    (&one as *const f32).cast(),
                    (&zero as *const f32).cast(),
                    d.x,
                    x as *const c_void,
                    d.x,
                    y as *mut c_void,
                    d.per_channel,
                    gamma as *const c_void,
                    beta as *const c_void,
                    mean as *const c_void,
                    var as *const c_void,
                    eps,
                )
            }
            .result()
            .map_err(|e| dnn_err(&format!("evaluation-mode batch norm of {shape:?}"), e))
        })
    }

    /// Runs `f` with the handle (held), the descriptors of batch norm over `shape` (made once)
    /// and the stream.
    fn with_norm<R>(&self, shape: [c_int; 4], f: impl FnOnce(sys::cudnnHandle_t, &NormDescs, &CudaStream) -> Result<R>) -> Result<R> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.stream.context().bind_to_thread().map_err(|e| crate::err("binding the context", e))?;
        let handle = st.handle;
        let d = match st.norms.entry(shape) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(NormDescs::new(shape).map_err(|e| dnn_err("descriptors", e))?),
        };
        f(handle, d, &self.stream)
    }

    /// The algorithm for one pass of `s`: the first of cuDNN's heuristic picks that is
    /// [`usable`] and that cuDNN sizes a workspace for with the chosen arithmetic set.
    fn pick(&self, handle: sys::cudnnHandle_t, s: &DnnShape, pass: Pass) -> Result<Option<Choice>> {
        // The heuristics see the arithmetic asked for: FMA kernels only, or anything.
        let asked = if self.tf32 { Math::CUDNN_DEFAULT_MATH } else { Math::CUDNN_FMA_MATH };
        let d = match Descs::new(s, asked) {
            Ok(d) => d,
            Err(_) => return Ok(None),
        };
        let list = match pass {
            Pass::Forward => {
                candidates!(sys::cudnnConvolutionFwdAlgoPerf_t, 8, result::get_convolution_forward_algorithm, handle, d.x, d.w, d.conv, d.y)
            }
            Pass::Data => {
                candidates!(sys::cudnnConvolutionBwdDataAlgoPerf_t, 6, result::get_convolution_backward_data_algorithm, handle, d.w, d.y, d.conv, d.x)
            }
            Pass::Filter => {
                candidates!(
                    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
                    7,
                    result::get_convolution_backward_filter_algorithm,
                    handle,
                    d.x,
                    d.y,
                    d.conv,
                    d.w
                )
            }
        };
        // Heuristics that refuse the geometry (they touch no device memory) leave it to columns,
        // as does a list whose every algorithm cuDNN then declines to size.
        let Ok(list) = list else {
            return Ok(None);
        };
        for c in usable(&list, self.tf32) {
            let math = if self.tf32 { c.math } else { Math::CUDNN_FMA_MATH };
            let d = Descs::new(s, math).map_err(|e| dnn_err("descriptors", e))?;
            // SAFETY: live handle and descriptors; the algorithm is one cuDNN listed for this pass.
            let workspace = unsafe {
                match pass {
                    Pass::Forward => result::get_convolution_forward_workspace_size(handle, d.x, d.w, d.conv, d.y, fwd_algo(c.algo)),
                    Pass::Data => result::get_convolution_backward_data_workspace_size(handle, d.w, d.y, d.conv, d.x, data_algo(c.algo)),
                    Pass::Filter => result::get_convolution_backward_filter_workspace_size(handle, d.x, d.y, d.conv, d.w, filter_algo(c.algo)),
                }
            };
            if let Ok(workspace) = workspace {
                return Ok(Some(Choice { algo: c.algo, workspace, descs: d }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_kernels::conv::{Conv2dOptions, Padding};

    fn opts(stride: usize, padding: Padding, groups: usize) -> Conv2dOptions {
        Conv2dOptions { stride: (stride, stride), padding, dilation: (1, 1), groups, output_padding: (0, 0) }
    }

    #[test]
    fn shapes_cudnn_can_describe() {
        // ResNet's 3x3 stride-2 layer: symmetric padding, cuDNN's sizes.
        let g =
            ConvGeom::conv2d(&[8, 64, 32, 32], &[128, 64, 3, 3], &opts(2, Padding::Explicit { top: 1, bottom: 1, left: 1, right: 1 }, 1)).unwrap();
        let s = DnnShape::of(&g).unwrap();
        assert_eq!((s.x, s.w, s.y, s.pad, s.stride), ([8, 64, 32, 32], [128, 64, 3, 3], [8, 128, 16, 16], [1, 1], [2, 2]));
        // "Same" with stride 2 on an odd size pads (1, 1).
        let g = ConvGeom::conv2d(&[1, 4, 7, 7], &[4, 4, 3, 3], &opts(2, Padding::Same, 1)).unwrap();
        assert_eq!((g.pad, g.p), ((1, 1, 1, 1), 4));
        assert_eq!(DnnShape::of(&g).unwrap().pad, [1, 1]);
        // More padding at the bottom than the top, but no more rows for it: cuDNN's count with
        // the top padding on both sides is the same (the last padded row is never reached).
        let g = ConvGeom::conv2d(&[1, 2, 7, 7], &[2, 2, 3, 3], &opts(2, Padding::Explicit { top: 1, bottom: 2, left: 1, right: 2 }, 1)).unwrap();
        assert_eq!(g.p, 4);
        assert_eq!(DnnShape::of(&g).unwrap().pad, [1, 1]);
        // Grouped and depthwise: the filter holds C/g channels.
        let g = ConvGeom::conv2d(&[2, 6, 5, 5], &[6, 1, 3, 3], &opts(1, Padding::Same, 6)).unwrap();
        let s = DnnShape::of(&g).unwrap();
        assert_eq!((s.w, s.groups), ([6, 1, 3, 3], 6));
        // A transposed convolution is described by the convolution it is the adjoint of: the
        // VAE's 4x4 stride-2 layer, 7 -> 14.
        let g = ConvGeom::conv_transpose2d(&[2, 64, 7, 7], &[64, 1, 4, 4], &opts(2, Padding::Explicit { top: 1, bottom: 1, left: 1, right: 1 }, 1))
            .unwrap();
        let s = DnnShape::of(&g).unwrap();
        assert_eq!((s.x, s.w, s.y), ([2, 1, 14, 14], [64, 1, 4, 4], [2, 64, 7, 7]));
        // With output padding the large side is a row longer; cuDNN's division still gives 7.
        let t = Conv2dOptions { output_padding: (1, 1), ..opts(2, Padding::Explicit { top: 1, bottom: 1, left: 1, right: 1 }, 1) };
        let g = ConvGeom::conv_transpose2d(&[2, 64, 7, 7], &[64, 1, 3, 3], &t).unwrap();
        assert_eq!(DnnShape::of(&g).unwrap().x, [2, 1, 14, 14]);
    }

    #[test]
    fn shapes_cudnn_cannot_describe_go_through_columns() {
        // "Same" with an even kernel at stride 1 pads (1, 2): cuDNN with 1 on both sides would
        // give one row fewer.
        let g = ConvGeom::conv2d(&[1, 2, 6, 6], &[2, 2, 4, 4], &opts(1, Padding::Same, 1)).unwrap();
        assert_eq!((g.pad.0, g.pad.1, g.p), (1, 2, 6));
        assert_eq!(DnnShape::of(&g), None);
        // "Same" with stride 2 on an even size pads (0, 1), and that padded row is read: 4
        // outputs, where cuDNN with 0 on both sides gives 3.
        let g = ConvGeom::conv2d(&[1, 4, 8, 8], &[4, 4, 3, 3], &opts(2, Padding::Same, 1)).unwrap();
        assert_eq!((g.pad, g.p), ((0, 1, 0, 1), 4));
        assert_eq!(DnnShape::of(&g), None);
        // More padding at the top than the bottom: cuDNN's count would be a row too many.
        let g = ConvGeom::conv2d(&[1, 2, 6, 6], &[2, 2, 3, 3], &opts(1, Padding::Explicit { top: 2, bottom: 0, left: 1, right: 1 }, 1)).unwrap();
        assert_eq!(DnnShape::of(&g), None);
        // An empty batch.
        let g = ConvGeom::conv2d(&[0, 2, 6, 6], &[2, 2, 3, 3], &opts(1, Padding::Valid, 1)).unwrap();
        assert_eq!(DnnShape::of(&g), None);
        // A tensor past 2^31 elements.
        let g = ConvGeom::conv2d(&[1 << 12, 8, 256, 256], &[8, 8, 1, 1], &opts(1, Padding::Valid, 1)).unwrap();
        assert_eq!(DnnShape::of(&g), None);
    }

    #[test]
    fn the_choice_keeps_fp32_unless_tf32_is_allowed() {
        let c = |algo, ok, memory, math| Candidate { algo, ok, memory, math };
        let list = [
            c(1, false, 0, Math::CUDNN_DEFAULT_MATH),
            c(6, true, 0, Math::CUDNN_TENSOR_OP_MATH),
            c(5, true, WORKSPACE_CAP + 1, Math::CUDNN_FMA_MATH),
            c(0, true, 1 << 20, Math::CUDNN_FMA_MATH),
            c(2, true, 0, Math::CUDNN_DEFAULT_MATH),
        ];
        let algos = |l: &[Candidate], tf32| usable(l, tf32).map(|c| c.algo).collect::<Vec<_>>();
        assert_eq!(algos(&list, false), [0, 2]);
        assert_eq!(algos(&list, true), [6, 0, 2]);
        assert_eq!(algos(&list[..3], false), []);
        assert_eq!(algos(&[], true), []);
    }

    #[test]
    fn batch_norm_shapes_fold_the_rest_into_one_axis() {
        assert_eq!(norm_shape(&[32, 64, 8, 8]), Some([32, 64, 64, 1]));
        assert_eq!(norm_shape(&[16, 100]), Some([16, 100, 1, 1]));
        assert_eq!(norm_shape(&[4, 3, 2, 5, 7]), Some([4, 3, 70, 1]));
        assert_eq!(norm_shape(&[0, 3, 2, 2]), None);
        assert_eq!(norm_shape(&[7]), None);
        assert_eq!(norm_shape(&[1 << 16, 1 << 16]), None);
    }
}
