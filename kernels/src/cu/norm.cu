// RMSNorm over fp16 rows, optionally fused with the residual add.
//
// rms_norm:      out = x / sqrt(mean(x²) + eps) · w
// add_rms_norm:  residual = fp16(residual + delta);
//                out = residual / sqrt(mean(residual²) + eps) · w
// The statistics use the fp16 value that is stored back into `residual`,
// and accumulate in fp32. One block per row; any row length.

extern "C" __global__ void rms_norm_f16(__half* __restrict__ residual,  // [rows][d], updated if delta
                                        const __half* __restrict__ delta, // [rows][d] or unused
                                        const __half* __restrict__ w,     // [d]
                                        __half* __restrict__ out,         // [rows][d]
                                        int d, float eps, int has_delta) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    __half* r = residual + row * d;
    const __half* dl = delta + row * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        __half v = r[i];
        if (has_delta) {
            v = __float2half_rn(__half2float(v) + __half2float(dl[i]));
            r[i] = v;
        }
        const float f = __half2float(v);
        ss += f * f;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)d + eps);
    __half* o = out + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        o[i] = __float2half_rn(__half2float(r[i]) * inv * __half2float(w[i]));
    }
}
