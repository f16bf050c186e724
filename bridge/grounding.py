"""Dense grounding: where in an image a text is, as a heatmap, and open-vocabulary segmentation.

A text bridge's projector gives every patch an embedding in the text tower's space; the cosine of a
text with each patch is a (h, w) heatmap (`TextBridge.patch_similarity`). This file turns those patch
maps into maps at the image's own resolution: the image is resized so its short side is `scale`
pixels, covered by encoder-sized windows (sliding windows for images longer than one window), and each
window is also encoded shifted by fractions of a patch, so a pixel's score mixes several patch grids
and the map resolves finer than one patch; then the map is refined with the image's own colours (PAMR),
so it stops at edges (both measured in the README). Segmentation scores every class name, averaged over
prompt templates, and labels a pixel with the best class, or background where no class reaches the
threshold.

Not here: training the per-patch embeddings (training/losses.py has the dense objective) and the
segmentation metrics (training/evaluate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from bridge.images import DEFAULT_MAX_PIXELS
from bridge.model import TextBridge
from bridge.queries import check_texts
from bridge.vision import Preprocessing, check_image_size
from bridge.zeroshot import check_class_names, encode_class_names

# Each class name is scored as the mean embedding of these phrasings (CLIP's prompt ensembling). Sizes
# and places are what captions say about objects, so the ensemble meets the patch embeddings where the
# captions put them; measured on the offline default, it labels 59.8% of object pixels right against
# 57.1% for "a {}" alone.
SEGMENTATION_TEMPLATES = (
    "a {}",
    "a small {}",
    "a large {}",
    "a {} on the left",
    "a {} on the right",
    "a {} at the top",
    "a {} at the bottom",
    "a {} in the center",
)
# Cosine below which a pixel is background: for the offline default's dense bridge trained with hard
# negatives, mIoU on 100 held-out scenes is 0.610 / 0.630 / 0.628 / 0.484 at 0.10 / 0.12 / 0.14 / 0.16.
# A cosine moves with each bridge and tower: tune it with `dinobridge eval segmentation --threshold` on
# data of your own.
DEFAULT_THRESHOLD = 0.14
WINDOW_BATCH = 32  # windows encoded at once
# Refinement steps (PAMR): measured on held-out scenes, mIoU 0.34 unrefined, 0.58 after 5, 0.61 after 10
# and 0.62 after 20; 10 is the default.
REFINE_ITERATIONS = 10
REFINE_DILATIONS = (1, 2, 4, 8, 12)  # neighbour distances in pixels: reach, and fine edges


@dataclass
class Segmentation:
    """An open-vocabulary segmentation of one image."""

    labels: np.ndarray  # (H, W) int64: 0 background, 1 + i for class_names[i]
    scores: torch.Tensor  # (classes, H, W) cosine of each class with each pixel
    class_names: list[str]
    threshold: float


def parse_class_list(text: str) -> list[str]:
    """'cat, dog,sofa' -> ['cat', 'dog', 'sofa'], with `check_class_names`'s errors."""
    return check_class_names(text.split(",") if text.strip() else [])


@torch.no_grad()
def heatmaps(
    bridge: TextBridge,
    image: Image.Image,
    texts: Sequence[str] | str | torch.Tensor,
    scale: int | None = None,
    shifts: int = 2,
    refine: int = REFINE_ITERATIONS,
) -> torch.Tensor:
    """(texts, H, W) cosine of each text with every pixel of `image` (H, W: the image's own size).

    texts: strings, or already encoded normalised text embeddings (T, E). scale: the short side, in
    pixels, the image is resized to before windowing (default: one encoder window; larger zooms in,
    costing more windows). shifts: each window is also encoded shifted by 1/shifts of a patch in each
    direction (shifts**2 passes); 1 turns it off. refine: steps of `refine_with_image` (0: none).
    """
    encoder = bridge.encoder
    patch, window = encoder.patch_size, encoder.preprocessing.image_size
    check_image_size(image, patch)
    if shifts < 1 or shifts > patch:
        raise ValueError(f"shifts={shifts} is out of range; use 1 (off) to {patch} (one pixel)")
    if isinstance(texts, torch.Tensor):
        text = texts.to(bridge.device)
    else:
        text = bridge.encode_text(check_texts([texts] if isinstance(texts, str) else texts))
    scale = scale or window
    if scale < window:
        raise ValueError(
            f"scale {scale} is below the encoder's window of {window} pixels; use {window} or more"
        )
    factor = scale / min(image.size)
    width, height = (max(window, round(side * factor)) for side in image.size)
    if width * height > DEFAULT_MAX_PIXELS:  # the loader's limit: a larger map would exhaust the memory
        most = int(scale * (DEFAULT_MAX_PIXELS / (width * height)) ** 0.5)
        raise ValueError(
            f"scale {scale} would map the {image.width}x{image.height} image at {width}x{height} = "
            f"{width * height:,} pixels, over the limit of {DEFAULT_MAX_PIXELS:,}; use a scale of at most {most}"
        )
    # Edge padding of one patch on every side: a shifted window may reach past the image by < 1 patch.
    pixels = np.pad(
        np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC)),
        ((patch, patch), (patch, patch), (0, 0)),
        mode="edge",
    )
    offsets = [round(i * patch / shifts) for i in range(shifts)]
    corners = [
        (patch + top - dy, patch + left - dx)
        for top in _window_starts(height, window)
        for left in _window_starts(width, window)
        for dy in offsets
        for dx in offsets
    ]
    # The windows are already window-sized: only the checkpoint's normalisation applies.
    normalise = Preprocessing(window, None, encoder.preprocessing.mean, encoder.preprocessing.std)
    # Each window's map fades out over its outermost patch, so where a shifted window ends the average
    # changes smoothly instead of leaving a seam; where one window alone covers a pixel it is exact.
    ramp = torch.clamp((torch.minimum(torch.arange(window), torch.arange(window).flip(0)) + 1) / patch, max=1)
    fade = ramp[:, None] * ramp[None, :]
    total = torch.zeros(len(text), *pixels.shape[:2])
    weight = torch.zeros(pixels.shape[:2])
    for start in range(0, len(corners), WINDOW_BATCH):
        batch = corners[start : start + WINDOW_BATCH]
        crops = [Image.fromarray(pixels[y : y + window, x : x + window]) for y, x in batch]
        patches = bridge.encode_image_patches(normalise(crops))  # (windows, h*w, E)
        grid = encoder.grid_hw
        maps = (patches @ text.T).transpose(1, 2).unflatten(2, grid)  # (windows, T, h, w)
        maps = F.interpolate(maps, size=(window, window), mode="bilinear", align_corners=False).cpu()
        for (y, x), window_map in zip(batch, maps, strict=True):
            total[:, y : y + window, x : x + window] += window_map * fade
            weight[y : y + window, x : x + window] += fade
    inside = (slice(None), slice(patch, patch + height), slice(patch, patch + width))
    resized = (total[inside] / weight[inside[1:]])[None]
    maps = F.interpolate(resized, size=image.size[::-1], mode="bilinear", align_corners=False)[0]
    return refine_with_image(maps, image, refine) if refine else maps


def refine_with_image(
    maps: torch.Tensor, image: Image.Image, iterations: int = REFINE_ITERATIONS
) -> torch.Tensor:
    """(T, H, W) maps refined by the image's colours: pixel-adaptive mask refinement (PAMR, Araslanov and
    Roth 2020), as Talk2DINO and other open-vocabulary segmenters use.

    Each step replaces a pixel's scores by a weighted mean of its neighbours' at REFINE_DILATIONS,
    weighted by a softmax of how alike their colours are; repeated, scores spread within a region of one
    colour and stop at its edges, which a map upsampled from patches cannot find by itself.
    """
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    offsets = [
        (dy * d, dx * d) for d in REFINE_DILATIONS for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    ]
    neighbours = torch.stack([_shifted(pixels, dy, dx) for dy, dx in offsets])  # (K, 3, H, W)
    difference = (neighbours - pixels).abs().mean(1)  # (K, H, W)
    spread = neighbours.std(0).mean(0) + 1e-3  # how varied the neighbourhood is, per pixel
    affinity = (-difference / (0.1 * spread)).softmax(0)  # (K, H, W), over neighbours
    for _ in range(iterations):
        maps = sum(a * _shifted(maps, dy, dx) for a, (dy, dx) in zip(affinity, offsets, strict=True))
    return maps


def _shifted(values: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(C, H, W) -> each pixel's neighbour at (dy, dx), edges replicated."""
    pad = max(abs(dy), abs(dx))
    height, width = values.shape[-2:]
    padded = F.pad(values[None], (pad, pad, pad, pad), mode="replicate")[0]
    return padded[:, pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def segment(
    bridge: TextBridge,
    image: Image.Image,
    class_names: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    templates: Sequence[str] = SEGMENTATION_TEMPLATES,
    scale: int | None = None,
    shifts: int = 2,
    refine: int = REFINE_ITERATIONS,
) -> Segmentation:
    """Label every pixel with its best class, or 0 (background) where no class's cosine reaches threshold."""
    names = check_class_names(class_names)
    scores = heatmaps(bridge, image, encode_class_names(bridge, names, templates), scale, shifts, refine)
    return Segmentation(label_pixels(scores, threshold), scores, names, threshold)


def label_pixels(scores: torch.Tensor, threshold: float) -> np.ndarray:
    """(classes, H, W) scores -> (H, W) labels: 1 + the best class, 0 where its score is below threshold."""
    best, index = scores.max(0)
    return torch.where(best >= threshold, index + 1, 0).numpy().astype(np.int64)


def overlay_heatmap(image: Image.Image, heatmap: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """The image with one (H, W) heatmap laid over it in the inferno colours (bright: the text is here).

    The map is stretched from its own minimum to its maximum: it shows where, not how sure.
    """
    from matplotlib import colormaps  # here: matplotlib costs a second to import and only drawing needs it

    values = heatmap.float().numpy()
    low, high = values.min(), values.max()
    colours = colormaps["inferno"]((values - low) / max(high - low, 1e-8))[..., :3]
    base = np.asarray(image.convert("RGB").resize(values.shape[::-1]), dtype=np.float32) / 255
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * base + alpha * colours)))


def draw_segmentation(image: Image.Image, segmentation: Segmentation, alpha: float = 0.6) -> Image.Image:
    """The image with each class's pixels tinted in its own colour and a legend underneath."""
    from matplotlib import colormaps  # here: matplotlib costs a second to import and only drawing needs it

    palette = np.uint8(255 * np.asarray(colormaps["tab20"].colors)[:, :3])
    labels = segmentation.labels
    base = np.asarray(image.convert("RGB").resize(labels.shape[::-1]), dtype=np.float32)
    tinted = base.copy()
    for label in range(1, len(segmentation.class_names) + 1):
        tinted[labels == label] = (1 - alpha) * base[labels == label] + alpha * palette[(label - 1) % 20]
    width, height = labels.shape[::-1]
    row = 16
    canvas = Image.new("RGB", (max(width, 200), height + row * len(segmentation.class_names) + 4), "white")
    canvas.paste(Image.fromarray(np.uint8(tinted)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, name in enumerate(segmentation.class_names):
        share = float((labels == index + 1).mean())
        y = height + 2 + index * row
        draw.rectangle((2, y + 2, 14, y + 13), fill=tuple(int(c) for c in palette[index % 20]))
        draw.text((20, y + 2), f"{name} ({share:.0%} of the image)", fill="black")
    return canvas


def _window_starts(length: int, window: int) -> list[int]:
    """Starts of windows covering [0, length): half-window stride, the last flush with the end."""
    if length <= window:
        return [0]
    stride = window // 2
    starts = list(range(0, length - window, stride))
    return [*starts, length - window]
