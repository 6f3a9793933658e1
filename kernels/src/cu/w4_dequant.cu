// Expands the W4A16 kernel's packed 4-bit layout (see awq.rs, PackedW4)
// into a dense fp16 [out][in] matrix, for the prefill path where a cuBLAS
// GEMM over the dequantized weights beats streaming the codes per 16 rows.
// Values are (q − z) · s rounded once to fp16, the same products the
// W4A16 kernel forms.
//
// One thread per packed 32-bit word, i.e. 8 consecutive inputs of one
// output (nibble p of word i of lane 4g + t holds input
// 128kb + 32i + 8t + 2(p & 3) + (p >> 2)). Threads are numbered so that
// t, then i, then kb vary fastest for a fixed output n: a warp writes 256
// consecutive inputs of one row as 16-byte stores.
extern "C" __global__ void w4_dequant_f16(const u32* __restrict__ qw, const __half* __restrict__ scales,
                                          const __half* __restrict__ zeros, __half* __restrict__ out,
                                          int n_out, int k_in, int kbs, int g) {
    const u64 words = (u64)n_out * kbs * 16;
    for (u64 w = (u64)blockIdx.x * blockDim.x + threadIdx.x; w < words;
         w += (u64)gridDim.x * blockDim.x) {
        const int t = (int)(w & 3);
        const int i = (int)((w >> 2) & 3);
        const u64 rest = w >> 4;  // n · kbs + kb
        const int kb = (int)(rest % kbs);
        const int n = (int)(rest / kbs);
        const int k0 = kb * 128 + 32 * i + 8 * t;
        if (k0 >= k_in) continue;
        const int lane = 4 * (n & 7) + t;
        const u32 word = qw[(((u64)(n >> 3) * kbs + kb) * 32 + lane) * 4 + i];
        // The 8 inputs share one group: 8 divides every group size.
        const size_t gi = (size_t)(k0 / g) * n_out + n;
        const float s = __half2float(scales[gi]);
        const float z = __half2float(zeros[gi]) - 1024.0f;
        __align__(16) __half vals[8];
#pragma unroll
        for (int p = 0; p < 8; ++p) {
            const float q = (float)((word >> (4 * p)) & 0xf);
            vals[2 * (p & 3) + (p >> 2)] = __float2half_rn((q - z) * s);
        }
        if (k0 + 8 <= k_in && (k_in & 7) == 0) {
            *(uint4*)(out + (size_t)n * k_in + k0) = *(const uint4*)vals;
        } else {
            for (int j = 0; j < 8 && k0 + j < k_in; ++j) out[(size_t)n * k_in + k0 + j] = vals[j];
        }
    }
}

// The same expansion for the output rows [n0, n0 + n_rows) only (n0 and
// n_rows multiples of 8: whole column tiles), written from row 0 of `out`
// ([n_rows][K]): the prefill GEMM can then run over the weight in slices
// small enough to stay in L2 between this write and cuBLAS's read.
//
// One thread per 16-byte lane word of the layout (32 inputs of one output:
// 4 words of 8 consecutive inputs, 32 apart), so a warp reads 512
// contiguous bytes, and 32-bit index math (the caller checks the range).
// The math is in half2 and gives the same bits as w4_dequant_f16:
// (1024 + q) − (1024 + z) and (64 + q) − (64 + z) are q − z exactly, and
// one hmul2 rounds the exact product (q − z)·s once, as __float2half_rn
// of the exact fp32 product does.
__device__ __forceinline__ u32 dq_pair(u32 biased_q, u32 biased_z, u32 s2) {
    __half2 d = __hsub2(*reinterpret_cast<__half2*>(&biased_q), *reinterpret_cast<__half2*>(&biased_z));
    __half2 r = __hmul2(d, *reinterpret_cast<__half2*>(&s2));
    return *reinterpret_cast<u32*>(&r);
}

extern "C" __global__ void w4_dequant_rows(const uint4* __restrict__ qw, const __half* __restrict__ scales,
                                           const __half* __restrict__ zeros, __half* __restrict__ out,
                                           int n_out, int k_in, int kbs, int g, int n0, int n_rows) {
    const u32 total = (u32)(n_rows >> 3) * (u32)kbs * 32u;
    for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < total; j += gridDim.x * blockDim.x) {
        const int lane = (int)(j & 31u);
        const u32 tile_kb = j >> 5;  // local tile · kbs + kb
        const int kb = (int)(tile_kb % (u32)kbs);
        const int nt = (n0 >> 3) + (int)(tile_kb / (u32)kbs);
        const uint4 v = qw[((size_t)nt * kbs + kb) * 32 + lane];
        const int n = 8 * nt + (lane >> 2);
        const int t = lane & 3;
        __half* row = out + (size_t)(n - n0) * k_in;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int k0 = kb * 128 + 32 * i + 8 * t;
            if (k0 >= k_in) break;
            const size_t gi = (size_t)(k0 / g) * n_out + n;
            const __half2 s = __half2half2(scales[gi]);
            const __half2 z1k = __half2half2(zeros[gi]);
            // 64 + z, exact: both in [64, 2048) with integer values.
            const __half2 z64 = __hsub2(z1k, __half2half2(__float2half(960.0f)));
            const u32 s2 = *reinterpret_cast<const u32*>(&s);
            const u32 za = *reinterpret_cast<const u32*>(&z1k);
            const u32 zb = *reinterpret_cast<const u32*>(&z64);
            const u32 w = i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
            const u32 w8 = w >> 8;
            uint4 r;
            r.x = dq_pair((w & 0x000F000Fu) | 0x64006400u, za, s2);   // inputs +0, +1
            r.y = dq_pair((w & 0x00F000F0u) | 0x54005400u, zb, s2);   // +2, +3
            r.z = dq_pair((w8 & 0x000F000Fu) | 0x64006400u, za, s2);  // +4, +5
            r.w = dq_pair((w8 & 0x00F000F0u) | 0x54005400u, zb, s2);  // +6, +7
            if (k0 + 8 <= k_in && (k_in & 7) == 0) {
                *reinterpret_cast<uint4*>(row + k0) = r;
            } else {
                const __half* h = reinterpret_cast<const __half*>(&r);
                for (int e = 0; e < 8 && k0 + e < k_in; ++e) row[k0 + e] = h[e];
            }
        }
    }
}
