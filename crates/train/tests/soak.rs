//! A long run keeps its memory flat. Two measures, because they fail for different reasons:
//! - live heap bytes (this binary counts every allocation and free): after the first epochs
//!   have filled the caches (plans, arenas, workspaces), 1,600 more steps may add almost
//!   nothing; a leak of one small tensor a step would add megabytes. Exact, not noisy.
//! - resident memory (from /proc): the allocator's free lists settle in steps over the first
//!   epochs (fragmentation, not a leak), so it gets a looser bound and must be level over the
//!   second half of the run.
//!
//! Its own test binary, so no other test shares the process whose memory it reads.

mod common;
use common::{cfg, model, small};

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use stride_train::{train, TrainConfig};

/// The system allocator, counting the bytes it has live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Reading {
    step: usize,
    live: isize,
    peak_rss: u64,
    rss: u64,
}

/// (peak, current) resident memory of this process in KiB, from /proc.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse::<u64>().unwrap();
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn two_thousand_steps_keep_memory_flat() {
    // One malloc arena for every thread. glibc gives a thread that finds the arenas busy an
    // arena of its own, and `train` starts a new batch-preparing thread each epoch: now and
    // then one got a fresh arena late in the run, and resident memory stepped up by ~9 MB
    // (once in CI, at step ~1000, with the live heap flat), which is the allocator's choice,
    // not this program's memory. The `stride` binary allocates through mimalloc.
    // And a fixed mmap threshold: glibc raises it each time a large mmapped block is freed, so
    // later blocks of that size come from the heap, where freed pages stay resident; with
    // planned training steps this stepped resident memory up by 7 MB at step ~1300 in one CI
    // run, the live heap flat to the KiB.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt is called before this process starts any other thread that allocates.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    // 3,200 images in batches of 32: 100 steps an epoch, 20 epochs.
    let data = small(3200, 200);
    let mut m = model(5);
    let mut at = Vec::new();
    let c = TrainConfig { epochs: 20, ..cfg(20, None) };
    train(&mut m, &data, &c, false, None, |r| {
        let (peak_rss, rss) = rss();
        at.push(Reading { step: r.epoch * 100, live: LIVE.load(Ordering::Relaxed), peak_rss, rss });
    })
    .unwrap();
    for r in &at {
        eprintln!("  step {}: live heap {} KiB, peak resident {} KiB, resident {} KiB", r.step, r.live / 1024, r.peak_rss, r.rss);
    }
    assert_eq!(at.len(), 20, "one reading an epoch");
    let (settled, mid, last) = (&at[3], &at[9], &at[19]);

    // The leak check proper: 1,600 steps after step 400 may add at most 64 KiB of live heap
    // (40 bytes a step). The run's own history takes ~1.4 KiB an epoch (each report keeps its
    // confusion matrix and mistakes): 16 epochs of it measured 24 KiB.
    let grown = last.live - settled.live;
    assert!(grown <= 64 * 1024, "live heap grew by {grown} bytes from step {} to step {} ({} bytes a step)", settled.step, last.step, grown / 1600);

    // Resident memory: level over the second half, and within 15% of step 100's peak overall
    // (with one arena it has measured flat to 0.1% from step 100 to 2,000; with glibc's
    // per-thread arenas it rose 6-8 MB between the first two epochs).
    assert!(
        (last.peak_rss as f64) <= mid.peak_rss as f64 * 1.02,
        "peak resident memory grew from {} KiB at step {} to {} KiB at step {}",
        mid.peak_rss,
        mid.step,
        last.peak_rss,
        last.step
    );
    assert!(
        (last.peak_rss as f64) <= at[0].peak_rss as f64 * 1.15,
        "peak resident memory grew from {} KiB at step 100 to {} KiB",
        at[0].peak_rss,
        last.peak_rss
    );
}
