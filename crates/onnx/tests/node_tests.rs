//! ONNX's own backend node tests (`tests/node/`, written by scripts/onnx/node_tests.py from the
//! `onnx` package's generators): every case is imported and run, and its output compared with
//! ONNX's expected output. A case Stride refuses (an operator form it lacks, a type other than
//! float32) is skipped with the importer's reason.
//!
//! The outcome of every case is kept in `tests/node_outcomes.txt`, so a case that stops
//! passing, or a refusal whose reason changes, fails this test. After a deliberate change,
//! `STRIDE_BLESS=1 cargo test -p stride-onnx --test node_tests` rewrites the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use stride_autograd::{no_grad, Tensor, Var};
use stride_nn::{Ctx, Module};
use stride_onnx::proto::TensorProto;

fn read_pb(path: &Path) -> Tensor<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = TensorProto::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    stride_onnx::from_tensor_proto(&t).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn type_name(t: &TensorProto) -> String {
    stride_onnx::proto::tensor_proto::DataType::try_from(t.data_type.unwrap_or(0)).map_or("unknown".into(), |d| d.as_str_name().to_lowercase())
}

enum Outcome {
    Pass,
    Skip(String),
    Fail(String),
}

/// Cases whose expected output ONNX wrote by hand to four decimals: compared with ONNX's own
/// default tolerance (relative 1e-3) instead of this test's 1e-4.
const FOUR_DECIMALS: &[&str] = &["test_averagepool_2d_ceil_last_window_starts_on_pad"];

/// Runs one case: every data set must match ONNX's output.
fn run_case(dir: &Path) -> Outcome {
    let name = dir.file_name().unwrap().to_string_lossy();
    let rtol = if FOUR_DECIMALS.contains(&name.as_ref()) { 1e-3 } else { 1e-4 };
    let model = match stride_onnx::read(&dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => return Outcome::Skip(e.to_string()),
    };
    let graph = model.graph.as_ref().expect("a graph");
    let names: Vec<String> = graph.input.iter().map(|i| i.name.clone().unwrap_or_default()).collect();
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    sets.sort();
    for set in sets {
        let pb = |kind: &str, i: usize| set.join(format!("{kind}_{i}.pb"));
        // ONNX's node tests take every tensor as an input; all but the first become constants.
        let mut bound = HashMap::new();
        let mut first = None;
        for (i, name) in names.iter().enumerate() {
            let path = pb("input", i);
            if !path.exists() {
                continue;
            }
            let proto = TensorProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
            if i == 0 {
                if proto.data_type != Some(1) {
                    return Outcome::Skip(format!("the data input is {}; Stride computes in float32", type_name(&proto)));
                }
                first = Some(read_pb(&path));
            } else {
                bound.insert(name.clone(), proto);
            }
        }
        let Some(x) = first else { return Outcome::Skip("no input data".into()) };
        let mut net = match stride_onnx::import_with(&model, &bound) {
            Ok(i) => i.network,
            Err(e) => return Outcome::Skip(e.to_string()),
        };
        let y = match no_grad(|| net.forward(&Var::constant(x), &mut Ctx::eval())) {
            Ok(y) => y.value(),
            Err(e) => return Outcome::Skip(format!("refused at run time: {e}")),
        };
        let want = read_pb(&pb("output", 0));
        if y.shape() != want.shape() {
            return Outcome::Fail(format!("output shape {:?}, ONNX expects {:?}", y.shape(), want.shape()));
        }
        for (i, (a, b)) in y.data().iter().zip(want.data()).enumerate() {
            let ok = (a - b).abs() <= 1e-5 + rtol * b.abs() || (a.is_nan() && b.is_nan()) || a == b;
            if !ok {
                return Outcome::Fail(format!("{} value {i}: {a}, ONNX expects {b}", set.file_name().unwrap().to_string_lossy()));
            }
        }
    }
    Outcome::Pass
}

#[test]
fn onnx_backend_node_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(root.join("node")).expect("tests/node (scripts/onnx/node_tests.py)").map(|e| e.unwrap().path()).collect();
    cases.sort();
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    let (mut passed, mut skipped) = (0, 0);
    for dir in &cases {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        match run_case(dir) {
            Outcome::Pass => {
                passed += 1;
                lines.push(format!("pass {name}"));
            }
            Outcome::Skip(why) => {
                skipped += 1;
                lines.push(format!("skip {name}: {}", why.replace('\n', " ")));
            }
            Outcome::Fail(why) => failures.push(format!("{name}: {why}")),
        }
    }
    let listing = lines.join("\n") + "\n";
    println!("{listing}");
    println!("{passed} passed, {skipped} skipped, {} wrong, of {} ONNX node tests", failures.len(), cases.len());
    assert!(failures.is_empty(), "Stride's results differ from ONNX's:\n{}", failures.join("\n"));
    let kept = root.join("node_outcomes.txt");
    if std::env::var_os("STRIDE_BLESS").is_some() {
        std::fs::write(&kept, &listing).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&kept).expect("tests/node_outcomes.txt (STRIDE_BLESS=1 writes it)");
    let want: Vec<&str> = expected.lines().collect();
    let have: Vec<&str> = listing.lines().collect();
    let changed: Vec<String> = have
        .iter()
        .filter(|l| !want.contains(l))
        .map(|l| format!("now:  {l}"))
        .chain(want.iter().filter(|l| !have.contains(l)).map(|l| format!("kept: {l}")))
        .collect();
    assert!(changed.is_empty(), "outcomes differ from tests/node_outcomes.txt:\n{}", changed.join("\n"));
    assert!(passed >= 100, "only {passed} node tests pass");
}
