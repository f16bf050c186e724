"""Indexing throughput: images per second for a folder of JPEGs, and where the time goes.

    python benchmarks/index_throughput.py                      # 2,000 JPEGs of 640x480, workers 0 and 1
    python benchmarks/index_throughput.py --n 500 --workers 0 1 3
    python benchmarks/index_throughput.py --encoder vit-b14 --n 20000 --workers 15   # on a GPU

On a GPU the encoder runs as `dinobridge index` runs it (runtime.encode_settings: bfloat16, batches of
256, JPEGs decoded on the GPU); `--encoder vit-b14` is DINOv2 ViT-B/14's shape at 224 px, random.

Uses the offline default bridge (`TextBridge.from_config(BridgeConfig())`: a 6-layer DINOv2 at 112 px and
MiniLM). For each worker count it builds a fresh index and reports images/s, the share of the wall time the
main process spent running the model and waiting for decoded images, and how busy the decode workers were
(decode cost per image, measured here on a sample, times images, over workers x wall time). The baseline
is workers=0: decoding in the main process, between model batches.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.encode_throughput import flops_per_image, matmul_tflops  # noqa: E402
from bridge.config import BridgeConfig  # noqa: E402
from bridge.index import ImageIndex  # noqa: E402
from bridge.index_update import _prepare  # noqa: E402
from bridge.model import TextBridge  # noqa: E402
from bridge.runtime import encode_settings  # noqa: E402


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Photo-like JPEGs (smooth gradients, a few shapes, mild noise), so files have realistic sizes.

    Made on every core (each image from its own seed, so the files do not depend on the core count):
    20,000 of them take minutes on one core, longer than the indexing they are made for on a GPU.
    """
    for i in range(0, count, 500):
        (folder / f"{i // 500:02d}").mkdir(exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_make_jpeg, [(folder, i, size) for i in range(count)], chunksize=64))


def _make_jpeg(job: tuple[Path, int, tuple[int, int]]) -> None:
    folder, i, size = job
    rng = np.random.default_rng(i)
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    a, b, c = rng.uniform(0, 255, 3), rng.uniform(-0.3, 0.3, 3), rng.uniform(-0.3, 0.3, 3)
    pixels = a + xs[..., None] * b + ys[..., None] * c + rng.normal(0, 6, (size[1], size[0], 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.integers(0, size[0] - 60), rng.integers(0, size[1] - 60)
        box = (x, y, x + rng.integers(20, 200), y + rng.integers(20, 200))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image.save(folder / f"{i // 500:02d}" / f"img{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of JPEGs")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="decode worker counts to run")
    parser.add_argument("--batch-size", type=int, help="default: the project's choice for the device")
    parser.add_argument("--encoder", choices=["offline", "vit-b14"], default="offline")
    parser.add_argument("--device", help="default: the GPU if there is one")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for the model (default: torch's)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "photos"
        folder.mkdir()
        started = time.perf_counter()
        make_jpegs(folder, args.n, (640, 480))
        files = sorted(folder.rglob("*.jpg"))
        megabytes = sum(f.stat().st_size for f in files) / 2**20
        print(
            f"{args.n:,} JPEGs of 640x480, {megabytes:.0f} MB, made in {time.perf_counter() - started:.0f} s"
        )
        config = BridgeConfig()
        if args.encoder == "vit-b14":
            config.encoder.architecture = {"model_type": "dinov2", "patch_size": 14, "image_size": 224}
        settings = encode_settings(args.device, batch_size=args.batch_size)
        bridge = TextBridge.from_config(config).to(settings.device)
        bridge.encoder.run_with(settings)
        preprocessing = bridge.encoder.preprocessing
        print(
            f"{args.encoder} encoder: {preprocessing.image_size} px input, batch size {settings.batch_size}, "
            f"{settings.dtype} on {settings.device}, JPEGs decoded on the GPU: {settings.gpu_decode}, "
            f"{torch.get_num_threads()} torch threads"
        )

        sample, threads = files[:100], torch.get_num_threads()
        torch.set_num_threads(1)  # as in a worker: torch's thread pool costs more than it gives on one image
        started = time.perf_counter()
        for path in sample:
            _prepare(str(path), None, preprocessing)
        decode_ms = (time.perf_counter() - started) / len(sample) * 1e3
        torch.set_num_threads(threads)
        print(f"read + hash + decode + preprocess, one thread: {decode_ms:.1f} ms per image\n")

        header = (
            f"{'workers':>8}{'wall s':>9}{'img/s':>9}{'model %':>9}{'waiting %':>11}{'workers busy %':>16}"
        )
        print(header)
        baseline, rates = None, []
        for workers in args.workers:
            out = Path(scratch) / f"index-{workers}"
            index = ImageIndex.build(
                folder,
                bridge,
                out,
                workers=workers,
                batch_size=settings.batch_size,
                gpu_decode=settings.gpu_decode,
                progress=False,
            )
            summary = index.summary
            assert summary.indexed == args.n, summary
            rate = args.n / summary.seconds
            rates.append(rate)
            baseline = baseline or rate
            busy = f"{100 * args.n * decode_ms / 1e3 / (workers * summary.seconds):.0f}" if workers else "-"
            model, waiting = (
                100 * t / summary.seconds for t in (summary.model_seconds, summary.decode_wait_seconds)
            )
            print(f"{workers:>8}{summary.seconds:>9.1f}{rate:>9.1f}{model:>9.0f}{waiting:>11.0f}{busy:>16}")
        print(
            f"\nratio: workers={args.workers[-1]} / workers={args.workers[0]}: {rate / baseline:.2f}x the images per second"
        )
        if settings.on_gpu:  # how near the encoder's arithmetic limit the whole folder-to-index run gets
            limit = matmul_tflops(settings.device) * 1e12 / flops_per_image(bridge.encoder.model.config)
            print(
                f"best: {max(rates):,.0f} img/s = {max(rates) / limit:.0%} of the limit ({limit:,.0f} img/s)"
            )
        started = time.perf_counter()
        rerun = ImageIndex.build(folder, bridge, out, workers=args.workers[-1], progress=False).summary
        print(
            f"rerun on the unchanged folder: {time.perf_counter() - started:.2f} s, "
            f"indexed {rerun.indexed}, unchanged {rerun.unchanged}"
        )
        print("model % and waiting %: the main process's wall time running the model / blocked on decoding")


if __name__ == "__main__":
    main()
