// The paged KV cache on the GPU: the write (with online or static
// quantization) and causal attention over a sequence's blocks.
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

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ u32 quantize_level(float x, float scale, float zero, float levels) {
    const float q = roundf((x - zero) / scale);
    return (u32)fminf(fmaxf(q, 0.0f), levels);
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
    const int lane = threadIdx.x;
    const int pos = meta[row];
    const int table = meta[rows + row];
    const int block = meta[2 * rows + table + pos / BL];
    const int token = pos % BL;
    const size_t th = ((((size_t)block * L + layer) * 2 + which) * H + head) * BL + token;
    const float* x = (which == 0 ? k : v) + (size_t)row * H * hd + (size_t)head * hd;
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
                           float* __restrict__ part_ml, float* __restrict__ part_acc) {
    constexpr int VEC = 8;
    constexpr int TPK = HD / VEC;
    constexpr int SPW = 32 / TPK;  // sub-groups per warp
    constexpr int NSG = SPW * WARPS;
    extern __shared__ float smem[];

    const int row = blockIdx.x;
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
        if (splits == 1) {
            out[qh * HD + d] = at / lt;
        } else {
            part_acc[(qh * splits + split) * HD + d] = at;
            if (d == 0) {
                part_ml[(qh * splits + split) * 2] = mt;
                part_ml[(qh * splits + split) * 2 + 1] = lt;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Integer storage (int8, int4): attention on the tensor cores.
//
// The float kernel above spends most of its time per key rather than per
// byte: every lane of a key converts its codes with I2F (a quarter-rate
// unit) and repeats the address arithmetic, parameter loads and softmax
// update. Here a warp takes 16 keys at a time and runs both products as
// m16n8k16 fp16 MMAs with fp32 accumulation, transposed so that the keys
// fill the 16-row A operand and the (up to IG = 8) query heads of the block
// are the 8 columns:
//  * Sᵀ = K·Qᵀ: A = the codes of 16 keys, exact in fp16 as c − off (off =
//    the code midpoint, or −1024 when the raw halves 1024 + c go in
//    unchanged); B = the query heads. The per-key scale and zero are
//    applied to the fp32 scores: s = ks·Σ q·(c − off) + (kz + off·ks)·Σ q.
//  * Oᵀ += Vᵀ·Pᵀ: A = c·vs rounded once to fp16 (online mode; the zero
//    points enter as an fp32 sum Σ p·vz per head) or the exact codes
//    (static mode; vs and vz are applied once at the end), B = the fp16
//    softmax weights, moved from the score layout to the B layout with
//    movmatrix.
// Codes become fp16 without conversion instructions: a byte or nibble c
// under the exponent bits 0x64 reads as the half 1024 + c, so one byte
// permute or mask yields two values and one half2 subtraction removes the
// offset.
//
// Accuracy against the fp32 CPU reference: q is rounded to fp16 (relative
// 2⁻¹²), each online-mode c·vs to fp16 (relative 2⁻¹², like fp16 storage),
// each weight p ≤ 1 to fp16 (the sum l adds the same rounded weights, so
// only their relative 2⁻¹² error remains); all sums are fp32. The parity
// tests bound the result at 1e-3 (relative to 1 + |ref|); on an H200 the
// largest error was 4.5e-4 online and 2.3e-4 static.
//
// Thread roles follow the MMA register layout (g = lane / 4, t = lane % 4):
//  * K (A of Sᵀ): thread (g, t) loads keys g and g + 8 of the tile, dims
//    [t·HD/4, (t+1)·HD/4); the order of dims inside a k-step (`dim_k`) is
//    whatever the unpacking produces, and Q is loaded in the same order.
//  * Scores (C of Sᵀ): thread (g, t) holds keys g, g + 8 × heads 2t, 2t + 1.
//  * V (A of Oᵀ): thread (g, t) loads keys 2t, 2t+1, 2t+8, 2t+9, dims
//    [g·HD/8, (g+1)·HD/8); offset 2i (2i + 1) of that slice is row g (g + 8)
//    of m-tile i.
//  * Output (C of Oᵀ): thread (g, t) holds heads 2t, 2t + 1 at dims
//    g·HD/8 + 2i, + 1 for every m-tile i.
// ---------------------------------------------------------------------------

// D = A·B + C for one 16×8×16 tile, fp16 inputs and fp32 accumulation, in the
// register layout of PTX's mma.m16n8k16 (A: 4 half2, B: 2 half2, C, D: 4
// floats). sm_75 runs it as two k8 halves; older GPUs emulate it with
// shuffles (slow, but correct).
__device__ __forceinline__ void mma16816(float* d, const u32* a, const u32* b, const float* c) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif __CUDA_ARCH__ >= 750
    float t[4];
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%8,%9,%10};\n"
        : "=f"(t[0]), "=f"(t[1]), "=f"(t[2]), "=f"(t[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%8,%9,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[2]), "r"(a[3]), "r"(b[1]), "f"(t[0]), "f"(t[1]), "f"(t[2]), "f"(t[3]));
#else
    // Lane 4r + q holds A's k = 2q, 2q+1 (regs 0, 1) and 2q+8, 2q+9 (regs
    // 2, 3) of rows r and r + 8, and B's same k of column r.
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float r[4] = {c[0], c[1], c[2], c[3]};
    auto dot = [](u32 x, u32 y) {
        const float2 a = __half22float2(*(const __half2*)&x), b = __half22float2(*(const __half2*)&y);
        return a.x * b.x + a.y * b.y;
    };
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        u32 ar[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ar[i] = __shfl_sync(0xffffffffu, a[i], 4 * g + q);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 b0 = __shfl_sync(0xffffffffu, b[0], 4 * (2 * t + h) + q);
            const u32 b1 = __shfl_sync(0xffffffffu, b[1], 4 * (2 * t + h) + q);
            r[h] += dot(ar[0], b0) + dot(ar[2], b1);
            r[2 + h] += dot(ar[1], b0) + dot(ar[3], b1);
        }
    }
    d[0] = r[0]; d[1] = r[1]; d[2] = r[2]; d[3] = r[3];
#endif
}

// Transposes an 8×8 matrix of halves held in the MMA fragment layout (lane
// 4r + q holds row r, columns 2q and 2q + 1), returning the transpose in the
// same layout.
__device__ __forceinline__ u32 transpose8x8(u32 x) {
#if __CUDA_ARCH__ >= 750
    u32 y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
#else
    // Element (r, c) of the result is (c, r) of x, held by lane 4c + r/2.
    const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
    const u32 a = __shfl_sync(0xffffffffu, x, 4 * (2 * q) + r / 2);
    const u32 b = __shfl_sync(0xffffffffu, x, 4 * (2 * q + 1) + r / 2);
    const u32 sh = 16 * (r & 1);
    return ((a >> sh) & 0xffffu) | (((b >> sh) & 0xffffu) << 16);
#endif
}

// Loads NB bytes (4, 8 or a multiple of 16, aligned to that) as words.
template <int NB>
__device__ __forceinline__ void load_words(const unsigned char* __restrict__ p, u32* w) {
    if constexpr (NB % 16 == 0) {
#pragma unroll
        for (int i = 0; i < NB / 16; ++i) {
            const uint4 u = ((const uint4*)p)[i];
            w[4 * i] = u.x; w[4 * i + 1] = u.y; w[4 * i + 2] = u.z; w[4 * i + 3] = u.w;
        }
    } else if constexpr (NB == 8) {
        const uint2 u = *(const uint2*)p;
        w[0] = u.x; w[1] = u.y;
    } else {
        w[0] = *(const u32*)p;
    }
}

__device__ __forceinline__ u32 h2_bits(__half2 h) { return *(const u32*)&h; }
__device__ __forceinline__ __half2 bits_h2(u32 u) { return *(const __half2*)&u; }

// Two codes c0 (low) and c1 (high) placed under 0x64 read as the halves
// 1024 + c; subtracting `off` (1024 + the code midpoint, or 1024) leaves
// exact codes.
__device__ __forceinline__ u32 centre(u32 magic, float off) {
    return h2_bits(__hsub2(bits_h2(magic), __float2half2_rn(off)));
}

// The dim (within the thread's quarter [t·HD/4, (t+1)·HD/4)) that K
// element e (0..3: the k = 2t, 2t+1, 2t+8, 2t+9 of the fragment) of k-step
// s holds, as `unpack_k` produces them.
template <int DT>
__device__ __forceinline__ int dim_k(int s, int e) {
    if (DT == DT_I8) return 4 * s + e;
    // int4: word s/2 shifted by 8·(s%2); a masked 16-bit half gives nibbles
    // k (low half) and k + 4 (high half).
    return 8 * (s / 2) + 2 * (s % 2) + (e >> 1) + 4 * (e & 1);
}

// The two registers (k = 2t, 2t+1 and k = 2t+8, 2t+9) of k-step s of one
// key from its words (see dim_k): centred codes c − mid, or with KC false
// the halves 1024 + c (the offset then leaves through the zero term).
template <int DT, bool KC>
__device__ __forceinline__ void unpack_k(const u32* w, int s, u32* r) {
    if (DT == DT_I8) {
        r[0] = __byte_perm(w[s], 0x64646464u, 0x4140);
        r[1] = __byte_perm(w[s], 0x64646464u, 0x4342);
    } else {
        const u32 x = w[s / 2] >> (8 * (s % 2));
        r[0] = (x & 0x000f000fu) | 0x64006400u;
        r[1] = ((x >> 4) & 0x000f000fu) | 0x64006400u;
    }
    if (KC) {
        const float off = DT == DT_I8 ? 1152.0f : 1032.0f;
        r[0] = centre(r[0], off);
        r[1] = centre(r[1], off);
    }
}

// Word i of two keys a and b (V dims [i·DPW, (i+1)·DPW) of the thread's
// slice, DPW = 4 for int8, 8 for int4) as half2 pairs (a, b) of the halves
// 1024 + code, one per dim.
template <int DT>
__device__ __forceinline__ void unpack_v_pair(u32 wa, u32 wb, u32* h) {
    const u32 z0 = __byte_perm(wa, wb, 0x5410), z1 = __byte_perm(wa, wb, 0x7632);
    if (DT == DT_I8) {
        // z = [a0, a1, b0, b1]: bytes 0 and 2 (or 1 and 3) under 0x64.
        h[0] = __byte_perm(z0, 0x64646464u, 0x4240);
        h[1] = __byte_perm(z0, 0x64646464u, 0x4341);
        h[2] = __byte_perm(z1, 0x64646464u, 0x4240);
        h[3] = __byte_perm(z1, 0x64646464u, 0x4341);
    } else {
        // z = [a's byte 0, a's byte 1, b's byte 0, b's byte 1]: nibble k of
        // each key sits at bit 4k of its 16-bit half.
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            h[k] = ((z0 >> (4 * k)) & 0x000f000fu) | 0x64006400u;
            h[4 + k] = ((z1 >> (4 * k)) & 0x000f000fu) | 0x64006400u;
        }
    }
}

// The token-head index of K at position p of a row.
__device__ __forceinline__ size_t key_th(const int* __restrict__ blocks, int p, int layer, int L,
                                         int H, int head, int BL) {
    const int block = blocks[p / BL];
    return ((((size_t)block * L + layer) * 2) * H + head) * BL + p % BL;
}

#define IG 8  // query heads per block of the integer kernel (the MMA's n)

// Copies 16 bytes from global to shared memory without passing through
// registers (cp.async, sm_80+; a plain copy before that), so that a warp can
// have all its tiles in flight at once.
__device__ __forceinline__ void copy16_async(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
#else
    *(uint4*)dst = *(const uint4*)src;
#endif
}

__device__ __forceinline__ void copy_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most n (0..3) of this thread's copy groups are still in
// flight. The wait takes an immediate; in unrolled loops the switch folds.
__device__ __forceinline__ void copy_wait(int n) {
#if __CUDA_ARCH__ >= 800
    switch (n) {
        case 0: asm volatile("cp.async.wait_group 0;\n" ::); break;
        case 1: asm volatile("cp.async.wait_group 1;\n" ::); break;
        case 2: asm volatile("cp.async.wait_group 2;\n" ::); break;
        default: asm volatile("cp.async.wait_group 3;\n" ::); break;
    }
#endif
}

// The layout of the integer kernel's shared memory. While attending, each
// warp owns NTW tile stages; a stage holds 16 keys' K codes (rows of SK
// bytes), their V codes (rows of SV bytes) and 32 decoded parameter pairs
// (K of key i at i, V at 16 + i). The row padding keeps the MMA-layout reads
// free of bank conflicts (checked by simulation for every head_dim and
// storage, except 2-way conflicts on int8 K at head_dim 256). Afterwards the
// same memory holds each warp's output state: m[IG], l[IG], then IG rows of
// HD + 4 floats.
template <int HD, int DT>
struct IntSmem {
    static constexpr int BPT = DT == DT_I8 ? HD : HD / 2;  // bytes per token-head
    static constexpr int SK = BPT + (BPT / 4 >= 32 ? 16 : 0);
    static constexpr int SV = BPT + 16;
    static constexpr int STAGE = 16 * (SK + SV) + 32 * 8;
    // Tiles per warp in flight: about 8 KiB of codes (32·BPT bytes a tile),
    // at most the 4 that a split of 256 positions gives each warp.
    static constexpr int NTW = 256 / BPT >= 4 ? 4 : 256 / BPT < 1 ? 1 : 256 / BPT;
    static constexpr int RS = HD + 4;
    static constexpr int STATE = 2 * IG + IG * RS;  // floats per warp
    static constexpr int BYTES = WARPS * NTW * STAGE > WARPS * STATE * 4 ? WARPS * NTW * STAGE
                                                                          : WARPS * STATE * 4;
    __device__ static int at(int g, int d) { return 2 * IG + g * RS + d; }
};

// Causal attention over int8 / int4 storage; the same contract, grid and
// outputs as `paged_attn` above with MAX_G = IG (grid = (rows, H · chunks,
// splits), chunks = ceil(G / 8); block = WARPS warps). Inside a split,
// warp w takes the 16-key tiles w, w + WARPS, … (fixed, so results never
// depend on the batch). It issues the copies of NTW tiles into its stages
// at once, then attends over each as it arrives; the warps' states are
// merged in order through shared memory.
template <int HD, int DT, bool STATIC, bool KC>
__device__ void paged_attn_int(const float* __restrict__ q, const int* __restrict__ meta, int rows,
                               const unsigned char* __restrict__ data,
                               const __half* __restrict__ params,
                               const float* __restrict__ statics, int layer, int L, int H, int NH,
                               int BL, int split_len, int splits, float softmax_scale,
                               float* __restrict__ out, float* __restrict__ part_ml,
                               float* __restrict__ part_acc) {
    using S = IntSmem<HD, DT>;
    constexpr int KS = HD / 16;  // k-steps of K·Qᵀ, m-tiles of Vᵀ·Pᵀ
    constexpr int BPT = S::BPT;
    constexpr int KB = BPT / 4;  // K bytes per thread and key
    constexpr int VB = BPT / 8;  // V bytes per thread and key
    constexpr int KW = KB / 4, VW = VB / 4;
    constexpr int DPW = DT == DT_I8 ? 4 : 8;  // V dims per word
    constexpr int CPK = BPT / 16;             // 16-byte chunks per token-head
    constexpr int NTW = S::NTW;
    extern __shared__ float smem[];

    const int row = blockIdx.x;
    const int G = NH / H;
    const int chunks = (G + IG - 1) / IG;
    const int head = blockIdx.y / chunks;
    const int g0 = (blockIdx.y % chunks) * IG;
    const int ng = min(IG, G - g0);
    const int qh0 = head * G + g0;
    const int split = blockIdx.z;
    const int pos = meta[row];
    const int table = meta[rows + row];
    const int* blocks = meta + 2 * rows + table;
    const int begin = split * split_len;
    const int end = min(begin + split_len, pos + 1);
    if (begin >= end) return;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // A 16-key tile lies inside one block when tiles start at multiples of
    // 16 and blocks hold a multiple of 16 positions: then one table lookup
    // serves the whole tile.
    const bool aligned = BL % 16 == 0 && split_len % 16 == 0;
    const size_t vstep = (size_t)H * BL;  // K → V of the same token-head
    const size_t vbytes = vstep * BPT;
    unsigned char* stages = (unsigned char*)smem + warp * NTW * S::STAGE;

    // Query head g as the B operand of K·Qᵀ (heads ≥ ng are zero), in dim_k
    // order, and Σq of the rounded values for heads 2t and 2t + 1.
    u32 qb[KS][2];
    float qs0, qs1;
    {
        const float* qrow = q + ((size_t)row * NH + qh0 + g) * HD + t * (HD / 4);
        float qs = 0.0f;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float x0 = g < ng ? qrow[dim_k<DT>(s, 2 * h)] * softmax_scale : 0.0f;
                const float x1 = g < ng ? qrow[dim_k<DT>(s, 2 * h + 1)] * softmax_scale : 0.0f;
                const __half2 v = __floats2half2_rn(x0, x1);
                const float2 f = __half22float2(v);
                qs += f.x + f.y;
                qb[s][h] = h2_bits(v);
            }
        }
        qs += __shfl_xor_sync(0xffffffffu, qs, 1);
        qs += __shfl_xor_sync(0xffffffffu, qs, 2);
        qs0 = __shfl_sync(0xffffffffu, qs, 8 * t);
        qs1 = __shfl_sync(0xffffffffu, qs, 8 * t + 4);
    }
    // The K operand holds c − off, so k = c·ks + kz = (c − off)·ks + (kz +
    // off·ks): off = the code midpoint (centred) or −1024 (raw halves).
    const float kmid = KC ? (DT == DT_I8 ? 128.0f : 8.0f) : -1024.0f;
    float sks = 1.0f, skz = 0.0f, svs = 1.0f, svz = 0.0f;
    if (STATIC) {
        const float* st = statics + ((size_t)layer * 2 * H + head) * 2;
        sks = st[0];
        skz = st[1] + kmid * st[0];
        svs = st[2 * H];
        svz = st[2 * H + 1];
    }

    // Running max and this thread's shares of Σ p and (online mode) of
    // Σ p·vz, heads 2t and 2t + 1: values enter the MMA as c·vs, their zero
    // points through this fp32 sum.
    float m[2] = {-LMQ_INF, -LMQ_INF}, l[2] = {0.0f, 0.0f}, zs[2] = {0.0f, 0.0f};
    float acc[KS][4];
#pragma unroll
    for (int i = 0; i < KS; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

    for (int kc = begin + 16 * warp; kc < end; kc += 16 * WARPS * NTW) {
        // Issue: every tile of this round into its stage, one copy group per
        // tile (empty past the end, so that group counts stay uniform). Lane
        // L also reads the parameters of key L % 16 (K for L < 16, else V).
        float pps[NTW], ppz[NTW];
#pragma unroll
        for (int j = 0; j < NTW; ++j) {
            const int t0 = kc + 16 * WARPS * j;
            if (t0 < end) {
                // Tile keys past the last valid one read that one instead, so
                // that masked keys still read memory that exists.
                const int lim = min(15, end - 1 - t0);
                unsigned char* st = stages + j * S::STAGE;
                // Chunk r of lane: 16 bytes of the tile's K (then V) codes.
                auto chunk = [&](int r, int& which, int& key, int& part) {
                    const int c = lane + 32 * r;
                    which = c / (16 * CPK);
                    key = (c % (16 * CPK)) / CPK;
                    part = c % CPK;
                };
                size_t thp;  // the token-head whose parameters this lane reads
                if (aligned) {
                    // One lookup; the tile's token-heads are consecutive.
                    const size_t thb = key_th(blocks, t0, layer, L, H, head, BL);
                    const unsigned char* kb = data + thb * BPT;
#pragma unroll
                    for (int r = 0; r < CPK; ++r) {
                        int which, key, part;
                        chunk(r, which, key, part);
                        copy16_async(st + which * 16 * S::SK + key * (which ? S::SV : S::SK) + part * 16,
                                     kb + which * vbytes + min(key, lim) * BPT + part * 16);
                    }
                    thp = thb + min(lane & 15, lim);
                } else {
#pragma unroll
                    for (int r = 0; r < CPK; ++r) {
                        int which, key, part;
                        chunk(r, which, key, part);
                        const size_t th = key_th(blocks, t0 + min(key, lim), layer, L, H, head, BL);
                        copy16_async(st + which * 16 * S::SK + key * (which ? S::SV : S::SK) + part * 16,
                                     data + th * BPT + which * vbytes + part * 16);
                    }
                    thp = key_th(blocks, t0 + min(lane & 15, lim), layer, L, H, head, BL);
                }
                if (!STATIC) kv_token_params<DT>(params, thp + (lane >> 4) * vstep, BL, pps[j], ppz[j]);
            }
            copy_commit();
        }

        // Attend over each tile as its copies land.
#pragma unroll
        for (int j = 0; j < NTW; ++j) {
            const int t0 = kc + 16 * WARPS * j;
            if (t0 >= end) break;
            copy_wait(NTW - 1 - j);
            const unsigned char* st = stages + j * S::STAGE;
            float2* sp = (float2*)(stages + j * S::STAGE + 16 * (S::SK + S::SV));
            if (!STATIC) sp[lane] = make_float2(pps[j], ppz[j]);
            __syncwarp();

            // Sᵀ = K·Qᵀ for keys g, g + 8 × heads 2t, 2t + 1.
            u32 kw[2][KW];
#pragma unroll
            for (int h = 0; h < 2; ++h) load_words<KB>(st + (g + 8 * h) * S::SK + t * KB, kw[h]);
            // Two accumulators (even and odd k-steps) halve the chain of
            // dependent MMAs.
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int s = 0; s < KS; ++s) {
                u32 a[4];
                unpack_k<DT, KC>(kw[0], s, a);      // key g: a0a1, a4a5
                unpack_k<DT, KC>(kw[1], s, a + 2);  // key g + 8: a2a3, a6a7
                const u32 ka[4] = {a[0], a[2], a[1], a[3]};
                if (s & 1)
                    mma16816(d2, ka, qb[s], d2);
                else
                    mma16816(d, ka, qb[s], d);
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) d[e] += d2[e];
            float sc[4];
            float mx0 = m[0], mx1 = m[1];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float ks = sks, kz = skz;
                if (!STATIC) {
                    const float2 kp = sp[g + 8 * h];
                    ks = kp.x;
                    kz = kp.y + kmid * kp.x;
                }
                const bool valid = t0 + g + 8 * h < end;
                sc[2 * h] = valid ? ks * d[2 * h] + kz * qs0 : -LMQ_INF;
                sc[2 * h + 1] = valid ? ks * d[2 * h + 1] + kz * qs1 : -LMQ_INF;
                mx0 = fmaxf(mx0, sc[2 * h]);
                mx1 = fmaxf(mx1, sc[2 * h + 1]);
            }
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
            }
            // Rescale only when some head's max moved (rare after the first
            // keys); the test is warp-uniform.
            if (__any_sync(0xffffffffu, mx0 > m[0] || mx1 > m[1])) {
                const float c0 = __expf(m[0] - mx0), c1 = __expf(m[1] - mx1);
                m[0] = mx0;
                m[1] = mx1;
                l[0] *= c0;
                l[1] *= c1;
                zs[0] *= c0;
                zs[1] *= c1;
#pragma unroll
                for (int i = 0; i < KS; ++i) {
                    acc[i][0] *= c0;
                    acc[i][1] *= c1;
                    acc[i][2] *= c0;
                    acc[i][3] *= c1;
                }
            }

            // P (keys × heads) in fp16, transposed into the B operand:
            // (head g; keys 2t, 2t+1) and (head g; keys 2t+8, 2t+9).
            u32 pb[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const __half2 p = __floats2half2_rn(__expf(sc[2 * h] - m[0]), __expf(sc[2 * h + 1] - m[1]));
                const float2 f = __half22float2(p);
                l[0] += f.x;
                l[1] += f.y;
                if (!STATIC) {
                    const float vz = sp[16 + g + 8 * h].y;  // V zero of key g + 8h
                    zs[0] += f.x * vz;
                    zs[1] += f.y * vz;
                }
                pb[h] = transpose8x8(h2_bits(p));
            }

            // Oᵀ += Vᵀ·Pᵀ over keys 2t, 2t+1, 2t+8, 2t+9.
            u32 vw[4][VW];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int key = 2 * t + (k & 1) + 8 * (k >> 1);
                load_words<VB>(st + 16 * S::SK + key * S::SV + g * VB, vw[k]);
            }
            // The values as MMA input: exact codes in static mode; c·vs in
            // online mode, rounded once to fp16 (vs is an fp16 value, so
            // (1024 + c)·vs − 1024·vs is one exact fused multiply-add when
            // 1024·vs fits fp16; a tile with a larger vs subtracts first).
            u32 vs2[2], vo2[2];
            bool wide = false;
            if (!STATIC) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float a = sp[16 + 2 * t + 8 * h].x, b = sp[17 + 2 * t + 8 * h].x;
                    vs2[h] = h2_bits(__floats2half2_rn(a, b));
                    vo2[h] = h2_bits(__floats2half2_rn(-1024.0f * a, -1024.0f * b));
                    wide = wide || fmaxf(a, b) > 32.0f;
                }
                wide = __any_sync(0xffffffffu, wide);
            }
#pragma unroll
            for (int w = 0; w < VW; ++w) {
                u32 v01[DPW], v23[DPW];
                unpack_v_pair<DT>(vw[0][w], vw[1][w], v01);
                unpack_v_pair<DT>(vw[2][w], vw[3][w], v23);
#pragma unroll
                for (int e = 0; e < DPW; ++e) {
                    if (STATIC) {
                        v01[e] = centre(v01[e], 1024.0f);
                        v23[e] = centre(v23[e], 1024.0f);
                    } else if (!wide) {
                        v01[e] = h2_bits(__hfma2(bits_h2(v01[e]), bits_h2(vs2[0]), bits_h2(vo2[0])));
                        v23[e] = h2_bits(__hfma2(bits_h2(v23[e]), bits_h2(vs2[1]), bits_h2(vo2[1])));
                    } else {
                        v01[e] = h2_bits(__hmul2(bits_h2(centre(v01[e], 1024.0f)), bits_h2(vs2[0])));
                        v23[e] = h2_bits(__hmul2(bits_h2(centre(v23[e], 1024.0f)), bits_h2(vs2[1])));
                    }
                }
#pragma unroll
                for (int e = 0; e < DPW; e += 2) {
                    // m-tile i = slice offsets 2i (row g) and 2i + 1 (row g + 8).
                    const int i = (w * DPW + e) / 2;
                    const u32 a[4] = {v01[e], v01[e + 1], v23[e], v23[e + 1]};
                    mma16816(acc[i], a, pb, acc[i]);
                }
            }
        }
        // Every lane is done with the stages before the next round refills them.
        __syncwarp();
    }

    // Per head: the sums over the 8 threads sharing t. The zero points join
    // the values here: Σ p·v = Σ p·(c·vs) + Σ p·vz online, vs·Σ p·c + vz·Σ p
    // static.
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
        l[0] += __shfl_xor_sync(0xffffffffu, l[0], o);
        l[1] += __shfl_xor_sync(0xffffffffu, l[1], o);
        zs[0] += __shfl_xor_sync(0xffffffffu, zs[0], o);
        zs[1] += __shfl_xor_sync(0xffffffffu, zs[1], o);
    }
    // The states overwrite the stages of other warps: wait for all of them.
    __syncthreads();
    float* mine = smem + warp * S::STATE;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int hh = 2 * t + h;
        if (g == 0) {
            mine[hh] = m[h];
            mine[IG + hh] = l[h];
        }
        if (hh < ng) {
#pragma unroll
            for (int i = 0; i < KS; ++i) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const float a = acc[i][2 * r + h];
                    mine[S::at(hh, g * (HD / 8) + 2 * i + r)] = STATIC ? svs * a + svz * l[h] : a + zs[h];
                }
            }
        }
    }
    __syncthreads();

    // Merge the warps in order: thread e handles (head, dim) pairs.
    for (int e = threadIdx.x; e < ng * HD; e += blockDim.x) {
        const int gg = e / HD, d = e % HD;
        float mt = -LMQ_INF;
        for (int w = 0; w < WARPS; ++w) mt = fmaxf(mt, smem[w * S::STATE + gg]);
        float lt = 0.0f, at = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            const float* st = smem + w * S::STATE;
            if (st[gg] == -LMQ_INF) continue;
            const float wt = __expf(st[gg] - mt);
            lt += st[IG + gg] * wt;
            at += st[S::at(gg, d)] * wt;
        }
        const size_t qh = (size_t)row * NH + qh0 + gg;
        if (splits == 1) {
            out[qh * HD + d] = at / lt;
        } else {
            part_acc[(qh * splits + split) * HD + d] = at;
            if (d == 0) {
                part_ml[(qh * splits + split) * 2] = mt;
                part_ml[(qh * splits + split) * 2 + 1] = lt;
            }
        }
    }
}

// Combines the splits of each (row, query head) in order. grid = (rows, NH),
// block = hd threads (rounded up to a warp).
extern "C" __global__ void attn_merge(const int* __restrict__ meta, int rows, int NH, int hd,
                                      int split_len, int splits, const float* __restrict__ part_ml,
                                      const float* __restrict__ part_acc, float* __restrict__ out) {
    const int row = blockIdx.x, d = threadIdx.x;
    if (d >= hd) return;
    const size_t qh = (size_t)row * NH + blockIdx.y;
    const int used = (meta[row] + split_len) / split_len;  // ceil((pos + 1) / split_len)
    float mt = -LMQ_INF;
    for (int s = 0; s < used; ++s) mt = fmaxf(mt, part_ml[(qh * splits + s) * 2]);
    float lt = 0.0f, at = 0.0f;
    for (int s = 0; s < used; ++s) {
        const float w = __expf(part_ml[(qh * splits + s) * 2] - mt);
        lt += part_ml[(qh * splits + s) * 2 + 1] * w;
        at += part_acc[(qh * splits + s) * hd + d] * w;
    }
    out[qh * hd + d] = at / lt;
}

// Every entry takes the same arguments; the float kernels ignore the
// quantization parameters.
#define ATTN_ENTRY(HD, DT, NAME, G)                                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                      \
        paged_attn_h##HD##_##NAME##_g##G(const float* q, const int* meta, int rows,               \
                                         const unsigned char* data, const __half* params,        \
                                         const float* statics, int static_mode, int layer, int L, \
                                         int H, int NH, int BL, int split_len, int splits,       \
                                         float scale, float* out, float* part_ml,                \
                                         float* part_acc) {                                      \
        paged_attn<HD, DT, G>(q, meta, rows, data, layer, L, H, NH, BL, split_len, splits, scale, \
                              out, part_ml, part_acc);                                            \
    }

#define ATTN_ENTRIES(HD, DT, NAME) \
    ATTN_ENTRY(HD, DT, NAME, 1)    \
    ATTN_ENTRY(HD, DT, NAME, 4)    \
    ATTN_ENTRY(HD, DT, NAME, 8)

// Integer storage: one entry per head_dim and storage, for every group width
// (IG query heads per block). MINB = the blocks per SM that the register
// allocation must allow (shared memory allows about five); KC = whether K
// codes are centred before the MMA (see unpack_k).
#define ATTN_INT_ENTRY(HD, DT, NAME, MINB) ATTN_INT_ENTRY_KC(HD, DT, NAME, MINB, true)
#define ATTN_INT_ENTRY_KC(HD, DT, NAME, MINB, KC)                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                \
        NAME(const float* q, const int* meta, int rows,                      \
                                  const unsigned char* data, const __half* params,                \
                                  const float* statics, int static_mode, int layer, int L, int H, \
                                  int NH, int BL, int split_len, int splits, float scale,         \
                                  float* out, float* part_ml, float* part_acc) {                  \
        if (static_mode)                                                                          \
            paged_attn_int<HD, DT, true, KC>(q, meta, rows, data, params, statics, layer, L, H, NH,   \
                                         BL, split_len, splits, scale, out, part_ml, part_acc);   \
        else                                                                                      \
            paged_attn_int<HD, DT, false, KC>(q, meta, rows, data, params, statics, layer, L, H, NH,  \
                                          BL, split_len, splits, scale, out, part_ml, part_acc);  \
    }

ATTN_ENTRIES(64, DT_F32, f32)
ATTN_ENTRIES(64, DT_F16, f16)
ATTN_INT_ENTRY(64, DT_I8, paged_attn_h64_i8, 5)
ATTN_INT_ENTRY(64, DT_I4, paged_attn_h64_i4, 5)
ATTN_ENTRIES(128, DT_F32, f32)
ATTN_ENTRIES(128, DT_F16, f16)
// At head_dim 128 (measured on an H200, batch 64 × 2048 positions): int8
// runs best at 5 blocks per SM (96 registers, a few spilled: 334 µs against
// 352 at 4), int4 with raw K halves at 4 (333 µs against 338 centred).
ATTN_INT_ENTRY(128, DT_I8, paged_attn_h128_i8, 5)
ATTN_INT_ENTRY_KC(128, DT_I4, paged_attn_h128_i4, 4, false)
ATTN_ENTRIES(256, DT_F32, f32)
ATTN_ENTRIES(256, DT_F16, f16)
ATTN_INT_ENTRY(256, DT_I8, paged_attn_h256_i8, 2)
ATTN_INT_ENTRY(256, DT_I4, paged_attn_h256_i4, 2)
