"""Projectors: the only trained part of a text bridge, from encoder tokens to the text tower's space.

Every projector takes `VisionFeatures` and returns a global embedding (B, E) and per-patch embeddings
(B, N, E), both in the text space, so retrieval and dense grounding use the same module. Register a new
one with `@register_projector("name")`; its constructor's keyword arguments are its config options.

Not here: the encoder (vision.py), the text side (text.py), losses (training/losses.py).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from bridge.config import ConfigError, ProjectorConfig
from bridge.vision import VisionFeatures

PROJECTORS: dict[str, type[nn.Module]] = {}


def register_projector(name: str):
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        PROJECTORS[name] = cls
        return cls

    return register


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The projector `config.kind` mapping in_dim-d tokens to out_dim-d embeddings.

    Checks the options against the constructor and the recorded widths against the actual ones before
    any weight is allocated, so a wrong config fails with both sizes named, not with a shape error.
    """
    if config.kind not in PROJECTORS:
        raise ConfigError(f"unknown projector '{config.kind}'; registered: {', '.join(sorted(PROJECTORS))}")
    if config.in_dim is not None and config.in_dim != in_dim:
        raise ConfigError(
            f"projector expects {config.in_dim}-d patches but the encoder gives {in_dim}-d ones; "
            f"set projector.in_dim to {in_dim} (or null) and train it for this encoder"
        )
    if config.out_dim is not None and config.out_dim != out_dim:
        raise ConfigError(
            f"projector outputs {config.out_dim}-d embeddings but the text tower's are {out_dim}-d; "
            f"set projector.out_dim to {out_dim} (or null)"
        )
    cls = PROJECTORS[config.kind]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_dim", "out_dim"}
    for key in config.options:
        if key not in accepted:
            raise ConfigError(
                f"unknown option '{key}' for projector '{config.kind}'; it accepts: {', '.join(sorted(accepted))}"
            )
    return cls(in_dim, out_dim, **config.options)


@register_projector("linear")
class LinearProjector(nn.Module):
    """CLS token through one linear map: the LiT / open_clip lock-image baseline."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: VisionFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(features.cls), self.proj(features.patches)


@register_projector("mlp")
class MLPProjector(nn.Module):
    """LLaVA's mlp2x_gelu, applied to the CLS token for the global embedding and to every patch."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: VisionFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp(features.cls), self.mlp(features.patches)


@register_projector("attention")
class AttentionPoolProjector(nn.Module):
    """Every token through a shared MLP, then attention pooling with learned queries over all tokens.

    The MLP is shared across positions, so "a red circle" learnt at one place transfers to every other
    place (the position is in the token itself). The pool is a weighted sum of per-token values with no
    non-linearity after it, so a scene of several objects embeds as the sum of its objects, as a
    mean-pooled caption does, and the per-patch embeddings are the very terms of that sum.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int = 256,
        num_heads: int = 8,
        depth: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if width % num_heads:
            raise ConfigError(f"attention projector width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.token_in = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        # Trainable blocks over the token grid: shape and size span several patches, so a token must see
        # its neighbours before the pool; `depth: 0` keeps the tokens as the frozen encoder left them.
        block = nn.TransformerEncoderLayer(
            width, num_heads, 2 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False) if depth else nn.Identity()
        self.token_mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.keys = nn.Linear(width, num_heads)  # one attention logit per head and token
        self.out = nn.Linear(width, out_dim)

    def forward(self, features: VisionFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.cat([features.cls[:, None], features.registers, features.patches], dim=1)
        tokens = self.blocks(self.token_in(tokens))
        values = self.token_mlp(tokens)  # (B, T, width)
        weights = self.keys(tokens).softmax(dim=1)  # (B, T, heads), over tokens
        batch, count, width = values.shape
        heads = values.view(batch, count, self.num_heads, width // self.num_heads)
        pooled = torch.einsum("bth,bthd->bhd", weights, heads).reshape(batch, width)
        first_patch = 1 + features.registers.shape[1]
        return self.out(pooled), self.out(values[:, first_patch:])
