#!/usr/bin/env bash
# The real recipe's step on one GPU (bf16, random weights), against vlkit plan and transformers' Llava: one JSON.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # from the repo root; writes $OUT/gpu_check.json
#   bash benchmarks/gpu_check.sh --device cpu --tiny    # the same code path on a CPU, tiny configs (seconds)
#
# Needs python3 with torch, transformers, peft, safetensors, pyyaml, rich, typer, pillow, numpy, matplotlib. Where
# pydantic is not installed (vlkit's config needs it) the wheels in .whl/ (pydantic and its pure-python
# dependencies, cp312 manylinux; see benchmarks/README.md) are installed into /tmp/site first. Nothing is downloaded.
# Extra arguments go to benchmarks/gpu_check.py (--steps, --align-batch, --instruct-batch, --budget, --no-hf).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vlkit-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"  # the interpreter (tests pass their own)
T0=$(date +%s)
echo "+ gpu_check: $(date -u +%H:%M:%S) in $PWD, OUT=$OUT, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  echo "+ pydantic missing: installing the carried wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "+ wheel install FAILED (gpu_check.py will record the import error)"
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export VLKIT_TOY_DIR=/tmp/vlkit-gpu-check-toy VLKIT_CACHE_DIR=/tmp/vlkit-gpu-check-cache
export VLKIT_TOKENIZED_DIR=/tmp/vlkit-gpu-check-tokenized VLKIT_DISABLE_PLUGIN_AUTOLOAD=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # HF's full-vocabulary logits are large
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
# the python side keeps to --budget (default 260 s); the hard limit here leaves the JSON of every finished phase
timeout -k 10 "${GPU_CHECK_TIMEOUT:-285}" "$PY" -X faulthandler benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@"
rc=$?
echo "+ gpu_check.py exit code $rc after $(( $(date +%s) - T0 )) s"
if [ -f "$OUT/gpu_check.json" ]; then
  echo "+ $OUT/gpu_check.json ($(wc -c < "$OUT/gpu_check.json") bytes)"
else
  echo "{\"error\": \"gpu_check.py wrote no JSON (exit code $rc)\"}" > "$OUT/gpu_check.json"
fi
exit $rc
