#!/usr/bin/env bash
# Create (or reuse) .venv beside this repository and install llmprune with its test extra.
# torch is installed first, pinned to the CPU build this project uses, so that no resolver pulls
# a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.llmprune-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import llmprune" 2>/dev/null; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip >&2
"$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" >&2
"$VPY" -m pip install -q -e ".[test]" >&2
echo "$want" > "$stamp"
