// Stride's CUDA kernels, compiled at run time by NVRTC (f32). One thread per output element
// with grid-stride loops unless a comment says otherwise; indices are 64-bit.

typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)
#define GRID_LOOP(i, n) for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

__device__ __forceinline__ float bin(int op, float a, float b) {
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    default: return a / b;
    }
}

extern "C" __global__ void binary_same(int op, const float* a, const float* b, float* y, i64 n) {
    GRID_LOOP(i, n) { y[i] = bin(op, a[i], b[i]); }
}

// meta: rank, out shape[rank], a strides[rank], b strides[rank] (0 on broadcast axes).
extern "C" __global__ void binary_bcast(int op, const float* a, const float* b, float* y, i64 n, const i64* meta) {
    int rank = (int)meta[0];
    const i64* shape = meta + 1;
    const i64* sa = meta + 1 + rank;
    const i64* sb = meta + 1 + 2 * rank;
    GRID_LOOP(i, n) {
        i64 rem = i, oa = 0, ob = 0;
        for (int d = rank - 1; d >= 0; --d) {
            i64 c = rem % shape[d];
            rem /= shape[d];
            oa += c * sa[d];
            ob += c * sb[d];
        }
        y[i] = bin(op, a[oa], b[ob]);
    }
}

// y[i] = x at i's position broadcast (meta as binary_bcast's, x's strides only).
extern "C" __global__ void bcast_copy(const float* x, float* y, i64 n, const i64* meta) {
    int rank = (int)meta[0];
    const i64* shape = meta + 1;
    const i64* sx = meta + 1 + rank;
    GRID_LOOP(i, n) {
        i64 rem = i, o = 0;
        for (int d = rank - 1; d >= 0; --d) {
            o += (rem % shape[d]) * sx[d];
            rem /= shape[d];
        }
        y[i] = x[o];
    }
}

extern "C" __global__ void scale(const float* x, float c, float* y, i64 n) {
    GRID_LOOP(i, n) { y[i] = x[i] * c; }
}

// Sum over the reduced axes. meta: kept rank, kept shape, kept strides (in x), reduced rank,
// reduced shape, reduced strides. One block per output element, threads over the reduced ones.
extern "C" __global__ void reduce_sum(const float* x, float* y, i64 n_out, i64 n_red, const i64* meta) {
    __shared__ float part[256];
    int rk = (int)meta[0];
    const i64* ks = meta + 1;
    const i64* kst = meta + 1 + rk;
    int rr = (int)meta[1 + 2 * rk];
    const i64* rs = meta + 2 + 2 * rk;
    const i64* rst = meta + 2 + 2 * rk + rr;
    for (i64 j = blockIdx.x; j < n_out; j += gridDim.x) {
        i64 rem = j, base = 0;
        for (int d = rk - 1; d >= 0; --d) {
            base += (rem % ks[d]) * kst[d];
            rem /= ks[d];
        }
        float acc = 0.0f;
        for (i64 r = threadIdx.x; r < n_red; r += blockDim.x) {
            i64 rem2 = r, off = 0;
            for (int d = rr - 1; d >= 0; --d) {
                off += (rem2 % rs[d]) * rst[d];
                rem2 /= rs[d];
            }
            acc += x[base + off];
        }
        part[threadIdx.x] = acc;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) y[j] = part[0];
        __syncthreads();
    }
}

// ---- element-wise functions: codes as stride_cuda::unary_code ----

__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ float un(int code, float p0, float p1, float x) {
    const float SA = 1.6732632423543772f, SS = 1.0507009873554805f;
    switch (code) {
    case 0: return fmaxf(x, 0.0f);
    case 1: return fminf(fmaxf(x, 0.0f), 6.0f);
    case 2: return x > 0.0f ? x : p0 * x;
    case 3: return x > 0.0f ? x : p0 * expm1f(x);
    case 4: return SS * (x > 0.0f ? x : SA * expm1f(x));
    case 5: return x * (float)(0.5 * (1.0 + erf((double)x / 1.4142135623730951)));
    case 6: return x * sigm(x);
    case 7: return x * fminf(fmaxf(x + 3.0f, 0.0f), 6.0f) / 6.0f;
    case 8: return tanhf(x);
    case 9: return sigm(x);
    case 10: { float bx = p0 * x; return bx > p1 ? x : log1pf(expf(bx)) / p0; }
    case 11: return expf(x);
    case 12: return logf(x);
    case 13: return sqrtf(x);
    case 14: return -x;
    case 15: return fabsf(x);
    case 16: return x * x;
    case 17: return powf(x, p0);
    case 18: return x + p0;
    case 19: return x * p0;
    case 21: return (float)erf((double)x);
    case 22: return sinf(x);
    case 23: return cosf(x);
    default: return fminf(fmaxf(x, p0), p1);
    }
}

__device__ float un_grad(int code, float p0, float p1, float x, float y) {
    const float SA = 1.6732632423543772f, SS = 1.0507009873554805f;
    switch (code) {
    case 0: return x > 0.0f ? 1.0f : 0.0f;
    case 1: return (x > 0.0f && x < 6.0f) ? 1.0f : 0.0f;
    case 2: return x > 0.0f ? 1.0f : p0;
    case 3: return x > 0.0f ? 1.0f : p0 * expf(x);
    case 4: return SS * (x > 0.0f ? 1.0f : SA * expf(x));
    case 5: {
        double xd = (double)x;
        double cdf = 0.5 * (1.0 + erf(xd / 1.4142135623730951));
        double pdf = exp(-0.5 * xd * xd) / 2.5066282746310002;
        return (float)(cdf + xd * pdf);
    }
    case 6: { float s = sigm(x); return s * (1.0f + x * (1.0f - s)); }
    case 7: return x < -3.0f ? 0.0f : (x > 3.0f ? 1.0f : (2.0f * x + 3.0f) / 6.0f);
    case 8: return 1.0f - y * y;
    case 9: return y * (1.0f - y);
    case 10: { float bx = p0 * x; return bx > p1 ? 1.0f : sigm(bx); }
    case 11: return y;
    case 12: return 1.0f / x;
    case 13: return 0.5f / y;
    case 14: return -1.0f;
    case 15: return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
    case 16: return 2.0f * x;
    case 17: return p0 * powf(x, p0 - 1.0f);
    case 18: return 1.0f;
    case 19: return p0;
    case 21: { double xd = (double)x; return (float)(1.1283791670955126 * exp(-xd * xd)); }
    case 22: return cosf(x);
    case 23: return -sinf(x);
    default: return (x >= p0 && x <= p1) ? 1.0f : 0.0f;
    }
}

extern "C" __global__ void unary_fwd(int code, float p0, float p1, const float* x, float* y, i64 n) {
    GRID_LOOP(i, n) { y[i] = un(code, p0, p1, x[i]); }
}

extern "C" __global__ void unary_bwd(int code, float p0, float p1, const float* g, const float* x, const float* y, float* dx, i64 n) {
    GRID_LOOP(i, n) { dx[i] = g[i] * un_grad(code, p0, p1, x[i], y[i]); }
}

// ---- convolution by lowering: columns [C*R*S, N*P*Q] ----

// ConvGeom's numbers (stride_cuda's ConvArgs, field for field).
struct Conv {
    int N, C, H, W, P, Q, R, S, sh, sw, dh, dw, pt, pl;
};

extern "C" __global__ void im2col(const float* x, float* cols, Conv g) {
    i64 npq = (i64)g.N * g.P * g.Q;
    i64 total = (i64)g.C * g.R * g.S * npq;
    GRID_LOOP(i, total) {
        i64 col = i % npq, row = i / npq;
        int s = (int)(row % g.S), r = (int)((row / g.S) % g.R), c = (int)(row / ((i64)g.R * g.S));
        int q = (int)(col % g.Q), p = (int)((col / g.Q) % g.P), n = (int)(col / ((i64)g.P * g.Q));
        int h = p * g.sh - g.pt + r * g.dh, w = q * g.sw - g.pl + s * g.dw;
        cols[i] = (h >= 0 && h < g.H && w >= 0 && w < g.W) ? x[(((i64)n * g.C + c) * g.H + h) * g.W + w] : 0.0f;
    }
}

// Gathers columns back into an image (the adjoint of im2col): one thread per image element.
extern "C" __global__ void col2im(const float* cols, float* x, Conv g) {
    i64 npq = (i64)g.N * g.P * g.Q;
    i64 total = (i64)g.N * g.C * g.H * g.W;
    GRID_LOOP(i, total) {
        int w = (int)(i % g.W), h = (int)((i / g.W) % g.H), c = (int)((i / ((i64)g.H * g.W)) % g.C), n = (int)(i / ((i64)g.C * g.H * g.W));
        float acc = 0.0f;
        for (int r = 0; r < g.R; ++r) {
            int ph = h + g.pt - r * g.dh;
            if (ph < 0 || ph % g.sh != 0) continue;
            int p = ph / g.sh;
            if (p >= g.P) continue;
            for (int s = 0; s < g.S; ++s) {
                int pw = w + g.pl - s * g.dw;
                if (pw < 0 || pw % g.sw != 0) continue;
                int q = pw / g.sw;
                if (q >= g.Q) continue;
                acc += cols[(((i64)c * g.R + r) * g.S + s) * npq + ((i64)n * g.P + p) * g.Q + q];
            }
        }
        x[i] = acc;
    }
}

// [K, N*L] -> [N, K, L], adding bias[k] when has_bias.
extern "C" __global__ void knl_to_nkl(const float* t, const float* bias, int has_bias, float* y, int N, int K, i64 L) {
    i64 total = (i64)N * K * L;
    GRID_LOOP(i, total) {
        i64 l = i % L;
        int k = (int)((i / L) % K), n = (int)(i / (L * K));
        y[i] = t[(i64)k * N * L + (i64)n * L + l] + (has_bias ? bias[k] : 0.0f);
    }
}

// [N, K, L] -> [K, N*L].
extern "C" __global__ void nkl_to_knl(const float* y, float* t, int N, int K, i64 L) {
    i64 total = (i64)N * K * L;
    GRID_LOOP(i, total) {
        i64 l = i % L;
        int k = (int)((i / L) % K), n = (int)(i / (L * K));
        t[(i64)k * N * L + (i64)n * L + l] = y[i];
    }
}

// y[n, c, l] += bias[c], in place.
extern "C" __global__ void add_channel_bias(float* y, const float* bias, int C, i64 L, i64 total) {
    GRID_LOOP(i, total) { y[i] += bias[(i / L) % C]; }
}

// ---- pooling (PoolGeom's windows: clipped to the image, size counted up to the padded end) ----

// PoolGeom's numbers (stride_cuda's PoolArgs, field for field).
struct Pool {
    int NC, H, W, P, Q, kh, kw, sh, sw, pt, pb, pl, pr, include_pad;
};

// Output i's window: its plane, the rows [r0, r1) and columns [c0, c1) inside the image, and
// the divisor of average pooling.
struct Window {
    i64 plane;
    int r0, r1, c0, c1, div;
};

__device__ Window window(const Pool& g, i64 i) {
    int j = (int)(i % g.Q), ii = (int)((i / g.Q) % g.P);
    int hs = ii * g.sh - g.pt, ws = j * g.sw - g.pl;
    int he = min(hs + g.kh, g.H + g.pb), we = min(ws + g.kw, g.W + g.pr);
    Window w;
    w.plane = i / ((i64)g.P * g.Q);
    w.r0 = max(hs, 0);
    w.r1 = min(he, g.H);
    w.c0 = max(ws, 0);
    w.c1 = min(we, g.W);
    w.div = g.include_pad ? (he - hs) * (we - ws) : (w.r1 - w.r0) * (w.c1 - w.c0);
    return w;
}

extern "C" __global__ void max_pool_fwd(const float* x, float* y, int* arg, Pool g) {
    GRID_LOOP(i, (i64)g.NC * g.P * g.Q) {
        Window w = window(g, i);
        const float* xp = x + w.plane * g.H * g.W;
        float best = NEG_INF;
        int bi = w.r0 * g.W + w.c0;
        for (int r = w.r0; r < w.r1; ++r)
            for (int c = w.c0; c < w.c1; ++c) {
                float v = xp[r * g.W + c];
                if (v > best || (isnan(v) && !isnan(best))) { best = v; bi = r * g.W + c; }
            }
        y[i] = best;
        arg[i] = bi;
    }
}

// dx (zeroed) += g at each window's argmax.
extern "C" __global__ void scatter_planes(const float* g, const int* arg, float* dx, i64 out_plane, i64 in_plane, i64 total) {
    GRID_LOOP(i, total) {
        i64 plane = i / out_plane;
        atomicAdd(dx + plane * in_plane + arg[i], g[i]);
    }
}

extern "C" __global__ void avg_pool_fwd(const float* x, float* y, Pool g) {
    GRID_LOOP(i, (i64)g.NC * g.P * g.Q) {
        Window w = window(g, i);
        const float* xp = x + w.plane * g.H * g.W;
        float acc = 0.0f;
        for (int r = w.r0; r < w.r1; ++r)
            for (int c = w.c0; c < w.c1; ++c) acc += xp[r * g.W + c];
        y[i] = acc / (float)w.div;
    }
}

// dx (zeroed) += g / divisor over each window.
extern "C" __global__ void avg_pool_bwd(const float* gy, float* dx, Pool g) {
    GRID_LOOP(i, (i64)g.NC * g.P * g.Q) {
        Window w = window(g, i);
        float v = gy[i] / (float)w.div;
        float* dp = dx + w.plane * g.H * g.W;
        for (int r = w.r0; r < w.r1; ++r)
            for (int c = w.c0; c < w.c1; ++c) atomicAdd(dp + r * g.W + c, v);
    }
}

// ---- adaptive pooling: output i of P covers input rows [i*H/P, ceil((i+1)*H/P)) ----

__device__ __forceinline__ int bin_start(int i, int in, int out) { return (int)((i64)i * in / out); }
__device__ __forceinline__ int bin_end(int i, int in, int out) { return (int)(((i64)(i + 1) * in + out - 1) / out); }

// mode 0: average; mode 1: maximum, its flat index in the plane into arg.
extern "C" __global__ void adaptive_pool_fwd(const float* x, float* y, int* arg, int mode, int NC, int H, int W, int P, int Q) {
    GRID_LOOP(i, (i64)NC * P * Q) {
        int j = (int)(i % Q), ii = (int)((i / Q) % P);
        const float* xp = x + (i / ((i64)P * Q)) * H * W;
        int r0 = bin_start(ii, H, P), r1 = bin_end(ii, H, P), c0 = bin_start(j, W, Q), c1 = bin_end(j, W, Q);
        if (mode == 0) {
            float acc = 0.0f;
            for (int r = r0; r < r1; ++r)
                for (int c = c0; c < c1; ++c) acc += xp[r * W + c];
            y[i] = acc / (float)((r1 - r0) * (c1 - c0));
        } else {
            float best = NEG_INF;
            int bi = r0 * W + c0;
            for (int r = r0; r < r1; ++r)
                for (int c = c0; c < c1; ++c) {
                    float v = xp[r * W + c];
                    if (v > best || (isnan(v) && !isnan(best))) { best = v; bi = r * W + c; }
                }
            y[i] = best;
            arg[i] = bi;
        }
    }
}

// Average pooling's gradient, gathered: one thread per input element sums g / size over the
// (overlapping) bins that hold it.
extern "C" __global__ void adaptive_avg_bwd(const float* gy, float* dx, int NC, int H, int W, int P, int Q) {
    GRID_LOOP(i, (i64)NC * H * W) {
        int c = (int)(i % W), r = (int)((i / W) % H);
        const float* gp = gy + (i / ((i64)H * W)) * P * Q;
        float acc = 0.0f;
        for (int a = 0; a < P; ++a) {
            int r0 = bin_start(a, H, P), r1 = bin_end(a, H, P);
            if (r < r0 || r >= r1) continue;
            for (int b = 0; b < Q; ++b) {
                int c0 = bin_start(b, W, Q), c1 = bin_end(b, W, Q);
                if (c >= c0 && c < c1) acc += gp[a * Q + b] / (float)((r1 - r0) * (c1 - c0));
            }
        }
        dx[i] = acc;
    }
}

// Lp pooling: (sum over the window of |x|^p)^(1/p), padding adding 0, as the CPU.
extern "C" __global__ void lp_pool_fwd(const float* x, float* y, Pool g, float p) {
    GRID_LOOP(i, (i64)g.NC * g.P * g.Q) {
        Window w = window(g, i);
        const float* xp = x + w.plane * g.H * g.W;
        float acc = 0.0f;
        for (int r = w.r0; r < w.r1; ++r)
            for (int c = w.c0; c < w.c1; ++c) acc += powf(fabsf(xp[r * g.W + c]), p);
        y[i] = powf(acc, 1.0f / p);
    }
}

// dx (zeroed) += gy sign(x) |x|^(p-1) / y^(p-1) over each window whose norm is not zero (the
// sign of a zero is its sign bit's, as Rust's signum).
extern "C" __global__ void lp_pool_bwd(const float* x, const float* y, const float* gy, float* dx, Pool g, float p) {
    GRID_LOOP(i, (i64)g.NC * g.P * g.Q) {
        if (y[i] == 0.0f) continue;
        Window w = window(g, i);
        float scale = gy[i] / powf(y[i], p - 1.0f);
        const float* xp = x + w.plane * g.H * g.W;
        float* dp = dx + w.plane * g.H * g.W;
        for (int r = w.r0; r < w.r1; ++r)
            for (int c = w.c0; c < w.c1; ++c) {
                float v = xp[r * g.W + c];
                atomicAdd(dp + r * g.W + c, scale * copysignf(1.0f, v) * powf(fabsf(v), p - 1.0f));
            }
    }
}

// Channel max pooling of [N, C, HW] into [N, CO, HW]: output channel j is the largest of input
// channels j*stride .. j*stride + depth (a NaN wins), with the winning channel.
extern "C" __global__ void channel_max_fwd(const float* x, float* y, int* arg, int C, int CO, i64 HW, int depth, int stride, i64 total) {
    GRID_LOOP(i, total) {
        i64 pix = i % HW, bj = i / HW;
        i64 b = bj / CO;
        int c0 = (int)(bj % CO) * stride;
        float best = x[(b * C + c0) * HW + pix];
        int bi = c0;
        for (int ch = c0 + 1; ch < c0 + depth; ++ch) {
            float v = x[(b * C + ch) * HW + pix];
            if (v > best || (isnan(v) && !isnan(best))) { best = v; bi = ch; }
        }
        y[i] = best;
        arg[i] = bi;
    }
}

// dx (zeroed) += g at each output's winning channel (windows overlap when stride < depth).
extern "C" __global__ void channel_max_bwd(const float* g, const int* arg, float* dx, int C, int CO, i64 HW, i64 total) {
    GRID_LOOP(i, total) {
        i64 pix = i % HW, b = i / HW / CO;
        atomicAdd(dx + (b * C + arg[i]) * HW + pix, g[i]);
    }
}

// The largest value along the middle axis of [outer, dim, inner] (a NaN wins; the first of
// equals) and its index, one thread per (outer, inner).
extern "C" __global__ void max_axis_fwd(const float* x, float* y, int* arg, i64 outer, i64 dim, i64 inner) {
    GRID_LOOP(t, outer * inner) {
        i64 base = (t / inner) * dim * inner + t % inner;
        float best = x[base];
        int bi = 0;
        for (i64 k = 1; k < dim; ++k) {
            float v = x[base + k * inner];
            if (v > best || (isnan(v) && !isnan(best))) { best = v; bi = (int)k; }
        }
        y[t] = best;
        arg[t] = bi;
    }
}

// dx (zeroed) takes g at each maximum's place.
extern "C" __global__ void max_axis_bwd(const float* g, const int* arg, float* dx, i64 dim, i64 inner, i64 total) {
    GRID_LOOP(t, total) { dx[((t / inner) * dim + arg[t]) * inner + t % inner] = g[t]; }
}

// ---- batch norm over axis 1 of [N, C, L] ----

// Sums each thread's (a, b) over the block into s1[0], s2[0] (blockDim.x a power of two <= 256).
__device__ void block_sum2(double* s1, double* s2, double a, double b) {
    s1[threadIdx.x] = a;
    s2[threadIdx.x] = b;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) { s1[threadIdx.x] += s1[threadIdx.x + s]; s2[threadIdx.x] += s2[threadIdx.x + s]; }
        __syncthreads();
    }
}

// The running statistics' new values from a batch's mean and biased variance over m values
// (the variance moved by its unbiased form, as PyTorch does).
__device__ __forceinline__ void bn_move(int c, float mean, float var, float momentum, float m, const float* rm, const float* rv, float* rm_out,
                                        float* rv_out) {
    float unbiased = var * m / (m - 1.0f);
    rm_out[c] = (1.0f - momentum) * rm[c] + momentum * mean;
    rv_out[c] = (1.0f - momentum) * rv[c] + momentum * unbiased;
}

// Training's statistics, per channel (one block each): the mean and biased variance in double,
// then the mean, 1/sqrt(var + eps) and the running statistics' new values.
extern "C" __global__ void bn_stats(const float* x, float* mean, float* invstd, int N, int C, i64 L, float eps, float momentum,
                                    const float* rm, const float* rv, float* rm_out, float* rv_out) {
    __shared__ double s1[256], s2[256];
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        double a = 0.0, b = 0.0;
        i64 m = (i64)N * L;
        for (i64 t = threadIdx.x; t < m; t += blockDim.x) {
            i64 n = t / L, l = t % L;
            double v = (double)x[((i64)n * C + c) * L + l];
            a += v;
            b += v * v;
        }
        block_sum2(s1, s2, a, b);
        if (threadIdx.x == 0) {
            double mu = s1[0] / (double)m;
            double v = s2[0] / (double)m - mu * mu;
            float var = (float)(v > 0.0 ? v : 0.0);
            mean[c] = (float)mu;
            invstd[c] = 1.0f / sqrtf(var + eps);
            bn_move(c, (float)mu, var, momentum, (float)m, rm, rv, rm_out, rv_out);
        }
        __syncthreads();
    }
}

// The running statistics' new values after cuDNN's training forward pass, from the mean and
// 1/sqrt(var + eps) it saved (the variance recovered in double).
extern "C" __global__ void bn_running(const float* mean, const float* invstd, float eps, int C, float momentum, float m, const float* rm,
                                      const float* rv, float* rm_out, float* rv_out) {
    GRID_LOOP(c, C) {
        double s = (double)invstd[c];
        double v = 1.0 / (s * s) - (double)eps;
        bn_move(c, mean[c], (float)(v > 0.0 ? v : 0.0), momentum, m, rm, rv, rm_out, rv_out);
    }
}

// invstd = 1/sqrt(var + eps), from the running variance (evaluation mode's backward pass).
extern "C" __global__ void bn_invstd(const float* var, float* invstd, float eps, int C) {
    GRID_LOOP(c, C) { invstd[c] = 1.0f / sqrtf(var[c] + eps); }
}

extern "C" __global__ void bn_normalize(const float* x, const float* mean, const float* invstd, const float* gamma, const float* beta,
                                        float* y, int C, i64 L, i64 total) {
    GRID_LOOP(i, total) {
        int c = (int)((i / L) % C);
        y[i] = (x[i] - mean[c]) * invstd[c] * gamma[c] + beta[c];
    }
}

// Evaluation mode in one pass: y = (x - running mean) / sqrt(running var + eps) * gamma + beta.
extern "C" __global__ void bn_eval(const float* x, const float* rm, const float* rv, const float* gamma, const float* beta, float* y,
                                   float eps, int C, i64 L, i64 total) {
    GRID_LOOP(i, total) {
        int c = (int)((i / L) % C);
        y[i] = (x[i] - rm[c]) * (1.0f / sqrtf(rv[c] + eps)) * gamma[c] + beta[c];
    }
}

// Per channel: sum(dy * xhat) and sum(dy).
extern "C" __global__ void bn_sums(const float* dy, const float* x, const float* mean, const float* invstd, float* dgamma, float* dbeta,
                                   int N, int C, i64 L) {
    __shared__ double s1[256], s2[256];
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        double a = 0.0, b = 0.0;
        i64 m = (i64)N * L;
        for (i64 t = threadIdx.x; t < m; t += blockDim.x) {
            i64 idx = ((t / L) * C + c) * L + t % L;
            double d = (double)dy[idx];
            a += d;
            b += d * ((double)x[idx] - (double)mean[c]) * (double)invstd[c];
        }
        block_sum2(s1, s2, a, b);
        if (threadIdx.x == 0) { dbeta[c] = (float)s1[0]; dgamma[c] = (float)s2[0]; }
        __syncthreads();
    }
}

// dx = g*(dy - dbeta/m - xhat*dgamma/m) with batch statistics, g*dy with running ones.
extern "C" __global__ void bn_dx(const float* dy, const float* x, const float* mean, const float* invstd, const float* gamma,
                                 const float* dgamma, const float* dbeta, int batch, float m, float* dx, int C, i64 L, i64 total) {
    GRID_LOOP(i, total) {
        int c = (int)((i / L) % C);
        float g = gamma[c] * invstd[c];
        if (batch) {
            float xhat = (x[i] - mean[c]) * invstd[c];
            dx[i] = g * (dy[i] - dbeta[c] / m - xhat * dgamma[c] / m);
        } else {
            dx[i] = g * dy[i];
        }
    }
}

// ---- softmax along an axis of [outer, dim, inner]: one thread per (outer, inner) row ----

extern "C" __global__ void softmax_fwd(const float* x, float* y, i64 outer, i64 dim, i64 inner, int log_mode) {
    GRID_LOOP(t, outer * inner) {
        i64 base = (t / inner) * dim * inner + t % inner;
        float mx = NEG_INF;
        for (i64 k = 0; k < dim; ++k) mx = fmaxf(mx, x[base + k * inner]);
        double sum = 0.0;
        for (i64 k = 0; k < dim; ++k) sum += exp((double)(x[base + k * inner] - mx));
        if (log_mode) {
            float ls = (float)log(sum);
            for (i64 k = 0; k < dim; ++k) y[base + k * inner] = x[base + k * inner] - mx - ls;
        } else {
            for (i64 k = 0; k < dim; ++k) y[base + k * inner] = (float)(exp((double)(x[base + k * inner] - mx)) / sum);
        }
    }
}

extern "C" __global__ void softmax_bwd(const float* y, const float* g, float* dx, i64 outer, i64 dim, i64 inner, int log_mode) {
    GRID_LOOP(t, outer * inner) {
        i64 base = (t / inner) * dim * inner + t % inner;
        float s = 0.0f;
        for (i64 k = 0; k < dim; ++k) s += log_mode ? g[base + k * inner] : g[base + k * inner] * y[base + k * inner];
        for (i64 k = 0; k < dim; ++k) {
            i64 i = base + k * inner;
            dx[i] = log_mode ? g[i] - expf(y[i]) * s : y[i] * (g[i] - s);
        }
    }
}

// ---- negative log-likelihood of [N, C] log-probabilities, batch mean ----

extern "C" __global__ void nll_fwd(const float* logp, const int* targets, float* loss, int N, int C) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double total = 0.0;
        for (int i = 0; i < N; ++i) total += (double)logp[(i64)i * C + targets[i]];
        loss[0] = (float)(-total / (double)N);
    }
}

extern "C" __global__ void nll_bwd(const float* g, const int* targets, float* dx, int N, int C) {
    GRID_LOOP(i, (i64)N * C) {
        int row = (int)(i / C), c = (int)(i % C);
        dx[i] = c == targets[row] ? -g[0] / (float)N : 0.0f;
    }
}

// ---- optimizers' updates (stride_autograd::Update), one element per thread ----

// Up to UPDATE_LIST tensors updated by one rule in one launch, passed by value (as PyTorch's
// multi-tensor apply passes its lists): tensor t has n[t] elements and the blocks from
// first_block[t] up to first_block[t + 1]; s0 and s1 are the rule's state (SGD's momentum
// buffer; Adam's m and v; RMSprop's square average and momentum buffer), unused ones null.
// stride_cuda's update.rs lays out the same struct.
#define UPDATE_LIST 32
struct UpdateList {
    int count;
    int first_block[UPDATE_LIST + 1];
    i64 n[UPDATE_LIST];
    const float* w[UPDATE_LIST];
    const float* g[UPDATE_LIST];
    const float* s0[UPDATE_LIST];
    const float* s1[UPDATE_LIST];
    float* w_out[UPDATE_LIST];
    float* s0_out[UPDATE_LIST];
    float* s1_out[UPDATE_LIST];
};

// The tensor this block works on.
__device__ __forceinline__ int list_tensor(const UpdateList& l) {
    int t = 0;
    while (t + 1 < l.count && (int)blockIdx.x >= l.first_block[t + 1]) ++t;
    return t;
}

// Element i of tensor t, over the tensor's blocks.
#define LIST_LOOP(l, t, i)                                                                           \
    const int t = list_tensor(l);                                                                    \
    for (i64 i = (i64)(blockIdx.x - l.first_block[t]) * blockDim.x + threadIdx.x; i < l.n[t];       \
         i += (i64)(l.first_block[t + 1] - l.first_block[t]) * blockDim.x)

// SGD in f32, as the CPU: d = g + wd w; b = first ? d : mu b + d; d = nesterov ? d + mu b : b.
extern "C" __global__ void sgd_update(UpdateList l, float lr, float mu, float wd, int nesterov, int first, int has_buf) {
    LIST_LOOP(l, t, i) {
        const float* w = l.w[t];
        float d = l.g[t][i] + wd * w[i];
        if (has_buf) {
            float bi = first ? d : mu * l.s0[t][i] + d;
            l.s0_out[t][i] = bi;
            d = nesterov ? d + mu * bi : bi;
        }
        l.w_out[t][i] = w[i] - lr * d;
    }
}

// Adam / AdamW in f32 per element, as the CPU (PyTorch's single-tensor formula).
extern "C" __global__ void adam_update(UpdateList l, double lr, double b1, double b2, double c1, double c2, double eps, double wd, int decoupled) {
    const float one_b1 = (float)(1.0 - b1), b2f = (float)b2, one_b2 = (float)(1.0 - b2);
    const float step = (float)(lr / c1), sqrt_c2 = (float)sqrt(c2), epsf = (float)eps;
    const float shrink = (float)(1.0 - lr * wd), wdf = (float)wd;
    LIST_LOOP(l, t, i) {
        float gi = l.g[t][i], wi = l.w[t][i], m = l.s0[t][i];
        if (decoupled) {
            wi = wi * shrink;
        } else {
            gi = gi + wdf * wi;
        }
        float mi = m + one_b1 * (gi - m);
        float vi = b2f * l.s1[t][i] + one_b2 * gi * gi;
        l.w_out[t][i] = wi - step * (mi / (sqrtf(vi) / sqrt_c2 + epsf));
        l.s0_out[t][i] = mi;
        l.s1_out[t][i] = vi;
    }
}

// RMSprop (not centered) in f32 per element, as the CPU (PyTorch's single-tensor formula); the
// momentum buffer (s1) is read and written only when has_b.
extern "C" __global__ void rmsprop_update(UpdateList l, double lr, double alpha, double eps, double momentum, double wd, int has_b) {
    const float lrf = (float)lr, alphaf = (float)alpha, one_alpha = (float)(1.0 - alpha), epsf = (float)eps;
    const float mu = (float)momentum, wdf = (float)wd;
    LIST_LOOP(l, t, i) {
        float wi = l.w[t][i];
        float gi = l.g[t][i] + wdf * wi;
        float vi = alphaf * l.s0[t][i] + one_alpha * gi * gi;
        float step = gi / (sqrtf(vi) + epsf);
        if (has_b) {
            step = mu * l.s1[t][i] + step;
            l.s1_out[t][i] = step;
        }
        l.w_out[t][i] = wi - lrf * step;
        l.s0_out[t][i] = vi;
    }
}

// ---- data movement: strided gather and scatter (permute, narrow, pad, concat), upsampling ----

// meta: rank, shape[rank] (of the side indexed by i), strides[rank] (of the other side), offset.
__device__ __forceinline__ i64 strided(i64 i, const i64* meta) {
    int rank = (int)meta[0];
    const i64* shape = meta + 1;
    const i64* st = meta + 1 + rank;
    i64 rem = i, o = meta[1 + 2 * rank];
    for (int d = rank - 1; d >= 0; --d) {
        o += (rem % shape[d]) * st[d];
        rem /= shape[d];
    }
    return o;
}

// y[i] = x[at(i)] over y's n elements.
extern "C" __global__ void gather_strided(const float* x, float* y, i64 n, const i64* meta) {
    GRID_LOOP(i, n) { y[i] = x[strided(i, meta)]; }
}

// y[at(i)] = x[i] over x's n elements (distinct targets).
extern "C" __global__ void scatter_strided(const float* x, float* y, i64 n, const i64* meta) {
    GRID_LOOP(i, n) { y[strided(i, meta)] = x[i]; }
}

extern "C" __global__ void fill(float* y, float v, i64 n) {
    GRID_LOOP(i, n) { y[i] = v; }
}

// Nearest upsampling of planes [h, w] by (sh, sw), and its gradient (each input sums its block).
extern "C" __global__ void upsample_fwd(const float* x, float* y, i64 planes, int h, int w, int sh, int sw) {
    i64 oh = (i64)h * sh, ow = (i64)w * sw;
    GRID_LOOP(i, planes * oh * ow) {
        i64 plane = i / (oh * ow), r = (i / ow) % oh, c = i % ow;
        y[i] = x[(plane * h + r / sh) * w + c / sw];
    }
}

extern "C" __global__ void upsample_bwd(const float* g, float* dx, i64 planes, int h, int w, int sh, int sw) {
    i64 ow = (i64)w * sw;
    GRID_LOOP(i, planes * h * w) {
        i64 plane = i / ((i64)h * w), r = (i / w) % h, c = i % w;
        float acc = 0.0f;
        for (int a = 0; a < sh; ++a)
            for (int b = 0; b < sw; ++b) acc += g[(plane * h * sh + r * sh + a) * ow + c * sw + b];
        dx[i] = acc;
    }
}
