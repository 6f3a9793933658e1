// W4A16 prefill GEMM on Hopper (sm_90a), warp-specialized: the same tile,
// fragments and arithmetic as w4_gemm_sm90.cu (this file is compiled after
// it, in the same module, and uses its helpers), with the data movement
// taken off the compute warps.
//
// Why: the first kernel's warps copy the activations (cp.async), load the
// codes, dequantize and issue the wgmmas themselves, and meet at a
// block-wide barrier every 64 inputs, so the tensor cores idle while both
// warpgroups wait there. It reached 0.55–0.61× of cuBLAS.
//
// Block: three warpgroups (384 threads) for 128 output channels × 256
// tokens.
// - Warpgroup 0 is the producer. It gives up registers (setmaxnreg) and one
//   thread issues every copy: per 128-input stage, the activations as two
//   TMA boxes of 64 inputs × 256 tokens (the tensor map's 128-byte swizzle
//   is the layout wgmma's descriptor names; tokens past M arrive as zeros),
//   the 16 tiles' 512-byte code blocks and the stage's scales and biased
//   zeros by bulk copies, all counted on the stage's `full` mbarrier. The
//   `wst` entries (the default) bring the code blocks as one 3-D TMA box
//   of the codes' tensor map instead: that thread's issue time per stage
//   (about 290 instructions with 16 bulk copies) had come close to a
//   stage's compute time, and the kernel gained 4–5% at 2048 rows (H100,
//   session 17).
// - Warpgroups 1 and 2 compute channels 64w .. 64w + 63 (w = 0, 1), as in
//   the first kernel: each waits on `full`, reads its lane's code words and
//   scales from shared memory, transposes the words within the quad, and
//   per k16 step builds A in registers and issues one m64n256k16 wgmma,
//   two in flight (two sets of A registers). Once the first wgmma of stage
//   s is issued and the one before it has completed, every wgmma of stage
//   s − 1 has, so each warp then arrives on that stage's `empty` mbarrier
//   and the producer may refill it.
// Nothing waits at a block-wide barrier inside the main loop.
//
// Shared memory, NST stages of 73 KB: x (two 32 KB halves, 1024-byte
// aligned for the swizzle), codes (16 × 512 bytes), scales (2 × 256 bytes)
// then biased zeros (2 × 256 bytes). The epilogue stages through stage 0.
//
// Split-K (grid z > 1, single CTAs only): where the output tiles alone
// would leave most SMs idle (a 4096-wide layer up to 512 rows makes 64
// blocks or fewer on 132 SMs), block z takes stages z·kb_split .. +
// kb_split − 1 of every tile (the last split may have fewer). Each block
// stores its fp32 partial tile in `part`, and the last of a tile's blocks
// to finish (a counter per tile, zeroed by the host for each launch) adds
// the partials in split order, 0 first, and stores the tile as the plain
// kernel does: the sum's order does not depend on which block comes last,
// so the bits are the same on every run.
//
// Needs K a multiple of 128 and of the group size, N a multiple of 128, x
// 16-byte aligned with rows of K halves (the host encodes the tensor map
// and checks); otherwise the host takes another path.
#line 52 "w4_gemm_ws.cu"

#define W4W_NST 3
#define W4W_X_BYTES (W4G_BN * 128)                 // one 64-input half of x
#define W4W_CODE_BYTES (16 * 512)                  // 16 tiles × one k-block
#define W4W_SZ_BYTES 1024                          // 2 groups' scales, then zeros
#define W4W_STAGE_BYTES (2 * W4W_X_BYTES + W4W_CODE_BYTES + W4W_SZ_BYTES)
#define W4W_SMEM (1024 + W4W_NST * W4W_STAGE_BYTES)
// Registers per thread after the split: the producer's 128 threads keep 40,
// the 256 compute threads get 232 (128·40 + 256·232 ≤ 65536).
#define W4W_PRODUCER_REGS 40
#define W4W_COMPUTE_REGS 232

// A CUtensorMap, passed by value as a __grid_constant__ parameter (TMA
// reads it from parameter space).
struct __align__(128) W4wTensorMap {
    unsigned long long opaque[16];
};

#ifdef W4G_WGMMA
__device__ __forceinline__ void w4w_bar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// One arrival that also raises the phase's expected transaction bytes.
__device__ __forceinline__ void w4w_bar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void w4w_bar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One try_wait on the phase of parity %2 of the barrier at %1, %0 = 1 once
// it has completed; SEM is empty (acquire at CTA scope) or a scope.
#define W4W_TRY_WAIT(SEM)                                                  \
    "{\n"                                                                  \
    ".reg .pred p;\n"                                                      \
    "mbarrier.try_wait.parity" SEM ".shared::cta.b64 p, [%1], %2;\n"       \
    "selp.u32 %0, 1, 0, p;\n"                                              \
    "}\n"
// Returns once the phase of parity `parity` has completed; CLUSTER_SCOPE
// acquires at cluster scope (for arrivals that may come from the other
// CTA of a pair).
template <bool CLUSTER_SCOPE = false>
__device__ __forceinline__ void w4w_bar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        if (CLUSTER_SCOPE)
            asm volatile(W4W_TRY_WAIT(".acquire.cluster") : "=r"(done) : "r"(bar), "r"(parity) : "memory");
        else
            asm volatile(W4W_TRY_WAIT("") : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}
// A 2-D TMA box (inner coordinate k, outer coordinate token) into shared
// memory, completing on `bar`.
__device__ __forceinline__ void w4w_tma_2d(u32 dst, const W4wTensorMap* map, int k, int tok, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
        "%3}], [%4];\n" ::"r"(dst),
        "l"((u64)map), "r"(k), "r"(tok), "r"(bar)
        : "memory");
}
// A 3-D TMA box (coordinates c0 innermost .. c2) into shared memory,
// completing on `bar`.
__device__ __forceinline__ void w4w_tma_3d(u32 dst, const W4wTensorMap* map, int c0, int c1, int c2, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
        "%3, %4}], [%5];\n" ::"r"(dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
// The same box written into the same offsets of every CTA of the cluster
// in `mask`, completing on each one's barrier at offset `bar`.
__device__ __forceinline__ void w4w_tma_2d_multicast(u32 dst, const W4wTensorMap* map, int k, int tok,
                                                     u32 bar, unsigned short mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
        "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"((u64)map), "r"(k), "r"(tok), "r"(bar), "h"(mask)
        : "memory");
}
// The shared::cluster address of offset `addr` in cluster CTA `rank`.
__device__ __forceinline__ u32 w4w_map_to(u32 addr, u32 rank) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
    return remote;
}
// An arrival on the barrier at shared::cluster address `remote` (release at
// cluster scope: this CTA's reads of its stage come first).
__device__ __forceinline__ void w4w_bar_arrive_remote(u32 remote) {
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}
// Every thread of both CTAs of the cluster.
__device__ __forceinline__ void w4w_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) global →
// shared, completing on `bar`.
__device__ __forceinline__ void w4w_bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
            dst),
        "l"(src), "r"(bytes), "r"(bar)
        : "memory");
}

// Split-K: this block's partial tile (acc, thread ct of the 256 compute
// threads) into `part` [split][tile][128 accumulators][256 threads]; then,
// if this is the tile's last block, acc becomes the sum of all the
// partials in split order and true is returned (the caller stores it);
// otherwise false (the block is done). Called by the compute threads only.
__device__ __forceinline__ bool w4w_split_reduce(float (&acc)[128], float* __restrict__ part,
                                                 unsigned* __restrict__ count, int ct) {
    __shared__ unsigned w4w_is_last;
    const unsigned tiles = gridDim.x * gridDim.y, tile = blockIdx.y * gridDim.x + blockIdx.x;
    const unsigned splits = gridDim.z, split = blockIdx.z;
    const size_t tile_words = 128 * 256;
    float* mine = part + ((size_t)split * tiles + tile) * tile_words + ct;
#pragma unroll
    for (int i = 0; i < 128; ++i) __stcg(mine + 256 * i, acc[i]);
    // Each thread's partials are visible device-wide before the count
    // that announces them (the threadFenceReduction pattern).
    __threadfence();
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    if (ct == 0) w4w_is_last = atomicAdd(count + tile, 1u) == splits - 1;
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
    if (!w4w_is_last) return false;
    __threadfence();
    // Split 0's partial, then each next one added: this block's own comes
    // back from L2 like the others (the same value it stored), so the
    // order of the sum is fixed and the accumulators stay in registers.
    const float* tile0 = part + (size_t)tile * tile_words + ct;
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = __ldcg(tile0 + 256 * i);
    for (unsigned z = 1; z < splits; ++z) {
        const float* pz = tile0 + (size_t)z * tiles * tile_words;
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] += __ldcg(pz + 256 * i);
    }
    return true;
}
#endif

template <int G, int CLUSTER, bool CODES_TMA>
__device__ __forceinline__ void w4_gemm_ws_body(const W4wTensorMap* xmap, const W4wTensorMap* cmap,
                                                const unsigned char* __restrict__ qw,
                                                const __half* __restrict__ sc, const __half* __restrict__ zb,
                                                void* __restrict__ out, int M, int N, int KB, int out_f32,
                                                float* __restrict__ part, unsigned* __restrict__ count,
                                                int kb_split) {
#ifdef W4G_WGMMA
    extern __shared__ unsigned char w4w_smem[];
    // full[b] at bars + 8b, empty[b] at bars + 8(NST + b).
    __shared__ __align__(8) u64 w4w_bars[2 * W4W_NST];
    const u32 smem0 = (u32)__cvta_generic_to_shared(w4w_smem);
    const u32 base = (smem0 + 1023u) & ~1023u;
    const u32 bars = (u32)__cvta_generic_to_shared(w4w_bars);
    const int tid = threadIdx.x, wg = tid >> 7;
    const int n0 = blockIdx.x * W4G_BM, m0 = blockIdx.y * W4G_BN;
    // One k-block of 128 inputs per stage: this block's k-blocks kb0 ..
    // kb0 + stages − 1 (all of them without split-K; the host makes every
    // split non-empty).
    const int kb0 = CLUSTER == 1 ? (int)blockIdx.z * kb_split : 0;
    const int stages = CLUSTER == 1 && gridDim.z > 1 ? min(kb_split, KB - kb0) : KB;

    // With CLUSTER 2, CTA `rank` of a pair (adjacent channel blocks, the
    // same tokens) loads tokens 128·rank .. + 127 of each x box for both.
    const u32 rank = CLUSTER == 2 ? (blockIdx.x & 1) : 0;

    if (tid == 0) {
        for (int b = 0; b < W4W_NST; ++b) {
            w4w_bar_init(bars + 8 * b, 1);                          // the producer's arrival + bytes
            w4w_bar_init(bars + 8 * (W4W_NST + b), 8 * CLUSTER);   // one per compute warp of the cluster
        }
        // The initialized barriers visible to the async proxy (TMA) and
        // to the other CTA.
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (CLUSTER == 2)
        w4w_cluster_sync();  // the peer's barriers exist before anything lands there
    else
        __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(W4W_PRODUCER_REGS));
        if (tid == 0) {
            constexpr int GROUPS = 128 / G;  // groups per stage: 1 or 2
            const u32 tx = 2 * W4W_X_BYTES + W4W_CODE_BYTES + GROUPS * 2 * 256;
            const unsigned char* codes = qw + (size_t)(n0 / 8) * KB * 512;
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)xmap) : "memory");
            if (CODES_TMA) asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)cmap) : "memory");
            for (int s = 0; s < stages; ++s) {
                const int b = s % W4W_NST;
                const u32 full = bars + 8 * b;
                // Use u of this buffer needs use u − 1 released (by both
                // CTAs' compute warps with CLUSTER 2: this CTA's copies of
                // x land in the peer's buffer too).
                if (s >= W4W_NST) {
                    const u32 empty = bars + 8 * (W4W_NST + b), parity = ((s / W4W_NST) & 1) ^ 1;
                    w4w_bar_wait<CLUSTER == 2>(empty, parity);
                }
                const u32 st = base + b * W4W_STAGE_BYTES;
                // The whole stage's bytes are expected here, the peer's
                // half of x included.
                w4w_bar_expect(full, tx);
                if (CLUSTER == 2) {
                    const u32 half = rank * (W4W_X_BYTES / 2);
                    const int tok = m0 + (W4G_BN / 2) * rank;
                    w4w_tma_2d_multicast(st + half, xmap, s * 128, tok, full, 3);
                    w4w_tma_2d_multicast(st + W4W_X_BYTES + half, xmap, s * 128 + 64, tok, full, 3);
                } else {
                    w4w_tma_2d(st, xmap, (kb0 + s) * 128, m0, full);
                    w4w_tma_2d(st + W4W_X_BYTES, xmap, (kb0 + s) * 128 + 64, m0, full);
                }
                if (CODES_TMA) {
                    // One box of the codes' map (512 bytes × one k-block ×
                    // 16 tiles) lands as the 16 tiles' blocks side by side:
                    // one instruction instead of 16 bulk copies.
                    w4w_tma_3d(st + 2 * W4W_X_BYTES, cmap, 0, kb0 + s, n0 / 8, full);
                } else {
#pragma unroll 4
                    for (int i = 0; i < 16; ++i)
                        w4w_bulk(st + 2 * W4W_X_BYTES + 512 * i, codes + ((size_t)i * KB + kb0 + s) * 512, 512,
                                 full);
                }
                const u32 sz = st + 2 * W4W_X_BYTES + W4W_CODE_BYTES;
#pragma unroll
                for (int q = 0; q < GROUPS; ++q) {
                    const size_t grp = (size_t)(kb0 + s) * GROUPS + q;
                    w4w_bulk(sz + 256 * q, sc + grp * N + n0, 256, full);
                    w4w_bulk(sz + 512 + 256 * q, zb + grp * N + n0, 256, full);
                }
            }
        }
        // With CLUSTER 2 the producer stays for the final cluster barrier
        // (each warp converged first: the barrier is .aligned).
        if (CLUSTER == 2) {
            __syncwarp();
            w4w_cluster_sync();
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(W4W_COMPUTE_REGS));
    const int ct = tid - 128, cw = ct >> 7, warp = (ct >> 5) & 3, lane = ct & 31;
    const int g = lane >> 2, t = lane & 3;
    // Rows g of local tiles `tile` (e = 0) and `tile + 1` (e = 1) are the
    // warp's rows g and g + 8 of its warpgroup's 64 channels.
    const int tile = 8 * cw + 2 * warp;

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;

    const W4gQuad quad = w4g_quad(t);
    // The peer's empty barriers (CLUSTER 2), mapped once: issuing the
    // mapping between two wgmmas makes ptxas serialize them.
    const u32 peer_empty = CLUSTER == 2 ? w4w_map_to(bars + 8 * W4W_NST, rank ^ 1) : 0;
    u32 tw[2][4] = {};      // transposed code words: [e][32-input chunk]
    __half2 sv[2][2], zv[2][2];  // [group within the stage][e]
    u32 aa[2][4];
    // A of k16 step j (stage inputs 16j .. 16j + 15): pieces 2(j & 1) and
    // + 1 of chunk j >> 1, rows g (e = 0) and g + 8 (e = 1); with groups of
    // 64 the second half of the stage takes the second group.
    auto build_a = [&](int j) {
        u32(&a)[4] = aa[j & 1];
        const int c = 2 * (j & 1), wd = j >> 1, q = G == 64 ? (j >> 2) : 0;
        a[0] = w4g_dequant_pair(tw[0][wd], c, zv[q][0], sv[q][0]);
        a[1] = w4g_dequant_pair(tw[1][wd], c, zv[q][1], sv[q][1]);
        a[2] = w4g_dequant_pair(tw[0][wd], c + 1, zv[q][0], sv[q][0]);
        a[3] = w4g_dequant_pair(tw[1][wd], c + 1, zv[q][1], sv[q][1]);
    };

    // A do-while (the host guarantees a stage at least): see the first
    // kernel's note on zero-trip loops and ptxas's wgmma serialization.
    int s = 0;
    do {
        const int b = s % W4W_NST;
        const u32 st = base + b * W4W_STAGE_BYTES;
        w4w_bar_wait(bars + 8 * b, (s / W4W_NST) & 1);
        const unsigned char* stage = w4w_smem + (st - smem0);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const uint4 v = *reinterpret_cast<const uint4*>(stage + 2 * W4W_X_BYTES + 512 * (tile + e) + 16 * lane);
            tw[e][0] = w4g_quad_transpose(v.x, quad);
            tw[e][1] = w4g_quad_transpose(v.y, quad);
            tw[e][2] = w4g_quad_transpose(v.z, quad);
            tw[e][3] = w4g_quad_transpose(v.w, quad);
        }
        const __half* szs = reinterpret_cast<const __half*>(stage + 2 * W4W_X_BYTES + W4W_CODE_BYTES);
#pragma unroll
        for (int q = 0; q < 128 / G; ++q) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int n = 8 * (tile + e) + g;
                sv[q][e] = __half2half2(szs[128 * q + n]);
                zv[q][e] = __half2half2(szs[256 + 128 * q + n]);
            }
        }
        // Set 0 was last read by step 6 of the previous stage: at most
        // step 7 may still be in flight.
        w4g_wait<1>();
        build_a(0);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            w4g_fence();
            w4g_wgmma_rs(acc, aa[j & 1], w4g_desc(st + (j >> 2) * W4W_X_BYTES + 32 * (j & 3)));
            w4g_commit();
            if (j < 7) {
                // Step j − 1, the last reader of the other set, has
                // completed (and at j = 0 every step of stage s − 1).
                w4g_wait<1>();
                if (j == 0 && s > 0 && lane == 0) {
                    const u32 empty = bars + 8 * (W4W_NST + (s - 1) % W4W_NST);
                    w4w_bar_arrive(empty);
                    if (CLUSTER == 2) w4w_bar_arrive_remote(peer_empty + 8 * ((s - 1) % W4W_NST));
                }
                build_a(j + 1);
            }
        }
    } while (++s < stages);
    w4g_wait<0>();
    w4g_touch(acc, 128);
    if (CLUSTER == 1 && gridDim.z > 1 && !w4w_split_reduce(acc, part, count, ct)) return;
    // Both compute warpgroups' wgmmas are done with shared memory (and
    // every copy has landed: each stage was waited for) before stage 0
    // becomes the output staging area.
    auto sync = [] { asm volatile("bar.sync 1, 256;\n" ::: "memory"); };
    sync();
    float* stage_out = reinterpret_cast<float*>(w4w_smem + (base - smem0));
    w4g_store_tile(acc, stage_out, out, ct, cw, warp, g, t, m0, n0, M, N, out_f32, sync);
    // No CTA of a pair exits while the other may still arrive on its
    // barriers.
    if (CLUSTER == 2) w4w_cluster_sync();
#else
    __trap();
#endif
}

#define W4_GEMM_WS_ENTRY(NAME, GS, CLUSTER, CODES_TMA, ATTRS)                                         \
    extern "C" __global__ void __launch_bounds__(384, 1) ATTRS                                         \
        NAME(const __grid_constant__ W4wTensorMap xmap, const __grid_constant__ W4wTensorMap cmap,     \
             const unsigned char* __restrict__ qw, const __half* __restrict__ sc,                      \
             const __half* __restrict__ zb, void* __restrict__ out, int M, int N, int KB, int out_f32,  \
             float* __restrict__ part, unsigned* __restrict__ count, int kb_split) {                   \
        w4_gemm_ws_body<GS, CLUSTER, CODES_TMA>(&xmap, &cmap, qw, sc, zb, out, M, N, KB, out_f32, part, \
                                                count, kb_split);                                      \
    }

W4_GEMM_WS_ENTRY(w4_gemm_ws_g64, 64, 1, false, )
W4_GEMM_WS_ENTRY(w4_gemm_ws_g128, 128, 1, false, )
// The codes by one 3-D TMA box per stage (`cmap`) instead of 16 bulk
// copies: the producer thread issues 5 copies a stage instead of 20 (with
// groups of 128; 7 instead of 22 with groups of 64).
W4_GEMM_WS_ENTRY(w4_gemm_wst_g64, 64, 1, true, )
W4_GEMM_WS_ENTRY(w4_gemm_wst_g128, 128, 1, true, )
// Pairs of CTAs (clusters of 2 along the channels) sharing each x box by
// TMA multicast: half the activation traffic from L2.
W4_GEMM_WS_ENTRY(w4_gemm_ws2_g64, 64, 2, false, __cluster_dims__(2, 1, 1))
W4_GEMM_WS_ENTRY(w4_gemm_ws2_g128, 128, 2, false, __cluster_dims__(2, 1, 1))
