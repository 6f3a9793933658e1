// The attn_stream module's entry points: the streaming integer kernel (paged_attn_int2.cu).
// A module of its own (see kernels/src/nvrtc.rs), compiled beside the float
// kernels' paged_attn module so that NVRTC builds them in parallel.
#line 5 "attn_stream_entry.cu"
// The streaming integer kernel (paged_attn_int2.cu), for blocks of a
// multiple of 16 positions: one entry per head_dim, storage, ring depth NS
// (tile stages per warp) and MINB (the blocks per SM the register
// allocation must allow); `int2_variants` in paged/mod.rs
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
            float* part_acc, int rows_at, __half* out_h) {                                         \
        const unsigned char* pb = (const unsigned char*)params;                                   \
        if (static_mode)                                                                          \
            paged_attn_int2<HD, DT, true, NS, KC>(q, meta, rows, data, pb, statics, layer, L, H,  \
                                                  NH, BL, split_len, splits, scale, out, part_ml, \
                                                  part_acc, rows_at, out_h);                      \
        else                                                                                      \
            paged_attn_int2<HD, DT, false, NS, KC>(q, meta, rows, data, pb, statics, layer, L, H, \
                                                   NH, BL, split_len, splits, scale, out,         \
                                                   part_ml, part_acc, rows_at, out_h);            \
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
