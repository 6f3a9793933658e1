// Part of the paged_attn module (see kernels/src/nvrtc.rs): the streaming
// int8/int4 attention kernel, used when blocks hold a multiple of 16
// positions. It reuses the helpers of paged_attn_int.cu (mma16816,
// transpose8x8, copy16_async, copy_commit, copy_wait, key_th, IG).
#line 5 "paged_attn_int2.cu"
// ---------------------------------------------------------------------------
// Streaming integer attention.
//
// The same products as `paged_attn_int` (Sᵀ = K·Qᵀ and Oᵀ = Vᵀ·Pᵀ as
// m16n8k16 MMAs, keys in the MMA rows, up to IG = 8 query heads in the
// columns), with far fewer instructions per 16-key tile, because that
// kernel spent most of its time issuing them (about 600 per tile and warp):
//  * No per-value arithmetic on V. The per-key V scale folds into the
//    softmax weights (B = p·vs, one fp16 rounding, as c·vs was before) and
//    the A operand is the raw half 1024 + c. The offsets leave through one
//    fp32 sum per head of the same rounded weights (Σ (1024 + zp)·B for
//    int8, Σ B and Σ p·vz for int4), so that 1024 cancels exactly.
//  * K codes enter raw as well (1024 + c), their offset leaves through the
//    score: s = ks·(d − 1024·ΣB_q) + kz·Σq. With KC (centred keys) the
//    1024 is subtracted from each K half first (exact: c or 16·c), so the
//    fp32 sums hold Σ q·c without the 1024·Σq they would then cancel:
//    one HSUB2 per K register for scores that keep their precision when
//    |q| is large (the `smooth` mode scales queries up).
//  * V fragments come from ldmatrix.trans, which pairs the bytes of two
//    keys for free; int8 then needs one byte permute per two values.
//  * int4 codes become halves with one mask each: a nibble at bit 4 of a
//    16-bit half reads as 1024 + 16·c, so such rows carry a factor 16 that
//    the query (K) or the final division (V) removes; no shifts by 4.
//  * Scores are in log2 units (q carries log2 e), so p = ex2(s − m) is one
//    MUFU; the warp-wide max is only reduced when some score exceeds the
//    running max (rare after the first tiles).
//  * Addresses: each lane computes the block-table lookup of one tile once;
//    issuing a tile is a shuffle plus cp.async at base + immediate offsets.
//    The tile's per-token parameters are copied with it (they sit in one
//    segment) and decoded once per tile, one lane per key and tensor.
//  * Each warp streams its tiles through a ring of NS shared-memory stages
//    (tile j + NS − 1 is in flight while tile j is computed).
//
// The fp16 weights B = p·vs are kept in the normal range by a per-warp
// power-of-two factor esc (B = p·vs·esc, removed at the end): when a
// tile's scales would leave [2⁻⁴, 2¹²]·esc⁻¹ the factor is re-chosen and
// the state multiplied by the exact ratio.
//
// Shared-memory rows are padded so that the K reads (keys g and g + 1 of a
// quarter-warp, 16 bytes per lane) and the 8 rows of an ldmatrix hit
// different 16-byte bank groups: V rows by 16 bytes (an odd number of
// chunks), K rows by 16 bytes when a lane reads 32 bytes of a key, not at
// all when it reads 16 or 8 (2-way conflicts remain on int8 K at head_dim
// 256). Every per-lane offset is then a lane-dependent base plus an
// immediate.
// ---------------------------------------------------------------------------

// ldmatrix.x4.trans: four 8×8 matrices of 16-bit elements; lanes 8m..8m+7
// give the row addresses of matrix m, and lane (g, t) receives elements
// (2t, g) and (2t + 1, g) of each (rows 2t and 2t + 1, column g).
__device__ __forceinline__ void ldsm_x4_trans(u32* r, const unsigned char* p) {
#if __CUDA_ARCH__ >= 750
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
#else
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const unsigned long long mine = (unsigned long long)p;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const unsigned char* r0 = (const unsigned char*)__shfl_sync(0xffffffffu, mine, 8 * m + 2 * t);
        const unsigned char* r1 = (const unsigned char*)__shfl_sync(0xffffffffu, mine, 8 * m + 2 * t + 1);
        r[m] = (u32)((const unsigned short*)r0)[g] | ((u32)((const unsigned short*)r1)[g] << 16);
    }
#endif
}

__device__ __forceinline__ float ex2f(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ long long shfl64(long long v, int src) {
    const int lo = __shfl_sync(0xffffffffu, (int)(v & 0xffffffffll), src);
    const int hi = __shfl_sync(0xffffffffu, (int)(v >> 32), src);
    return ((long long)hi << 32) | (unsigned)lo;
}

template <int HD, int DT>
struct Int2Cfg {
    static constexpr int BPT = DT == DT_I8 ? HD : HD / 2;  // bytes per token-head
    static constexpr int CPR = BPT / 16;                    // 16-byte chunks per row
    static constexpr int ZB = DT == DT_I8 ? 1 : 2;          // bytes per stored zero
    static constexpr int PSEG = 32 + 16 * ZB;               // a tile's scales + zeros, one tensor
    // Row strides of the K and V tiles (see the bank-conflict note above)
    // and their sizes (the last row needs no padding).
    static constexpr int RSK = BPT / 4 == 32 ? BPT + 16 : BPT;
    static constexpr int RSV = BPT + 16;
    static constexpr int TK = 15 * RSK + BPT;
    static constexpr int TV = 15 * RSV + BPT;
    static constexpr int POFF = TK + TV;  // params after the K and V rows
    static constexpr int STAGE = POFF + 2 * PSEG;
    static constexpr int RS = HD + 4;
    static constexpr int STATE = 2 * IG + IG * RS;  // floats per warp afterwards
    __device__ static int at_(int g, int d) { return 2 * IG + g * RS + d; }
    template <int NS>
    __device__ static constexpr int warp_bytes() {
        return NS * STAGE + 16 * 16;  // the stages, then 16 decoded float4
    }
    template <int NS>
    __device__ static constexpr int bytes() {
        return WARPS * warp_bytes<NS>() > WARPS * STATE * 4 ? WARPS * warp_bytes<NS>() : WARPS * STATE * 4;
    }
};

// The dim and the factor-16 flag of output row r (0: C elements 0 and 1;
// 1: elements 2 and 3) of m-tile i, for lane group g.
template <int DT>
__device__ __forceinline__ int vdim(int i, int r, int g) {
    if (DT == DT_I8) return 16 * i + 2 * g + r;
    return 32 * (i >> 1) + 4 * g + 2 * (i & 1) + r;
}

// Streaming causal attention over int8 / int4 storage with block_len and
// split_len multiples of 16 and at most 32 tiles per warp and split (the
// host checks both); otherwise the contract, grid and outputs of
// `paged_attn_int`. Warp w takes the tiles w, w + WARPS, … of its split.
template <int HD, int DT, bool STATIC, int NS, bool KC>
__device__ void paged_attn_int2(const float* __restrict__ q, const int* __restrict__ meta, int rows,
                                const unsigned char* __restrict__ data,
                                const unsigned char* __restrict__ params,
                                const float* __restrict__ statics, int layer, int L, int H, int NH,
                                int BL, int split_len, int splits, float softmax_scale,
                                float* __restrict__ out, float* __restrict__ part_ml,
                                float* __restrict__ part_acc, int rows_at,
                                __half* __restrict__ out_h) {
    // Attention feeds o_proj: let it start (see act_f32.cu).
    grid_dep_launch();
    using C = Int2Cfg<HD, DT>;
    constexpr int KS = HD / 16;     // k-steps of K·Qᵀ, m-tiles of Vᵀ·Pᵀ
    constexpr int BPT = C::BPT;
    constexpr int CPR = C::CPR;
    constexpr int KB = BPT / 4;     // K bytes per lane and key
    constexpr int CPL = CPR / 2;    // 16-byte copies per lane, K or V
    constexpr int ZB = C::ZB;
    constexpr float LOG2E = 1.4426950408889634f;
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
    const int ntiles = (end - begin + 15) / 16;
    const int nmine = ntiles > warp ? (ntiles - warp + WARPS - 1) / WARPS : 0;
    const size_t vbytes = (size_t)H * BL * BPT;  // K → V of the same token-head
    const size_t pseg = param_segment_bytes(DT, BL);
    unsigned char* wbase = (unsigned char*)smem + warp * C::template warp_bytes<NS>();
    float4* dec = (float4*)(wbase + NS * C::STAGE);

    // Lane i looks up the block of this warp's tile i once: the byte offset
    // of its first K row, of its K scales, and (relative to those) of its
    // zeros.
    long long my_kb = 0, my_pb = 0;
    int my_zo = 0;
    if (lane < nmine) {
        const int t0 = begin + 16 * (warp + WARPS * lane);
        const int o = t0 % BL;
        const size_t seg = ((size_t)blocks[t0 / BL] * L + layer) * 2 * H + head;
        my_kb = (long long)((seg * BL + o) * BPT);
        my_pb = (long long)(seg * pseg + 2 * o);
        my_zo = 2 * BL + (ZB - 2) * o;
    }

    // Query head g as the B operand of K·Qᵀ, in the order the K unpacking
    // produces dims (as `dim_k`), in log2 units; int4 elements 2 and 3 of a
    // k-step face codes that carry a factor 16 and are divided by 16 here.
    // qs = Σ B (the 1024 offsets), qsum = Σ q (the zero points), for heads
    // 2t and 2t + 1.
    u32 qb[KS][2];
    float qs0, qs1, qsum0, qsum1;
    {
        float qv[HD / 4];
        const float4* qrow = (const float4*)(q + ((size_t)row * NH + qh0 + g) * HD + t * (HD / 4));
#pragma unroll
        for (int i = 0; i < HD / 16; ++i) {
            const float4 v = g < ng ? qrow[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            qv[4 * i] = v.x; qv[4 * i + 1] = v.y; qv[4 * i + 2] = v.z; qv[4 * i + 3] = v.w;
        }
        const float sc = softmax_scale * LOG2E;
        float qs = 0.0f, qsum = 0.0f;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // B exactly as the MMA sees it; the query it stands for is
                // 16·B where the codes carry the factor 16.
                const float d16 = DT == DT_I4 && h == 1 ? 0.0625f : 1.0f;
                const __half2 v = __floats2half2_rn(qv[dim_k<DT>(s, 2 * h)] * sc * d16,
                                                    qv[dim_k<DT>(s, 2 * h + 1)] * sc * d16);
                const float2 f = __half22float2(v);
                qs += f.x + f.y;
                qsum += (f.x + f.y) / d16;
                qb[s][h] = h2_bits(v);
            }
        }
        qs += __shfl_xor_sync(0xffffffffu, qs, 1);
        qs += __shfl_xor_sync(0xffffffffu, qs, 2);
        qsum += __shfl_xor_sync(0xffffffffu, qsum, 1);
        qsum += __shfl_xor_sync(0xffffffffu, qsum, 2);
        qs0 = __shfl_sync(0xffffffffu, qs, 8 * t);
        qs1 = __shfl_sync(0xffffffffu, qs, 8 * t + 4);
        qsum0 = __shfl_sync(0xffffffffu, qsum, 8 * t);
        qsum1 = __shfl_sync(0xffffffffu, qsum, 8 * t + 4);
    }
    // Static parameters: the score is sks·d + cst[h] for every key.
    float sks = 1.0f, cst0 = 0.0f, cst1 = 0.0f, svs = 1.0f, svz = 0.0f;
    if (STATIC) {
        const float* st = statics + ((size_t)layer * 2 * H + head) * 2;
        sks = st[0];
        cst0 = st[1] * qsum0 - (KC ? 0.0f : 1024.0f * st[0] * qs0);
        cst1 = st[1] * qsum1 - (KC ? 0.0f : 1024.0f * st[0] * qs1);
        svs = st[2 * H];
        svz = st[2 * H + 1];
    }

    // Per-lane shared-memory offsets inside a stage. Copies: chunk
    // lane + 32k of the tile is key lane / CPR + k·32 / CPR, chunk
    // lane % CPR, and sits at source offset 16·(lane + 32k).
    const int cdk = (lane / CPR) * C::RSK + 16 * (lane % CPR);
    const int cdv = C::TK + (lane / CPR) * C::RSV + 16 * (lane % CPR);
    // Parameters: lane c < 2·(2 + ZB) copies 16 bytes: scales (2 chunks)
    // then zeros (ZB chunks), K then V.
    constexpr int NPC = 2 * (2 + ZB);
    const int pw = lane / (2 + ZB), pr = lane % (2 + ZB);
    const long long prel = (long long)pw * H * (long long)pseg + (pr < 2 ? 16 * pr : 16 * (pr - 2));
    // K reads: key g (and g + 8), bytes [t·KB, (t+1)·KB).
    const int koff = g * C::RSK + t * KB;
    // ldmatrix rows: lane 8m + r gives row r + 8·(m & 1) of chunk
    // 2p + (m >> 1) (ldmatrix p covers chunks 2p and 2p + 1).
    const int voff = C::TK + ((lane & 7) + 8 * ((lane >> 3) & 1)) * C::RSV + 16 * (lane >> 4);

    auto issue = [&](int jj, unsigned char* st) {
        const unsigned char* src = data + shfl64(my_kb, jj) + 16 * lane;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
            copy16_async(st + cdk + k * (32 / CPR) * C::RSK, src + 512 * k);
            copy16_async(st + cdv + k * (32 / CPR) * C::RSV, src + vbytes + 512 * k);
        }
        if (!STATIC) {
            const long long pb = shfl64(my_pb, jj);
            const int zo = __shfl_sync(0xffffffffu, my_zo, jj);
            if (lane < NPC) copy16_async(st + C::POFF + 16 * lane, params + pb + prel + (pr < 2 ? 0 : zo));
        }
    };

    // Running max (log2 units), Σ p, and the offset sums of the weights:
    // int8: zs = Σ B·(−1024 − zp) (online) or Σ B·(−1024) (static); int4:
    // zb = Σ B and zs = Σ p·vz·esc (online).
    float m[2] = {-LMQ_INF, -LMQ_INF}, l[2] = {0.0f, 0.0f}, zs[2] = {0.0f, 0.0f},
          zb[2] = {0.0f, 0.0f};
    float esc = 1.0f;
    float acc[KS][4];
#pragma unroll
    for (int i = 0; i < KS; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

#pragma unroll
    for (int s = 0; s < NS - 1; ++s) {
        if (s < nmine) issue(s, wbase + s * C::STAGE);
        copy_commit();
    }
    unsigned char* st = wbase;  // the stage of tile j
    for (int j = 0; j < nmine; ++j) {
        // Every lane is done with tile j − 1's stage: refill it.
        __syncwarp();
        {
            const int jj = j + NS - 1;
            unsigned char* sn = wbase + (jj % NS) * C::STAGE;
            if (jj < nmine) issue(jj, sn);
            copy_commit();
        }
        copy_wait(NS - 1);
        __syncwarp();
        const int t0 = begin + 16 * (warp + WARPS * j);
        const bool partial = t0 + 16 > end;

        if (!STATIC) {
            // Decode: lane = key + 16·tensor. K: (ks, kz) with kz the zero
            // (int4) or −zp·ks (int8); V: (vs·esc, −1024 − zp) for int8,
            // (vs·esc, vz·esc) for int4. Keys past the end get zeros, so
            // that whatever their memory holds never reaches the sums.
            const int key = lane & 15, which = lane >> 4;
            const unsigned char* pp = st + C::POFF + which * C::PSEG;
            const float sc = __half2float(((const __half*)pp)[key]);
            const float zr = DT == DT_I8 ? (float)pp[32 + key] : __half2float(((const __half*)(pp + 32))[key]);
            const bool valid = t0 + key < end;
            const float x = sc * esc;
            const bool hi = which == 1 && valid && x >= 4096.0f;
            const bool lo = which == 0 || !valid || x < 0.0625f;
            if (__any_sync(0xffffffffu, hi) || __all_sync(0xffffffffu, lo)) {
                // Re-choose esc so that the largest valid V scale times esc
                // lies in [1, 2); the state follows by the exact ratio.
                float vm = which == 1 && valid ? sc : 0.0f;
#pragma unroll
                for (int o = 1; o < 16; o <<= 1) vm = fmaxf(vm, __shfl_xor_sync(0xffffffffu, vm, o));
                vm = __shfl_sync(0xffffffffu, vm, 16);
                const int e = min(max((__float_as_int(vm) >> 23) & 0xff, 1), 253);
                const float en = __int_as_float((254 - e) << 23);
                const float f = en / esc;
                esc = en;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    zs[h] *= f;
                    zb[h] *= f;
                }
#pragma unroll
                for (int i = 0; i < KS; ++i) {
                    acc[i][0] *= f;
                    acc[i][1] *= f;
                    acc[i][2] *= f;
                    acc[i][3] *= f;
                }
            }
            float a, b;
            if (which == 0) {
                a = sc;
                b = DT == DT_I8 ? -zr * sc : zr;
            } else {
                a = sc * esc;
                b = DT == DT_I8 ? -1024.0f - zr : zr * esc;
            }
            if (!valid) a = b = 0.0f;
            ((float2*)dec)[2 * key + which] = make_float2(a, b);
            __syncwarp();
        }

        // Sᵀ = K·Qᵀ: keys g, g + 8 × heads 2t, 2t + 1.
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        {
            u32 kw[2][KB / 4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if constexpr (KB >= 16) {
#pragma unroll
                    for (int c = 0; c < KB / 16; ++c) {
                        const uint4 u = *(const uint4*)(st + koff + 8 * h * C::RSK + 16 * c);
                        kw[h][4 * c] = u.x; kw[h][4 * c + 1] = u.y; kw[h][4 * c + 2] = u.z; kw[h][4 * c + 3] = u.w;
                    }
                } else {
                    const uint2 u = *(const uint2*)(st + koff + 8 * h * C::RSK);
                    kw[h][0] = u.x; kw[h][1] = u.y;
                }
            }
#pragma unroll
            for (int s = 0; s < KS; ++s) {
                u32 a[4];  // rows g, g + 8; k = 2t, 2t+1 then 2t+8, 2t+9
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if (DT == DT_I8) {
                        a[h] = __byte_perm(kw[h][s], 0x64646464u, 0x4140);
                        a[2 + h] = __byte_perm(kw[h][s], 0x64646464u, 0x4342);
                    } else {
                        const u32 w = kw[h][s / 2] >> (8 * (s % 2));
                        a[h] = (w & 0x000f000fu) | 0x64006400u;
                        a[2 + h] = (w & 0x00f000f0u) | 0x64006400u;
                    }
                    if (KC) {
                        const __half2 k1024 = bits_h2(0x64006400u);
                        a[h] = h2_bits(__hsub2(bits_h2(a[h]), k1024));
                        a[2 + h] = h2_bits(__hsub2(bits_h2(a[2 + h]), k1024));
                    }
                }
                if (s & 1)
                    mma16816(d2, a, qb[s], d2);
                else
                    mma16816(d, a, qb[s], d);
            }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) d[e] += d2[e];

        float4 pg = make_float4(0.0f, 0.0f, 1.0f, 0.0f), pg8 = pg;
        if (!STATIC) {
            pg = dec[g];
            pg8 = dec[g + 8];
        }
        float sc[4];  // (key g, head 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
        {
            const float dq0 = KC ? 0.0f : 1024.0f * qs0, dq1 = KC ? 0.0f : 1024.0f * qs1;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float4 pk = h ? pg8 : pg;
                if (STATIC) {
                    sc[2 * h] = fmaf(sks, d[2 * h], cst0);
                    sc[2 * h + 1] = fmaf(sks, d[2 * h + 1], cst1);
                } else {
                    sc[2 * h] = fmaf(pk.x, d[2 * h] - dq0, pk.y * qsum0);
                    sc[2 * h + 1] = fmaf(pk.x, d[2 * h + 1] - dq1, pk.y * qsum1);
                }
            }
            if (partial) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const bool valid = t0 + g + 8 * h < end;
                    sc[2 * h] = valid ? sc[2 * h] : -LMQ_INF;
                    sc[2 * h + 1] = valid ? sc[2 * h + 1] : -LMQ_INF;
                }
            }
        }
        // The running max moves only when some score exceeds it.
        if (__any_sync(0xffffffffu, fmaxf(sc[0], sc[2]) > m[0] || fmaxf(sc[1], sc[3]) > m[1])) {
            float mx0 = fmaxf(m[0], fmaxf(sc[0], sc[2])), mx1 = fmaxf(m[1], fmaxf(sc[1], sc[3]));
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
            }
            const float c0 = ex2f(m[0] - mx0), c1 = ex2f(m[1] - mx1);
            m[0] = mx0;
            m[1] = mx1;
            l[0] *= c0;
            l[1] *= c1;
            zs[0] *= c0;
            zs[1] *= c1;
            zb[0] *= c0;
            zb[1] *= c1;
#pragma unroll
            for (int i = 0; i < KS; ++i) {
                acc[i][0] *= c0;
                acc[i][1] *= c1;
                acc[i][2] *= c0;
                acc[i][3] *= c1;
            }
        }

        // Weights B = p·vs·esc in fp16 (p alone in static mode), moved into
        // the B operand (head g; keys 2t, 2t+1 and 2t+8, 2t+9).
        u32 pb[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float4 pk = h ? pg8 : pg;
            const float p0 = ex2f(sc[2 * h] - m[0]), p1 = ex2f(sc[2 * h + 1] - m[1]);
            l[0] += p0;
            l[1] += p1;
            const __half2 w = __floats2half2_rn(p0 * pk.z, p1 * pk.z);
            const float2 f = __half22float2(w);
            if (DT == DT_I8) {
                const float off = STATIC ? -1024.0f : pk.w;
                zs[0] = fmaf(f.x, off, zs[0]);
                zs[1] = fmaf(f.y, off, zs[1]);
            } else {
                zb[0] += f.x;
                zb[1] += f.y;
                if (!STATIC) {
                    zs[0] = fmaf(p0, pk.w, zs[0]);
                    zs[1] = fmaf(p1, pk.w, zs[1]);
                }
            }
            pb[h] = transpose8x8(h2_bits(w));
        }

        // Oᵀ += Vᵀ·Pᵀ: ldmatrix p holds chunks 2p and 2p + 1 of keys 0–7 and
        // 8–15 as (keys 2t, 2t + 1) pairs of 16-bit elements.
#pragma unroll
        for (int p = 0; p < CPR / 2; ++p) {
            u32 x[4];  // chunk 2p: keys 0–7, 8–15; chunk 2p + 1: keys 0–7, 8–15
            ldsm_x4_trans(x, st + voff + 32 * p);
#pragma unroll
            for (int cc = 0; cc < 2; ++cc) {
                const u32 lo = x[2 * cc], hi = x[2 * cc + 1];
                if (DT == DT_I8) {
                    // Chunk 2p + cc = dims 16i..16i+15, i = 2p + cc: row g is
                    // dim 16i + 2g (bytes 0, 2), row g + 8 dim 16i + 2g + 1.
                    const int i = 2 * p + cc;
                    const u32 a[4] = {__byte_perm(lo, 0x64646464u, 0x4240), __byte_perm(lo, 0x64646464u, 0x4341),
                                      __byte_perm(hi, 0x64646464u, 0x4240), __byte_perm(hi, 0x64646464u, 0x4341)};
                    mma16816(acc[i], a, pb, acc[i]);
                } else {
                    // Chunk c = 2p + cc = dims 32c..32c+31; each 16-bit
                    // element 4 dims: m-tile 2c + u takes nibbles 2u (row g)
                    // and 2u + 1 (row g + 8, factor 16).
#pragma unroll
                    for (int u = 0; u < 2; ++u) {
                        const int i = 2 * (2 * p + cc) + u;
                        const u32 xl = lo >> (8 * u), xh = hi >> (8 * u);
                        const u32 a[4] = {(xl & 0x000f000fu) | 0x64006400u, (xl & 0x00f000f0u) | 0x64006400u,
                                          (xh & 0x000f000fu) | 0x64006400u, (xh & 0x00f000f0u) | 0x64006400u};
                        mma16816(acc[i], a, pb, acc[i]);
                    }
                }
            }
        }
        st = (j + 1) % NS == 0 ? wbase : st + C::STAGE;
    }
    // Drain the (empty) groups still counted, so no copy outlives the warp.
    copy_wait(0);

    // Per head: the sums over the 8 lanes sharing t.
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], o);
            zs[h] += __shfl_xor_sync(0xffffffffu, zs[h], o);
            zb[h] += __shfl_xor_sync(0xffffffffu, zb[h], o);
        }
    }
    // The states overwrite the stages of other warps: wait for all of them.
    __syncthreads();
    float* mine = smem + warp * C::STATE;
    const float inv = 1.0f / esc;
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
                    // Σ p·v of this dim: remove the offsets, the factor 16
                    // (int4 rows r = 1) and esc, or apply the static pair.
                    const float a = acc[i][2 * r + h];
                    float v;
                    if (DT == DT_I8) {
                        v = STATIC ? svs * (a + zs[h]) + svz * l[h] : (a + zs[h]) * inv;
                    } else {
                        const float n = (a - 1024.0f * zb[h]) * (r ? 0.0625f : 1.0f);
                        v = STATIC ? svs * n + svz * l[h] : (n + zs[h]) * inv;
                    }
                    mine[C::at_(hh, vdim<DT>(i, r, g))] = v;
                }
            }
        }
    }
    __syncthreads();

    // Merge the warps in order: thread e handles (head, dim) pairs. The max
    // is in log2 units; the partial states leave in natural-log units for
    // attn_merge.
    for (int e = threadIdx.x; e < ng * HD; e += blockDim.x) {
        const int gg = e / HD, dd = e % HD;
        float mt = -LMQ_INF;
        for (int w = 0; w < WARPS; ++w) mt = fmaxf(mt, smem[w * C::STATE + gg]);
        float lt = 0.0f, at = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            const float* sw = smem + w * C::STATE;
            if (sw[gg] == -LMQ_INF) continue;
            const float wt = ex2f(sw[gg] - mt);
            lt += sw[IG + gg] * wt;
            at += sw[C::at_(gg, dd)] * wt;
        }
        const size_t qh = (size_t)row * NH + qh0 + gg;
        // Partial states by launch slot (blockIdx.x), not row: a launch over a
        // row list needs them for its own rows only.
        const size_t qp = ((size_t)blockIdx.x * NH + qh0 + gg) * splits + split;
        if (splits == 1) {
            store_out(out, out_h, qh * HD + dd, at / lt);
        } else {
            part_acc[qp * HD + dd] = at;
            if (dd == 0) {
                part_ml[qp * 2] = mt * 0.6931471805599453f;
                part_ml[qp * 2 + 1] = lt;
            }
        }
    }
}
