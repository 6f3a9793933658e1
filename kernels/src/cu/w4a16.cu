// W4A16 linear for decode: out[M][N] = x[M][K] · W[K][N] (+ bias), M <= 16,
// W 4-bit with a per-(group, column) scale and zero.
//
// Weight layout (written by kernels/src/awq.rs, see kernels/README.md):
//   K is padded up to Kp = 128·KB. The weight is cut into tiles of
//   8 output columns × 128 inputs. Tile (nt, kb) is 512 contiguous bytes,
//   stored at qw[(nt·KB + kb)·32 + lane] as one uint4 per lane of a warp:
//   lane = 4g + t owns column n = 8nt + g. Its 4 words i = 0..3 cover the
//   two mma k16-steps j = 2i and 2i+1; nibble p of word i holds input
//       k = 128kb + 16(2i + (p>>1 & 1)) + 2t + (p & 1 ? 8 : 0) + (p >> 2)
//   i.e. positions (0,4) = k 2t, 2t+1 of step 2i, (1,5) = k 2t+8, 2t+9 of
//   step 2i, (2,6) and (3,7) the same for step 2i+1. So `(w >> 4s) & 0x000F000F`
//   is the B fragment register of one mma.m16n8k16 in half2 nibble form.
//   Padded inputs have q = 0; their activations are zero in shared memory.
//   sc[grp·N + n] is the fp16 scale and zb[grp·N + n] the fp16 biased zero
//   1024 + z of group grp = k / G.
//
// Dequantization: (q | 0x6400) read as fp16 is exactly 1024 + q, so one
// lop3 and one exact hsub2 give B = q − z as fp16 integers. The tensor core
// accumulates x·(q − z) over one group in fp32 (exact products), and the
// group's scale multiplies that partial sum once, in fp32. So no weight is
// ever rounded to fp16, and the only per-weight work is lop3 + hsub2.
//
// Work split: a block of 8 warps owns 16 column tiles (128 columns), each
// warp 2 tiles; grid.y splits K into S chunks of KC·128 inputs. Each warp
// streams its tiles with 16-byte loads through a two-stage register
// pipeline: a stage is U = 1 or 2 k-blocks × 2 tiles (32 or 64 bytes per
// lane); both stages are issued first, before the block copies x[:, chunk]
// into shared memory with cp.async, and each stage is refilled as soon as
// it has been computed. The math is tensor-core mma.m16n8k16 with A = the
// activations (fed by ldmatrix; rows >= M repeat row M−1 and are never
// stored), so all M rows reuse each dequantized weight and the instruction
// count does not grow with M. With S > 1 each
// block writes fp32 partials to `ws` and the last block of a column range
// (a counter per range) sums them in split order 0..S−1, so the result is
// deterministic, adds the bias and writes out. Needs sm_80 or newer.

// Entry points w4a16_gemm_g{32,64,128}(x [M][K] fp16, qw tiles, sc [K/G][N]
// fp16, zb [K/G][N] fp16, bias [N] fp16 (read only if has_bias), out [M][N]
// fp16 or fp32 (out_f32), ws [S][M][N] fp32 partials (S = gridDim.y > 1), counters
// [gridDim.x] zero between launches, M, N, K, KB = ceil(K/128), KC =
// k-blocks per split, has_bias, out_f32). Dynamic shared memory:
// M · (KC·128 + 8) halves.

#define W4_WARPS 8
#define W4_TN 2
#define W4_COLS (W4_WARPS * W4_TN * 8)

__device__ __forceinline__ void mma_16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                          u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }\n" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ u32 lop_nib(u32 w) {
    u32 r;
    // r = (w & 0x000F000F) | 0x64006400
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(w), "n"(0x000F000F), "n"(0x64006400));
    return r;
}

__device__ __forceinline__ void store_pair(void* out, int out_f32, size_t idx, float v0, float v1) {
    if (out_f32) {
        *reinterpret_cast<float2*>(reinterpret_cast<float*>(out) + idx) = make_float2(v0, v1);
    } else {
        *reinterpret_cast<__half2*>(reinterpret_cast<__half*>(out) + idx) = __floats2half2_rn(v0, v1);
    }
}

__device__ __forceinline__ u32 hsub2_u32(u32 a, u32 b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<u32*>(&r);
}

__device__ __forceinline__ void ldmatrix_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// One pipeline stage: U k-blocks × W4_TN tiles of codes, and per group
// (NG = 128/G of them per k-block) the biased zero of the lane's B column
// (replicated into a half2) and the scales of its two C columns 2t, 2t+1.
template <int G, int U>
struct Stage {
    uint4 w[U][W4_TN];
    u32 z[U][W4_TN][128 / G];
    u32 s[U][W4_TN][128 / G];
};

template <int G, int U>
__device__ __forceinline__ void load_stage(Stage<G, U>& st, const uint4* __restrict__ qw,
                                           const u32* __restrict__ sc2,
                                           const unsigned short* __restrict__ zb, int kb,
                                           int kb1, int tile0, int ntiles, int lane, int N,
                                           int KB, int ngroups) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < W4_TN; ++j) {
            const int tile = tile0 + j;
            const bool ok = tile < ntiles && kb + u < kb1;
            st.w[u][j] = ok ? __ldg(qw + ((size_t)tile * KB + kb + u) * 32 + lane)
                            : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int q = 0; q < 128 / G; ++q) {
                // Groups past K exist only in the padding, whose codes and
                // activations are zero; any finite values will do there.
                const int grp = min((kb + u) * (128 / G) + q, ngroups - 1);
                const size_t base = (size_t)grp * N + tile * 8;
                const u32 zz = ok ? (u32)__ldg(zb + base + g) : 0u;
                st.z[u][j][q] = zz | (zz << 16);
                st.s[u][j][q] = ok ? __ldg(sc2 + (base >> 1) + t) : 0u;
            }
        }
    }
}

// acc += x[:, k-blocks kb .. kb+U) · W for this warp's tiles. `xaddr` is the
// shared-memory address of this lane's ldmatrix row at the chunk start.
template <int G, int U>
__device__ __forceinline__ void compute_stage(float (&acc)[W4_TN][4], const Stage<G, U>& st,
                                              int kb, int kb0, int kb1, u32 xaddr) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (kb + u >= kb1) break;
        const int kl = (kb + u - kb0) * 128;
        float part[W4_TN][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if ((32 * i) % G == 0) {
#pragma unroll
                for (int j = 0; j < W4_TN; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.0f;
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                u32 a0, a1, a2, a3;
                ldmatrix_x4(a0, a1, a2, a3, xaddr + 2 * (kl + 32 * i + 16 * h));
#pragma unroll
                for (int j = 0; j < W4_TN; ++j) {
                    const uint4 wv = st.w[u][j];
                    const u32 w = (i == 0 ? wv.x : i == 1 ? wv.y : i == 2 ? wv.z : wv.w) >> (8 * h);
                    const u32 z2 = st.z[u][j][(32 * i) / G];
                    const u32 b0 = hsub2_u32(lop_nib(w), z2);
                    const u32 b1 = hsub2_u32(lop_nib(w >> 4), z2);
                    mma_16816(part[j], a0, a1, a2, a3, b0, b1);
                }
            }
            if ((32 * (i + 1)) % G == 0) {
#pragma unroll
                for (int j = 0; j < W4_TN; ++j) {
                    u32 sv = st.s[u][j][(32 * i) / G];
                    const float2 s = __half22float2(*reinterpret_cast<__half2*>(&sv));
                    acc[j][0] = fmaf(s.x, part[j][0], acc[j][0]);
                    acc[j][1] = fmaf(s.y, part[j][1], acc[j][1]);
                    acc[j][2] = fmaf(s.x, part[j][2], acc[j][2]);
                    acc[j][3] = fmaf(s.y, part[j][3], acc[j][3]);
                }
            }
        }
    }
}

template <int G, int U>
__device__ __forceinline__ void w4a16_body(
    const __half* __restrict__ x, const uint4* __restrict__ qw, const u32* __restrict__ sc2,
    const unsigned short* __restrict__ zb, const __half* __restrict__ bias,
    void* __restrict__ out, float* __restrict__ ws, u32* __restrict__ counters, int M, int N,
    int K, int KB, int KC, int has_bias, int out_f32) {
    extern __shared__ __align__(16) __half xs[];
    const int S = gridDim.y;
    const int split = blockIdx.y;
    const int kb0 = split * KC;
    const int kb1 = min(KB, kb0 + KC);
    const int stride = KC * 128 + 8;  // halves: rows 16 bytes apart mod 128, so
                                      // ldmatrix's 8 row reads hit distinct banks
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int ntiles = N >> 3;
    const int ngroups = K / G;
    const int tile0 = (blockIdx.x * W4_WARPS + warp) * W4_TN;

    // The weights do not depend on x: put both pipeline stages in flight
    // before anything else.
    Stage<G, U> s0, s1;
    load_stage<G, U>(s0, qw, sc2, zb, kb0, kb1, tile0, ntiles, lane, N, KB, ngroups);
    load_stage<G, U>(s1, qw, sc2, zb, kb0 + U, kb1, tile0, ntiles, lane, N, KB, ngroups);

    // Copy x[:, kb0*128 .. kb1*128) into shared memory with cp.async (all
    // copies in flight at once), zero-filling past K.
    {
        const int units = KC * 16;  // 16-byte units per row
        for (int e = tid; e < M * units; e += blockDim.x) {
            const int r = e / units, c = e - r * units;
            const int k = kb0 * 128 + c * 8;
            const bool in = k < K;
            const __half* src = x + (size_t)r * K + (in ? k : 0);
            const u32 dst = smem_addr(xs + r * stride + c * 8);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                         :: "r"(dst), "l"(src), "r"(in ? 16 : 0));
        }
        asm volatile("cp.async.wait_all;\n" ::);
    }
    __syncthreads();

    // ldmatrix.x4: lanes 0-7 address rows 0-7 (k 0..7), 8-15 rows 8-15,
    // 16-23 rows 0-7 (k 8..15), 24-31 rows 8-15 (k 8..15). Rows >= M read
    // row M−1 instead; their results land in C rows that are never stored.
    const int arow = min((lane & 7) + ((lane >> 3) & 1) * 8, M - 1);
    const u32 xaddr = smem_addr(xs + arow * stride + (lane >> 4) * 8);
    const bool row_lo = g < M, row_hi = g + 8 < M;

    float acc[W4_TN][4];
#pragma unroll
    for (int j = 0; j < W4_TN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    // Two-stage ring: compute one stage while the other is in flight.
    for (int kb = kb0; kb < kb1; kb += 2 * U) {
        compute_stage<G, U>(acc, s0, kb, kb0, kb1, xaddr);
        if (kb + 2 * U < kb1)
            load_stage<G, U>(s0, qw, sc2, zb, kb + 2 * U, kb1, tile0, ntiles, lane, N, KB, ngroups);
        if (kb + U >= kb1) break;
        compute_stage<G, U>(acc, s1, kb + U, kb0, kb1, xaddr);
        if (kb + 3 * U < kb1)
            load_stage<G, U>(s1, qw, sc2, zb, kb + 3 * U, kb1, tile0, ntiles, lane, N, KB, ngroups);
    }

    if (S == 1) {
#pragma unroll
        for (int j = 0; j < W4_TN; ++j) {
            const int tile = tile0 + j;
            if (tile >= ntiles) continue;
            const int col = tile * 8 + 2 * t;
            float b0 = 0.0f, b1 = 0.0f;
            if (has_bias) { b0 = __half2float(bias[col]); b1 = __half2float(bias[col + 1]); }
            if (row_lo) store_pair(out, out_f32, (size_t)g * N + col, acc[j][0] + b0, acc[j][1] + b1);
            if (row_hi) store_pair(out, out_f32, (size_t)(g + 8) * N + col, acc[j][2] + b0, acc[j][3] + b1);
        }
        return;
    }

#pragma unroll
    for (int j = 0; j < W4_TN; ++j) {
        const int tile = tile0 + j;
        if (tile >= ntiles) continue;
        const int col = tile * 8 + 2 * t;
        float* base = ws + (size_t)split * M * N;
        if (row_lo) *reinterpret_cast<float2*>(base + (size_t)g * N + col) = make_float2(acc[j][0], acc[j][1]);
        if (row_hi) *reinterpret_cast<float2*>(base + (size_t)(g + 8) * N + col) = make_float2(acc[j][2], acc[j][3]);
    }
    __threadfence();
    __syncthreads();
    __shared__ int is_last;
    if (tid == 0) is_last = atomicAdd(counters + blockIdx.x, 1u) == (u32)(S - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const int c0 = blockIdx.x * W4_COLS;
    const int cols = min(W4_COLS, N - c0);
    for (int e = tid; e < M * cols; e += blockDim.x) {
        const int r = e / cols, col = c0 + (e - r * cols);
        float v = 0.0f;
        for (int s = 0; s < S; ++s) v += __ldcg(ws + ((size_t)s * M + r) * N + col);
        if (has_bias) v += __half2float(bias[col]);
        if (out_f32) reinterpret_cast<float*>(out)[(size_t)r * N + col] = v;
        else reinterpret_cast<__half*>(out)[(size_t)r * N + col] = __float2half_rn(v);
    }
    if (tid == 0) counters[blockIdx.x] = 0u;
}

// One entry point per group size (the group size fixes the unrolling and
// the stage depth U, chosen so that two stages fit the register budget).
#define W4_ENTRY(GS, U)                                                                     \
    extern "C" __global__ void __launch_bounds__(W4_WARPS * 32, 2) w4a16_gemm_g##GS(    \
        const __half* __restrict__ x, const uint4* __restrict__ qw,                      \
        const u32* __restrict__ sc2, const unsigned short* __restrict__ zb,              \
        const __half* __restrict__ bias, void* __restrict__ out, float* __restrict__ ws, \
        u32* __restrict__ counters, int M, int N, int K, int KB, int KC, int has_bias,    \
        int out_f32) {                                                                   \
        w4a16_body<GS, U>(x, qw, sc2, zb, bias, out, ws, counters, M, N, K, KB, KC,       \
                          has_bias, out_f32);                                            \
    }

W4_ENTRY(32, 1)
W4_ENTRY(64, 2)
W4_ENTRY(128, 2)
