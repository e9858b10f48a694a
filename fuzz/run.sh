#!/usr/bin/env bash
# Fuzzes every reader of outside bytes for a bounded time, then keeps the interesting inputs.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET ...]     (default: 300 s, all targets)
#
# Needs nightly Rust (rustup toolchain install nightly) and cargo-fuzz (installed here if
# missing). Not part of the normal test run: the corpus it keeps (fuzz/corpus/<target>/) and
# any crash inputs moved to fuzz/regressions/<target>/ are replayed by
# crates/train/tests/fuzz_corpus.rs in every `cargo test`.
#
# Limits: an input may not take more than 10 s, 2 GiB of memory, or a single allocation over
# 1 GiB; libFuzzer reports any of those as a failure, like a panic. Built optimised but with
# overflow checks and debug assertions (-a), as `cargo test` runs the corpus: an arithmetic
# overflow is a failure here too, not a wrap (one in the integer folding of 2026-12-07 was only
# found when the corpus was replayed in a debug build).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx cifar image checkpoint toml_model onnx_model)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
rustup run nightly rustc --version >/dev/null 2>&1 || { echo "nightly Rust is needed: rustup toolchain install nightly" >&2; exit 1; }
cargo +nightly fuzz build -O -a

declare -A max_len=([idx]=65536 [cifar]=16384 [image]=65536 [checkpoint]=16384 [toml_model]=4096 [onnx_model]=16384)
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: ${secs} s"
    cargo +nightly fuzz run -O -a "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len="${max_len[$t]}" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>&1 | tail -n 25
    # Keep a minimal corpus that covers what the run found.
    cargo +nightly fuzz cmin -O -a "$t" "corpus/$t" -- -max_len="${max_len[$t]}" >/dev/null 2>&1 || true
done
echo "crash inputs, if any, are in fuzz/artifacts/<target>/: fix, then move them to fuzz/regressions/<target>/"
