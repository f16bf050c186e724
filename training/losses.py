"""Contrastive losses between image and text embeddings of a batch of matching pairs.

Row i of `images` and row i of `texts` belong together; every other row is a negative. Both losses
take L2-normalised embeddings and the bridge's learnable log-temperature (and bias, for SigLIP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bridge.model import MAX_LOGIT_SCALE


def infonce_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the (B, B) similarity matrix.

    negatives (B, G, E): hard negative captions of each image's caption (training/negatives.py), added to
    that image's row of candidates, as NegCLIP does; all-zero rows are absent.
    """
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    hard = None if negatives is None else _hard_logits(scale * images, negatives)
    return _symmetric_cross_entropy(scale * images @ texts.T, hard)


def _symmetric_cross_entropy(logits: torch.Tensor, hard: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's loss over (B, B) logits, pair i on the diagonal: image->text and text->image cross-entropy,
    averaged. hard (B, G): logits of each image's own hard negatives, extra candidates for its caption."""
    targets = torch.arange(len(logits), device=logits.device)
    image_to_text = logits if hard is None else torch.cat([logits, hard], 1)
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(logits.T, targets)) / 2


def sigmoid_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: each (image, text) pair is its own binary match/no-match; hard
    negatives (as in infonce_loss) are more no-match pairs."""
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale * images @ texts.T + logit_bias
    labels = 2 * torch.eye(len(images), device=images.device) - 1  # +1 on the diagonal, -1 elsewhere
    loss = -F.logsigmoid(labels * logits).sum()
    if negatives is not None:  # an absent negative's logit is -inf: no-match for certain, zero loss
        loss = loss - F.logsigmoid(-(_hard_logits(scale * images, negatives) + logit_bias)).sum()
    return loss / len(images)


def _hard_logits(scaled_images: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(B, G) logits of each image (B, E) with its own hard negatives (B, G, E); -inf where absent."""
    return _absent_at_minus_inf(torch.einsum("be,bge->bg", scaled_images, negatives), negatives)


def _absent_at_minus_inf(logits: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(B, G) logits, -inf where the negative (B, G, E) is all zeros: a caption with no word to swap."""
    return logits.masked_fill(negatives.norm(dim=-1) == 0, -torch.inf)


LOSSES = {"infonce": infonce_loss, "siglip": sigmoid_loss}

# The dense loss compares every caption with every patch of every image: (B, B, N) cosines. On the
# first DENSE_IMAGES pairs of a batch only, it costs a sixteenth of the full batch's and, measured,
# grounds as well (docs/grounding.md).
DENSE_IMAGES = 64
POOL_TEMPERATURE = 0.1  # softmax temperature over a caption's patch cosines: low picks few patches


def dense_loss(
    patches: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Captions against patches, no masks: each caption pools the patches of an image that match it.

    patches (B, N, E) and texts (B, E), normalised, row i of each from the same image. For every (image,
    caption) pair the image's patches are averaged with weights softmax(cosine / POOL_TEMPERATURE), and
    the pair scores the cosine of that average with the caption (Talk2DINO's text-conditioned pooling,
    with the weights from the patches themselves); then InfoNCE over the (B, B) scores. A caption scores
    high only on an image where some patches, each on its own, look like what it names: so every patch's
    embedding learns to say what is at that patch, in the text tower's words.

    negatives (B, G, E): hard negative captions of each image's caption (training/negatives.py), scored
    the same way against that image only and added to its row of candidates; all-zero rows are absent.
    """
    patches, texts = patches[:DENSE_IMAGES], texts[:DENSE_IMAGES]
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    scores = pooled_scores(patches, texts.expand(len(patches), -1, -1))  # (image, caption)
    hard = None
    if negatives is not None:
        negatives = negatives[:DENSE_IMAGES]
        hard = _absent_at_minus_inf(scale * pooled_scores(patches, negatives), negatives)
    return _symmetric_cross_entropy(scale * scores, hard)


def pooled_scores(patches: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(B, T) scores of each image's patches (B, N, E) pooled by each of its texts (B, T, E), as dense_loss
    describes."""
    cosines = texts @ patches.transpose(1, 2)  # (image, text, patch)
    weights = (cosines / POOL_TEMPERATURE).softmax(-1)
    # |weighted mean patch|^2 = w^T G w with G the patches' Gram matrix: no (B, T, E) tensor is built.
    gram = patches @ patches.transpose(1, 2)
    norms = torch.einsum("itn,inm,itm->it", weights, gram, weights).clamp_min(1e-8).sqrt()
    return (weights * cosines).sum(-1) / norms
