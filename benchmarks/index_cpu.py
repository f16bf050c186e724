"""Indexing a phone's photos on a CPU: `dinobridge index` against the loop a user would write instead.

    python benchmarks/index_cpu.py                       # 40 photos of 12 MP, offline encoder and ViT-S/14
    python benchmarks/index_cpu.py --n 80 --rounds 3 --encoders offline
    python benchmarks/index_cpu.py --grid                # also every fixed worker/thread split
    python benchmarks/index_cpu.py --fidelity demo-out/bridge   # reduced-scale decoding and int8 vs
                                                         # full decode / fp32 on the demo's held-out scenes

The folder: `--n` JPEGs of 4032x3024 (quality 90), every other one stored sideways with EXIF
orientation 6, so it shows as 3024x4032, as phones write portrait photos. Content is photo-like (smooth
gradients, shapes, fine grain), so files are 2-4 MB, as a phone's are.

The user's loop is what rclip does: in one process, for each batch of 32 paths, PIL open,
exif_transpose, convert("RGB"), resize to the encoder's input (bicubic), normalise, then the same
weights as transformers' Dinov2Model (loaded from the bridge's encoder/ folder), torch on all cores.
Both run as a user runs them, each its own process, so the table gives images/s with start-up
(importing torch and transformers, loading the model) and after it; the index goes into a fresh folder
each round. The two alternate round by round (the machine is shared: a passing load hits both alike), and
the table gives each one's median images/s, the median of the round-by-round ratios, and where the time
goes: per image, decoding (in full, as the loop does, and at reduced scale, as the index does) and
encoding, each measured alone in this process.

Expectation, written before measuring (2-core machine). A 12-MP JPEG takes ~100-150 ms to decode in
full, while the offline encoder (6 layers, 112 px) encodes an image in ~10 ms: the loop is ~90%
decoding. libjpeg's 1/8 DCT scaling decodes the same file to 504x378 in ~15-25 ms (it skips the
inverse DCT of 63 of 64 coefficients and the upsampling), so the index's per-image cost falls to ~30 ms
on one core, and one decode worker beside one encoder thread overlaps the two: ~4-6x the loop, start-up
(~3 s) included at 24+ photos. ViT-S/14 at 224 px costs ~150-250 ms an image on 2 threads, so encoding
dominates both: reduced decoding saves ~100 ms of ~300, and giving one core to decoding costs the
encoder part of its speed: ~1.5-2x. Targets: >= 3x (offline), >= 1.5x (ViT-S/14).

Measured (benchmarks/RESULTS.md, "Indexing a phone's photos on a CPU"): reduced decoding ~7x faster as
expected, but a decode worker's start-up (seconds) and its core cost more than they gave on 2 cores, so
the default there became no worker and torch on both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bridge.config import BridgeConfig, EncoderConfig  # noqa: E402
from bridge.decoding import split_cores, usable_cores  # noqa: E402
from bridge.images import load_image  # noqa: E402
from bridge.model import TextBridge  # noqa: E402

PHONE = (4032, 3024)
ORIENTATION = 0x0112
BATCH = 32
# DINOv2 ViT-S/14's shape (random weights: no download), at 224 px as the checkpoint runs.
ENCODERS = {
    "offline": None,  # the default bridge's encoder: 6 layers, width 192, 112 px
    "vit-s14": {
        "model_type": "dinov2",
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "patch_size": 14,
        "image_size": 224,
    },
}


def make_photos(folder: Path, count: int) -> None:
    """`count` phone-sized JPEGs; odd ones stored landscape with EXIF orientation 6 (shown portrait)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    small = (PHONE[0] // 4, PHONE[1] // 4)
    ys, xs = np.mgrid[0 : small[1], 0 : small[0]].astype(np.float32)
    grain = rng.normal(0, 4, (PHONE[1] + 64, PHONE[0] + 64, 1)).astype(np.float32)  # shifted per photo
    for i in range(count):
        a, b, c = rng.uniform(40, 215, 3), rng.uniform(-0.15, 0.15, 3), rng.uniform(-0.15, 0.15, 3)
        base = Image.fromarray(np.clip(a + xs[..., None] * b + ys[..., None] * c, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(base)
        for _ in range(6):
            x, y = rng.integers(0, small[0] - 100), rng.integers(0, small[1] - 100)
            box = (x, y, x + rng.integers(30, 300), y + rng.integers(30, 300))
            draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        dx, dy = rng.integers(0, 64, 2)
        pixels = np.asarray(base.resize(PHONE, Image.BICUBIC), dtype=np.float32)
        pixels += grain[dy : dy + PHONE[1], dx : dx + PHONE[0]]
        photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        exif = photo.getexif()
        exif[ORIENTATION] = 6 if i % 2 else 1
        photo.save(folder / f"IMG_{i:04d}.jpg", quality=90, exif=exif)


def save_bridge(directory: Path, encoder: str) -> Path:
    """The offline default bridge, its encoder replaced by `encoder`'s shape (random weights)."""
    config = BridgeConfig()
    if ENCODERS[encoder] is not None:
        config.encoder = EncoderConfig(architecture=ENCODERS[encoder])
        config.projector.in_dim = ENCODERS[encoder]["hidden_size"]
    TextBridge.from_config(config).save_pretrained(directory)
    return directory


class UserLoop:
    """What a user writes (rclip's shape): one process, PIL + transformers, batches of 32."""

    def __init__(self, encoder_dir: Path):
        from transformers import Dinov2Model

        self.model = Dinov2Model.from_pretrained(encoder_dir).eval()
        processor = json.loads((encoder_dir / "preprocessor_config.json").read_text())
        self.side = processor["crop_size"]["height"]
        self.mean = np.asarray(processor["image_mean"], dtype=np.float32) * 255
        self.std = np.asarray(processor["image_std"], dtype=np.float32) * 255

    def load(self, path: Path) -> np.ndarray:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
        pixels = np.asarray(image.resize((self.side, self.side), Image.BICUBIC), dtype=np.float32)
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)

    @torch.no_grad()
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.model(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()

    def run(self, paths: list[Path]) -> float:
        """Seconds to embed every path."""
        start = time.perf_counter()
        for i in range(0, len(paths), BATCH):
            self.encode(np.stack([self.load(path) for path in paths[i : i + BATCH]]))
        return time.perf_counter() - start


def run_loop(folder: Path, encoder_dir: Path) -> tuple[float, float]:
    """(wall seconds with start-up, seconds of the loop itself) of the user's loop as its own process."""
    command = [sys.executable, __file__, "--user-loop", str(folder), str(encoder_dir)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the user loop failed:\n{done.stderr[-2000:]}")
    return seconds, float(done.stdout.split()[-1])


def run_index(
    folder: Path, bridge_dir: Path, out: Path, workers: int | None, threads: int | None
) -> tuple[float, float]:
    """(wall seconds with start-up, seconds of the update itself) of `dinobridge index` as a user runs
    it, into a fresh index."""
    shutil.rmtree(out, ignore_errors=True)
    # The console script pip installed beside this interpreter: what a user types.
    dinobridge = shutil.which("dinobridge", path=str(Path(sys.executable).parent)) or "dinobridge"
    command = [dinobridge, "index", str(folder), "--model", str(bridge_dir)]
    command += ["--out", str(out)]
    command += ["--workers", str(workers)] if workers is not None else []
    command += ["--threads", str(threads)] if threads is not None else []
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    found = re.search(r"failed 0 in ([0-9.]+) s", done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"dinobridge index failed:\n{done.stdout}\n{done.stderr[-2000:]}")
    return seconds, float(found.group(1))


def per_image_costs(paths: list[Path], bridge_dir: Path, loop: UserLoop) -> dict[str, float]:
    """Milliseconds per image of each stage alone, on one core (decode) and on the index's threads."""
    from bridge.model import TextBridge as Bridge

    preprocessing = Bridge.from_pretrained(bridge_dir).encoder.preprocessing
    sample = paths[: min(len(paths), 6)]
    costs = {}
    with torch_threads(1):
        start = time.perf_counter()
        for path in sample:
            loop.load(path)
        costs["decode in full + resize (loop)"] = (time.perf_counter() - start) / len(sample)
        start = time.perf_counter()
        for path in sample:
            preprocessing([load_image(path, short_side=preprocessing.short_side)])
        costs["decode at reduced scale + resize (index)"] = (time.perf_counter() - start) / len(sample)
    pixels = np.stack([loop.load(path) for path in sample])
    for threads in sorted({1, usable_cores()}):
        with torch_threads(threads):
            loop.encode(pixels)  # warm-up
            start = time.perf_counter()
            loop.encode(pixels)
            costs[f"encode, {threads} thread(s)"] = (time.perf_counter() - start) / len(sample)
    return {name: 1000 * seconds for name, seconds in costs.items()}


class torch_threads:
    def __init__(self, threads: int):
        self.threads, self.saved = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.saved)


def compare(folder: Path, encoder: str, rounds: int, grid: bool, work: Path) -> None:
    paths = sorted(folder.glob("*.jpg"))
    bridge_dir = save_bridge(work / f"bridge-{encoder}", encoder)
    loop = UserLoop(bridge_dir / "encoder")
    cores = usable_cores()
    runs: dict[str, tuple[int | None, int | None]] = {"dinobridge index (default)": (None, None)}
    if grid:  # every split that does not oversubscribe, and the old default (one worker, all threads)
        for workers in range(cores):
            runs[f"--workers {workers} --threads {cores - workers}"] = (workers, cores - workers)
        runs[f"--workers {max(1, cores - 1)} --threads {cores} (before)"] = (max(1, cores - 1), cores)
    seconds: dict[str, list[tuple[float, float]]] = {"user loop": [], **{name: [] for name in runs}}
    for _ in range(rounds):
        seconds["user loop"].append(run_loop(folder, bridge_dir / "encoder"))
        for name, (workers, threads) in runs.items():
            seconds[name].append(run_index(folder, bridge_dir, work / "index", workers, threads))
    default = split_cores(cores)
    print(f"\n{encoder}: {len(paths)} photos of 12 MP, {cores} cores, {rounds} interleaved rounds")
    print(f"default split here: {default[0]} decode worker(s), {default[1]} torch thread(s)")
    print(f"{'':38s} {'with start-up':>21s} {'after start-up':>21s}")
    print(f"{'':38s} {'img/s':>10s} {'x loop':>10s} {'img/s':>10s} {'x loop':>10s}")
    for name, times in seconds.items():
        row = f"{name:38s}"
        for part in (0, 1):  # 0: wall time of the process, 1: the work after start-up
            ratios = [loop[part] / run[part] for loop, run in zip(seconds["user loop"], times, strict=True)]
            speed = len(paths) / statistics.median(run[part] for run in times)
            row += f" {speed:10.2f} {statistics.median(ratios):9.2f}x"
        print(row)
    print("where the time goes (ms per image, each stage alone):")
    for name, ms in per_image_costs(paths, bridge_dir, loop).items():
        print(f"  {name:42s} {ms:7.1f}")


def fidelity(bridge_dir: Path, scenes: int, side: int, work: Path) -> None:
    """Reduced-scale decoding, bf16 and int8 against full decoding and fp32, on the demo's held-out scenes
    rendered at `side` px and saved as JPEGs (quality 90, every other one stored sideways with EXIF
    rotation): cosine of the embeddings, and text->image R@1 over the held-out gallery."""
    from bridge.index import embed_images
    from bridge.runtime import encode_settings
    from bridge.synthetic import SyntheticWorld
    from training.data import SYNTHETIC_CAPTIONS

    gallery = SyntheticWorld(0, image_size=side).scenes(10**7, scenes, distinct=True)  # the demo's
    folder = work / "scenes"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(gallery):
        image, exif = scene.render(), Image.Exif()
        if i % 2:  # stored turned a quarter left; orientation 6 turns it back upright
            image, exif[ORIENTATION] = image.transpose(Image.Transpose.ROTATE_90), 6
        paths.append(folder / f"scene{i:04d}.jpg")
        image.save(paths[-1], quality=90, exif=exif)
    captions = [scene.captions(SYNTHETIC_CAPTIONS)[0] for scene in gallery]
    prep = TextBridge.from_pretrained(bridge_dir).encoder.preprocessing
    pixels = {  # decoded once: each decode's encoder input, for every precision
        decode: torch.cat([prep([load_image(path, short_side=short_side)]) for path in paths])
        for decode, short_side in (("full", None), ("reduced", prep.short_side))
    }
    results = {}
    for precision in ("fp32", "bf16", "int8"):
        bridge = TextBridge.from_pretrained(bridge_dir)
        bridge.encoder.run_with(encode_settings("cpu", precision))
        texts = bridge.encode_text(captions).numpy()
        for decode, batch in pixels.items():
            vectors = [embed_images(bridge, part)[0].astype(np.float32) for part in batch.split(BATCH)]
            results[precision, decode] = np.concatenate(vectors)
    print(f"\n{len(paths)} held-out demo scenes at {side}x{side} px, JPEG q90, bridge '{bridge_dir}'")
    reference = results["fp32", "full"]
    print(f"{'':28s} {'cos mean':>9s} {'cos worst':>9s} {'R@1 t->i':>9s}")
    for (precision, decode), vectors in results.items():
        cosine = (vectors * reference).sum(1)
        recall = float((np.argmax(texts @ vectors.T, axis=1) == np.arange(len(paths))).mean())
        print(
            f"{precision + ', ' + decode + ' decode':28s} {cosine.mean():9.5f} {cosine.min():9.5f} {recall:9.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40, help="phone photos in the folder (default: 40)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    parser.add_argument("--encoders", nargs="+", choices=list(ENCODERS), default=list(ENCODERS))
    parser.add_argument("--grid", action="store_true", help="also time fixed worker/thread splits")
    parser.add_argument("--fidelity", metavar="BRIDGE", help="a trained demo bridge: measure fidelity only")
    parser.add_argument("--scenes", type=int, default=500, help="held-out scenes for --fidelity")
    parser.add_argument("--side", type=int, default=3024, help="scene size in px for --fidelity")
    parser.add_argument("--user-loop", nargs=2, metavar=("FOLDER", "ENCODER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.user_loop:  # the user's loop as its own process: prints its seconds after start-up
        print(UserLoop(Path(args.user_loop[1])).run(sorted(Path(args.user_loop[0]).glob("*.jpg"))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.fidelity:
            fidelity(Path(args.fidelity), args.scenes, args.side, work)
            return
        make_photos(work / "photos", args.n)
        for encoder in args.encoders:
            compare(work / "photos", encoder, args.rounds, args.grid, work)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
