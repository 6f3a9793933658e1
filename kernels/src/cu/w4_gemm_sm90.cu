// W4A16 GEMM for prefill on Hopper (sm_90a): out[M][N] = x[M][K] · W[K][N]
// with W in the W4A16 layout (kernels/README.md), the 4-bit codes
// dequantized inside the main loop instead of into a scratch fp16 matrix
// for cuBLAS (which costs 0.18–0.19 of the GEMM's time on an H100: the
// whole weight written and read again at fp16).
//
// Block: two warpgroups (256 threads) own 256 output channels × 128 tokens;
// warpgroup w computes channels 128w .. 128w + 127 as two m64n128k16
// wgmma rows (D = Wᵀ·xᵀ: A = 64 channels × 16 inputs, B = 16 inputs ×
// 128 tokens), fp32 accumulators in registers (128 per thread).
//
// Stages of 64 inputs. Both operands sit in shared memory, K-major with
// the 128-byte swizzle (a row of 64 halves is 128 bytes; its 16-byte chunk
// c lives at chunk c ^ (row & 7); tiles are 1024-byte aligned), which the
// wgmma descriptors name (stride 1024 bytes per 8 rows; a k16 step is 32
// bytes further into the row):
//  * x (B): NST stages, each copied by cp.async AHEAD = NST − 2 stages
//    before use (16 bytes a copy; tokens past M read as zeros);
//  * W (A): two stages. Each thread loads its share of the codes (four
//    8-byte halves of lane words, 3 stages ahead, in registers), and one
//    stage before use dequantizes them exactly as w4_dequant_f16 does
//    (fp16 (1024 + q) − (1024 + z), exact, times the scale: one rounding)
//    and stores them swizzled; a proxy fence makes the stores visible to
//    the tensor cores.
// Per stage: dequantize stage s; wait for x stage s; barrier; queue the copy
// of x stage s + AHEAD (its buffer was last read by stage s − 2's wgmmas,
// which every warpgroup waited for before the barrier); issue stage s's
// four k16 wgmmas per row and commit them; wait until only they are in
// flight. So stage s's dequantization overlaps stage s − 1's wgmmas.
//
// Needs K a multiple of 128 and of the group size, N a multiple of 256;
// the host checks and otherwise takes the dequantize-then-cuBLAS path.
// Compiled for sm_90a only (wgmma); elsewhere the entry point traps.
#line 35 "w4_gemm_sm90.cu"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define W4G_WGMMA 1
#endif

#define W4G_BM 256  // output channels per block
#define W4G_BN 128  // tokens per block
#define W4G_BK 64   // inputs per stage
#define W4G_NST 4   // x stages
#define W4G_AHEAD (W4G_NST - 2)
#define W4G_A_BYTES (W4G_BM * 128)   // one W stage
#define W4G_B_BYTES (W4G_BN * 128)   // one x stage
// Dynamic shared memory: 1024 bytes of alignment slack, two W stages, NST
// x stages (the host passes this many bytes).
#define W4G_SMEM (1024 + 2 * W4G_A_BYTES + W4G_NST * W4G_B_BYTES)

#ifdef W4G_WGMMA
// A K-major operand tile with the 128-byte swizzle: start address, leading
// byte offset unused (1), stride byte offset 1024 (8 rows of 128 bytes),
// layout type 1 (128-byte swizzle) in bits 62–63.
__device__ __forceinline__ u64 w4g_desc(u32 smem_addr) {
    u64 d = (u64)((smem_addr & 0x3FFFF) >> 4);
    d |= (u64)1 << 16;
    d |= (u64)(1024 >> 4) << 32;
    d |= (u64)1 << 62;
    return d;
}

// One m64n128k16 wgmma, A and B from shared memory (descriptors), fp32
// accumulators d[0 .. 64) added to (the scale-d predicate is true).
__device__ __forceinline__ void w4g_wgmma_n128(float* d, u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1));
}

__device__ __forceinline__ void w4g_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void w4g_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void w4g_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across a
// wgmma issue or wait (the registers change asynchronously in between).
__device__ __forceinline__ void w4g_touch(float* d, int n) {
#pragma unroll
    for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void w4g_proxy_fence() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// 16 bytes global → shared, zero-filled when `bytes` is 0.
__device__ __forceinline__ void w4g_copy16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void w4g_copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void w4g_copy_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The codes one thread dequantizes per stage: four (tile, lane) pairs,
// tiles 16w + 4·warp + e of the block's 32 (w its warpgroup), 8 bytes of
// each lane word (the stage's half of the 128-input k-block), with the
// pair's scale and biased zero.
struct W4gCodes {
    uint2 w[4];
    __half2 s[4], z[4];
};

template <int G>
__device__ __forceinline__ void w4g_load_codes(W4gCodes& c, const uint2* __restrict__ qw2,
                                               const __half* __restrict__ sc,
                                               const __half* __restrict__ zb, int tile0, int lane,
                                               int stage, int N, int KB) {
    const int kb = stage >> 1, h = stage & 1;
    const int grp = stage * W4G_BK / G;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int nt = tile0 + e;
        c.w[e] = __ldg(qw2 + (((size_t)nt * KB + kb) * 32 + lane) * 2 + h);
        const int n = 8 * nt + (lane >> 2);
        c.s[e] = __half2half2(__ldg(sc + (size_t)grp * N + n));
        c.z[e] = __half2half2(__ldg(zb + (size_t)grp * N + n));
    }
}

// Eight codes (nibble p of `w` is input 2(p & 3) + (p >> 2)) as
// (1024 + q − (1024 + z))·s, fp16, into 16 bytes at shared address dst.
__device__ __forceinline__ void w4g_dequant8(u32 dst, u32 w, __half2 s, __half2 z) {
    u32 o[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 b = ((w >> (4 * j)) & 0x000F000Fu) | 0x64006400u;
        const __half2 q = *reinterpret_cast<const __half2*>(&b);
        const __half2 v = __hmul2(__hsub2(q, z), s);
        o[j] = *reinterpret_cast<const u32*>(&v);
    }
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(o[0]), "r"(o[1]),
                 "r"(o[2]), "r"(o[3])
                 : "memory");
}
#endif

template <int G>
__device__ __forceinline__ void w4_gemm_body(const __half* __restrict__ x, const uint2* __restrict__ qw2,
                                             const __half* __restrict__ sc,
                                             const __half* __restrict__ zb, void* __restrict__ out,
                                             int M, int N, int K, int KB, int out_f32) {
#ifdef W4G_WGMMA
    extern __shared__ unsigned char w4g_smem[];
    const u32 smem0 = ((u32)__cvta_generic_to_shared(w4g_smem) + 1023u) & ~1023u;
    const u32 a_smem = smem0;                        // two W stages
    const u32 b_smem = smem0 + 2 * W4G_A_BYTES;      // NST x stages
    const int tid = threadIdx.x;
    const int wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * W4G_BM;
    const int m0 = blockIdx.y * W4G_BN;
    const int stages = K / W4G_BK;
    const int tile0 = n0 / 8 + 16 * wg + 4 * warp;

    // x stage `s` into its buffer: 128 tokens × 8 chunks, 4 per thread.
    auto load_x = [&](int s) {
        const u32 buf = b_smem + (s % W4G_NST) * W4G_B_BYTES;
#pragma unroll
        for (int j = 0; j < W4G_BN * 8 / 256; ++j) {
            const int q = tid + 256 * j;
            const int n = q >> 3, c = q & 7;
            const int tok = m0 + n;
            const __half* src = x + (size_t)min(tok, M - 1) * K + s * W4G_BK + c * 8;
            w4g_copy16(buf + n * 128 + ((c ^ (n & 7)) << 4), src, tok < M ? 16 : 0);
        }
    };
    // Dequantizes codes `c` into W stage buffer `slot`.
    auto store_w = [&](const W4gCodes& c, int slot) {
        const u32 buf = a_smem + slot * W4G_A_BYTES;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            // Block row of column 8·(tile0 + e) + g; its row & 7 is g.
            const int r = 8 * (16 * wg + 4 * warp + e) + g;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                // Odd rows store their two chunks in the other order, so
                // that the 8 lanes of a store phase (rows g, g + 1) cover
                // all 32 banks.
                const int ii = i ^ (g & 1);
                const int chunk = 4 * ii + t;  // inputs 8·chunk .. + 7 of the stage
                const u32 w = ii == 0 ? c.w[e].x : c.w[e].y;
                w4g_dequant8(buf + r * 128 + ((chunk ^ g) << 4), w, c.s[e], c.z[e]);
            }
        }
    };

    float acc[2][64];
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[b][i] = 0.0f;

    // Prologue: x stages 0 .. AHEAD − 1 in flight, codes of stages 0 .. 2.
#pragma unroll
    for (int s = 0; s < W4G_AHEAD; ++s) {
        if (s < stages) load_x(s);
        w4g_copy_commit();
    }
    W4gCodes c0, c1, c2;
    w4g_load_codes<G>(c0, qw2, sc, zb, tile0, lane, 0, N, KB);
    if (1 < stages) w4g_load_codes<G>(c1, qw2, sc, zb, tile0, lane, 1, N, KB);
    if (2 < stages) w4g_load_codes<G>(c2, qw2, sc, zb, tile0, lane, 2, N, KB);

    // A do-while (the host guarantees at least one stage): with a
    // zero-trip path the compiler merges the accumulators at the loop's
    // exit by moves, which ptxas counts as non-wgmma definitions and
    // answers by serializing every wgmma.
    int s = 0;
    do {
        // W stage s: its buffer was last read by stage s − 2's wgmmas, which
        // this warpgroup waited for at the end of stage s − 1.
        store_w(c0, s & 1);
        c0 = c1;
        c1 = c2;
        if (s + 3 < stages) w4g_load_codes<G>(c2, qw2, sc, zb, tile0, lane, s + 3, N, KB);
        // This thread's copies of x stage s have landed (AHEAD − 1 later
        // groups may still be in flight); then every thread's have, and
        // every W store of stage s is visible to the tensor cores.
        w4g_copy_wait<W4G_AHEAD - 1>();
        w4g_proxy_fence();
        __syncthreads();
        if (s + W4G_AHEAD < stages) load_x(s + W4G_AHEAD);
        w4g_copy_commit();

        const u32 a_stage = a_smem + (s & 1) * W4G_A_BYTES + wg * 128 * 128;
        const u32 b_stage = b_smem + (s % W4G_NST) * W4G_B_BYTES;
        w4g_fence();
#pragma unroll
        for (int k16 = 0; k16 < W4G_BK / 16; ++k16) {
            const u64 db = w4g_desc(b_stage + 32 * k16);
            w4g_wgmma_n128(acc[0], w4g_desc(a_stage + 32 * k16), db);
            w4g_wgmma_n128(acc[1], w4g_desc(a_stage + 64 * 128 + 32 * k16), db);
        }
        w4g_commit();
        // Nothing but wgmmas touches the accumulators inside the loop: any
        // other definition of them makes ptxas serialize the wgmmas, and a
        // wait that depends on a branch makes it add a full wait.
        w4g_wait<1>();
    } while (++s < stages);
    w4g_wait<0>();
    w4g_touch(acc[0], 64);
    w4g_touch(acc[1], 64);

    // d[4j + {0,1}]: channel 16·warp + g, tokens 8j + 2t + {0,1}; d[4j + {2,3}]:
    // channel + 8, same tokens (per m64 row b of the warpgroup).
#pragma unroll
    for (int b = 0; b < 2; ++b) {
        const int ch = n0 + 128 * wg + 64 * b + 16 * warp + g;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int tok = m0 + 8 * j + 2 * t + (e & 1);
                const int col = ch + 8 * (e >> 1);
                if (tok >= M) continue;
                const float v = acc[b][4 * j + e];
                const size_t idx = (size_t)tok * N + col;
                if (out_f32) reinterpret_cast<float*>(out)[idx] = v;
                else reinterpret_cast<__half*>(out)[idx] = __float2half_rn(v);
            }
        }
    }
#else
    __trap();
#endif
}

#define W4_GEMM_ENTRY(GS)                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 1) w4_gemm_sm90_g##GS(                      \
        const __half* __restrict__ x, const uint2* __restrict__ qw2,                              \
        const __half* __restrict__ sc, const __half* __restrict__ zb, void* __restrict__ out,     \
        int M, int N, int K, int KB, int out_f32) {                                               \
        w4_gemm_body<GS>(x, qw2, sc, zb, out, M, N, K, KB, out_f32);                              \
    }

W4_GEMM_ENTRY(64)
W4_GEMM_ENTRY(128)
