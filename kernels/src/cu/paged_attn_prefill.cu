// Part of the paged_attn module (see kernels/src/nvrtc.rs): causal attention
// for prefill, flash-attention style, over the paged KV cache with fp16,
// int8 or int4 storage. The layout, the KV write and the per-row (decode)
// kernels are in the files before this one; the entry points after it.
#line 5 "paged_attn_prefill.cu"
// ---------------------------------------------------------------------------
// Why: the decode kernels give every row its own pass over its keys, so a
// prompt of n rows reads about n²/2 key-value pairs per head. Here a block
// takes a tile of up to 64 consecutive rows of one sequence (four warps of
// 16 rows) for one query head, and the KV of each 64-key tile is read once
// into shared memory for all of them.
//
// Tiles: the host lists them in `meta` at `tiles_at` as (first row, rows,
// largest position) triples, one per block (grid.x); every row of a tile
// shares its block table, and each row attends over positions 0..=its own.
// grid = (tiles, NH); block = 4 warps. No split: each block writes its rows'
// outputs, so no partial state grows with the prompt (rows × heads ×
// splits × head_dim floats, quadratic in its length); the host sends a
// batch here only when its tiles alone fill the GPU (see paged/prefill.rs).
//
// Math (m16n8k16 fp16 MMAs, fp32 accumulation), per warp of 16 rows:
//  * S = Q·Kᵀ: A = the warp's queries (times the softmax scale, rounded to
//    fp16, held in registers for the whole launch), B = a key tile from
//    shared memory through ldmatrix (rows = keys, so the non-transposed
//    8×8 loads give B's column layout).
//  * The C fragment of S is the A fragment of P once rounded to fp16, so P
//    never leaves registers.
//  * O += P·V: B = the value tile through ldmatrix.trans (rows = keys).
//  * Online softmax per row in fp32: each thread holds two rows (g and
//    g + 8 of its warp) and reduces their maxima over the 4 threads of a
//    row; the sum l adds the fp16-rounded weights that entered the MMA.
//    Rows with no valid key yet keep m = −∞ and a reference of 0, so no
//    NaN arises (−∞ − −∞).
//
// Storage: fp16 tiles are copied as they are (cp.async, two stages, the
// next tile in flight while this one is used). int8/int4 tiles are
// dequantized to fp16 on the way in (c·scale + zero in fp32, one rounding),
// one stage. Keys past the range read the last valid key instead, so every
// value in shared memory is finite and masked weights are exact zeros.
//
// Accuracy against the fp32 CPU reference: q, k (integer storage), p and
// the products' inputs are rounded to fp16 (relative 2⁻¹¹ each), sums are
// fp32; the tests bound the result at 2e-3 of (1 + |ref|).
// ---------------------------------------------------------------------------

#define PF_KT 64      // keys per tile
#define PF_WARPS 4    // warps per block, 16 rows each
#define PF_ROWS (16 * PF_WARPS)

// ldmatrix.x4 (not transposed): four 8×8 matrices of 16-bit elements; lanes
// 8m..8m+7 give the row addresses of matrix m, and lane (g, t) receives
// elements (g, 2t) and (g, 2t + 1) of each.
__device__ __forceinline__ void ldsm_x4(u32* r, const unsigned char* p) {
#if __CUDA_ARCH__ >= 750
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
#else
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const unsigned long long mine = (unsigned long long)p;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const unsigned char* row = (const unsigned char*)__shfl_sync(0xffffffffu, mine, 8 * m + g);
        r[m] = ((const u32*)row)[t];
    }
#endif
}

// A token-head of the tile being loaded: where it is and (integer
// storage) how its codes read back.
struct PrefillKey {
    unsigned long long th;
    float scale, zero;
};

// Shared memory of one block: NST stages, each a K tile then a V tile of
// PF_KT rows of HD halves padded by 8 (16 bytes), so that the 8 rows of an
// ldmatrix fall in distinct bank groups; then the 2·PF_KT token-heads of the
// tile being loaded.
//
// PIPE (integer storage only): two more stages of the tile's raw codes,
// K then V, each token-head's RB bytes as stored, filled by cp.async while
// the tile before is dequantized and attended; and two token-head
// buffers, one per raw stage.
template <int HD, int DT, bool PIPE = false>
struct PrefillSmem {
    static constexpr int RS = HD + 8;  // halves per row
    static constexpr int TILE = PF_KT * RS;  // halves per K (or V) tile
    static constexpr int NST = DT == DT_F16 ? 2 : 1;
    static constexpr int RB = DT == DT_I8 ? HD : HD / 2;  // raw bytes per token-head
    static constexpr int RAW = PIPE ? 2 * PF_KT * RB : 0;  // bytes per raw stage
    static constexpr int RAW_AT = NST * 2 * TILE * 2;  // bytes
    static constexpr int KEYS_AT = RAW_AT + 2 * RAW;
    static constexpr int KEYS = 2 * PF_KT;  // token-heads per buffer
    static constexpr int BYTES = KEYS_AT + (PIPE ? 2 : 1) * KEYS * (int)sizeof(PrefillKey);
};

// Where the 2·PF_KT token-heads of the key tile [kt0, kt0 + PF_KT) of
// `head` are (keys at or past `end` read key end − 1), K then V, and for
// integer storage their parameters, into `keys`: one thread each (a
// block-table lookup, then the parameters).
template <int DT, bool STATIC>
__device__ __forceinline__ void prefill_lookup(PrefillKey* keys, int kt0, int end,
                                               const int* __restrict__ blocks,
                                               const unsigned char* __restrict__ params,
                                               const float* __restrict__ statics, int layer, int L,
                                               int H, int head, int BL) {
    static_assert(2 * PF_KT <= PF_WARPS * 32, "one thread per token-head of a tile");
    if (threadIdx.x < 2 * PF_KT) {
        const int which = threadIdx.x / PF_KT, key = threadIdx.x % PF_KT;
        const int p = min(kt0 + key, end - 1);
        PrefillKey k;
        k.th = key_th(blocks, p, layer, L, H, head, BL) + (size_t)which * H * BL;
        k.scale = 1.0f;
        k.zero = 0.0f;
        if (DT != DT_F16) {
            if (STATIC) {
                const float* st = statics + (((size_t)layer * 2 + which) * H + head) * 2;
                k.scale = st[0];
                k.zero = st[1];
            } else {
                kv_token_params<DT>(params, k.th, BL, k.scale, k.zero);
            }
        }
        keys[threadIdx.x] = k;
    }
}

// Eight codes of a token-head (int8: 8 bytes, int4: 4 bytes, byte j
// holding values 2j in its low nibble and 2j + 1) as c·scale + zero in
// fp32, rounded once to fp16, into 16 bytes of shared memory.
template <int DT>
__device__ __forceinline__ void prefill_dequant8(__half* dst, const unsigned char* src, float scale,
                                                 float zero) {
    float x[8];
    if (DT == DT_I8) {
        const uint2 w = *(const uint2*)src;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            x[i] = (float)((w.x >> (8 * i)) & 0xffu);
            x[4 + i] = (float)((w.y >> (8 * i)) & 0xffu);
        }
    } else {
        const u32 w = *(const u32*)src;
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = (float)((w >> (4 * i)) & 0xfu);
    }
    u32 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        h[i] = h2_bits(__floats2half2_rn(fmaf(x[2 * i], scale, zero), fmaf(x[2 * i + 1], scale, zero)));
    *(uint4*)dst = make_uint4(h[0], h[1], h[2], h[3]);
}

// PIPE: the raw codes of the token-heads in `keys` into a raw stage, by
// cp.async in 16-byte pieces (committed as one group by the caller).
template <int HD, int DT>
__device__ __forceinline__ void prefill_issue_raw(unsigned char* raw, const PrefillKey* keys,
                                                  const unsigned char* __restrict__ data) {
    constexpr int RB = PrefillSmem<HD, DT, true>::RB;
    constexpr int CPR = RB / 16;  // pieces per token-head
    for (int c = threadIdx.x; c < 2 * PF_KT * CPR; c += PF_WARPS * 32) {
        const int kh = c / CPR, part = c % CPR;
        copy16_async(raw + kh * RB + part * 16, data + keys[kh].th * RB + part * 16);
    }
}

// PIPE: a raw stage, dequantized with the parameters in `keys`, into the
// fp16 stage (the layout prefill_load_tile writes).
template <int HD, int DT>
__device__ __forceinline__ void prefill_dequant_raw(__half* stage, const unsigned char* raw,
                                                    const PrefillKey* keys) {
    using S = PrefillSmem<HD, DT, true>;
    constexpr int CPK = HD / 8;
    constexpr int CB = S::RB / CPK;  // raw bytes per chunk of 8 values
    for (int c = threadIdx.x; c < 2 * PF_KT * CPK; c += PF_WARPS * 32) {
        const int kh = c / CPK, part = c % CPK;
        const int which = kh / PF_KT, key = kh % PF_KT;
        const PrefillKey k = keys[kh];
        prefill_dequant8<DT>(stage + which * S::TILE + key * S::RS + part * 8, raw + kh * S::RB + part * CB,
                             k.scale, k.zero);
    }
}

// The key tile [kt0, kt0 + PF_KT) of `head` (keys at or past `end` read key
// end − 1), K then V, into `stage`: fp16 storage by cp.async (committed as
// one group by the caller), integer storage dequantized through registers.
// First one thread per token-head finds it (a block-table lookup and, for
// integer storage, its parameters) for the others: each token-head is 8 to
// 16 chunks of 8 values, copied by as many threads.
template <int HD, int DT, bool STATIC>
__device__ __forceinline__ void prefill_load_tile(__half* stage, PrefillKey* keys, int kt0, int end,
                                                  const int* __restrict__ blocks,
                                                  const unsigned char* __restrict__ data,
                                                  const unsigned char* __restrict__ params,
                                                  const float* __restrict__ statics, int layer,
                                                  int L, int H, int head, int BL) {
    using S = PrefillSmem<HD, DT>;
    constexpr int CPK = HD / 8;  // chunks of 8 values per token-head
    constexpr int CHUNKS = 2 * PF_KT * CPK;
    // `keys` is one buffer: callers put a barrier between one call's copies
    // (which read it) and the next call (which rewrites it).
    prefill_lookup<DT, STATIC>(keys, kt0, end, blocks, params, statics, layer, L, H, head, BL);
    __syncthreads();
    for (int c = threadIdx.x; c < CHUNKS; c += PF_WARPS * 32) {
        const int which = c / (PF_KT * CPK);
        const int key = (c / CPK) % PF_KT;
        const int part = c % CPK;
        const PrefillKey k = keys[which * PF_KT + key];
        const size_t th = k.th;
        __half* dst = stage + which * S::TILE + key * S::RS + part * 8;
        if (DT == DT_F16) {
            copy16_async(dst, data + th * (2 * HD) + part * 16);
            continue;
        }
        constexpr int CB = S::RB / CPK;
        prefill_dequant8<DT>(dst, data + th * S::RB + part * CB, k.scale, k.zero);
    }
}

template <int HD, int DT, bool STATIC, bool PIPE = false>
__device__ void paged_attn_prefill(const float* __restrict__ q, const int* __restrict__ meta,
                                   int rows, int tiles_at, const unsigned char* __restrict__ data,
                                   const unsigned char* __restrict__ params,
                                   const float* __restrict__ statics, int layer, int L, int H,
                                   int NH, int BL, float softmax_scale, float* __restrict__ out,
                                   __half* __restrict__ out_h) {
    // Attention feeds o_proj: let it start (see act_f32.cu).
    grid_dep_launch();
    static_assert(!PIPE || DT != DT_F16, "fp16 storage is pipelined without PIPE");
    using S = PrefillSmem<HD, DT, PIPE>;
    constexpr int KS = HD / 16;     // k-steps of Q·Kᵀ
    constexpr int NT = PF_KT / 8;   // key n-tiles of S
    constexpr int DTL = HD / 8;     // dim n-tiles of O
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __half* smem = (__half*)smem_raw;
    PrefillKey* keys = (PrefillKey*)(smem_raw + S::KEYS_AT);

    const int* tile = meta + tiles_at + 3 * blockIdx.x;
    const int row0 = tile[0], nrows = tile[1], maxpos = tile[2];
    const int qh = blockIdx.y;
    const int head = qh / (NH / H);
    const int begin = 0, end = maxpos + 1;
    const int* blocks = meta + 2 * rows + meta[rows + row0];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // This thread's two rows (tile-relative) and their positions; rows past
    // the tile never attend (position −1).
    const int ra = 16 * warp + g, rb = ra + 8;
    const int pos_a = ra < nrows ? meta[row0 + ra] : -1;
    const int pos_b = rb < nrows ? meta[row0 + rb] : -1;
    int warp_last = max(pos_a, pos_b);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) warp_last = max(warp_last, __shfl_xor_sync(0xffffffffu, warp_last, o));

    // The queries as the A operand: k-step s holds (row g, dims 16s + 2t,
    // +1), (row g + 8, same), (row g, dims 16s + 8 + 2t, +1), (row g + 8, same).
    u32 qa[KS][4];
    {
        const float* qra = q + ((size_t)(row0 + min(ra, nrows - 1)) * NH + qh) * HD;
        const float* qrb = q + ((size_t)(row0 + min(rb, nrows - 1)) * NH + qh) * HD;
        const float sa = ra < nrows ? softmax_scale : 0.0f, sb = rb < nrows ? softmax_scale : 0.0f;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float2 xa = *(const float2*)(qra + 16 * s + 8 * h + 2 * t);
                const float2 xb = *(const float2*)(qrb + 16 * s + 8 * h + 2 * t);
                qa[s][2 * h] = h2_bits(__floats2half2_rn(xa.x * sa, xa.y * sa));
                qa[s][2 * h + 1] = h2_bits(__floats2half2_rn(xb.x * sb, xb.y * sb));
            }
        }
    }

    float m[2] = {-LMQ_INF, -LMQ_INF}, l[2] = {0.0f, 0.0f};
    float o[DTL][4];
#pragma unroll
    for (int d = 0; d < DTL; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;

    const int ntiles = (end - begin + PF_KT - 1) / PF_KT;
    unsigned char* raw = smem_raw + S::RAW_AT;
    if (PIPE) {
        // Tile 0's token-heads, then its raw codes in flight.
        prefill_lookup<DT, STATIC>(keys, begin, end, blocks, params, statics, layer, L, H, head, BL);
        __syncthreads();
        prefill_issue_raw<HD, DT>(raw, keys, data);
        copy_commit();
    }
    if (DT == DT_F16) {
        prefill_load_tile<HD, DT, STATIC>(smem, keys, begin, end, blocks, data, params, statics, layer, L, H,
                                          head, BL);
        copy_commit();
        // Every thread has read `keys` for this tile's copies before
        // iteration 0 rewrites it for the next tile.
        __syncthreads();
    }
    for (int it = 0; it < ntiles; ++it) {
        const int kt0 = begin + it * PF_KT;
        __half* stage = smem + (DT == DT_F16 ? (it & 1) : 0) * 2 * S::TILE;
        if (DT == DT_F16) {
            // The next tile's copies go out before this one is awaited; its
            // stage was last read in iteration it − 1, before the barrier
            // that ended it.
            if (it + 1 < ntiles) {
                prefill_load_tile<HD, DT, STATIC>(smem + ((it + 1) & 1) * 2 * S::TILE, keys, kt0 + PF_KT, end,
                                                  blocks, data, params, statics, layer, L, H, head, BL);
                copy_commit();
                copy_wait(1);
            } else {
                copy_wait(0);
            }
        } else if (PIPE) {
            // The next tile's token-heads are looked up while this tile's
            // codes arrive, and its codes go out before this tile is
            // dequantized and attended. Buffer (it + 1) & 1 was last read
            // by iteration it − 1's dequantization, before its barriers.
            const int nb = (it + 1) & 1;
            PrefillKey* next_keys = keys + nb * S::KEYS;
            if (it + 1 < ntiles)
                prefill_lookup<DT, STATIC>(next_keys, kt0 + PF_KT, end, blocks, params, statics, layer, L, H,
                                           head, BL);
            __syncthreads();
            if (it + 1 < ntiles) {
                prefill_issue_raw<HD, DT>(raw + nb * S::RAW, next_keys, data);
                copy_commit();
                copy_wait(1);
            } else {
                copy_wait(0);
            }
            // Every thread's copies of this tile have landed.
            __syncthreads();
            prefill_dequant_raw<HD, DT>(stage, raw + (it & 1) * S::RAW, keys + (it & 1) * S::KEYS);
        } else {
            prefill_load_tile<HD, DT, STATIC>(stage, keys, kt0, end, blocks, data, params, statics, layer, L,
                                              H, head, BL);
        }
        __syncthreads();

        if (warp_last >= kt0) {
            const unsigned char* ks = (const unsigned char*)stage;
            const unsigned char* vs = (const unsigned char*)(stage + S::TILE);
            // S = Q·Kᵀ: n-tile j = keys kt0 + 8j .. + 7. One ldmatrix.x4
            // gives B of k-steps s and s + 1: matrix mm holds dims
            // 16s + 8mm .. + 7 of the 8 keys.
            float sc[NT][4];
#pragma unroll
            for (int j = 0; j < NT; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
            const int mm = lane >> 3, mr = lane & 7;
#pragma unroll
            for (int s = 0; s < KS; s += 2) {
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    u32 b[4];
                    ldsm_x4(b, ks + ((8 * j + mr) * S::RS + 16 * s + 8 * mm) * 2);
                    mma16816(sc[j], qa[s], b, sc[j]);
                    mma16816(sc[j], qa[s + 1], b + 2, sc[j]);
                }
            }
            // Mask (causal and the range end) and the running maxima.
            float mx_a = m[0], mx_b = m[1];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kp = kt0 + 8 * j + 2 * t + e;
                    if (!(kp < end && kp <= pos_a)) sc[j][e] = -LMQ_INF;
                    if (!(kp < end && kp <= pos_b)) sc[j][2 + e] = -LMQ_INF;
                    mx_a = fmaxf(mx_a, sc[j][e]);
                    mx_b = fmaxf(mx_b, sc[j][2 + e]);
                }
            }
#pragma unroll
            for (int x = 1; x < 4; x <<= 1) {
                mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, x));
                mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, x));
            }
            // The reference each row's weights are taken against: its max,
            // or 0 while it has seen no valid key (then every weight is 0).
            const float ref_a = mx_a == -LMQ_INF ? 0.0f : mx_a;
            const float ref_b = mx_b == -LMQ_INF ? 0.0f : mx_b;
            const float ca = __expf(m[0] - ref_a), cb = __expf(m[1] - ref_b);
            m[0] = mx_a;
            m[1] = mx_b;
            l[0] *= ca;
            l[1] *= cb;
#pragma unroll
            for (int d = 0; d < DTL; ++d) {
                o[d][0] *= ca;
                o[d][1] *= ca;
                o[d][2] *= cb;
                o[d][3] *= cb;
            }
            // O += P·V, k-step u = keys kt0 + 16u .. + 15 (n-tiles 2u, 2u + 1
            // of S). One ldmatrix.x4.trans gives B of dim n-tiles 2dd and
            // 2dd + 1: matrix mm holds keys 16u + 8(mm & 1) .. + 7, dims
            // 8(2dd + (mm >> 1)) .. + 7.
#pragma unroll
            for (int u = 0; u < NT / 2; ++u) {
                u32 pa[4];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float* c = sc[2 * u + h];
                    const __half2 pr_a = __floats2half2_rn(__expf(c[0] - ref_a), __expf(c[1] - ref_a));
                    const __half2 pr_b = __floats2half2_rn(__expf(c[2] - ref_b), __expf(c[3] - ref_b));
                    const float2 fa = __half22float2(pr_a), fb = __half22float2(pr_b);
                    l[0] += fa.x + fa.y;
                    l[1] += fb.x + fb.y;
                    pa[2 * h] = h2_bits(pr_a);
                    pa[2 * h + 1] = h2_bits(pr_b);
                }
#pragma unroll
                for (int dd = 0; dd < DTL / 2; ++dd) {
                    u32 b[4];
                    ldsm_x4_trans(b, vs + ((16 * u + 8 * (mm & 1) + mr) * S::RS + 8 * (2 * dd + (mm >> 1))) * 2);
                    mma16816(o[2 * dd], pa, b, o[2 * dd]);
                    mma16816(o[2 * dd + 1], pa, b + 2, o[2 * dd + 1]);
                }
            }
        }
        // Every warp is done with this stage before it is refilled.
        __syncthreads();
    }

    // Row sums over the 4 threads of a row, then the rows' outputs: thread
    // (g, t) holds dims 8d + 2t, + 1 of rows g (o[d][0..1]) and g + 8. Every
    // row of the tile has key 0, so l ≥ 1.
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        l[0] += __shfl_xor_sync(0xffffffffu, l[0], x);
        l[1] += __shfl_xor_sync(0xffffffffu, l[1], x);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = h == 0 ? ra : rb;
        if (r >= nrows) continue;  // past the tile
        const size_t qi = (size_t)(row0 + r) * NH + qh;
        const float inv = 1.0f / l[h];
#pragma unroll
        for (int d = 0; d < DTL; ++d) {
            const float2 v = make_float2(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
            *(float2*)(out + qi * HD + 8 * d + 2 * t) = v;
            if (out_h) *(__half2*)(out_h + qi * HD + 8 * d + 2 * t) = __floats2half2_rn(v.x, v.y);
        }
    }
}
