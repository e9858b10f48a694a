#!/usr/bin/env python3
"""Makes crates/onnx/tests/torchvision/: torchvision's classifiers (MODELS below) exported by
PyTorch's own exporters (`torch.onnx.export`: the default torch.export-based one, opset 18, as
`<name>.dynamo.onnx`, and the older TorchScript one, opset 17, as `<name>.torchscript.onnx`),
for Stride's importer.

To keep the repository small, every float initializer of more than one value (the weights; the
new exporter's scalar constants stay as they are) is set to a value from a formula (an integer hash of the initializer's position and the element's index, exact in
f64) and its data is then removed from the kept file; Stride's test recomputes the same values
before importing. ONNX Runtime runs the filled-in graph on a seeded input; its output is kept as
the expected one (ONNX Runtime and PyTorch agree on the unmodified graph within 1e-4; checked
here too).

Also `attention_cnn.*`: a small CNN with CBAM's channel and spatial attention and
F.normalize, with its own seeded weights (reductions over channels, an L2 norm, Expand); and
`small_unet.*`: a small U-Net upsampling by nearest and bilinear (both corner rules) Resize;
and `adaptive_pool_cnn.dynamo.*`: adaptive average pooling to sizes that do not divide the map
(the new exporter's masks through Where); and `self_attention_cnn.*`: multi-head self-attention
over a feature map (batched MatMul), as YOLO11's C2PSA block; and `group_norm_cnn.*`: group
and instance normalisation.
And `tiny_cnn.*`: a small CNN written as the tutorials write one, `x.view(x.size(0), -1)`
before its dense layer, with its own seeded weights kept: the TorchScript exporter with a
dynamic batch computes that shape in the graph (Shape, Gather, Unsqueeze, Concat), and the
new exporter writes the weights beside the model (`tiny_cnn.dynamo.onnx.data`), as both do by
default. And fuzz/seeds/onnx_model/torchscript_view.onnx: a smaller one of those (under the
fuzzer's 16 KiB), so the fuzzer mutates a graph that computes a shape.

    pip install torch torchvision onnx onnxruntime onnxscript
    python3 scripts/onnx/torchvision_fixtures.py            # everything
    python3 scripts/onnx/torchvision_fixtures.py NAME...    # those of MODELS, or of tiny_cnn, attention_cnn, small_unet, adaptive_pool_cnn,
                                                            # self_attention_cnn, group_norm_cnn
"""
import os
import shutil
import sys

import numpy as np
import onnx
import onnx.numpy_helper as nh
import onnxruntime as ort
import torch
import torchvision.models as M
import torchvision.models.segmentation as S

OUT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "crates", "onnx", "tests", "torchvision"))
SIDE = 64

# (name, exporters). ConvNeXt's new-exporter graph gathers its pooled values by indices it
# computes from the batch (Range, Mul, Unsqueeze, Add: an as_strided) before its last layer norm.
MODELS = [
    ("resnet18", ("dynamo", "torchscript")),
    ("mobilenet_v2", ("dynamo", "torchscript")),
    ("googlenet", ("dynamo", "torchscript")),
    ("mobilenet_v3_small", ("dynamo", "torchscript")),
    ("shufflenet_v2_x0_5", ("dynamo", "torchscript")),
    ("efficientnet_b0", ("dynamo", "torchscript")),
    ("squeezenet1_1", ("dynamo", "torchscript")),
    ("regnet_y_400mf", ("dynamo", "torchscript")),
    ("densenet121", ("torchscript",)),
    ("convnext_tiny", ("dynamo", "torchscript")),
    # At 64x64 AlexNet's adaptive pooling makes 6x6 of a 1x1 map: the new exporter gathers it
    # (GatherND) and averages over two axes (ReduceMean); the TorchScript one refuses it.
    ("alexnet", ("dynamo",)),
    # A segmentation network (torchvision.models.segmentation, its "out" map of 5 classes):
    # bilinear Resize to the input's size, computed from its shape.
    ("lraspp_mobilenet_v3_large", ("dynamo", "torchscript")),
]
SEGMENTATION = {"lraspp_mobilenet_v3_large"}


class SegmentationOut(torch.nn.Module):
    """A torchvision segmentation network's "out" map (the networks return a dict)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["out"]
OPSETS = {"dynamo": 18, "torchscript": 17}


class TutorialCnn(torch.nn.Module):
    """A convolution, ReLU, max pooling, then x.view(x.size(0), -1) and a dense layer, on
    1x28x28 images, as the tutorials write a CNN."""

    def __init__(self, channels, kernel, pool, classes):
        super().__init__()
        self.pool = pool
        side = (28 - kernel + 1) // pool
        self.conv = torch.nn.Conv2d(1, channels, kernel)
        self.fc = torch.nn.Linear(channels * side * side, classes)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), self.pool)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def export(net, x, path, exporter, external_data=False):
    if exporter == "dynamo":
        torch.onnx.export(net, (x,), path, input_names=["input"], output_names=["output"],
                          dynamic_shapes={"x": {0: torch.export.Dim("N")}}, opset_version=OPSETS[exporter], dynamo=True,
                          external_data=external_data)
    else:
        torch.onnx.export(net, (x,), path, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, opset_version=OPSETS[exporter], dynamo=False)


class AttentionCnn(torch.nn.Module):
    """A CNN with CBAM's attention (Woo et al. 2018): channel attention from the mean and max of
    each map through a shared MLP, spatial attention from the mean and max over channels through
    a 7x7 convolution; then global average pooling and F.normalize before the dense layer. Its
    graphs reduce over the channel axis (ReduceMean, ReduceMax), take an L2 norm (ReduceL2) and
    Expand it."""

    def __init__(self, channels=8, classes=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(channels, channels // 2), torch.nn.ReLU(), torch.nn.Linear(channels // 2, channels))
        self.spatial = torch.nn.Conv2d(2, 1, 7, padding=3)
        self.fc = torch.nn.Linear(channels, classes)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        a = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))
        x = x * torch.sigmoid(a)[:, :, None, None]
        m = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)
        x = x * torch.sigmoid(self.spatial(m))
        x = torch.nn.functional.normalize(x.flatten(2).mean(2), dim=1)
        return self.fc(x)


class SmallUNet(torch.nn.Module):
    """A two-level U-Net for 2-class segmentation whose decoder upsamples three ways: nearest by
    2 (nn.Upsample), bilinear by 2 (F.interpolate, align_corners=False) and bilinear to the
    skip connection's size with align_corners=True."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1)
        self.d1, self.d2, self.d3 = conv(3, 8), conv(8, 12), conv(12, 16)
        self.u2, self.u1, self.out = conv(28, 12), conv(20, 8), torch.nn.Conv2d(8, 2, 1)
        self.up = torch.nn.Upsample(scale_factor=2)

    def forward(self, x):
        f = torch.nn.functional
        a = torch.relu(self.d1(x))
        b = torch.relu(self.d2(f.max_pool2d(a, 2)))
        c = torch.relu(self.d3(f.max_pool2d(b, 2)))
        c = self.up(c) + f.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)
        b = torch.relu(self.u2(torch.cat([b, c], 1)))
        b = f.interpolate(b, size=a.shape[2:], mode="bilinear", align_corners=True)
        return self.out(torch.relu(self.u1(torch.cat([a, b], 1))))


def with_own_weights(name, net, x, seed_fuzzer=False, exporters=("dynamo", "torchscript")):
    """`net` with its own seeded weights on the images `x`, by `exporters`, as
    `{name}.{exporter}.onnx` with ONNX Runtime's output; with `seed_fuzzer`, the new exporter's
    graph also seeds the fuzzer (it must stay under its 16 KiB)."""
    with open(os.path.join(OUT, f"{name}.input.pb"), "wb") as f:
        f.write(nh.from_array(x.numpy(), "input").SerializeToString())
    with torch.no_grad():
        want = net(x).numpy()
    for exporter in exporters:
        path = os.path.join(OUT, f"{name}.{exporter}.onnx")
        export(net, x, path, exporter)
        model = onnx.load(path)
        for node in model.graph.node:
            node.ClearField("metadata_props")
            node.ClearField("doc_string")
        onnx.save(model, path)
        got = ort_run(model, x.numpy())
        assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max()), f"{name}: ONNX Runtime and PyTorch differ"
        with open(os.path.join(OUT, f"{name}.{exporter}.output.pb"), "wb") as f:
            f.write(nh.from_array(got, "output").SerializeToString())
        ops = sorted({n.op_type for n in model.graph.node})
        print(f"{name} ({exporter}): {len(model.graph.node)} nodes: {', '.join(ops)}", file=sys.stderr)
    if not seed_fuzzer:
        return
    seed = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "fuzz", "seeds", "onnx_model", f"{name}.onnx"))
    shutil.copyfile(os.path.join(OUT, f"{name}.dynamo.onnx"), seed)
    assert os.path.getsize(seed) < 16384, "the seed is over the fuzzer's max_len"


class AdaptivePoolCnn(torch.nn.Module):
    """Adaptive average pooling to sizes that do not divide the map, as VGG's and AlexNet's
    classifiers meet it on small images: 15x15 to 7x4 (windows of 3 and 4 overlapping) and 3x3
    up to 5x5 (VGG's 2x2 to 7x7 at 64x64). The new exporter gathers each window's first and
    second cells and zeroes the second where a window has one (Where with constant masks)."""

    def __init__(self, channels=6, classes=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 3)
        self.down = torch.nn.AdaptiveAvgPool2d((7, 4))
        self.up = torch.nn.AdaptiveAvgPool2d(5)
        self.fc = torch.nn.Linear(channels * (28 + 25), classes)

    def forward(self, x):
        f = torch.nn.functional
        x = f.max_pool2d(torch.relu(self.conv(x)), 4)
        a, b = self.down(x), self.up(f.max_pool2d(x, 5))
        return self.fc(torch.cat([a.flatten(1), b.flatten(1)], 1))


class SelfAttentionCnn(torch.nn.Module):
    """Multi-head self-attention over a feature map's positions between convolutions, as
    YOLO11's C2PSA and non-local blocks write it: queries, keys and values from one 1x1
    convolution, viewed as [N, heads, d, HW], then two batched products (MatMul of 4-d stacks)
    around a softmax, and a residual add."""

    def __init__(self, channels=8, heads=2, classes=10):
        super().__init__()
        self.heads, self.d = heads, channels // heads
        self.conv = torch.nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.qkv = torch.nn.Conv2d(channels, 3 * channels, 1)
        self.proj = torch.nn.Conv2d(channels, channels, 1)
        self.fc = torch.nn.Linear(channels, classes)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).view(n, self.heads, 3 * self.d, h * w).split([self.d, self.d, self.d], dim=2)
        a = (q.transpose(-2, -1) @ k * self.d ** -0.5).softmax(dim=-1)
        x = x + self.proj((v @ a.transpose(-2, -1)).view(n, c, h, w))
        return self.fc(x.mean((2, 3)))


def self_attention_cnn():
    """SelfAttentionCnn with its own seeded weights, on 3 seeded 3x12x12 images."""
    torch.manual_seed(11)
    with_own_weights("self_attention_cnn", SelfAttentionCnn().eval(), torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(12)),
                     seed_fuzzer=True)


class GroupNormCnn(torch.nn.Module):
    """Group normalisation (two groups of four channels) and instance normalisation with its
    affine, as detection heads, PoolFormer and MobileViT-v2 use them: the TorchScript exporter
    writes both as InstanceNormalization (a group norm between two Reshapes, its affine as Mul
    and Add)."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 6, 3, padding=1)
        self.gn, self.inorm = torch.nn.GroupNorm(2, 8), torch.nn.InstanceNorm2d(6, affine=True)
        with torch.no_grad():
            for p in (self.gn.weight, self.gn.bias, self.inorm.weight, self.inorm.bias):
                p.uniform_(0.5, 1.5)
        self.fc = torch.nn.Linear(6, classes)

    def forward(self, x):
        x = torch.relu(self.gn(self.conv1(x)))
        x = torch.relu(self.inorm(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def group_norm_cnn():
    """GroupNormCnn with its own seeded weights, on 3 seeded 3x10x10 images."""
    torch.manual_seed(13)
    with_own_weights("group_norm_cnn", GroupNormCnn().eval(), torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(14)),
                     seed_fuzzer=True)


class PaddedCnn(torch.nn.Module):
    """Padding by the map's own values (ReflectionPad2d as CycleGAN's and style-transfer
    networks pad, ReplicationPad2d, circular F.pad) and EdgeNeXt's sine position encoding (a mask
    of ones over [N, H, W] counted by cumsum, every second frequency by a stepped slice,
    projected by a 1x1 convolution) added to the features."""

    def __init__(self, classes=10):
        super().__init__()
        self.reflect, self.replicate = torch.nn.ReflectionPad2d(2), torch.nn.ReplicationPad2d((1, 2, 0, 1))
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 8, 5), torch.nn.Conv2d(8, 8, 3)
        self.project = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, classes)

    def encoding(self, x):
        n, _, h, w = x.shape
        ones = (~torch.zeros(n, h, w, dtype=torch.bool)).float()
        y, xs = ones.cumsum(1), ones.cumsum(2)
        y, xs = y / (y[:, -1:, :] + 1e-6) * 6.2832, xs / (xs[:, :, -1:] + 1e-6) * 6.2832
        t = torch.arange(4, dtype=torch.float32)
        t = 10000.0 ** (2 * (t // 2) / 4)
        px, py = xs[:, :, :, None] / t, y[:, :, :, None] / t
        px = torch.stack((px[:, :, :, 0::2].sin(), px[:, :, :, 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[:, :, :, 0::2].sin(), py[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return self.project(torch.cat((py, px), dim=3).permute(0, 3, 1, 2))

    def forward(self, x):
        x = torch.relu(self.conv1(self.reflect(x)))
        x = torch.relu(self.conv2(self.replicate(x)))
        x = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular")
        x = x + self.encoding(x)
        return self.fc(x.mean((2, 3)))


def padded_cnn():
    """PaddedCnn with its own seeded weights, on 3 seeded 3x10x12 images."""
    torch.manual_seed(15)
    with_own_weights("padded_cnn", PaddedCnn().eval(), torch.randn(3, 3, 10, 12, generator=torch.Generator().manual_seed(16)),
                     seed_fuzzer=True)


class OneDCnn(torch.nn.Module):
    """A 1-d CNN over sequences of 2 channels (audio and sensor CNNs): Conv1d with padding, batch
    norm (folded by the exporters, and after a ReLU, kept), max pooling, a grouped strided dilated
    Conv1d padding by reflection, ECA's channel attention (a Conv1d across the channels of the
    pooled features, Wang et al. 2020, as timm's ECA-ResNets use it), average pooling, nearest
    and linear resizing, a ConvTranspose1d and adaptive average pooling to one value per
    channel."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.bn, self.bn2 = torch.nn.Conv1d(2, 8, 5, padding=2), torch.nn.BatchNorm1d(8), torch.nn.BatchNorm1d(8)
        self.conv2 = torch.nn.Conv1d(8, 8, 3, stride=2, dilation=2, groups=2, padding=2, padding_mode="reflect")
        self.pool = torch.nn.AdaptiveAvgPool1d(1)
        self.eca = torch.nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.up = torch.nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
        self.fc = torch.nn.Linear(4, classes)

    def forward(self, x):
        x = torch.nn.functional.max_pool1d(torch.relu(self.bn(self.conv1(x))), 2)
        x = self.bn2(torch.relu(self.conv2(x)))
        gate = self.eca(x.mean(-1, keepdim=True).transpose(-1, -2)).transpose(-1, -2).sigmoid()
        x = torch.nn.functional.avg_pool1d(x * gate, 2)
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        x = torch.nn.functional.interpolate(x, size=x.shape[-1] + 3, mode="linear", align_corners=False)
        return self.fc(self.pool(torch.relu(self.up(x))).flatten(1))


def one_d_cnn():
    """OneDCnn with its own seeded weights, on 3 seeded sequences of 2x40."""
    torch.manual_seed(17)
    with_own_weights("one_d_cnn", OneDCnn().eval(), torch.randn(3, 2, 40, generator=torch.Generator().manual_seed(18)))


def adaptive_pool_cnn():
    """AdaptivePoolCnn on 2 seeded 3x64x64 images, by the new exporter (the TorchScript one
    refuses sizes that do not divide)."""
    torch.manual_seed(9)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    with_own_weights("adaptive_pool_cnn", AdaptivePoolCnn().eval(), x, exporters=("dynamo",))


def small_unet():
    """SmallUNet on 2 seeded 3x16x16 images."""
    torch.manual_seed(7)
    with_own_weights("small_unet", SmallUNet().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8)))


def attention_cnn():
    """AttentionCnn with its own seeded weights, on 3 seeded 3x16x16 images."""
    torch.manual_seed(5)
    with_own_weights("attention_cnn", AttentionCnn().eval(), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6)), seed_fuzzer=True)


def fuzz_seed():
    torch.manual_seed(4)
    path = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "fuzz", "seeds", "onnx_model", "torchscript_view.onnx"))
    export(TutorialCnn(2, 3, 4, 3).eval(), torch.randn(2, 1, 28, 28), path, "torchscript")
    model = onnx.load(path)
    for node in model.graph.node:
        node.ClearField("doc_string")
    onnx.save(model, path)
    assert os.path.getsize(path) < 16384, "the seed is over the fuzzer's max_len"


def tiny_cnn():
    torch.manual_seed(3)
    net = TutorialCnn(4, 5, 2, 10).eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with open(os.path.join(OUT, "tiny_cnn.input.pb"), "wb") as f:
        f.write(nh.from_array(x.numpy(), "input").SerializeToString())
    with torch.no_grad():
        want = net(x).numpy()
    for exporter in ("dynamo", "torchscript"):
        path = os.path.join(OUT, f"tiny_cnn.{exporter}.onnx")
        export(net, x, path, exporter, external_data=True)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        got = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max()), "tiny_cnn: ONNX Runtime and PyTorch differ"
        with open(os.path.join(OUT, f"tiny_cnn.{exporter}.output.pb"), "wb") as f:
            f.write(nh.from_array(got, "output").SerializeToString())
    assert os.path.exists(os.path.join(OUT, "tiny_cnn.dynamo.onnx.data")), "the new exporter kept the weights inside"


def uniform(t_index, n):
    """n values in [0, 1): the same hash as crates/train/tests/fixtures/make_torchvision_refs.py."""
    i = np.arange(n, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(t_index) * np.uint64(40503) + np.uint64(12345)) % np.uint64(1 << 32)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(1274126177) % np.uint64(1 << 32)
    return h.astype(np.float64) / float(1 << 32)


def formula(t_index, dims):
    """A weight (2 or more axes) is uniform in +-sqrt(3 / fan_in), so activations keep their
    scale through the network; a vector (a bias, a batch norm's scale, shift, mean or variance)
    is uniform in [0.5, 1.5): positive, so a variance is one, and near 1, so a batch norm keeps
    the scale of its input."""
    n = int(np.prod(dims)) if len(dims) else 1
    u = uniform(t_index, n) * 2.0 - 1.0
    if len(dims) >= 2:
        fan_in = int(np.prod(dims[1:]))
        return (u * np.sqrt(3.0 / fan_in)).astype(np.float32).reshape(dims)
    return (1.0 + u * 0.5).astype(np.float32).reshape(dims)


def ort_run(model, x):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    with open(os.path.join(OUT, "input.pb"), "wb") as f:
        f.write(nh.from_array(x.numpy(), "input").SerializeToString())
    only = set(sys.argv[1:])
    extras = {"tiny_cnn": tiny_cnn, "attention_cnn": attention_cnn, "small_unet": small_unet, "adaptive_pool_cnn": adaptive_pool_cnn,
              "self_attention_cnn": self_attention_cnn, "group_norm_cnn": group_norm_cnn,
              "padded_cnn": padded_cnn, "one_d_cnn": one_d_cnn}
    unknown = only - {name for name, _ in MODELS} - set(extras)
    assert not unknown, f"neither in MODELS nor {sorted(extras)}: {sorted(unknown)}"
    for name, exporters in MODELS:
        if only and name not in only:
            continue
        kwargs = {"num_classes": 10}
        if name == "googlenet":
            kwargs.update(aux_logits=False, transform_input=False, init_weights=True)
        if name in SEGMENTATION:
            net = SegmentationOut(getattr(S, name)(weights=None, weights_backbone=None, num_classes=5)).eval()
        else:
            net = getattr(M, name)(**kwargs).eval()
        with torch.no_grad():
            want = net(x).numpy()
        for exporter in exporters:
            path = os.path.join(OUT, f"{name}.{exporter}.onnx")
            export(net, x, path, exporter)
            model = onnx.load(path)
            got = ort_run(model, x.numpy())
            assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max()), f"{name}: ONNX Runtime and PyTorch differ"
            # Formula weights in, then out of the kept file.
            k = 0
            for t in model.graph.initializer:
                if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1:
                    t.CopyFrom(nh.from_array(formula(k, list(t.dims)), t.name))
                    k += 1
            y = ort_run(model, x.numpy())
            for t in model.graph.initializer:
                if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1:
                    t.ClearField("raw_data")
                    t.ClearField("float_data")
            # What does not change the computation goes too: the new exporter's per-node
            # metadata (source lines, module paths) and its shape annotations.
            for node in model.graph.node:
                node.ClearField("metadata_props")
                node.ClearField("doc_string")
            model.graph.ClearField("value_info")
            onnx.save(model, path)
            with open(os.path.join(OUT, f"{name}.{exporter}.output.pb"), "wb") as f:
                f.write(nh.from_array(y, "output").SerializeToString())
            print(f"{name} ({exporter}): {len(model.graph.node)} nodes, {k} formula initializers, output {y.shape}", file=sys.stderr)
    for name, make in extras.items():
        if not only or name in only:
            make()
    if only:
        return
    fuzz_seed()
    with open(os.path.join(OUT, "VERSIONS"), "w") as f:
        f.write(f"torch {torch.__version__}\ntorchvision {__import__('torchvision').__version__}\nonnx {onnx.__version__}\nonnxruntime {ort.__version__}\n")


if __name__ == "__main__":
    main()
