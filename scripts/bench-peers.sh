#!/usr/bin/env bash
# Stride beside the peers of ../shared/bench in one run, rounds A,B,A,B: each round runs
# `stride bench` (planned inference and classifier training, as `stride train` runs them),
# `stride bench --eager` (all eager), then ONNX Runtime and TensorFlow+oneDNN on the same benchmarks (TensorFlow with XLA too on the VAE). Prints every JSON line (with a "round" field), then the table of
# medians and Stride/best-peer ratios that README's performance section shows.
#   bash scripts/bench-peers.sh [ROUNDS] [BENCHES]     # defaults: 3 rounds, "lenet resnet18 vae"
# Needs the peers: bash ../shared/bench/peers/setup.sh tf ort (or PEERS_PYTHON set to a Python
# that has tensorflow, onnxruntime, onnx and torch).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
benches=${2:-lenet resnet18 vae}
py=${PEERS_PYTHON:-$HOME/.cache/stride-peers/bin/python}
peers=${PEERS_BENCH:-../shared/bench/peers/bench.py}
[ -x "$py" ] && [ -f "$peers" ] || { echo "no peers: run ../shared/bench/peers/setup.sh tf ort (or set PEERS_PYTHON, PEERS_BENCH)" >&2; exit 1; }
cargo build --release --locked -q -p stride-cli
bin=$PWD/target/release/stride
out=$(mktemp)
trap 'rm -f "$out"' EXIT
declare -A spec=([lenet]=B1 [vae]=B2 [resnet18]=B4 [conv]=B3)
tag() { sed "s/}\$/, \"round\": $1}/" | tee -a "$out"; }
for round in $(seq "$rounds"); do
    for b in $benches; do
        "$bin" bench --bench "$b" --reps 30 | tag "$round"
        "$bin" bench --bench "$b" --reps 30 --eager | sed 's/"impl":"stride"/"impl":"stride-eager"/' | tag "$round"
        # The best peers of ../shared/bench/BASELINE.md: ONNX Runtime (inference only) and
        # TF+oneDNN everywhere, and TF with XLA, the fastest there on the VAE.
        impls="ort tf-onednn"
        [ "$b" = vae ] && impls="tf-onednn tf-xla"
        for impl in $impls; do
            TF_CPP_MIN_LOG_LEVEL=3 "$py" "$peers" --impl "$impl" --bench "${spec[$b]}" 2>/dev/null | tag "$round" || true
        done
    done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
figs = {}
for r in rows:
    if r["bench"] in ("conv_fwd", "conv_bwd"):
        continue
    figs.setdefault(r["bench"], {}).setdefault(r["impl"], {})[r["round"]] = r["value"]
print("\n| figure | stride | stride --eager | best peer | stride / best peer (median of rounds) |")
print("|---|---|---|---|---|")
for name, by in figs.items():
    peers = {k: v for k, v in by.items() if not k.startswith("stride")}
    med = lambda d: statistics.median(d.values()) if d else float("nan")
    ratios = []
    for rnd, v in by.get("stride", {}).items():
        best = max((p[rnd] for p in peers.values() if rnd in p), default=None)
        if best:
            ratios.append(v / best)
    best_impl = max(peers, key=lambda k: med(peers[k])) if peers else "-"
    print(f"| {name} | {med(by.get('stride', {})):,.1f} | {med(by.get('stride-eager', {})):,.1f} | {med(peers.get(best_impl, {})):,.1f} ({best_impl}) | {statistics.median(ratios) if ratios else float('nan'):.2f} |")
# B3: one row per shape, forward and backward, Stride's GFLOP/s per round against the best
# peer of the same round.
convs = {}
for r in rows:
    if r["bench"] in ("conv_fwd", "conv_bwd"):
        convs.setdefault((r["shape"], r["bench"]), {}).setdefault(r["impl"], {})[r["round"]] = r["value"]
if convs:
    print("\n| shape | pass | stride per round | best peer per round | stride / best peer (median of rounds) |")
    print("|---|---|---|---|---|")
    for (shape, bench), by in sorted(convs.items()):
        mine, peers = by.get("stride", {}), {k: v for k, v in by.items() if not k.startswith("stride")}
        ratios, bests = [], []
        for rnd in sorted(mine):
            impl, best = max(((k, p[rnd]) for k, p in peers.items() if rnd in p), key=lambda kv: kv[1], default=(None, None))
            if best:
                ratios.append(mine[rnd] / best)
                bests.append(f"{best:,.1f} ({impl})")
        print(f"| {shape} | {bench[5:]} | {' / '.join(f'{mine[k]:,.1f}' for k in sorted(mine))} | {' / '.join(bests)} | {statistics.median(ratios) if ratios else float('nan'):.2f} |")
PY
