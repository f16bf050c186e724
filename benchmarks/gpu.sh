#!/usr/bin/env bash
# Every GPU figure the benchmarks record, in one command (a few minutes on one H100):
#
#   bash benchmarks/gpu.sh [OUT]          # results in OUT (default: $OUT, else benchmarks/gpu-results)
#
# Needs the project importable with its offline text tower: `pip install -e ".[offline]"` (or the wheels
# carried to a machine without internet). Record each figure with the card's name in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/gpu-results}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
# DINOv2 ViT-B/14 at 224 px, batch 256: transformers fp32 (SDPA, eager) vs dinobridge bf16 (+ compile).
python benchmarks/encode_throughput.py --encoder vit-b14 --batch-size 256 --compile | tee "$out/encode.txt"
# Folder of 640x480 JPEGs to index: nvJPEG decoding, bf16 encoder, 15 CPU workers for the rest.
python benchmarks/index_throughput.py --encoder vit-b14 --n 20000 --workers 15 | tee "$out/index.txt"
# LLM route: visual tokens and prefill with a Qwen2-0.5B-shaped LLM in bf16, mlp vs 2x2 patch merge.
python benchmarks/vlm_prefill.py --device cuda --dtype bf16 --encoder vit-b14 --llm qwen2-0.5b --batch 32 \
    | tee "$out/vlm_prefill.txt"
# LLM route: peak memory of one stage-2 training step (ViT-B/14 + Qwen2-0.5B shape, batch 4, LoRA r 16):
# float32, bf16, bf16 + gradient checkpointing, and QLoRA (4-bit base; needs `pip install -e ".[qlora]"`).
python benchmarks/vlm_memory.py --device cuda | tee "$out/vlm_memory.txt"
