//! A long run keeps its memory flat: the peak resident memory at step 2,000 is within 3% of
//! step 400's (once the heap has settled) and within 8% of step 100's. Its own test binary, so no other test shares the
//! process whose memory it reads.

mod common;
use common::{cfg, model, small};

use stride_train::{train, TrainConfig};

/// (peak, current) resident memory of this process in KiB, from /proc.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse::<u64>().unwrap();
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn two_thousand_steps_keep_memory_flat() {
    // 3,200 images in batches of 32: 100 steps an epoch, 20 epochs.
    let data = small(3200, 200);
    let mut m = model(5);
    let mut at = Vec::new();
    let c = TrainConfig { epochs: 20, ..cfg(20, None) };
    train(&mut m, &data, &c, false, None, |r| at.push((r.epoch * 100, rss()))).unwrap();
    let (first, last) = (at[0].1, at[19].1);
    eprintln!("step 100: peak {} KiB, now {} KiB; step 2000: peak {} KiB, now {} KiB", first.0, first.1, last.0, last.1);
    for (step, (peak, now)) in &at {
        eprintln!("  step {step}: peak {peak} KiB, current {now} KiB");
    }
    assert!((last.0 as f64) <= first.0 as f64 * 1.08, "peak grew from {} to {} KiB", first.0, last.0);
    // The heap settles over the first epochs (glibc's free lists: step 100 to 300 has grown
    // 2-3.5% with the same code from one build to the next), so the leak check proper compares
    // with epoch 4's peak, and tighter: 3% over 1,600 steps is a leak of 600 bytes a step.
    let settled_peak = at[3].1 .0;
    assert!((last.0 as f64) <= settled_peak as f64 * 1.03, "peak grew from {settled_peak} KiB at step 400 to {} KiB", last.0);
    // Current resident memory must not creep either: compared with the largest reading of
    // epochs 2-4, after the allocator has settled (a single reading can catch it just after it
    // returned memory, e.g. the arena of the evaluation's plan, and be lower than its level).
    let settled = at[1..4].iter().map(|(_, m)| m.1).max().unwrap();
    assert!((last.1 as f64) <= settled as f64 * 1.03, "resident memory grew from {settled} to {} KiB", last.1);
}
