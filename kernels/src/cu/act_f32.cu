// Row-wise ops of the engine's CUDA backend, on fp32 activations: the
// residual stream, norms and attention stay in fp32 as on the CPU backend,
// and only the inputs of the linears are rounded to fp16 (W4A16 / cuBLAS
// fp16 GEMM with fp32 accumulation). That keeps the GPU's tokens close to
// the CPU's.

// The kernels that feed a linear (the conversion, the norms, SiLU·mul,
// and the attention kernels, which write o_proj's fp16 input when asked:
// LMQ_ATTN_HALF=1 in the engine) call
// grid_dep_launch first: a W4A16 linear launched next with programmatic
// dependent launch then starts at once and streams its weights while they
// run, waiting only before it reads their output.

// y[i] = fp16(x[i]) over n elements.
extern "C" __global__ void f32_to_f16(const float* __restrict__ x, __half* __restrict__ y, u64 n) {
    grid_dep_launch();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        y[i] = __float2half_rn(x[i]);
    }
}

// a[i] += b[i] over n elements.
extern "C" __global__ void add_f32(float* __restrict__ a, const float* __restrict__ b, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        a[i] += b[i];
    }
}

// out[r][c] += bias[c] for a rows × cols matrix.
extern "C" __global__ void add_bias_f32(float* __restrict__ out, const float* __restrict__ bias,
                                        u64 n, int cols) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        out[i] += bias[i % (u64)cols];
    }
}

// Producers of a linear's input (the norms, SiLU·mul) may also write the
// fp16 copy the linear reads (`out_h`, when `has_half`): the same
// __float2half_rn of the same fp32 value that f32_to_f16 would store, one
// launch fewer per linear.

// out[i] = silu(gate[i]) · up[i] (and out_h[i] = fp16 of it).
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, __half* __restrict__ out_h, u64 n,
                                        int has_half) {
    grid_dep_launch();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const float g = gate[i];
        const float y = g / (1.0f + expf(-g)) * up[i];
        out[i] = y;
        if (has_half) out_h[i] = __float2half_rn(y);
    }
}

// out = silu(gate) · up where each row of `gate_up` holds gate in its first
// n columns and up in the last n (a fused gate/up projection's output), or,
// with `tiles`, gate and up alternating by tiles of 8 columns (gate
// 8b .. 8b + 7 at 16b, up at 16b + 8: PackedW4::interleave_halves);
// out_h as in silu_mul_f32.
extern "C" __global__ void silu_mul_halves_f32(const float* __restrict__ gate_up,
                                               float* __restrict__ out, __half* __restrict__ out_h,
                                               u64 rows, u64 n, int has_half, int tiles) {
    grid_dep_launch();
    const u64 total = rows * n;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / n, c = i % n;
        const u64 gc = tiles ? 16 * (c >> 3) + (c & 7) : c;
        const u64 uc = tiles ? gc + 8 : n + c;
        const float g = gate_up[r * 2 * n + gc];
        const float y = g / (1.0f + expf(-g)) * gate_up[r * 2 * n + uc];
        out[i] = y;
        if (has_half) out_h[i] = __float2half_rn(y);
    }
}

// Splits the columns of `src` (rows × (w0 + w1 + w2)) into three matrices
// (a fused q/k/v projection's output into q, k and v); w2 may be 0.
extern "C" __global__ void split_cols3_f32(const float* __restrict__ src, float* __restrict__ d0,
                                           float* __restrict__ d1, float* __restrict__ d2, u64 rows,
                                           u64 w0, u64 w1, u64 w2) {
    const u64 cols = w0 + w1 + w2, total = rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / cols, c = i % cols;
        const float v = src[i];
        if (c < w0) {
            d0[r * w0 + c] = v;
        } else if (c < w0 + w1) {
            d1[r * w1 + (c - w0)] = v;
        } else {
            d2[r * w2 + (c - w0 - w1)] = v;
        }
    }
}

// out = (x − shift) ⊘ v or x ⊙ v with v (and shift) broadcast over rows
// (`cols` values each): the `smooth` KV mode subtracts its per-channel key
// offsets (when `has_shift`) and divides keys by their per-channel factors,
// and multiplies queries by the factors. Division, not a reciprocal, and
// the subtraction first, so that keys are exactly the CPU's.
extern "C" __global__ void scale_cols_f32(const float* __restrict__ x, const float* __restrict__ v,
                                          const float* __restrict__ shift, float* __restrict__ out,
                                          u64 rows, u64 cols, int divide, int has_shift) {
    const u64 total = rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const float f = v[i % cols];
        const float s = has_shift ? shift[i % cols] : 0.f;
        out[i] = divide ? (x[i] - s) / f : x[i] * f;
    }
}

// The normalized Walsh-Hadamard transform of each n-value segment of x
// (n a power of two, at most 256): one block of 32 threads per segment. The
// butterflies run stage by stage in the CPU's order (h = 1, 2, 4, …; pair
// (j, j + h) becomes (a + b, a − b)) and then scale by `norm`, so the
// result is the CPU's `quant::kv::hadamard`, bit for bit.
extern "C" __global__ void hadamard_f32(const float* __restrict__ x, float* __restrict__ out, int n,
                                        float norm) {
    __shared__ float seg[256];
    const size_t base = (size_t)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += 32) seg[i] = x[base + i];
    __syncwarp();
    for (int h = 1; h < n; h *= 2) {
        for (int p = threadIdx.x; p < n / 2; p += 32) {
            const int j = (p / h) * 2 * h + p % h;
            const float a = seg[j], b = seg[j + h];
            seg[j] = a + b;
            seg[j + h] = a - b;
        }
        __syncwarp();
    }
    for (int i = threadIdx.x; i < n; i += 32) out[base + i] = seg[i] * norm;
}

// RMSNorm of fp32 rows, optionally after `residual += delta` (stored back),
// and optionally with the fp16 copy (out_h, when has_half). One block per
// row.
extern "C" __global__ void rms_norm_f32(float* __restrict__ residual, const float* __restrict__ delta,
                                        const float* __restrict__ w, float* __restrict__ out,
                                        __half* __restrict__ out_h, int d, float eps, int has_delta,
                                        int has_half) {
    grid_dep_launch();
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float* r = residual + row * d;
    const float* dl = delta + row * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = r[i];
        if (has_delta) {
            v += dl[i];
            r[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    float* o = out + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float y = r[i] * inv * w[i];
        o[i] = y;
        if (has_half) out_h[row * d + i] = __float2half_rn(y);
    }
}

// rms_norm_f32 for rows whose length d is a multiple of 4, up to
// 4 · 4 · 1024: one block per row, thread t holding float4s t, t + blockDim,
// … (at most 4) in registers between the sum of squares and the scaling,
// so a row is read once with all its loads in flight (the loop above reads
// it twice, one dependent load per iteration). The weights are loaded
// with the row, before the sum, so their latency hides behind the row's
// instead of following the reduction (ncu on an H100, session 9: this
// kernel took 3.9 µs per 4096-wide decode row, against 2.3 µs for a bare
// conversion launch). Same per-element formula (r · inv · w) and fp16 copy.
// At most 1024 threads (d / 4 of them): the bound keeps ptxas within 64
// registers a thread, which a block that large needs.
extern "C" __global__ void __launch_bounds__(1024) rms_norm_f32_v(float* __restrict__ residual,
                                          const float* __restrict__ delta,
                                          const float* __restrict__ w, float* __restrict__ out,
                                          __half* __restrict__ out_h, int d, float eps,
                                          int has_delta, int has_half) {
    grid_dep_launch();
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const int n4 = d >> 2;
    float4* r4 = reinterpret_cast<float4*>(residual + row * d);
    const float4* d4 = reinterpret_cast<const float4*>(delta + row * d);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    float4 v[4], wv[4];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < n4) {
            wv[k] = w4[i];
            float4 x = r4[i];
            if (has_delta) {
                const float4 y = d4[i];
                x.x += y.x;
                x.y += y.y;
                x.z += y.z;
                x.w += y.w;
                r4[i] = x;
            }
            v[k] = x;
            ss += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
        }
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    float4* o4 = reinterpret_cast<float4*>(out + row * d);
    __half2* oh = reinterpret_cast<__half2*>(out_h + row * d);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < n4) {
            const float4 ww = wv[k];
            float4 y;
            y.x = v[k].x * inv * ww.x;
            y.y = v[k].y * inv * ww.y;
            y.z = v[k].z * inv * ww.z;
            y.w = v[k].w * inv * ww.w;
            o4[i] = y;
            if (has_half) {
                oh[2 * i] = __floats2half2_rn(y.x, y.y);
                oh[2 * i + 1] = __floats2half2_rn(y.z, y.w);
            }
        }
    }
}

// Rotary embedding in place, half-split ("neox") form, as the CPU backend
// does it: the angle (pos · pos_scale) · inv_freq is formed in fp32, its
// cosine and sine taken in double. x is [rows][heads][hd]; pos[row] is the
// row's position. grid = (rows, heads), block = hd/2 threads rounded up.
extern "C" __global__ void rope_f32(float* __restrict__ x, const int* __restrict__ pos,
                                    const float* __restrict__ inv_freq, float pos_scale, int heads,
                                    int hd) {
    const int half_d = hd >> 1;
    const int i = threadIdx.x;
    if (i >= half_d) return;
    float* v = x + ((size_t)blockIdx.x * heads + blockIdx.y) * hd;
    const float p = (float)pos[blockIdx.x] * pos_scale;
    const float ang = p * inv_freq[i];
    double s, c;
    sincos((double)ang, &s, &c);
    const float cf = (float)c, sf = (float)s;
    const float x0 = v[i], x1 = v[i + half_d];
    v[i] = x0 * cf - x1 * sf;
    v[i + half_d] = x1 * cf + x0 * sf;
}

// A fused q/k/v projection's output split into q, k and v with the rotary
// embedding of rope_f32 applied to q and k on the way (one launch where
// split_cols3_f32 and two rope_f32 took three; the same arithmetic, so the
// same bits). src is [rows][(nq + nk + nv)·hd]; q, k, v are [rows][n·hd].
// grid = (rows, nq + nk + nv): y is the head, in src's order; block = hd/2
// threads rounded up, thread i moving the pair (i, i + hd/2).
extern "C" __global__ void split_rope_f32(const float* __restrict__ src, float* __restrict__ q,
                                          float* __restrict__ k, float* __restrict__ v,
                                          const int* __restrict__ pos,
                                          const float* __restrict__ inv_freq, float pos_scale,
                                          int nq, int nk, int nv, int hd) {
    const int half_d = hd >> 1;
    const int i = threadIdx.x;
    if (i >= half_d) return;
    const size_t row = blockIdx.x;
    const int h = blockIdx.y;
    const float* s = src + (row * (size_t)(nq + nk + nv) + h) * hd;
    const float x0 = s[i], x1 = s[i + half_d];
    if (h >= nq + nk) {
        float* d = v + (row * nv + (h - nq - nk)) * hd;
        d[i] = x0;
        d[i + half_d] = x1;
        return;
    }
    float* d = h < nq ? q + (row * nq + h) * hd : k + (row * nk + (h - nq)) * hd;
    const float p = (float)pos[row] * pos_scale;
    const float ang = p * inv_freq[i];
    double sn, cs;
    sincos((double)ang, &sn, &cs);
    const float cf = (float)cs, sf = (float)sn;
    d[i] = x0 * cf - x1 * sf;
    d[i + half_d] = x1 * cf + x0 * sf;
}

// out[r][:] = fp32(table[ids[r]][:]); ids were range-checked on the host.
// Ids are range-checked on the host; an id outside the table (possible only
// when ids come from a device buffer rewritten between graph replays) gives
// a row of zeros instead of a read outside the table.
extern "C" __global__ void embedding_f16_f32(const __half* __restrict__ table,
                                             const u32* __restrict__ ids, float* __restrict__ out,
                                             int d, u32 vocab) {
    const size_t r = blockIdx.x;
    const u32 id = ids[r];
    if (id >= vocab) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) out[r * d + i] = 0.0f;
        return;
    }
    const __half* src = table + (size_t)id * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[r * d + i] = __half2float(src[i]);
}

// out[i][:] = x[rows[i]][:]; rows were range-checked on the host.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ x, const int* __restrict__ rows,
                                           float* __restrict__ out, int cols) {
    const size_t r = blockIdx.x;
    const float* src = x + (size_t)rows[r] * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) out[r * cols + i] = src[i];
}

// The values of a deferred norm's output (W4Norm in w4a16.cu), for an op
// that cannot take the norm's factor itself: out[r][c] = h[r][c] · inv(r),
// h being fp16(residual · w · 2^-k) and inv = 2^k / rms formed from the
// partial sums of r² as the linears after the norm form it
// (deferred_norm_factor in common.cuh), and out_h = fp16(out). One block
// per row.
extern "C" __global__ void deferred_norm_values_f32(const __half* __restrict__ h,
                                                    const float* __restrict__ part,
                                                    float* __restrict__ out,
                                                    __half* __restrict__ out_h, int d, int parts,
                                                    float eps, float scale) {
    __shared__ float inv_s;
    const size_t row = blockIdx.x;
    if (threadIdx.x < 32) {
        const float f = deferred_norm_factor(part + row * parts, parts, d, eps, scale, threadIdx.x);
        if (threadIdx.x == 0) inv_s = f;
    }
    __syncthreads();
    const float inv = inv_s;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = __half2float(h[row * d + i]) * inv;
        out[row * d + i] = v;
        out_h[row * d + i] = __float2half_rn(v);
    }
}
