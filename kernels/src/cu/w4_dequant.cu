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
