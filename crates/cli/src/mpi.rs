//! Open MPI for data-parallel training (`--features mpi`): the world communicator as the
//! training loop's [`Group`], and a watchdog so a collective that never completes (a rank died
//! or hangs) ends the job with the rank and the reason instead of hanging.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use stride_train::group::Group;
use stride_train::Result;

/// Seconds a collective may wait before the job is stopped (`STRIDE_MPI_TIMEOUT`, default 300).
fn timeout() -> Duration {
    let secs = std::env::var("STRIDE_MPI_TIMEOUT").ok().and_then(|v| v.parse::<u64>().ok()).filter(|s| *s > 0).unwrap_or(300);
    Duration::from_secs(secs)
}

pub struct World {
    // Finalizes MPI when dropped, after the world is done with.
    _universe: mpi::environment::Universe,
    world: SimpleCommunicator,
    /// Milliseconds since `start` when the collective now running began; 0 when none runs.
    entered: Arc<AtomicU64>,
    start: Instant,
    /// Nanoseconds spent in collectives.
    busy: AtomicU64,
}

impl World {
    /// Joins the job `mpirun` started (a single process is a world of one).
    pub fn init() -> std::result::Result<World, String> {
        let universe = mpi::initialize().ok_or("MPI was already initialised")?;
        let world = universe.world();
        let entered = Arc::new(AtomicU64::new(0));
        let (watch, limit, rank, start) = (entered.clone(), timeout(), world.rank(), Instant::now());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let since = watch.load(Ordering::SeqCst);
            if since > 0 && start.elapsed().saturating_sub(Duration::from_millis(since)) > limit {
                eprintln!(
                    "error: rank {rank}: a collective waited over {} s for the other ranks (one died or hangs); stopping the job (STRIDE_MPI_TIMEOUT sets the limit)",
                    limit.as_secs()
                );
                std::process::exit(3);
            }
        });
        Ok(World { _universe: universe, world, entered, start, busy: AtomicU64::new(0) })
    }

    fn watched<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        self.entered.store(self.start.elapsed().as_millis().max(1) as u64, Ordering::SeqCst);
        let r = f();
        self.entered.store(0, Ordering::SeqCst);
        self.busy.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

impl Group for World {
    fn collective_seconds(&self) -> f64 {
        self.busy.load(Ordering::Relaxed) as f64 * 1e-9
    }
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let mut out = vec![0.0f32; buf.len()];
        self.watched(|| self.world.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum()));
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let mut out = vec![0.0f64; buf.len()];
        self.watched(|| self.world.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum()));
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.watched(|| self.world.process_at_rank(0).broadcast_into(buf));
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.watched(|| self.world.process_at_rank(0).broadcast_into(buf));
        Ok(())
    }
}
