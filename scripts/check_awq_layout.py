#!/usr/bin/env python3
"""Checks an AutoAWQ "gemm" checkpoint against reference f32 weights.

Usage:
    python3 scripts/check_awq_layout.py QUANTIZED_DIR REFERENCE.safetensors

QUANTIZED_DIR is a folder written by `lmq quantize` (or any AutoAWQ gemm
checkpoint): `config.json` with `quantization_config.group_size`, and
`model.safetensors` or shards listed in `model.safetensors.index.json`.
REFERENCE.safetensors holds F32 tensors named `<module>.weight` in the
Hugging Face `[out, in]` layout (for example
`model.layers.0.self_attn.q_proj.weight`).

For every reference tensor the script dequantizes `<module>.qweight`,
`<module>.qzeros` and `<module>.scales` from QUANTIZED_DIR on its own, from
the layout's definition (nothing here is ported from the Rust code), and
requires bitwise equality with the reference.

Only numpy is needed: safetensors files are parsed by hand (8-byte
little-endian header length, JSON header, raw little-endian data).

Exit status: 0 when every tensor matches, 1 on any mismatch or failed
sanity check, 2 on usage errors or unreadable input.
"""

import json
import os
import struct
import sys

import numpy as np

# --- The AutoAWQ gemm packing, from its definition ---------------------------
#
# Nibble i (bits 4i..4i+3) of packed int32 column c holds output column
# 8c + PACK_ORDER[i].
PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

# To unpack we need the inverse: for output column j (within its block of 8),
# which nibble holds it, and so how far to shift the word right.  Nibble i
# holds column PACK_ORDER[i], so column j sits in nibble PACK_ORDER.index(j):
#   j:      0  1  2  3  4  5  6  7
#   nibble: 0  4  1  5  2  6  3  7
#   shift:  0 16  4 20  8 24 12 28
# which is the shift list [0, 16, 4, 20, 8, 24, 12, 28].  AutoAWQ's own
# unpacking (unpack_awq + reverse_awq_order) reaches the same result in two
# steps: it unpacks nibbles sequentially, then takes column 8c+j from nibble
# AWQ_REVERSE_ORDER[j] with AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7],
# the "nibble" row above.
NIBBLE_OF_COLUMN = [PACK_ORDER.index(j) for j in range(8)]
SHIFTS = np.array([4 * n for n in NIBBLE_OF_COLUMN], dtype=np.uint32)
assert SHIFTS.tolist() == [0, 16, 4, 20, 8, 24, 12, 28], SHIFTS
# Sequential order, used only to explain a mismatch.
PLAIN_SHIFTS = np.array([4 * j for j in range(8)], dtype=np.uint32)

DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    # BF16 has no numpy dtype; its bytes are read as uint16 (size checks only).
    "BF16": np.dtype("<u2"),
}


class InputError(Exception):
    """Unreadable or malformed input (exit status 2)."""


class CheckFailed(Exception):
    """A sanity check on the quantized tensors failed (exit status 1)."""


# --- safetensors -------------------------------------------------------------


class SafetensorsFile:
    """Header of one safetensors file; tensors are memory-mapped on demand."""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise InputError(f"{path}: {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise InputError(
                    f"{path}: header length {header_len} points past the end of the "
                    f"{size}-byte file (truncated?)"
                )
            try:
                header = json.loads(f.read(header_len).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{path}: header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise InputError(f"{path}: header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        self.tensors = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype_name = info["dtype"]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{path}: malformed header entry for {name}: {info}") from None
            if dtype_name not in DTYPES:
                raise InputError(f"{path}: {name} has unsupported dtype {dtype_name}")
            dtype = DTYPES[dtype_name]
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if not 0 <= begin <= end <= data_len:
                raise InputError(
                    f"{path}: {name} data_offsets [{begin}, {end}] lie outside the "
                    f"{data_len}-byte data section (truncated?)"
                )
            if end - begin != count * dtype.itemsize:
                raise InputError(
                    f"{path}: {name} is {dtype_name} {shape} ({count * dtype.itemsize} bytes) "
                    f"but its data_offsets span {end - begin} bytes"
                )
            end_max = max(end_max, end)
            self.tensors[name] = (dtype_name, shape, begin, end)
        if end_max != data_len:
            raise InputError(
                f"{path}: the header covers {end_max} data bytes but the file holds {data_len}"
            )

    def get(self, name):
        dtype_name, shape, begin, end = self.tensors[name]
        dtype = DTYPES[dtype_name]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return dtype_name, np.zeros(shape, dtype=dtype)
        arr = np.memmap(
            self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=(count,)
        )
        return dtype_name, arr.reshape(shape)


class Checkpoint:
    """`model.safetensors`, or the shards of `model.safetensors.index.json`."""

    def __init__(self, folder):
        single = os.path.join(folder, "model.safetensors")
        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index_path):
            with open(index_path) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{index_path}: no valid \"weight_map\"") from None
            files = [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
        else:
            raise InputError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
        self.where = {}
        for path in files:
            if not os.path.exists(path):
                raise InputError(f"{path}: listed in {index_path} but missing")
            st = SafetensorsFile(path)
            for name in st.tensors:
                if name in self.where:
                    raise InputError(f"{name} is stored twice ({self.where[name].path}, {path})")
                self.where[name] = st

    def __contains__(self, name):
        return name in self.where

    def get(self, name, dtype_name, shape):
        if name not in self.where:
            raise CheckFailed(f"{name} is missing from the quantized checkpoint")
        st = self.where[name]
        got_dtype, arr = st.get(name)
        if got_dtype != dtype_name:
            raise CheckFailed(f"{name} ({st.path}) is {got_dtype}, expected {dtype_name}")
        if list(arr.shape) != list(shape):
            raise CheckFailed(f"{name} ({st.path}) has shape {list(arr.shape)}, expected {list(shape)}")
        return arr


# --- dequantization ------------------------------------------------------------


def unpack(packed, shifts=SHIFTS):
    """int32 [rows, cols/8] -> uint8 [rows, cols] nibbles, column 8c+j from shifts[j]."""
    # Work on the unsigned bit pattern so that the top nibble of a negative
    # int32 is not sign-extended by the shift.
    words = np.ascontiguousarray(packed).view(np.uint32)
    nibbles = (words[:, :, None] >> shifts[None, None, :]) & np.uint32(0xF)
    rows, packed_cols = words.shape
    out = nibbles.reshape(rows, packed_cols * 8)
    if out.size and int(out.max()) > 15:
        raise CheckFailed("unpacked nibble out of range 0..15 (unpacking bug)")
    # The 8 shifts must cover all 32 bits exactly once: packing the nibbles
    # back gives the original words.
    repacked = np.bitwise_or.reduce(nibbles << shifts[None, None, :], axis=2)
    if not np.array_equal(repacked, words):
        raise CheckFailed("unpacked nibbles do not pack back to the stored words (unpacking bug)")
    return out.astype(np.uint8)


def dequantize(qweight, qzeros, scales, group_size, shifts=SHIFTS):
    """AutoAWQ gemm tensors -> f32 weight [out, in] = ((q - z) * s)^T."""
    q = unpack(qweight, shifts).astype(np.float32)  # [in, out]
    z = unpack(qzeros, shifts).astype(np.float32)  # [in/g, out]
    s = np.asarray(scales).astype(np.float32)  # fp16 -> f32 exactly
    z = np.repeat(z, group_size, axis=0)  # row i uses group i // g
    s = np.repeat(s, group_size, axis=0)
    w = (q - z) * s  # all float32: one rounding per operation
    assert w.dtype == np.float32
    return np.ascontiguousarray(w.T)


def describe(x):
    """An f32 value with its bit pattern, so that one-ulp differences show."""
    x = np.float32(x)
    return f"{float(x)!r} (0x{int(x.view(np.uint32)):08x})"


def bitwise_equal(a, b):
    return a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).view(np.uint32), np.ascontiguousarray(b).view(np.uint32)
    )


# --- the check -------------------------------------------------------------------


def read_group_size(folder):
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: {e}") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise InputError(f"{path}: no quantization_config (not a quantized checkpoint?)")
    method = qc.get("quant_method", "")
    if method != "awq":
        raise InputError(f"{path}: quantization_config.quant_method is {method!r}, expected 'awq'")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise InputError(f"{path}: AWQ version {version!r}; this checker reads 'gemm' only")
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise InputError(f"{path}: bits = {bits}; the gemm layout is 4-bit")
    g = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
        raise InputError(f"{path}: quantization_config.group_size is missing or not a positive integer: {g!r}")
    return g


def check_tensor(ckpt, name, ref, g):
    """Returns (ok, summary line)."""
    if not name.endswith(".weight"):
        raise InputError(f"reference tensor {name} is not named <module>.weight")
    module = name[: -len(".weight")]
    if ref.ndim != 2:
        raise InputError(f"reference {name} has shape {list(ref.shape)}, expected [out, in]")
    out_f, in_f = ref.shape
    if out_f % 8 != 0:
        raise CheckFailed(f"{module}: out_features {out_f} is not a multiple of 8")
    if in_f % g != 0:
        raise CheckFailed(f"{module}: in_features {in_f} is not a multiple of group_size {g}")
    qweight = ckpt.get(f"{module}.qweight", "I32", [in_f, out_f // 8])
    qzeros = ckpt.get(f"{module}.qzeros", "I32", [in_f // g, out_f // 8])
    scales = ckpt.get(f"{module}.scales", "F16", [in_f // g, out_f])

    s = np.asarray(scales).astype(np.float32)
    if not np.all(np.isfinite(s)):
        raise CheckFailed(f"{module}.scales holds {int(np.sum(~np.isfinite(s)))} non-finite values")
    if np.any(s <= 0):
        raise CheckFailed(f"{module}.scales holds {int(np.sum(s <= 0))} values <= 0")

    w = dequantize(qweight, qzeros, scales, g)
    zeros = np.unique(unpack(qzeros))
    zero_desc = (
        f"zeros {{{int(zeros[0])}}}" if len(zeros) == 1 else f"zeros {int(zeros.min())}..{int(zeros.max())}"
    )
    shape = f"[{out_f}, {in_f}]"
    if bitwise_equal(w, ref):
        return True, f"ok        {name} {shape} g={g} {zero_desc}: bitwise equal"

    differ = np.ascontiguousarray(w).view(np.uint32) != np.ascontiguousarray(ref).view(np.uint32)
    n_bad = int(differ.sum())
    o, i = (int(x) for x in np.argwhere(differ)[0])
    with np.errstate(invalid="ignore"):
        max_abs = float(np.nanmax(np.abs(w.astype(np.float64) - ref.astype(np.float64))))
    msg = (
        f"MISMATCH  {name} {shape} g={g}: {n_bad} of {w.size} values differ "
        f"(max |diff| {max_abs:.6g}); first at [out={o}, in={i}]: "
        f"dequantized {describe(w[o, i])}, reference {describe(ref[o, i])}"
    )
    if bitwise_equal(dequantize(qweight, qzeros, scales, g, PLAIN_SHIFTS), ref):
        msg += (
            "; the reference matches a sequential nibble order (nibble i = column 8c+i), "
            "not AutoAWQ's [0, 2, 4, 6, 1, 3, 5, 7]"
        )
    return False, msg


def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    qdir, ref_path = argv[1], argv[2]
    try:
        g = read_group_size(qdir)
        ckpt = Checkpoint(qdir)
        ref_file = SafetensorsFile(ref_path)
        names = sorted(ref_file.tensors)
        if not names:
            raise InputError(f"{ref_path}: holds no tensors, nothing to compare")
        failures = []
        for name in names:
            dtype_name, ref = ref_file.get(name)
            if dtype_name != "F32":
                raise InputError(f"{ref_path}: {name} is {dtype_name}, the reference must be F32")
            try:
                ok, line = check_tensor(ckpt, name, np.asarray(ref), g)
            except CheckFailed as e:
                ok, line = False, f"FAILED    {name}: {e}"
            print(line)
            if not ok:
                failures.append(name)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failures:
        print(
            f"FAIL: {len(failures)} of {len(names)} tensors do not match the AutoAWQ gemm "
            f"layout of {qdir}: {', '.join(failures)}",
            file=sys.stderr,
        )
        return 1
    print(f"OK: {len(names)} tensors dequantize bitwise-equal to {ref_path} (group size {g})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
