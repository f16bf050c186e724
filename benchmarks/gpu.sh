#!/usr/bin/env bash
# Every GPU figure the benchmarks record, in one command (a few minutes on one H100):
#
#   bash benchmarks/gpu.sh [OUT]          # results in OUT (default: $OUT, else benchmarks/gpu-results)
#
# Needs the project importable with its offline text tower: `pip install -e ".[offline]"` (or the wheels
# carried to a machine without internet). Record each figure with the card's name in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/gpu-results}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
python -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
    | tee -a "$out/card.txt"
failed=()
# One step's failure or overrun (a lease is short) does not cost the steps after it; each is listed at the end.
step() {
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    if ((rc != 0)); then failed+=("$name (exit $rc)"); fi
}
# DINOv2 ViT-B/14 at 224 px, batch 256: transformers fp32 (SDPA, eager) vs dinobridge bf16 (+ compile).
step encode 150 python benchmarks/encode_throughput.py --encoder vit-b14 --batch-size 256 --compile
# Folder of 640x480 JPEGs to index: nvJPEG decoding, bf16 encoder, 15 CPU workers for the rest.
step index 150 python benchmarks/index_throughput.py --encoder vit-b14 --n 20000 --workers 15
# LLM route: visual tokens and prefill with a Qwen2-0.5B-shaped LLM in bf16, mlp vs 2x2 patch merge.
step vlm_prefill 90 python benchmarks/vlm_prefill.py --device cuda --dtype bf16 --encoder vit-b14 --llm qwen2-0.5b --batch 32
# LLM route: peak memory of one stage-2 training step (ViT-B/14 + Qwen2-0.5B shape, batch 4, LoRA r 16):
# float32, bf16, bf16 + gradient checkpointing, and QLoRA (4-bit base; needs `pip install -e ".[qlora]"`).
step vlm_memory 170 python benchmarks/vlm_memory.py --device cuda
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}" | tee "$out/failed.txt"
    exit 1
fi
