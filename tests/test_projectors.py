"""The projector registry: what each projector returns, and the errors a wrong projector config gets.

A config names a registered kind, may record the widths it was trained for, and passes options to the
constructor; each mistake fails with the kind, the value and the fix named, before any weight exists.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bridge.config import ConfigError, ProjectorConfig
from bridge.projectors import PROJECTORS, build_projector, register_projector
from bridge.vision import VisionFeatures


def features(batch: int = 2, width: int = 32, grid: tuple[int, int] = (4, 4), registers: int = 0):
    """Random encoder tokens: a CLS token, `registers` register tokens and a grid of patches."""
    generator = torch.Generator().manual_seed(0)
    return VisionFeatures(
        cls=torch.randn(batch, width, generator=generator),
        registers=torch.randn(batch, registers, width, generator=generator),
        patches=torch.randn(batch, grid[0] * grid[1], width, generator=generator),
        grid_hw=grid,
        layer=None,
    )


# kind -> patch embeddings per image for a 4x4 grid (patch-merge joins each 2x2 block into one)
PATCH_TOKENS = {"linear": 16, "mlp": 16, "attention": 16, "patch-merge": 4}


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_every_projector_maps_encoder_tokens_to_a_global_and_per_patch_embeddings(kind):
    options = {"width": 16, "num_heads": 2} if kind == "attention" else {}
    projector = build_projector(ProjectorConfig(kind=kind, options=options), in_dim=32, out_dim=24)
    embedding, patches = projector(features(registers=4))
    assert embedding.shape == (2, 24) and patches.shape == (2, PATCH_TOKENS[kind], 24)
    alone, none = projector(features(registers=4), with_patches=False)
    assert none is None and torch.equal(alone, embedding)


def test_an_unknown_kind_names_it_and_lists_the_registered_ones():
    with pytest.raises(
        ConfigError, match=r"^unknown projector 'atention'; registered: attention, linear, mlp, patch-merge$"
    ):
        build_projector(ProjectorConfig(kind="atention"), in_dim=32, out_dim=384)


@pytest.mark.parametrize(
    "recorded, message",
    [
        (
            {"in_dim": 768},
            r"^projector expects 768-d patches but the encoder gives 384-d ones; "
            r"set projector\.in_dim to 384 \(or null\) and train it for this encoder$",
        ),
        (
            {"in_dim": 384, "out_dim": 768},
            r"^projector outputs 768-d embeddings but the text tower's are 512-d; "
            r"set projector\.out_dim to 512 \(or null\)$",
        ),
    ],
    ids=["encoder", "text tower"],
)
def test_a_projector_trained_for_other_widths_names_both_widths_and_the_fix(recorded, message):
    with pytest.raises(ConfigError, match=message):
        build_projector(ProjectorConfig(kind="mlp", **recorded), in_dim=384, out_dim=512)


def test_recorded_widths_that_match_build_the_projector():
    config = ProjectorConfig(kind="linear", in_dim=384, out_dim=512)
    projector = build_projector(config, in_dim=384, out_dim=512)
    assert projector(features(width=384))[0].shape == (2, 512)


@pytest.mark.parametrize(
    "kind, option, accepted",
    [
        ("attention", "widht", "depth, dropout, num_heads, width"),
        ("mlp", "width", "hidden_dim"),
        ("patch-merge", "merge_size", "hidden_dim, merge"),
    ],
)
def test_an_unknown_option_names_it_the_kind_and_the_options_the_kind_accepts(kind, option, accepted):
    config = ProjectorConfig(kind=kind, options={option: 64})
    with pytest.raises(
        ConfigError, match=f"^unknown option '{option}' for projector '{kind}'; it accepts: {accepted}$"
    ):
        build_projector(config, in_dim=32, out_dim=48)


def test_attention_heads_must_divide_the_width():
    config = ProjectorConfig(kind="attention", options={"width": 30, "num_heads": 4})
    with pytest.raises(
        ConfigError,
        match="^attention projector width 30 is not divisible by num_heads 4; choose a num_heads that divides",
    ):
        build_projector(config, in_dim=32, out_dim=48)


@pytest.mark.parametrize(
    "kind, option, value",
    [("attention", "num_heads", 0), ("attention", "width", "wide"), ("attention", "depth", -1)]
    + [("patch-merge", "merge", 0), ("mlp", "hidden_dim", 2.5), ("attention", "width", True)],
)
def test_a_size_option_that_is_not_a_positive_whole_number_is_refused_by_name(kind, option, value):
    config = ProjectorConfig(kind=kind, options={option: value})
    expected = f"^projector '{kind}' option {option}={value!r} must be a whole number of at least 1$"
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        build_projector(config, in_dim=32, out_dim=48)


def test_an_option_for_a_projector_without_options_says_it_takes_none():
    with pytest.raises(
        ConfigError, match="^unknown option 'width' for projector 'linear'; it takes no options$"
    ):
        build_projector(ProjectorConfig(kind="linear", options={"width": 8}), in_dim=32, out_dim=48)


def test_a_patch_merge_over_a_grid_it_does_not_divide_names_the_grid_and_the_fix():
    projector = build_projector(ProjectorConfig(kind="patch-merge"), in_dim=32, out_dim=48)
    with pytest.raises(
        ConfigError,
        match=r"^a 2x2 patch merge needs a patch grid divisible by 2, got 3x4; "
        r"choose an image size of a multiple of 2 patches$",
    ):
        projector.visual_tokens(features(grid=(3, 4)))
    assert projector.visual_tokens(features(grid=(2, 4))).shape == (2, 2, 48)


def test_a_registered_projector_is_built_by_name_with_its_options_and_listed_in_errors(monkeypatch):
    monkeypatch.setattr("bridge.projectors.PROJECTORS", dict(PROJECTORS))

    @register_projector("scaled-cls")
    class ScaledCLS(nn.Module):
        def __init__(self, in_dim: int, out_dim: int, scale: float = 1.0):
            super().__init__()
            self.proj, self.scale = nn.Linear(in_dim, out_dim), scale

        def forward(self, features, with_patches=True):
            return self.scale * self.proj(features.cls), None

    projector = build_projector(ProjectorConfig(kind="scaled-cls", options={"scale": 3.0}), 32, 8)
    assert isinstance(projector, ScaledCLS) and projector.scale == 3.0
    with pytest.raises(ConfigError, match="it accepts: scale$"):
        build_projector(ProjectorConfig(kind="scaled-cls", options={"gain": 3.0}), 32, 8)
    with pytest.raises(ConfigError, match="registered: attention, linear, mlp, patch-merge, scaled-cls$"):
        build_projector(ProjectorConfig(kind="cls"), 32, 8)
    assert "scaled-cls" not in PROJECTORS  # a test's projector stays in the test
