"""Projectors: the only trained part of a text bridge, from encoder tokens to the text tower's space.

Every projector takes `VisionFeatures` and returns a global embedding (B, E) and per-patch embeddings
(B, N, E), both in the text space (`with_patches=False` skips the per-patch ones, which retrieval
training never reads), so retrieval and dense grounding use the same module. Register a new
one with `@register_projector("name")`; its constructor's keyword arguments are its config options.
Projectors that can feed an LLM (the LLM route, bridge/vlm.py) also have `visual_tokens`.

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
    check_widths(config, in_dim, out_dim)
    cls = PROJECTORS[config.kind]
    parameters = inspect.signature(cls.__init__).parameters
    accepted = set(parameters) - {"self", "in_dim", "out_dim"}
    for key, value in config.options.items():
        if key not in accepted:
            takes = f"it accepts: {', '.join(sorted(accepted))}" if accepted else "it takes no options"
            raise ConfigError(f"unknown option '{key}' for projector '{config.kind}'; {takes}")
        # Sizes and counts (options annotated int) must be positive whole numbers: anything else would
        # fail later inside torch, or build a projector of zero width.
        sizes = "int" in str(parameters[key].annotation).split(" | ")
        if sizes and value is not None and (type(value) is not int or value < 1):
            raise ConfigError(
                f"projector '{config.kind}' option {key}={value!r} must be a whole number of at least 1"
            )
    return cls(in_dim, out_dim, **config.options)


def check_widths(config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
    """The widths the config records (None: any) against the encoder's and the tower's actual ones."""
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


@register_projector("linear")
class LinearProjector(nn.Module):
    """CLS token through one linear map: the LiT / open_clip lock-image baseline."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(
        self, features: VisionFeatures, with_patches: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.proj(features.cls), self.proj(features.patches) if with_patches else None


@register_projector("mlp")
class MLPProjector(nn.Module):
    """LLaVA's mlp2x_gelu, applied to the CLS token for the global embedding and to every patch."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(
        self, features: VisionFeatures, with_patches: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.mlp(features.cls), self.mlp(features.patches) if with_patches else None

    def visual_tokens(self, features: VisionFeatures, select_strategy: str = "default") -> torch.Tensor:
        """(B, T, E) LLM input tokens, one per encoder token: registers and patches, and the CLS token
        too for LLaVA's "full" strategy ("default" drops exactly the first token)."""
        tokens = [features.registers, features.patches]
        if select_strategy == "full":
            tokens.insert(0, features.cls[:, None])
        return self.mlp(torch.cat(tokens, dim=1))


@register_projector("patch-merge")
class PatchMergeProjector(nn.Module):
    """Each 2x2 block of patch tokens concatenated, then LLaVA's two-layer GELU MLP: 4x fewer visual
    tokens (64 instead of 256 at 224 px for a /14 ViT), as InternVL's pixel shuffle and Idefics3 do.
    Register and CLS tokens are left out: the merged grid is the whole picture.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, merge: int = 2):
        super().__init__()
        self.merge = merge
        hidden_dim = hidden_dim or out_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim * merge * merge, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def merged(self, features: VisionFeatures) -> torch.Tensor:
        (height, width), m = features.grid_hw, self.merge
        if height % m or width % m:
            raise ConfigError(
                f"a {m}x{m} patch merge needs a patch grid divisible by {m}, got {height}x{width}; "
                f"choose an image size of a multiple of {m} patches"
            )
        grid = features.patches.unflatten(1, (height // m, m, width // m, m))  # (B, h/m, m, w/m, m, D)
        return grid.permute(0, 1, 3, 2, 4, 5).flatten(3).flatten(1, 2)  # (B, hw/m^2, m*m*D)

    def forward(
        self, features: VisionFeatures, with_patches: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.mlp(self.merged(features))
        return tokens.mean(dim=1), tokens if with_patches else None

    def visual_tokens(self, features: VisionFeatures, select_strategy: str = "default") -> torch.Tensor:
        """(B, h*w/4, E) LLM input tokens; the strategy does not apply (no CLS or register tokens)."""
        return self.mlp(self.merged(features))


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
        width: int = 128,
        num_heads: int = 8,
        depth: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        if width % num_heads:
            raise ConfigError(
                f"attention projector width {width} is not divisible by num_heads {num_heads}; "
                "choose a num_heads that divides the width"
            )
        self.num_heads = num_heads
        self.token_in = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        # Shape and size span several patches, so each patch first sees its 3x3 neighbourhood on the
        # grid: a depthwise convolution is ~50x cheaper than a transformer block here and enough.
        self.neighbourhood = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width) for _ in range(depth)
        )
        self.token_mlp = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width, width),
        )
        # One attention logit per head and token. No bias: a softmax over tokens ignores a per-head
        # constant, so a bias would get only rounding noise as gradient, and Adam would turn it into drift.
        self.keys = nn.Linear(width, num_heads, bias=False)
        self.out = nn.Linear(width, out_dim)

    def forward(
        self, features: VisionFeatures, with_patches: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        first_patch = 1 + features.registers.shape[1]
        tokens = torch.cat([features.cls[:, None], features.registers, features.patches], dim=1)
        tokens = self.token_in(tokens)
        if len(self.neighbourhood):
            prefix, patches = tokens[:, :first_patch], tokens[:, first_patch:]
            grid = patches.transpose(1, 2).unflatten(2, features.grid_hw)  # (B, width, h, w)
            for conv in self.neighbourhood:
                grid = grid + conv(nn.functional.gelu(grid))
            tokens = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)
        values = self.token_mlp(tokens)  # (B, T, width)
        weights = self.keys(tokens).softmax(dim=1)  # (B, T, heads), over tokens
        batch, count, width = values.shape
        heads = values.view(batch, count, self.num_heads, width // self.num_heads)
        pooled = torch.einsum("bth,bthd->bhd", weights, heads).reshape(batch, width)
        return self.out(pooled), self.out(values[:, first_patch:]) if with_patches else None
