"""Hard negative captions (training/negatives.py) and how the retrieval losses and training use them (the
dense loss: tests/test_grounding.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import infonce_loss, sigmoid_loss
from training.negatives import check_word_groups, hard_negatives, swap_words

SHAPES = ["circle", "square", "star"]


def test_a_swap_replaces_every_word_of_the_group_and_nothing_else():
    rng = np.random.default_rng(0)
    caption = "A small red Circle on the left and a large blue circle near a semicircle"
    for _ in range(20):
        swapped = swap_words(caption, SHAPES, rng)
        words, original = swapped.split(), caption.split()
        changed = [i for i, (a, b) in enumerate(zip(words, original, strict=True)) if a != b]
        assert changed == [3, 11]  # both circles, whatever their case; "semicircle" is another word
        assert words[3] in ("square", "star") and words[11] in ("square", "star")
    assert swap_words("a red triangle", SHAPES, rng) is None


def test_negatives_come_one_per_group_and_repeat_with_the_seed():
    captions = ["a red circle", "a blue square", "three dogs"]
    groups = [SHAPES, ["red", "blue"]]
    negatives = hard_negatives(captions, groups, seed=3)
    assert [len(row) for row in negatives] == [2, 2, 2]
    assert negatives[0][0] in ("a red square", "a red star") and negatives[0][1] == "a blue circle"
    assert negatives[2] == [None, None]
    assert hard_negatives(captions, groups, seed=3) == negatives


@pytest.mark.parametrize("group", [["circle"], ["circle", "circle"], ["circle", " "]])
def test_a_group_with_nothing_to_swap_is_refused(group):
    with pytest.raises(ValueError, match="needs at least two different, non-empty words"):
        check_word_groups([group])


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_the_retrieval_losses_count_a_hard_negative_only_where_there_is_one(loss):
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(8, 32), dim=-1)
    images = F.normalize(texts + 0.1 * torch.randn(8, 32), dim=-1)
    scale, bias = torch.tensor(2.3), torch.tensor(-5.0)

    def compute(negatives=None):
        if loss == "infonce":
            return infonce_loss(images, texts, scale, negatives)
        return sigmoid_loss(images, texts, scale, bias, negatives)

    without = compute()
    assert torch.allclose(compute(torch.zeros(8, 2, 32)), without)
    close = F.normalize(texts + 0.02 * torch.randn(8, 32), dim=-1)[:, None]
    assert compute(close) > without + 0.1


def test_training_encodes_the_negatives_of_every_caption(tmp_path):
    from conftest import tiny_bridge_config

    from bridge.config import RunConfig, TrainConfig
    from bridge.model import TextBridge
    from training.align import AlignmentData, fit

    train = TrainConfig(
        steps=3, batch_size=8, held_out=4, eval_every=0, checkpoint_every=0, warmup_steps=1, dense_weight=1.0
    )
    train.hard_negative_words = [["circle", "square", "triangle", "star"], ["dog", "cat"]]
    config = RunConfig(tiny_bridge_config(width=32, num_heads=2), train)
    bridge = TextBridge.from_config(config.bridge)
    data = AlignmentData.prepare(bridge, "synthetic:12", train, tmp_path / "cache", progress=False)
    negatives = data.train.negatives
    assert negatives.shape == (len(data.train.captions), 2, bridge.tower.embed_dim)
    # Every synthetic caption names a shape and no animal: shape negatives all present, animal ones absent.
    assert (negatives[:, 0].norm(dim=-1) - 1).abs().max() < 1e-5 and (negatives[:, 1] == 0).all()
    assert (negatives[:, 0] * data.train.captions).sum(-1).max() < 1 - 1e-4  # not the caption itself
    result = fit(bridge, data, train, tmp_path / "run", progress=False)
    assert all(np.isfinite(result.losses))


def test_several_negatives_per_group_differ_and_one_is_the_default_draw():
    captions = ["a red circle", "a big red circle and a blue circle", "a red thing"]
    groups = [["circle", "square", "triangle", "star"]]
    three = hard_negatives(captions, groups, seed=1, per_group=3)
    assert sorted(three[0]) == ["a red square", "a red star", "a red triangle"]
    assert len(set(three[1])) == 3 and "a big red circle and a blue circle" not in three[1]
    assert three[2] == [None, None, None]
    # per_group=1 draws exactly as before, so the text route's captions and caches do not move
    assert hard_negatives(captions, groups, seed=1) == [
        [swap] for swap in _one_draw_each(captions, groups, 1)
    ]


def _one_draw_each(captions, groups, seed):
    rng = np.random.default_rng(seed)
    return [swap_words(caption, groups[0], rng) for caption in captions]
