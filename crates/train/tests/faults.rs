//! Faults during training: a full disk, a crash between a metrics row and its checkpoint,
//! hostile checkpoints; and determinism (same seed and threads, same bits).

mod common;
use common::{cfg, model, small, tmp};

use stride_autograd::Tensor;
use stride_nn::Module;
use stride_train::{checkpoint, restore_checkpoint, train, TrainConfig};

fn weights(m: &mut dyn Module) -> Vec<(String, Vec<u32>)> {
    checkpoint::state_dict(m).into_iter().map(|(n, t)| (n, t.data().iter().map(|v| v.to_bits()).collect())).collect()
}

#[test]
fn a_full_disk_keeps_the_previous_checkpoint_and_says_so() {
    let data = small(256, 64);
    let dir = tmp("full-disk");
    train(&mut model(1), &data, &cfg(1, Some(dir.clone())), false, None, |_| {}).unwrap();
    let before = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    // The checkpoint's temporary file, made a link to /dev/full: the kernel answers every write
    // to it with ENOSPC, as a full disk would.
    let tmp_name = dir.join(format!(".checkpoint.safetensors.tmp-{}", std::process::id()));
    let weights_tmp = dir.join(format!(".model.safetensors.tmp-{}", std::process::id()));
    std::os::unix::fs::symlink("/dev/full", &weights_tmp).unwrap();
    std::os::unix::fs::symlink("/dev/full", &tmp_name).unwrap();
    let e = train(&mut model(1), &data, &cfg(2, Some(dir.clone())), true, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("cannot write") && e.contains("model.safetensors: No space left on device") && e.contains("the previous file"), "{e}");
    assert_eq!(std::fs::read(dir.join("checkpoint.safetensors")).unwrap(), before, "the previous checkpoint is intact");
    // The failed temporary file is gone and the run resumes once there is space again.
    assert!(!weights_tmp.exists());
    std::fs::remove_file(&tmp_name).unwrap();
    let r = train(&mut model(1), &data, &cfg(2, Some(dir.clone())), true, None, |_| {}).unwrap();
    assert_eq!(r.reports.iter().map(|r| r.epoch).collect::<Vec<_>>(), [2]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_crash_after_a_metrics_row_leaves_no_duplicate() {
    let data = small(256, 64);
    let dir = tmp("metrics");
    train(&mut model(2), &data, &cfg(1, Some(dir.clone())), false, None, |_| {}).unwrap();
    // As if epoch 2's row had been written and the process killed before its checkpoint, in
    // the middle of a further row.
    let path = dir.join("metrics.csv");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("2,9.0,0.1,9.0,0.1,100.0,0.002\n3,9.0,0.");
    std::fs::write(&path, text).unwrap();
    train(&mut model(2), &data, &cfg(2, Some(dir.clone())), true, None, |_| {}).unwrap();
    let rows: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(|l| l.split(',').next().unwrap().to_string()).collect();
    assert_eq!(rows, ["epoch", "1", "2"]);
    assert!(!std::fs::read_to_string(&path).unwrap().contains("9.0,0.1"), "the orphan row is dropped");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn same_seed_and_threads_give_the_same_bits() {
    let data = small(320, 64);
    let run = || {
        let mut m = model(7);
        train(&mut m, &data, &TrainConfig { seed: 11, ..cfg(2, None) }, false, None, |_| {}).unwrap();
        weights(&mut m)
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    // And the seed matters.
    let mut m = model(7);
    train(&mut m, &data, &TrainConfig { seed: 12, ..cfg(2, None) }, false, None, |_| {}).unwrap();
    assert_ne!(weights(&mut m), a);
}

#[test]
fn a_hostile_checkpoint_is_refused_before_anything_changes() {
    let data = small(256, 64);
    let dir = tmp("hostile");
    train(&mut model(3), &data, &cfg(1, Some(dir.clone())), false, None, |_| {}).unwrap();
    let path = dir.join("checkpoint.safetensors");
    let (tensors, meta) = checkpoint::load_with_metadata(&path).unwrap();
    let mut m = model(4);
    let before = weights(&mut m);
    let check = |tensors: std::collections::HashMap<String, Tensor<f32>>, meta: &std::collections::HashMap<String, String>, want: &str| {
        let mut m = model(4);
        let e = restore_checkpoint(&path, tensors, meta, &mut m, &cfg(2, None)).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert_eq!(weights(&mut m), before, "refused, yet the model changed");
    };
    // An Adam moment shorter than its parameter (it would be read past its end).
    let mut t = tensors.clone();
    t.insert("optimizer.exp_avg.0".into(), Tensor::zeros(&[3]).unwrap());
    check(t, &meta, "optimizer entry 'exp_avg.0' has 3 values but parameter 0 has 180");
    // An entry for a parameter the model does not have.
    let mut t = tensors.clone();
    t.insert("optimizer.exp_avg_sq.99".into(), Tensor::zeros(&[1]).unwrap());
    check(t, &meta, "names no parameter of this model");
    // Positions that no run writes.
    for (k, v, want) in [
        ("epoch", "1e300", "not a count"),
        ("step", "-4", "not a count"),
        ("seen", "2.5", "not a count"),
        ("right", "1000000", "impossible position"),
    ] {
        let mut bad = meta.clone();
        bad.insert(k.into(), v.into());
        check(tensors.clone(), &bad, want);
    }
    // A weight with the wrong shape.
    let mut t = tensors.clone();
    t.insert("0.weight".into(), Tensor::zeros(&[20, 1, 3, 2]).unwrap());
    check(t, &meta, "'0.weight' has shape [20, 1, 3, 2]");
    // And the real one restores.
    let mut m = model(4);
    assert_eq!(restore_checkpoint(&path, tensors, &meta, &mut m, &cfg(2, None)).unwrap(), (2, 0));
    std::fs::remove_dir_all(dir).unwrap();
}
