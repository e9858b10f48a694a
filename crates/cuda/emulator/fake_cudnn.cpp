// The part of cuDNN 9's legacy API that Stride calls, run on the CPU (see README.md beside this
// file): tensor, filter, convolution and pooling descriptors; convolution forward, data gradient
// and filter gradient by their definitions (NCHW, float, groups, dilation, both modes); batch
// norm in spatial mode, training's forward and backward and evaluation's forward; max and
// average pooling, forward and backward. Built into the same library as
// fake_cuda.cpp (libcudnn.so is a link to it), so device memory is that file's allocations.
//
// Its heuristics list, for every geometry, an algorithm cuDNN declines, one wanting more
// workspace than Stride allows, one wanting workspace and one wanting none; and it declines
// at launch (NOT_SUPPORTED) the filter gradient of a convolution with as many groups as input
// channels, so the caller's fallback for a single pass runs too.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

bool emu_device_memory(const void* p, std::size_t bytes);
void emu_count(const std::string& what);
bool emu_host_only();

namespace {

// cuDNN 9's status codes.
constexpr int SUCCESS = 0, BAD_PARAM = 2000, NOT_SUPPORTED = 3000;
constexpr int FLOAT = 0, NCHW = 0, CONVOLUTION = 0, CROSS_CORRELATION = 1, SPATIAL = 1;
constexpr int DEFAULT_MATH = 0, TENSOR_OP_MATH = 1, FMA_MATH = 3;

struct Tensor {
    int n = 0, c = 0, h = 0, w = 0;
    bool set = false;
    std::size_t count() const { return (std::size_t)n * c * h * w; }
};
struct Filter {
    int k = 0, c = 0, r = 0, s = 0;
    bool set = false;
    std::size_t count() const { return (std::size_t)k * c * r * s; }
};
struct Conv {
    int ph = 0, pw = 0, sh = 1, sw = 1, dh = 1, dw = 1, mode = CROSS_CORRELATION, groups = 1, math = DEFAULT_MATH;
    bool set = false;
};

int bad(const char* what) {
    std::fprintf(stderr, "fake cuDNN: %s\n", what);
    return BAD_PARAM;
}

// The checked geometry of one convolution: x the large side, y the small one.
struct Geom {
    Tensor x, y;
    Filter w;
    Conv cv;
};

int geometry(const Tensor* x, const Filter* w, const Conv* cv, const Tensor* y, Geom& g) {
    if (!x || !w || !cv || !y || !x->set || !w->set || !cv->set || !y->set) return bad("a descriptor that was never set");
    if (x->c != w->c * cv->groups || w->k % cv->groups != 0) return bad("channels do not match the filter and groups");
    auto out = [](int size, int pad, int k, int dil, int stride) {
        int span = (k - 1) * dil + 1;
        return size + 2 * pad < span ? 0 : (size + 2 * pad - span) / stride + 1;
    };
    int p = out(x->h, cv->ph, w->r, cv->dh, cv->sh), q = out(x->w, cv->pw, w->s, cv->dw, cv->sw);
    if (y->n != x->n || y->c != w->k || y->h != p || y->w != q) {
        std::fprintf(stderr, "fake cuDNN: x [%d, %d, %d, %d] and w [%d, %d, %d, %d] give y [%d, %d, %d, %d], described as [%d, %d, %d, %d]\n", x->n,
                     x->c, x->h, x->w, w->k, w->c, w->r, w->s, x->n, w->k, p, q, y->n, y->c, y->h, y->w);
        return BAD_PARAM;
    }
    g = {*x, *y, *w, *cv};
    return SUCCESS;
}

// Calls f(x index, w index, y index) for every product of the convolution.
template <typename F>
void each_product(const Geom& g, F f) {
    const Tensor &x = g.x, &y = g.y;
    const Filter& w = g.w;
    const Conv& cv = g.cv;
    int kg = w.k / cv.groups;
    for (int n = 0; n < y.n; ++n)
        for (int k = 0; k < y.c; ++k)
            for (int p = 0; p < y.h; ++p)
                for (int q = 0; q < y.w; ++q)
                    for (int c = 0; c < w.c; ++c)
                        for (int r = 0; r < w.r; ++r)
                            for (int s = 0; s < w.s; ++s) {
                                int h = p * cv.sh - cv.ph + r * cv.dh, col = q * cv.sw - cv.pw + s * cv.dw;
                                if (h < 0 || h >= x.h || col < 0 || col >= x.w) continue;
                                // Convolution (not cross-correlation) turns the filter round.
                                int fr = cv.mode == CONVOLUTION ? w.r - 1 - r : r, fs = cv.mode == CONVOLUTION ? w.s - 1 - s : s;
                                std::size_t xi = (((std::size_t)n * x.c + (k / kg) * w.c + c) * x.h + h) * x.w + col;
                                std::size_t wi = (((std::size_t)k * w.c + c) * w.r + fr) * w.s + fs;
                                std::size_t yi = (((std::size_t)n * y.c + k) * y.h + p) * y.w + q;
                                f(xi, wi, yi);
                            }
}

// out = alpha * acc + beta * out, out not read when beta is 0.
void blend(float* out, const std::vector<double>& acc, float alpha, float beta) {
    for (std::size_t i = 0; i < acc.size(); ++i) out[i] = alpha * (float)acc[i] + (beta == 0.0f ? 0.0f : beta * out[i]);
}

enum Pass { FORWARD, DATA, FILTER };

// The workspace each listed algorithm wants: algorithm 5 more than Stride allows (2 GiB),
// algorithm 1 some (the three tensors' bytes), the rest none.
std::size_t workspace_of(const Geom& g, int algo) {
    if (algo == 5) return std::size_t{2} << 30;
    if (algo == 1) return (g.x.count() + g.y.count() + g.w.count()) * 4;
    return 0;
}

// cuDNN's perf structs share this layout (algo, status, time, memory, determinism, mathType,
// reserved[3]).
struct Perf {
    int algo, status;
    float time;
    std::size_t memory;
    int determinism, math, reserved[3];
};

int heuristics(const Tensor* x, const Filter* w, const Conv* cv, const Tensor* y, int requested, int* returned, Perf* perf) {
    Geom g;
    if (int e = geometry(x, w, cv, y, g)) return e;
    if (requested < 1 || !returned || !perf) return bad("no room for the algorithms");
    // Declined (status not ok), too much workspace, some workspace, none.
    const int algos[4] = {4, 5, 1, 0};
    int n = 0;
    for (int a : algos) {
        if (n == requested) break;
        Perf p{};
        p.algo = a;
        p.status = a == 4 ? NOT_SUPPORTED : SUCCESS;
        p.memory = workspace_of(g, a);
        p.determinism = 1;
        // FMA when asked for; otherwise the tensor-op version comes first.
        p.math = cv->math == FMA_MATH ? FMA_MATH : (a == 1 ? TENSOR_OP_MATH : DEFAULT_MATH);
        perf[n++] = p;
    }
    *returned = n;
    return SUCCESS;
}

int launch_checks(const Geom& g, Pass pass, int algo, const void* ws, std::size_t ws_bytes) {
    if (algo != 0 && algo != 1) return bad("an algorithm the heuristics did not offer as usable");
    if (ws_bytes < workspace_of(g, algo)) return bad("less workspace than the algorithm asked for");
    if (ws_bytes > 0 && !emu_device_memory(ws, ws_bytes)) return bad("a workspace outside device memory");
    if (pass == FILTER && g.cv.groups > 1 && g.cv.groups == g.x.c) return NOT_SUPPORTED;
    return SUCCESS;
}

bool memory(const void* p, std::size_t floats, const char* what) {
    if (emu_device_memory(p, floats * 4)) return true;
    std::fprintf(stderr, "fake cuDNN: %s (%zu floats at %p) is not device memory of that size\n", what, floats, p);
    return false;
}

}  // namespace

extern "C" {

int cudnnCreate(void** handle) {
    *handle = new int(0);
    return SUCCESS;
}
int cudnnDestroy(void* handle) {
    delete static_cast<int*>(handle);
    return SUCCESS;
}
int cudnnSetStream(void*, void*) { return SUCCESS; }
std::size_t cudnnGetVersion() { return 91300; }

int cudnnCreateTensorDescriptor(Tensor** d) {
    *d = new Tensor();
    return SUCCESS;
}
int cudnnDestroyTensorDescriptor(Tensor* d) {
    delete d;
    return SUCCESS;
}
int cudnnSetTensor4dDescriptor(Tensor* d, int format, int type, int n, int c, int h, int w) {
    if (format != NCHW || type != FLOAT) return NOT_SUPPORTED;
    if (n <= 0 || c <= 0 || h <= 0 || w <= 0) return bad("a tensor with a side <= 0");
    *d = Tensor{n, c, h, w, true};
    return SUCCESS;
}
int cudnnCreateFilterDescriptor(Filter** d) {
    *d = new Filter();
    return SUCCESS;
}
int cudnnDestroyFilterDescriptor(Filter* d) {
    delete d;
    return SUCCESS;
}
int cudnnSetFilter4dDescriptor(Filter* d, int type, int format, int k, int c, int h, int w) {
    if (format != NCHW || type != FLOAT) return NOT_SUPPORTED;
    if (k <= 0 || c <= 0 || h <= 0 || w <= 0) return bad("a filter with a side <= 0");
    *d = Filter{k, c, h, w, true};
    return SUCCESS;
}
int cudnnCreateConvolutionDescriptor(Conv** d) {
    *d = new Conv();
    return SUCCESS;
}
int cudnnDestroyConvolutionDescriptor(Conv* d) {
    delete d;
    return SUCCESS;
}
int cudnnSetConvolution2dDescriptor(Conv* d, int ph, int pw, int u, int v, int dh, int dw, int mode, int type) {
    if (ph < 0 || pw < 0 || u <= 0 || v <= 0 || dh <= 0 || dw <= 0 || (mode != CONVOLUTION && mode != CROSS_CORRELATION))
        return bad("convolution parameters out of range");
    if (type != FLOAT) return NOT_SUPPORTED;
    d->ph = ph, d->pw = pw, d->sh = u, d->sw = v, d->dh = dh, d->dw = dw, d->mode = mode, d->set = true;
    return SUCCESS;
}
int cudnnSetConvolutionGroupCount(Conv* d, int groups) {
    if (groups <= 0) return bad("groups <= 0");
    d->groups = groups;
    return SUCCESS;
}
int cudnnSetConvolutionMathType(Conv* d, int math) {
    if (math < DEFAULT_MATH || math > FMA_MATH) return bad("an unknown math type");
    d->math = math;
    return SUCCESS;
}

int cudnnGetConvolutionForwardAlgorithm_v7(void*, Tensor* x, Filter* w, Conv* cv, Tensor* y, int requested, int* returned, Perf* perf) {
    return heuristics(x, w, cv, y, requested, returned, perf);
}
int cudnnGetConvolutionBackwardDataAlgorithm_v7(void*, Filter* w, Tensor* dy, Conv* cv, Tensor* dx, int requested, int* returned, Perf* perf) {
    return heuristics(dx, w, cv, dy, requested, returned, perf);
}
int cudnnGetConvolutionBackwardFilterAlgorithm_v7(void*, Tensor* x, Tensor* dy, Conv* cv, Filter* dw, int requested, int* returned, Perf* perf) {
    return heuristics(x, dw, cv, dy, requested, returned, perf);
}

int workspace_size(const Tensor* x, const Filter* w, const Conv* cv, const Tensor* y, int algo, std::size_t* bytes) {
    Geom g;
    if (int e = geometry(x, w, cv, y, g)) return e;
    if (algo < 0 || algo > 7) return bad("an unknown algorithm");
    *bytes = workspace_of(g, algo);
    return SUCCESS;
}
int cudnnGetConvolutionForwardWorkspaceSize(void*, Tensor* x, Filter* w, Conv* cv, Tensor* y, int algo, std::size_t* bytes) {
    return workspace_size(x, w, cv, y, algo, bytes);
}
int cudnnGetConvolutionBackwardDataWorkspaceSize(void*, Filter* w, Tensor* dy, Conv* cv, Tensor* dx, int algo, std::size_t* bytes) {
    return workspace_size(dx, w, cv, dy, algo, bytes);
}
int cudnnGetConvolutionBackwardFilterWorkspaceSize(void*, Tensor* x, Tensor* dy, Conv* cv, Filter* dw, int algo, std::size_t* bytes) {
    return workspace_size(x, dw, cv, dy, algo, bytes);
}

int cudnnConvolutionForward(void*, const float* alpha, Tensor* xd, const float* x, Filter* wd, const float* w, Conv* cv, int algo, void* ws,
                            std::size_t ws_bytes, const float* beta, Tensor* yd, float* y) {
    emu_count("cuDNN calls");
    Geom g;
    if (int e = geometry(xd, wd, cv, yd, g)) return e;
    if (int e = launch_checks(g, FORWARD, algo, ws, ws_bytes)) return e;
    if (!memory(x, g.x.count(), "x") || !memory(w, g.w.count(), "w") || !memory(y, g.y.count(), "y")) return BAD_PARAM;
    if (emu_host_only()) return SUCCESS;
    std::vector<double> acc(g.y.count(), 0.0);
    each_product(g, [&](std::size_t xi, std::size_t wi, std::size_t yi) { acc[yi] += (double)x[xi] * w[wi]; });
    blend(y, acc, *alpha, *beta);
    return SUCCESS;
}
int cudnnConvolutionBackwardData(void*, const float* alpha, Filter* wd, const float* w, Tensor* dyd, const float* dy, Conv* cv, int algo,
                                 void* ws, std::size_t ws_bytes, const float* beta, Tensor* dxd, float* dx) {
    emu_count("cuDNN calls");
    Geom g;
    if (int e = geometry(dxd, wd, cv, dyd, g)) return e;
    if (int e = launch_checks(g, DATA, algo, ws, ws_bytes)) return e;
    if (!memory(w, g.w.count(), "w") || !memory(dy, g.y.count(), "dy") || !memory(dx, g.x.count(), "dx")) return BAD_PARAM;
    if (emu_host_only()) return SUCCESS;
    std::vector<double> acc(g.x.count(), 0.0);
    each_product(g, [&](std::size_t xi, std::size_t wi, std::size_t yi) { acc[xi] += (double)dy[yi] * w[wi]; });
    blend(dx, acc, *alpha, *beta);
    return SUCCESS;
}
int cudnnConvolutionBackwardFilter(void*, const float* alpha, Tensor* xd, const float* x, Tensor* dyd, const float* dy, Conv* cv, int algo,
                                   void* ws, std::size_t ws_bytes, const float* beta, Filter* dwd, float* dw) {
    emu_count("cuDNN calls");
    Geom g;
    if (int e = geometry(xd, dwd, cv, dyd, g)) return e;
    if (int e = launch_checks(g, FILTER, algo, ws, ws_bytes)) return e;
    if (!memory(x, g.x.count(), "x") || !memory(dy, g.y.count(), "dy") || !memory(dw, g.w.count(), "dw")) return BAD_PARAM;
    if (emu_host_only()) return SUCCESS;
    std::vector<double> acc(g.w.count(), 0.0);
    each_product(g, [&](std::size_t xi, std::size_t wi, std::size_t yi) { acc[wi] += (double)dy[yi] * x[xi]; });
    blend(dw, acc, *alpha, *beta);
    return SUCCESS;
}

// ---- batch norm, spatial: statistics per channel over N, H and W ----

int norm_checks(int mode, const Tensor* x, const Tensor* y, const Tensor* per_channel, double eps, bool training = true) {
    if (mode != SPATIAL) return NOT_SUPPORTED;
    if (!x || !y || !per_channel || !x->set || !y->set || !per_channel->set) return bad("a descriptor that was never set");
    if (x->n != y->n || x->c != y->c || x->h != y->h || x->w != y->w) return bad("x and y differ in shape");
    if (per_channel->n != 1 || per_channel->c != x->c || per_channel->h != 1 || per_channel->w != 1)
        return bad("the per-channel descriptor is not [1, C, 1, 1]");
    if (!(eps >= 0.0)) return bad("epsilon below CUDNN_BN_MIN_EPSILON (0)");
    if (training && (std::size_t)x->n * x->h * x->w < 2) return bad("one value per channel");
    return SUCCESS;
}

int cudnnBatchNormalizationForwardTraining(void*, int mode, const float* alpha, const float* beta, Tensor* xd, const float* x, Tensor* yd, float* y,
                                           Tensor* cd, const float* scale, const float* bias, double factor, float* running_mean,
                                           float* running_var, double eps, float* save_mean, float* save_invstd) {
    emu_count("cuDNN calls");
    if (int e = norm_checks(mode, xd, yd, cd, eps)) return e;
    int C = xd->c;
    std::size_t L = (std::size_t)xd->h * xd->w, m = xd->n * L;
    if (!memory(x, xd->count(), "x") || !memory(y, xd->count(), "y") || !memory(scale, C, "scale") || !memory(bias, C, "bias"))
        return BAD_PARAM;
    if ((running_mean == nullptr) != (running_var == nullptr) || (save_mean == nullptr) != (save_invstd == nullptr))
        return bad("one of a pair of statistics without the other");
    if (emu_host_only()) return SUCCESS;
    for (int c = 0; c < C; ++c) {
        double sum = 0.0, sq = 0.0;
        for (int n = 0; n < xd->n; ++n)
            for (std::size_t l = 0; l < L; ++l) sum += x[((std::size_t)n * C + c) * L + l];
        double mean = sum / m;
        for (int n = 0; n < xd->n; ++n)
            for (std::size_t l = 0; l < L; ++l) {
                double d = x[((std::size_t)n * C + c) * L + l] - mean;
                sq += d * d;
            }
        double var = sq / m, invstd = 1.0 / std::sqrt(var + eps);
        for (int n = 0; n < xd->n; ++n)
            for (std::size_t l = 0; l < L; ++l) {
                std::size_t i = ((std::size_t)n * C + c) * L + l;
                float v = (float)(scale[c] * (x[i] - mean) * invstd + bias[c]);
                y[i] = *alpha * v + (*beta == 0.0f ? 0.0f : *beta * y[i]);
            }
        if (running_mean) {
            if (!memory(running_mean, C, "running mean") || !memory(running_var, C, "running variance")) return BAD_PARAM;
            // The running variance is the unbiased one.
            running_mean[c] = (float)((1.0 - factor) * running_mean[c] + factor * mean);
            running_var[c] = (float)((1.0 - factor) * running_var[c] + factor * var * m / (m - 1));
        }
        if (save_mean) {
            if (!memory(save_mean, C, "saved mean") || !memory(save_invstd, C, "saved 1/sqrt(var + eps)")) return BAD_PARAM;
            save_mean[c] = (float)mean;
            save_invstd[c] = (float)invstd;
        }
    }
    return SUCCESS;
}

int cudnnBatchNormalizationBackward(void*, int mode, const float* alpha_data, const float* beta_data, const float* alpha_param,
                                    const float* beta_param, Tensor* xd, const float* x, Tensor* dyd, const float* dy, Tensor* dxd, float* dx,
                                    Tensor* cd, const float* scale, float* dscale, float* dbias, double eps, const float* saved_mean,
                                    const float* saved_invstd) {
    emu_count("cuDNN calls");
    if (int e = norm_checks(mode, xd, dyd, cd, eps)) return e;
    if (int e = norm_checks(mode, xd, dxd, cd, eps)) return e;
    int C = xd->c;
    std::size_t L = (std::size_t)xd->h * xd->w, m = xd->n * L;
    if (!memory(x, xd->count(), "x") || !memory(dy, xd->count(), "dy") || !memory(dx, xd->count(), "dx") || !memory(scale, C, "scale") ||
        !memory(dscale, C, "scale's gradient") || !memory(dbias, C, "bias's gradient"))
        return BAD_PARAM;
    if ((saved_mean == nullptr) != (saved_invstd == nullptr)) return bad("a saved mean without 1/sqrt(var + eps), or the other way round");
    if (saved_mean && (!memory(saved_mean, C, "saved mean") || !memory(saved_invstd, C, "saved 1/sqrt(var + eps)"))) return BAD_PARAM;
    auto at = [&](int n, int c, std::size_t l) { return ((std::size_t)n * C + c) * L + l; };
    if (emu_host_only()) return SUCCESS;
    for (int c = 0; c < C; ++c) {
        double mean, invstd;
        if (saved_mean) {
            mean = saved_mean[c];
            invstd = saved_invstd[c];
        } else {
            double sum = 0.0, sq = 0.0;
            for (int n = 0; n < xd->n; ++n)
                for (std::size_t l = 0; l < L; ++l) sum += x[at(n, c, l)];
            mean = sum / m;
            for (int n = 0; n < xd->n; ++n)
                for (std::size_t l = 0; l < L; ++l) sq += (x[at(n, c, l)] - mean) * (x[at(n, c, l)] - mean);
            invstd = 1.0 / std::sqrt(sq / m + eps);
        }
        double db = 0.0, dg = 0.0;
        for (int n = 0; n < xd->n; ++n)
            for (std::size_t l = 0; l < L; ++l) {
                db += dy[at(n, c, l)];
                dg += dy[at(n, c, l)] * (x[at(n, c, l)] - mean) * invstd;
            }
        for (int n = 0; n < xd->n; ++n)
            for (std::size_t l = 0; l < L; ++l) {
                std::size_t i = at(n, c, l);
                double xhat = (x[i] - mean) * invstd;
                float v = (float)(scale[c] * invstd * (dy[i] - db / m - xhat * dg / m));
                dx[i] = *alpha_data * v + (*beta_data == 0.0f ? 0.0f : *beta_data * dx[i]);
            }
        dscale[c] = *alpha_param * (float)dg + (*beta_param == 0.0f ? 0.0f : *beta_param * dscale[c]);
        dbias[c] = *alpha_param * (float)db + (*beta_param == 0.0f ? 0.0f : *beta_param * dbias[c]);
    }
    return SUCCESS;
}

// Evaluation mode: y = scale (x - mean) / sqrt(var + eps) + bias, with the estimated statistics.
int cudnnBatchNormalizationForwardInference(void*, int mode, const float* alpha, const float* beta, Tensor* xd, const float* x, Tensor* yd,
                                            float* y, Tensor* cd, const float* scale, const float* bias, const float* mean, const float* var,
                                            double eps) {
    emu_count("cuDNN calls");
    if (int e = norm_checks(mode, xd, yd, cd, eps, false)) return e;
    int C = xd->c;
    std::size_t L = (std::size_t)xd->h * xd->w;
    if (!memory(x, xd->count(), "x") || !memory(y, xd->count(), "y") || !memory(scale, C, "scale") || !memory(bias, C, "bias") ||
        !memory(mean, C, "estimated mean") || !memory(var, C, "estimated variance"))
        return BAD_PARAM;
    if (emu_host_only()) return SUCCESS;
    for (int n = 0; n < xd->n; ++n)
        for (int c = 0; c < C; ++c) {
            double invstd = 1.0 / std::sqrt((double)var[c] + eps);
            for (std::size_t l = 0; l < L; ++l) {
                std::size_t i = ((std::size_t)n * C + c) * L + l;
                float v = (float)(scale[c] * (x[i] - (double)mean[c]) * invstd + bias[c]);
                y[i] = *alpha * v + (*beta == 0.0f ? 0.0f : *beta * y[i]);
            }
        }
    return SUCCESS;
}

}  // extern "C"

// ---- pooling: windows of wh x ww at a stride, the same padding on both sides of an axis ----

namespace {

constexpr int POOL_MAX = 0, POOL_AVERAGE_INCLUDE = 1, POOL_AVERAGE_EXCLUDE = 2, POOL_MAX_DETERMINISTIC = 3, PROPAGATE_NAN = 1;

struct Pooling {
    int mode = POOL_MAX, nan = 0, wh = 0, ww = 0, ph = 0, pw = 0, sh = 0, sw = 0;
    bool set = false;
};

// Checks x and y against the pooling (y's size is cuDNN's: 1 + (in + 2 pad - window) / stride).
int pool_checks(const Pooling* pd, const Tensor* x, const Tensor* y) {
    if (!pd || !x || !y || !pd->set || !x->set || !y->set) return bad("a descriptor that was never set");
    int p = (x->h + 2 * pd->ph - pd->wh) / pd->sh + 1, q = (x->w + 2 * pd->pw - pd->ww) / pd->sw + 1;
    if (x->h + 2 * pd->ph < pd->wh || x->w + 2 * pd->pw < pd->ww || y->n != x->n || y->c != x->c || y->h != p || y->w != q) {
        std::fprintf(stderr, "fake cuDNN: pooling x [%d, %d, %d, %d] gives y [%d, %d, %d, %d], described as [%d, %d, %d, %d]\n", x->n, x->c, x->h,
                     x->w, x->n, x->c, p, q, y->n, y->c, y->h, y->w);
        return BAD_PARAM;
    }
    return SUCCESS;
}

bool is_max(const Pooling& pd) { return pd.mode == POOL_MAX || pd.mode == POOL_MAX_DETERMINISTIC; }

// Calls f(output index, the window's input indices inside the image, its divisor) per output.
// A max pooling's window lists its maximum first: the first largest in row-major order, or its
// first NaN when NaNs propagate (which of tied maxima the real cuDNN's gradient goes to is not
// documented; the tests' random inputs have no ties).
template <typename F>
void each_window(const Pooling& pd, const Tensor& x, const Tensor& y, const float* xv, F f) {
    std::vector<std::size_t> in;
    for (int n = 0; n < y.n; ++n)
        for (int c = 0; c < y.c; ++c)
            for (int p = 0; p < y.h; ++p)
                for (int q = 0; q < y.w; ++q) {
                    in.clear();
                    int h0 = p * pd.sh - pd.ph, w0 = q * pd.sw - pd.pw;
                    for (int h = h0; h < h0 + pd.wh; ++h)
                        for (int w = w0; w < w0 + pd.ww; ++w)
                            if (h >= 0 && h < x.h && w >= 0 && w < x.w) in.push_back((((std::size_t)n * x.c + c) * x.h + h) * x.w + w);
                    if (is_max(pd)) {
                        std::size_t best = 0;
                        for (std::size_t j = 1; j < in.size(); ++j) {
                            float v = xv[in[j]], b = xv[in[best]];
                            if (v > b || (pd.nan == PROPAGATE_NAN && std::isnan(v) && !std::isnan(b))) best = j;
                        }
                        if (!in.empty()) std::swap(in[0], in[best]);
                    }
                    int div = pd.mode == POOL_AVERAGE_INCLUDE ? pd.wh * pd.ww : (int)in.size();
                    f((((std::size_t)n * y.c + c) * y.h + p) * y.w + q, in, div);
                }
}

}  // namespace

extern "C" {

int cudnnCreatePoolingDescriptor(Pooling** d) {
    *d = new Pooling();
    return SUCCESS;
}
int cudnnDestroyPoolingDescriptor(Pooling* d) {
    delete d;
    return SUCCESS;
}
int cudnnSetPooling2dDescriptor(Pooling* d, int mode, int nan, int wh, int ww, int ph, int pw, int sh, int sw) {
    if (mode < POOL_MAX || mode > POOL_MAX_DETERMINISTIC || (nan != 0 && nan != PROPAGATE_NAN)) return bad("an unknown pooling mode");
    if (wh <= 0 || ww <= 0 || sh <= 0 || sw <= 0 || ph < 0 || pw < 0) return bad("pooling parameters out of range");
    *d = Pooling{mode, nan, wh, ww, ph, pw, sh, sw, true};
    return SUCCESS;
}

int cudnnPoolingForward(void*, Pooling* pd, const float* alpha, Tensor* xd, const float* x, const float* beta, Tensor* yd, float* y) {
    emu_count("cuDNN calls");
    if (int e = pool_checks(pd, xd, yd)) return e;
    if (!memory(x, xd->count(), "x") || !memory(y, yd->count(), "y")) return BAD_PARAM;
    if (emu_host_only()) return SUCCESS;
    std::vector<double> acc(yd->count(), 0.0);
    each_window(*pd, *xd, *yd, x, [&](std::size_t yi, const std::vector<std::size_t>& in, int div) {
        if (is_max(*pd)) {
            acc[yi] = in.empty() ? -INFINITY : x[in[0]];
        } else {
            for (std::size_t i : in) acc[yi] += x[i];
            acc[yi] /= div;
        }
    });
    blend(y, acc, *alpha, *beta);
    return SUCCESS;
}

// dx from dy: a max window's gradient goes to its maximum, an average's is spread over it.
int cudnnPoolingBackward(void*, Pooling* pd, const float* alpha, Tensor* yd, const float* y, Tensor* dyd, const float* dy, Tensor* xd,
                         const float* x, const float* beta, Tensor* dxd, float* dx) {
    emu_count("cuDNN calls");
    if (int e = pool_checks(pd, xd, yd)) return e;
    if (int e = pool_checks(pd, dxd, dyd)) return e;
    if (!memory(y, yd->count(), "y") || !memory(dy, yd->count(), "dy") || !memory(x, xd->count(), "x") || !memory(dx, xd->count(), "dx"))
        return BAD_PARAM;
    if (emu_host_only()) return SUCCESS;
    std::vector<double> acc(xd->count(), 0.0);
    bool y_is_max = true;
    each_window(*pd, *xd, *yd, x, [&](std::size_t yi, const std::vector<std::size_t>& in, int div) {
        if (in.empty()) return;
        if (is_max(*pd)) {
            // The backward pass finds each maximum again: y must be the forward pass's output.
            float m = x[in[0]];
            y_is_max &= m == y[yi] || (std::isnan(m) && std::isnan(y[yi]));
            acc[in[0]] += dy[yi];
        } else {
            for (std::size_t i : in) acc[i] += (double)dy[yi] / div;
        }
    });
    if (!y_is_max) return bad("max pooling's gradient given a y that is not the maximum of x's windows");
    blend(dx, acc, *alpha, *beta);
    return SUCCESS;
}

}  // extern "C"
