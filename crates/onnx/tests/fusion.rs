//! The patterns the importer runs as one layer (x * sigmoid(x) as SiLU, PyTorch's five-op
//! GELUs) give what the graph computes, and are left alone where an intermediate value has
//! another reader, even under a second name.

use stride_autograd::{no_grad, Tensor, Var};
use stride_nn::{Ctx, Module};
use stride_onnx::proto::{GraphProto, ModelProto, NodeProto};

mod common;
use common::{model_of, node, value};

/// A one-input graph of `nodes` over x [2, 3] with scalar constants `consts`, ending in `out`.
fn model(nodes: Vec<NodeProto>, consts: &[(&str, f32)], out: &str) -> ModelProto {
    let initializer = consts.iter().map(|(n, v)| stride_onnx::to_tensor_proto(n, &Tensor::scalar(*v))).collect();
    model_of(GraphProto { node: nodes, initializer, input: vec![value("x", &[2, 3])], output: vec![value(out, &[2, 3])], ..Default::default() }, 17)
}

/// The network's output on x, and the kinds of the layers it runs.
fn run(m: &ModelProto, x: &[f32]) -> (Vec<f32>, Vec<String>) {
    let mut net = stride_onnx::import(m).unwrap().network;
    let kinds = net.layer_kinds().into_iter().map(|(_, k)| k).collect();
    let y = no_grad(|| net.forward(&Var::constant(Tensor::from_vec(x.to_vec(), &[2, 3]).unwrap()), &mut Ctx::eval())).unwrap();
    (y.value().data().to_vec(), kinds)
}

const X: [f32; 6] = [-2.5, -0.7, 0.0, 0.3, 1.1, 3.0];

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()))
}

#[test]
fn x_times_its_sigmoid_runs_as_silu_unless_the_sigmoid_is_read_again() {
    let silu = model(vec![node("Sigmoid", &["x"], "s"), node("Mul", &["x", "s"], "y")], &[], "y");
    let (y, kinds) = run(&silu, &X);
    assert_eq!(kinds, ["silu"]);
    assert!(close(&y, &X.map(|v| v * sigmoid(v))), "{y:?}");
    // The sigmoid is also added, both reads through a second name (its first is read once,
    // by the Identity): it must stay a sigmoid.
    let read_again = model(
        vec![node("Sigmoid", &["x"], "s"), node("Identity", &["s"], "s2"), node("Mul", &["x", "s2"], "p"), node("Add", &["p", "s2"], "y")],
        &[],
        "y",
    );
    let (y, kinds) = run(&read_again, &X);
    assert_eq!(kinds, ["sigmoid"]);
    assert!(close(&y, &X.map(|v| v * sigmoid(v) + sigmoid(v))), "{y:?}");
}

#[test]
fn pytorchs_gelu_runs_as_one_layer_unless_a_step_is_read_again() {
    // As the TorchScript exporter writes it, x * (erf + 1) then half of that; and as the newer
    // one does, half of (erf + 1) then x times that.
    let spellings = [
        ("torchscript", [node("Mul", &["x", "a"], "m"), node("Mul", &["m", "half"], "y")]),
        ("dynamo", [node("Mul", &["half", "a"], "m"), node("Mul", &["x", "m"], "y")]),
    ];
    for (exporter, products) in spellings {
        let gelu_nodes = || {
            let mut n = vec![node("Div", &["x", "sqrt2"], "d"), node("Erf", &["d"], "e"), node("Add", &["e", "one"], "a")];
            n.extend(products.iter().cloned());
            n
        };
        let consts = [("sqrt2", std::f32::consts::SQRT_2), ("one", 1.0), ("half", 0.5)];
        // The f64 functions (libm's erf) as the reference.
        let x64 = Var::constant(Tensor::from_vec(X.iter().map(|&v| v as f64).collect(), &[6]).unwrap());
        let exact: Vec<f32> = x64.gelu().unwrap().value().data().iter().map(|&v| v as f32).collect();
        let erf: Vec<f32> =
            x64.mul_scalar(std::f64::consts::FRAC_1_SQRT_2).unwrap().erf().unwrap().value().data().iter().map(|&v| v as f32).collect();
        let (y, kinds) = run(&model(gelu_nodes(), &consts, "y"), &X);
        assert_eq!(kinds, ["gelu"], "{exporter}");
        assert!(close(&y, &exact), "{exporter}: {y:?} against {exact:?}");
        // The erf is also an output's summand: the chain stays as written.
        let mut nodes = gelu_nodes();
        nodes.push(node("Add", &["y", "e"], "z"));
        let (z, kinds) = run(&model(nodes, &consts, "z"), &X);
        assert_eq!(kinds, ["erf"], "{exporter}");
        let want: Vec<f32> = exact.iter().zip(&erf).map(|(g, e)| g + e).collect();
        assert!(close(&z, &want), "{exporter}: {z:?} against {want:?}");
        // The inner product is read again: no fusion either.
        let mut nodes = gelu_nodes();
        nodes.push(node("Add", &["y", "m"], "z"));
        let (_, kinds) = run(&model(nodes, &consts, "z"), &X);
        assert_eq!(kinds, ["erf"], "{exporter}");
    }
}
