// W4A16 linear for decode: out[M][N] = x[M][K] · W[K][N] (+ bias), M <= 16,
// W 4-bit with a per-(group, column) scale and zero.
//
// Weight layout (written by kernels/src/awq.rs, see kernels/README.md):
//   K is padded up to Kp = 128·KB. The weight is cut into tiles of
//   8 output columns × 128 inputs. Tile (nt, kb) is 512 contiguous bytes,
//   stored at qw[(nt·KB + kb)·32 + lane] as one uint4 per lane of a warp, so
//   one column tile streams contiguously along K. Lane = 4g + t owns column
//   n = 8nt + g; nibble p of its word i holds input
//       k = 128kb + 32i + 8t + 2(p & 3) + (p >> 2)
//   i.e. word i holds 8 consecutive inputs of the 32-input chunk i, the
//   4 lanes t of a column splitting the chunk. Padded inputs have q = 0.
//   sc[grp·N + n] is the fp16 scale and zb[grp·N + n] the fp16 biased zero
//   1024 + z of group grp = k / G (G = 32, 64 or 128, so a word never
//   straddles two groups).
//
// Math ("swapped" tensor-core GEMV): one mma.m16n8k16 takes as A the
// dequantized weights of two column tiles (16 output columns × 16 inputs)
// and as B the activations (16 inputs × 8 tokens), so the 8-wide n side
// carries the M ≤ 8 tokens (M ≤ 16: two mmas share A). The inputs are
// permuted inside each 32-input chunk: A's logical k 2t, 2t+1 of step 2i
// is physical 32i + 8t + {0,1}, 2t+8, 2t+9 is +{2,3}, and step 2i+1 is
// +{4,5}, +{6,7}. The same permutation on B means lane t reads its
// activations as one 16-byte load per chunk (x[32i + 8t .. +8]) whose four
// words are B's registers for steps 2i and 2i+1, and the weight word needs
// no shuffling:
//   (w & 0x000F000F) | 0x64006400 = half2(1024 + q) for inputs +0, +1,
//   (w & 0x00F000F0) | 0x54005400 = half2(64 + q)   for inputs +2, +3,
//   the same of w >> 8 for +4..+7.
// One exact hsub2 with 1024 + z (or 64 + z) gives q − z as fp16 integers,
// the tensor core multiplies exactly and accumulates in fp32 per group, and
// the group's scale multiplies that partial sum once in fp32: no weight is
// rounded.
//
// Work split: block b owns column tiles 2b, 2b+1 (16 outputs); its S warps
// split K into chunks of KC k-blocks (warp w: k-blocks [w·KC, (w+1)·KC)).
// Each warp issues the 16-byte weight loads of U k-blocks (and their scales
// and zeros) at once, double-buffered (the next U k-blocks are loaded
// before this batch is computed), then all its activation loads of those k-blocks
// (through L1: every block reads the same x), then runs the mmas of the U
// k-blocks interleaved (independent accumulators, so the tensor-core
// latency overlaps).
// The S partial sums meet in shared memory and are added in warp order
// (deterministic), plus bias, and stored. No global workspace, no atomics.
//
// Programmatic dependent launch (sm_90): the weights and scales do not
// depend on the previous kernel, so they are loaded before
// `griddepcontrol.wait`; x is read (by `ld_produced_v4`, which the
// compiler cannot hoist above the wait as it did `__ldg`) and out written
// after it. Without the launch attribute the wait returns at once. Each block lets the next
// kernel launch once its own wait has returned, so at most two kernels
// overlap.
//
// Entry points w4a16_gemv_g{G}_r{R}_u{U} (r2: M > 8; see the list at the
// end) with arguments
// (x [M][K] fp16, qw tiles, sc [K/G][N] fp16, zb [K/G][N] fp16, bias [N]
// fp16 (read only if has_bias), out [M][N] fp16 or fp32 (out_f32), M, N, K,
// KB = ceil(K/128), KC, has_bias, out_f32, silu_pairs, out_h, the L2
// prefetch's pf, pf_bytes, pf_chunk, and the deferred norm's res, w, part,
// mode, parts, eps: W4Norm). With
// silu_pairs the layer is a gate/up pair with interleaved tiles and out
// (and out_h, fp16, if not null) is [M][N/2] silu(gate) · up (see the
// end of w4a16_body). Grid ceil(N/16) blocks of
// S·32 threads (S ≤ 16); dynamic shared memory S·32·4·r floats. sm_80+.

__device__ __forceinline__ void mma_16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                          u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (w & MASK) | MAGIC in one lop3.
template <u32 MASK, u32 MAGIC>
__device__ __forceinline__ u32 lop_or(u32 w) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(w), "n"(MASK), "n"(MAGIC));
    return r;
}

__device__ __forceinline__ u32 hsub2_u32(u32 a, u32 b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<u32*>(&r);
}

// Streaming 16-byte load of codes: read once, so kept out of L1. (Plain,
// cache-streaming and L2::256B-prefetch forms measured the same on H200.)
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ u32 word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// A operand of one k16 step from the two tiles' words (already shifted by
// 0 or 8) and the biased zeros (z1k = 1024 + z, z64 = 64 + z, as half2).
__device__ __forceinline__ void a_frag(u32 (&a)[4], u32 wa, u32 wb, u32 za1k, u32 zb1k,
                                       u32 za64, u32 zb64) {
    a[0] = hsub2_u32(lop_or<0x000F000Fu, 0x64006400u>(wa), za1k);
    a[1] = hsub2_u32(lop_or<0x000F000Fu, 0x64006400u>(wb), zb1k);
    a[2] = hsub2_u32(lop_or<0x00F000F0u, 0x54005400u>(wa), za64);
    a[3] = hsub2_u32(lop_or<0x00F000F0u, 0x54005400u>(wb), zb64);
}

// One batch: U k-blocks starting at kb. FULL: all U k-blocks lie below kb1
// and wholly inside K, so no load needs a predicate and every address is a
// base pointer plus an immediate; otherwise (the tail, U = 1) k-blocks past
// kb1 and chunks past K read as zero activations, codes and scales.
// The weight side of one batch: codes, biased zeros and scales of U
// k-blocks for the block's two tiles.
template <int G, int U>
struct W4Stage {
    uint4 wa[U], wb[U];
    u32 za[U][128 / G], zbv[U][128 / G], sa[U][128 / G], sb[U][128 / G];
};

template <int G, int U, bool FULL, int LD>
__device__ __forceinline__ void w4_load(W4Stage<G, U>& st, const uint4* __restrict__ pa,
                                        const uint4* __restrict__ pb,
                                        const unsigned short* __restrict__ sc_a,
                                        const unsigned short* __restrict__ sc_b,
                                        const unsigned short* __restrict__ zb_a,
                                        const unsigned short* __restrict__ zb_b, int kb, int kb1,
                                        int N, int ngroups) {
    constexpr int NGK = 128 / G;  // groups per k-block
    const uint4* qa = pa + (size_t)kb * 32;
    const uint4* qb = pb + (size_t)kb * 32;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const bool ok = FULL || kb + u < kb1;
        st.wa[u] = ok ? ld_stream(qa + u * 32) : make_uint4(0, 0, 0, 0);
        st.wb[u] = ok ? ld_stream(qb + u * 32) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int q = 0; q < NGK; ++q) {
            // Groups past K exist only in the padding, whose activations
            // are zero; any finite values will do there.
            const int grp = FULL ? (kb + u) * NGK + q : min((kb + u) * NGK + q, ngroups - 1);
            const size_t off = (size_t)grp * N;
            st.za[u][q] = ok ? __ldg(zb_a + off) : 0x6400u;
            st.zbv[u][q] = ok ? __ldg(zb_b + off) : 0x6400u;
            st.sa[u][q] = ok ? __ldg(sc_a + off) : 0u;
            st.sb[u][q] = ok ? __ldg(sc_b + off) : 0u;
        }
    }
}

// The activation side and the math of one batch (see w4_load).
template <int G, int R, int U, bool FULL, int LD>
__device__ __forceinline__ void w4_compute(float (&acc)[R][4], const W4Stage<G, U>& st,
                                           const __half* (&xr)[R], int kb, int kb1, int K,
                                           bool& waited) {
    constexpr int WPG = G / 32;   // words (32-input chunks) per group
    constexpr int NGK = 128 / G;  // groups per k-block
    const uint4(&wa)[U] = st.wa;
    const uint4(&wb)[U] = st.wb;
    const u32(&za)[U][NGK] = st.za;
    const u32(&zbv)[U][NGK] = st.zbv;
    const u32(&sa)[U][NGK] = st.sa;
    const u32(&sb)[U][NGK] = st.sb;
    if (!waited) {
        grid_dep_wait();
        grid_dep_launch();
        waited = true;
    }
    // This lane's activations of the whole batch: chunk i of k-block
    // kb + u, tokens g (and g + 8). K is a multiple of 32, so a chunk is
    // wholly in or out of K.
    uint4 xv[U][4][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int k = (kb + u) * 128 + 32 * i;
                const bool in = FULL || (kb + u < kb1 && k < K);
                xv[u][i][r] = in ? ld_produced_v4(reinterpret_cast<const uint4*>(xr[r] + (size_t)kb * 128) + u * 16 + i * 4)
                                 : make_uint4(0, 0, 0, 0);
            }
    if (LD == 9) {
        // Memory probe (bench only, wrong results): the same loads, no math.
        u32 h = 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            h ^= wa[u].x ^ wa[u].y ^ wa[u].z ^ wa[u].w ^ wb[u].x ^ wb[u].y ^ wb[u].z ^ wb[u].w;
#pragma unroll
            for (int i = 0; i < 4; ++i) h ^= xv[u][i][0].x ^ xv[u][i][0].w;
#pragma unroll
            for (int q = 0; q < NGK; ++q) h ^= za[u][q] ^ zbv[u][q] ^ sa[u][q] ^ sb[u][q];
        }
        acc[0][0] += __uint_as_float((h & 0x007FFFFFu) | 0x3F800000u);
        return;
    }
    // One accumulator per (k-block, group, token half): U·NGK·R
    // independent mma chains of 2·WPG steps, interleaved below.
    float part[U][NGK][R][4];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int q = 0; q < NGK; ++q)
#pragma unroll
            for (int r = 0; r < R; ++r) part[u][q][r][0] = part[u][q][r][1] = part[u][q][r][2] = part[u][q][r][3] = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = i / WPG;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u32 za1k = __byte_perm(za[u][q], 0, 0x1010), zb1k = __byte_perm(zbv[u][q], 0, 0x1010);
            const u32 za64 = hsub2_u32(za1k, 0x63806380u);  // − 960
            const u32 zb64 = hsub2_u32(zb1k, 0x63806380u);
            const u32 w0 = word_of(wa[u], i), w1 = word_of(wb[u], i);
            u32 a[4];
            a_frag(a, w0, w1, za1k, zb1k, za64, zb64);
#pragma unroll
            for (int r = 0; r < R; ++r)
                mma_16816(part[u][q][r], a[0], a[1], a[2], a[3], xv[u][i][r].x, xv[u][i][r].y);
            a_frag(a, w0 >> 8, w1 >> 8, za1k, zb1k, za64, zb64);
#pragma unroll
            for (int r = 0; r < R; ++r)
                mma_16816(part[u][q][r], a[0], a[1], a[2], a[3], xv[u][i][r].z, xv[u][i][r].w);
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int q = 0; q < NGK; ++q) {
            const float s0 = __half2float(__ushort_as_half((unsigned short)sa[u][q]));
            const float s1 = __half2float(__ushort_as_half((unsigned short)sb[u][q]));
#pragma unroll
            for (int r = 0; r < R; ++r) {
                acc[r][0] = fmaf(s0, part[u][q][r][0], acc[r][0]);
                acc[r][1] = fmaf(s0, part[u][q][r][1], acc[r][1]);
                acc[r][2] = fmaf(s1, part[u][q][r][2], acc[r][2]);
                acc[r][3] = fmaf(s1, part[u][q][r][3], acc[r][3]);
            }
        }
}

// This block's share of an L2 prefetch of pf[0 .. pf_bytes) in chunks of
// pf_chunk bytes (a multiple of 16), by one warp: with C chunks and B
// blocks, the last C blocks take one chunk each (block B − C + c takes
// chunk c), or with C > B block b takes chunks b, b + B, …. The last
// blocks are the last to run, so their prefetches land just before the
// next launch reads. A prefetch changes no data.
__device__ __forceinline__ void l2_prefetch_share(const char* __restrict__ pf, u64 pf_bytes,
                                                  u32 pf_chunk, int lane) {
    const u64 chunks = (pf_bytes + pf_chunk - 1) / pf_chunk;
    const u64 blocks = gridDim.x, b = blockIdx.x;
    u64 c = chunks <= blocks ? b + chunks : b;
    if (chunks <= blocks) {
        if (c < blocks) return;
        c -= blocks;
    }
    for (; c < chunks; c += blocks) {
        const u64 off = c * pf_chunk;
        const u64 n = pf_bytes - off < pf_chunk ? pf_bytes - off : pf_chunk;
#if __CUDA_ARCH__ >= 900
        const u32 size = (u32)(n & ~(u64)15);
        if (lane == 0 && size != 0)
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(pf + off), "r"(size)
                         : "memory");
#else
        for (u64 o = 128 * (u64)lane; o < n; o += 128 * 32)
            asm volatile("prefetch.global.L2 [%0];\n" ::"l"(pf + off + o));
#endif
    }
}

// The deferred RMSNorm of a decode step (kernels/SESSIONS.md, "Deferred
// norm"). A norm between two linears is split over them:
//   W4_NORM_ADD (the linear before the norm, o_proj or down_proj): each
//     output v is added to the fp32 residual in place (r = res + v, as
//     add_rms_norm_f32), `out` (fp16) gets fp16(r · w[col] · scale), and
//     each block stores the sum of r² over its 16 columns of each row in
//     part[row · gridDim.x + block];
//   W4_NORM_SCALE (each linear after it, whose x is that fp16(r · w ·
//     2^-k)): every output is multiplied by scale / sqrt(Σ part[row][0 ..
//     parts) / K + eps), scale = 2^k, before the bias (and before SiLU·mul),
//     which is the norm's factor since a linear is linear in its input
//     (deferred_norm_factor in common.cuh, as deferred_norm_values_f32
//     forms it).
// One launch fewer per norm. The linear after the norm multiplies by the
// factor after its fp32 sums instead of reading fp16(r · factor · w): the
// rounding differs within fp16's. The power of two 2^-k (k from the
// weight's largest magnitude, 0 when it is at most 1) keeps |r · w · 2^-k|
// at most |r|, so fp16 holds it whenever the residual fits fp16 (as fp16
// inference of the model needs anyway); it is exact, so k = 0 and k > 0
// round alike. Blocks own whole columns, so the in-place add races with
// nothing.
#define W4_NORM_OFF 0
#define W4_NORM_ADD 1
#define W4_NORM_SCALE 2
struct W4Norm {
    float* res;        // [M][N] fp32 residual (ADD)
    const float* w;    // [N] norm weight (ADD)
    float* part;       // [M][parts] partial sums of squares (ADD writes, SCALE reads)
    int mode, parts;
    float eps;         // (SCALE)
    float scale;       // 2^-k (ADD) or 2^k (SCALE)
};
#define W4_NORM_PARAMS                                                                    \
    float *__restrict__ norm_res, const float *__restrict__ norm_w,                      \
        float *__restrict__ norm_part, int norm_mode, int norm_parts, float norm_eps,    \
        float norm_scale
#define W4_NORM_ARGS \
    W4Norm{norm_res, norm_w, norm_part, norm_mode, norm_parts, norm_eps, norm_scale}

template <int G, int R, int U, int LD, bool EARLY = false>
__device__ __forceinline__ void w4a16_body(
    const __half* __restrict__ x, const uint4* __restrict__ qw,
    const unsigned short* __restrict__ sc, const unsigned short* __restrict__ zb,
    const __half* __restrict__ bias, void* __restrict__ out, int M, int N, int K, int KB,
    int KC, int has_bias, int out_f32, int silu_pairs, __half* __restrict__ out_h,
    const char* __restrict__ pf, u64 pf_bytes, u32 pf_chunk, const W4Norm& nrm) {
    constexpr int NGK = 128 / G;
    extern __shared__ float red[];
    // The deferred norm's per-row factors (consumer) or the block's squares
    // (producer); see W4Norm.
    __shared__ float norm_sq[16 * 16], norm_inv[16];
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int nwarps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int ntiles = N >> 3;
    const int ngroups = K / G;
    const int ta = blockIdx.x * 2;
    const bool has_b = ta + 1 < ntiles;
    const int tb = has_b ? ta + 1 : ta;
    const int col_a = ta * 8 + g, col_b = tb * 8 + g;
    const uint4* pa = qw + (size_t)ta * KB * 32 + lane;
    const uint4* pb = qw + (size_t)tb * KB * 32 + lane;
    const __half* xr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) xr[r] = x + (size_t)min(g + 8 * r, M - 1) * K + 8 * t;
    const int kb0 = warp * KC;
    const int kb1 = min(KB, kb0 + KC);
    // Last k-block wholly inside K, plus one.
    const int kb_full = min(kb1, K / 128);

    float acc[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.0f;

    // EARLY: let the next launch start at once (it touches only weights
    // before its own wait), so that, when this launch leaves room on the
    // SMs (few warps per block), its blocks load their weights beside ours.
    if (EARLY) grid_dep_launch();
    bool waited = false;
    int kb = kb0;
    const unsigned short *sc_a = sc + col_a, *sc_b = sc + col_b;
    const unsigned short *zb_a = zb + col_a, *zb_b = zb + col_b;
    if (kb + U <= kb_full) {
        // Full batches, double-buffered: the next batch's weights are in
        // flight while this one is computed.
        W4Stage<G, U> s0, s1;
        w4_load<G, U, true, LD>(s0, pa, pb, sc_a, sc_b, zb_a, zb_b, kb, kb1, N, ngroups);
        while (true) {
            const bool more = kb + 2 * U <= kb_full;
            if (more) w4_load<G, U, true, LD>(s1, pa, pb, sc_a, sc_b, zb_a, zb_b, kb + U, kb1, N, ngroups);
            w4_compute<G, R, U, true, LD>(acc, s0, xr, kb, kb1, K, waited);
            kb += U;
            if (!more) break;
            const bool more2 = kb + 2 * U <= kb_full;
            if (more2) w4_load<G, U, true, LD>(s0, pa, pb, sc_a, sc_b, zb_a, zb_b, kb + U, kb1, N, ngroups);
            w4_compute<G, R, U, true, LD>(acc, s1, xr, kb, kb1, K, waited);
            kb += U;
            if (!more2) break;
        }
    }
    for (; kb < kb1; ++kb) {
        W4Stage<G, 1> st;
        w4_load<G, 1, false, LD>(st, pa, pb, sc_a, sc_b, zb_a, zb_b, kb, kb1, N, ngroups);
        w4_compute<G, R, 1, false, LD>(acc, st, xr, kb, kb1, K, waited);
    }
    (void)NGK;
    // Warp 0 has read its share of the weights: the last blocks to run
    // now ask L2 for the start of the next linear's codes, so that DRAM
    // keeps streaming while this launch drains and the next one ramps up.
    if (warp == 0 && pf_bytes != 0) l2_prefetch_share(pf, pf_bytes, pf_chunk, lane);
    if (!waited) {
        grid_dep_wait();
        grid_dep_launch();
    }

    // C fragment of lane (g, t): [r][0..1] = column col_a, tokens 8r + 2t + {0,1};
    // [r][2..3] = column col_b, same tokens. Reduce over warps in order.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[(warp * 4 * R + 4 * r + c) * 32 + lane] = acc[r][c];
    if (nrm.mode == W4_NORM_SCALE) {
        // 1 / rms of each row from the producer's partial sums of squares:
        // one warp per row adds them in a fixed order (lane-strided, then a
        // butterfly; lane 0's result), so that every block of this launch
        // (and every launch reading these partials) gets the same factor.
        for (int tok = warp; tok < M; tok += nwarps) {
            const float f = deferred_norm_factor(nrm.part + (size_t)tok * nrm.parts, nrm.parts, K,
                                                 nrm.eps, nrm.scale, lane);
            if (lane == 0) norm_inv[tok] = f;
        }
    } else if (nrm.mode == W4_NORM_ADD) {
        for (int i = tid; i < 16 * 16; i += blockDim.x) norm_sq[i] = 0.0f;
    }
    __syncthreads();
    if (silu_pairs) {
        // Tiles 2b and 2b + 1 hold gate and up outputs 8b .. 8b + 7 of a
        // stacked gate/up layer interleaved by PackedW4::interleave_halves:
        // store silu(gate) · up at output 8b + g of the N/2 wide result
        // (and its fp16 copy in out_h, if given), from the same sums, in
        // the same order and by the same expression as this kernel's plain
        // store followed by silu_mul_halves_f32, so the bits are the same.
        const int half_n = N >> 1;
        for (int e = tid; e < 32 * 2 * R; e += blockDim.x) {
            const int s = e >> 5, ln = e & 31;
            const int r = s >> 1, c = s & 1;
            const int gg = ln >> 2, tt = ln & 3;
            const int tok = 8 * r + 2 * tt + c;
            if (tok >= M) continue;
            float vg = 0.0f, vu = 0.0f;
            for (int w = 0; w < nwarps; ++w) vg += red[(w * 4 * R + 4 * r + c) * 32 + ln];
            for (int w = 0; w < nwarps; ++w) vu += red[(w * 4 * R + 4 * r + c + 2) * 32 + ln];
            if (nrm.mode == W4_NORM_SCALE) {
                vg *= norm_inv[tok];
                vu *= norm_inv[tok];
            }
            if (has_bias) {
                vg += __half2float(bias[ta * 8 + gg]);
                vu += __half2float(bias[(ta + 1) * 8 + gg]);
            }
            const float y = vg / (1.0f + expf(-vg)) * vu;
            const size_t idx = (size_t)tok * half_n + blockIdx.x * 8 + gg;
            if (out_f32) reinterpret_cast<float*>(out)[idx] = y;
            else reinterpret_cast<__half*>(out)[idx] = __float2half_rn(y);
            if (out_h != nullptr) out_h[idx] = __float2half_rn(y);
        }
        return;
    }
    for (int e = tid; e < 32 * 4 * R; e += blockDim.x) {
        const int s = e >> 5, ln = e & 31;
        const int r = s >> 2, c = s & 3;
        const int gg = ln >> 2, tt = ln & 3;
        const int tok = 8 * r + 2 * tt + (c & 1);
        if (tok >= M || (c >= 2 && !has_b)) continue;
        const int col = (c < 2 ? ta : ta + 1) * 8 + gg;
        float v = 0.0f;
        for (int w = 0; w < nwarps; ++w) v += red[(w * 4 * R + s) * 32 + ln];
        if (nrm.mode == W4_NORM_SCALE) v *= norm_inv[tok];
        if (has_bias) v += __half2float(bias[col]);
        const size_t idx = (size_t)tok * N + col;
        if (nrm.mode == W4_NORM_ADD) {
            // The residual add of add_rms_norm_f32 (the same fp32 sum), the
            // input of the next linear before its row factor, fp16(r · w ·
            // 2^-k), and r² for this block's partial sum.
            const float r = ld_produced_f32(nrm.res + idx) + v;
            nrm.res[idx] = r;
            reinterpret_cast<__half*>(out)[idx] = __float2half_rn(r * nrm.w[col] * nrm.scale);
            norm_sq[tok * 16 + (c < 2 ? 0 : 8) + gg] = r * r;
            continue;
        }
        if (out_f32) reinterpret_cast<float*>(out)[idx] = v;
        else reinterpret_cast<__half*>(out)[idx] = __float2half_rn(v);
    }
    if (nrm.mode == W4_NORM_ADD) {
        // This block's 16 columns of each row, added in column order.
        __syncthreads();
        if (tid < M) {
            float s = 0.0f;
            for (int i = 0; i < 16; ++i) s += norm_sq[tid * 16 + i];
            nrm.part[(size_t)tid * gridDim.x + blockIdx.x] = s;
        }
    }
}

// Entry points per group size, token-half count R and batch depth U
// (k-blocks whose loads are in flight together; the host picks U).
#define W4_ENTRY_LD(GS, R, U, LD, NAME)                                                     \
    extern "C" __global__ void __launch_bounds__(512) NAME(                                 \
        const __half* __restrict__ x, const uint4* __restrict__ qw,                        \
        const unsigned short* __restrict__ sc, const unsigned short* __restrict__ zb,      \
        const __half* __restrict__ bias, void* __restrict__ out, int M, int N, int K,      \
        int KB, int KC, int has_bias, int out_f32, int silu_pairs,                         \
        __half* __restrict__ out_h, const char* __restrict__ pf, u64 pf_bytes,             \
        u32 pf_chunk, W4_NORM_PARAMS) {                                                    \
        w4a16_body<GS, R, U, LD>(x, qw, sc, zb, bias, out, M, N, K, KB, KC, has_bias,      \
                                 out_f32, silu_pairs, out_h, pf, pf_bytes, pf_chunk,       \
                                 W4_NORM_ARGS);                                            \
    }
#define W4_ENTRY(GS, R, U) W4_ENTRY_LD(GS, R, U, 0, w4a16_gemv_g##GS##_r##R##_u##U)
// Early-trigger entries (see EARLY in w4a16_body), group size 128 only.
#define W4_ENTRY_E(GS, R, U)                                                                \
    extern "C" __global__ void __launch_bounds__(512) w4a16_gemv_g##GS##_r##R##_u##U##_e(  \
        const __half* __restrict__ x, const uint4* __restrict__ qw,                        \
        const unsigned short* __restrict__ sc, const unsigned short* __restrict__ zb,      \
        const __half* __restrict__ bias, void* __restrict__ out, int M, int N, int K,      \
        int KB, int KC, int has_bias, int out_f32, int silu_pairs,                         \
        __half* __restrict__ out_h, const char* __restrict__ pf, u64 pf_bytes,             \
        u32 pf_chunk, W4_NORM_PARAMS) {                                                    \
        w4a16_body<GS, R, U, 0, true>(x, qw, sc, zb, bias, out, M, N, K, KB, KC, has_bias, \
                                      out_f32, silu_pairs, out_h, pf, pf_bytes, pf_chunk,  \
                                      W4_NORM_ARGS);                                       \
    }

W4_ENTRY(32, 1, 1)
W4_ENTRY(32, 1, 2)
W4_ENTRY(32, 2, 1)
W4_ENTRY(64, 1, 2)
W4_ENTRY(64, 1, 4)
W4_ENTRY(64, 2, 1)
W4_ENTRY(64, 2, 2)
W4_ENTRY(128, 1, 2)
W4_ENTRY(128, 1, 4)
W4_ENTRY(128, 2, 1)
W4_ENTRY(128, 2, 2)
W4_ENTRY_E(128, 1, 2)
W4_ENTRY_E(128, 2, 1)

// Memory-only probes (LD = 9: the same loads, no math, wrong results; the
// bench uses them to split load time from math time).
W4_ENTRY_LD(128, 1, 2, 9, w4a16_gemv_g128_r1_u2_probe)
W4_ENTRY_LD(128, 1, 4, 9, w4a16_gemv_g128_r1_u4_probe)
