#!/usr/bin/env bash
# The whole test suite: fetches the default model once (cached), then runs
# every test in release mode (the golden tests run real forward passes).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release
LMQ_TEST_MODEL=$(scripts/fetch-model.sh smollm2-135m)
export LMQ_TEST_MODEL
cargo test --release --workspace "$@"
