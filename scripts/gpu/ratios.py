"""The table of scripts/gpu-check.sh: images per second of Stride (cuDNN in FP32, columns,
cuDNN in TF32) and PyTorch eager (defaults: cuDNN in TF32; and FP32), from the JSON lines the
check wrote to the folder given, and the ratios of like arithmetic: Stride FP32 to PyTorch
FP32, Stride TF32 to PyTorch's default."""
import json
import os
import sys


def read(path):
    out = {}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                out[r["bench"]] = r["value"]
    return out


folder = sys.argv[1]
runs = {name: read(os.path.join(folder, name + ".jsonl")) for name in ("stride", "stride-columns", "stride-tf32", "torch", "torch-fp32")}
ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
print(f"{'figure':<16} {'cuDNN fp32':>11} {'columns':>9} {'cuDNN tf32':>11} {'torch':>9} {'torch fp32':>11}   {'fp32/fp32':>9} {'tf32/torch':>10}")
for k in sorted(set().union(*runs.values())):
    s, c, t, p, f = (runs[n].get(k) for n in ("stride", "stride-columns", "stride-tf32", "torch", "torch-fp32"))
    print(f"{k:<16} {s or '-':>11} {c or '-':>9} {t or '-':>11} {p or '-':>9} {f or '-':>11}   {ratio(s, f):>9} {ratio(t, p):>10}")
print("(images/s on the GPU; torch's default runs cuDNN convolutions in TF32)")
