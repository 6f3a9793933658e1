// Row-wise fp16 ops of the decoder: SiLU·mul, rotary embedding, embedding
// gather. All accumulate in fp32 and round once to fp16.

// out[i] = silu(gate[i]) · up[i] over n elements.
extern "C" __global__ void silu_mul_f16(const __half* __restrict__ gate,
                                        const __half* __restrict__ up,
                                        __half* __restrict__ out, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const float g = __half2float(gate[i]);
        const float s = g / (1.0f + expf(-g));
        out[i] = __float2half_rn(s * __half2float(up[i]));
    }
}

// Rotary embedding in place, the "neox" half-split form that Hugging Face
// Llama uses: for i < hd/2 the pair (x[i], x[i + hd/2]) rotates by angle
// pos · inv_freq[i]. x is [rows][heads][hd]; pos[row] is the token position.
// inv_freq comes from the host so every scaling variant is pure data.
// grid = (rows, heads), block = hd/2 threads (rounded up to a warp).
extern "C" __global__ void rope_neox_f16(__half* __restrict__ x,
                                         const int* __restrict__ pos,
                                         const float* __restrict__ inv_freq,
                                         int heads, int hd) {
    const int half_d = hd >> 1;
    const int i = threadIdx.x;
    if (i >= half_d) return;
    __half* v = x + ((size_t)blockIdx.x * heads + blockIdx.y) * hd;
    const float ang = (float)pos[blockIdx.x] * inv_freq[i];
    float s, c;
    sincosf(ang, &s, &c);
    const float x0 = __half2float(v[i]), x1 = __half2float(v[i + half_d]);
    v[i] = __float2half_rn(x0 * c - x1 * s);
    v[i + half_d] = __float2half_rn(x1 * c + x0 * s);
}

// out[r][:] = table[ids[r]][:]. ids were range-checked on the host.
extern "C" __global__ void embedding_f16(const __half* __restrict__ table,
                                         const u32* __restrict__ ids,
                                         __half* __restrict__ out, int d) {
    const size_t r = blockIdx.x;
    const __half* src = table + (size_t)ids[r] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[r * d + i] = src[i];
}
