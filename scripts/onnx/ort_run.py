#!/usr/bin/env python3
"""Runs every DIR/NAME.onnx in ONNX Runtime on DIR/NAME.input.pb and writes DIR/NAME.ort.pb.

Used by crates/models/tests/onnx_ort.rs to check Stride's exports against an engine that is
not Stride: `pip install onnx onnxruntime`, then `python3 scripts/onnx/ort_run.py DIR`.
"""
import glob
import os
import sys

import onnx
import onnx.numpy_helper
import onnxruntime as ort


def main() -> None:
    d = sys.argv[1]
    models = sorted(glob.glob(os.path.join(d, "*.onnx")))
    for path in models:
        base = path[: -len(".onnx")]
        onnx.checker.check_model(path, full_check=True)
        t = onnx.TensorProto()
        with open(base + ".input.pb", "rb") as f:
            t.ParseFromString(f.read())
        x = onnx.numpy_helper.to_array(t)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        (y,) = s.run(None, {s.get_inputs()[0].name: x})
        with open(base + ".ort.pb", "wb") as f:
            f.write(onnx.numpy_helper.from_array(y, "output").SerializeToString())
    print(f"onnxruntime {ort.__version__} ran {len(models)} models", file=sys.stderr)


if __name__ == "__main__":
    main()
