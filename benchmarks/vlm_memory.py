"""Peak memory of one LLM-route training step: float32, bf16, and bf16 with gradient checkpointing.

One stage-2 step as train-vlm runs it (TrainableParts' forward, the backward pass, AdamW's update) of a
DINOv2 ViT-B/14-shaped encoder (224 px: 256 visual tokens an image) and a Qwen2-0.5B-shaped LLM (its
151,936-token vocabulary included), random weights built from configs (nothing downloaded), batch 4,
LoRA r 16 on the attention and MLP projections, 64 text tokens a conversation (32 of them answer).
The frozen encoder runs too (no gradient), as it does when the feature cache is not used.

    python benchmarks/vlm_memory.py                 # CPU: the three settings, each in a fresh process
    python benchmarks/vlm_memory.py --device cuda   # the same on a GPU, plus QLoRA (4-bit base)

How it is measured. CPU: each setting runs in a fresh subprocess; after the model is built its peak
resident set (the kernel's VmHWM) is reset (`/proc/self/clear_refs`), so the figure is the process's
peak resident memory during the step, the resident weights included, not torch's own accounting.
CUDA: torch.cuda.max_memory_allocated after a reset, in the same way.

Expectation, written before the first run. Weights: the LLM's 494M parameters are 1.98 GB in float32,
0.99 GB in bf16; the encoder's 86M are 0.35 / 0.17 GB; the trained parts (LoRA, 8.8M; projector, 1.5M)
stay float32 with AdamW's two moments and their gradients, ~0.16 GB in every setting. Activations for
backward over 4 x 320 tokens and 24 layers: ~3 GB in float32, ~1.5 GB in bf16; the logits (4 x 320 x
151,936) cost ~0.8 GB a float32 copy, and the loss takes them in float32 whatever the LLM computes in.
So: bf16 about 0.55-0.6 of float32 (not quite half: the float32 loss and trained parts do not shrink),
and checkpointing keeps only each layer's input (~55 MB), for a peak of about 0.35-0.4 of float32,
dominated by the logits.

Revised before the first complete run, when the loss began computing logits only at the 4 x 32 answer
positions (VisionLLM.answer_loss: 78 MB of float32 logits, not 0.8 GB): float32 about 5.5 GB (weights
2.3 GB, activations ~3 GB), bf16 about 0.5-0.55 of it, bf16 with checkpointing about 0.25-0.3 (weights,
the layer inputs and one layer's activations at a time); the process's own ~0.5 GB (Python, torch's
libraries) is in every figure and does not shrink.

On this CPU (AVX2, no bf16 instructions) a bf16 step is slow, not because of the memory measured: torch
multiplies x @ W.T (the forward pass) at ~18 GFLOPS in bf16 but g @ W (the gradient of the input) at
~1.2, so the bf16 settings take ~15 minutes each, against ~1 for float32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_prefill import ENCODERS, LLMS  # noqa: E402

from bridge.config import EncoderConfig, LLMConfig, LoraSettings, ProjectorConfig, VisionLLMConfig  # noqa: E402
from bridge.vlm import VisionLLM  # noqa: E402
from training.vlm import DTYPES, IGNORE, TrainableParts, set_stage  # noqa: E402

SETTINGS = {  # name: (train.precision, train.gradient_checkpointing, train.quantization)
    "float32": ("float32", False, "none"),
    "bf16": ("bf16", False, "none"),
    "bf16 + checkpointing": ("bf16", True, "none"),
    "QLoRA (4-bit) + checkpointing": ("bf16", True, "4bit"),  # CUDA only
}
BATCH, TEXT_TOKENS, ANSWER_TOKENS = 4, 64, 32


def build(precision: str, quantization: str, device: str, folder: Path) -> VisionLLM:
    config = VisionLLMConfig(
        encoder=EncoderConfig(architecture=dict(ENCODERS["vit-b14"]), layer=-1),
        projector=ProjectorConfig(kind="mlp"),
        llm=LLMConfig(architecture=dict(LLMS["qwen2-0.5b"])),
        lora=LoraSettings(r=16, alpha=32),
    )
    if quantization != "none":  # 4-bit loading takes a saved LLM: save the random one and load it back
        llm = VisionLLM.from_config(VisionLLMConfig(llm=config.llm, lora=None), DTYPES[precision])
        llm.llm.save_pretrained(folder / "llm")
        llm.tokenizer.save_pretrained(folder / "llm")
        config.llm = LLMConfig(name=str(folder / "llm"))
        del llm
    model = VisionLLM.from_config(config, DTYPES[precision], quantization)
    return model.to(device)


def one_step(model: VisionLLM, checkpointing: bool, device: str) -> None:
    """A stage-2 training step on a random batch: forward, backward, AdamW update."""
    set_stage(model, 2)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    trainable = TrainableParts(model)
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=generator)
    with torch.no_grad():
        features = model.encoder(pixels.to(device))
    vocabulary = len(model.tokenizer) - 1
    text = torch.randint(0, vocabulary, (BATCH, TEXT_TOKENS), generator=generator)
    text[text == model.image_token_id] = 0
    placeholders = torch.full((BATCH, model.tokens_per_image()), model.image_token_id)
    input_ids = torch.cat([text[:, :8], placeholders, text[:, 8:]], dim=1)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]
    loss = trainable(input_ids.to(device), torch.ones_like(input_ids).to(device), labels.to(device), features)
    loss.backward()
    optimizer.step()


def measure(name: str, device: str) -> dict:
    """Runs in its own process: resident (or allocated) memory after building, and the step's peak."""
    precision, checkpointing, quantization = SETTINGS[name]
    with tempfile.TemporaryDirectory() as folder:
        model = build(precision, quantization, device, Path(folder))
        if device == "cuda":
            torch.cuda.synchronize()
            built = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            built = resident("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        one_step(model, checkpointing, device)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resident("VmHWM")
    return {"setting": name, "built_gb": built / 1e9, "peak_gb": peak / 1e9}


def resident(field: str) -> int:
    """Bytes of `field` (VmRSS: now; VmHWM: the peak since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--one", choices=tuple(SETTINGS), help=argparse.SUPPRESS)  # a child's setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device)))
        return
    names = [name for name in SETTINGS if args.device == "cuda" or SETTINGS[name][2] == "none"]
    if args.device == "cuda" and importlib.util.find_spec("bitsandbytes") is None:
        print('QLoRA skipped: bitsandbytes is not installed (pip install -e ".[qlora]")')
        names = [name for name in names if SETTINGS[name][2] == "none"]
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--device", args.device, "--one", name]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:  # one setting's failure (a library version, out of memory) keeps the others
            print(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    what = "peak resident set (VmHWM)" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"one stage-2 step, batch {BATCH}, 256 visual + {TEXT_TOKENS} text tokens, LoRA r 16; {what}")
    print(f"{'setting':32s} {'after build':>12s} {'step peak':>10s} {'vs float32':>10s}")
    for row in rows:
        ratio = row["peak_gb"] / rows[0]["peak_gb"]
        print(f"{row['setting']:32s} {row['built_gb']:10.2f} GB {row['peak_gb']:7.2f} GB {ratio:9.2f}x")


if __name__ == "__main__":
    main()
