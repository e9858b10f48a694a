#!/usr/bin/env bash
# Builds the CUDA emulator (see README.md here) into OUT_DIR from KERNELS_CU (the backend's
# crates/cuda/src/kernels.cu, or a copy): libcuda.so, and libcublas.so and libcudnn.so links to it.
#   build.sh OUT_DIR KERNELS_CU [--asan]
# --asan builds it with AddressSanitizer; run stride with LD_PRELOAD="$(c++ -print-file-name=libasan.so)"
# and ASAN_OPTIONS=detect_leaks=0 then.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 OUT_DIR KERNELS_CU [--asan]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
out=$1
kernels=$2
mkdir -p "$out"
cp "$kernels" "$out/kernels.cu"
# One EMU_KERNEL(name, cooperative) per kernel: cooperative when its body declares __shared__
# memory (its block's threads then run as fibers that meet at __syncthreads).
awk '
    /^extern "C" __global__ void / {
        if (name != "") print "EMU_KERNEL(" name ", " coop ")"
        name = $0; sub(/^extern "C" __global__ void /, "", name); sub(/\(.*/, "", name); coop = "false"
    }
    /__shared__/ { if (name != "") coop = "true" }
    END { if (name != "") print "EMU_KERNEL(" name ", " coop ")" }
' "$out/kernels.cu" > "$out/kernels.inc"
flags=(-std=c++20 -O2 -fPIC -shared -Wall -Wno-sign-compare)
if [ "${3:-}" = "--asan" ]; then
    flags+=(-fsanitize=address -fno-omit-frame-pointer -g)
fi
# The copy of kernels.cu beside kernels.inc is the one compiled.
"${CXX:-c++}" "${flags[@]}" -I "$out" "$here/fake_cuda.cpp" "$here/fake_cudnn.cpp" -o "$out/libcuda.so"
ln -sf libcuda.so "$out/libcublas.so"
ln -sf libcuda.so "$out/libcudnn.so"
