"""Writes small valid inputs for every fuzz target into fuzz/seeds/<target>/ (stdlib only).

    python3 fuzz/make_seeds.py
"""
import gzip
import json
import os
import shutil
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def out(target, name, data, kind="seeds"):
    d = os.path.join(HERE, kind, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def idx(dims, body):
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(body)


def png(width, height, color_type, pixels):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    per = {0: 1, 2: 3}[color_type]
    raw = b"".join(b"\x00" + bytes(pixels[y * width * per:(y + 1) * width * per]) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def safetensors(tensors, metadata):
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def onnx_seed(name, build):
    """fuzz/seeds/onnx_model/{name}.onnx: the graph `build(TensorProto, helper)` gives (nodes,
    initializers, inputs, outputs) at opset 18, checked by `onnx.checker`. Needs the `onnx`
    package; without it the seed is left as it is."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        print(f"onnx is not installed: fuzz/seeds/onnx_model/{name}.onnx left as it is")
        return
    nodes, init, inputs, outputs = build(TensorProto, helper)
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, init), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out("onnx_model", f"{name}.onnx", model.SerializeToString())


def gather_range(T, h):
    """A graph that gathers each image's values in reverse by indices it computes from the batch
    (Shape, Range, Mul, Unsqueeze, Add, Gather: the newer PyTorch exporter's as_strided), then
    two columns by negative and positive constant indices."""
    nodes = [
        h.make_node("Shape", ["x"], ["s"], start=0, end=1),
        h.make_node("Squeeze", ["s", "zero_axis"], ["n"]),
        h.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        h.make_node("Range", ["zero", "n", "one"], ["r"]),
        h.make_node("Mul", ["r", "six"], ["m"]),
        h.make_node("Unsqueeze", ["m", "one_axis"], ["u"]),
        h.make_node("Add", ["u", "offsets"], ["idx"]),
        h.make_node("Gather", ["flat", "idx"], ["g"]),
        h.make_node("Gather", ["g", "col"], ["y"], axis=1),
    ]
    ints = [("zero_axis", [1], [0]), ("one_axis", [1], [1]), ("flat_shape", [1], [-1]), ("zero", [], [0]), ("one", [], [1]),
            ("six", [], [6]), ("offsets", [1, 6], [5, 4, 3, 2, 1, 0]), ("col", [2], [-1, 0])]
    init = [h.make_tensor(name, T.INT64, dims, values) for name, dims, values in ints]
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 3])
    y = h.make_tensor_value_info("y", T.FLOAT, ["N", 2])
    return nodes, init, [x], [y]


def resize(T, h):
    """Bilinear Resize by factors (half-pixel), then nearest Resize back to the input's own size
    (sizes from Shape, aligned corners)."""
    nodes = [
        h.make_node("Resize", ["x", "", "scales"], ["up"], mode="linear", coordinate_transformation_mode="half_pixel"),
        h.make_node("Shape", ["x"], ["size"]),
        h.make_node("Resize", ["up", "", "", "size"], ["y"], mode="nearest", coordinate_transformation_mode="align_corners",
                    nearest_mode="round_prefer_ceil"),
    ]
    init = [h.make_tensor("scales", T.FLOAT, [4], [1.0, 1.0, 2.0, 1.5])]
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 3, 4])
    y = h.make_tensor_value_info("y", T.FLOAT, ["N", 2, 3, 4])
    return nodes, init, [x], [y]


def where(T, h):
    """Masks as the newer exporter writes adaptive pooling (Where by boolean constants, a scalar
    fill broadcast), over the rows and then the columns."""
    nodes = [
        h.make_node("Where", ["rows", "zero", "x"], ["w"]),
        h.make_node("Where", ["cols", "w", "x"], ["y"]),
    ]
    init = [
        h.make_tensor("rows", T.BOOL, [3, 1], [True, False, True]),
        h.make_tensor("cols", T.BOOL, [4], [False, True, True, False]),
        h.make_tensor("zero", T.FLOAT, [], [0.0]),
    ]
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 3, 4])
    y = h.make_tensor_value_info("y", T.FLOAT, ["N", 2, 3, 4])
    return nodes, init, [x], [y]


def pads_from_constants(T, h):
    """F.pad's pads as the TorchScript exporter computes them from constants (ConstantOfShape,
    Concat, Reshape to pairs, a reversing Slice, Transpose, Reshape, Cast), then a batch norm in
    training mode."""
    nodes = [
        h.make_node("ConstantOfShape", ["four"], ["zeros"], value=h.make_tensor("v", T.INT64, [1], [0])),
        h.make_node("Concat", ["given", "zeros"], ["all"], axis=0),
        h.make_node("Reshape", ["all", "pair_shape"], ["pairs"]),
        h.make_node("Slice", ["pairs", "minus_one", "far", "zero", "minus_one"], ["reversed"]),
        h.make_node("Transpose", ["reversed"], ["t"], perm=[1, 0]),
        h.make_node("Reshape", ["t", "flat_shape"], ["flat"]),
        h.make_node("Cast", ["flat"], ["pads"], to=T.INT64),
        h.make_node("Pad", ["x", "pads"], ["p"]),
        h.make_node("BatchNormalization", ["p", "scale", "bias", "mean", "var"], ["y"], training_mode=1),
    ]
    ints = [("four", [1], [4]), ("given", [4], [0, 1, 0, 1]), ("pair_shape", [2], [-1, 2]), ("minus_one", [1], [-1]),
            ("far", [1], [-(1 << 40)]), ("zero", [1], [0]), ("flat_shape", [1], [-1])]
    init = [h.make_tensor(name, T.INT64, dims, values) for name, dims, values in ints]
    init += [h.make_tensor(name, T.FLOAT, [2], values) for name, values in
             [("scale", [1.0, 2.0]), ("bias", [0.0, 0.5]), ("mean", [0.0, 0.0]), ("var", [1.0, 1.0])]]
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 3, 3])
    y = h.make_tensor_value_info("y", T.FLOAT, ["N", 2, 4, 4])
    return nodes, init, [x], [y]


def position_encoding(T, h):
    """A mask of ones over each image's [N, H, W] as EdgeNeXt's and DETR's position encodings
    write it (ConstantOfShape of a computed shape, Cast to bool, Not, Cast to float), counted
    along H and, exclusively from the end, along W (CumSum), added to the data, then every second
    column (Slice with a step)."""
    nodes = [
        h.make_node("Shape", ["x"], ["shape"]),
        h.make_node("Gather", ["shape", "which"], ["nhw"]),
        h.make_node("ConstantOfShape", ["nhw"], ["zeros"], value=h.make_tensor("v", T.FLOAT, [1], [0.0])),
        h.make_node("Cast", ["zeros"], ["mask"], to=T.BOOL),
        h.make_node("Not", ["mask"], ["not_mask"]),
        h.make_node("Cast", ["not_mask"], ["ones"], to=T.FLOAT),
        h.make_node("CumSum", ["ones", "one"], ["count_h"]),
        h.make_node("CumSum", ["ones", "two"], ["count_w"], exclusive=1, reverse=1),
        h.make_node("Add", ["count_h", "count_w"], ["counts"]),
        h.make_node("Unsqueeze", ["counts", "one_axis"], ["per_channel"]),
        h.make_node("Add", ["x", "per_channel"], ["sum"]),
        h.make_node("Slice", ["sum", "zero_axis", "far", "last_axis", "two_axis"], ["y"]),
    ]
    ints = [("which", [3], [0, 2, 3]), ("one", [], [1]), ("two", [], [2]), ("one_axis", [1], [1]),
            ("zero_axis", [1], [0]), ("far", [1], [1 << 40]), ("last_axis", [1], [-1]), ("two_axis", [1], [2])]
    init = [h.make_tensor(name, T.INT64, dims, values) for name, dims, values in ints]
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 3, 4])
    y = h.make_tensor_value_info("y", T.FLOAT, ["N", 2, 3, 2])
    return nodes, init, [x], [y]


def main():
    # onnx_model's other seeds are written elsewhere (tiny.onnx by crates/train/tests/fuzz_corpus.rs
    # with STRIDE_BLESS=1, torchscript_view.onnx by scripts/onnx/torchvision_fixtures.py).
    for target in ("idx", "cifar", "image", "checkpoint", "toml_model"):
        shutil.rmtree(os.path.join(HERE, "seeds", target), ignore_errors=True)
    for name, build in [("gather_range", gather_range), ("resize", resize), ("where", where), ("pads_from_constants", pads_from_constants),
                        ("position_encoding", position_encoding)]:
        onnx_seed(name, build)
    labels = idx([10], [i % 10 for i in range(10)])
    images = idx([2, 4, 4], [(i * 37) % 256 for i in range(32)])
    out("idx", "labels.idx", labels)
    out("idx", "images.idx", images)
    out("idx", "labels.idx.gz", gzip.compress(labels, mtime=0))
    # The pair form: a first byte that cuts the rest into an image file and a label file.
    out("idx", "pair.bin", bytes([len(images)]) + images + idx([2], [1, 0]))
    # A label far outside the classes the others number: must be refused (a kept regression
    # case, not a seed, since seeds must be accepted).
    out("idx", "pair-stray-label-200.bin", bytes([len(images)]) + images + idx([2], [0, 200]), kind="regressions")
    out("idx", "images.idx.gz", gzip.compress(images, mtime=0))

    out("cifar", "two.bin", bytes([3] + [i % 251 for i in range(3072)] + [9] + [7] * 3072))

    out("image", "grey.png", png(4, 3, 0, [i * 20 for i in range(12)]))
    out("image", "rgb.png", png(3, 2, 2, [i * 13 for i in range(18)]))
    # A small real JPEG, from CPython's test data where it is installed.
    for candidate in ["/usr/lib/python3.11/test/imghdrdata/python.jpg", "/root/.pyenv/versions/3.7.16/lib/python3.7/test/imghdrdata/python.jpg"]:
        if os.path.exists(candidate):
            with open(candidate, "rb") as f:
                out("image", "python.jpg", f.read())
            break

    # The fuzzing module's TINY_MODEL: conv 1->2 k3 (6x6 -> 4x4), batch norm, flatten, linear 32->3.
    shapes = {"0.weight": [2, 1, 3, 3], "0.bias": [2], "1.weight": [2], "1.bias": [2], "1.running_mean": [2],
              "1.running_var": [2], "1.num_batches_tracked": [], "3.weight": [3, 32], "3.bias": [3]}
    tensors = {}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        if name.endswith("num_batches_tracked"):
            tensors[name] = ("I64", shape, struct.pack("<q", 5))
        else:
            tensors[name] = ("F32", shape, f32([0.01 * (i + 1) for i in range(n)]))
    out("checkpoint", "weights.safetensors", safetensors(tensors, {"format": "pt"}))
    ckpt = dict(tensors)
    for i, (name, shape) in enumerate((k, v) for k, v in shapes.items() if not k.startswith("1.running") and not k.endswith("tracked")):
        n = 1
        for d in shape:
            n *= d
        ckpt[f"optimizer.exp_avg.{i}"] = ("F32", [n], f32([0.0] * n))
        ckpt[f"optimizer.exp_avg_sq.{i}"] = ("F32", [n], f32([0.0] * n))
    ckpt["optimizer.step"] = ("F32", [1], f32([3.0]))
    meta = {"format": "stride-checkpoint-1", "epoch": "1", "step": "3", "loss_sum": "1.5e0", "right": "2",
            "seen": "12", "seed": "0", "optimizer": "Adam"}
    out("checkpoint", "checkpoint.safetensors", safetensors(ckpt, meta))

    for name in ("tutorial-cnn.toml", "small-resnet.toml"):
        with open(os.path.join(ROOT, "examples", "models", name), "rb") as f:
            out("toml_model", name, f.read())


if __name__ == "__main__":
    main()
