#!/usr/bin/env bash
# Data-parallel throughput on this machine: the tutorial CNN for 2 epochs on the embedded MNIST,
# one process (1 and 2 threads) against two ranks of one thread each, A,B,A,B; prints each run's
# last-epoch images/s and rank 0's time in collectives. A benchmark, not a test.
#   apt-get install openmpi-bin libopenmpi-dev libclang-dev && bash scripts/mpi-bench.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p stride-cli --features mpi
bin=$PWD/target/release/stride
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=()
[ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
for round in $(seq "${1:-2}"); do
    for t in 1 2; do
        ips=$("$bin" --threads "$t" train --epochs 2 --no-report --out "$work/n1-$t-$round" | sed -n 's/^epoch 2\/2: .*| \([0-9]*\) images\/s$/\1/p')
        echo "{\"processes\":1,\"threads\":$t,\"round\":$round,\"images_per_s\":$ips}"
    done
    log=$(mpirun "${root[@]}" --oversubscribe -np 2 "$bin" --threads 1 train --epochs 2 --no-report --out "$work/n2-$round")
    ips=$(printf '%s\n' "$log" | sed -n 's/^epoch 2\/2: .*| \([0-9]*\) images\/s$/\1/p')
    share=$(printf '%s\n' "$log" | sed -n 's/^rank 0 waited .*(\([0-9]*\)%.*/\1/p')
    echo "{\"processes\":2,\"threads\":1,\"round\":$round,\"images_per_s\":$ips,\"collective_share_pct\":$share}"
done
