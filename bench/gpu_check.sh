#!/usr/bin/env bash
# The prepared check for a machine with one NVIDIA GPU (docs/performance.md): after the installs, about 8
# minutes. It prints one table:
#   - new tokens/s of vLLM against HF generate, at the tiny shape and at Qwen2-0.5B's (bench/generation.py part 2;
#     the target there: vLLM at least 5x HF at 0.5B);
#   - the engine serving a trained policy's weights, and one DPO and one RLOO round with generate.backend: vllm
#     (tests/test_vllm.py, on the GPU);
#   - a reward-model gold judge in bfloat16 on the GPU (tests/test_chat.py: its labels equal its own forward).
# The installs (`make install install-vllm`: vllm 0.33 and its CUDA torch in .venv-vllm) need the package index;
# they are skipped when already done. Run from anywhere: bash bench/gpu_check.sh [results folder]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/out/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU visible"; exit 1; }
make -s install install-vllm || exit 1

rows=()
check() {  # name, then the command; its output kept in $out/<name>.log
  local name=$1 start=$SECONDS
  shift
  if "$@" >"$out/$name.log" 2>&1; then status=passed; else status="FAILED (see $out/$name.log)"; fi
  rows+=("$(printf '%-28s %-44s %5d s' "$name" "$status" $((SECONDS - start)))")
}
check generation .venv/bin/python bench/generation.py --backends-only --repeats 2 --new-tokens 128 --out "$out"
check vllm_weights .venv/bin/python -m pytest -q -m slow tests/test_vllm.py -k serves
check vllm_rounds .venv/bin/python -m pytest -q -m slow tests/test_vllm.py -k "dpo or rloo or agrees"
check bf16_judge .venv/bin/python -m pytest -q tests/test_chat.py -k "gold_judge_scores"

echo
sed -n '/^backends on/,$p' "$out/generation.log"
echo
printf '%-28s %-44s %7s\n' check result time
printf '%s\n' "${rows[@]}"
! printf '%s\n' "${rows[@]}" | grep -q FAILED
