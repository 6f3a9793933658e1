// Part of the paged_attn module (see kernels/src/nvrtc.rs): the int8/int4
// attention on the tensor cores. The pool layout, the KV write and the
// float kernel are in paged_attn.cu; the entry points in paged_attn_entry.cu.
#line 5 "paged_attn_int.cu"
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
                               float* __restrict__ part_acc, int rows_at,
                               __half* __restrict__ out_h) {
    // Attention feeds o_proj: let it start (see act_f32.cu).
    grid_dep_launch();
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

    const int row = decode_row(meta, rows_at);
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
        // Partial states by launch slot (blockIdx.x), not row: a launch over a
        // row list needs them for its own rows only.
        const size_t qp = ((size_t)blockIdx.x * NH + qh0 + gg) * splits + split;
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
