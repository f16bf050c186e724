"""Zero-shot classification: class names become text embeddings, and each image gets a probability per class.

A class name is embedded as the mean of its prompts ("a photo of a {}.", ...), CLIP's prompt ensembling;
an image's probabilities are a softmax over the classes of its cosines with them, scaled by the bridge's
learned temperature. The same class embeddings label pixels in open-vocabulary segmentation.

Not here: accuracy over a labelled data set (training/evaluate.py) and per-pixel maps (grounding.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from bridge.model import MAX_LOGIT_SCALE, TextBridge
from bridge.queries import check_texts

if TYPE_CHECKING:
    from PIL import Image

    from bridge.vision import VisionFeatures

# CLIP's short prompt ensemble: averaging a class name over a few phrasings steadies zero-shot results.
PROMPT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """The class names, stripped; an empty list, a blank name or a name given twice is an error that
    says which one (two classes of one name would split its pixels or images between them)."""
    names = check_texts(class_names, "class name", '--classes "cat,dog"')
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"class name {', '.join(repr(name) for name in repeated)} given more than once; give each class once"
        )
    return names


def encode_class_names(
    bridge: TextBridge, class_names: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES
) -> torch.Tensor:
    """(classes, E) normalised class embeddings on the bridge's device: each the mean of its prompts."""
    names = check_class_names(class_names)
    if not templates:
        raise ValueError("no prompt templates given; pass at least one, e.g. ('{}',)")
    prompts = [template.format(name) for name in names for template in templates]
    embeddings = bridge.encode_text(prompts).view(len(names), len(templates), -1).mean(1)
    return F.normalize(embeddings, dim=-1)


def zero_shot_classify(
    bridge: TextBridge,
    images: Sequence[str | os.PathLike | Image.Image] | VisionFeatures,
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 32,
) -> np.ndarray:
    """(N images, C classes) float32 probabilities, each row summing to 1.

    images: file paths or PIL images (mixed), or features the encoder already computed. A row is the
    softmax over the classes of exp(logit_scale) * cosine(image, class), the scale the bridge learnt in
    training (capped as training caps it), so `class_names[row.argmax()]` is the class of highest cosine.
    """
    classes = encode_class_names(bridge, class_names, templates).cpu()  # names checked before any image
    embeddings = bridge.encode_images(images, batch_size=batch_size, convert_to_numpy=False)
    scale = bridge.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE).cpu()
    return (scale * embeddings @ classes.T).softmax(dim=-1).numpy()
