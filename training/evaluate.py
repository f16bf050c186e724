"""Evaluation of a text bridge: retrieval recall@K and zero-shot classification accuracy.

Retrieval counts as COCO and Flickr30k evaluations do: text->image is right when the caption's own
image ranks in the top K of the whole gallery; image->text when any of the image's captions does.

Not here: segmentation or LLM metrics (their own issues add them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RECALL_AT = (1, 5, 10)
# CLIP's short prompt ensemble: averaging a class name over a few phrasings steadies zero-shot results.
PROMPT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")


def retrieval_recall(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_image: Sequence[int]
) -> dict[str, float]:
    """Normalised image (I, E) and text (T, E) embeddings; text_image[t] is the image caption t belongs
    to. Returns {"text_to_image_R@1": ..., "image_to_text_R@1": ..., ...} for K in RECALL_AT.
    """
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    similarity = text_embeddings.float() @ image_embeddings.float().T  # (T, I)
    metrics = {}
    # Rank of the right image for each caption: how many images score strictly higher.
    right = similarity.gather(1, text_image[:, None])
    text_rank = (similarity > right).sum(1)
    # For each image, the best rank among its captions, ranking all captions by that image.
    by_image = similarity.T  # (I, T)
    text_score_rank = by_image.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each text per image
    owned = text_image[None, :] == torch.arange(len(image_embeddings))[:, None]
    image_rank = text_score_rank.masked_fill(~owned, len(text_image)).min(1).values
    for k in RECALL_AT:
        metrics[f"text_to_image_R@{k}"] = (text_rank < k).float().mean().item()
        metrics[f"image_to_text_R@{k}"] = (image_rank < k).float().mean().item()
    return metrics


def zeroshot_accuracy(
    image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, labels: Sequence[int]
) -> dict[str, float]:
    """Top-1/top-5 accuracy of normalised images (I, E) against normalised class embeddings (C, E)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    scores = image_embeddings.float() @ class_embeddings.float().T
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {
        "top1": (top[:, 0] == labels).float().mean().item(),
        "top5": (top == labels[:, None]).any(1).float().mean().item(),
    }
