"""`dinobridge demo`: the text route end to end on the offline default, in a few minutes on a CPU.

Trains two projectors on the same cached features of the synthetic world: the CLS-only linear
baseline (LiT / open_clip's lock-image recipe) and the attention projector over all patch tokens, then
reports text->image and image->text recall on held-out scenes (the whole held-out set is the gallery)
and draws the top-5 images for a few captions. The gap between the two is the point of the project:
DINOv2's patch tokens carry what its CLS token alone does not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from bridge.config import ProjectorConfig, RunConfig
from bridge.model import TextBridge
from bridge.projectors import build_projector
from training.align import AlignmentData, CaptionedFeatures, TrainResult, fit

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    results: dict[str, TrainResult]  # projector name -> its training result and held-out metrics
    held_out: int
    seconds: float
    picture: Path
    bridge_dir: Path


def run_demo(
    out_dir: str | Path = "demo-out", train_scenes: int = 12_000, progress: bool = True
) -> DemoResult:
    start = time.perf_counter()
    out_dir = Path(out_dir)
    config = RunConfig()
    torch.manual_seed(config.train.seed)
    bridge = TextBridge.from_config(config.bridge)
    data = AlignmentData.prepare(
        bridge, f"synthetic:{train_scenes}", config.train, out_dir / "cache", progress=progress
    )
    baseline_config = replace(config.bridge, projector=ProjectorConfig(kind="linear"))
    baseline = TextBridge(
        baseline_config,
        bridge.encoder,
        bridge.tower,
        build_projector(baseline_config.projector, bridge.encoder.hidden_size, bridge.tower.embed_dim),
    )
    results = {}
    for name, model in (("CLS-only linear", baseline), ("patch-token attention", bridge)):
        log.info("training the %s projector", name)
        results[name] = fit(model, data, config.train, out_dir / name.replace(" ", "-"), progress=progress)
    bridge.save_pretrained(out_dir / "bridge")
    picture = draw_top5(bridge, data.held_out, out_dir / "top5.png")
    return DemoResult(
        results, len(data.held_out.features), time.perf_counter() - start, picture, out_dir / "bridge"
    )


@torch.no_grad()
def draw_top5(bridge: TextBridge, data: CaptionedFeatures, path: Path, queries: int = 4) -> Path:
    """A PNG with one row per caption: the caption, then its top-5 images (green frame: the right one)."""
    images = bridge.encode_image(data.features[list(range(len(data.features)))])
    thumb, text_width, pad = 96, 330, 6
    canvas = Image.new("RGB", (text_width + 5 * (thumb + pad), queries * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for row in range(queries):
        caption_index = int(data.first_caption[row])
        caption = data.features.pairs[row].captions[0]
        top = (data.captions[caption_index] @ images.T).topk(5).indices.tolist()
        y = pad + row * (thumb + pad)
        draw.multiline_text((pad, y + 4), _wrap(caption, 50), fill="black")
        for rank, image_index in enumerate(top):
            x = text_width + rank * (thumb + pad)
            picture = data.features.pairs[image_index].load_image().resize((thumb, thumb))
            canvas.paste(picture, (x, y))
            colour = "green" if image_index == row else "red"
            draw.rectangle((x - 2, y - 2, x + thumb + 1, y + thumb + 1), outline=colour, width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
