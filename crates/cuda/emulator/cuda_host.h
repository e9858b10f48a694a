// What kernels.cu needs of CUDA C++, for a host C++20 compiler: the thread and block indices,
// shared memory, __syncthreads, atomicAdd and the device math functions. fake_cuda.cpp runs
// the kernels with it (see README.md beside this file).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

struct emu_dim3 {
    unsigned x, y, z;
};

// The running thread's indices and the launch's shape. Every emulated thread runs on the thread
// that launched the kernel, one at a time (a kernel with shared memory: as fibers that take
// turns at each __syncthreads).
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

// The block's threads meet here: only fibers can, so a kernel without shared memory (whose
// threads run one after another) that calls it is reported and stopped.
void emu_syncthreads();

#define __global__
#define __device__
#define __forceinline__ inline
// Shared memory is one copy for the block: blocks of a cooperative launch run one after another.
#define __shared__ static
#define __syncthreads() emu_syncthreads()

// One emulated thread runs at a time, so a plain add is atomic.
inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

using std::isnan;
using std::max;
using std::min;
