"""Encode throughput: the project's encode path against the plain transformers loop, same model, same run.

    python benchmarks/encode_throughput.py                         # offline default encoder, this machine
    python benchmarks/encode_throughput.py --encoder vit-b14       # DINOv2 ViT-B/14 shape at 224 px
    python benchmarks/encode_throughput.py --encoder vit-b14 --batch-size 256 --compile   # on a GPU

Random weights (throughput does not depend on them), random pixels already on the device, so this
measures the encoder alone; benchmarks/index_throughput.py measures folder to index. The baseline is
what `Dinov2Model.from_pretrained(name)` gives and a user then loops over: float32, transformers' default
attention (SDPA in transformers 5), no_grad. On a GPU the script also times transformers' eager
attention (856 img/s on an H100: benchmarks/RESULTS.md), measures the card's dense bf16 matmul rate, and
prints the fraction of the arithmetic limit (model FLOPs x images/s over that rate) each row reaches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bridge.config import OFFLINE_DINOV2  # noqa: E402
from bridge.runtime import encode_settings  # noqa: E402
from bridge.vision import FrozenEncoder, Preprocessing  # noqa: E402

ENCODERS = {
    "offline": dict(OFFLINE_DINOV2),
    "vit-b14": {"model_type": "dinov2", "patch_size": 14, "image_size": 224},  # Dinov2Config's defaults
}


def flops_per_image(config) -> float:
    """Forward FLOPs of a ViT: 24 T D^2 (projections and MLP, 4x wide) + 4 T^2 D (attention) per layer."""
    tokens = (config.image_size // config.patch_size) ** 2 + 1 + getattr(config, "num_register_tokens", 0)
    width = config.hidden_size
    # Dinov2Config names the MLP's width by its ratio (mlp_ratio); other ViT configs by intermediate_size.
    ratio = getattr(config, "mlp_ratio", None) or config.intermediate_size / width
    per_layer = (8 + 4 * ratio) * tokens * width**2 + 4 * tokens**2 * width
    return config.num_hidden_layers * per_layer


def timed_rounds(runs: dict, pixels: torch.Tensor, seconds: float) -> dict[str, list[float]]:
    """Images per second of each run, in interleaved rounds (A B C, A B C, ...): a load that comes and
    goes on a shared machine hits every run alike, so the per-round ratios stay fair."""
    rates: dict[str, list[float]] = {label: [] for label in runs}
    with torch.inference_mode():
        for run in runs.values():  # warm-up (and compilation)
            run(pixels)
            run(pixels)
        started = time.perf_counter()
        while min(len(r) for r in rates.values()) < 3 or time.perf_counter() - started < seconds * len(runs):
            for label, run in runs.items():
                synchronise(pixels.device)
                clock = time.perf_counter()
                run(pixels)
                synchronise(pixels.device)
                rates[label].append(len(pixels) / (time.perf_counter() - clock))
    return rates


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device) -> float:
    """The card's achievable dense bf16 rate: 8192^3 matrix products."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    rows_per_second = statistics.median(timed_rounds({"matmul": lambda x: x @ b}, a, 2.0)["matmul"])
    return rows_per_second / len(a) * 2 * 8192**3 / 1e12  # products per second x FLOPs a product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", choices=list(ENCODERS), default="offline")
    parser.add_argument("--batch-size", type=int, help="default: the project's choice for the device")
    parser.add_argument("--device", help="default: the GPU if there is one")
    parser.add_argument("--compile", action="store_true", help="also time the project's path compiled")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per row")
    args = parser.parse_args()

    settings = encode_settings(args.device, batch_size=args.batch_size)
    device, architecture = settings.device, dict(ENCODERS[args.encoder])
    architecture.pop("model_type")
    config = transformers.Dinov2Config(**architecture)
    torch.manual_seed(0)
    pixels = torch.randn(settings.batch_size, 3, config.image_size, config.image_size, device=device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    flops = flops_per_image(config)
    print(
        f"DINOv2 {args.encoder}: {config.image_size} px, {flops / 1e9:.2f} GFLOP an image, batch {len(pixels)}"
    )
    print(f"device: {name}\n")

    def plain(attention: str, dtype: torch.dtype = torch.float32):
        model = transformers.Dinov2Model(config).to(device, dtype).eval()
        model.set_attn_implementation(attention)
        return lambda x: model(pixel_values=x.to(dtype))

    def project(precision: str, compile: bool):
        encoder = FrozenEncoder(transformers.Dinov2Model(config), Preprocessing(config.image_size, None))
        return encoder.run_with(encode_settings(str(device), precision, compile, len(pixels)))

    baseline = "transformers loop, fp32, sdpa attention"  # what from_pretrained gives today
    default = f"dinobridge, default ({str(settings.dtype).removeprefix('torch.')})"
    runs = {baseline: plain("sdpa"), default: project("auto", False)}
    if device.type == "cuda":
        runs["transformers loop, fp32, eager attention"] = plain("eager")
        # The like-for-like loop: what a user who casts the model to bf16 gets from transformers alone.
        runs["transformers loop, bf16, sdpa attention"] = plain("sdpa", torch.bfloat16)
    else:
        runs["dinobridge, bf16 (asked for)"] = project("bf16", False)
    if args.compile:
        runs["dinobridge, default + torch.compile"] = project("auto", True)
    rates = timed_rounds(runs, pixels, args.seconds)

    limit = matmul_tflops(device) if device.type == "cuda" else None
    print(f"{'encode path':<46}{'img/s':>10}{'vs baseline':>13}" + (f"{'of limit':>10}" if limit else ""))
    for label, measured in rates.items():
        rate = statistics.median(measured)
        ratio = statistics.median(a / b for a, b in zip(measured, rates[baseline], strict=False))
        line = f"{label:<46}{rate:>10,.1f}{ratio:>12.2f}x"
        if limit:
            line += f"{rate * flops / (limit * 1e12):>10.0%}"
        print(line)
    print(
        f"({min(len(r) for r in rates.values())}+ interleaved rounds; medians; ratios taken round by round)"
    )
    if limit:
        print(
            f"\narithmetic limit: {limit:.0f} TFLOP/s dense bf16 measured -> {limit * 1e12 / flops:,.0f} img/s"
        )
    ratio = statistics.median(a / b for a, b in zip(rates[default], rates[baseline], strict=False))
    print(f"\nratio: dinobridge default / transformers fp32 loop = {ratio:.2f}x")


if __name__ == "__main__":
    main()
