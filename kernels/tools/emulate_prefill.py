#!/usr/bin/env python3
"""Lane-by-lane numpy emulation of `paged_attn_prefill<HD, DT, STATIC>`
(kernels/src/cu/paged_attn_prefill.cu as of session 7, 2026-12-06: no splits,
grid = (tiles, NH), begin 0, end maxpos + 1, direct normalized writes; the
tile loader's token-head lookup by threads 0..127 into `PrefillKey keys[128]`
at PrefillSmem::KEYS_AT), plus the host path of paged/mod.rs:
`RowMeta::planned` (tiles at tiles_at, decode row list at rows_at), the decode
launch over the row list (`decode_row`) with partial states indexed by launch
slot, the prefill launch, and `attn_merge` over the same slots.

The decode kernels' math is NOT emulated: each (slot, split) partial state
(m, l, acc) is computed directly in float64 (stored as float32 as the kernels
do) with the kernels' index arithmetic (grid, GQA chunks, split bounds, qp).

Each thread block is run as 4 warp coroutines (yielding at __syncthreads and
at a few points between), under a scheduler policy (SCHED=lockstep, warp0,
warp3), with a shared-memory race checker at the granularity of 16 bytes
(every shared access of the kernel is 16-byte aligned and 16 bytes wide):
within one barrier interval, accesses to the same granule by different warps
with at least one write are hazards; cp.async writes stay pending from their
issue until the issuing thread's cp.async.wait_group retires their group, and
become visible after the next barrier.

A check of the kernel's index and fragment logic without a GPU, written by
hand from the CUDA source: it does not read the .cu file, so a change to the
kernel needs the same change here. Run `python3 kernels/tools/emulate_prefill.py
[case numbers]` (about 4 minutes for every case on 2 cores); each case prints
its largest error against float64 attention and the hazards found.

Env: SCHED (default lockstep; warp0 and warp3 run one warp ahead), NOFIX=1
(drops the __syncthreads() after the fp16 prologue's copy_commit(), the race
this emulation found in session 7), MUTATE (noclamp, noend, notrans: planted
bugs the emulation must catch).

PTX semantics used:
  mma.m16n8k16.row.col: lane = 4g + t; a0=(g, 2t..2t+1) a1=(g+8, 2t..) a2=(g,
  2t+8..) a3=(g+8, 2t+8..); b0=(k 2t..2t+1, n g) b1=(k 2t+8..2t+9, n g);
  c0,c1=(g, 2t..2t+1) c2,c3=(g+8, 2t..2t+1); low half = first element.
  ldmatrix.x4: lanes 8m..8m+7 give the row addresses of matrix m; lane (g,t)
  gets (row g, cols 2t, 2t+1) of matrix m in register m; .trans: (row 2t, col
  g) and (row 2t+1, col g).
"""
import sys
import time

import os

import numpy as np

# Sanity mutations (to show the emulation detects bugs); unset = the kernel as written.
MUTATE = os.environ.get("MUTATE", "")

F32, F16 = np.float32, np.float16
INF = np.float32(np.inf)
DT_F16, DT_I8, DT_I4 = 1, 2, 3
PF_KT, PF_WARPS = 64, 4
PF_ROWS = 16 * PF_WARPS


# ----------------------------------------------------------------------------
# Scalar helpers (CUDA intrinsics)
# ----------------------------------------------------------------------------
def h2_bits(lo, hi):
    """__floats2half2_rn(lo, hi) as its u32 bits: low half = lo."""
    return int(np.array([F32(lo), F32(hi)], dtype=F32).astype(F16).view(np.uint32)[0])


def half2_of(u):
    """The two halves of a u32 (low, high) as float32."""
    h = np.array([u], dtype=np.uint32).view(F16)
    return F32(h[0]), F32(h[1])


def roundf(x):
    """C roundf: half away from zero (float32 in, float32 out; exact via float64)."""
    x = np.float64(np.asarray(x, dtype=F32))
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(F32)


def fmaf(a, b, c):
    return F32(np.float64(F32(a)) * np.float64(F32(b)) + np.float64(F32(c)))


def half_ru(x):
    """__float2half_ru."""
    x = F32(x)
    h = F16(x)
    if np.float64(h) < np.float64(x):
        h = np.nextafter(h, F16(np.inf))
    return h


def expf(x):
    return F32(np.exp(F32(x)))


# ----------------------------------------------------------------------------
# Pool layout (paged_attn.cu)
# ----------------------------------------------------------------------------
def bytes_per_th(dt, hd):
    return {DT_F16: 2 * hd, DT_I8: hd, DT_I4: hd // 2}[dt]


def param_segment_bytes(dt, BL):
    zero_bytes = BL if dt == DT_I8 else 2 * BL
    return 2 * BL + ((zero_bytes + 1) & ~1)


def key_th(meta, blocks_off, p, layer, L, H, head, BL):
    block = int(meta[blocks_off + p // BL])
    return ((((block * L + layer) * 2) * H + head) * BL + p % BL)


def kv_token_params(dt, params, th, BL):
    seg = (th // BL) * param_segment_bytes(dt, BL)
    t = th % BL
    scale = F32(params[seg + 2 * t: seg + 2 * t + 2].view(F16)[0])
    if dt == DT_I8:
        zero = F32(-F32(params[seg + 2 * BL + t]) * scale)
    else:
        zero = F32(params[seg + 2 * BL + 2 * t: seg + 2 * BL + 2 * t + 2].view(F16)[0])
    return scale, zero


class Pool:
    def __init__(self, num_blocks, L, H, BL, HD, dt, static_mode, rng):
        self.nb, self.L, self.H, self.BL, self.HD, self.dt = num_blocks, L, H, BL, HD, dt
        self.static = static_mode
        n_th = num_blocks * L * 2 * H * BL
        self.data = rng.integers(0, 256, n_th * bytes_per_th(dt, HD), dtype=np.uint8)
        self.params = rng.integers(0, 256, (n_th // BL) * param_segment_bytes(dt, BL) if dt != DT_F16 else 16,
                                   dtype=np.uint8)
        self.statics = np.zeros(L * 2 * H * 2, dtype=F32)
        if static_mode:
            for i in range(L * 2 * H):
                self.statics[2 * i] = F32(rng.uniform(0.01, 0.03))
                self.statics[2 * i + 1] = F32(rng.uniform(-3.0, -1.0))

    def kv_write(self, x, block, layer, which, head, token):
        """kv_write for one token-head: x = HD float32 values."""
        HD, BL, dt = self.HD, self.BL, self.dt
        th = ((((block * self.L + layer) * 2 + which) * self.H + head) * BL + token)
        dst = th * bytes_per_th(dt, HD)
        if dt == DT_F16:
            self.data[dst: dst + 2 * HD] = x.astype(F16).view(np.uint8)
            return
        levels = F32(255.0 if dt == DT_I8 else 15.0)
        if self.static:
            s = self.statics[(((layer * 2 + which) * self.H + head) * 2):][:2]
            scale, zero = F32(s[0]), F32(s[1])
        else:
            lo, hi = F32(x.min()), F32(x.max())
            step = F32(max(F32((hi - lo) / levels), F32(1e-8)))
            seg = (th // BL) * param_segment_bytes(dt, BL)
            t = th % BL
            if dt == DT_I8:
                top = F32(lo + F32(step * levels))
                ideal = roundf(F32(-lo / step))
                needed = step
                if ideal > levels:
                    needed = F32(max(step, F32(-lo / levels)))
                elif ideal < 0:
                    needed = F32(max(step, F32(top / levels)))
                hs = half_ru(max(needed, F32(6.103515625e-05)))
                s = F32(hs)
                zp = F32(min(max(roundf(F32(-lo / s)), F32(0)), levels))
                self.params[seg + 2 * t: seg + 2 * t + 2] = np.array([hs], F16).view(np.uint8)
                self.params[seg + 2 * BL + t] = np.uint8(zp)
                scale, zero = s, F32(-zp * s)
            else:
                hs = F16(max(step, F32(6.103515625e-05)))
                hz = F16(lo)
                self.params[seg + 2 * t: seg + 2 * t + 2] = np.array([hs], F16).view(np.uint8)
                self.params[seg + 2 * BL + 2 * t: seg + 2 * BL + 2 * t + 2] = np.array([hz], F16).view(np.uint8)
                scale, zero = F32(hs), F32(hz)
        # quantize_level, elementwise in float32
        q = np.minimum(np.maximum(roundf(((x.astype(F32) - zero) / scale).astype(F32)), F32(0)), levels)
        codes = q.astype(np.uint32)
        if dt == DT_I8:
            self.data[dst: dst + HD] = codes.astype(np.uint8)
        else:
            self.data[dst: dst + HD // 2] = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)

    def read_back(self, block, layer, which, head, token):
        """The value the pool stores (the dequantized value), float64, as the
        kernel's formula would give without the fp16 rounding."""
        HD, BL, dt = self.HD, self.BL, self.dt
        th = ((((block * self.L + layer) * 2 + which) * self.H + head) * BL + token)
        src = th * bytes_per_th(dt, HD)
        if dt == DT_F16:
            return self.data[src: src + 2 * HD].view(F16).astype(np.float64)
        if dt == DT_I8:
            codes = self.data[src: src + HD].astype(np.float64)
        else:
            b = self.data[src: src + HD // 2].astype(np.int64)
            codes = np.empty(HD)
            codes[0::2] = b & 15
            codes[1::2] = b >> 4
        if self.static:
            s = self.statics[(((layer * 2 + which) * self.H + head) * 2):][:2]
            scale, zero = float(s[0]), float(s[1])
        elif dt == DT_I8:
            seg = (th // BL) * param_segment_bytes(dt, BL)
            t = th % BL
            scale = float(self.params[seg + 2 * t: seg + 2 * t + 2].view(F16)[0])
            zp = float(self.params[seg + 2 * BL + t])
            return (codes - zp) * scale
        else:
            scale, zero = (float(v) for v in kv_token_params(dt, self.params, th, BL))
        return codes * scale + zero



# ----------------------------------------------------------------------------
# Metadata (meta.rs RowMeta::planned, prefill.rs plan_prefill)
# ----------------------------------------------------------------------------
def plan_prefill(rows, min_run):
    """rows: [(pos, table key)] -> (tiles [(first, n, last_pos)], decode rows)."""
    tiles, decode = [], []
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and rows[end][1] == rows[start][1]:
            end += 1
        if min_run > 0 and end - start >= min_run:
            for first in range(start, end, PF_ROWS):
                n = min(PF_ROWS, end - first)
                tiles.append((first, n, max(r[0] for r in rows[first:first + n])))
        else:
            decode.extend(range(start, end))
        start = end
    return tiles, decode


def build_meta(rows, tables, min_run=16):
    """rows: [(pos, table id)]; tables: {id: [block ids]}. As RowMeta::planned:
    returns (meta, prefill) with prefill = None when the plan has no tiles,
    else dict(tiles_at, tiles, rows_at, decode_rows)."""
    n = len(rows)
    host = [r[0] for r in rows] + [0] * n
    last = None
    for i, (pos, tid) in enumerate(rows):
        if last is not None and last[0] == tid:
            off = last[1]
        else:
            off = len(host) - 2 * n
            host.extend(tables[tid])
            last = (tid, off)
        host[n + i] = off
    tiles, decode = plan_prefill(rows, min_run)
    prefill = None
    if tiles:
        tiles_at = len(host)
        for t in tiles:
            host.extend(t)
        rows_at = len(host)
        host.extend(decode)
        prefill = dict(tiles_at=tiles_at, tiles=len(tiles), rows_at=rows_at, decode_rows=len(decode))
    return np.array(host, dtype=np.int32), prefill


def use_prefill_tiles(always, tiles, heads, sms):
    return always or tiles * heads >= sms


# Host constants (paged/mod.rs)
SPLIT_LEN = 256
INT2_SPLIT_LEN = 512
GROUP_WIDTHS = [1, 4, 8]
INT_GROUP_WIDTH = 8
INT2_VARIANTS = {(DT_I8, 64): 1, (DT_I4, 64): 1, (DT_I8, 128): 3, (DT_I4, 128): 4, (DT_I8, 256): 1, (DT_I4, 256): 1}


def host_split_len(dt, HD, BL):
    """paged_attention_with, IntAttnConfig::default() (stream Some((0,0)),
    split 512), an sm_80+ device."""
    if dt != DT_F16:
        stages = 1 if (BL % 16 == 0 and (dt, HD) in INT2_VARIANTS) else 0
        # split_len = cfg.split_len if integer && (stages > 0 || cfg.stream is None) else SPLIT_LEN
        return INT2_SPLIT_LEN if stages > 0 else SPLIT_LEN
    return SPLIT_LEN


def host_width(dt, group):
    if dt != DT_F16:
        return INT_GROUP_WIDTH
    return next((w for w in GROUP_WIDTHS if w >= group), GROUP_WIDTHS[-1])


def prefill_smem_bytes(dt, head_dim):
    """paged/prefill.rs prefill_smem_bytes, verbatim."""
    stages = 2 if dt == DT_F16 else 1
    return stages * 2 * 64 * (head_dim + 8) * 2 + 2 * 64 * 16


# ----------------------------------------------------------------------------
# Warp-level primitives, lane by lane
# ----------------------------------------------------------------------------
LANES = np.arange(32)


def shfl_xor(v, o):
    return v[LANES ^ o]


def ldsm_x4(smem, addr):
    """addr[32]: byte offsets into shared memory (lane 8m + i gives row i of
    matrix m). Returns r[32][4] u32."""
    r = np.zeros((32, 4), dtype=np.uint32)
    for lane in range(32):
        assert addr[lane] % 16 == 0, "ldmatrix row address not 16-byte aligned"
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for m in range(4):
            row = int(addr[8 * m + g])
            r[lane, m] = smem[row + 4 * t: row + 4 * t + 4].view(np.uint32)[0]
    return r


def ldsm_x4_trans(smem, addr):
    r = np.zeros((32, 4), dtype=np.uint32)
    for lane in range(32):
        assert addr[lane] % 16 == 0, "ldmatrix row address not 16-byte aligned"
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for m in range(4):
            r0 = int(addr[8 * m + 2 * t])
            r1 = int(addr[8 * m + 2 * t + 1])
            lo = int(smem[r0 + 2 * g: r0 + 2 * g + 2].view(np.uint16)[0])
            hi = int(smem[r1 + 2 * g: r1 + 2 * g + 2].view(np.uint16)[0])
            r[lane, m] = lo | (hi << 16)
    return r


def _halves(u):
    h = np.ascontiguousarray(u, dtype=np.uint32).view(F16).astype(np.float64)
    return h[..., 0::2], h[..., 1::2]  # low, high


_COVER_CHECKED = False


def mma16816(a, b, c):
    """D = A.B + C; a[32][4] u32, b[32][2] u32, c[32][4] f32 -> d[32][4] f32."""
    global _COVER_CHECKED
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    C = np.full((16, 8), np.nan)
    alo, ahi = _halves(a)
    blo, bhi = _halves(b)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g, 2 * t], A[g, 2 * t + 1] = alo[lane, 0], ahi[lane, 0]
        A[g + 8, 2 * t], A[g + 8, 2 * t + 1] = alo[lane, 1], ahi[lane, 1]
        A[g, 2 * t + 8], A[g, 2 * t + 9] = alo[lane, 2], ahi[lane, 2]
        A[g + 8, 2 * t + 8], A[g + 8, 2 * t + 9] = alo[lane, 3], ahi[lane, 3]
        B[2 * t, g], B[2 * t + 1, g] = blo[lane, 0], bhi[lane, 0]
        B[2 * t + 8, g], B[2 * t + 9, g] = blo[lane, 1], bhi[lane, 1]
        C[g, 2 * t], C[g, 2 * t + 1] = c[lane, 0], c[lane, 1]
        C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = c[lane, 2], c[lane, 3]
    if not _COVER_CHECKED:
        # The fragment maps are bijections (checked once on indices).
        seen = np.zeros((16, 16), int)
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for (rr, kk) in [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1),
                             (g, 2 * t + 8), (g, 2 * t + 9), (g + 8, 2 * t + 8), (g + 8, 2 * t + 9)]:
                seen[rr, kk] += 1
        assert (seen == 1).all()
        _COVER_CHECKED = True
    D = (A @ B + C).astype(F32)
    d = np.zeros((32, 4), dtype=F32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        d[lane] = [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]
    return d


# ----------------------------------------------------------------------------
# Shared memory layout (PrefillSmem) and the race checker
# ----------------------------------------------------------------------------
SCHED = os.environ.get("SCHED", "lockstep")
FIX = os.environ.get("NOFIX", "") != "1"
PREFILL_KEY_SIZE, PREFILL_KEY_ALIGN = 16, 8  # struct { u64 th; float scale, zero; }


class Smem:
    def __init__(self, HD, DT):
        self.RS = HD + 8
        self.TILE = PF_KT * self.RS
        self.NST = 2 if DT == DT_F16 else 1
        self.KEYS_AT = self.NST * 2 * self.TILE * 2
        self.BYTES = self.KEYS_AT + 2 * PF_KT * PREFILL_KEY_SIZE


BIG = 1 << 60


class Race:
    """Shared-memory hazards per 16-byte granule within barrier intervals."""

    def __init__(self, nbytes, keys_at):
        n = nbytes // 16
        self.keys_g = keys_at // 16
        self.k = 0
        self.w_int = np.full(n, -1, np.int64)
        self.w_warp = np.full(n, -1, np.int64)
        self.r_last = np.full((n, PF_WARPS), -1, np.int64)
        self.vis = np.full(n, -1, np.int64)  # async writes: visible from this interval
        self.aw_warp = np.full(n, -1, np.int64)
        self.groups = {}  # tid -> list of committed groups (granule arrays)
        self.open = {}  # tid -> granules issued since the last commit
        self.hazards = {}

    def _note(self, kind, g):
        region = "keys" if g >= self.keys_g else "stage"
        key = (kind, region)
        self.hazards[key] = self.hazards.get(key, 0) + 1

    def barrier(self):
        self.k += 1

    def write(self, warp, byte):
        assert byte % 16 == 0
        g, k = byte // 16, self.k
        if any(self.r_last[g, w] == k for w in range(PF_WARPS) if w != warp):
            self._note("WAR", g)
        if self.w_int[g] == k and self.w_warp[g] != warp:
            self._note("WAW", g)
        if self.vis[g] > k:
            self._note("WAW-async", g)
        self.w_int[g], self.w_warp[g] = k, warp

    def read(self, warp, bytes_):
        g = np.array(bytes_, np.int64)  # a copy
        assert (g % 16 == 0).all()
        g //= 16
        k = self.k
        bad = (self.w_int[g] == k) & (self.w_warp[g] != warp)
        for x in g[bad]:
            self._note("RAW", x)
        for x in g[self.vis[g] > k]:
            self._note("RAW-async", x)
        self.r_last[g, warp] = k

    def async_write(self, tid, byte):
        assert byte % 16 == 0
        g, k, warp = byte // 16, self.k, tid >> 5
        if any(self.r_last[g, w] == k for w in range(PF_WARPS) if w != warp):
            self._note("WAR-async", g)
        if self.w_int[g] == k and self.w_warp[g] != warp:
            self._note("WAW-async", g)
        if self.vis[g] > k:
            self._note("WAW-async", g)
        self.vis[g] = BIG
        self.open.setdefault(tid, []).append(g)

    def commit(self, tid):
        self.groups.setdefault(tid, []).append(self.open.pop(tid, []))

    def wait(self, tid, n):
        grs = self.groups.setdefault(tid, [])
        while len(grs) > n:
            for g in grs.pop(0):
                self.vis[g] = self.k + 1  # visible to all after the next barrier


BARRIER, STEP = "barrier", "step"


def run_block(progs, race):
    """Runs warp coroutines under SCHED; releases a barrier when every warp
    waits at it (a warp that exits while others wait is a deadlock)."""
    n = len(progs)
    at_barrier, done = set(), set()
    while len(done) < n:
        runnable = [w for w in range(n) if w not in at_barrier and w not in done]
        if not runnable:
            assert not done, "a warp exited while others wait at a barrier"
            at_barrier.clear()
            race.barrier()
            continue
        if SCHED == "lockstep":
            order = runnable  # one step each, in warp order
        elif SCHED == "warp0":
            order = [runnable[0]]  # the lowest runnable warp runs until it blocks
        elif SCHED == "warp3":
            order = [runnable[-1]]
        else:
            raise ValueError(SCHED)
        for w in order:
            while True:
                try:
                    ev = next(progs[w])
                except StopIteration:
                    done.add(w)
                    break
                if ev == BARRIER:
                    at_barrier.add(w)
                    break
                if SCHED == "lockstep":
                    break
    assert not at_barrier, "warps left waiting at a barrier"


# ----------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------
def paged_attn_prefill(HD, DT, STATIC, bx, by, q, meta, rows, tiles_at, pool, layer, L, H, NH, BL,
                       softmax_scale, out, out_count, stats):
    S = Smem(HD, DT)
    KS, NT, DTL = HD // 16, PF_KT // 8, HD // 8
    CPK = HD // 8
    CHUNKS = 2 * PF_KT * CPK
    assert 2 * PF_KT <= PF_WARPS * 32
    smem = np.full(S.BYTES, 0xff, dtype=np.uint8)  # uninitialized: fp16 NaN
    race = Race(S.BYTES, S.KEYS_AT)
    assert S.KEYS_AT % PREFILL_KEY_ALIGN == 0 and S.KEYS_AT % 16 == 0

    tile = tiles_at + 3 * bx
    row0, nrows, maxpos = int(meta[tile]), int(meta[tile + 1]), int(meta[tile + 2])
    qh = by
    head = qh // (NH // H)
    begin, end = 0, maxpos + 1
    stats["blocks"] += 1
    blocks_off = 2 * rows + int(meta[rows + row0])
    g_of = LANES >> 2
    t_of = LANES & 3
    ntiles = (end - begin + PF_KT - 1) // PF_KT

    # --- prefill_load_tile, split into its two halves ---
    def load_keys(kt0, tids):
        for tid in tids:
            if tid >= 2 * PF_KT:
                continue
            which, key = tid // PF_KT, tid % PF_KT
            p = min(kt0 + key, end - 1)
            th = key_th(meta, blocks_off, p, layer, L, H, head, BL) + which * H * BL
            scale, zero = F32(1.0), F32(0.0)
            if DT != DT_F16:
                if STATIC:
                    st = ((layer * 2 + which) * H + head) * 2
                    scale, zero = F32(pool.statics[st]), F32(pool.statics[st + 1])
                else:
                    scale, zero = kv_token_params(DT, pool.params, th, BL)
            a = S.KEYS_AT + PREFILL_KEY_SIZE * tid
            race.write(tid >> 5, a)
            smem[a: a + 8] = np.array([th], np.uint64).view(np.uint8)
            smem[a + 8: a + 16] = np.array([scale, zero], F32).view(np.uint8)

    def load_chunks(stage, kt0, tids):
        for tid in tids:
            for c in range(tid, CHUNKS, PF_WARPS * 32):
                which = c // (PF_KT * CPK)
                key = (c // CPK) % PF_KT
                part = c % CPK
                a = S.KEYS_AT + PREFILL_KEY_SIZE * (which * PF_KT + key)
                race.read(tid >> 5, [a])
                th = int(smem[a: a + 8].view(np.uint64)[0])
                scale, zero = smem[a + 8: a + 16].view(F32)
                dst = (stage + which * S.TILE + key * S.RS + part * 8) * 2  # bytes
                assert 0 <= dst and dst + 16 <= S.KEYS_AT and dst % 16 == 0
                if MUTATE == "noclamp" and kt0 + key >= end:
                    continue
                if DT == DT_F16:
                    src = th * (2 * HD) + part * 16
                    assert src % 16 == 0 and src + 16 <= pool.data.size
                    race.async_write(tid, dst)
                    smem[dst: dst + 16] = pool.data[src: src + 16]  # copy16_async
                    continue
                x = [F32(0)] * 8
                if DT == DT_I8:
                    src = th * HD + part * 8
                    assert src % 8 == 0 and src + 8 <= pool.data.size
                    wx = int(pool.data[src: src + 4].view(np.uint32)[0])
                    wy = int(pool.data[src + 4: src + 8].view(np.uint32)[0])
                    for i in range(4):
                        x[i] = F32((wx >> (8 * i)) & 0xff)
                        x[4 + i] = F32((wy >> (8 * i)) & 0xff)
                else:
                    src = th * (HD // 2) + part * 4
                    assert src % 4 == 0 and src + 4 <= pool.data.size
                    w = int(pool.data[src: src + 4].view(np.uint32)[0])
                    for i in range(8):
                        x[i] = F32((w >> (4 * i)) & 0xf)
                h = [h2_bits(fmaf(x[2 * i], scale, zero), fmaf(x[2 * i + 1], scale, zero)) for i in range(4)]
                race.write(tid >> 5, dst)
                smem[dst: dst + 16] = np.array(h, dtype=np.uint32).view(np.uint8)

    def load_tile(stage, kt0, tids):
        load_keys(kt0, tids)
        yield BARRIER  # __syncthreads() inside prefill_load_tile
        load_chunks(stage, kt0, tids)
        yield STEP

    def warp_prog(warp):
        tids = range(32 * warp, 32 * warp + 32)
        ra = 16 * warp + g_of
        rb = ra + 8
        pos_a = np.array([int(meta[row0 + r]) if r < nrows else -1 for r in ra])
        pos_b = np.array([int(meta[row0 + r]) if r < nrows else -1 for r in rb])
        warp_last = np.maximum(pos_a, pos_b)
        o_ = 1
        while o_ < 32:
            warp_last = np.maximum(warp_last, shfl_xor(warp_last, o_))
            o_ <<= 1
        assert (warp_last == warp_last[0]).all()
        qa = np.zeros((32, KS, 4), dtype=np.uint32)
        for lane in range(32):
            t = t_of[lane]
            qra = ((row0 + min(ra[lane], nrows - 1)) * NH + qh) * HD
            qrb = ((row0 + min(rb[lane], nrows - 1)) * NH + qh) * HD
            sa = F32(softmax_scale) if ra[lane] < nrows else F32(0)
            sb = F32(softmax_scale) if rb[lane] < nrows else F32(0)
            for s in range(KS):
                for h in range(2):
                    xa = q[qra + 16 * s + 8 * h + 2 * t: qra + 16 * s + 8 * h + 2 * t + 2]
                    xb = q[qrb + 16 * s + 8 * h + 2 * t: qrb + 16 * s + 8 * h + 2 * t + 2]
                    qa[lane, s, 2 * h] = h2_bits(F32(xa[0] * sa), F32(xa[1] * sa))
                    qa[lane, s, 2 * h + 1] = h2_bits(F32(xb[0] * sb), F32(xb[1] * sb))
        m = np.full((32, 2), -INF, dtype=F32)
        l = np.zeros((32, 2), dtype=F32)
        o = np.zeros((32, DTL, 4), dtype=F32)

        if DT == DT_F16:
            yield from load_tile(0, begin, tids)
            for tid in tids:
                race.commit(tid)
            if FIX:
                yield BARRIER
        for it in range(ntiles):
            kt0 = begin + it * PF_KT
            stage = (it & 1 if DT == DT_F16 else 0) * 2 * S.TILE
            if DT == DT_F16:
                if it + 1 < ntiles:
                    yield from load_tile(((it + 1) & 1) * 2 * S.TILE, kt0 + PF_KT, tids)
                    for tid in tids:
                        race.commit(tid)
                        race.wait(tid, 1)
                else:
                    for tid in tids:
                        race.wait(tid, 0)
            else:
                yield from load_tile(stage, kt0, tids)
            yield BARRIER

            if warp_last[0] >= kt0:
                stats["warp_tiles"] += 1
                ks = stage * 2
                vs = (stage + S.TILE) * 2
                sc = np.zeros((32, NT, 4), dtype=F32)
                mm = LANES >> 3
                mr = LANES & 7
                for s in range(0, KS, 2):
                    for j in range(NT):
                        addr = ks + ((8 * j + mr) * S.RS + 16 * s + 8 * mm) * 2
                        assert (addr + 16 <= S.KEYS_AT).all()
                        race.read(warp, addr)
                        b = ldsm_x4(smem, addr)
                        sc[:, j] = mma16816(qa[:, s], b[:, 0:2], sc[:, j])
                        sc[:, j] = mma16816(qa[:, s + 1], b[:, 2:4], sc[:, j])
                mx_a = m[:, 0].copy()
                mx_b = m[:, 1].copy()
                for lane in range(32):
                    t = t_of[lane]
                    for j in range(NT):
                        for e in range(2):
                            kp = kt0 + 8 * j + 2 * t + e
                            if MUTATE == "noend":
                                ok_a, ok_b = kp <= pos_a[lane], kp <= pos_b[lane]
                            else:
                                ok_a = kp < end and kp <= pos_a[lane]
                                ok_b = kp < end and kp <= pos_b[lane]
                            if not ok_a:
                                sc[lane, j, e] = -INF
                            if not ok_b:
                                sc[lane, j, 2 + e] = -INF
                            mx_a[lane] = np.fmax(mx_a[lane], sc[lane, j, e])
                            mx_b[lane] = np.fmax(mx_b[lane], sc[lane, j, 2 + e])
                x = 1
                while x < 4:
                    mx_a = np.fmax(mx_a, shfl_xor(mx_a, x))
                    mx_b = np.fmax(mx_b, shfl_xor(mx_b, x))
                    x <<= 1
                ref_a = np.where(mx_a == -INF, F32(0), mx_a).astype(F32)
                ref_b = np.where(mx_b == -INF, F32(0), mx_b).astype(F32)
                with np.errstate(invalid="raise"):
                    ca = np.exp((m[:, 0] - ref_a).astype(F32)).astype(F32)
                    cb = np.exp((m[:, 1] - ref_b).astype(F32)).astype(F32)
                m[:, 0] = mx_a
                m[:, 1] = mx_b
                l[:, 0] *= ca
                l[:, 1] *= cb
                o[:, :, 0] *= ca[:, None]
                o[:, :, 1] *= ca[:, None]
                o[:, :, 2] *= cb[:, None]
                o[:, :, 3] *= cb[:, None]
                for u in range(NT // 2):
                    pa = np.zeros((32, 4), dtype=np.uint32)
                    for lane in range(32):
                        for h in range(2):
                            c = sc[lane, 2 * u + h]
                            pr_a = h2_bits(expf(c[0] - ref_a[lane]), expf(c[1] - ref_a[lane]))
                            pr_b = h2_bits(expf(c[2] - ref_b[lane]), expf(c[3] - ref_b[lane]))
                            fa, fb = half2_of(pr_a), half2_of(pr_b)
                            l[lane, 0] = F32(l[lane, 0] + F32(fa[0] + fa[1]))
                            l[lane, 1] = F32(l[lane, 1] + F32(fb[0] + fb[1]))
                            pa[lane, 2 * h] = pr_a
                            pa[lane, 2 * h + 1] = pr_b
                    for dd in range(DTL // 2):
                        addr = vs + ((16 * u + 8 * (mm & 1) + mr) * S.RS + 8 * (2 * dd + (mm >> 1))) * 2
                        assert (addr + 16 <= S.KEYS_AT).all()
                        race.read(warp, addr)
                        b = ldsm_x4(smem, addr) if MUTATE == "notrans" else ldsm_x4_trans(smem, addr)
                        o[:, 2 * dd] = mma16816(pa, b[:, 0:2], o[:, 2 * dd])
                        o[:, 2 * dd + 1] = mma16816(pa, b[:, 2:4], o[:, 2 * dd + 1])
            elif warp_last[0] >= 0:
                stats["live_warp_skips"] += 1
            yield STEP
            yield BARRIER

        lsum = l
        x = 1
        while x < 4:
            lsum = (lsum + shfl_xor(lsum, x)).astype(F32)
            x <<= 1
        for lane in range(32):
            t = t_of[lane]
            for h in range(2):
                r = ra[lane] if h == 0 else rb[lane]
                if r >= nrows:
                    continue
                qi = (row0 + r) * NH + qh
                inv = F32(F32(1.0) / lsum[lane, h])
                for d in range(DTL):
                    i0 = qi * HD + 8 * d + 2 * t
                    out[i0: i0 + 2] = [o[lane, d, 2 * h] * inv, o[lane, d, 2 * h + 1] * inv]
                    out_count[i0: i0 + 2] += 1

    run_block([warp_prog(w) for w in range(PF_WARPS)], race)
    for kk, v in race.hazards.items():
        stats["hazards"][kk] = stats["hazards"].get(kk, 0) + v


# ----------------------------------------------------------------------------
# Decode rows (index arithmetic of paged_attn / paged_attn_int /
# paged_attn2 + attn_merge); partial states computed in float64.
# ----------------------------------------------------------------------------
def decode_launch(dt, meta, rows, rows_at, decode_rows, H, NH, HD, BL, split_len, splits, scale, q, kvcache,
                  out, out_count, part_ml, part_acc, part_count):
    G = NH // H
    width = host_width(dt, G)
    chunks = (G + width - 1) // width
    n_parts = part_count.size
    for x in range(decode_rows):  # blockIdx.x = launch slot
        row = x if rows_at < 0 else int(meta[rows_at + x])  # decode_row
        assert 0 <= row < rows
        pos = int(meta[row])
        table = int(meta[rows + row])
        blocks_off = 2 * rows + table
        for y in range(H * chunks):
            head = y // chunks
            g0 = (y % chunks) * width
            ng = min(width, G - g0)
            qh0 = head * G + g0
            for z in range(splits):
                begin = z * split_len
                end = min(begin + split_len, pos + 1)
                if begin >= end:
                    continue
                ps = np.arange(begin, end)
                blk = meta[blocks_off + ps // BL]
                K = np.array([kvcache(int(b), 0, head, int(p % BL)) for b, p in zip(blk, ps)])
                V = np.array([kvcache(int(b), 1, head, int(p % BL)) for b, p in zip(blk, ps)])
                for g in range(ng):
                    qv = q[(row * NH + qh0 + g) * HD:][:HD].astype(np.float64) * float(scale)
                    s = K @ qv
                    mt = s.max()
                    w = np.exp(s - mt)
                    lt = w.sum()
                    at = w @ V
                    qi = row * NH + qh0 + g
                    qp = (x * NH + qh0 + g) * splits + z
                    if splits == 1:
                        out[qi * HD: (qi + 1) * HD] = (at / lt).astype(F32)
                        out_count[qi * HD: (qi + 1) * HD] += 1
                    else:
                        assert 0 <= qp < n_parts, f"partial slot {qp} outside {n_parts}"
                        part_acc[qp * HD: (qp + 1) * HD] = at.astype(F32)
                        part_ml[qp * 2] = F32(mt)
                        part_ml[qp * 2 + 1] = F32(lt)
                        part_count[qp] += 1


def attn_merge_launch(meta, rows, rows_at, decode_rows, NH, hd, split_len, splits, part_ml, part_acc, out,
                      out_count, part_reads):
    for bx in range(decode_rows):
        row = bx if rows_at < 0 else int(meta[rows_at + bx])
        for by in range(NH):
            qi = row * NH + by
            qp = bx * NH + by
            used = (int(meta[row]) + split_len) // split_len
            if MUTATE == "merge":
                used = max(1, int(meta[row]) // split_len)
            assert used <= splits
            idx = [(qp * splits + s) for s in range(used)]
            for i in idx:
                part_reads[i] += 1
            ml = part_ml.reshape(-1, 2)[idx]
            acc = part_acc.reshape(-1, hd)[idx]
            mt = F32(-INF)
            for s in range(used):
                mt = np.fmax(mt, ml[s, 0])
            lt = F32(0)
            at = np.zeros(hd, F32)
            for s in range(used):
                w = expf(ml[s, 0] - mt)
                lt = F32(lt + F32(ml[s, 1] * w))
                at = (at + (acc[s] * w).astype(F32)).astype(F32)
            out[qi * hd: (qi + 1) * hd] = at / lt
            out_count[qi * hd: (qi + 1) * hd] += 1


# ----------------------------------------------------------------------------
# A case: the whole paged_attention_with host path
# ----------------------------------------------------------------------------
def run_case(name, HD, dt, static, BL, H, NH, seqs, seed, L=2, layer=1, always=True, sms=132):
    """seqs: list of (first position, number of rows, table id); a sequence's
    rows are consecutive rows of the batch in that order."""
    rng = np.random.default_rng(seed)
    need = {}
    for p0, n, tid in seqs:
        need[tid] = max(need.get(tid, 0), (p0 + n - 1) // BL + 1)
    num_blocks = sum(need.values()) + 5
    perm = rng.permutation(num_blocks)
    tables, k = {}, 0
    for tid in sorted(need):
        tables[tid] = [int(b) for b in perm[k: k + need[tid]]]
        k += need[tid]
    pool = Pool(num_blocks, L, H, BL, HD, dt, static, rng)
    kv = {}
    for tid in need:
        top = need[tid] * BL
        kk = (rng.standard_normal((top, H, HD)) + rng.uniform(-1, 2, (1, H, 1))).astype(F32)
        vv = (rng.standard_normal((top, H, HD)) * 0.8 + rng.uniform(-1, 1, (1, H, 1))).astype(F32)
        kv[tid] = (kk, vv)
        last = max(p0 + n - 1 for p0, n, t in seqs if t == tid)
        for p in range(last + 1):
            blk, tok = tables[tid][p // BL], p % BL
            for h in range(H):
                pool.kv_write(kk[p, h], blk, layer, 0, h, tok)
                pool.kv_write(vv[p, h], blk, layer, 1, h, tok)
    cache = {}

    def kvcache(block, which, head, token):
        key = (block, which, head, token)
        if key not in cache:
            cache[key] = pool.read_back(block, layer, which, head, token)
        return cache[key]

    rows = []
    for p0, n, tid in seqs:
        rows.extend((p0 + i, tid) for i in range(n))
    nrows_batch = len(rows)
    meta, plan = build_meta(rows, tables)
    q = (rng.standard_normal(nrows_batch * NH * HD) * 1.5).astype(F32)
    max_pos = max(r[0] for r in rows)
    split_len = host_split_len(dt, HD, BL)
    assert split_len % 16 == 0
    splits = max_pos // split_len + 1
    scale = F32(1.0 / np.sqrt(F32(HD)))
    # paged_attention_with: which rows the decode launch takes.
    prefill = plan if (plan is not None and use_prefill_tiles(always, plan["tiles"], NH, sms)) else None
    if prefill is not None:
        decode_rows, rows_at = prefill["decode_rows"], prefill["rows_at"]
    else:
        decode_rows, rows_at = nrows_batch, -1
    out = np.full(nrows_batch * NH * HD, np.nan, dtype=F32)  # dev.uninit
    out_count = np.zeros(out.size, np.int64)
    n_parts = decode_rows * NH * splits if (splits > 1 and decode_rows > 0) else 0
    part_ml = np.full(max(n_parts, 1) * 2, np.nan, F32)
    part_acc = np.full(max(n_parts, 1) * HD, np.nan, F32)
    part_count = np.zeros(n_parts, np.int64)
    part_reads = np.zeros(n_parts, np.int64)
    stats = dict(blocks=0, warp_tiles=0, live_warp_skips=0, hazards={})
    t0 = time.time()
    if decode_rows > 0:
        decode_launch(dt, meta, nrows_batch, rows_at, decode_rows, H, NH, HD, BL, split_len, splits, scale, q,
                      kvcache, out, out_count, part_ml, part_acc, part_count)
    tiles_list = []
    if prefill is not None:
        tiles_at = prefill["tiles_at"]
        tiles_list = [tuple(int(v) for v in meta[tiles_at + 3 * i: tiles_at + 3 * i + 3])
                      for i in range(prefill["tiles"])]
        for bx in range(prefill["tiles"]):
            for by in range(NH):
                paged_attn_prefill(HD, dt, static, bx, by, q, meta, nrows_batch, tiles_at, pool, layer, L, H, NH,
                                   BL, scale, out, out_count, stats)
    if splits > 1 and decode_rows > 0:
        attn_merge_launch(meta, nrows_batch, rows_at, decode_rows, NH, HD, split_len, splits, part_ml, part_acc,
                          out, out_count, part_reads)
    # Every output element written exactly once; every partial read was written.
    writes_ok = bool((out_count == 1).all())
    parts_ok = bool(((part_reads == 0) | (part_count == 1)).all() and (part_count <= 1).all()
                    and ((part_count == 1) == (part_reads >= 1)).all())
    # Reference (float64, the dequantized values the pool stores).
    G = NH // H
    tile_rows = {r for (f, n, _) in tiles_list for r in range(f, f + n)}
    err = {"tile": 0.0, "decode": 0.0}
    worst = {"tile": None, "decode": None}
    for row in range(nrows_batch):
        pos, tid = rows[row]
        kind = "tile" if row in tile_rows else "decode"
        for qh in range(NH):
            kvh = qh // G
            K = np.array([kvcache(tables[tid][p // BL], 0, kvh, p % BL) for p in range(pos + 1)])
            V = np.array([kvcache(tables[tid][p // BL], 1, kvh, p % BL) for p in range(pos + 1)])
            qv = q[(row * NH + qh) * HD: (row * NH + qh + 1) * HD].astype(np.float64)
            s = K @ qv / np.sqrt(HD)
            w = np.exp(s - s.max())
            ref = (w / w.sum()) @ V
            got = out[(row * NH + qh) * HD: (row * NH + qh + 1) * HD].astype(np.float64)
            e = np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))) if np.all(np.isfinite(got)) else np.inf
            if e > err[kind] or not np.isfinite(e):
                err[kind], worst[kind] = e, (row, pos, qh)
    dtn = {DT_F16: "f16", DT_I8: "i8", DT_I4: "i4"}[dt] + ("-static" if static else ("-online" if dt != DT_F16 else ""))
    decode_list = [int(v) for v in meta[rows_at: rows_at + decode_rows]] if rows_at >= 0 else list(range(decode_rows))
    hz = ",".join(f"{a}/{b}:{v}" for (a, b), v in sorted(stats["hazards"].items())) or "none"
    print(f"{name:34s} hd={HD:3d} {dtn:9s} BL={BL:2d} H={H} NH={NH} split_len={split_len} splits={splits} "
          f"tiles={tiles_list} decode_slots->rows={decode_list} parts={n_parts} blocks={stats['blocks']} "
          f"skips={stats['live_warp_skips']} writes_once={writes_ok} parts_ok={parts_ok} hazards={hz}  "
          f"tile_err={err['tile']:.3e}@{worst['tile']} decode_err={err['decode']:.3e}@{worst['decode']}  "
          f"[{time.time() - t0:.0f}s]", flush=True)
    ok = writes_ok and parts_ok
    return max(err["tile"], err["decode"]) if ok else np.inf, sum(stats["hazards"].values())


CASES = [
    # name, HD, dt, static, BL, H, NH, seqs [(first pos, rows, table)]
    # As v1 (same batches): a decode row (700) first; a 100-row prompt from 0
    # (tiles of 64 and 36); a 100-row chunk after history at 470..569.
    ("f16 GQA history", 64, DT_F16, False, 16, 3, 9, [(700, 1, 0), (0, 100, 1), (470, 100, 2)]),
    ("f16 GQA history", 128, DT_F16, False, 24, 3, 9, [(700, 1, 0), (0, 100, 1), (470, 100, 2)]),
    ("i8 online GQA history", 64, DT_I8, False, 24, 3, 9, [(700, 1, 0), (0, 100, 1), (470, 100, 2)]),
    ("i8 online GQA history", 128, DT_I8, False, 16, 3, 9, [(700, 1, 0), (0, 100, 1), (470, 100, 2)]),
    ("f16 20-row tile", 64, DT_F16, False, 24, 2, 4, [(3, 1, 0), (30, 20, 1), (0, 70, 2)]),
    ("i8 online 40 rows", 128, DT_I8, False, 24, 1, 3, [(90, 40, 1)]),
    ("i4 online GQA history", 64, DT_I4, False, 16, 3, 9, [(0, 70, 1), (250, 40, 2)]),
    ("i8 static GQA", 128, DT_I8, True, 24, 2, 4, [(240, 30, 1)]),
    ("f16 40 rows at 150", 64, DT_F16, False, 16, 2, 4, [(150, 40, 1)]),
    ("i8 online 70 rows at 100", 128, DT_I8, False, 24, 3, 6, [(100, 70, 1)]),
    # Mixed batches: decode rows (singles and a 5-row run of one table) around
    # tiles, positions to 1100, several splits.
    ("MIX f16 splits", 64, DT_F16, False, 16, 2, 6,
     [(1100, 1, 0), (0, 100, 1), (5, 1, 2), (250, 5, 3), (1000, 80, 4), (700, 1, 5), (513, 1, 6)]),
    ("MIX i8 online splits (512)", 128, DT_I8, False, 16, 2, 4,
     [(1100, 1, 0), (0, 70, 1), (250, 5, 3), (1000, 80, 4), (700, 1, 5), (511, 1, 6), (512, 1, 7)]),
    ("MIX i4 online splits (256)", 64, DT_I4, False, 24, 1, 3,
     [(1100, 1, 0), (0, 20, 1), (255, 1, 2), (256, 3, 3), (1030, 70, 4), (767, 1, 5)]),
]

if __name__ == "__main__":
    sel = sys.argv[1:]
    worst, haz = 0.0, 0
    for i, c in enumerate(CASES):
        if sel and str(i) not in sel:
            continue
        e, h = run_case(*c, seed=1000 + i)
        worst, haz = max(worst, e), haz + h
    print(f"SCHED={SCHED} FIX={int(FIX)} MUTATE={MUTATE or '-'}: worst error {worst:.3e}, shared-memory hazards {haz}",
          "OK" if worst < 1e-2 and haz == 0 else "PROBLEM")
