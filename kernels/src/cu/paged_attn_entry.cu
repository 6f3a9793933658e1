// Part of the paged_attn module (see kernels/src/nvrtc.rs): the split merge
// and the extern "C" entry points of the float (paged_attn.cu) and integer
// (paged_attn_int.cu) attention kernels.
#line 5 "paged_attn_entry.cu"
// Combines the splits of each (row, query head) in order. grid = (launch
// slots, NH), block = hd threads (rounded up to a warp); slot x is the row
// the attention launch's block x took (see decode_row), and its partial
// states sit at slot x.
extern "C" __global__ void attn_merge(const int* __restrict__ meta, int rows, int NH, int hd,
                                      int split_len, int splits, const float* __restrict__ part_ml,
                                      const float* __restrict__ part_acc, float* __restrict__ out,
                                      int rows_at) {
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
    out[qh * hd + d] = at / lt;
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
                                         float* part_acc, int rows_at) {                         \
        paged_attn<HD, DT, G>(q, meta, rows, data, layer, L, H, NH, BL, split_len, splits, scale, \
                              out, part_ml, part_acc, rows_at);                                   \
    }

#define ATTN_ENTRIES(HD, DT, NAME) \
    ATTN_ENTRY(HD, DT, NAME, 1)    \
    ATTN_ENTRY(HD, DT, NAME, 4)    \
    ATTN_ENTRY(HD, DT, NAME, 8)

// Integer storage: one entry per head_dim and storage, for every group width
// (IG query heads per block). MINB = the blocks per SM that the register
// allocation must allow (shared memory allows about five); KC = whether K
// codes are centred before the MMA (see unpack_k).
#define ATTN_INT_ENTRY(HD, DT, NAME, MINB) ATTN_INT_ENTRY_KC(HD, DT, NAME, MINB, true)
#define ATTN_INT_ENTRY_KC(HD, DT, NAME, MINB, KC)                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                \
        NAME(const float* q, const int* meta, int rows,                      \
                                  const unsigned char* data, const __half* params,                \
                                  const float* statics, int static_mode, int layer, int L, int H, \
                                  int NH, int BL, int split_len, int splits, float scale,         \
                                  float* out, float* part_ml, float* part_acc, int rows_at) {     \
        if (static_mode)                                                                          \
            paged_attn_int<HD, DT, true, KC>(q, meta, rows, data, params, statics, layer, L, H, NH,   \
                                         BL, split_len, splits, scale, out, part_ml, part_acc,    \
                                         rows_at);                                                \
        else                                                                                      \
            paged_attn_int<HD, DT, false, KC>(q, meta, rows, data, params, statics, layer, L, H, NH,  \
                                          BL, split_len, splits, scale, out, part_ml, part_acc,   \
                                          rows_at);                                               \
    }

ATTN_ENTRIES(64, DT_F32, f32)
ATTN_ENTRIES(64, DT_F16, f16)
ATTN_INT_ENTRY(64, DT_I8, paged_attn_h64_i8, 5)
ATTN_INT_ENTRY(64, DT_I4, paged_attn_h64_i4, 5)
ATTN_ENTRIES(128, DT_F32, f32)
ATTN_ENTRIES(128, DT_F16, f16)
// At head_dim 128 (measured on an H200, batch 64 × 2048 positions): int8
// runs best at 5 blocks per SM (96 registers, a few spilled: 334 µs against
// 352 at 4), int4 with raw K halves at 4 (333 µs against 338 centred).
ATTN_INT_ENTRY(128, DT_I8, paged_attn_h128_i8, 5)
ATTN_INT_ENTRY_KC(128, DT_I4, paged_attn_h128_i4, 4, false)
ATTN_ENTRIES(256, DT_F32, f32)
ATTN_ENTRIES(256, DT_F16, f16)
ATTN_INT_ENTRY(256, DT_I8, paged_attn_h256_i8, 2)
ATTN_INT_ENTRY(256, DT_I4, paged_attn_h256_i4, 2)

// The streaming integer kernel (paged_attn_int2.cu), for blocks of a
// multiple of 16 positions: one entry per head_dim, storage, ring depth NS
// (tile stages per warp) and MINB (as above); `int2_variants` in paged/mod.rs
// lists them.
#define ATTN_INT2_ENTRY(HD, DT, NAME, NS, MINB) ATTN_INT2_ENTRY_KC(HD, DT, NAME, NS, MINB, false, )
// The first variant of each (head_dim, storage), `int2_variants`' default,
// also with centred keys (KC, see paged_attn_int2.cu; entry suffix _kc).
#define ATTN_INT2_ENTRY_AND_KC(HD, DT, NAME, NS, MINB)                                            \
    ATTN_INT2_ENTRY_KC(HD, DT, NAME, NS, MINB, false, )                                           \
    ATTN_INT2_ENTRY_KC(HD, DT, NAME, NS, MINB, true, _kc)
#define ATTN_INT2_ENTRY_KC(HD, DT, NAME, NS, MINB, KC, SUF)                                       \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                                \
        paged_attn2_h##HD##_##NAME##_s##NS##_b##MINB##SUF(                                        \
            const float* q, const int* meta, int rows, const unsigned char* data,                  \
            const __half* params, const float* statics, int static_mode, int layer, int L, int H,  \
            int NH, int BL, int split_len, int splits, float scale, float* out, float* part_ml,    \
            float* part_acc, int rows_at) {                                                        \
        const unsigned char* pb = (const unsigned char*)params;                                   \
        if (static_mode)                                                                          \
            paged_attn_int2<HD, DT, true, NS, KC>(q, meta, rows, data, pb, statics, layer, L, H,  \
                                                  NH, BL, split_len, splits, scale, out, part_ml, \
                                                  part_acc, rows_at);                             \
        else                                                                                      \
            paged_attn_int2<HD, DT, false, NS, KC>(q, meta, rows, data, pb, statics, layer, L, H, \
                                                   NH, BL, split_len, splits, scale, out,         \
                                                   part_ml, part_acc, rows_at);                   \
    }

ATTN_INT2_ENTRY_AND_KC(64, DT_I8, i8, 3, 4)
ATTN_INT2_ENTRY_AND_KC(64, DT_I4, i4, 4, 4)
ATTN_INT2_ENTRY_AND_KC(128, DT_I8, i8, 3, 4)
ATTN_INT2_ENTRY(128, DT_I8, i8, 2, 4)
ATTN_INT2_ENTRY(128, DT_I8, i8, 2, 5)
ATTN_INT2_ENTRY_AND_KC(128, DT_I4, i4, 4, 4)
ATTN_INT2_ENTRY(128, DT_I4, i4, 3, 4)
ATTN_INT2_ENTRY(128, DT_I4, i4, 4, 5)
ATTN_INT2_ENTRY(128, DT_I4, i4, 3, 5)
ATTN_INT2_ENTRY_AND_KC(256, DT_I8, i8, 2, 2)
ATTN_INT2_ENTRY_AND_KC(256, DT_I4, i4, 3, 2)

// The prefill kernel (paged_attn_prefill.cu): head_dim 64 and 128, fp16
// storage and int8/int4 with online or static parameters. The arguments are
// the decode entries' with `tiles_at` (where the tile list starts in meta)
// in place of `rows_at`; it does not split (split_len, splits and the
// partial buffers are unused).
#define ATTN_PREFILL_ARGS                                                                         \
    const float *q, const int *meta, int rows, const unsigned char *data, const __half *params,   \
        const float *statics, int static_mode, int layer, int L, int H, int NH, int BL,          \
        int split_len, int splits, float scale, float *out, float *part_ml, float *part_acc,     \
        int tiles_at
#define ATTN_PREFILL_CALL(HD, DT, ST)                                                             \
    paged_attn_prefill<HD, DT, ST>(q, meta, rows, tiles_at, data, (const unsigned char*)params,   \
                                   statics, layer, L, H, NH, BL, scale, out)
#define ATTN_PREFILL_F16_ENTRY(HD)                                                                \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32)                                   \
        paged_attn_prefill_h##HD##_f16(ATTN_PREFILL_ARGS) {                                      \
        ATTN_PREFILL_CALL(HD, DT_F16, false);                                                     \
    }
#define ATTN_PREFILL_INT_ENTRY(HD, DT, NAME)                                                      \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32)                                   \
        paged_attn_prefill_h##HD##_##NAME(ATTN_PREFILL_ARGS) {                                   \
        if (static_mode)                                                                          \
            ATTN_PREFILL_CALL(HD, DT, true);                                                      \
        else                                                                                      \
            ATTN_PREFILL_CALL(HD, DT, false);                                                     \
    }

ATTN_PREFILL_F16_ENTRY(64)
ATTN_PREFILL_F16_ENTRY(128)
ATTN_PREFILL_INT_ENTRY(64, DT_I8, i8)
ATTN_PREFILL_INT_ENTRY(64, DT_I4, i4)
ATTN_PREFILL_INT_ENTRY(128, DT_I8, i8)
ATTN_PREFILL_INT_ENTRY(128, DT_I4, i4)
