// The attn_prefill module's entry points: the prefill kernel (paged_attn_prefill.cu).
// A module of its own (see kernels/src/nvrtc.rs), compiled beside the float
// kernels' paged_attn module so that NVRTC builds them in parallel.
#line 5 "attn_prefill_entry.cu"
// The prefill kernel (paged_attn_prefill.cu): head_dim 64 and 128, fp16
// storage and int8/int4 with online or static parameters. The arguments are
// the decode entries' with `tiles_at` (where the tile list starts in meta)
// in place of `rows_at`; it does not split (split_len, splits and the
// partial buffers are unused).
#define ATTN_PREFILL_ARGS                                                                         \
    const float *q, const int *meta, int rows, const unsigned char *data, const __half *params,   \
        const float *statics, int static_mode, int layer, int L, int H, int NH, int BL,          \
        int split_len, int splits, float scale, float *out, float *part_ml, float *part_acc,     \
        int tiles_at, __half *out_h
#define ATTN_PREFILL_CALL(HD, DT, ST)                                                             \
    paged_attn_prefill<HD, DT, ST>(q, meta, rows, tiles_at, data, (const unsigned char*)params,   \
                                   statics, layer, L, H, NH, BL, scale, out, out_h)
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

// The same with the integer tiles' raw codes pipelined (PIPE; the default,
// LMQ_PREFILL_INT_PIPE=0 takes the entries above).
#define ATTN_PREFILL_PIPE_CALL(HD, DT, ST)                                                        \
    paged_attn_prefill<HD, DT, ST, true>(q, meta, rows, tiles_at, data,                          \
                                         (const unsigned char*)params, statics, layer, L, H, NH, \
                                         BL, scale, out, out_h)
#define ATTN_PREFILL_PIPE_ENTRY(HD, DT, NAME)                                                     \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32)                                   \
        paged_attn_prefill_h##HD##_##NAME##_pipe(ATTN_PREFILL_ARGS) {                            \
        if (static_mode)                                                                          \
            ATTN_PREFILL_PIPE_CALL(HD, DT, true);                                                 \
        else                                                                                      \
            ATTN_PREFILL_PIPE_CALL(HD, DT, false);                                                \
    }

ATTN_PREFILL_F16_ENTRY(64)
ATTN_PREFILL_F16_ENTRY(128)
ATTN_PREFILL_INT_ENTRY(64, DT_I8, i8)
ATTN_PREFILL_INT_ENTRY(64, DT_I4, i4)
ATTN_PREFILL_INT_ENTRY(128, DT_I8, i8)
ATTN_PREFILL_INT_ENTRY(128, DT_I4, i4)
ATTN_PREFILL_PIPE_ENTRY(64, DT_I8, i8)
ATTN_PREFILL_PIPE_ENTRY(64, DT_I4, i4)
ATTN_PREFILL_PIPE_ENTRY(128, DT_I8, i8)
ATTN_PREFILL_PIPE_ENTRY(128, DT_I4, i4)
