"""TextBridge (bridge/model.py): batched inference, the config it is given, its fingerprint, its encoder
built on first use."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bridge.config import ConfigError, EncoderConfig
from bridge.images import ImageLoadError
from bridge.model import TextBridge
from bridge.synthetic import SyntheticWorld
from bridge.vision import FrozenEncoder
from tests.conftest import TINY_DINOV2, tiny_bridge_config

TEXTS = ["a red circle", "a small blue square on the left", "a green star"]


@pytest.fixture(scope="module")
def scenes():
    return [scene.render() for scene in SyntheticWorld(seed=3, image_size=56).scenes(0, 5)]


@pytest.fixture
def saved_bridge(tmp_path: Path, tiny_bridge) -> Path:
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    return tmp_path / "bridge"


def test_encode_images_takes_paths_and_pil_images_mixed_and_gives_what_encode_image_gives(
    tmp_path, tiny_bridge, scenes
):
    paths = []
    for number, scene in enumerate(scenes):
        scene.save(tmp_path / f"{number}.png")  # PNG: the file holds the very pixels
        paths.append(tmp_path / f"{number}.png")
    mixed = [str(paths[0]), paths[1], scenes[2], scenes[3], str(paths[4])]

    embeddings = tiny_bridge.encode_images(mixed)

    expected = tiny_bridge.encode_image(scenes)
    assert expected.requires_grad  # the training-side call keeps the graph
    assert isinstance(embeddings, np.ndarray) and embeddings.dtype == np.float32
    assert embeddings.shape == (5, tiny_bridge.tower.embed_dim)
    np.testing.assert_allclose(embeddings, expected.detach().numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-6)
    one_at_a_time = tiny_bridge.encode_images(mixed, batch_size=1)
    np.testing.assert_allclose(
        one_at_a_time, tiny_bridge.encode_images(mixed, batch_size=32), atol=1e-5, rtol=0
    )
    as_tensor = tiny_bridge.encode_images(mixed, convert_to_numpy=False, normalize=False)
    assert not as_tensor.requires_grad and as_tensor.device.type == "cpu"
    torch.testing.assert_close(
        as_tensor, tiny_bridge.encode_image(scenes, normalize=False).detach(), atol=1e-6, rtol=0
    )
    assert tiny_bridge.encode_images([]).shape == (0, tiny_bridge.tower.embed_dim)


def test_encode_images_runs_the_projector_in_eval_mode_and_gives_it_back_as_it_was(tiny_bridge, scenes):
    training = tiny_bridge.projector.training
    seen = []
    hook = tiny_bridge.projector.register_forward_hook(lambda module, *_: seen.append(module.training))
    try:
        tiny_bridge.projector.train()
        tiny_bridge.encode_images(scenes[:2])
        assert seen == [False] and tiny_bridge.projector.training
    finally:
        hook.remove()
        tiny_bridge.projector.train(training)


def test_a_file_encode_images_cannot_read_is_named_in_the_loaders_error(tmp_path, tiny_bridge, scenes):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match=r"broken\.jpg") as error:
        tiny_bridge.encode_images([scenes[0], tmp_path / "broken.jpg"])
    assert error.value.path == str(tmp_path / "broken.jpg")
    with pytest.raises(ImageLoadError, match=r"missing\.png"):
        tiny_bridge.encode_images([str(tmp_path / "missing.png")])


def test_encode_texts_is_encode_text_as_numpy_in_batches(tiny_bridge):
    texts = tiny_bridge.encode_texts(TEXTS)
    assert texts.dtype == np.float32 and texts.shape == (3, tiny_bridge.tower.embed_dim)
    np.testing.assert_allclose(texts, tiny_bridge.encode_text(TEXTS).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(tiny_bridge.encode_texts(TEXTS, batch_size=1), texts, atol=1e-5, rtol=0)
    assert tiny_bridge.encode_texts("a red circle").shape == (1, tiny_bridge.tower.embed_dim)
    raw = tiny_bridge.encode_texts(TEXTS, convert_to_numpy=False, normalize=False)
    torch.testing.assert_close(raw, tiny_bridge.encode_text(TEXTS, normalize=False))


def test_from_config_leaves_the_callers_config_as_it_was():
    config = tiny_bridge_config(width=32, num_heads=2)
    before = copy.deepcopy(config)
    bridge = TextBridge.from_config(config)
    assert config == before and config.projector.in_dim is None and config.projector.out_dim is None
    assert (bridge.config.projector.in_dim, bridge.config.projector.out_dim) == (32, 384)


def test_a_loaded_bridge_answers_text_without_building_its_encoder_and_builds_it_for_images(
    saved_bridge, tiny_bridge, scenes
):
    loaded = TextBridge.from_pretrained(saved_bridge)
    assert "encoder" not in loaded._modules
    torch.testing.assert_close(loaded.encode_text(TEXTS), tiny_bridge.encode_text(TEXTS))
    assert loaded.fingerprint() == tiny_bridge.fingerprint()  # the saved value: nothing hashed or built
    assert "encoder" not in loaded._modules

    loaded.double()  # the encoder, built later, goes where `.to()` would have taken it
    assert loaded.encoder.dtype == torch.float64
    loaded.float()
    np.testing.assert_array_equal(loaded.encode_images(scenes), tiny_bridge.encode_images(scenes))


def test_a_loaded_bridge_whose_encoder_changed_width_says_so_when_it_builds_it(saved_bridge, tmp_path):
    other = FrozenEncoder.from_config(EncoderConfig(architecture={**TINY_DINOV2, "hidden_size": 48}))
    shutil.rmtree(saved_bridge / "encoder")
    other.save_pretrained(saved_bridge / "encoder")
    loaded = TextBridge.from_pretrained(saved_bridge)
    loaded.encode_text(TEXTS)  # the text side does not need the encoder
    with pytest.raises(ConfigError, match="projector expects 32-d patches but the encoder gives 48-d ones"):
        loaded.encode_images([SyntheticWorld(seed=0, image_size=56).scene(0).render()])


def test_the_fingerprint_is_saved_with_the_bridge_and_follows_its_projector(
    saved_bridge, tiny_bridge, scenes
):
    saved = json.loads((saved_bridge / "config.json").read_text())
    assert saved["fingerprint"] == tiny_bridge.fingerprint()
    loaded = TextBridge.from_pretrained(saved_bridge)
    assert loaded.fingerprint() == saved["fingerprint"]

    # A training step changes the fingerprint, whatever the optimiser (fused AdamW updates the weights
    # without bumping their version counters); loading the saved weights brings it back.
    optimizer = torch.optim.AdamW(loaded.projector.parameters(), lr=1e-2, fused=True)
    loaded.encode_image(scenes).sum().backward()
    optimizer.step()
    assert loaded.fingerprint() != saved["fingerprint"]
    loaded.load_weights(saved_bridge / "model.safetensors")
    assert loaded.fingerprint() == saved["fingerprint"]


def test_a_saved_fingerprint_is_trusted_only_for_the_weights_it_was_saved_with(saved_bridge, tiny_bridge):
    config_file = saved_bridge / "config.json"
    saved = json.loads(config_file.read_text())
    # Trusted as is: a hand-edited value shows that loading hashes nothing.
    config_file.write_text(json.dumps({**saved, "fingerprint": "0123456789abcdef"}))
    assert TextBridge.from_pretrained(saved_bridge).fingerprint() == "0123456789abcdef"

    # Another run's weights copied in: the saved value does not describe them, so it is computed.
    other = copy.deepcopy(tiny_bridge)
    with torch.no_grad():
        next(other.projector.parameters()).add_(1.0)
    other.save_pretrained(saved_bridge.parent / "other")
    shutil.copy(saved_bridge.parent / "other" / "model.safetensors", saved_bridge / "model.safetensors")
    assert TextBridge.from_pretrained(saved_bridge).fingerprint() == other.fingerprint()

    # A bridge saved before fingerprints were kept computes its own: the same value.
    shutil.copy(saved_bridge.parent / "other" / "model.safetensors", saved_bridge / "model.safetensors")
    config_file.write_text(json.dumps({"bridge": saved["bridge"]}))
    assert TextBridge.from_pretrained(saved_bridge).fingerprint() == other.fingerprint()
