"""One training epoch with the frozen-feature cache against the encoder in the loop, in one run.

Both runs train the same projector from the same initial weights on the same batches (the same seed),
on synthetic scenes saved as JPEG files, which is what `dinobridge train --data pairs.jsonl` reads.
"In the loop" decodes, preprocesses and encodes every batch's images at every step, as a trainer
without a cache must; "cached" reads the features the cache computed once. Caption embeddings come
from the text cache in both, so the difference is the image encoder alone. Prints both epoch times,
their ratio (target: at least 10x on the offline default) and the largest difference between the two
loss curves (the cache stores float16 features, so the curves agree to about 1e-3, not bit for bit).

    python benchmarks/cache_epoch.py [--images 2048] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from bridge.config import RunConfig
from bridge.model import TextBridge
from bridge.synthetic import SyntheticWorld
from training.align import AlignmentData, TrainableHead, sample_batch
from training.loop import learning_rate
from training.losses import infonce_loss


def write_photos(folder: Path, count: int) -> Path:
    lines = []
    for index, scene in enumerate(SyntheticWorld(seed=0).scenes(0, count)):
        name = f"scene{index:05d}.jpg"
        scene.render().save(folder / name, quality=92)
        lines.append(json.dumps({"image": name, "captions": scene.captions(2)}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def epoch(bridge: TextBridge, data, config, in_the_loop: bool) -> tuple[float, list[float]]:
    """Time one epoch of optimiser steps; returns (seconds, loss per step)."""
    head = TrainableHead(bridge)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    pairs = data.train.features.pairs
    losses = []
    start = time.perf_counter()
    for step in range(len(pairs) // config.batch_size):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        indices, rows = sample_batch(data.train, config, step)
        texts = data.train.captions[rows]
        if in_the_loop:
            images = [pairs[i].load_image() for i in indices.tolist()]
            features = bridge.encoder(bridge.encoder.preprocessing(images))
        else:
            features = data.train.features[indices]
        loss = infonce_loss(head(features), texts, head.logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return time.perf_counter() - start, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    config = RunConfig()
    config.train.batch_size = args.batch_size
    config.train.held_out = 0.01
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = write_photos(tmp, args.images)
        torch.manual_seed(0)
        bridge = TextBridge.from_config(config.bridge)
        initial = copy.deepcopy(bridge.projector.state_dict())
        fill = time.perf_counter()
        data = AlignmentData.prepare(bridge, str(pairs), config.train, tmp / "cache", progress=False)
        fill = time.perf_counter() - fill
        results = {}
        for name, in_the_loop in (("encoder in the loop", True), ("feature cache", False)):
            bridge.projector.load_state_dict(initial)
            results[name] = epoch(bridge, data, config.train, in_the_loop)
    steps = len(results["feature cache"][1])
    print(
        f"one epoch: {len(data.train.features)} images, {steps} steps of {args.batch_size}, "
        f"offline default, {torch.get_num_threads()} threads"
    )
    print(f"  filling the cache once (images and captions): {fill:.1f} s")
    for name, (seconds, losses) in results.items():
        print(f"  {name:<20} {seconds:7.2f} s   final loss {losses[-1]:.4f}")
    slow, fast = results["encoder in the loop"][0], results["feature cache"][0]
    gap = max(
        abs(a - b)
        for a, b in zip(results["encoder in the loop"][1], results["feature cache"][1], strict=True)
    )
    print(f"speed-up from the cache: {slow / fast:.1f}x (target >= 10x)")
    print(f"largest per-step loss difference: {gap:.2e} (float16 cache vs float32 features)")


if __name__ == "__main__":
    main()
