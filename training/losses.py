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
