#!/usr/bin/env bash
# Runs the turbomind library tests (which compare every SIMD kernel with
# its portable version) cross-compiled for aarch64 under qemu, once on a
# CPU model with the dotprod extension and once on one without it, so that
# both NEON integer kernels and the run-time choice between them are
# exercised. Speed means nothing under qemu; this checks correctness only.
# Not part of the CI suite (it needs the extra target and packages below).
#
# Needs: rustup target add aarch64-unknown-linux-gnu
#        apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
for cpu in max cortex-a57; do
    echo "== qemu-aarch64 -cpu $cpu"
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $cpu -L /usr/aarch64-linux-gnu" \
        cargo test --release --target aarch64-unknown-linux-gnu -p lmq-turbomind --lib "$@"
done
