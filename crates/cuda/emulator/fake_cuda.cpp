// A CUDA driver and cuBLAS that run on the CPU, for testing Stride's CUDA backend on a machine
// without a GPU (see README.md beside this file); cuDNN is in fake_cudnn.cpp. Built as one
// library, libcuda.so, with libcublas.so and libcudnn.so links to it, found
// before any real ones through LD_LIBRARY_PATH: cudarc loads the same entry points it loads on a
// GPU, NVRTC (the real one) compiles kernels.cu to PTX as on a GPU, and a launch runs the same
// kernel compiled here for the host (kernels.inc, written by build.sh, lists them).
//
// Memory is host memory; every call completes before it returns (one stream, in order). Each
// copy, set, free and launch argument that names device memory is checked against the live
// allocations, and a fault is an error code, as a GPU would give one.

#include "cuda_host.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {
// A cooperative block's threads are fibers on the launching thread: each runs until it reaches
// __syncthreads (or its end), and the next round starts once all of them have.
struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    emu_dim3 index;
    bool done;
};
ucontext_t scheduler;
Fiber* current = nullptr;
}  // namespace

void emu_syncthreads() {
    if (current == nullptr) {
        std::fprintf(stderr, "fake CUDA: __syncthreads in a kernel without __shared__ memory (its threads run one at a time)\n");
        std::abort();
    }
    swapcontext(&current->context, &scheduler);
}

#include "kernels.cu"

namespace {

using Adapter = void (*)(void** params);

// Calls kernel `f` with the launch's parameters: each entry of `params` points at one argument's
// value, as cuLaunchKernel's kernelParams do.
template <typename F, F f>
struct Adapt;
template <typename... A, void (*f)(A...)>
struct Adapt<void (*)(A...), f> {
    template <std::size_t... I>
    static void call_with(void** p, std::index_sequence<I...>) {
        f(*static_cast<std::remove_cv_t<A>*>(p[I])...);
    }
    static void call(void** p) { call_with(p, std::index_sequence_for<A...>{}); }
};

struct Kernel {
    const char* name;
    Adapter call;
    // Declares __shared__ memory: its block's threads run as fibers that meet at __syncthreads.
    bool cooperative;
    // Arguments that are pointers (checked against the allocations at launch).
    std::vector<bool> pointers;
};

template <typename... A>
std::vector<bool> pointer_args(void (*)(A...)) {
    return {std::is_pointer_v<A>...};
}

#define EMU_KERNEL(name, cooperative) Kernel{#name, &Adapt<decltype(&name), &name>::call, cooperative, pointer_args(&name)},
const std::vector<Kernel> KERNELS = {
#include "kernels.inc"
};

std::mutex mu;
// Live allocations: start -> bytes.
std::map<std::uintptr_t, std::size_t> live;
int context_tag, pool_tag;
// Bytes allocated, and the device's memory: 8 GiB, or FAKE_CUDA_MEMORY bytes (to see what a
// program does when the GPU's memory runs out).
std::size_t in_use = 0;
std::size_t capacity() {
    static const std::size_t bytes = [] {
        const char* v = std::getenv("FAKE_CUDA_MEMORY");
        return v ? (std::size_t)std::strtoull(v, nullptr, 10) : std::size_t{8} << 30;
    }();
    return bytes;
}
std::vector<std::string> modules;

// Whether [p, p + n) lies in one live allocation.
bool inside(std::uintptr_t p, std::size_t n) {
    auto it = live.upper_bound(p);
    if (it == live.begin()) return false;
    --it;
    return p >= it->first && p - it->first + n <= it->second;
}

// With FAKE_CUDA_COUNT set, how many times each kind of work was queued, printed at exit: the
// work a program asks of a GPU, which (unlike its speed) the emulator shows as it is.
struct Counts {
    std::mutex mu;
    std::map<std::string, long> by_name;
    bool on = std::getenv("FAKE_CUDA_COUNT") != nullptr;
    // At exit, or when the library is closed (cudarc opens and closes it once to see that it is
    // there: nothing is counted then).
    ~Counts() {
        if (!on || by_name.empty()) return;
        long launches = 0;
        for (auto& [name, n] : by_name)
            if (name.rfind("kernel ", 0) == 0) launches += n;
        std::fprintf(stderr, "fake CUDA: %ld kernel launches", launches);
        for (auto& [name, n] : by_name)
            if (name.rfind("kernel ", 0) != 0) std::fprintf(stderr, ", %ld %s", n, name.c_str());
        std::fprintf(stderr, "\n");
        for (auto& [name, n] : by_name)
            if (name.rfind("kernel ", 0) == 0) std::fprintf(stderr, "fake CUDA:   %8ld %s\n", n, name.c_str() + 7);
    }
};
Counts counts;

}  // namespace

// Counts one piece of work of kind `what` (fake_cudnn.cpp counts its calls too).
void emu_count(const std::string& what) {
    if (!counts.on) return;
    std::lock_guard<std::mutex> g(counts.mu);
    ++counts.by_name[what];
}

// With FAKE_CUDA_HOST_ONLY set, launches, products and cuDNN calls are checked and counted but
// not run, so a program's wall time is what it spends on the host to queue its work (results
// are then garbage; for timing only).
bool emu_host_only() {
    static const bool on = std::getenv("FAKE_CUDA_HOST_ONLY") != nullptr;
    return on;
}

// Whether [p, p + bytes) lies in one live allocation (fake_cudnn.cpp asks too).
bool emu_device_memory(const void* p, std::size_t bytes) {
    std::lock_guard<std::mutex> g(mu);
    return inside((std::uintptr_t)p, bytes);
}

namespace {

void fault(const char* what, std::uintptr_t p, std::size_t n) {
    std::fprintf(stderr, "fake CUDA: %s of %zu bytes at %#lx outside every allocation\n", what, n, (unsigned long)p);
}

constexpr int SUCCESS = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_HANDLE = 400, NOT_FOUND = 500, ILLEGAL_ADDRESS = 700,
              INVALID_DEVICE = 101;

std::mutex launch_mu;

// Runs every thread of every block, one at a time (a cooperative kernel's block as fibers that
// take turns at each __syncthreads), blocks in turn.
int run(const Kernel& k, emu_dim3 grid, emu_dim3 block, void** params) {
    gridDim = grid;
    blockDim = block;
    if (!k.cooperative) {
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    blockIdx = {bx, by, bz};
                    for (unsigned tz = 0; tz < block.z; ++tz)
                        for (unsigned ty = 0; ty < block.y; ++ty)
                            for (unsigned tx = 0; tx < block.x; ++tx) {
                                threadIdx = {tx, ty, tz};
                                k.call(params);
                            }
                }
        return SUCCESS;
    }
    unsigned n = block.x * block.y * block.z;
    static std::vector<Fiber> fibers;
    if (fibers.size() < n) fibers.resize(n);
    static const Kernel* kernel;
    static void** args;
    kernel = &k;
    args = params;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                for (unsigned t = 0; t < n; ++t) {
                    Fiber& f = fibers[t];
                    f.stack.resize(64 * 1024);
                    f.index = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
                    f.done = false;
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = f.stack.data();
                    f.context.uc_stack.ss_size = f.stack.size();
                    f.context.uc_link = &scheduler;
                    makecontext(&f.context, [] {
                        kernel->call(args);
                        current->done = true;
                    }, 0);
                }
                for (unsigned left = n; left > 0;) {
                    for (unsigned t = 0; t < n; ++t) {
                        if (fibers[t].done) continue;
                        current = &fibers[t];
                        threadIdx = current->index;
                        swapcontext(&scheduler, &current->context);
                        left -= current->done;
                    }
                }
                current = nullptr;
            }
    return SUCCESS;
}

}  // namespace

extern "C" {

// ---- the driver ----

int cuInit(unsigned) { return SUCCESS; }
int cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
// One device, or FAKE_CUDA_DEVICES of them (all views of the same host memory).
int device_count() {
    static const int n = [] {
        const char* v = std::getenv("FAKE_CUDA_DEVICES");
        return v ? std::max(0, std::atoi(v)) : 1;
    }();
    return n;
}
int cuDeviceGetCount(int* n) {
    *n = device_count();
    return SUCCESS;
}
int cuDeviceGet(int* d, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return INVALID_DEVICE;
    *d = ordinal;
    return SUCCESS;
}
int cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, (std::size_t)len, "Stride CPU emulator");
    return SUCCESS;
}
int cuDeviceTotalMem_v2(std::size_t* bytes, int) {
    *bytes = capacity();
    return SUCCESS;
}
int cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
    case 75: *v = 9; break;    // compute capability, major
    case 76: *v = 0; break;    // minor
    case 115: *v = 1; break;   // memory pools
    case 16: *v = 1; break;    // multiprocessors
    default: *v = 0;
    }
    return SUCCESS;
}
int cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &context_tag;
    return SUCCESS;
}
int cuDevicePrimaryCtxRelease_v2(int) { return SUCCESS; }
thread_local void* current_context = nullptr;
int cuCtxGetCurrent(void** ctx) {
    *ctx = current_context;
    return SUCCESS;
}
int cuCtxSetCurrent(void* ctx) {
    current_context = ctx;
    return SUCCESS;
}
int cuCtxSynchronize() { return SUCCESS; }
int cuStreamSynchronize(void*) { return SUCCESS; }
int cuDeviceGetDefaultMemPool(void** pool, int) {
    *pool = &pool_tag;
    return SUCCESS;
}
int cuMemPoolSetAttribute(void*, int, void*) { return SUCCESS; }
int cuMemGetInfo_v2(std::size_t* free, std::size_t* total) {
    std::lock_guard<std::mutex> g(mu);
    *total = capacity();
    *free = *total - in_use;
    return SUCCESS;
}

int cuMemAllocAsync(std::uint64_t* p, std::size_t bytes, void*) {
    if (bytes == 0) return INVALID_VALUE;
    emu_count("allocations");
    {
        std::lock_guard<std::mutex> g(mu);
        if (bytes > capacity() - in_use) return OUT_OF_MEMORY;
        in_use += bytes;
    }
    void* m = std::malloc(bytes);
    if (!m) {
        std::lock_guard<std::mutex> g(mu);
        in_use -= bytes;
        return OUT_OF_MEMORY;
    }
    // Garbage, as fresh device memory may be: a kernel that reads before it writes shows.
    if (!emu_host_only()) std::memset(m, 0xff, bytes);
    std::lock_guard<std::mutex> g(mu);
    live[(std::uintptr_t)m] = bytes;
    *p = (std::uint64_t)(std::uintptr_t)m;
    return SUCCESS;
}
int cuMemAlloc_v2(std::uint64_t* p, std::size_t bytes) { return cuMemAllocAsync(p, bytes, nullptr); }
int cuMemFreeAsync(std::uint64_t p, void*) {
    std::lock_guard<std::mutex> g(mu);
    auto it = live.find((std::uintptr_t)p);
    if (it == live.end()) {
        fault("free", (std::uintptr_t)p, 0);
        return INVALID_VALUE;
    }
    in_use -= it->second;
    live.erase(it);
    std::free((void*)(std::uintptr_t)p);
    return SUCCESS;
}
int cuMemFree_v2(std::uint64_t p) { return cuMemFreeAsync(p, nullptr); }

int cuMemcpyHtoDAsync_v2(std::uint64_t dst, const void* src, std::size_t n, void*) {
    emu_count("copies to the device");
    std::lock_guard<std::mutex> g(mu);
    if (!inside(dst, n)) return fault("copy to the device", dst, n), ILLEGAL_ADDRESS;
    std::memcpy((void*)(std::uintptr_t)dst, src, n);
    return SUCCESS;
}
int cuMemcpyHtoD_v2(std::uint64_t dst, const void* src, std::size_t n) { return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr); }
int cuMemcpyDtoHAsync_v2(void* dst, std::uint64_t src, std::size_t n, void*) {
    emu_count("copies to the host");
    std::lock_guard<std::mutex> g(mu);
    if (!inside(src, n)) return fault("copy to the host", src, n), ILLEGAL_ADDRESS;
    std::memcpy(dst, (const void*)(std::uintptr_t)src, n);
    return SUCCESS;
}
int cuMemcpyDtoH_v2(void* dst, std::uint64_t src, std::size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); }
int cuMemcpyDtoDAsync_v2(std::uint64_t dst, std::uint64_t src, std::size_t n, void*) {
    emu_count("device copies");
    std::lock_guard<std::mutex> g(mu);
    if (!inside(src, n) || !inside(dst, n)) return fault("device copy", inside(src, n) ? dst : src, n), ILLEGAL_ADDRESS;
    if (emu_host_only()) return SUCCESS;
    std::memmove((void*)(std::uintptr_t)dst, (const void*)(std::uintptr_t)src, n);
    return SUCCESS;
}
int cuMemcpyDtoD_v2(std::uint64_t dst, std::uint64_t src, std::size_t n) { return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr); }
int cuMemsetD8Async(std::uint64_t dst, unsigned char v, std::size_t n, void*) {
    emu_count("memsets");
    std::lock_guard<std::mutex> g(mu);
    if (!inside(dst, n)) return fault("memset", dst, n), ILLEGAL_ADDRESS;
    if (emu_host_only()) return SUCCESS;
    std::memset((void*)(std::uintptr_t)dst, v, n);
    return SUCCESS;
}
int cuMemsetD8_v2(std::uint64_t dst, unsigned char v, std::size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }

// Events only order work and time it: everything here is done when queued, and takes no time.
int cuEventCreate(void** e, unsigned) {
    *e = new int(0);
    return SUCCESS;
}
int cuEventDestroy_v2(void* e) {
    delete static_cast<int*>(e);
    return SUCCESS;
}
int cuEventRecord(void*, void*) { return SUCCESS; }
int cuEventSynchronize(void*) { return SUCCESS; }
int cuEventQuery(void*) { return SUCCESS; }
int cuStreamWaitEvent(void*, void*, unsigned) { return SUCCESS; }
int cuEventElapsedTime(float* ms, void*, void*) {
    *ms = 0.0f;
    return SUCCESS;
}
int cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// The module is NVRTC's PTX, kept so a function is found only if NVRTC compiled it too.
int cuModuleLoadData(void** module, const void* image) {
    std::lock_guard<std::mutex> g(mu);
    modules.emplace_back(static_cast<const char*>(image));
    *module = reinterpret_cast<void*>(modules.size());
    return SUCCESS;
}
int cuModuleUnload(void*) { return SUCCESS; }
int cuModuleGetFunction(void** f, void* module, const char* name) {
    std::lock_guard<std::mutex> g(mu);
    std::size_t m = reinterpret_cast<std::size_t>(module);
    if (m == 0 || m > modules.size()) return INVALID_HANDLE;
    if (modules[m - 1].find(std::string(".entry ") + name + "(") == std::string::npos) return NOT_FOUND;
    for (const Kernel& k : KERNELS) {
        if (std::strcmp(k.name, name) == 0) {
            *f = const_cast<Kernel*>(&k);
            return SUCCESS;
        }
    }
    return NOT_FOUND;
}
int cuFuncSetAttribute(void*, int, int) { return SUCCESS; }

int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared, void*,
                   void** params, void** extra) {
    if (!f) return INVALID_HANDLE;
    const Kernel& k = *static_cast<const Kernel*>(f);
    // CUDA's limits (compute capability 9.0): 1,024 threads a block, 65,535 blocks in y and z.
    std::uint64_t threads = (std::uint64_t)bx * by * bz;
    if (threads == 0 || threads > 1024 || bz > 64 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535 || gx > 0x7fffffffu ||
        shared > 48 * 1024 || extra != nullptr || (params == nullptr && !k.pointers.empty())) {
        std::fprintf(stderr, "fake CUDA: %s launched with grid (%u, %u, %u), block (%u, %u, %u)\n", k.name, gx, gy, gz, bx, by, bz);
        return INVALID_VALUE;
    }
    {
        std::lock_guard<std::mutex> g(mu);
        for (std::size_t i = 0; i < k.pointers.size(); ++i) {
            std::uintptr_t p = (std::uintptr_t)*static_cast<std::uint64_t*>(params[i]);
            if (k.pointers[i] && !inside(p, 1)) {
                std::fprintf(stderr, "fake CUDA: %s's argument %zu (%#lx) is not device memory\n", k.name, i, (unsigned long)p);
                return ILLEGAL_ADDRESS;
            }
        }
    }
    emu_count(std::string("kernel ") + k.name);
    if (emu_host_only()) return SUCCESS;
    std::lock_guard<std::mutex> g(launch_mu);
    return run(k, {gx, gy, gz}, {bx, by, bz}, params);
}

int cuGetErrorString(int e, const char** s) {
    switch (e) {
    case SUCCESS: *s = "no error"; break;
    case INVALID_VALUE: *s = "invalid argument"; break;
    case OUT_OF_MEMORY: *s = "out of memory"; break;
    case INVALID_HANDLE: *s = "invalid resource handle"; break;
    case NOT_FOUND: *s = "named symbol not found"; break;
    case ILLEGAL_ADDRESS: *s = "an illegal memory access was encountered"; break;
    default: *s = "unknown error";
    }
    return SUCCESS;
}
int cuGetErrorName(int e, const char** s) { return cuGetErrorString(e, s); }

// ---- cuBLAS: column-major sgemm, as cuBLAS defines it ----

int cublasCreate_v2(void** handle) {
    *handle = new int(0);
    return 0;
}
int cublasDestroy_v2(void* handle) {
    delete static_cast<int*>(handle);
    return 0;
}
int cublasSetStream_v2(void*, void*) { return 0; }
int cublasSetMathMode(void*, int) { return 0; }

}  // extern "C"

namespace {

// C = alpha op(A) op(B) + beta C, C m x n with leading dimension ldc; C is not read when beta is
// 0 (it may hold garbage, as cuBLAS allows).
int sgemm(int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda, const float* b, int ldb, const float* beta,
          float* c, int ldc) {
    const int CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_EXECUTION_FAILED = 13;
    if (m < 0 || n < 0 || k < 0 || ta < 0 || ta > 2 || tb < 0 || tb > 2 || ldc < std::max(1, m) || lda < std::max(1, ta ? k : m) ||
        ldb < std::max(1, tb ? n : k))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0) return 0;
    {
        std::lock_guard<std::mutex> g(mu);
        auto span = [](std::int64_t cols, std::int64_t ld, std::int64_t rows) { return (std::size_t)(((cols - 1) * ld + rows) * 4); };
        bool in_a = k == 0 || inside((std::uintptr_t)a, ta ? span(m, lda, k) : span(k, lda, m));
        bool in_b = k == 0 || inside((std::uintptr_t)b, tb ? span(k, ldb, n) : span(n, ldb, k));
        bool in_c = inside((std::uintptr_t)c, span(n, ldc, m));
        if (!(in_a && in_b && in_c)) {
            std::fprintf(stderr, "fake cuBLAS: sgemm m %d n %d k %d (ops %d %d, ld %d %d %d) reaches outside its buffers (inside: a %d, b %d, c %d)\n",
                         m, n, k, ta, tb, lda, ldb, ldc, in_a, in_b, in_c);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    }
    if (emu_host_only()) return 0;
    auto A = [&](int i, int l) { return ta ? a[(std::size_t)i * lda + l] : a[(std::size_t)l * lda + i]; };
    auto B = [&](int l, int j) { return tb ? b[(std::size_t)l * ldb + j] : b[(std::size_t)j * ldb + l]; };
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float acc = 0.0f;
            for (int l = 0; l < k; ++l) acc = std::fma(A(i, l), B(l, j), acc);
            float& out = c[(std::size_t)j * ldc + i];
            out = *alpha * acc + (*beta == 0.0f ? 0.0f : *beta * out);
        }
    return 0;
}

}  // namespace

extern "C" {

int cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda, const float* b, int ldb,
                   const float* beta, float* c, int ldc) {
    emu_count("cuBLAS products");
    return sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// batch products, product i's operands at i times the strides (elements) from a, b and c; each
// checked against the allocations as one sgemm.
int cublasSgemmStridedBatched(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda, long long stride_a,
                              const float* b, int ldb, long long stride_b, const float* beta, float* c, int ldc, long long stride_c, int batch) {
    const int CUBLAS_STATUS_INVALID_VALUE = 7;
    if (batch < 0 || stride_a < 0 || stride_b < 0 || stride_c < 0) return CUBLAS_STATUS_INVALID_VALUE;
    emu_count("cuBLAS products");
    for (long long i = 0; i < batch; ++i)
        if (int e = sgemm(ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c, ldc)) return e;
    return 0;
}

}  // extern "C"
