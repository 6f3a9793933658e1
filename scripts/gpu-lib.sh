# Shared by the scripts that carry binaries to a GPU machine (sourced, not
# run): packing on the build machine, unpacking and the CUDA environment
# on the GPU machine.

# The newest file matching a glob, skipping cargo's `.d` dependency files.
newest() { ls -t $1 2>/dev/null | grep -v '\.d$' | head -n1; }

# pack DIR NAME FILE: a stripped, xz-compressed copy of FILE as DIR/NAME.xz.
pack() { strip -o "$1/$2" "$3" && xz -T2 -6 -f "$1/$2"; }

# unpack DIR DEST: every DIR/*.xz decompressed into DEST, executable.
unpack() {
    mkdir -p "$2"
    local f
    for f in "$1"/*.xz; do
        xz -dc "$f" >"$2/$(basename "$f" .xz)" && chmod +x "$2/$(basename "$f" .xz)"
    done
}

# The CUDA toolkit's libraries (NVRTC, cuBLAS) on the loader path, and a
# kernel cache so that each module compiles once per machine.
gpu_env() {
    local d
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [[ -d "$d" ]] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
    done
    export LD_LIBRARY_PATH
    export LMQ_KERNEL_CACHE=${LMQ_KERNEL_CACHE:-/tmp/lmq-kernel-cache}
}
