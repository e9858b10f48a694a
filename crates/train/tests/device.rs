//! Training on a device through the seam (a `HostMirror` standing in for a GPU): the same
//! run as on the CPU, a checkpoint that resumes on the device, and a clear refusal of what
//! does not run there yet.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use stride_autograd::device::{self, HostMirror};
use stride_autograd::{Device, Rng};
use stride_models::{build, InputSpec};
use stride_nn::Module;
use stride_train::{checkpoint, train, OptimizerKind, TrainConfig};

mod common;
use common::{cfg, small, tmp};

fn mirror() -> Device {
    static M: OnceLock<()> = OnceLock::new();
    let dev = Device::Cuda(94);
    M.get_or_init(|| device::register::<f32>(Arc::new(HostMirror::new(dev))));
    dev
}

fn cnn_bn(seed: u64) -> stride_nn::layers::Sequential {
    build("cnn-bn", &mut Rng::seed(seed), InputSpec { channels: 1, height: 28, width: 28, classes: 10 }).unwrap()
}

#[test]
fn a_run_on_a_device_equals_the_run_on_the_cpu() {
    let dev = mirror();
    let data = small(256, 64);
    let on = |device: Device| TrainConfig { device, ..cfg(2, None) };
    let (mut a, mut b) = (cnn_bn(3), cnn_bn(3));
    let cpu = train(&mut a, &data, &on(Device::Cpu), false, None, |_| {}).unwrap();
    let gpu = train(&mut b, &data, &on(dev), false, None, |_| {}).unwrap();
    for (x, y) in cpu.reports.iter().zip(&gpu.reports) {
        assert_eq!(x.train_loss, y.train_loss, "epoch {}: training loss", x.epoch);
        assert_eq!(x.train_accuracy, y.train_accuracy, "epoch {}", x.epoch);
        // Evaluation runs through plans on the CPU and eagerly on the device.
        assert!((x.test.loss - y.test.loss).abs() < 1e-5, "epoch {}: test loss {} vs {}", x.epoch, x.test.loss, y.test.loss);
    }
    assert!(b.parameters().iter().all(|p| p.device() == dev), "the model stays on {dev}");
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));
}

#[test]
fn frozen_layers_a_validation_split_class_weights_accumulation_and_a_weight_average_run_the_same_on_a_device() {
    let dev = mirror();
    let data = small(160, 32);
    let on = |device: Device| TrainConfig {
        device,
        frozen: vec!["0".into(), "1".into()],
        validation_split: Some(0.2),
        class_weights: stride_train::ClassWeights::Balanced,
        accumulate: 2,
        ema: Some(0.9),
        ..cfg(2, None)
    };
    let (mut a, mut b) = (cnn_bn(4), cnn_bn(4));
    let cpu = train(&mut a, &data, &on(Device::Cpu), false, None, |_| {}).unwrap();
    let gpu = train(&mut b, &data, &on(dev), false, None, |_| {}).unwrap();
    let losses = |o: &stride_train::Outcome| o.reports.iter().map(|r| (r.train_loss, r.train_accuracy)).collect::<Vec<_>>();
    assert_eq!(losses(&cpu), losses(&gpu));
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));
    let (x, y) = (cpu.test.unwrap(), gpu.test.unwrap());
    assert!((x.loss - y.loss).abs() < 1e-5, "test loss {} vs {}", x.loss, y.loss);
    // The frozen convolution kept its initial weights on the device too (its average is them).
    assert_eq!(checkpoint::state_dict(&mut b)[0], checkpoint::state_dict(&mut cnn_bn(4))[0]);
}

#[test]
fn a_run_on_a_device_resumes_on_the_device() {
    let dev = mirror();
    let data = small(192, 32);
    let c = |dir| TrainConfig { device: dev, ema: Some(0.9), ..cfg(2, Some(dir)) };
    let whole = tmp("device-whole");
    let mut a = cnn_bn(5);
    train(&mut a, &data, &c(whole.clone()), false, None, |_| {}).unwrap();
    let parts = tmp("device-parts");
    let stop = AtomicBool::new(true);
    train(&mut cnn_bn(5), &data, &c(parts.clone()), false, Some(&stop), |_| {}).unwrap();
    let mut b = cnn_bn(6);
    train(&mut b, &data, &c(parts.clone()), true, None, |_| {}).unwrap();
    assert_eq!(checkpoint::state_dict(&mut a), checkpoint::state_dict(&mut b));
    let mut buffers_on_device = true;
    b.visit("", &mut |_, s| {
        if let stride_nn::Slot::Buffer(t) = s {
            buffers_on_device &= t.device() == dev;
        }
    });
    assert!(buffers_on_device, "a resumed model's buffers are back on {dev}");
    for d in [whole, parts] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_device_without_a_backend_is_refused_before_training() {
    let data = small(64, 16);
    let e = train(&mut cnn_bn(1), &data, &TrainConfig { device: Device::Cuda(61), ..cfg(1, None) }, false, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("cuda:61"), "{e}");
}

/// Ranks as threads of this process, for data-parallel runs without MPI: each collective
/// waits for every rank, and sums add the ranks' values in rank order, so every rank gets the
/// same bits. A rank that stops (an error) ends the others' collectives with an error rather
/// than leaving them waiting.
struct Threads {
    size: usize,
    state: std::sync::Mutex<Meeting>,
    turn: std::sync::Condvar,
}

/// The collective in progress: the values put in so far, how many ranks have arrived and
/// left, and whether a rank has stopped.
#[derive(Default)]
struct Meeting {
    slots: Vec<Vec<f64>>,
    arrived: usize,
    left: usize,
    stopped: bool,
}

struct Rank {
    rank: usize,
    world: Arc<Threads>,
}

impl Rank {
    /// Every rank's `mine`, once all have put theirs in.
    fn exchange(&self, mine: Vec<f64>) -> stride_train::Result<Vec<Vec<f64>>> {
        let w = &self.world;
        let stopped = || stride_train::TrainError::Config(format!("rank {}: another rank stopped", self.rank));
        let mut m = w.state.lock().unwrap();
        // Wait until the previous collective has been read by everyone.
        m = w.turn.wait_while(m, |m| m.left > 0 && !m.stopped).unwrap();
        if m.left > 0 {
            return Err(stopped());
        }
        m.slots.resize(w.size, Vec::new());
        m.slots[self.rank] = mine;
        m.arrived += 1;
        w.turn.notify_all();
        m = w.turn.wait_while(m, |m| m.arrived < w.size && !m.stopped).unwrap();
        if m.arrived < w.size {
            return Err(stopped());
        }
        let all = m.slots.clone();
        m.left += 1;
        if m.left == w.size {
            (m.arrived, m.left) = (0, 0);
        }
        w.turn.notify_all();
        Ok(all)
    }
    fn sum(&self, buf: &mut [f64]) -> stride_train::Result<()> {
        let all = self.exchange(buf.to_vec())?;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = all.iter().map(|r| r[i]).sum();
        }
        Ok(())
    }
}

impl Drop for Rank {
    /// A rank that ends (done or failed) lets no other wait for it.
    fn drop(&mut self) {
        self.world.state.lock().unwrap_or_else(|p| p.into_inner()).stopped = true;
        self.world.turn.notify_all();
    }
}

impl stride_train::group::Group for Rank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.world.size
    }
    fn sum_f32(&self, buf: &mut [f32]) -> stride_train::Result<()> {
        let mut wide: Vec<f64> = buf.iter().map(|&v| v as f64).collect();
        self.sum(&mut wide)?;
        buf.iter_mut().zip(wide).for_each(|(b, w)| *b = w as f32);
        Ok(())
    }
    fn sum_f64(&self, buf: &mut [f64]) -> stride_train::Result<()> {
        self.sum(buf)
    }
    fn broadcast_f32(&self, buf: &mut [f32]) -> stride_train::Result<()> {
        let all = self.exchange(buf.iter().map(|&v| v as f64).collect())?;
        buf.iter_mut().zip(&all[0]).for_each(|(b, &w)| *b = w as f32);
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64]) -> stride_train::Result<()> {
        let all = self.exchange(buf.to_vec())?;
        buf.copy_from_slice(&all[0]);
        Ok(())
    }
}

/// Trains `cnn_bn` on `images` training images on two ranks (threads) on `device`, rank r's model initialised from seed
/// 7 + r (the initial broadcast must make them rank 0's): each rank's weights and buffers, and
/// each rank's reads of device tensors back to the host (16 steps: 2 epochs of 8 batches).
type State = Vec<(String, stride_autograd::Tensor<f32>)>;
fn two_ranks(device: Device, sync_bn: bool, optimizer: OptimizerKind, images: usize) -> Result<(Vec<State>, Vec<usize>), String> {
    two_ranks_with(device, sync_bn, optimizer, images, |c| c)
}

/// [`two_ranks`] with `tweak` applied to each rank's configuration.
fn two_ranks_with(
    device: Device,
    sync_bn: bool,
    optimizer: OptimizerKind,
    images: usize,
    tweak: fn(TrainConfig) -> TrainConfig,
) -> Result<(Vec<State>, Vec<usize>), String> {
    let world = Arc::new(Threads { size: 2, state: Default::default(), turn: Default::default() });
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let world = world.clone();
            std::thread::spawn(move || {
                let data = small(images, 64);
                let group: std::rc::Rc<dyn stride_train::group::Group> = std::rc::Rc::new(Rank { rank, world });
                let c =
                    tweak(TrainConfig { device, sync_bn, optimizer, data_parallel: Some(stride_train::group::DataParallel(group)), ..cfg(2, None) });
                let mut model = cnn_bn(7 + rank as u64);
                let before = HostMirror::reads();
                train(&mut model, &data, &c, false, None, |_| {}).map_err(|e| e.to_string())?;
                assert!(model.parameters().iter().all(|p| p.device() == device), "rank {rank}'s model stays on {device}");
                let reads = HostMirror::reads() - before;
                Ok::<_, String>((checkpoint::state_dict(&mut model), reads))
            })
        })
        .collect();
    let out: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    if out.iter().any(Result::is_err) {
        // Every rank's error: the one that stopped first says why.
        return Err(out.into_iter().filter_map(Result::err).collect::<Vec<_>>().join("; "));
    }
    Ok(out.into_iter().map(Result::unwrap).unzip())
}

#[test]
fn two_ranks_on_a_device_train_as_two_ranks_on_the_cpu() {
    let dev = mirror();
    let (cpu, _) = two_ranks(Device::Cpu, false, OptimizerKind::Adam, 256).unwrap();
    let (gpu, reads) = two_ranks(dev, false, OptimizerKind::Adam, 256).unwrap();
    // The mirror runs the CPU's kernels: the same sums, the same bits. And the ranks end
    // alike (rank 1 started from other weights: rank 0's broadcast replaced them).
    assert_eq!(cpu[0], gpu[0]);
    assert_eq!(gpu[0], gpu[1]);
    // Per step, rank 0 reads the gradients in one bucket (one read, however many parameters),
    // the buffers it broadcasts in one, the loss and the logits' hits; rank 1 the same but the
    // buffers (it takes rank 0's). Then a few a run: the first broadcast and each epoch's test
    // pass (measured: 64 + 7 and 48 + 6). A read per tensor would add 8 a step for the
    // gradients alone.
    assert!(reads[0] <= 16 * 4 + 8 && reads[1] <= 16 * 3 + 8, "reads in 16 steps on ranks 0 and 1: {reads:?}");
    // Synchronised batch norm: the device composes the statistics (its sums, an all-sum on
    // the host) where the CPU has its own kernel, so the two agree to rounding.
    // Plain SGD: Adam would turn that rounding into full steps on weights whose gradient is
    // noise around zero (see crates/cli/tests/mpi.rs).
    let sgd = OptimizerKind::Sgd { momentum: 0.0, nesterov: false };
    let (cpu, _) = two_ranks(Device::Cpu, true, sgd, 256).unwrap();
    let (gpu, _) = two_ranks(dev, true, sgd, 256).unwrap();
    assert_eq!(gpu[0], gpu[1]);
    // Measured: 3e-5 at most (a running mean); a wrong gradient through the all-sum is 1e-1.
    let worst = cpu[0]
        .iter()
        .zip(&gpu[0])
        .flat_map(|((_, a), (_, b))| a.data().iter().zip(b.data()).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())))
        .fold(0.0, f32::max);
    assert!(worst < 1e-4, "with synchronised batch norm the device's ranks differ from the CPU's by {worst:e}");
}

/// Ranks stop early together, where rank 0 decides: here rank 1 tests on images it trains on,
/// whose loss keeps falling, and would go on alone (leaving rank 0's collectives unanswered).
#[test]
fn ranks_stop_early_together() {
    let world = Arc::new(Threads { size: 2, state: Default::default(), turn: Default::default() });
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let world = world.clone();
            std::thread::spawn(move || {
                let mut data = small(96, 160);
                if rank == 1 {
                    data.test = small(160, 0).train;
                }
                let group: std::rc::Rc<dyn stride_train::group::Group> = std::rc::Rc::new(Rank { rank, world });
                let c = TrainConfig { early_stopping: Some(1), data_parallel: Some(stride_train::group::DataParallel(group)), ..cfg(40, None) };
                let run = train(&mut cnn_bn(7), &data, &c, false, None, |_| {}).map_err(|e| e.to_string())?;
                let losses: Vec<f64> = run.reports.iter().map(|r| r.test.loss).collect();
                Ok::<_, String>((run.stopped_early, losses))
            })
        })
        .collect();
    let out: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    let (stop, losses) = &out[0];
    let stop = stop.unwrap_or_else(|| panic!("rank 0 never stopped: {losses:?}"));
    assert_eq!(out[1].0, Some(stop), "rank 1's test losses {:?}", out[1].1);
    // Rank 1 on its own would not have stopped there.
    assert!(out[1].1.windows(2).all(|w| w[1] < w[0]), "rank 1's test losses {:?}", out[1].1);
}

#[test]
fn synchronised_batch_norm_refuses_a_batch_some_rank_has_no_share_of() {
    // 257 images in batches of 32: the epoch's last batch has one image, so one of two ranks
    // would skip the forward pass whose statistics the other waits for.
    let e = two_ranks(Device::Cpu, true, OptimizerKind::Adam, 257).unwrap_err();
    assert!(e.contains("smallest batch of an epoch has 1 image(s) (257 training images in batches of 32)"), "{e}");
    // Without synchronised statistics that batch is fine: the rank without a share adds zeros.
    two_ranks(Device::Cpu, false, OptimizerKind::Adam, 257).unwrap();
}

/// The tutorial CNN (no batch statistics per rank, so two ranks can equal one process) trained
/// on `images` digits by one process with `alone`, and by two threaded ranks with `on_ranks`
/// applied to it: (one process's weights, each rank's).
fn alone_and_on_two_ranks(images: usize, alone: &TrainConfig, on_ranks: fn(TrainConfig) -> TrainConfig) -> (State, Vec<State>) {
    let mut one = common::model(7);
    train(&mut one, &small(images, 64), alone, false, None, |_| {}).unwrap();
    let world = Arc::new(Threads { size: 2, state: Default::default(), turn: Default::default() });
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let (world, c) = (world.clone(), alone.clone());
            std::thread::spawn(move || {
                let group: std::rc::Rc<dyn stride_train::group::Group> = std::rc::Rc::new(Rank { rank, world });
                let c = on_ranks(TrainConfig { data_parallel: Some(stride_train::group::DataParallel(group)), ..c });
                let mut model = common::model(7);
                train(&mut model, &small(images, 64), &c, false, None, |_| {}).unwrap();
                checkpoint::state_dict(&mut model)
            })
        })
        .collect();
    (checkpoint::state_dict(&mut one), ranks.into_iter().map(|h| h.join().unwrap()).collect())
}

/// Asserts that every tensor of `a` and `b` agrees within `tol` relative to 1 + |value|.
fn assert_close_runs(a: &State, b: &State, tol: f32) {
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let worst = x.data().iter().zip(y.data()).map(|(p, q)| (p - q).abs() / (1.0 + p.abs())).fold(0.0, f32::max);
        assert!(worst < tol, "{name}: two ranks differ from one process by {worst:e}");
    }
}

fn plain_sgd() -> TrainConfig {
    TrainConfig { optimizer: OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, lr: 0.05, eager: true, ..cfg(1, None) }
}

/// With class weights, each rank's loss is its images' share of the batch's weight, so two
/// ranks take the steps one process takes.
#[test]
fn two_ranks_weigh_classes_as_one_process_does() {
    let weights = stride_train::ClassWeights::Given(vec![0.2, 5.0, 1.0, 1.0, 0.0, 3.0, 1.0, 1.0, 0.5, 1.0]);
    let (alone, two) = alone_and_on_two_ranks(256, &TrainConfig { class_weights: weights, ..plain_sgd() }, |c| c);
    // Measured: 2e-8 at most (sums in another order); with shares by image count, 2e-4.
    assert_close_runs(&alone, &two[0], 1e-5);
}

/// Two ranks accumulating two batches of 16 per update take one process's steps on batches of
/// 32: the gradients are summed across ranks once, in the group's last backward pass.
#[test]
fn two_ranks_accumulate_as_one_process_does() {
    let (alone, two) = alone_and_on_two_ranks(330, &plain_sgd(), |c| TrainConfig { batch_size: 16, accumulate: 2, ..c });
    assert_eq!(two[0], two[1]);
    // Measured: 2e-8; summing across ranks after every batch (counting the first twice): 2e-3.
    assert_close_runs(&alone, &two[0], 1e-5);
}

/// MixUp and CutMix mix the whole batch before each rank takes its share (mixing each share
/// apart would pair other images at the shares' edges): two ranks take one process's steps.
#[test]
fn two_ranks_mix_batches_as_one_process_does() {
    let mixed = TrainConfig { mix: stride_data::BatchMix { mixup: 0.4, cutmix: 1.0 }, ..plain_sgd() };
    let (alone, two) = alone_and_on_two_ranks(256, &mixed, |c| c);
    assert_eq!(two[0], two[1]);
    assert_close_runs(&alone, &two[0], 1e-5);
    // Class weights would need each label's share of the batch's weight apart: refused.
    let world = Arc::new(Threads { size: 1, state: Default::default(), turn: Default::default() });
    let group: std::rc::Rc<dyn stride_train::group::Group> = std::rc::Rc::new(Rank { rank: 0, world });
    let c =
        TrainConfig { class_weights: stride_train::ClassWeights::Balanced, data_parallel: Some(stride_train::group::DataParallel(group)), ..mixed };
    let e = train(&mut common::model(7), &small(64, 16), &c, false, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("class weights with MixUp/CutMix under mpirun"), "{e}");
}

/// With a weight average, ranks average after rank 0's batch norm statistics reached them, so
/// they end with the same averaged weights and buffers.
#[test]
fn two_ranks_average_the_same_weights() {
    let (states, _) = two_ranks_with(Device::Cpu, false, OptimizerKind::Adam, 256, |c| TrainConfig { ema: Some(0.9), ..c }).unwrap();
    assert_eq!(states[0], states[1]);
    let (plain, _) = two_ranks(Device::Cpu, false, OptimizerKind::Adam, 256).unwrap();
    assert_ne!(states[0], plain[0], "the ranks hold the average, not the last step's weights");
}

#[test]
fn a_vae_run_with_its_pictures_of_the_code_and_a_resume_runs_the_same_on_a_device() {
    use stride_models::vae::Vae;
    use stride_train::vae::{self as v, VaeConfig};
    let dev = mirror();
    let full = v::prepare(&stride_data::load("mnist").unwrap()).unwrap();
    let test = full.test.subset(&stride_train::latent::spread(full.test.len(), 100)).unwrap();
    let data = stride_data::Split { train: common::take(&full.train, 256), test, ..full };
    let run = |device: Device| {
        let dir = tmp(&format!("vae-on-{device}"));
        let cfg = |epochs, resume| VaeConfig { epochs, device, beta: 0.5, out_dir: Some(dir.clone()), resume, ..VaeConfig::default() };
        let mut m = Vae::with_latent(&mut Rng::seed(6), 2).unwrap();
        v::train_vae(&mut m, &data, &cfg(1, false), None, |_| {}).unwrap();
        let mut m = Vae::with_latent(&mut Rng::seed(7), 2).unwrap();
        let r = v::train_vae(&mut m, &data, &cfg(2, true), None, |_| {}).unwrap().reports;
        let pictures: Vec<Vec<u8>> =
            ["latent.png", "interpolation.png", "manifold.png"].iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
        let state = checkpoint::state_dict(&mut m);
        std::fs::remove_dir_all(&dir).unwrap();
        (r.iter().map(|r| (r.train_total, r.total)).collect::<Vec<_>>(), pictures, state)
    };
    let (cpu, gpu) = (run(Device::Cpu), run(dev));
    assert_eq!(cpu.0, gpu.0, "losses");
    assert!(cpu.1 == gpu.1, "the pictures of the code differ");
    assert_eq!(cpu.2, gpu.2);
}
