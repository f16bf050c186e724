"""Fingerprints: short hashes of what decides a model's outputs (its weights and settings).

Caches and indexes store them and refuse to mix results of two models. One function, used by the
encoder, the text towers and the bridge alike, so "same fingerprint" means the same thing everywhere.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def fingerprint(module: nn.Module, *settings: str) -> str:
    """16 hex digits over the module's class, its weights (exact bytes) and any settings strings."""
    digest = hashlib.sha256(type(module).__name__.encode())
    for setting in settings:
        digest.update(setting.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
