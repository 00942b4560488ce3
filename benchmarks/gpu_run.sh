#!/usr/bin/env bash
# The benchmarks at real model dimensions on one CUDA GPU, in bfloat16, in one run:
#
#   1. bench_scale.py for the per-layer dimensions of the paper's three checkpoints (OLMoE-1B-7B,
#      Qwen1.5-MoE-A2.7B, DeepSeek-V2-Lite) at full depth, and of Mixtral-8x7B where the card holds
#      its 87 GiB of bfloat16 weights: clean pass, token- and sequence-mode ablations and the
#      released protocol on a subset, with peak GPU memory;
#   2. bench_ablation.py on olmoe512 (80 ablations): the released protocol against the engine,
#      token- and sequence-wide, in bfloat16 on the GPU; every contender's delta losses are checked
#      against the reference in float64 (an untimed extra run) before any time is reported.
#
# Usage (from the repository root, with the project's packages importable by $PY):
#
#   benchmarks/gpu_run.sh [OUT_DIR]          # default benchmarks/reports/gpu
#
# Every report is a JSON file in OUT_DIR; the last step prints the markdown table of bench_scale's
# reports (benchmarks/RESULTS.md takes it with the card's name, which nvidia-smi writes to gpu.txt).
set -euo pipefail
OUT_DIR=$(realpath -m "${1:-$(dirname "$0")/reports/gpu}")  # relative to where it is called from
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then PY=.venv/bin/python; [ -x "$PY" ] || PY=python3; fi
command -v nvidia-smi >/dev/null || { echo "gpu_run.sh: nvidia-smi not found: this script needs an NVIDIA GPU" >&2; exit 2; }
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MOEAUDIT_PROGRESS=0
mkdir -p "$OUT_DIR"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, transformers, nnsight; print('torch', torch.__version__, 'transformers', transformers.__version__,
'nnsight', nnsight.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT_DIR/gpu.txt"
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits --id=0)

models="olmoe-1b-7b qwen1.5-moe-a2.7b deepseek-v2-lite"
if [ "$mib" -gt 120000 ]; then models="$models mixtral-8x7b"; fi
for m in $models; do
  echo "== bench_scale $m"
  "$PY" benchmarks/bench_scale.py --model "$m" --layers 999 --device cuda --dtype bfloat16 --texts 8 --tokens 512 \
    --positions 40 --released 16 --batch-rows 256 --batch-texts 8 --out "$OUT_DIR/scale_$m.json"
done

"$PY" benchmarks/bench_scale.py --table "$OUT_DIR"/scale_*.json | tee "$OUT_DIR/scale_table.md"

echo "== bench_ablation olmoe512, bfloat16 on the GPU"
"$PY" benchmarks/bench_ablation.py --model olmoe512 --n-ablations 80 --contenders a,b,a_seq,c --device cuda \
  --dtype bfloat16 --repeat 3 --out "$OUT_DIR/ablation_olmoe512_bf16.json"
