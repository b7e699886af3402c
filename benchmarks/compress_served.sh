#!/usr/bin/env bash
# Served throughput of the compression example, side by side in one run: the original, the
# pruned + distilled model (onnx) and it in int8 (onnx-int8-static), each packaged from a folder
# outside the repository and deployed alone on the embedded TorchServe with its defaults, then
# `servetool bench serve` for 15 s at 8 clients; the three alternate for two rounds.
# Run: benchmarks/compress_served.sh /tmp/digits-resnet-compressed   (after the README's compress)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMPRESSED=$(cd "${1:?the compressed model folder (servetool compress --out)}" && pwd)
S=$ROOT/.venv/bin/servetool
W=$(mktemp -d /tmp/servetool-compress-served-XXXX)
trap 'for v in orig pruned int8; do $S stop --run-dir "$W/run-$v" >/dev/null 2>&1 || true; done; rm -rf "$W"' EXIT
cd "$W"
# the two formats as sibling copies of the compressed folder: its spec names the original's
# validation and calibration files by relative paths
PRUNED="$COMPRESSED.served-onnx" INT8="$COMPRESSED.served-int8"
trap 'for v in orig pruned int8; do $S stop --run-dir "$W/run-$v" >/dev/null 2>&1 || true; done; rm -rf "$W" "$PRUNED" "$INT8"' EXIT
cp -r "$COMPRESSED" "$PRUNED"
sed -i 's/^format: .*/format: onnx/' "$PRUNED/servetool.yaml"
cp -r "$COMPRESSED" "$INT8"
sed -i 's/^format: .*/format: onnx-int8-static/' "$INT8/servetool.yaml"
"$S" package "$ROOT/models/digits-resnet" --model-store store-orig >/dev/null
"$S" package "$PRUNED" --model-store store-pruned >/dev/null
"$S" package "$INT8" --model-store store-int8 >/dev/null
PORTS="--inference-port 18080 --management-port 18081 --metrics-port 18082 --grpc-inference-port 17070 --grpc-management-port 17071"
for round in 1 2; do
  for v in orig pruned int8; do
    # shellcheck disable=SC2086
    "$S" deploy --run-dir "run-$v" --model-store "store-$v" $PORTS >/dev/null 2>&1
    "$S" bench serve digits-resnet --run-dir "run-$v" --model-store "store-$v" \
      --payload "$ROOT/models/digits-resnet/samples" --duration 15 --out "bench-$v-$round" \
      --json > "bench-$v-$round.json" 2>/dev/null
    "$S" stop --run-dir "run-$v" >/dev/null 2>&1
  done
done
python3 - <<'PY'
import json

runs = {v: [json.load(open(f"bench-{v}-{r}.json")) for r in (1, 2)] for v in ("orig", "pruned", "int8")}
rate = {v: sum(d["throughput"] for d in ds) / len(ds) for v, ds in runs.items()}
print("| model | req/s per round | mean req/s | vs original | p50 ms | p99 ms | errors |")
print("|---|---|---|---|---|---|---|")
for v, ds in runs.items():
    rounds = " / ".join(f"{d['throughput']:.0f}" for d in ds)
    errors = sum(sum(d["errors"].values()) for d in ds)
    print(f"| {v} | {rounds} | {rate[v]:.0f} | {rate[v] / rate['orig']:.2f}x | "
          f"{ds[-1]['p50_ms']:.1f} | {ds[-1]['p99_ms']:.1f} | {errors} |")
PY
