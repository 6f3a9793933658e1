// The streaming W4A16 decode kernel, an experimental variant of the
// register-pipelined kernel in w4a16.cu, whose helpers (the mma, the
// dequantization of a code word, the weight layout) it uses: the module
// is w4a16.cu followed by this file (kernels/src/nvrtc.rs).

// ---------------------------------------------------------------------------
// Streaming variant (w4a16_stream_g{G}_r{R}_s{NS}; experimental, not the
// default: on an H200 it measured slower than the kernel above, see
// kernels/README.md, v8): the same math and layout,
// but the weight side goes through a per-warp ring of NS shared-memory stages
// filled by cp.async, so the bytes in flight cost no registers and a warp
// keeps NS − 1 k-blocks (1 KB of codes each) loading while it computes.
//
// Why: the register-pipelined kernel above issues all of a warp's loads at
// once, waits a full memory latency, computes, reduces and exits; with
// 128 registers per thread an SM holds 16 such warps, so one launch fills
// the SM and the next launch (even with PDL) cannot start loading until this
// one's blocks leave. Here a launch uses one block of at most 8 warps per SM
// (half the registers, under half the shared memory), so with PDL the next
// linear's blocks become resident beside this one's and stream their
// weights while this one computes its tail, and the memory system never
// drains between linears.
//
// Work split: block b owns the column-tile pairs [b·PPB, (b+1)·PPB) and
// walks them in order; for each pair its S warps split K as above (warp w:
// k-blocks [w·KC, (w+1)·KC)). A warp's stream is the concatenation of its
// K range over the block's pairs, so its ring runs on across pair
// boundaries. At the end of each pair the warps meet at a block barrier,
// add their partial sums in warp order (deterministic, as above) and store
// them; the partial sums alternate between two shared-memory buffers, so
// the barrier of pair p + 1 orders the reuse of pair p's buffer.
//
// Stage layout (bytes): [0, 512) codes of tile a, [512, 1024) codes of
// tile b (lane l's 16 bytes at 16·l, so each lane later reads back exactly
// what it copied), then per group q of the k-block 64 bytes: the 8 fp16
// scales of tile a, of tile b, the 8 biased zeros of tile a, of tile b,
// copied by lanes 4q .. 4q + 3 and read by every lane (hence the
// __syncwarp after the wait).
//
// PDL: every block triggers the dependent launch at its start (the next
// kernel may only touch immutable weights before its own
// griddepcontrol.wait, which still waits for this grid to finish), issues
// its first NS − 1 stages, and only then waits for the previous kernel
// before reading x.

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(gmem_src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <int G>
struct W4StreamStage {
    static constexpr int NGK = 128 / G;
    static constexpr int BYTES = 1024 + NGK * 64;
};

template <int G, int R, int NS>
__device__ __forceinline__ void w4s_body(const __half* __restrict__ x,
                                         const uint4* __restrict__ qw,
                                         const unsigned short* __restrict__ sc,
                                         const unsigned short* __restrict__ zb,
                                         const __half* __restrict__ bias,
                                         void* __restrict__ out, int M, int N, int K, int KB,
                                         int KC, int PPB, int has_bias, int out_f32) {
    constexpr int NGK = 128 / G;
    constexpr int WPG = G / 32;
    constexpr int STAGE = W4StreamStage<G>::BYTES;
    // Independent mma chains per k-block: one per group, at least two.
    constexpr int NC = NGK > 1 ? NGK : 2;
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int nwarps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int ntiles = N >> 3;
    const int npairs = (ntiles + 1) >> 1;
    const int ngroups = K / G;
    const int p0 = blockIdx.x * PPB;
    const int np = min(npairs, p0 + PPB) - p0;
    const int kb0 = warp * KC;
    const int nk = min(KB, kb0 + KC) - kb0;  // >= 1: the host drops empty warps
    const int L = np * nk;
    unsigned char* ring = smem + (size_t)warp * NS * STAGE;
    float* red = reinterpret_cast<float*>(smem + (size_t)nwarps * NS * STAGE);

    grid_dep_launch();

    // Producer: stage j of this warp's stream is k-block kb0 + j % nk of
    // pair p0 + j / nk.
    int ip = 0, ik = 0;  // (pair, k-block) offsets of the next stage to issue
    auto issue = [&](int slot) {
        const int ta = 2 * (p0 + ip);
        const int tb = ta + 1 < ntiles ? ta + 1 : ta;
        const int kb = kb0 + ik;
        unsigned char* dst = ring + slot * STAGE;
        cp_async16(dst + 16 * lane, qw + ((size_t)ta * KB + kb) * 32 + lane);
        cp_async16(dst + 512 + 16 * lane, qw + ((size_t)tb * KB + kb) * 32 + lane);
        if (lane < 4 * NGK) {
            const int q = lane >> 2, part = lane & 3;
            // Groups past K exist only in the padding, whose activations
            // are zero; any finite values will do there.
            const int grp = min(kb * NGK + q, ngroups - 1);
            const unsigned short* src = (part & 2) ? zb : sc;
            cp_async16(dst + 1024 + 64 * q + 16 * part,
                       src + (size_t)grp * N + ((part & 1) ? tb : ta) * 8);
        }
        if (++ik == nk) {
            ik = 0;
            ++ip;
        }
    };
#pragma unroll
    for (int s = 0; s < NS - 1; ++s) {
        if (s < L) issue(s);
        cp_async_commit();
    }

    grid_dep_wait();

    const __half* xr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) xr[r] = x + (size_t)min(g + 8 * r, M - 1) * K + 8 * t;
    // Activations of k-block kb for this lane: chunk i, token half r.
    auto load_x = [&](uint4(&xv)[4][R], int kb) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r)
                xv[i][r] = kb * 128 + 32 * i < K
                               ? ld_produced_v4(reinterpret_cast<const uint4*>(xr[r]) + kb * 16 + i * 4)
                               : make_uint4(0, 0, 0, 0);
    };
    uint4 xn[4][R];
    load_x(xn, kb0);

    float acc[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.0f;

    int slot = 0, jk = 0, jp = 0;  // consumer: ring slot, k-block offset, pair offset
    for (int j = 0; j < L; ++j) {
        cp_async_wait<NS - 2>();
        __syncwarp();
        const unsigned char* st = ring + slot * STAGE;
        const uint4 wa = *reinterpret_cast<const uint4*>(st + 16 * lane);
        const uint4 wb = *reinterpret_cast<const uint4*>(st + 512 + 16 * lane);
        u32 za[NGK], zbv[NGK], sa[NGK], sb[NGK];
#pragma unroll
        for (int q = 0; q < NGK; ++q) {
            const unsigned short* s16 = reinterpret_cast<const unsigned short*>(st + 1024 + 64 * q);
            sa[q] = s16[g];
            sb[q] = s16[8 + g];
            za[q] = s16[16 + g];
            zbv[q] = s16[24 + g];
        }
        // Refill the slot every lane finished reading last iteration (the
        // __syncwarp above orders those reads before these copies).
        if (j + NS - 1 < L) issue(slot == 0 ? NS - 1 : slot - 1);
        cp_async_commit();

        uint4 xv[4][R];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r) xv[i][r] = xn[i][r];
        // Prefetch the next stage's activations (the next k-block, or the
        // warp's first one again when the next stage starts a new pair).
        const bool last_of_pair = jk + 1 == nk;
        if (j + 1 < L) load_x(xn, kb0 + (last_of_pair ? 0 : jk + 1));

        float part[NC][R][4];
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int r = 0; r < R; ++r) part[c][r][0] = part[c][r][1] = part[c][r][2] = part[c][r][3] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int q = i / WPG;
            const int c = NGK > 1 ? q : (i & 1);
            const u32 za1k = __byte_perm(za[q], 0, 0x1010), zb1k = __byte_perm(zbv[q], 0, 0x1010);
            const u32 za64 = hsub2_u32(za1k, 0x63806380u);  // − 960
            const u32 zb64 = hsub2_u32(zb1k, 0x63806380u);
            const u32 w0 = word_of(wa, i), w1 = word_of(wb, i);
            u32 a[4];
            a_frag(a, w0, w1, za1k, zb1k, za64, zb64);
#pragma unroll
            for (int r = 0; r < R; ++r)
                mma_16816(part[c][r], a[0], a[1], a[2], a[3], xv[i][r].x, xv[i][r].y);
            a_frag(a, w0 >> 8, w1 >> 8, za1k, zb1k, za64, zb64);
#pragma unroll
            for (int r = 0; r < R; ++r)
                mma_16816(part[c][r], a[0], a[1], a[2], a[3], xv[i][r].z, xv[i][r].w);
        }
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const int q = NGK > 1 ? c : 0;
            const float s0 = __half2float(__ushort_as_half((unsigned short)sa[q]));
            const float s1 = __half2float(__ushort_as_half((unsigned short)sb[q]));
#pragma unroll
            for (int r = 0; r < R; ++r) {
                acc[r][0] = fmaf(s0, part[c][r][0], acc[r][0]);
                acc[r][1] = fmaf(s0, part[c][r][1], acc[r][1]);
                acc[r][2] = fmaf(s1, part[c][r][2], acc[r][2]);
                acc[r][3] = fmaf(s1, part[c][r][3], acc[r][3]);
            }
        }
        slot = slot + 1 == NS ? 0 : slot + 1;
        jk = last_of_pair ? 0 : jk + 1;
        if (!last_of_pair) continue;

        // End of pair jp: reduce over the warps in order and store. Every
        // warp reaches this barrier once per pair of the block.
        float* rb = red + (jp & 1) * nwarps * 4 * R * 32;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                rb[(warp * 4 * R + 4 * r + c) * 32 + lane] = acc[r][c];
                acc[r][c] = 0.0f;
            }
        __syncthreads();
        const int ta = 2 * (p0 + jp);
        const bool has_b = ta + 1 < ntiles;
        for (int e = tid; e < 32 * 4 * R; e += blockDim.x) {
            const int s = e >> 5, ln = e & 31;
            const int r = s >> 2, c = s & 3;
            const int gg = ln >> 2, tt = ln & 3;
            const int tok = 8 * r + 2 * tt + (c & 1);
            if (tok >= M || (c >= 2 && !has_b)) continue;
            const int col = (c < 2 ? ta : ta + 1) * 8 + gg;
            float v = 0.0f;
            for (int w = 0; w < nwarps; ++w) v += rb[(w * 4 * R + s) * 32 + ln];
            if (has_bias) v += __half2float(bias[col]);
            const size_t idx = (size_t)tok * N + col;
            if (out_f32) reinterpret_cast<float*>(out)[idx] = v;
            else reinterpret_cast<__half*>(out)[idx] = __float2half_rn(v);
        }
        ++jp;
    }
    cp_async_wait<0>();
}

// Entry points: group size, token halves R, ring depth NS. At most 8 warps
// and at most 128 registers (two blocks per SM), so the blocks of two
// consecutive launches fit on one SM together.
#define W4S_ENTRY(GS, R, NS)                                                                \
    extern "C" __global__ void __launch_bounds__(256, 2) w4a16_stream_g##GS##_r##R##_s##NS( \
        const __half* __restrict__ x, const uint4* __restrict__ qw,                        \
        const unsigned short* __restrict__ sc, const unsigned short* __restrict__ zb,      \
        const __half* __restrict__ bias, void* __restrict__ out, int M, int N, int K,      \
        int KB, int KC, int PPB, int has_bias, int out_f32) {                              \
        w4s_body<GS, R, NS>(x, qw, sc, zb, bias, out, M, N, K, KB, KC, PPB, has_bias,      \
                            out_f32);                                                      \
    }

W4S_ENTRY(32, 1, 4)
W4S_ENTRY(32, 2, 4)
W4S_ENTRY(64, 1, 4)
W4S_ENTRY(64, 2, 4)
W4S_ENTRY(128, 1, 4)
W4S_ENTRY(128, 2, 4)
W4S_ENTRY(128, 1, 8)
W4S_ENTRY(128, 2, 8)
