//! The CUDA implementation of `stride_autograd::Backend<f32>`: dispatch and the element-wise,
//! reduction, pooling and loss primitives here; convolution in `conv.rs` (cuDNN in `dnn.rs`),
//! batch norm in `norm.rs`, the optimizers' updates in `update.rs`, data movement in `layout.rs`.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use stride_autograd::device::{Backend, Forward, Prim, UpdateItem, Updated};
use stride_autograd::{Unary, Update};
use stride_kernels::pool::PoolGeom;
use stride_tensor::{shape, Device, DeviceBuffer, Error, Result, Tensor};

use crate::{err, CudaOptions, GpuInfo};

const KERNELS: &str = include_str!("../kernels.cu");
const FUNCTIONS: &[&str] = &[
    "binary_same",
    "binary_bcast",
    "bcast_copy",
    "scale",
    "reduce_sum",
    "unary_fwd",
    "unary_bwd",
    "im2col",
    "col2im",
    "knl_to_nkl",
    "nkl_to_knl",
    "add_channel_bias",
    "max_pool_fwd",
    "scatter_planes",
    "avg_pool_fwd",
    "avg_pool_bwd",
    "adaptive_pool_fwd",
    "adaptive_avg_bwd",
    "lp_pool_fwd",
    "lp_pool_bwd",
    "channel_max_fwd",
    "channel_max_bwd",
    "max_axis_fwd",
    "max_axis_bwd",
    "bn_stats",
    "bn_running",
    "bn_invstd",
    "bn_normalize",
    "bn_eval",
    "bn_sums",
    "bn_dx",
    "softmax_fwd",
    "softmax_bwd",
    "nll_fwd",
    "nll_bwd",
    "sgd_update",
    "adam_update",
    "rmsprop_update",
    "gather_strided",
    "scatter_strided",
    "fill",
    "upsample_fwd",
    "upsample_bwd",
];

/// Compiles `kernels.cu` with NVRTC (no GPU needed) and checks that every kernel the backend
/// launches is in the PTX.
pub fn compile_kernels() -> Result<cudarc::nvrtc::Ptx> {
    crate::present("libnvrtc.so.13")?;
    let ptx = cudarc::nvrtc::compile_ptx(KERNELS).map_err(|e| err("compiling the kernels with NVRTC", e))?;
    let text = ptx.to_src();
    if let Some(missing) = FUNCTIONS.iter().find(|f| !text.contains(&format!(".entry {f}("))) {
        return Err(err("kernels.cu", format!("no kernel named {missing} in the PTX")));
    }
    Ok(ptx)
}

/// Elements of a tensor on the GPU.
struct CudaBuf {
    ordinal: usize,
    /// At least `len` elements (one when `len` is 0).
    data: CudaSlice<f32>,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceBuffer<f32> for CudaBuf {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self) -> Result<Vec<f32>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        self.stream.clone_dtoh(&self.data.slice(0..self.len)).map_err(|e| err("copying to the host", e))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// What a forward pass leaves for its backward pass.
enum Saved {
    Nothing,
    Argmax(CudaSlice<i32>),
    Stats {
        mean: CudaSlice<f32>,
        invstd: CudaSlice<f32>,
    },
    /// Evaluation-mode batch norm (kernels or cuDNN): the running statistics it normalised with.
    Running {
        mean: Tensor<f32>,
        var: Tensor<f32>,
    },
    Targets(CudaSlice<i32>),
}

pub struct CudaBackend {
    ordinal: usize,
    /// What it was set up with.
    options: CudaOptions,
    about: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    /// cuDNN for the convolutions and poolings it can describe and batch norm (`None`: not
    /// asked for, or not found).
    dnn: Option<Dnn>,
    profile: Option<Profile>,
    /// The strided kernels' shape tables on the device, by content: a training step asks for
    /// the same few at every step, so each is uploaded once rather than at every call (which
    /// was an allocation and a copy from pageable memory in the stream each time). Emptied
    /// when it holds [`TABLES`] of them.
    tables: Mutex<HashMap<Vec<i64>, Arc<CudaSlice<i64>>>>,
}

/// How many shape tables the device keeps (each a few hundred bytes).
const TABLES: usize = 512;

const THREADS: u32 = 256;

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block per output (reductions), at most 65,535 blocks looping over the rest.
fn per_block(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.clamp(1, 65_535) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// A failed allocation (or copy into a new one) of `bytes`: running out of the GPU's memory says
/// so and what to do, anything else is the driver's error.
pub(crate) fn alloc_err(what: &str, bytes: usize, e: cudarc::driver::DriverError) -> Error {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Error::device(
            "cuda",
            format!("out of GPU memory {what} {:.1} MiB; a smaller --batch-size (or model) needs less", bytes as f64 / (1u64 << 20) as f64),
        );
    }
    err(what, e)
}

fn int(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::arg(op, format!("size {v} is too large for the CUDA kernels' 32-bit indices")))
}

/// The code and parameters of an element-wise function in `kernels.cu`.
fn unary_code(u: Unary) -> (i32, f32, f32) {
    match u {
        Unary::Relu => (0, 0.0, 0.0),
        Unary::Relu6 => (1, 0.0, 0.0),
        Unary::LeakyRelu(a) => (2, a as f32, 0.0),
        Unary::Elu(a) => (3, a as f32, 0.0),
        Unary::Selu => (4, 0.0, 0.0),
        Unary::Gelu => (5, 0.0, 0.0),
        Unary::Silu => (6, 0.0, 0.0),
        Unary::HardSwish => (7, 0.0, 0.0),
        Unary::Tanh => (8, 0.0, 0.0),
        Unary::Sigmoid => (9, 0.0, 0.0),
        Unary::Softplus { beta, threshold } => (10, beta as f32, threshold as f32),
        Unary::Exp => (11, 0.0, 0.0),
        Unary::Log => (12, 0.0, 0.0),
        Unary::Sqrt => (13, 0.0, 0.0),
        Unary::Neg => (14, 0.0, 0.0),
        Unary::Abs => (15, 0.0, 0.0),
        Unary::Square => (16, 0.0, 0.0),
        Unary::Pow(p) => (17, p as f32, 0.0),
        Unary::AddScalar(c) => (18, c as f32, 0.0),
        Unary::MulScalar(c) => (19, c as f32, 0.0),
        Unary::Clamp(lo, hi) => (20, lo as f32, hi as f32),
        Unary::Erf => (21, 0.0, 0.0),
        Unary::Sin => (22, 0.0, 0.0),
        Unary::Cos => (23, 0.0, 0.0),
    }
}

/// How many products one cuBLAS call makes, the strides (elements) between their operands, and
/// the distance between b's or c's rows when they are not packed (a block of columns of a wider
/// matrix).
#[derive(Clone, Copy)]
struct Batch {
    count: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
    ld_b: Option<usize>,
    ld_c: Option<usize>,
}

impl Batch {
    const ONE: Batch = Batch { count: 1, stride_a: 0, stride_b: 0, stride_c: 0, ld_b: None, ld_c: None };
}

/// Fourteen ints passed by value: the `Conv` and `Pool` structs of kernels.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct Args14([i32; 14]);

// SAFETY: plain old data with the layout of a C struct of 14 ints.
unsafe impl cudarc::driver::DeviceRepr for Args14 {}

impl Args14 {
    fn new(op: &'static str, v: [usize; 14]) -> Result<Self> {
        let mut out = [0i32; 14];
        for (o, x) in out.iter_mut().zip(v) {
            *o = int(op, x)?;
        }
        Ok(Args14(out))
    }
}

/// Launches `kernel` with the given configuration and arguments.
macro_rules! launch {
    ($self:ident, $kernel:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let f = $self.function($kernel)?;
        // One statement, so temporaries among the arguments live through the launch.
        // SAFETY: the kernel's parameters in kernels.cu match these arguments in order and
        // type, and every buffer is at least as long as the sizes passed with it.
        unsafe { $self.stream.launch_builder(f)$(.arg($arg))+.launch($cfg) }.map_err(|e| $crate::err($kernel, e))?;
    }};
}

/// Lets the device's memory pool keep what tensors free for the next allocations: by default it
/// hands it back to the driver at every synchronization, and a training step that allocates
/// after one pays for mapping the memory again.
fn keep_freed_memory(ctx: &cudarc::driver::CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on a live context's device; `threshold` outlives the call,
    // which reads a u64 for this attribute.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().map_err(|e| err("the memory pool", e))?;
        sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut threshold as *mut u64).cast())
            .result()
            .map_err(|e| err("the memory pool's release threshold", e))
    }
}

/// C[m, n] = op(A) op(B) (+ beta C) for row-major matrices: `ta`/`tb` say A is stored [k, m] /
/// B is stored [n, k].
struct Mm {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    beta: f32,
}

impl CudaBackend {
    pub(crate) fn new(ordinal: usize, gpu: &GpuInfo, options: CudaOptions) -> Result<Self> {
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| err("opening the device", e))?;
        // SAFETY: the backend queues everything on this one stream (cuBLAS included), so work
        // is ordered without the two events cudarc would otherwise create per allocation.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err("starting cuBLAS", e))?;
        let ptx = compile_kernels()?;
        let module = ctx.load_module(ptx).map_err(|e| err("loading the kernels", e))?;
        let mut functions = HashMap::new();
        for &f in FUNCTIONS {
            functions.insert(f, module.load_function(f).map_err(|e| err(f, e))?);
        }
        // cuDNN that is missing or fails to start leaves convolution to the columns; the
        // description says which and why.
        let (dnn, columns) = match Dnn::new(&stream, options.cudnn) {
            Ok(Some(d)) => (Some(d), String::new()),
            Ok(None) if dnn::library_found() => (None, "columns and cuBLAS (cuDNN found; --cudnn fp32 runs convolutions on it)".to_string()),
            Ok(None) => (None, "columns and cuBLAS (no cuDNN library found)".to_string()),
            Err(e) => (None, format!("columns and cuBLAS (cuDNN did not start: {e})")),
        };
        let about = format!(
            "cuda:{ordinal}: {} ({:.0} GiB, compute {}.{}); cuBLAS and NVRTC kernels; convolution: {}",
            gpu.name,
            gpu.memory_bytes as f64 / (1u64 << 30) as f64,
            gpu.compute_capability.0,
            gpu.compute_capability.1,
            dnn.as_ref().map_or(columns, |d| format!("{} (and batch norm, max and average pooling), columns where cuDNN cannot", d.describe()))
        );
        Ok(CudaBackend { ordinal, options, about, stream, blas, functions, dnn, profile: Profile::from_env(), tables: Mutex::default() })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The options it was set up with.
    pub fn options(&self) -> CudaOptions {
        self.options
    }

    /// How convolutions run: "cudnn-fp32", "cudnn-tf32" or "columns" (benchmarks record it).
    pub fn convolution_route(&self) -> &'static str {
        match &self.dnn {
            Some(d) if d.tf32() => "cudnn-tf32",
            Some(_) => "cudnn-fp32",
            None => "columns",
        }
    }

    fn function(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| err("kernel", name))
    }

    fn slice<'a>(&self, t: &'a Tensor<f32>) -> Result<&'a CudaSlice<f32>> {
        t.device_buffer()
            .and_then(|b| b.as_any().downcast_ref::<CudaBuf>())
            .filter(|b| b.ordinal == self.ordinal)
            .map(|b| &b.data)
            .ok_or_else(|| Error::device("cuda", format!("expected a tensor on cuda:{}, got one on {}", self.ordinal, t.device())))
    }

    fn wrap(&self, data: CudaSlice<f32>, shape: &[usize]) -> Result<Tensor<f32>> {
        let len = shape::numel("cuda", shape)?;
        if data.len() < len {
            return Err(Error::device("cuda", format!("a buffer of {} elements for shape {shape:?}", data.len())));
        }
        Tensor::from_device(Arc::new(CudaBuf { ordinal: self.ordinal, data, len, stream: self.stream.clone() }), shape)
    }

    /// A zeroed buffer of `n` elements (one for an empty tensor: CUDA allocates no zero bytes).
    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| alloc_err("allocating", n * 4, e))
    }

    /// A buffer of `n` elements left unset, for an output that a kernel (or a product with
    /// beta 0 and a non-empty inner dimension) writes in full before anything reads it: no
    /// clearing pass.
    fn fresh(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every caller's launch writes all `n` elements (the kernels in kernels.cu that
        // write every output index, or cuBLAS with beta 0 and k > 0).
        unsafe { self.stream.alloc::<f32>(n.max(1)) }.map_err(|e| alloc_err("allocating", n * 4, e))
    }

    /// The output of a product over an inner dimension of `inner`: unset when the product
    /// writes it (inner > 0), zeroed when it does not (an empty sum).
    fn product_out(&self, n: usize, inner: usize) -> Result<CudaSlice<f32>> {
        if inner > 0 {
            self.fresh(n)
        } else {
            self.zeros(n)
        }
    }

    /// An index buffer of `n` entries left unset, for a kernel that writes every one (the
    /// argmax of a max or a max pool).
    fn fresh_indices(&self, n: usize) -> Result<CudaSlice<i32>> {
        // SAFETY: every caller's kernel writes all `n` indices before anything reads them.
        unsafe { self.stream.alloc::<i32>(n.max(1)) }.map_err(|e| alloc_err("allocating", n * 4, e))
    }

    /// The shape table `v` on the device (read-only for the kernels that take it): uploaded
    /// the first time it is asked for, then kept (see `tables`).
    fn table(&self, v: Vec<i64>) -> Result<Arc<CudaSlice<i64>>> {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tables.get(&v) {
            return Ok(t.clone());
        }
        if tables.len() >= TABLES {
            // Freed in stream order: kernels queued with them still read them first.
            tables.clear();
        }
        let t = Arc::new(self.stream.clone_htod(&v).map_err(|e| alloc_err("copying to the device", v.len() * 8, e))?);
        tables.insert(v, t.clone());
        Ok(t)
    }

    fn gemm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(&self, mm: Mm, a: &A, b: &B, c: &mut C) -> Result<()> {
        self.gemm_batched(mm, Batch::ONE, a, b, c)
    }

    /// `batch.count` products of `mm`'s shape in one cuBLAS call, the operands of product i at
    /// i times their strides (in elements) from the starts of `a`, `b` and `c`.
    fn gemm_batched<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(&self, mm: Mm, batch: Batch, a: &A, b: &B, c: &mut C) -> Result<()> {
        let Mm { m, n, k, ta, tb, beta } = mm;
        if m == 0 || n == 0 || batch.count == 0 {
            return Ok(());
        }
        let i = |v: usize| int("matmul", v);
        // Row-major C = A B is column-major C^T = B^T A^T: swap the operands.
        let cfg = GemmConfig {
            transa: if tb { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N },
            transb: if ta { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N },
            m: i(n)?,
            n: i(m)?,
            k: i(k)?,
            alpha: 1.0,
            lda: i(batch.ld_b.unwrap_or(if tb { k } else { n }))?.max(1),
            ldb: i(if ta { m } else { k })?.max(1),
            beta,
            ldc: i(batch.ld_c.unwrap_or(n))?.max(1),
        };
        if batch.count == 1 {
            // SAFETY: the buffers hold at least m*k, k*n and m*n elements (checked by the
            // callers' shapes), and they are distinct allocations or disjoint views.
            return unsafe { self.blas.gemm(cfg, b, a, c) }.map_err(|e| err("cuBLAS sgemm", e));
        }
        let stride = |v: usize| i64::try_from(v).map_err(|_| Error::arg("matmul", format!("a stride of {v} elements")));
        let cfg = StridedBatchedConfig {
            gemm: cfg,
            batch_size: int("matmul", batch.count)?,
            // The operands swapped, as above.
            stride_a: stride(batch.stride_b)?,
            stride_b: stride(batch.stride_a)?,
            stride_c: stride(batch.stride_c)?,
        };
        // SAFETY: as above for every product: the callers' shapes give buffers of at least
        // (count - 1) * stride + one product's operand, and the products' outputs do not overlap.
        unsafe { self.blas.gemm_strided_batched(cfg, b, a, c) }.map_err(|e| err("cuBLAS sgemm (strided batched)", e))
    }

    // ---- element-wise ----

    fn binary(&self, op: i32, a: &Tensor<f32>, b: &Tensor<f32>) -> Result<Tensor<f32>> {
        const NAMES: [&str; 4] = ["add", "sub", "mul", "div"];
        let out = shape::broadcast_shape(NAMES[op as usize], a.shape(), b.shape())?;
        let n = shape::numel(NAMES[op as usize], &out)?;
        let mut y = self.fresh(n)?;
        let (sa, sb) = (self.slice(a)?, self.slice(b)?);
        if n > 0 {
            if a.shape() == b.shape() {
                launch!(self, "binary_same", grid(n), &op, sa, sb, &mut y, &(n as i64));
            } else {
                let mut meta = vec![out.len() as i64];
                meta.extend(out.iter().map(|&d| d as i64));
                meta.extend(shape::broadcast_strides(a.shape(), &out).iter().map(|&d| d as i64));
                meta.extend(shape::broadcast_strides(b.shape(), &out).iter().map(|&d| d as i64));
                let meta = self.table(meta)?;
                launch!(self, "binary_bcast", grid(n), &op, sa, sb, &mut y, &(n as i64), &*meta);
            }
        }
        self.wrap(y, &out)
    }

    fn scale(&self, x: &Tensor<f32>, c: f32) -> Result<Tensor<f32>> {
        let n = x.numel();
        let mut y = self.fresh(n)?;
        if n > 0 {
            launch!(self, "scale", grid(n), self.slice(x)?, &c, &mut y, &(n as i64));
        }
        self.wrap(y, x.shape())
    }

    /// `x` broadcast to `to` (right-aligned, as the binary ops broadcast).
    fn broadcast(&self, x: &Tensor<f32>, to: &[usize]) -> Result<Tensor<f32>> {
        let n = shape::numel("broadcast", to)?;
        let mut y = self.fresh(n)?;
        if n > 0 {
            let mut meta = vec![to.len() as i64];
            meta.extend(to.iter().map(|&d| d as i64));
            meta.extend(shape::broadcast_strides(x.shape(), to).iter().map(|&d| d as i64));
            let meta = self.table(meta)?;
            launch!(self, "bcast_copy", grid(n), self.slice(x)?, &mut y, &(n as i64), &*meta);
        }
        self.wrap(y, to)
    }

    /// Sums `x` over the axes where `keep` is false; the result has `out` as shape (the kept
    /// axes in order, with or without ones where the others were).
    fn reduce(&self, x: &Tensor<f32>, keep: &[bool], out: &[usize]) -> Result<Tensor<f32>> {
        let s = x.shape();
        let st = shape::strides(s);
        let (mut kept, mut red) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for (d, &k) in keep.iter().enumerate() {
            let (dims, strides) = if k { (&mut kept.0, &mut kept.1) } else { (&mut red.0, &mut red.1) };
            dims.push(s[d] as i64);
            strides.push(st[d] as i64);
        }
        let n_out: usize = kept.0.iter().product::<i64>() as usize;
        let n_red: usize = red.0.iter().product::<i64>() as usize;
        // A sum over n_red values: reduce_sum writes every output, an empty sum is zero.
        let mut y = self.product_out(n_out, n_red)?;
        if n_out > 0 && n_red > 0 {
            let mut meta = vec![kept.0.len() as i64];
            meta.extend(&kept.0);
            meta.extend(&kept.1);
            meta.push(red.0.len() as i64);
            meta.extend(&red.0);
            meta.extend(&red.1);
            let meta = self.table(meta)?;
            launch!(self, "reduce_sum", per_block(n_out), self.slice(x)?, &mut y, &(n_out as i64), &(n_red as i64), &*meta);
        }
        self.wrap(y, out)
    }

    /// The gradient of a broadcast: `g` summed down to `shape`.
    fn sum_to(&self, g: &Tensor<f32>, to: &[usize]) -> Result<Tensor<f32>> {
        if g.shape() == to {
            return Ok(g.clone());
        }
        let lead = g.rank() - to.len();
        let keep: Vec<bool> = g.shape().iter().enumerate().map(|(d, &n)| d >= lead && (to[d - lead] == n)).collect();
        self.reduce(g, &keep, to)
    }

    fn unary(&self, u: Unary, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let (code, p0, p1) = unary_code(u);
        let n = x.numel();
        let mut y = self.fresh(n)?;
        if n > 0 {
            launch!(self, "unary_fwd", grid(n), &code, &p0, &p1, self.slice(x)?, &mut y, &(n as i64));
        }
        self.wrap(y, x.shape())
    }

    // ---- products and convolution ----

    fn matmul(&self, a: &Tensor<f32>, b: &Tensor<f32>, tb: bool) -> Result<Tensor<f32>> {
        let (as_, bs) = (a.shape(), b.shape());
        let ([m, k], [b0, b1]) = (dims2(as_)?, dims2(bs)?);
        let (kb, n) = if tb { (b1, b0) } else { (b0, b1) };
        if k != kb {
            stride_tensor::bail!(shape, "matmul", "cannot multiply {as_:?} by {bs:?}{}", if tb { " transposed" } else { "" });
        }
        let mut c = self.product_out(m * n, k)?;
        self.gemm(Mm { m, n, k, ta: false, tb, beta: 0.0 }, self.slice(a)?, self.slice(b)?, &mut c)?;
        self.wrap(c, &[m, n])
    }

    // ---- pooling ----

    fn pool_args(g: &PoolGeom) -> Result<[i32; 14]> {
        let v = [
            g.n * g.c,
            g.h,
            g.w,
            g.p,
            g.q,
            g.kernel.0,
            g.kernel.1,
            g.stride.0,
            g.stride.1,
            g.pad.0,
            g.pad.1,
            g.pad.2,
            g.pad.3,
            g.count_include_pad as usize,
        ];
        let mut out = [0i32; 14];
        for (o, x) in out.iter_mut().zip(v) {
            *o = int("pool", x)?;
        }
        Ok(out)
    }

    /// Max (or average) pooling `g` of `x` on cuDNN: `None` when cuDNN is off or cannot
    /// describe `g` (the kernels run it then).
    fn pool_on_dnn(&self, g: &PoolGeom, max: bool, x: &Tensor<f32>) -> Result<Option<CudaSlice<f32>>> {
        let (Some(dnn), Some(s)) = (&self.dnn, PoolShape::of(g, max)) else {
            return Ok(None);
        };
        let mut y = self.fresh(g.n * g.c * g.p * g.q)?;
        dnn.pool_forward(&s, self.slice(x)?, &mut y)?;
        Ok(Some(y))
    }

    /// x's gradient for a pooling [`Self::pool_on_dnn`] ran, from its input, output and the
    /// output's gradient.
    fn pool_backward_on_dnn(&self, g: &PoolGeom, max: bool, x: &Tensor<f32>, y: &Tensor<f32>, gy: &Tensor<f32>) -> Result<Tensor<f32>> {
        let op = if max { "max_pool2d" } else { "avg_pool2d" };
        let (Some(dnn), Some(s)) = (&self.dnn, PoolShape::of(g, max)) else {
            return Err(Error::device(op, "a backward pass on cuDNN for a forward pass it did not run"));
        };
        let mut dx = self.fresh(x.numel())?;
        dnn.pool_backward(&s, self.slice(x)?, self.slice(y)?, self.slice(gy)?, &mut dx)?;
        self.wrap(dx, x.shape())
    }
}

/// [N*C, H, W, P, Q] of an adaptive pool of `x` to `out`, checked.
fn adaptive_args(op: &'static str, x: &[usize], out: (usize, usize)) -> Result<[i32; 5]> {
    let [n, c, h, w] = stride_kernels::pool::adaptive_check(op, x, out)?;
    Ok([int(op, n * c)?, int(op, h)?, int(op, w)?, int(op, out.0)?, int(op, out.1)?])
}

fn dims2(s: &[usize]) -> Result<[usize; 2]> {
    match *s {
        [a, b] => Ok([a, b]),
        _ => Err(Error::shape("matmul", format!("expects 2-D operands, got shape {s:?}"))),
    }
}

fn check_bias(op: &'static str, bias: Option<&Tensor<f32>>, channels: usize) -> Result<()> {
    match bias {
        Some(b) if b.shape() != [channels] => {
            Err(Error::shape(op, format!("bias has shape {:?}, expected [{channels}] (one per output channel)", b.shape())))
        }
        _ => Ok(()),
    }
}

/// (outer, dim, inner) of a softmax along `axis`.
fn split_axis(op: &'static str, s: &[usize], axis: usize) -> Result<(usize, usize, usize)> {
    shape::check_axis(op, axis, s)?;
    if s[axis] == 0 {
        stride_tensor::bail!(shape, op, "axis {axis} of shape {s:?} is empty");
    }
    Ok((s[..axis].iter().product(), s[axis], s[axis + 1..].iter().product()))
}

impl Backend<f32> for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn describe(&self) -> String {
        self.about.clone()
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }

    fn upload(&self, host: &[f32]) -> Result<Arc<dyn DeviceBuffer<f32>>> {
        let data = if host.is_empty() {
            self.zeros(0)?
        } else {
            self.stream.clone_htod(host).map_err(|e| alloc_err("copying to the device", host.len() * 4, e))?
        };
        Ok(Arc::new(CudaBuf { ordinal: self.ordinal, data, len: host.len(), stream: self.stream.clone() }))
    }

    fn full(&self, shape: &[usize], value: f32) -> Result<Tensor<f32>> {
        let n = shape::numel("full", shape)?;
        self.wrap(self.filled(n, value)?, shape)
    }

    fn update(&self, rule: &Update, w: &Tensor<f32>, g: &Tensor<f32>, state: &[Tensor<f32>]) -> Result<(Tensor<f32>, Vec<Tensor<f32>>)> {
        let mut out = self.update_many(rule, &[(w, g, state)])?;
        out.pop().ok_or_else(|| Error::device("update", "no update"))
    }

    fn update_many(&self, rule: &Update, items: &[UpdateItem<'_, f32>]) -> Result<Vec<Updated<f32>>> {
        let name = match rule {
            Update::Sgd { .. } => "sgd_update",
            Update::Adam { .. } => "adam_update",
            Update::RmsProp { .. } => "rmsprop_update",
        };
        self.timed(name, Pass::Forward, || self.update_many_on(rule, items))
    }

    fn forward(&self, prim: &Prim, x: &[Tensor<f32>]) -> Result<Forward<f32>> {
        self.timed(prim.name(), Pass::Forward, || self.forward_on(prim, x))
    }

    fn backward(&self, prim: &Prim, saved: &dyn Any, g: &Tensor<f32>, x: &[Tensor<f32>], y: &Tensor<f32>) -> Result<Vec<Option<Tensor<f32>>>> {
        self.timed(prim.name(), Pass::Backward, || self.backward_on(prim, saved, g, x, y))
    }
}

impl CudaBackend {
    fn forward_on(&self, prim: &Prim, x: &[Tensor<f32>]) -> Result<Forward<f32>> {
        let done = |y: Tensor<f32>| Ok(Forward { y, state: Vec::new(), saved: Box::new(Saved::Nothing) });
        match prim {
            Prim::Add => done(self.binary(0, &x[0], &x[1])?),
            Prim::Sub => done(self.binary(1, &x[0], &x[1])?),
            Prim::Mul => done(self.binary(2, &x[0], &x[1])?),
            Prim::Div => done(self.binary(3, &x[0], &x[1])?),
            Prim::Unary(u) => done(self.unary(*u, &x[0])?),
            Prim::Sum { axes, keepdim } => {
                let s = x[0].shape();
                let mut keep = vec![true; s.len()];
                for &a in axes {
                    shape::check_axis("sum", a, s)?;
                    if !std::mem::replace(&mut keep[a], false) {
                        stride_tensor::bail!(arg, "sum", "axis {a} appears twice in {axes:?}");
                    }
                }
                let out: Vec<usize> = s
                    .iter()
                    .zip(&keep)
                    .filter_map(|(&d, &k)| {
                        if k {
                            Some(d)
                        } else if *keepdim {
                            Some(1)
                        } else {
                            None
                        }
                    })
                    .collect();
                done(self.reduce(&x[0], &keep, &out)?)
            }
            Prim::Permute { perm } => done(self.permute(&x[0], perm)?),
            Prim::Narrow { axis, start, len } => done(self.narrow(&x[0], *axis, *start, *len)?),
            Prim::Pad { pads, value } => done(self.pad(&x[0], pads, *value)?),
            Prim::Concat { axis } => done(self.concat(x, *axis)?),
            Prim::UpsampleNearest { scale } => done(self.upsample(&x[0], *scale)?),
            Prim::MatMul { transpose_b } => done(self.matmul(&x[0], &x[1], *transpose_b)?),
            Prim::Conv2d { opts } => done(self.conv2d(x, opts)?),
            Prim::ConvTranspose2d { opts } => done(self.conv_transpose2d(x, opts)?),
            Prim::MaxPool2d { opts } => {
                let g = PoolGeom::new("max_pool2d", x[0].shape(), opts)?;
                if let Some(y) = self.pool_on_dnn(&g, true, &x[0])? {
                    // cuDNN's backward pass finds the maxima again: no argmax kept.
                    return done(self.wrap(y, &g.out_shape())?);
                }
                let a = Self::pool_args(&g)?;
                let n = g.n * g.c * g.p * g.q;
                let mut y = self.fresh(n)?;
                let mut arg = self.fresh_indices(n)?;
                if n > 0 {
                    launch!(self, "max_pool_fwd", grid(n), self.slice(&x[0])?, &mut y, &mut arg, &a);
                }
                Ok(Forward { y: self.wrap(y, &g.out_shape())?, state: Vec::new(), saved: Box::new(Saved::Argmax(arg)) })
            }
            Prim::AvgPool2d { opts } => {
                let g = PoolGeom::new("avg_pool2d", x[0].shape(), opts)?;
                if let Some(y) = self.pool_on_dnn(&g, false, &x[0])? {
                    return done(self.wrap(y, &g.out_shape())?);
                }
                let a = Self::pool_args(&g)?;
                let n = g.n * g.c * g.p * g.q;
                let mut y = self.fresh(n)?;
                if n > 0 {
                    launch!(self, "avg_pool_fwd", grid(n), self.slice(&x[0])?, &mut y, &a);
                }
                done(self.wrap(y, &g.out_shape())?)
            }
            Prim::AdaptiveAvgPool2d { out } | Prim::AdaptiveMaxPool2d { out } => {
                let max = matches!(prim, Prim::AdaptiveMaxPool2d { .. });
                let [nc, h, w, p, q] = adaptive_args(prim.name(), x[0].shape(), *out)?;
                let n = x[0].shape()[0] * x[0].shape()[1] * out.0 * out.1;
                let mut y = self.fresh(n)?;
                // SAFETY: in max mode adaptive_pool_fwd writes every one of the n indices; in
                // average mode it writes none, and the one-element buffer is never read.
                let mut arg = unsafe { self.stream.alloc::<i32>(if max { n.max(1) } else { 1 }) }.map_err(|e| alloc_err("allocating", n * 4, e))?;
                if n > 0 {
                    launch!(self, "adaptive_pool_fwd", grid(n), self.slice(&x[0])?, &mut y, &mut arg, &i32::from(max), &nc, &h, &w, &p, &q);
                }
                let saved = if max { Saved::Argmax(arg) } else { Saved::Nothing };
                Ok(Forward { y: self.wrap(y, &[x[0].shape()[0], x[0].shape()[1], out.0, out.1])?, state: Vec::new(), saved: Box::new(saved) })
            }
            Prim::BatchNorm { training, opts } => self.batch_norm(x, *training, opts),
            Prim::Softmax { axis } | Prim::LogSoftmax { axis } => {
                let log = matches!(prim, Prim::LogSoftmax { .. }) as i32;
                let (o, d, i) = split_axis(prim.name(), x[0].shape(), *axis)?;
                let mut y = self.fresh(x[0].numel())?;
                if o * i > 0 {
                    launch!(self, "softmax_fwd", grid(o * i), self.slice(&x[0])?, &mut y, &(o as i64), &(d as i64), &(i as i64), &log);
                }
                done(self.wrap(y, x[0].shape())?)
            }
            Prim::Nll { targets } => {
                let s = x[0].shape();
                let [n, c] = s[..] else {
                    stride_tensor::bail!(shape, "nll_loss", "expects [N, C] scores, got shape {s:?}");
                };
                if targets.len() != n || n == 0 {
                    stride_tensor::bail!(shape, "nll_loss", "{} targets for a batch of {n}", targets.len());
                }
                if let Some((i, &t)) = targets.iter().enumerate().find(|(_, &t)| t >= c) {
                    stride_tensor::bail!(arg, "nll_loss", "target {t} at position {i} is not a class index below {c}");
                }
                let t: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
                let t = self.stream.clone_htod(&t).map_err(|e| alloc_err("copying to the device", t.len() * 4, e))?;
                let mut loss = self.fresh(1)?;
                launch!(self, "nll_fwd", grid(1), self.slice(&x[0])?, &t, &mut loss, &int("nll_loss", n)?, &int("nll_loss", c)?);
                Ok(Forward { y: self.wrap(loss, &[])?, state: Vec::new(), saved: Box::new(Saved::Targets(t)) })
            }
            Prim::Max { axis, keepdim } => {
                let s = x[0].shape();
                let (o, d, i) = split_axis("max", s, *axis)?;
                int("max", d)?; // the index kept per output is 32-bit
                let (mut y, mut arg) = (self.fresh(o * i)?, self.fresh_indices(o * i)?);
                if o * i > 0 {
                    launch!(self, "max_axis_fwd", grid(o * i), self.slice(&x[0])?, &mut y, &mut arg, &(o as i64), &(d as i64), &(i as i64));
                }
                let mut out = s.to_vec();
                if *keepdim {
                    out[*axis] = 1;
                } else {
                    out.remove(*axis);
                }
                Ok(Forward { y: self.wrap(y, &out)?, state: Vec::new(), saved: Box::new(Saved::Argmax(arg)) })
            }
            Prim::ChannelMaxPool { depth, stride } => {
                let ([n, c, h, w], co) = stride_kernels::pool::channel_max_check("channel_max_pool", x[0].shape(), *depth, *stride)?;
                let total = n * co * h * w;
                let (mut y, mut arg) = (self.fresh(total)?, self.fresh_indices(total)?);
                if total > 0 {
                    let i = |v| int("channel_max_pool", v);
                    let hw = (h * w) as i64;
                    launch!(
                        self,
                        "channel_max_fwd",
                        grid(total),
                        self.slice(&x[0])?,
                        &mut y,
                        &mut arg,
                        &i(c)?,
                        &i(co)?,
                        &hw,
                        &i(*depth)?,
                        &i(*stride)?,
                        &(total as i64)
                    );
                }
                Ok(Forward { y: self.wrap(y, &[n, co, h, w])?, state: Vec::new(), saved: Box::new(Saved::Argmax(arg)) })
            }
            Prim::LpPool2d { p, opts } => {
                let g = PoolGeom::new("lp_pool2d", x[0].shape(), opts)?;
                let a = Self::pool_args(&g)?;
                let n = g.n * g.c * g.p * g.q;
                let mut y = self.fresh(n)?;
                if n > 0 {
                    launch!(self, "lp_pool_fwd", grid(n), self.slice(&x[0])?, &mut y, &a, &(*p as f32));
                }
                done(self.wrap(y, &g.out_shape())?)
            }
        }
    }

    fn backward_on(&self, prim: &Prim, saved: &dyn Any, g: &Tensor<f32>, x: &[Tensor<f32>], y: &Tensor<f32>) -> Result<Vec<Option<Tensor<f32>>>> {
        let saved = saved.downcast_ref::<Saved>().ok_or_else(|| Error::device(prim.name(), "saved state of another backend"))?;
        let one = |t: Tensor<f32>| Ok(vec![Some(t)]);
        match (prim, saved) {
            (Prim::Add | Prim::Sub | Prim::Mul | Prim::Div, _) => {
                let (a, b) = (&x[0], &x[1]);
                let (ga, gb) = match prim {
                    Prim::Add => (g.clone(), g.clone()),
                    Prim::Sub => (g.clone(), self.scale(g, -1.0)?),
                    Prim::Mul => (self.binary(2, g, b)?, self.binary(2, g, a)?),
                    _ => {
                        let ga = self.binary(3, g, b)?;
                        let gb = self.scale(&self.binary(3, &self.binary(2, &ga, a)?, b)?, -1.0)?;
                        (ga, gb)
                    }
                };
                Ok(vec![Some(self.sum_to(&ga, a.shape())?), Some(self.sum_to(&gb, b.shape())?)])
            }
            (Prim::Unary(u), _) => {
                let (code, p0, p1) = unary_code(*u);
                let n = x[0].numel();
                let mut dx = self.fresh(n)?;
                if n > 0 {
                    launch!(self, "unary_bwd", grid(n), &code, &p0, &p1, self.slice(g)?, self.slice(&x[0])?, self.slice(y)?, &mut dx, &(n as i64));
                }
                one(self.wrap(dx, x[0].shape())?)
            }
            (Prim::Sum { axes, .. }, _) => {
                // g with ones where the summed axes were, broadcast back.
                let kept: Vec<usize> = x[0].shape().iter().enumerate().map(|(d, &n)| if axes.contains(&d) { 1 } else { n }).collect();
                one(self.broadcast(&g.reshape(&kept)?, x[0].shape())?)
            }
            (Prim::Permute { perm }, _) => one(self.permute_backward(g, perm)?),
            (Prim::Narrow { axis, start, .. }, _) => one(self.narrow_backward(g, x[0].shape(), *axis, *start)?),
            (Prim::Pad { pads, .. }, _) => one(self.pad_backward(g, x[0].shape(), pads)?),
            (Prim::Concat { axis }, _) => self.concat_backward(g, x, *axis),
            (Prim::UpsampleNearest { scale }, _) => one(self.upsample_backward(g, x[0].shape(), *scale)?),
            (Prim::MatMul { transpose_b }, _) => {
                let (a, b) = (&x[0], &x[1]);
                let (m, k) = (a.shape()[0], a.shape()[1]);
                let n = g.shape()[1];
                let (sg, sa, sb) = (self.slice(g)?, self.slice(a)?, self.slice(b)?);
                let mut da = self.product_out(m * k, n)?;
                let mut db = self.product_out(k * n, m)?;
                if *transpose_b {
                    // C = A B^T (B stored [n, k]): dA = G B, dB = G^T A.
                    self.gemm(Mm { m, n: k, k: n, ta: false, tb: false, beta: 0.0 }, sg, sb, &mut da)?;
                    self.gemm(Mm { m: n, n: k, k: m, ta: true, tb: false, beta: 0.0 }, sg, sa, &mut db)?;
                } else {
                    // dA = G B^T, dB = A^T G.
                    self.gemm(Mm { m, n: k, k: n, ta: false, tb: true, beta: 0.0 }, sg, sb, &mut da)?;
                    self.gemm(Mm { m: k, n, k: m, ta: true, tb: false, beta: 0.0 }, sa, sg, &mut db)?;
                }
                Ok(vec![Some(self.wrap(da, a.shape())?), Some(self.wrap(db, b.shape())?)])
            }
            (Prim::Conv2d { opts }, _) => self.conv2d_backward(opts, g, x),
            (Prim::ConvTranspose2d { opts }, _) => self.conv_transpose2d_backward(opts, g, x),
            (Prim::MaxPool2d { opts }, Saved::Nothing) => {
                let pg = PoolGeom::new("max_pool2d", x[0].shape(), opts)?;
                one(self.pool_backward_on_dnn(&pg, true, &x[0], y, g)?)
            }
            (Prim::MaxPool2d { .. } | Prim::AdaptiveMaxPool2d { .. }, Saved::Argmax(arg)) => {
                // The forward pass checked both shapes as [N, C, H, W] and [N, C, P, Q].
                let plane = |s: &[usize]| s[2..].iter().product::<usize>() as i64;
                let (out_plane, in_plane, total) = (plane(g.shape()), plane(x[0].shape()), g.numel());
                let mut dx = self.zeros(x[0].numel())?;
                if total > 0 {
                    launch!(self, "scatter_planes", grid(total), self.slice(g)?, arg, &mut dx, &out_plane, &in_plane, &(total as i64));
                }
                one(self.wrap(dx, x[0].shape())?)
            }
            (Prim::Max { axis, .. }, Saved::Argmax(arg)) => {
                let s = x[0].shape();
                let (_, d, i) = split_axis("max", s, *axis)?;
                let mut dx = self.zeros(x[0].numel())?;
                if g.numel() > 0 {
                    launch!(self, "max_axis_bwd", grid(g.numel()), self.slice(g)?, arg, &mut dx, &(d as i64), &(i as i64), &(g.numel() as i64));
                }
                one(self.wrap(dx, s)?)
            }
            (Prim::ChannelMaxPool { .. }, Saved::Argmax(arg)) => {
                // The forward pass checked x as [N, C, H, W] and g as [N, CO, H, W].
                let (s, gs) = (x[0].shape(), g.shape());
                let mut dx = self.zeros(x[0].numel())?;
                if g.numel() > 0 {
                    let (c, co) = (int("channel_max_pool", s[1])?, int("channel_max_pool", gs[1])?);
                    let hw = (s[2] * s[3]) as i64;
                    launch!(self, "channel_max_bwd", grid(g.numel()), self.slice(g)?, arg, &mut dx, &c, &co, &hw, &(g.numel() as i64));
                }
                one(self.wrap(dx, s)?)
            }
            (Prim::LpPool2d { p, opts }, _) => {
                let pg = PoolGeom::new("lp_pool2d", x[0].shape(), opts)?;
                let a = Self::pool_args(&pg)?;
                let mut dx = self.zeros(x[0].numel())?;
                if g.numel() > 0 {
                    launch!(self, "lp_pool_bwd", grid(g.numel()), self.slice(&x[0])?, self.slice(y)?, self.slice(g)?, &mut dx, &a, &(*p as f32));
                }
                one(self.wrap(dx, x[0].shape())?)
            }
            (Prim::AvgPool2d { opts }, _) => {
                let pg = PoolGeom::new("avg_pool2d", x[0].shape(), opts)?;
                if self.dnn.is_some() && PoolShape::of(&pg, false).is_some() {
                    return one(self.pool_backward_on_dnn(&pg, false, &x[0], y, g)?);
                }
                let a = Self::pool_args(&pg)?;
                let mut dx = self.zeros(x[0].numel())?;
                if g.numel() > 0 {
                    launch!(self, "avg_pool_bwd", grid(g.numel()), self.slice(g)?, &mut dx, &a);
                }
                one(self.wrap(dx, x[0].shape())?)
            }
            (Prim::AdaptiveAvgPool2d { out }, _) => {
                let [nc, h, w, p, q] = adaptive_args(prim.name(), x[0].shape(), *out)?;
                let total = x[0].numel();
                let mut dx = self.fresh(total)?;
                if total > 0 {
                    launch!(self, "adaptive_avg_bwd", grid(total), self.slice(g)?, &mut dx, &nc, &h, &w, &p, &q);
                }
                one(self.wrap(dx, x[0].shape())?)
            }
            (Prim::BatchNorm { training, opts }, Saved::Stats { mean, invstd }) => self.batch_norm_backward(*training, opts, mean, invstd, g, x),
            (Prim::BatchNorm { training: false, opts }, Saved::Running { mean, var }) => self.batch_norm_backward_running(opts, (mean, var), g, x),
            (Prim::Softmax { axis } | Prim::LogSoftmax { axis }, _) => {
                let log = matches!(prim, Prim::LogSoftmax { .. }) as i32;
                let (o, d, i) = split_axis(prim.name(), y.shape(), *axis)?;
                let mut dx = self.fresh(y.numel())?;
                if o * i > 0 {
                    launch!(self, "softmax_bwd", grid(o * i), self.slice(y)?, self.slice(g)?, &mut dx, &(o as i64), &(d as i64), &(i as i64), &log);
                }
                one(self.wrap(dx, y.shape())?)
            }
            (Prim::Nll { .. }, Saved::Targets(t)) => {
                let (n, c) = (x[0].shape()[0], x[0].shape()[1]);
                let mut dx = self.fresh(n * c)?;
                launch!(self, "nll_bwd", grid(n * c), self.slice(g)?, t, &mut dx, &int("nll_loss", n)?, &int("nll_loss", c)?);
                one(self.wrap(dx, x[0].shape())?)
            }
            _ => Err(Error::device(prim.name(), "backward without the state its forward pass saves")),
        }
    }
}

// After the macros and helpers above, which they use.
mod conv;
mod dnn;
mod layout;
mod norm;
mod profile;
#[cfg(test)]
mod tests;
mod update;

use dnn::{Dnn, PoolShape};
use profile::{Pass, Profile};
