#!/usr/bin/env bash
# The main job end to end on the example model: package, deploy, one prediction; the server stays up.
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
echo "  curl -H @<(servetool token --header) -T $sample http://127.0.0.1:8080/predictions/digits"
echo "  servetool stop                        # stop TorchServe (or: make stop)"
