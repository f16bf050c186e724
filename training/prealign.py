"""Pre-aligning an LLM-route projector to a text tower, before any LLM reads its visual tokens.

Trained only through an LLM's answer loss, a projector learns what the frozen encoder holds non-linearly
(the offline encoder's shape) very slowly: the LLM must first learn to ask for it (README, "The offline
demo": "What it took"). The text route teaches the same thing cheaply, since a step costs the projector alone:
every visual token goes through a linear head into the frozen text tower's space, and dense_loss
(training/losses.py) scores captions against the tokens that match them, with hard negatives
(training/negatives.py) for the words the tokens must tell apart. After that the tokens already say what
is where; the head is thrown away and the projector keeps its LLaVA shape, so it exports as before.

Not here: the LLM stages that follow (vlm.py), the text route's own loop (align.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bridge.config import TrainConfig
from bridge.vlm import VisionLLM
from training.align import CaptionedFeatures, learning_rate, sample_batch
from training.losses import dense_loss


def prealign_projector(
    model: VisionLLM, data: CaptionedFeatures, config: TrainConfig, progress: bool = True
) -> list[float]:
    """Train `model.projector` (nothing else) for `config.steps` steps on `data`'s captions and hard
    negatives; returns the losses. Batches come from the text route's seeded sampler; config.batch_size
    above the dense loss's 64 images only costs time."""
    projector = model.projector
    head = nn.Linear(model.visual_tokens(data.features[[0]]).shape[-1], data.captions.shape[1])
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    parameters = [*projector.parameters(), *head.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    projector.requires_grad_(True).train()
    losses = []
    for step in tqdm(range(config.steps), desc="pre-aligning the projector", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        images, captions = sample_batch(data, config, step)
        tokens = model.visual_tokens(data.features[images.tolist()])
        negatives = None if data.negatives is None else data.negatives[captions]
        loss = dense_loss(F.normalize(head(tokens), dim=-1), data.captions[captions], logit_scale, negatives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    projector.eval()
    return losses
