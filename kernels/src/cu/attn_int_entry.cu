// The attn_int module's entry points: the integer tile kernel (paged_attn_int.cu).
// A module of its own (see kernels/src/nvrtc.rs), compiled beside the float
// kernels' paged_attn module so that NVRTC builds them in parallel.
#line 5 "attn_int_entry.cu"
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
                                  float* out, float* part_ml, float* part_acc, int rows_at,       \
                                  __half* out_h) {                                                \
        if (static_mode)                                                                          \
            paged_attn_int<HD, DT, true, KC>(q, meta, rows, data, params, statics, layer, L, H, NH,   \
                                         BL, split_len, splits, scale, out, part_ml, part_acc,    \
                                         rows_at, out_h);                                         \
        else                                                                                      \
            paged_attn_int<HD, DT, false, KC>(q, meta, rows, data, params, statics, layer, L, H, NH,  \
                                          BL, split_len, splits, scale, out, part_ml, part_acc,   \
                                          rows_at, out_h);                                        \
    }

ATTN_INT_ENTRY(64, DT_I8, paged_attn_h64_i8, 5)
ATTN_INT_ENTRY(64, DT_I4, paged_attn_h64_i4, 5)
// At head_dim 128 (measured on an H200, batch 64 × 2048 positions): int8
// runs best at 5 blocks per SM (96 registers, a few spilled: 334 µs against
// 352 at 4), int4 with raw K halves at 4 (333 µs against 338 centred).
ATTN_INT_ENTRY(128, DT_I8, paged_attn_h128_i8, 5)
ATTN_INT_ENTRY_KC(128, DT_I4, paged_attn_h128_i4, 4, false)
ATTN_INT_ENTRY(256, DT_I8, paged_attn_h256_i8, 2)
ATTN_INT_ENTRY(256, DT_I4, paged_attn_h256_i4, 2)
