"""Zero-shot classification (bridge/zeroshot.py) and the `dinobridge eval zeroshot` command built on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bridge.cli import main
from bridge.model import TextBridge
from bridge.synthetic import SyntheticWorld
from bridge.zeroshot import PROMPT_TEMPLATES, encode_class_names, zero_shot_classify
from training.cache import FeatureCache
from training.data import Pair, load_image_folder


@pytest.fixture
def colour_folder(tmp_path):
    """root/<colour>/<n>.png: scenes of one object, filed by its colour."""
    for index, scene in enumerate(SyntheticWorld(seed=5, max_objects=1, image_size=56).scenes(0, 12)):
        folder = tmp_path / "colours" / scene.objects[0].colour
        folder.mkdir(parents=True, exist_ok=True)
        scene.render().save(folder / f"{index}.png")
    return tmp_path / "colours"


def test_probabilities_are_a_softmax_of_scaled_cosines_and_match_the_cli(
    tmp_path, colour_folder, tiny_bridge, capsys, monkeypatch
):
    monkeypatch.setenv("DINOBRIDGE_CACHE", str(tmp_path / "eval-cache"))
    paths, labels, class_names = load_image_folder(colour_folder)

    probabilities = zero_shot_classify(tiny_bridge, paths, class_names)

    assert probabilities.shape == (12, len(class_names)) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    cosines = tiny_bridge.encode_images(paths) @ encode_class_names(tiny_bridge, class_names).numpy().T
    scale = tiny_bridge.logit_scale.exp().item()
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(scale * cosines), 1), atol=1e-5)

    tiny_bridge.save_pretrained(tmp_path / "bridge")
    argv = ["eval", "zeroshot", "--model", str(tmp_path / "bridge"), "--data", str(colour_folder), "--json"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    # The command classifies the features it cached (float16): from them, the same top-1.
    pairs = [Pair(path, [class_names[label]], path) for path, label in zip(paths, labels, strict=True)]
    bridge = TextBridge.from_pretrained(tmp_path / "bridge")
    cached = FeatureCache(tmp_path / "eval-cache", bridge.encoder).features(pairs, progress=False)
    from_cache = zero_shot_classify(bridge, cached[list(range(len(cached)))], class_names)
    assert metrics["top1"] == pytest.approx(np.mean(from_cache.argmax(1) == np.asarray(labels)))
    np.testing.assert_allclose(from_cache, probabilities, atol=2e-3)  # float16 features, same answer


def test_class_names_are_checked_before_any_image_is_read(tiny_bridge):
    with pytest.raises(ValueError, match=r"class name 2 of 2 is empty"):
        zero_shot_classify(tiny_bridge, ["no/such/file.png"], ["cat", " "])
    with pytest.raises(ValueError, match="no prompt templates given"):
        zero_shot_classify(tiny_bridge, ["no/such/file.png"], ["cat"], templates=())
    assert PROMPT_TEMPLATES[0].format("cat") == "a photo of a cat."
