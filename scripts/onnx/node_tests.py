#!/usr/bin/env python3
"""Writes ONNX's own backend node tests for the CNN ops Stride has into crates/onnx/tests/node/.

The cases come from the `onnx` package's generators (`onnx.backend.test.case.node`), the same
ones ONNX Runtime and other backends are tested on: for each case a `model.onnx` and
`test_data_set_N/{input,output}_K.pb`. Nothing here computes an expected value.

    pip install onnx==1.23.2 && python3 scripts/onnx/node_tests.py
"""
import os
import shutil
import sys
import warnings

import onnx
from onnx.backend.test.case import node as cases_mod

# The operators issue 16 lists, and those added since: every case whose graph is one node of
# these types is written.
OPS = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "BatchNormalization", "Relu", "Elu", "Sigmoid", "Tanh", "Softplus",
    "LeakyRelu", "Gemm", "MatMul", "Add", "Mul", "Concat", "Flatten", "Reshape", "Pad",
    "Softmax", "LogSoftmax", "Dropout",
    # Since: what torchvision's MobileNetV3, ShuffleNetV2 and ConvNeXt export to.
    "HardSigmoid", "HardSwish", "Erf", "LayerNormalization", "Slice", "Squeeze", "Unsqueeze",
    "Transpose", "Gelu",
    # Since: what the newer exporter writes for ConvNeXt's as_strided (indices from Range), and
    # for attention blocks (CBAM's mean and max over channels, F.normalize).
    "Gather", "GatherND", "Range", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "Expand",
    # Since: U-Nets' and segmentation heads' upsampling (F.interpolate, nn.Upsample).
    "Resize", "Upsample",
    # Since: YOLO's oriented boxes (the angle's sine and cosine).
    "Sin", "Cos",
    # Since: GroupNorm and InstanceNorm2d as PyTorch exports them (PoolFormer, MobileViT-v2).
    "InstanceNormalization",
    # Since: position encodings that count a mask's ones (EdgeNeXt, DETR).
    "CumSum", "Not",
}

def main() -> None:
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = os.path.normpath(os.path.join(root, "crates", "onnx", "tests", "node"))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = cases_mod.collect_testcases(None)
    written = 0
    for case in cases:
        g = case.model.graph
        if len(g.node) != 1 or g.node[0].op_type not in OPS:
            continue
        d = os.path.join(out, case.name)
        os.makedirs(d)
        with open(os.path.join(d, "model.onnx"), "wb") as f:
            f.write(case.model.SerializeToString())
        for i, (inputs, outputs) in enumerate(case.data_sets):
            sd = os.path.join(d, f"test_data_set_{i}")
            os.makedirs(sd)
            for kind, values, infos in (("input", inputs, g.input), ("output", outputs, g.output)):
                for j, v in enumerate(values):
                    t = onnx.numpy_helper.from_array(v, infos[j].name)
                    with open(os.path.join(sd, f"{kind}_{j}.pb"), "wb") as f:
                        f.write(t.SerializeToString())
        written += 1
    print(f"wrote {written} cases of onnx {onnx.__version__} to {out}", file=sys.stderr)

if __name__ == "__main__":
    main()
