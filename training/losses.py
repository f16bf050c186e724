"""Contrastive losses between image and text embeddings of a batch of matching pairs.

Row i of `images` and row i of `texts` belong together; every other row is a negative. Both losses
take L2-normalised embeddings and the bridge's learnable log-temperature (and bias, for SigLIP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CLIP clamps its temperature at 100 so the logits cannot blow up early in training.
MAX_LOGIT_SCALE = 100.0


def infonce_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the (B, B) similarity matrix."""
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * images @ texts.T
    targets = torch.arange(len(images), device=images.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def sigmoid_loss(
    images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: each (image, text) pair is its own binary match/no-match."""
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * images @ texts.T + logit_bias
    labels = 2 * torch.eye(len(images), device=images.device) - 1  # +1 on the diagonal, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / len(images)


LOSSES = {"infonce": infonce_loss, "siglip": sigmoid_loss}

# The dense loss compares every caption with every patch of every image: (B, B, N) cosines. On the
# first DENSE_IMAGES pairs of a batch only, it costs a sixteenth of the full batch's and, measured,
# grounds as well (README, "Dense grounding").
DENSE_IMAGES = 64
POOL_TEMPERATURE = 0.1  # softmax temperature over a caption's patch cosines: low picks few patches


def dense_loss(patches: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Captions against patches, no masks: each caption pools the patches of an image that match it.

    patches (B, N, E) and texts (B, E), normalised, row i of each from the same image. For every (image,
    caption) pair the image's patches are averaged with weights softmax(cosine / POOL_TEMPERATURE), and
    the pair scores the cosine of that average with the caption (Talk2DINO's text-conditioned pooling,
    with the weights from the patches themselves); then InfoNCE over the (B, B) scores. A caption scores
    high only on an image where some patches, each on its own, look like what it names: so every patch's
    embedding learns to say what is at that patch, in the text tower's words.
    """
    patches, texts = patches[:DENSE_IMAGES], texts[:DENSE_IMAGES]
    count, tokens, width = patches.shape
    cosines = (patches.reshape(count * tokens, width) @ texts.T).view(count, tokens, count).transpose(1, 2)
    weights = (cosines / POOL_TEMPERATURE).softmax(-1)  # (image, caption, patch)
    # |weighted mean patch|^2 = w^T G w with G the patches' Gram matrix: no (B, B, E) tensor is built.
    gram = patches @ patches.transpose(1, 2)
    norms = torch.einsum("icn,inm,icm->ic", weights, gram, weights).clamp_min(1e-8).sqrt()
    scores = (weights * cosines).sum(-1) / norms
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * scores
    targets = torch.arange(count, device=patches.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
