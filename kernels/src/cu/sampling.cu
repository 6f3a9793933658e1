// Token sampling on the GPU, the CPU sampler's algorithm (turbomind's
// sampling.rs) on one block of 1024 threads per row, so that a seeded
// request draws the same tokens on either backend (up to the rounding of
// sums at the edges of the kept set):
//   1. penalties (`apply_penalties`, one thread per (row, token) entry):
//      Hugging Face's repetition penalty for every token of the history,
//      then OpenAI's presence and frequency penalties for generated ones;
//   2. greedy rows (temperature 0) take the first largest logit;
//   3. other rows scale by 1/temperature (a division, as on the CPU) and
//      order tokens by value, descending, then by index: the keys
//      ((~order(value)) << 32 | index), unique, ascending in that order. A
//      radix select (8-bit digits, integer counts, so deterministic) finds
//      the min(top_k or vocab, 1024) best keys, which a bitonic sort orders;
//      probabilities over the top-k (or the whole vocabulary), then top-p
//      (the shortest prefix whose cumulative probability reaches top_p),
//      min-p (the leading tokens at least min_p times the best), and the
//      draw: the first token whose cumulative probability reaches
//      u · (kept mass), u the host's uniform number.
// Where the kept set may reach past the 1024 sorted candidates (a flat
// distribution, top_k > 1024) or a logit is NaN, the row's token is -1
// and the host samples that row itself, from the penalized logits.
//
// params: 8 floats per row: temperature, top_k (0: off), top_p, min_p, u,
// repetition penalty, presence penalty, frequency penalty.

#define SAMPLE_CAND 1024
#define SP_TEMP 0
#define SP_TOPK 1
#define SP_TOPP 2
#define SP_MINP 3
#define SP_U 4
#define SP_REP 5
#define SP_PRES 6
#define SP_FREQ 7
#define SP_N 8

// entries: 4 ints each, (row, token, generated count, seen in history).
extern "C" __global__ void apply_penalties(float* __restrict__ logits, const int* __restrict__ entries,
                                           int n_entries, const float* __restrict__ params, int V) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_entries) return;
    const int row = entries[4 * e], tok = entries[4 * e + 1];
    const int count = entries[4 * e + 2], seen = entries[4 * e + 3];
    if (tok < 0 || tok >= V) return;
    const float* p = params + (size_t)row * SP_N;
    float* l = logits + (size_t)row * V + tok;
    float v = *l;
    const float rep = p[SP_REP];
    if (seen && rep != 1.0f) v = v > 0.0f ? v / rep : v * rep;
    const float pres = p[SP_PRES], freq = p[SP_FREQ];
    if (count > 0 && (pres != 0.0f || freq != 0.0f)) v -= pres + freq * (float)count;
    *l = v;
}

// Larger float, larger code (NaN excluded; −0 below +0, as total_cmp).
__device__ __forceinline__ u32 float_order(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 sort_key(float v, u32 i) {
    return ((u64)(~float_order(v)) << 32) | i;
}

__device__ __forceinline__ float key_value(u64 key) {
    const u32 o = ~(u32)(key >> 32);
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

__device__ __forceinline__ u64 block_min_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : ~0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_incl_scan(float v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

// The first j < n with Σ_{i≤j} p[i] ≥ target (one warp), or -1; *sum gets
// Σ_{i<n} p[i].
__device__ __forceinline__ int first_reaching(const float* p, int n, float target, int lane,
                                              float* sum) {
    float carry = 0.0f;
    int found = -1;
    for (int base = 0; base < n; base += 32) {
        const int j = base + lane;
        const float c = warp_incl_scan(j < n ? p[j] : 0.0f, lane) + carry;
        const unsigned m = __ballot_sync(0xffffffffu, j < n && c >= target);
        if (found < 0 && m) found = base + __ffs(m) - 1;
        carry = __shfl_sync(0xffffffffu, c, 31);
    }
    *sum = carry;
    return found;
}

// Launch with 1024 threads per block, one block per row; out[row] is the
// token, or -1 where the host must sample the row.
extern "C" __global__ void __launch_bounds__(1024) sample_rows(const float* __restrict__ logits,
                                                               const float* __restrict__ params,
                                                               int* __restrict__ out, int V) {
    __shared__ u64 keys[SAMPLE_CAND];
    __shared__ float probs[SAMPLE_CAND];
    __shared__ u32 hist[256];
    __shared__ u64 scratch_key[32];
    __shared__ float scratch[32];
    __shared__ int s_count, s_need, s_done;
    __shared__ u64 s_prefix;
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* x = logits + (size_t)row * V;
    const float* p = params + (size_t)row * SP_N;
    const float temp = p[SP_TEMP];
    const bool greedy = temp == 0.0f;

    // The best key (greedy: +0 for −0, so ties between zeros go to the
    // lower index as the CPU's `>` scan does) and any NaN.
    u64 best = ~0ull;
    int nan = 0;
    for (int i = tid; i < V; i += blockDim.x) {
        const float v = greedy ? x[i] + 0.0f : x[i] / temp;
        nan |= v != v;
        best = min(best, sort_key(v, (u32)i));
    }
    nan = __syncthreads_or(nan);
    best = block_min_u64(best, scratch_key);
    if (nan) {
        if (tid == 0) out[row] = -1;
        return;
    }
    if (greedy || !isfinite(key_value(best))) {
        // A non-finite maximum leaves no distribution: the CPU takes the
        // best token then too.
        if (tid == 0) out[row] = (int)(u32)best;
        return;
    }
    const float maxv = key_value(best);
    const int top_k = (int)p[SP_TOPK];
    const int target = (top_k > 0 && top_k < V) ? top_k : V;
    const int cnt = min(target, SAMPLE_CAND);
    if (target > SAMPLE_CAND && target < V) {
        // top_k above the candidates: its normalizer needs all k.
        if (tid == 0) out[row] = -1;
        return;
    }

    // Radix select of the cnt smallest keys: afterwards they are the keys
    // with (key >> shift) <= prefix.
    u64 prefix = 0;
    int shift = 64;
    if (cnt < V) {
        int need = cnt;
        bool done = false;
        while (!done) {
            shift -= 8;
            if (tid < 256) hist[tid] = 0;
            __syncthreads();
            for (int i = tid; i < V; i += blockDim.x) {
                const u64 key = sort_key(x[i] / temp, (u32)i);
                if (shift == 56 || (key >> (shift + 8)) == prefix)
                    atomicAdd(&hist[(key >> shift) & 255], 1u);
            }
            __syncthreads();
            if (warp == 0) {
                // Lane l holds bins 8l..8l+7; the bin where the count
                // reaches `need`.
                u32 local[8], s = 0;
#pragma unroll
                for (int b = 0; b < 8; ++b) {
                    local[b] = hist[8 * lane + b];
                    s += local[b];
                }
                u32 incl = s;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const u32 n = __shfl_up_sync(0xffffffffu, incl, o);
                    if (lane >= o) incl += n;
                }
                const u32 excl = incl - s;
                const unsigned m = __ballot_sync(0xffffffffu, incl >= (u32)need);
                if (lane == __ffs(m) - 1) {
                    u32 cum = excl;
#pragma unroll
                    for (int b = 0; b < 8; ++b) {
                        if (cum + local[b] >= (u32)need) {
                            s_prefix = (prefix << 8) | (u64)(8 * lane + b);
                            s_need = need - (int)cum;
                            s_done = local[b] == (u32)(need - (int)cum);
                            break;
                        }
                        cum += local[b];
                    }
                }
            }
            __syncthreads();
            prefix = s_prefix;
            need = s_need;
            done = s_done || shift == 0;
            __syncthreads();
        }
    }

    // Gather and sort the candidates.
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int i = tid; i < V; i += blockDim.x) {
        const u64 key = sort_key(x[i] / temp, (u32)i);
        if (shift == 64 || (key >> shift) <= prefix) {
            const int at = atomicAdd(&s_count, 1);
            if (at < SAMPLE_CAND) keys[at] = key;
        }
    }
    __syncthreads();
    for (int j = tid; j < SAMPLE_CAND; j += blockDim.x)
        if (j >= cnt) keys[j] = ~0ull;
    __syncthreads();
    for (int k = 2; k <= SAMPLE_CAND; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = tid; i < SAMPLE_CAND; i += blockDim.x) {
                const int ixj = i ^ j;
                if (ixj > i) {
                    const u64 a = keys[i], b = keys[ixj];
                    if (((i & k) == 0) ? a > b : a < b) {
                        keys[i] = b;
                        keys[ixj] = a;
                    }
                }
            }
            __syncthreads();
        }
    }

    // Probabilities over the top-k, or over the whole vocabulary.
    float e = 0.0f;
    if (tid < cnt) e = expf(key_value(keys[tid]) - maxv);
    float total;
    if (target <= SAMPLE_CAND) {
        total = block_sum(e, scratch);
    } else {
        float s = 0.0f;
        for (int i = tid; i < V; i += blockDim.x) s += expf(x[i] / temp - maxv);
        total = block_sum(s, scratch);
    }
    probs[tid] = tid < cnt ? e / total : 0.0f;
    const float top_p = p[SP_TOPP], min_p = p[SP_MINP];
    const bool no_cut = top_p >= 1.0f && min_p <= 0.0f;
    // The kept mass when nothing cuts the whole vocabulary: Σ p over it.
    float mass_all = 0.0f;
    if (no_cut && cnt < target && target == V) {
        float s = 0.0f;
        for (int i = tid; i < V; i += blockDim.x) s += expf(x[i] / temp - maxv) / total;
        mass_all = block_sum(s, scratch);
    }
    __syncthreads();
    if (warp != 0) return;

    // keep: the kept prefix's length; `open` when it may reach past cnt.
    int keep = target;
    bool open = cnt < target;
    float sum;
    if (top_p < 1.0f) {
        const int f = first_reaching(probs, cnt, top_p, lane, &sum);
        if (f >= 0) {
            keep = f + 1;
            open = false;
        }
    }
    if (min_p > 0.0f) {
        const float thr = min_p * probs[0];
        int c = cnt;
        for (int base = 0; base < cnt; base += 32) {
            const int j = base + lane;
            const unsigned m = __ballot_sync(0xffffffffu, j < cnt && probs[j] < thr);
            if (m) {
                c = base + __ffs(m) - 1;
                break;
            }
        }
        c = max(c, 1);
        if (c < cnt || !(cnt < target)) {
            keep = min(keep, c);
            open = false;
        }
        // Otherwise min-p keeps at least cnt: it changes nothing known.
    }
    float kept;
    if (open) {
        if (!(no_cut && target == V)) {
            if (lane == 0) out[row] = -1;
            return;
        }
        kept = mass_all;
    } else {
        first_reaching(probs, keep, 2.0f, lane, &kept);
    }
    if (!isfinite(kept) || kept <= 0.0f) {
        if (lane == 0) out[row] = (int)(u32)keys[0];
        return;
    }
    const float r = p[SP_U] * kept;
    const int n = min(keep, cnt);
    const int f = first_reaching(probs, n, r, lane, &sum);
    int token;
    if (f >= 0) token = (int)(u32)keys[f];
    else if (!open) token = (int)(u32)keys[n - 1];  // rounding: the CPU's last kept token
    else token = -1;                                 // the draw lies past the candidates
    if (lane == 0) out[row] = token;
}
