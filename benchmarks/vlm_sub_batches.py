"""LLM-route training steps as whole padded batches against sub-batches of similar length.

`train.sub_batches: N` runs each batch as at most N sub-batches, each padded only to its own longest
conversation, with the same gradient (training/vlm.py). This times full training steps (forward,
backward, AdamW) on the offline demo's mix: every colour, shape and position question of each scene and
a caption of it (captions about 1.6x a question's length), the demo's model (patch-merge projector,
3-layer decoder, stage 0). The settings are interleaved step by step in one run, so a load change hits
each alike; it prints ms per step, the share of computed tokens that are padding, and the ratios.

    python benchmarks/vlm_sub_batches.py                 # CPU, one thread as the demo trains
    python benchmarks/vlm_sub_batches.py --device cuda   # where a GPU is lent
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator

from bridge.vlm import VisionLLM
from training.vlm import ConversationData, backward_batch, batch_indices, set_stage, sub_batches
from training.vlm_demo import VLMDemoSettings, base_conversations, demo_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=1000, help="scenes whose conversations are drawn")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per setting")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = demo_config(VLMDemoSettings(batch_size=args.batch))
    torch.manual_seed(config.train.seed)
    model = VisionLLM.from_config(config.vlm)
    with tempfile.TemporaryDirectory() as cache:
        data = ConversationData.prepare(model, base_conversations(args.scenes), cache, progress=False)
    set_stage(model, 0, freeze_projector=True)  # as the demo trains stage 0
    model.to(args.device).train()
    accelerator = Accelerator(cpu=args.device == "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    lengths = data.lengths(model.tokens_per_image())
    seconds: dict[int, list[float]] = {parts: [] for parts in args.parts}
    computed = dict.fromkeys(args.parts, 0)
    real = 0
    for step in range(args.steps + 3):  # three warm-up steps, not counted
        indices = batch_indices(len(lengths), config.train, step)
        for parts in args.parts:  # the same batch for each setting
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            backward_batch(model, data, indices, lengths, parts, accelerator)
            optimizer.step()
            optimizer.zero_grad()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= 3:
                seconds[parts].append(time.perf_counter() - start)
                runs = [run for run, _ in sub_batches(indices, lengths, parts, data)]
                computed[parts] += sum(len(run) * max(lengths[i] for i in run) for run in runs)
        if step >= 3:
            real += sum(lengths[int(i)] for i in indices)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    )
    print(
        f"{device}; demo model, stage 0; batch {args.batch}; {len(lengths)} conversations of {args.scenes} scenes"
    )
    print(f"{'sub-batches':<13}{'ms / step':>10}{'padding':>10}{'speed-up':>10}")
    whole = statistics.median(seconds[args.parts[0]])
    for parts in args.parts:
        median = statistics.median(seconds[parts])
        padding = 1 - real / computed[parts]
        print(f"{parts:<13}{median * 1000:>10.1f}{padding:>10.1%}{whole / median:>9.2f}x")


if __name__ == "__main__":
    main()
