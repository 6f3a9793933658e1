// Part of the paged_attn module (see kernels/src/nvrtc.rs): the split merge
// and the extern "C" entry points of the float attention kernel
// (paged_attn.cu). The integer, streaming and prefill kernels are modules of
// their own (attn_*_entry.cu), so that NVRTC compiles them in parallel.
#line 5 "paged_attn_entry.cu"
// Combines the splits of each (row, query head) in order. grid = (launch
// slots, NH), block = hd threads (rounded up to a warp); slot x is the row
// the attention launch's block x took (see decode_row), and its partial
// states sit at slot x.
extern "C" __global__ void attn_merge(const int* __restrict__ meta, int rows, int NH, int hd,
                                      int split_len, int splits, const float* __restrict__ part_ml,
                                      const float* __restrict__ part_acc, float* __restrict__ out,
                                      int rows_at, __half* __restrict__ out_h) {
    grid_dep_launch();
    const int d = threadIdx.x;
    if (d >= hd) return;
    const int row = decode_row(meta, rows_at);
    const size_t qh = (size_t)row * NH + blockIdx.y;
    const size_t qp = (size_t)blockIdx.x * NH + blockIdx.y;
    const int used = (meta[row] + split_len) / split_len;  // ceil((pos + 1) / split_len)
    float mt = -LMQ_INF;
    for (int s = 0; s < used; ++s) mt = fmaxf(mt, part_ml[(qp * splits + s) * 2]);
    float lt = 0.0f, at = 0.0f;
    for (int s = 0; s < used; ++s) {
        const float w = __expf(part_ml[(qp * splits + s) * 2] - mt);
        lt += part_ml[(qp * splits + s) * 2 + 1] * w;
        at += part_acc[(qp * splits + s) * hd + d] * w;
    }
    store_out(out, out_h, qh * hd + d, at / lt);
}

// Every entry takes the same arguments; the float kernels ignore the
// quantization parameters. `rows_at`: see decode_row in paged_attn.cu.
#define ATTN_ENTRY(HD, DT, NAME, G)                                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                      \
        paged_attn_h##HD##_##NAME##_g##G(const float* q, const int* meta, int rows,               \
                                         const unsigned char* data, const __half* params,        \
                                         const float* statics, int static_mode, int layer, int L, \
                                         int H, int NH, int BL, int split_len, int splits,       \
                                         float scale, float* out, float* part_ml,                \
                                         float* part_acc, int rows_at, __half* out_h) {          \
        paged_attn<HD, DT, G>(q, meta, rows, data, layer, L, H, NH, BL, split_len, splits, scale, \
                              out, part_ml, part_acc, rows_at, out_h);                            \
    }

#define ATTN_ENTRIES(HD, DT, NAME) \
    ATTN_ENTRY(HD, DT, NAME, 1)    \
    ATTN_ENTRY(HD, DT, NAME, 4)    \
    ATTN_ENTRY(HD, DT, NAME, 8)

ATTN_ENTRIES(64, DT_F32, f32)
ATTN_ENTRIES(64, DT_F16, f16)
ATTN_ENTRIES(128, DT_F32, f32)
ATTN_ENTRIES(128, DT_F16, f16)
ATTN_ENTRIES(256, DT_F32, f32)
ATTN_ENTRIES(256, DT_F16, f16)
