// Expands the W4A16 kernel's packed 4-bit layout (see awq.rs, PackedW4)
// into a dense fp16 [out][in] matrix, for the prefill path where a cuBLAS
// GEMM over the dequantized weights beats streaming the codes per 16 rows.
// Values are (q − z) · s rounded once to fp16, the same products the
// W4A16 kernel forms. One thread per packed 32-bit word.
extern "C" __global__ void w4_dequant_f16(const u32* __restrict__ qw, const __half* __restrict__ scales,
                                          const __half* __restrict__ zeros, __half* __restrict__ out,
                                          int n_out, int k_in, int kbs, int g) {
    const u64 words = (u64)(n_out / 8) * kbs * 128;
    for (u64 w = (u64)blockIdx.x * blockDim.x + threadIdx.x; w < words;
         w += (u64)gridDim.x * blockDim.x) {
        const int i = (int)(w & 3);
        const int lane = (int)((w >> 2) & 31);
        const u64 tile = w >> 7;  // nt · kbs + kb
        const int kb = (int)(tile % kbs);
        const int nt = (int)(tile / kbs);
        const int n = nt * 8 + (lane >> 2), t = lane & 3;
        const u32 word = qw[w];
#pragma unroll
        for (int p = 0; p < 8; ++p) {
            const int k = kb * 128 + 32 * i + 8 * t + 2 * (p & 3) + (p >> 2);
            if (k >= k_in) continue;
            const int grp = k / g;
            const float s = __half2float(scales[(size_t)grp * n_out + n]);
            const float z = __half2float(zeros[(size_t)grp * n_out + n]) - 1024.0f;
            const float q = (float)((word >> (4 * p)) & 0xf);
            out[(size_t)n * k_in + k] = __float2half_rn((q - z) * s);
        }
    }
}
