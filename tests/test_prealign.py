"""Pre-aligning an LLM-route projector to the text tower (training/prealign.py), and stage 0 around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.config import ConfigError, TextConfig, TrainConfig
from bridge.synthetic import SHAPES
from bridge.text import build_text_tower
from tests.test_vlm import tiny_vlm
from tests.test_vlm_training import stage2_config
from training.align import CaptionedFeatures
from training.cache import FeatureCache, TextCache
from training.data import synthetic_conversations, synthetic_object_phrases
from training.prealign import prealign_projector
from training.vlm import ConversationData, fit_vlm, frozen_state


def test_object_phrases_are_what_captions_say():
    for pair in synthetic_object_phrases(5, start=3):
        assert len(pair.captions) == len(pair.image.objects)
        caption = pair.image.captions(1)[0]
        assert all(phrase in caption for phrase in pair.captions)


def test_prealign_trains_the_projector_alone_and_fits_the_phrases(tmp_path):
    model = tiny_vlm()
    pairs = synthetic_object_phrases(16)
    features = FeatureCache(tmp_path, model.encoder).features(pairs, progress=False)
    tower = build_text_tower(TextConfig())
    data = CaptionedFeatures.build(features, TextCache(tmp_path, tower, progress=False), [list(SHAPES)])
    assert data.negatives is not None and data.negatives.shape[:2] == (len(data.captions), 1)
    frozen = frozen_state(model)
    projector = {k: v.clone() for k, v in model.projector.state_dict().items()}
    config = TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, weight_decay=0.0)
    losses = prealign_projector(model, data, config, progress=False)
    assert len(losses) == 60 and all(np.isfinite(losses))
    # 16 scenes are memorised: the loss (own phrase against the others and a shape-swapped one) falls.
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    after = frozen_state(model)
    assert all(np.array_equal(frozen[k], after[k]) for k in frozen)
    assert all(not torch.equal(v, model.projector.state_dict()[k]) for k, v in projector.items())
    assert not model.projector.training


def test_freeze_projector_trains_the_llm_around_it(tmp_path):
    model = tiny_vlm()
    data = ConversationData.prepare(model, synthetic_conversations(8), tmp_path / "cache", progress=False)
    projector = {k: v.clone() for k, v in model.projector.state_dict().items()}
    llm = {k: v.clone() for k, v in model.llm.state_dict().items()}
    config = stage2_config(3, freeze_projector=True)
    config.stage = 0
    fit_vlm(model, data, None, config, tmp_path / "run", progress=False)
    assert all(torch.equal(v, model.projector.state_dict()[k]) for k, v in projector.items())
    assert any(not torch.equal(v, model.llm.state_dict()[k]) for k, v in llm.items())


def test_freezing_the_projector_of_the_projector_stage_is_refused(tmp_path):
    model = tiny_vlm()
    data = ConversationData.prepare(model, synthetic_conversations(4), tmp_path / "cache", progress=False)
    config = stage2_config(1, freeze_projector=True)
    config.stage = 1
    with pytest.raises(ConfigError, match="freeze_projector leaves nothing to train"):
        fit_vlm(model, data, None, config, tmp_path / "run", progress=False)
