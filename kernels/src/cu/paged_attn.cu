// The paged KV cache on the GPU: the write (with online or static
// quantization) and causal attention over a sequence's blocks. This file
// holds the layout, the write and the fp32/fp16 kernel; paged_attn_int.cu
// the int8/int4 tensor-core kernel, paged_attn_entry.cu the split merge and
// the entry points (one NVRTC module, concatenated in that order).
//
// Pool layout (the same as the CPU backend's): a block holds
// [layer][K, V][kv_head][token][head_dim] values. Token-head index
//   th = (((block · L + layer) · 2 + which) · H + head) · BL + token
// owns bytes [th · bytes_per_th, +bytes_per_th) of `data` (fp32, fp16, int8
// codes, or int4 codes two per byte with the low nibble first) and, for
// online integer modes, per-token parameters in `params`, grouped per
// segment of BL tokens: segment th / BL owns bytes [seg · P, +P), its BL
// fp16 scales first, then its BL zeros: int8 stores the zero-point zp as
// one byte (a code q reads back as (q − zp)·scale), int4 the fp16 zero (q
// reads back as q·scale + zero); P = 2·BL + round_up(BL · zero bytes, 2).
// The CPU keeps the same values in two flat arrays; turbomind's
// `OnlineParams` has the rules.
// Static modes read `statics[((layer · 2 + which) · H + head) · 2 + {0,1}]`.
//
// Row metadata `meta` (int32): [row_pos[rows] | row_table[rows] | tables…].
// Row r sits at position row_pos[r] of its sequence, whose block table is
// tables[row_table[r] ..]. Position p lives in block
// tables[row_table[r] + p / BL] at token p % BL.

#define DT_F32 0
#define DT_F16 1
#define DT_I8 2
#define DT_I4 3

__device__ __forceinline__ int bytes_per_th(int dt, int hd) {
    return dt == DT_F32 ? 4 * hd : dt == DT_F16 ? 2 * hd : dt == DT_I8 ? hd : hd / 2;
}

// Bytes of per-token parameters one segment of BL token-heads owns.
__device__ __forceinline__ size_t param_segment_bytes(int dt, int BL) {
    const int zero_bytes = dt == DT_I8 ? BL : 2 * BL;
    return 2 * (size_t)BL + (size_t)((zero_bytes + 1) & ~1);
}

// The online (scale, zero) of token-head th, so that a value reads back as
// q·scale + zero.
template <int DT>
__device__ __forceinline__ void kv_token_params(const void* __restrict__ params, size_t th, int BL,
                                                float& scale, float& zero) {
    const unsigned char* seg = (const unsigned char*)params + (th / BL) * param_segment_bytes(DT, BL);
    const int t = (int)(th % BL);
    scale = __half2float(((const __half*)seg)[t]);
    if (DT == DT_I8) {
        zero = -(float)seg[2 * BL + t] * scale;
    } else {
        zero = __half2float(((const __half*)(seg + 2 * BL))[t]);
    }
}

// Writes one attention output value, and its fp16 copy where the caller
// asked for one (out_h not null): o_proj reads that copy, so the
// conversion takes no launch of its own (2.3 µs per layer on an H100,
// session 9's profile).
__device__ __forceinline__ void store_out(float* __restrict__ out, __half* __restrict__ out_h,
                                          size_t i, float v) {
    out[i] = v;
    if (out_h) out_h[i] = __float2half_rn(v);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ u32 quantize_level(float x, float scale, float zero, float levels) {
    const float q = roundf((x - zero) / scale);
    return (u32)fminf(fmaxf(q, 0.0f), levels);
}

// Stores one token-head x (hd fp32 values, in global or shared memory) of
// row `row` into the pool, quantizing as the pool's mode says; run by one
// warp (lane 0..31). Shared by kv_write and split_rope_kv_write, so the two
// store the same bytes.
__device__ __forceinline__ void kv_store_head(const float* __restrict__ x,
                                              const int* __restrict__ meta, int rows,
                                              int row, int which, int head,
                                              unsigned char* __restrict__ data,
                                              unsigned char* __restrict__ params,
                                              const float* __restrict__ statics, int dt,
                                              int static_mode, int layer, int L, int H, int hd,
                                              int BL, int lane) {
    const int pos = meta[row];
    const int table = meta[rows + row];
    const int block = meta[2 * rows + table + pos / BL];
    const int token = pos % BL;
    const size_t th = ((((size_t)block * L + layer) * 2 + which) * H + head) * BL + token;
    unsigned char* dst = data + th * bytes_per_th(dt, hd);
    if (dt == DT_F32) {
        float* d = (float*)dst;
        for (int i = lane; i < hd; i += 32) d[i] = x[i];
        return;
    }
    if (dt == DT_F16) {
        __half* d = (__half*)dst;
        for (int i = lane; i < hd; i += 32) d[i] = __float2half_rn(x[i]);
        return;
    }
    const float levels = dt == DT_I8 ? 255.0f : 15.0f;
    float scale, zero;
    if (static_mode) {
        const float* s = statics + (((size_t)layer * 2 + which) * H + head) * 2;
        scale = s[0];
        zero = s[1];
    } else {
        float lo = LMQ_INF, hi = -LMQ_INF;
        for (int i = lane; i < hd; i += 32) {
            lo = fminf(lo, x[i]);
            hi = fmaxf(hi, x[i]);
        }
        lo = -warp_max(-lo);
        hi = warp_max(hi);
        // As the CPU does it (turbomind's `OnlineParams::of`, which
        // explains the rules), and codes are made with the stored pair.
        // int4: scale = max((max − min) / 15, 1e-8) kept at or above fp16's
        // smallest normal, zero = min, both rounded to fp16. int8: the same
        // step, stretched to reach zero for a range that excludes it, kept
        // at or above fp16's smallest normal and rounded up to fp16; the
        // zero-point round(−min / scale) is clamped to 0..=255.
        const float step = fmaxf((hi - lo) / levels, 1e-8f);
        unsigned char* seg = params + (th / BL) * param_segment_bytes(dt, BL);
        const int t = (int)(th % BL);
        if (dt == DT_I8) {
            const float top = lo + step * levels;
            const float ideal = roundf(-lo / step);
            float needed = step;
            if (ideal > levels) {
                needed = fmaxf(step, -lo / levels);
            } else if (ideal < 0.0f) {
                needed = fmaxf(step, top / levels);
            }
            const __half hs = __float2half_ru(fmaxf(needed, 6.103515625e-05f));
            const float s = __half2float(hs);
            const float zp = fminf(fmaxf(roundf(-lo / s), 0.0f), levels);
            if (lane == 0) {
                ((__half*)seg)[t] = hs;
                seg[2 * BL + t] = (unsigned char)zp;
            }
            scale = s;
            zero = -zp * s;
        } else {
            const __half hs = __float2half_rn(fmaxf(step, 6.103515625e-05f));
            const __half hz = __float2half_rn(lo);
            if (lane == 0) {
                ((__half*)seg)[t] = hs;
                ((__half*)(seg + 2 * BL))[t] = hz;
            }
            scale = __half2float(hs);
            zero = __half2float(hz);
        }
    }
    if (dt == DT_I8) {
        for (int i = lane; i < hd; i += 32) dst[i] = (unsigned char)quantize_level(x[i], scale, zero, levels);
    } else {
        for (int j = lane; j < hd / 2; j += 32) {
            const u32 lo = quantize_level(x[2 * j], scale, zero, levels);
            const u32 hi = quantize_level(x[2 * j + 1], scale, zero, levels);
            dst[j] = (unsigned char)(lo | (hi << 4));
        }
    }
}

// Writes the K and V rows of a batch into the pool. grid = (rows, 2·H):
// y = which · H + head; one warp per token-head.
extern "C" __global__ void kv_write(const float* __restrict__ k, const float* __restrict__ v,
                                    const int* __restrict__ meta, int rows,
                                    unsigned char* __restrict__ data, unsigned char* __restrict__ params,
                                    const float* __restrict__ statics, int dt, int static_mode,
                                    int layer, int L, int H, int hd, int BL) {
    const int row = blockIdx.x;
    const int which = blockIdx.y / H, head = blockIdx.y % H;
    const float* x = (which == 0 ? k : v) + (size_t)row * H * hd + (size_t)head * hd;
    kv_store_head(x, meta, rows, row, which, head, data, params, statics, dt, static_mode, layer, L,
                  H, hd, BL, threadIdx.x);
}

// split_rope_f32 (act_f32.cu) and kv_write in one launch: a stacked q/k/v
// projection's output `src` (rows × (NQ + 2·H)·hd) is split by head; q
// heads get the rotary embedding and go to q (rows × NQ·hd); k heads get
// it too and, with the v heads as they are, go through shared memory into
// the pool by kv_store_head, so the pool holds the same bytes as after
// the two launches (the angle and rotation are split_rope_f32's, term for
// term). k and v never reach global memory as matrices: attention reads
// them from the pool. grid = (rows, NQ + 2·H); block = hd/2 threads
// rounded up to a warp; hd floats of dynamic shared memory.
extern "C" __global__ void split_rope_kv_write(const float* __restrict__ src, float* __restrict__ q,
                                               const int* __restrict__ meta, int rows,
                                               const float* __restrict__ inv_freq, float pos_scale,
                                               int NQ, unsigned char* __restrict__ data,
                                               unsigned char* __restrict__ params,
                                               const float* __restrict__ statics, int dt,
                                               int static_mode, int layer, int L, int H, int hd,
                                               int BL) {
    extern __shared__ float head_vals[];
    const int half_d = hd >> 1;
    const int i = threadIdx.x;
    const int row = blockIdx.x;
    const int h = blockIdx.y;
    const bool is_v = h >= NQ + H;
    if (i < half_d) {
        const float* s = src + ((size_t)row * (NQ + 2 * H) + h) * hd;
        const float x0 = s[i], x1 = s[i + half_d];
        float y0 = x0, y1 = x1;
        if (!is_v) {
            const float p = (float)meta[row] * pos_scale;
            const float ang = p * inv_freq[i];
            double sn, cs;
            sincos((double)ang, &sn, &cs);
            const float cf = (float)cs, sf = (float)sn;
            y0 = x0 * cf - x1 * sf;
            y1 = x1 * cf + x0 * sf;
        }
        if (h < NQ) {
            float* d = q + ((size_t)row * NQ + h) * hd;
            d[i] = y0;
            d[i + half_d] = y1;
        } else {
            head_vals[i] = y0;
            head_vals[i + half_d] = y1;
        }
    }
    // Block-uniform: a q head's block is done.
    if (h < NQ) return;
    __syncthreads();
    if (i < 32) {
        const int which = is_v ? 1 : 0;
        const int head = h - NQ - which * H;
        kv_store_head(head_vals, meta, rows, row, which, head, data, params, statics, dt,
                      static_mode, layer, L, H, hd, BL, i);
    }
}

// Loads 8 consecutive values (dims d0..d0+7) of one fp32 or fp16 token-head
// as fp32.
template <int DT>
__device__ __forceinline__ void load8(const unsigned char* __restrict__ base, int d0, float* out) {
    if (DT == DT_F32) {
        const float4* p = (const float4*)(base + 4 * d0);
        const float4 a = p[0], b = p[1];
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
        out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
        const uint4 u = *(const uint4*)(base + 2 * d0);
        const __half2* h = (const __half2*)&u;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __half22float2(h[i]);
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    }
}

#define WARPS 4

// The row a decode block attends for: blockIdx.x itself, or, when prefill
// tiles (paged_attn_prefill.cu) take some rows of the batch, entry
// blockIdx.x of the list of the other rows at meta[rows_at] (rows_at ≥ 0).
__device__ __forceinline__ int decode_row(const int* __restrict__ meta, int rows_at) {
    return rows_at < 0 ? (int)blockIdx.x : meta[rows_at + blockIdx.x];
}

// Causal attention over fp32 or fp16 storage (integer storage has its own
// kernel, `paged_attn_int`, below). Each row attends over its sequence's
// positions 0..=row_pos,
// for the (up to MAX_G) query heads `qh0 ..` that share KV head `head`.
// MAX_G is a compile-time width (1, 4 or 8): the host picks the smallest
// that covers the group, so MHA models carry one query head in registers
// rather than eight.
// grid = (rows, H · head_chunks, splits); block = WARPS warps.
//
// A sub-group of TPK = HD/VEC lanes handles one key at a time, each lane
// owning VEC = 8 dimensions (one 16-byte load of fp16); a warp holds
// 32/TPK sub-groups. Split z covers
// positions [z · split_len, min((z+1) · split_len, row_pos + 1)); inside it
// sub-group s of the block takes keys s, s + NSG, … (a fixed assignment, so
// results never depend on what else is in the batch). Each sub-group keeps
// its own online softmax; they are merged in a fixed order through shared
// memory. With one split the row is normalized and written to `out`; with
// more, the unnormalized state goes to `part_*` for attn_merge.
template <int HD, int DT, int MAX_G>
__device__ void paged_attn(const float* __restrict__ q, const int* __restrict__ meta, int rows,
                           const unsigned char* __restrict__ data,
                           int layer, int L, int H, int NH, int BL,
                           int split_len, int splits, float softmax_scale, float* __restrict__ out,
                           float* __restrict__ part_ml, float* __restrict__ part_acc, int rows_at,
                           __half* __restrict__ out_h) {
    // Attention feeds o_proj: let it start (see act_f32.cu).
    grid_dep_launch();
    constexpr int VEC = 8;
    constexpr int TPK = HD / VEC;
    constexpr int SPW = 32 / TPK;  // sub-groups per warp
    constexpr int NSG = SPW * WARPS;
    extern __shared__ float smem[];

    const int row = decode_row(meta, rows_at);
    const int G = NH / H;
    const int chunks = (G + MAX_G - 1) / MAX_G;
    const int head = blockIdx.y / chunks;
    const int g0 = (blockIdx.y % chunks) * MAX_G;
    const int ng = min(MAX_G, G - g0);
    const int qh0 = head * G + g0;
    const int split = blockIdx.z;
    const int pos = meta[row];
    const int table = meta[rows + row];
    const int* blocks = meta + 2 * rows + table;
    const int begin = split * split_len;
    const int end = min(begin + split_len, pos + 1);
    if (begin >= end) return;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / TPK, sl = lane % TPK;
    const int sg = warp * SPW + sub;
    const int d0 = sl * VEC;

    float qr[MAX_G][VEC];
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            qr[g][j] = g < ng ? q[((size_t)row * NH + qh0 + g) * HD + d0 + j] * softmax_scale : 0.0f;
    }
    float m[MAX_G], l[MAX_G], acc[MAX_G][VEC];
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
        m[g] = -LMQ_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[g][j] = 0.0f;
    }

    constexpr int bpt = DT == DT_F32 ? 4 * HD : 2 * HD;
    // Every lane of a warp runs the same number of iterations, so the
    // sub-group shuffles below always see the whole warp. Each iteration
    // issues the loads of UNROLL keys before using any of them (more memory
    // requests in flight), then folds the UNROLL scores into the running
    // softmax at once: one rescale of the accumulator per chunk, not per key.
    constexpr int UNROLL = MAX_G >= 8 ? 2 : 4;
    for (int base = begin; base < end; base += UNROLL * NSG) {
        float kv[UNROLL][VEC], vv[UNROLL][VEC];
        bool valid[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int p = base + u * NSG + sg;
            valid[u] = p < end;
            const int block = valid[u] ? blocks[p / BL] : blocks[begin / BL];
            const int token = p % BL;
            const size_t thk = ((((size_t)block * L + layer) * 2) * H + head) * BL + token;
            const size_t thv = thk + (size_t)H * BL;
            load8<DT>(data + thk * bpt, d0, kv[u]);
            load8<DT>(data + thv * bpt, d0, vv[u]);
        }
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
            float sc[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < VEC; ++j) s += qr[g][j] * kv[u][j];
                sc[u] = s;
            }
#pragma unroll
            for (int o = TPK / 2; o > 0; o >>= 1) {
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
            }
            if (g < ng) {
                float mn = m[g];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u)
                    if (valid[u]) mn = fmaxf(mn, sc[u]);
                const float corr = __expf(m[g] - mn);
                float lsum = l[g] * corr;
                float o8[VEC];
#pragma unroll
                for (int j = 0; j < VEC; ++j) o8[j] = acc[g][j] * corr;
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const float pw = valid[u] ? __expf(sc[u] - mn) : 0.0f;
                    lsum += pw;
#pragma unroll
                    for (int j = 0; j < VEC; ++j) o8[j] += pw * vv[u][j];
                }
#pragma unroll
                for (int j = 0; j < VEC; ++j) acc[g][j] = o8[j];
                l[g] = lsum;
                m[g] = mn;
            }
        }
    }

    // Shared state per sub-group: m[MAX_G], l[MAX_G], acc[MAX_G][HD].
    constexpr int STRIDE = MAX_G * (2 + HD);
    float* mine = smem + sg * STRIDE;
    if (sl == 0) {
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
            mine[g] = m[g];
            mine[MAX_G + g] = l[g];
        }
    }
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) mine[2 * MAX_G + g * HD + d0 + j] = acc[g][j];
    }
    __syncthreads();

    // Merge the sub-groups in order: thread t handles (g, d) pairs.
    for (int e = threadIdx.x; e < ng * HD; e += blockDim.x) {
        const int g = e / HD, d = e % HD;
        float mt = -LMQ_INF;
        for (int s = 0; s < NSG; ++s) mt = fmaxf(mt, smem[s * STRIDE + g]);
        float lt = 0.0f, at = 0.0f;
        for (int s = 0; s < NSG; ++s) {
            const float ms = smem[s * STRIDE + g];
            if (ms == -LMQ_INF) continue;
            const float w = __expf(ms - mt);
            lt += smem[s * STRIDE + MAX_G + g] * w;
            at += smem[s * STRIDE + 2 * MAX_G + g * HD + d] * w;
        }
        const size_t qh = (size_t)row * NH + qh0 + g;
        // Partial states by launch slot (blockIdx.x), not row: a launch over a
        // row list needs them for its own rows only.
        const size_t qp = ((size_t)blockIdx.x * NH + qh0 + g) * splits + split;
        if (splits == 1) {
            store_out(out, out_h, qh * HD + d, at / lt);
        } else {
            part_acc[qp * HD + d] = at;
            if (d == 0) {
                part_ml[qp * 2] = mt;
                part_ml[qp * 2 + 1] = lt;
            }
        }
    }
}
