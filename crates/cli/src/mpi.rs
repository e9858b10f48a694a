//! Open MPI for data-parallel training (`--features mpi`): the world communicator as the
//! training loop's [`Group`].
//!
//! Every MPI call after start-up is made by one communication thread, in the order the training
//! loop asks for them (MPI's "serialized" threading), so gradient sums can run while the main
//! thread is still in the backward pass. A watchdog ends the job with the rank and the reason
//! when a collective never completes (a rank died or hangs) instead of hanging.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::environment::Threading;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use stride_train::group::{Group, Pending};
use stride_train::{Result, TrainError};

/// Seconds a collective may wait before the job is stopped (`STRIDE_MPI_TIMEOUT`, default 300).
fn timeout() -> Duration {
    let secs = std::env::var("STRIDE_MPI_TIMEOUT").ok().and_then(|v| v.parse::<u64>().ok()).filter(|s| *s > 0).unwrap_or(300);
    Duration::from_secs(secs)
}

/// This process's place among the job's processes on its machine, as the launcher says before
/// MPI starts (Open MPI's `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`); `None`
/// outside `mpirun`.
pub fn local_rank() -> Option<usize> {
    crate::launcher_number(&["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"])
}

enum Job {
    SumF32(Vec<f32>, Sender<Vec<f32>>),
    SumF64(Vec<f64>, Sender<Vec<f64>>),
    BroadcastF32(Vec<f32>, Sender<Vec<f32>>),
    BroadcastF64(Vec<f64>, Sender<Vec<f64>>),
}

pub struct World {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    rank: usize,
    size: usize,
    /// Nanoseconds the training loop spent waiting for collectives (the part of their time the
    /// backward pass did not hide).
    waited: Arc<AtomicU64>,
    // Finalizes MPI when dropped, after the communication thread has ended (see Drop).
    _universe: mpi::environment::Universe,
}

impl World {
    /// Joins the job `mpirun` started (a single process is a world of one).
    pub fn init() -> std::result::Result<World, String> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized).ok_or("MPI was already initialised")?;
        if threading < Threading::Serialized {
            return Err(format!("this MPI gives threading level {threading:?}; Stride needs Serialized (one thread calls MPI at a time)"));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        // When the collective now running began (ms since `start`); 0 when none runs.
        let entered = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let (watch, limit) = (entered.clone(), timeout());
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
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::spawn(move || communicate(rx, entered, start));
        Ok(World { jobs: Some(tx), thread: Some(thread), rank, size, waited: Arc::new(AtomicU64::new(0)), _universe: universe })
    }

    fn submit<T>(&self, make: impl FnOnce(Sender<T>) -> Job) -> Result<Receiver<T>> {
        let (tx, rx) = channel();
        let jobs = self.jobs.as_ref().ok_or_else(|| TrainError::Config("MPI has been shut down".into()))?;
        jobs.send(make(tx)).map_err(|_| TrainError::Config(format!("rank {}: the MPI thread has stopped", self.rank)))?;
        Ok(rx)
    }

    /// Sends `buf` through the collective `job` and waits for the result in its place.
    fn round_trip<T: Copy>(&self, buf: &mut [T], job: fn(Vec<T>, Sender<Vec<T>>) -> Job) -> Result<()> {
        let rx = self.submit(|tx| job(buf.to_vec(), tx))?;
        buf.copy_from_slice(&timed_recv(rx, self.rank, &self.waited)?);
        Ok(())
    }
}

/// Waits for a collective's result, adding the time waited to `waited`.
fn timed_recv<T>(rx: Receiver<T>, rank: usize, waited: &AtomicU64) -> Result<T> {
    let t = Instant::now();
    let r = rx.recv().map_err(|_| TrainError::Config(format!("rank {rank}: the MPI thread has stopped")));
    waited.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// The communication thread: runs the jobs in order, the only caller of MPI after start-up.
fn communicate(jobs: Receiver<Job>, entered: Arc<AtomicU64>, start: Instant) {
    let world = SimpleCommunicator::world();
    let root = world.process_at_rank(0);
    for job in jobs {
        entered.store(start.elapsed().as_millis().max(1) as u64, Ordering::SeqCst);
        // A receiver that is gone (the loop returned early) is no error here.
        match job {
            Job::SumF32(buf, reply) => {
                let mut out = vec![0.0f32; buf.len()];
                world.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
                let _ = reply.send(out);
            }
            Job::SumF64(buf, reply) => {
                let mut out = vec![0.0f64; buf.len()];
                world.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
                let _ = reply.send(out);
            }
            Job::BroadcastF32(mut buf, reply) => {
                root.broadcast_into(&mut buf[..]);
                let _ = reply.send(buf);
            }
            Job::BroadcastF64(mut buf, reply) => {
                root.broadcast_into(&mut buf[..]);
                let _ = reply.send(buf);
            }
        }
        entered.store(0, Ordering::SeqCst);
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // End the communication thread before the universe finalizes MPI.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Group for World {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.round_trip(buf, Job::SumF32)
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.round_trip(buf, Job::SumF64)
    }
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.round_trip(buf, Job::BroadcastF32)
    }
    fn broadcast_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.round_trip(buf, Job::BroadcastF64)
    }
    fn start_sum_f32(&self, buf: Vec<f32>) -> Result<Pending> {
        let rx = self.submit(|tx| Job::SumF32(buf, tx))?;
        let (rank, waited) = (self.rank, self.waited.clone());
        Ok(Pending(Box::new(move || timed_recv(rx, rank, &waited))))
    }
    fn collective_seconds(&self) -> f64 {
        self.waited.load(Ordering::Relaxed) as f64 * 1e-9
    }
}
