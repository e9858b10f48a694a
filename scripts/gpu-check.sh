#!/usr/bin/env bash
# The GPU check of the CUDA backend (issue 14), for a machine with an NVIDIA GPU, in one go
# (about a minute on an H200 when all goes well; every step has a timeout, 10 minutes in all):
#   1. `stride devices --check`: every primitive forward and backward on the GPU against the
#      CPU engine, within 1e-4 of the CPU tensor's largest magnitude, with convolutions on
#      columns and again on cuDNN (--cudnn fp32);
#   2. the tutorial CNN trained for one epoch on the GPU (`stride train --device cuda`; again
#      with the weights' moving average, and a learning-rate range test), and
#      examples/mnist-cnn on the CPU and the GPU when its binary sits beside stride's;
#   3. `stride bench --device cuda` (B1, B2, B4) beside PyTorch eager on the same GPU, in the
#      same run, with the ratios: Stride on columns, with cuDNN in FP32 and with cuDNN in TF32
#      (PyTorch's default arithmetic), PyTorch with its defaults and in FP32; then where
#      ResNet-18's time goes, per primitive.
# Usage: scripts/gpu-check.sh [path/to/stride]   (default target/release/stride; build it on a
# machine of the same type and carry it over, with target/release/examples/mnist-cnn beside it). Results go to $OUT (default: a temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/stride}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "no stride binary at $BIN (cargo build --release -p stride-cli)" >&2; exit 1; }

# The driver (libcuda.so.1) is on the loader's path; cuBLAS, NVRTC and cuDNN come from a CUDA
# toolkit or from PyTorch's nvidia-* wheels.
libs=$(python3 scripts/gpu/cuda_libs.py)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "CUDA libraries from: ${libs:-the default loader path}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

status=0
echo "== 1. every primitive against the CPU"
"$BIN" devices 2>&1 | tee "$OUT/devices.txt"
SECONDS=0
timeout 60 "$BIN" devices --check 2>&1 | tee "$OUT/check.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "CHECK FAILED"; status=1; }
echo "-- again on cuDNN (--cudnn fp32)"
timeout 60 "$BIN" devices --check --cudnn fp32 2>&1 | tee "$OUT/check-cudnn.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "CUDNN CHECK FAILED"; status=1; }

echo "   (${SECONDS} s)"; SECONDS=0
echo "== 2. the tutorial CNN, one epoch on the GPU"
rm -rf "${TMPDIR:-/tmp}/stride-gpu-run"
timeout 75 "$BIN" train --device cuda --epochs 1 --no-report --out "${TMPDIR:-/tmp}/stride-gpu-run" > "$OUT/train.txt" 2>&1
[ "$?" -eq 0 ] || { echo "TRAINING FAILED"; status=1; }
tail -n 4 "$OUT/train.txt"
echo "-- the weights' moving average (--ema) and a learning-rate range test (--lr-find) on the GPU"
timeout 40 "$BIN" train --device cuda --epochs 1 --ema 0.999 --no-report --out "${TMPDIR:-/tmp}/stride-gpu-ema" > "$OUT/ema.txt" 2>&1
[ "$?" -eq 0 ] || { tail -n 3 "$OUT/ema.txt"; echo "EMA RUN FAILED"; status=1; }
tail -n 1 "$OUT/ema.txt"
timeout 25 "$BIN" train --device cuda --lr-find --out "${TMPDIR:-/tmp}/stride-gpu-lr" > "$OUT/lr-find.txt" 2>&1
[ "$?" -eq 0 ] || { tail -n 3 "$OUT/lr-find.txt"; echo "LR-FIND FAILED"; status=1; }
grep -E "steps, up to|suggested|no rate" "$OUT/lr-find.txt"
EXAMPLE="$(dirname "$BIN")/mnist-cnn"
if [ -x "$EXAMPLE" ]; then
    echo "-- the same program on the CPU and the GPU (examples/mnist-cnn)"
    timeout 45 "$EXAMPLE" cpu cuda 2>&1 | tee "$OUT/example.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "EXAMPLE FAILED"; status=1; }
fi

echo "   (${SECONDS} s)"; SECONDS=0
echo "== 3. benchmarks: stride and PyTorch eager on the same GPU"
bench() {  # bench NAME CUDNN: stride's figures with --cudnn CUDNN into $OUT/NAME.jsonl
    local name=$1 cudnn=$2
    timeout 45 "$BIN" bench --device cuda --cudnn "$cudnn" --bench all --reps 30 > "$OUT/$name.jsonl" 2> "$OUT/$name.err" \
        || { tail -n 5 "$OUT/$name.err"; echo "STRIDE BENCH ($name) FAILED"; status=1; }
}
bench stride fp32
bench stride-columns off
bench stride-tf32 tf32
echo "   stride: ${SECONDS} s"
timeout 60 python3 scripts/gpu/torch_bench.py > "$OUT/torch.jsonl" 2> "$OUT/torch.err" || { tail -n 5 "$OUT/torch.err"; echo "TORCH BENCH FAILED"; status=1; }
TORCH_FP32=1 timeout 60 python3 scripts/gpu/torch_bench.py > "$OUT/torch-fp32.jsonl" 2>> "$OUT/torch.err" || { tail -n 5 "$OUT/torch.err"; echo "TORCH FP32 BENCH FAILED"; status=1; }
python3 scripts/gpu/ratios.py "$OUT" | tee "$OUT/ratios.txt"
echo "-- where ResNet-18's training step goes (each call waited for)"
STRIDE_CUDA_PROFILE=sync timeout 40 "$BIN" bench --device cuda --cudnn fp32 --bench resnet18 --reps 10 > /dev/null 2> "$OUT/profile.txt" || status=1
head -n 16 "$OUT/profile.txt"
echo "results in $OUT"
exit $status
