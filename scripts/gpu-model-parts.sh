#!/usr/bin/env bash
# Carries the real SmolLM2 GGUF (98 MB) to the GPU machine in two device
# calls: one call carries at most 64 MiB together with the working tree, so
# the file travels in two parts while the machine stays warm between the
# calls (it is given back after about 30 s idle, so call 2 must follow at
# once). Nothing is compressed: the 4-bit codes do not shrink (xz: 92%).
#
# Here (the GGUF from scripts/fetch-model.sh):
#   scripts/gpu-model-parts.sh --split      # .device/model-a, .device/model-b
# Device call 1 (carry .device/model-a):
#   bash scripts/gpu-model-parts.sh a
# Device call 2 (carry .device/model-b and the binaries, e.g. .device/bin):
#   bash scripts/gpu-model-parts.sh b && GGUF=/tmp/lmq-model/model.gguf \
#       PPL_WINDOWS=8 bash scripts/gpu-engine-check.sh
# Call 2 fails with a clear message when part a is gone (a fresh machine).
set -euo pipefail

NAME=SmolLM2-135M-Instruct.Q4_1.gguf
STASH=/tmp/lmq-model-parts
DEST=/tmp/lmq-model

case "${1:-}" in
--split)
    src=${GGUF:-$HOME/.cache/lmq/downloads/$NAME}
    [[ -f "$src" ]] || { echo "no GGUF at $src (run scripts/fetch-model.sh)" >&2; exit 1; }
    rm -rf .device/model-a .device/model-b
    mkdir -p .device/model-a .device/model-b
    # 52 MB in the first part, the rest (with the binaries) in the second.
    head -c 52000000 "$src" >.device/model-a/part
    tail -c +52000001 "$src" >.device/model-b/part
    sha256sum "$src" | cut -d' ' -f1 >.device/model-b/sha256
    ls -l .device/model-a .device/model-b
    ;;
a)
    mkdir -p "$STASH"
    cp .device/model-a/part "$STASH/a"
    echo "part a stashed: $(stat -c %s "$STASH/a") bytes"
    ;;
b)
    if [[ ! -f "$STASH/a" ]]; then
        echo "part a is not on this machine (it was given back between the calls): run call 1 again, then call 2 at once" >&2
        exit 1
    fi
    mkdir -p "$DEST"
    cat "$STASH/a" .device/model-b/part >"$DEST/model.gguf.tmp"
    if [[ "$(sha256sum "$DEST/model.gguf.tmp" | cut -d' ' -f1)" != "$(cat .device/model-b/sha256)" ]]; then
        echo "the assembled GGUF does not match its checksum" >&2
        rm -f "$DEST/model.gguf.tmp"
        exit 1
    fi
    mv "$DEST/model.gguf.tmp" "$DEST/model.gguf"
    echo "assembled $DEST/model.gguf ($(stat -c %s "$DEST/model.gguf") bytes, checksum ok)"
    ;;
*)
    echo "usage: $0 --split | a | b" >&2
    exit 2
    ;;
esac
