//! Where the GPU's time goes, per primitive: `STRIDE_CUDA_PROFILE=1` times how long the host
//! takes to queue each call's work; `STRIDE_CUDA_PROFILE=sync` also waits for the GPU after each
//! call, so a row is the work's time on the device as well (and the run is slower: nothing
//! overlaps). `stride bench --device cuda` prints the table on stderr.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

use stride_tensor::Result;

use super::CudaBackend;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Pass {
    Forward,
    Backward,
}

/// Calls and seconds per primitive and pass.
type Rows = HashMap<(&'static str, Pass), (u64, f64)>;

pub(super) struct Profile {
    wait: bool,
    rows: Mutex<Rows>,
}

impl Profile {
    pub(super) fn from_env() -> Option<Profile> {
        match std::env::var("STRIDE_CUDA_PROFILE").ok()?.as_str() {
            "" | "0" => None,
            v => Some(Profile { wait: v == "sync", rows: Mutex::new(HashMap::new()) }),
        }
    }
}

impl CudaBackend {
    /// Runs `f`, the work of one primitive call, timed when profiling.
    pub(super) fn timed<R>(&self, name: &'static str, pass: Pass, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let Some(p) = &self.profile else {
            return f();
        };
        let t = Instant::now();
        let r = f()?;
        if p.wait {
            self.stream.synchronize().map_err(|e| crate::err("synchronize", e))?;
        }
        let secs = t.elapsed().as_secs_f64();
        let mut rows = p.rows.lock().unwrap_or_else(|e| e.into_inner());
        let row = rows.entry((name, pass)).or_insert((0, 0.0));
        row.0 += 1;
        row.1 += secs;
        Ok(r)
    }

    /// The table of what was timed since the backend started, largest total first (`None` when
    /// not profiling).
    pub fn profile_report(&self) -> Option<String> {
        let p = self.profile.as_ref()?;
        let rows = p.rows.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = rows.iter().map(|(&(name, pass), &(calls, secs))| (name, pass, calls, secs)).collect();
        rows.sort_by(|a, b| b.3.total_cmp(&a.3));
        let total: f64 = rows.iter().map(|r| r.3).sum();
        let what = if p.wait { "queued and run (each call waited for)" } else { "time to queue the work" };
        let mut out = format!("cuda:{} per primitive, {what}:\n", self.ordinal);
        let _ = writeln!(out, "{:<24} {:>9} {:>10} {:>10} {:>6}", "primitive", "calls", "total ms", "us/call", "share");
        for (name, pass, calls, secs) in rows {
            let label = if pass == Pass::Backward { format!("{name} (backward)") } else { name.to_string() };
            let _ = writeln!(
                out,
                "{label:<24} {calls:>9} {:>10.1} {:>10.1} {:>5.1}%",
                secs * 1e3,
                secs * 1e6 / calls as f64,
                100.0 * secs / total.max(f64::MIN_POSITIVE)
            );
        }
        Some(out)
    }
}
