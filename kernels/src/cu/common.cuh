// Shared prelude of every lmq kernel source. The Rust side prepends this
// text to each .cu file before handing it to NVRTC, so the sources need no
// include path of their own; only <cuda_fp16.h> comes from the CUDA headers.
#include <cuda_fp16.h>

typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block of at most 1024 threads (blockDim.x a multiple of 32).
// Every thread gets the total. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// +∞ as a float (NVRTC has no <math.h>, hence no INFINITY).
#define LMQ_INF __int_as_float(0x7f800000)

// Programmatic dependent launch (sm_90+; no-ops before): `grid_dep_wait`
// returns once the grids this one depends on have completed and their
// writes are visible; `grid_dep_launch` lets a grid launched after this
// one with the programmatic-serialization attribute start now (its own
// wait still holds it before it reads what this grid writes).
__device__ __forceinline__ void grid_dep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dep_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// A 16-byte load of data that the previous kernel may still be writing
// when this one starts under programmatic dependent launch (a linear's
// activations). Never `__ldg`: `ld.global.nc` promises the data is fixed
// for the kernel's lifetime, which let ptxas hoist the W4A16 kernels' x
// loads above `griddepcontrol.wait` and read the producer's buffer before
// it was written (session 8: run-to-run different output on an H100).
// A volatile asm with a memory clobber keeps the load after the wait.
__device__ __forceinline__ uint4 ld_produced_v4(const void* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

// A scalar load of data an earlier kernel wrote (see ld_produced_v4).
__device__ __forceinline__ float ld_produced_f32(const float* p) {
    float v;
    asm volatile("ld.global.f32 %0, [%1];\n" : "=f"(v) : "l"(p) : "memory");
    return v;
}

// A deferred RMSNorm's factor for one row (W4Norm in w4a16.cu), by one
// warp: scale / sqrt(Σ part[0 .. parts) / d + eps), the lanes adding
// every 32nd partial sum, then warp_sum. The linears after the norm and
// deferred_norm_values_f32 (act_f32.cu) both form it here, so that they
// agree bit for bit.
__device__ __forceinline__ float deferred_norm_factor(const float* part, int parts, int d,
                                                      float eps, float scale, int lane) {
    float s = 0.0f;
    for (int j = lane; j < parts; j += 32) s += ld_produced_f32(part + j);
    s = warp_sum(s);
    return scale * (1.0f / sqrtf(s / (float)d + eps));
}
