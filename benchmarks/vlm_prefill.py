"""Visual tokens per image and LLM prefill time: LLaVA's MLP projector against the 2x2 patch merge.

Both VisionLLMs have the same encoder and LLM; only the projector differs, so the prefill gap is the
visual tokens alone (256 against 64 at 224 px for a ViT-*/14). Times, per batch of one-image prompts,
the encoder + projector and then the LLM prefill a reply starts with (one forward over the whole prompt,
last-token logits as generate() keeps): medians of --repeats rounds after a warm-up round, the two
configurations interleaved in the same run, and the prefill ratio.

    python benchmarks/vlm_prefill.py                           # CPU: offline default encoder and LLM
    python benchmarks/vlm_prefill.py --device cuda --dtype bf16 --encoder vit-b14 --llm qwen2-0.5b

Models are built from configs with random weights: nothing is downloaded, and speed does not depend
on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bridge.config import (
    OFFLINE_DINOV2,
    OFFLINE_LLM,
    EncoderConfig,
    LLMConfig,
    ProjectorConfig,
    VisionLLMConfig,
)
from bridge.synthetic import SyntheticWorld
from bridge.vlm import VisionLLM

ENCODERS = {
    "offline": dict(OFFLINE_DINOV2),
    # facebook/dinov2-base's shape.
    "vit-b14": {
        "model_type": "dinov2",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 14,
        "image_size": 224,
    },
}
LLMS = {
    "offline": dict(OFFLINE_LLM),
    # Qwen/Qwen2-0.5B's shape (vocabulary included: its output layer is a real share of the cost).
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(projector: str, args) -> VisionLLM:
    config = VisionLLMConfig(
        encoder=EncoderConfig(architecture=ENCODERS[args.encoder], layer=-1, image_size=args.image_size),
        projector=ProjectorConfig(kind=projector),
        llm=LLMConfig(architecture=LLMS[args.llm]),
    )
    model = VisionLLM.from_config(config).eval()
    return model.to(args.device, DTYPES[args.dtype])


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_once(model: VisionLLM, images, prompts, device: str) -> tuple[float, float]:
    """(encoder + projector seconds, LLM prefill seconds) for one batch."""
    synchronize(device)
    start = time.perf_counter()
    visual = model.visual_tokens(images)
    synchronize(device)
    encoded = time.perf_counter()
    inputs = model.tokenize(prompts, [1] * len(prompts), visual)
    embeddings = model.embed(inputs["input_ids"].to(device), visual)
    model.llm(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"].to(device), logits_to_keep=1)
    synchronize(device)
    return encoded - start, time.perf_counter() - encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", choices=ENCODERS, default="offline")
    parser.add_argument("--llm", choices=LLMS, default="offline")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="prompts per prefill, one image each")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = parser.parse_args()
    images = [scene.render() for scene in SyntheticWorld(0, image_size=args.image_size).scenes(0, args.batch)]
    models = {projector: build(projector, args) for projector in ("mlp", "patch-merge")}
    prompts = [models["mlp"].chat_prompt("What colour is the star?", 1)] * args.batch
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for repeat in range(args.repeats + 1):  # the first round warms up kernels and caches, not counted
        for name, model in models.items():  # interleaved, so a load change hits both alike
            seconds = time_once(model, images, prompts, args.device)
            if repeat:
                times[name].append(seconds)
    results = {
        name: (
            model.tokens_per_image(),
            statistics.median(t[0] for t in times[name]),
            statistics.median(t[1] for t in times[name]),
        )
        for name, model in models.items()
    }
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"{device}, {args.dtype}, encoder {args.encoder}, LLM {args.llm}, {args.image_size} px, batch {args.batch}"
    )
    print(f"{'projector':<14}{'visual tokens/image':>20}{'encoder+projector ms':>22}{'LLM prefill ms':>16}")
    for name, (tokens, encode, prefill) in results.items():
        print(f"{name:<14}{tokens:>20}{encode * 1000:>22.1f}{prefill * 1000:>16.1f}")
    (mlp_tokens, _, mlp_prefill), (merge_tokens, _, merge_prefill) = results["mlp"], results["patch-merge"]
    print(
        f"visual tokens {mlp_tokens} vs {merge_tokens} ({mlp_tokens / merge_tokens:.1f}x fewer); "
        f"LLM prefill time ratio mlp / patch-merge: {mlp_prefill / merge_prefill:.2f}x"
    )


if __name__ == "__main__":
    main()
