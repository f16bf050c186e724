"""Evaluation: a text bridge's retrieval recall@K, zero-shot accuracy, segmentation mIoU and pointing game,
and a VisionLLM's answer accuracy.

Retrieval counts as COCO and Flickr30k evaluations do: text->image is right when the caption's own
image ranks in the top K of the whole gallery; image->text when any of the image's captions does.
Segmentation counts as the VOC and ADE benchmarks do: one confusion matrix over the whole data set
(not a mean of per-image scores), IoU per class, the mean over the classes that occur; label 255 is
ignored. Answers count as exact matches after lower-casing and trimming end punctuation, per question kind.

Not here: running the models (align.py, vlm.py hold the loops that call these).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from bridge.grounding import (
    DEFAULT_THRESHOLD,
    REFINE_ITERATIONS,
    SEGMENTATION_TEMPLATES,
    heatmaps,
    label_pixels,
)
from bridge.model import TextBridge
from bridge.zeroshot import encode_class_names

RECALL_AT = (1, 5, 10)


def retrieval_recall(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_image: Sequence[int]
) -> dict[str, float]:
    """Normalised image (I, E) and text (T, E) embeddings; text_image[t] is the image caption t belongs
    to. Returns {"text_to_image_R@1": ..., "image_to_text_R@1": ..., ...} for K in RECALL_AT.
    """
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    similarity = text_embeddings.float() @ image_embeddings.float().T  # (T, I)
    metrics = {}
    # Rank of the right image for each caption: how many other images score as high or higher. A tie
    # counts against the model, or a bridge that gave every image the same embedding would score R@1 1.0.
    right = similarity.gather(1, text_image[:, None])
    text_rank = (similarity >= right).sum(1) - 1
    # For each image, the rank of its best-scoring caption: how many other images' captions score as high.
    by_image = similarity.T  # (I, T)
    owned = text_image[None, :] == torch.arange(len(image_embeddings))[:, None]
    best_owned = by_image.masked_fill(~owned, -torch.inf).max(1).values
    image_rank = ((by_image >= best_owned[:, None]) & ~owned).sum(1)
    for k in RECALL_AT:
        metrics[f"text_to_image_R@{k}"] = (text_rank < k).float().mean().item()
        metrics[f"image_to_text_R@{k}"] = (image_rank < k).float().mean().item()
    return metrics


def zeroshot_accuracy(scores: np.ndarray | torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """Top-1/top-5 accuracy of (images, classes) scores: `bridge.zeroshot.zero_shot_classify`'s
    probabilities, or cosines, which rank the classes alike."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    scores = torch.as_tensor(scores)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {
        "top1": (top[:, 0] == labels).float().mean().item(),
        "top5": (top == labels[:, None]).any(1).float().mean().item(),
    }


IGNORE_LABEL = 255  # VOC's "void" pixels (object borders, difficult regions): counted nowhere


def confusion_matrix(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 pixel counts, rows the true label, columns the predicted one.

    Both maps are (H, W) integer labels (0 = background); target pixels labelled IGNORE_LABEL are left out.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted labels are {predicted.shape} but the mask is {target.shape}")
    kept = target != IGNORE_LABEL
    target, predicted = target[kept].astype(np.int64), predicted[kept].astype(np.int64)
    if target.size and target.max() >= num_classes:
        raise ValueError(
            f"the mask holds label {target.max()} but there are {num_classes} classes (0..{num_classes - 1});"
            f" add the missing class names or mark those pixels {IGNORE_LABEL} (ignored)"
        )
    counts = np.bincount(target * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, float]:
    """mIoU with background (class 0) and without it, and pixel accuracy, from a summed confusion matrix.

    A class counts in a mean only where it occurs in the masks or the predictions (its union is not 0).
    """
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    occurs = union > 0
    iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=occurs)
    return {
        "mIoU": float(iou[occurs].mean()) if occurs.any() else 0.0,
        "mIoU_no_background": float(iou[1:][occurs[1:]].mean()) if occurs[1:].any() else 0.0,
        "pixel_accuracy": float(intersection.sum() / max(1, confusion.sum())),
    }


def pointing_hit(heatmap: torch.Tensor | np.ndarray, mask: np.ndarray) -> bool:
    """The pointing game: whether the heatmap's maximum (H, W) falls inside the object's mask (H, W)."""
    heatmap = torch.as_tensor(heatmap)
    if heatmap.shape != mask.shape:
        raise ValueError(f"heatmap is {tuple(heatmap.shape)} but the mask is {mask.shape}")
    row, column = divmod(int(heatmap.argmax()), heatmap.shape[1])
    return bool(mask[row, column])


def answer_accuracy(replies: Sequence[str], answers: Sequence[str], kinds: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per kind (and "all"), after lower-casing and trimming spaces and end
    punctuation: short answers ("blue", "top left") have one right wording."""

    def normal(text: str) -> str:
        return " ".join(text.lower().replace(" .", ".").strip(" .!?").split())

    right: dict[str, list[bool]] = {}
    for reply, answer, kind in zip(replies, answers, kinds, strict=True):
        right.setdefault(kind, []).append(normal(reply) == normal(answer))
    right["all"] = [r for values in right.values() for r in values]
    return {kind: sum(values) / len(values) for kind, values in right.items() if values}


@torch.no_grad()
def evaluate_segmentation(
    bridge: TextBridge,
    samples: Iterable[tuple[Image.Image, np.ndarray]],
    class_names: Sequence[str],
    threshold: float | Sequence[float] = DEFAULT_THRESHOLD,
    templates: Sequence[str] = SEGMENTATION_TEMPLATES,
    shifts: int = 2,
    refine: int = REFINE_ITERATIONS,
) -> dict[str, float]:
    """Open-vocabulary segmentation of (image, (H, W) label mask) samples, and the pointing game.

    class_names[0] names the background, which is never prompted: a pixel is background where no other
    class reaches `threshold`. Several thresholds may be given: the metrics are then those of the one
    with the best mIoU, an upper bound chosen on the very data (fair only for a baseline). The pointing
    game asks, for every class present in a mask, whether its heatmap peaks inside that class's pixels.
    """
    thresholds = [threshold] if isinstance(threshold, float | int) else list(threshold)
    prompts = encode_class_names(bridge, class_names[1:], templates)
    confusions = np.zeros((len(thresholds), len(class_names), len(class_names)), dtype=np.int64)
    images = hits = objects = 0
    for image, mask in samples:
        scores = heatmaps(bridge, image, prompts, shifts=shifts, refine=refine)
        for confusion, value in zip(confusions, thresholds, strict=True):
            confusion += confusion_matrix(label_pixels(scores, value), mask, len(class_names))
        for label in np.unique(mask):
            if label not in (0, IGNORE_LABEL):
                hits += pointing_hit(scores[label - 1], mask == label)
                objects += 1
        images += 1
    results = [segmentation_metrics(confusion) for confusion in confusions]
    best = max(range(len(thresholds)), key=lambda i: results[i]["mIoU"])
    return {
        **results[best],
        "pointing": hits / max(1, objects),
        "images": images,
        "objects": objects,
        "threshold": thresholds[best],
    }
