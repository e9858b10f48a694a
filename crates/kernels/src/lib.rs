//! Stride's CPU kernels over plain slices in NCHW order. All `unsafe` of the project lives
//! here (the one call into the `gemm` crate); every fast path has a portable reference kernel
//! beside it that the tests use as the oracle.

pub mod binary;
pub mod conv;
pub mod gemm;
pub mod norm;
pub mod pool;
pub mod resample;
pub mod simd;
pub mod softmax;
pub mod unary;
pub mod vmath;

/// Tasks a kernel cuts one image's work into for `threads` threads (lowering by channels or
/// by output rows, a taps layer's runs of filters, panels): four a thread, so that a thread
/// whose core is slowed (a busy neighbour, as on the shared reference machine) is helped by
/// the others taking its remaining tasks instead of all of them waiting for it. ResNet-18 at
/// 64x64, batch 1, in a contended spell, three interleaved rounds: 465-470 -> 485-515
/// images/s; the other networks level. The matrix library's split products keep a block a
/// thread: four there (each packing the same operand again) took vae_train from 3,457-4,073
/// to 2,450-2,924 images/s in two rounds.
pub(crate) fn tasks_for(threads: usize) -> usize {
    if threads <= 1 {
        threads
    } else {
        threads * TASKS_PER_THREAD
    }
}

/// See [`tasks_for`].
const TASKS_PER_THREAD: usize = 4;
