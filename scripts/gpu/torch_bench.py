"""PyTorch (eager) on the GPU for bench/SPEC.md's B1, B2 and B4, printing the JSON lines that
`stride bench --device cuda` prints, so scripts/gpu-check.sh can put them side by side.

The networks follow SPEC.md: LeNet of the "CNN from scratch" tutorial (B1), the ADCME VAE (B2)
and ResNet-18 with the CIFAR stem (B4). Timing: warm-up steps, then the median of five timed
blocks, each ended by torch.cuda.synchronize().
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


DEVICE = os.environ.get("BENCH_DEVICE", "cuda:0")  # "cpu" only to try the script without a GPU
# PyTorch's defaults let cuDNN run convolutions in TF32 (10-bit mantissas) on tensor cores;
# TORCH_FP32=1 turns that off, for figures in the same arithmetic as Stride's (FP32 throughout).
FP32 = os.environ.get("TORCH_FP32") == "1"
if FP32:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
sync = torch.cuda.synchronize if DEVICE.startswith("cuda") else (lambda: None)


def timed(step, warmup, steps):
    for _ in range(warmup):
        step()
    sync()
    block = max(1, -(-steps // 5))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(block):
            step()
        sync()
        times.append((time.perf_counter() - t) / block)
    return statistics.median(times)


def emit(name, secs, batch, mode="eager-fp32" if FP32 else "eager"):
    print(json.dumps({"bench": name, "impl": "torch", "value": round(batch / secs, 1), "unit": "images/s",
                      "median_ms": round(secs * 1e3, 4), "batch": batch, "device": DEVICE, "mode": mode,
                      "version": torch.__version__}), flush=True)


def lenet():
    return nn.Sequential(nn.Conv2d(1, 20, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(800, 128), nn.ReLU(), nn.Linear(128, 10))


class Vae(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(1024, 500), nn.ELU(), nn.Dropout(0.1), nn.Linear(500, 500), nn.Tanh(), nn.Dropout(0.1),
                                 nn.Linear(500, 200))
        self.t = nn.ModuleList([nn.ConvTranspose2d(100, 256, 4, 1, 0, bias=False), nn.ConvTranspose2d(256, 128, 4, 1, 1, bias=False),
                                nn.ConvTranspose2d(128, 64, 4, 1, 0, bias=False), nn.ConvTranspose2d(64, 1, 4, 4, 0, bias=False)])
        self.bn = nn.ModuleList([nn.BatchNorm2d(c) for c in (256, 128, 64, 1)])

    def forward(self, x):
        h = self.enc(x)
        mu, sigma = h[:, :100], 1e-6 + F.softplus(h[:, 100:])
        y = (mu + sigma * torch.randn_like(mu)).view(-1, 100, 1, 1)
        y = F.relu(self.bn[0](self.t[0](y)))
        y = F.relu(self.bn[1](self.t[1](y)[:, :, :4, :4]))
        y = F.relu(self.bn[2](F.pad(self.t[2](y), (0, 1, 0, 1))))
        y = torch.sigmoid(self.bn[3](self.t[3](y))).view(-1, 1024)
        y = y.clamp(1e-7, 1 - 1e-7)
        bce = -(x * torch.log(y) + (1 - x) * torch.log(1 - y)).sum(1).mean()
        kl = (0.5 * (mu ** 2 + sigma ** 2 - torch.log(1e-8 + sigma ** 2) - 1).sum(1)).mean()
        return bce + kl


def block(cin, cout, stride):
    class Basic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                   nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.s = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            return F.relu(self.a(x) + self.s(x))
    return Basic()


def resnet18():
    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [block(cin, cout, stride), block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def classifier(name, model, x, y, opt, warmup, steps, infer_warmup):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    emit(f"{name}_train", timed(step, warmup, steps), x.shape[0])
    model.eval()

    def infer():
        with torch.inference_mode():
            model(x)
    emit(f"{name}_infer", timed(infer, infer_warmup, steps), x.shape[0])
    model.train()


def main():
    benches = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else {"lenet", "vae", "resnet18"}
    dev = torch.device(DEVICE)
    torch.manual_seed(0)
    if "lenet" in benches:
        m = lenet().to(dev)
        classifier("lenet", m, torch.randn(64, 1, 28, 28, device=dev), torch.randint(0, 10, (64,), device=dev),
                   torch.optim.SGD(m.parameters(), lr=0.01), 5, 50, 5)
    if "vae" in benches:
        m = Vae().to(dev)
        x = torch.rand(32, 1024, device=dev)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            m(x).backward()
            opt.step()
        emit("vae_train", timed(step, 5, 50), 32)
    if "resnet18" in benches:
        m = resnet18().to(dev)
        classifier("resnet18", m, torch.randn(32, 3, 32, 32, device=dev), torch.randint(0, 10, (32,), device=dev),
                   torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), 2, 30, 2)


if __name__ == "__main__":
    main()
