//! The binary's global allocator: mimalloc, counted. The count (bytes allocated now and at
//! the peak) lets `stride summary --measure` set its predictions beside what a real step used.
//!
//! Why mimalloc: glibc's malloc returns large freed blocks to the kernel and maps them again
//! on the next allocation, so every training step paid page faults, page zeroing and TLB
//! shootdowns for the activations of the step before. mimalloc keeps them for reuse. Same run,
//! interleaved, 2 cores: lenet_train 2,911 -> 4,040 images/s (medians of 4), resnet18_train
//! 32.6 -> 33.6, resnet18_infer 96 -> 117, vae_train 777 -> 748 (-4%).

use std::alloc::{GlobalAlloc, Layout};

static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    // mimalloc's option setter, in the library `libmimalloc-sys` builds and links (its Rust
    // declaration sits behind a feature that pulls in another crate, for one call).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2.1 and v3 alike).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keeps freed memory with the process instead of handing it back to the kernel 10 ms after
/// it is freed (mimalloc's default). A training step that takes longer than that (the VAE's
/// on a busy machine, 11-12 ms) found the last step's buffers given back and faulted them in
/// again: per-op timing of the same binary with the environment's MIMALLOC_PURGE_DELAY=-1,
/// the VAE's first dense layer's 2 MB weight gradient took 0.17 ms a step instead of
/// 0.52-0.82, and the step 11.2-11.3 ms instead of 11.9-12.1; a 205-step run took 301 minor
/// page faults instead of 6,500-9,200. Where steps are shorter than 10 ms it changes nothing
/// (vae_train 2,945 against 2,963 images/s, six rounds). Peak memory is what it was (the
/// peak is when the buffers are all live): vae 135 MB, lenet 75 MB, resnet18 569 -> 608 MB.
pub fn keep_freed_memory() {
    // SAFETY: a plain setter of an integer option, callable at any time from any thread.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counting;

static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn grow(n: usize) {
    let now = CURRENT.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrink(n: usize) {
    CURRENT.fetch_sub(n as u64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to mimalloc; only counters change.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { INNER.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { INNER.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { INNER.dealloc(ptr, layout) };
        shrink(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { INNER.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrink(layout.size());
            grow(new_size);
        }
        p
    }
}

/// Bytes allocated now.
pub fn current() -> u64 {
    CURRENT.load(Ordering::Relaxed)
}

/// Starts a new peak from the current level; returns that level.
pub fn reset_peak() -> u64 {
    let now = current();
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// The most bytes allocated at once since the last `reset_peak`.
pub fn peak() -> u64 {
    PEAK.load(Ordering::Relaxed)
}
