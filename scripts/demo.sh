#!/usr/bin/env bash
# The main job end to end on the example model: package, deploy, one prediction; the server stays up.
# Ports and run folder come from SERVETOOL_* variables when set (beside other servers), e.g.
#   SERVETOOL_INFERENCE_PORT=9080 SERVETOOL_MANAGEMENT_PORT=9081 SERVETOOL_METRICS_PORT=9082 \
#   SERVETOOL_GRPC_INFERENCE_PORT=9070 SERVETOOL_GRPC_MANAGEMENT_PORT=9071 make demo
# and SERVETOOL_ENGINE=kserve serves it on the KServe engine instead of TorchServe.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
sample=models/digits/samples/digit_3.png

servetool package models/digits
servetool deploy digits
echo
echo "Prediction for $sample (a held-out handwritten 3):"
servetool predict digits "$sample"
echo
echo "The server keeps running. Next (after: source .venv/bin/activate):"
echo "  servetool status                      # models and workers"
echo "  servetool scale digits --workers 3    # set the worker count"
echo "  curl -H @<(servetool token --header) -T $sample http://127.0.0.1:${SERVETOOL_INFERENCE_PORT:-8080}/predictions/digits"
echo "  servetool stop                        # stop the server (or: make stop)"
