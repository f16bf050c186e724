"""Pre-aligning an LLM-route projector to a text tower, before any LLM reads its visual tokens.

Trained only through an LLM's answer loss, a projector learns what the frozen encoder holds non-linearly
(the offline encoder's shape) very slowly: the LLM must first learn to ask for it (docs/llm-route.md).
The text route teaches the same thing cheaply, since a step costs the projector alone: every visual
token goes through a linear head into the frozen text tower's space, and dense_loss (training/losses.py)
scores captions against the tokens that match them, with hard negatives (training/negatives.py) for the
words the tokens must tell apart. After that the tokens already say what is where; the head is thrown
away and the projector keeps its LLaVA shape, so it exports as before.

Not here: the LLM stages that follow (vlm.py), the loop the steps run in (loop.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from bridge.config import TrainConfig
from bridge.vlm import VisionLLM
from training.align import CaptionedFeatures, sample_batch
from training.loop import run_loop
from training.losses import dense_loss


class PrealignmentHead(nn.Module):
    """What pre-alignment trains: the projector, a throw-away linear head from the LLM's width to the
    text tower's, and the loss's temperature."""

    def __init__(self, projector: nn.Module, llm_width: int, text_width: int):
        super().__init__()
        self.projector = projector
        self.head = nn.Linear(llm_width, text_width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature


def prealign_projector(
    model: VisionLLM, data: CaptionedFeatures, config: TrainConfig, progress: bool = True
) -> list[float]:
    """Train `model.projector` (nothing else) for `config.steps` steps on `data`'s captions and hard
    negatives; returns the losses. Batches come from the text route's seeded sampler; config.batch_size
    above the dense loss's 64 images only costs time. Nothing is written: the run is one phase of a
    larger job (the demo's), so it keeps no log or checkpoints."""
    llm_width = model.visual_tokens(data.features[[0]]).shape[-1]
    trainable = PrealignmentHead(model.projector, llm_width, data.captions.shape[1])
    trainable.requires_grad_(True).train()

    def micro_step(accelerator: Accelerator, parts: nn.Module, batch: int) -> float:
        images, captions = sample_batch(data, config, batch)
        tokens = model.visual_tokens(data.features[images.tolist()].to(accelerator.device))
        negatives = None if data.negatives is None else data.negatives[captions].to(accelerator.device)
        texts = data.captions[captions].to(accelerator.device)
        loss = dense_loss(F.normalize(parts.head(tokens), dim=-1), texts, parts.logit_scale, negatives)
        accelerator.backward(loss)
        return loss.item()

    losses = run_loop(
        trainable, micro_step, config, None, progress=progress, desc="pre-aligning the projector"
    )
    model.projector.eval()
    return losses
