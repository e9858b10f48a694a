//! Which operators the importer has a rule for, and the refusal of a graph that uses others.

/// Every operator of ONNX's default domain the importer has a rule for. A rule may still refuse
/// some forms (an attribute value, a data type, an input computed where it needs a constant),
/// naming the node; an operator not listed is refused for the whole graph at once.
pub const OPERATORS: &[&str] = &[
    "Abs",
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Cos",
    "CumSum",
    "Div",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "GatherND",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LpPool",
    "MatMul",
    "MaxPool",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Pad",
    "Range",
    "ReduceL1",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Resize",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sin",
    "Slice",
    "Softmax",
    "Softplus",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Upsample",
    "Where",
];

/// The operators of `graph` Stride has no rule for, all of them with the nodes that use them
/// (the first three by name), or None.
pub(super) fn unsupported(graph: &crate::proto::GraphProto) -> Option<String> {
    let mut missing: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        let (op, domain) = (n.op_type.as_deref().unwrap_or(""), n.domain.as_deref().unwrap_or(""));
        let default = domain.is_empty() || domain == "ai.onnx";
        if default && OPERATORS.contains(&op) {
            continue;
        }
        let key = if default { op.to_string() } else { format!("{op} of domain '{domain}'") };
        let name = n.name.as_deref().filter(|n| !n.is_empty()).map_or_else(|| format!("#{i}"), |n| format!("'{n}'"));
        missing.entry(key).or_default().push(name);
    }
    if missing.is_empty() {
        return None;
    }
    let each: Vec<String> = missing
        .iter()
        .map(|(op, nodes)| {
            let shown = nodes.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
            match nodes.len() {
                1 => format!("{op} (node {shown})"),
                n if n <= 3 => format!("{op} ({n} nodes: {shown})"),
                n => format!("{op} ({n} nodes: {shown}, ...)"),
            }
        })
        .collect();
    let what = if missing.len() == 1 { "an operator" } else { "operators" };
    Some(format!("the graph uses {what} Stride does not have: {}", each.join("; ")))
}
