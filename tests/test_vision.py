"""Tests for bridge/vision.py: the frozen encoder, its features, its preprocessing and its fingerprint.

Every encoder here is a tiny DINOv2 / DINOv2-with-registers / DINOv3 built from a config and saved in
tmp_path in transformers' format, so the tests load checkpoints exactly as a user's hub or local path
does, with no hub. Features are compared with the plain transformers model on the same pixels.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from torch import nn

from bridge.config import ConfigError, EncoderConfig
from bridge.vision import ENCODER_CLASSES, FrozenEncoder, Preprocessing

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

# family -> (model class, config overrides). DINOv3 checkpoints carry 4 registers and 16-pixel patches.
FAMILIES = {
    "dinov2": (transformers.Dinov2Model, {"patch_size": 14, "image_size": 56}),
    "dinov2_with_registers": (
        transformers.Dinov2WithRegistersModel,
        {"patch_size": 14, "image_size": 56, "num_register_tokens": 4},
    ),
    "dinov3_vit": (
        transformers.DINOv3ViTModel,
        {"patch_size": 16, "image_size": 64, "num_register_tokens": 4},
    ),
}

TINY_DINOV2_ARCHITECTURE = {"model_type": "dinov2", **TINY, "patch_size": 14, "image_size": 56}

# What facebook/dinov2-* ship (BitImageProcessor: resize the shortest edge to 256, centre-crop 224), with
# a mean/std of our own so the test sees them read rather than defaulted.
DINOV2_PROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.25, 0.3],
    "resample": 3,
    "do_convert_rgb": True,
}
# What facebook/dinov3-* ship: a straight resize to 224x224, no crop.
DINOV3_PROCESSOR = {
    "image_processor_type": "DINOv3ViTImageProcessorFast",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "crop_size": None,
    "do_center_crop": None,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 2,
}


def save_tiny_encoder(
    directory: Path, family: str, processor: dict | None = None, seed: int = 0, **overrides
) -> tuple[nn.Module, Path]:
    """A tiny random model of `family` saved with save_pretrained and a preprocessor_config.json."""
    model_class, family_overrides = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(model_class.config_class(**TINY, **family_overrides, **overrides)).eval()
    model.save_pretrained(directory)
    size = model.config.image_size
    processor = processor or {
        **DINOV2_PROCESSOR,
        "size": {"shortest_edge": round(size * 256 / 224)},
        "crop_size": {"height": size, "width": size},
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return model, directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved_family(request, tmp_path_factory):
    """(family name, the plain transformers model, its saved directory), once per family."""
    model, directory = save_tiny_encoder(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, model, directory


def pixels_for(model: nn.Module, grid_h: int, grid_w: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    patch = model.config.patch_size
    return torch.randn(
        batch, 3, grid_h * patch, grid_w * patch, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("layer", [None, -1, 1])
def test_features_equal_the_plain_transformers_model(saved_family, layer):
    family, model, directory = saved_family
    encoder = FrozenEncoder.from_config(EncoderConfig(name=str(directory), layer=layer))
    assert type(encoder.model).__name__ == ENCODER_CLASSES[family]
    pixels = pixels_for(model, 4, 4)

    features = encoder(pixels)

    with torch.no_grad():
        outputs = model(pixel_values=pixels, output_hidden_states=True)
    # None is the last layer after the final norm; an int indexes hidden_states, before the final norm.
    tokens = outputs.last_hidden_state if layer is None else outputs.hidden_states[layer]
    registers = model.config.num_register_tokens if family != "dinov2" else 0
    torch.testing.assert_close(features.cls, tokens[:, 0])
    torch.testing.assert_close(features.registers, tokens[:, 1 : 1 + registers])
    torch.testing.assert_close(features.patches, tokens[:, 1 + registers :])
    assert features.cls.shape == (2, 32)
    assert features.registers.shape == (2, registers, 32)
    assert features.patches.shape == (2, 16, 32)
    assert features.grid_hw == (4, 4)
    assert features.layer == layer
    if layer == -1:  # really before the final norm, not the same tensor under another name
        assert not torch.allclose(tokens, outputs.last_hidden_state)


def test_any_multiple_of_the_patch_size_works(saved_family):
    family, model, directory = saved_family
    encoder = FrozenEncoder.from_config(EncoderConfig(name=str(directory)))
    pixels = pixels_for(model, 4, 6)  # 56x84 for patch 14, 64x96 for patch 16: not the training size

    features = encoder(pixels)

    assert features.grid_hw == (4, 6)
    assert features.patches.shape == (2, 24, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(features.patches, expected[:, -24:])


def test_a_pixel_size_off_the_patch_grid_is_refused():
    encoder = FrozenEncoder.from_config(EncoderConfig(architecture=dict(TINY_DINOV2_ARCHITECTURE)))
    with pytest.raises(ValueError, match=r"57x84 is not a multiple of the patch size 14"):
        encoder(torch.zeros(1, 3, 57, 84))


def test_an_image_size_off_the_patch_grid_fails_at_construction(tmp_path):
    with pytest.raises(ConfigError, match=r"image size 50 is not a multiple of the patch size 14; use 42"):
        FrozenEncoder.from_config(EncoderConfig(architecture=dict(TINY_DINOV2_ARCHITECTURE), image_size=50))
    _, directory = save_tiny_encoder(tmp_path, "dinov3_vit")
    with pytest.raises(ConfigError, match=r"image size 72 is not a multiple of the patch size 16"):
        FrozenEncoder.from_config(EncoderConfig(name=str(directory), image_size=72))


@pytest.mark.parametrize("layer", [3, -4])
def test_a_layer_out_of_range_names_the_range(layer):
    config = EncoderConfig(architecture=dict(TINY_DINOV2_ARCHITECTURE), layer=layer)
    with pytest.raises(ConfigError, match=rf"layer {layer} does not exist.*\[-3, 2\]"):
        FrozenEncoder.from_config(config)


@pytest.mark.parametrize("layer", [2, -3, 0])
def test_the_ends_of_the_layer_range_are_accepted(layer):
    encoder = FrozenEncoder.from_config(
        EncoderConfig(architecture=dict(TINY_DINOV2_ARCHITECTURE), layer=layer)
    )
    assert encoder(torch.zeros(1, 3, 28, 28)).patches.shape == (1, 4, 32)


def test_the_encoder_is_frozen_for_certain():
    # Heavy dropout and drop-path: any leak into training mode would make two forwards differ.
    architecture = {**TINY_DINOV2_ARCHITECTURE, "hidden_dropout_prob": 0.5, "drop_path_rate": 0.5}
    encoder = FrozenEncoder.from_config(EncoderConfig(architecture=architecture))
    parent = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(32, 4)})

    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    parent.train()
    assert parent.training and parent["head"].training
    assert not any(module.training for module in encoder.modules())

    pixels = torch.randn(2, 3, 56, 56, requires_grad=True)
    first, second = encoder(pixels), encoder(pixels)
    torch.testing.assert_close(first.patches, second.patches, rtol=0, atol=0)
    for tensor in (first.cls, first.registers, first.patches):
        assert not tensor.requires_grad and tensor.grad_fn is None


def test_dinov2_preprocessing_is_read_from_the_checkpoint(tmp_path):
    _, directory = save_tiny_encoder(tmp_path, "dinov2", processor=DINOV2_PROCESSOR)
    encoder = FrozenEncoder.from_config(EncoderConfig(name=str(directory)))
    assert encoder.preprocessing == Preprocessing(224, 256, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert encoder.grid_hw == (16, 16)


def test_dinov3_preprocessing_resizes_straight_to_the_square(tmp_path):
    _, directory = save_tiny_encoder(tmp_path, "dinov3_vit", processor=DINOV3_PROCESSOR)
    encoder = FrozenEncoder.from_config(EncoderConfig(name=str(directory)))
    assert encoder.preprocessing == Preprocessing(224, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert encoder.grid_hw == (14, 14)


def test_an_image_size_override_keeps_the_resize_to_crop_ratio(tmp_path):
    _, directory = save_tiny_encoder(tmp_path, "dinov2", processor=DINOV2_PROCESSOR)
    encoder = FrozenEncoder.from_config(EncoderConfig(name=str(directory), image_size=112))
    assert encoder.preprocessing == Preprocessing(112, 128, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert encoder.grid_hw == (8, 8)
    assert Preprocessing(224, None).with_image_size(448) == Preprocessing(448, None)


def test_preprocessing_normalises_a_known_colour_on_a_non_square_image():
    preprocessing = Preprocessing(28, 32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    pixels = preprocessing([Image.new("RGB", (40, 90), (200, 100, 50))])
    assert pixels.shape == (1, 3, 28, 28) and pixels.dtype == torch.float32
    expected = [(200 / 255 - 0.5) / 0.2, (100 / 255 - 0.4) / 0.25, (50 / 255 - 0.3) / 0.3]
    torch.testing.assert_close(pixels[0], torch.tensor(expected).view(3, 1, 1).expand(3, 28, 28))


def test_preprocessing_crops_the_centre_of_a_wide_image():
    # Red | green | blue thirds, 300x100: resized to 96x32 and centre-cropped to 28, only green is left.
    image = Image.new("RGB", (300, 100), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    pixels = Preprocessing(28, 32, mean=(0, 0, 0), std=(1, 1, 1))([image, image])
    assert pixels.shape == (2, 3, 28, 28)
    torch.testing.assert_close(pixels[:, 1], torch.ones(2, 28, 28))
    torch.testing.assert_close(pixels[:, [0, 2]], torch.zeros(2, 2, 28, 28))


def test_encode_pil_images_in_batches_equals_one_batch():
    encoder = FrozenEncoder.from_config(EncoderConfig(architecture=dict(TINY_DINOV2_ARCHITECTURE)))
    images = [Image.new("RGB", (60 + 10 * i, 50), (40 * i, 100, 200 - 30 * i)) for i in range(3)]

    batched = encoder.encode(images, batch_size=2)

    whole = encoder(encoder.preprocessing(images))
    assert batched.patches.shape == (3, 16, 32) and batched.grid_hw == (4, 4)
    torch.testing.assert_close(batched.patches, whole.patches, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.cls, whole.cls, atol=1e-5, rtol=1e-5)


def random_encoder(**changes) -> FrozenEncoder:
    return FrozenEncoder.from_config(EncoderConfig(architecture=dict(TINY_DINOV2_ARCHITECTURE), **changes))


def test_fingerprint_changes_with_weights_layer_and_image_size():
    reference = random_encoder(seed=0).fingerprint()
    assert random_encoder(seed=0).fingerprint() == reference
    others = [
        random_encoder(seed=1).fingerprint(),
        random_encoder(seed=0, layer=1).fingerprint(),
        random_encoder(seed=0, image_size=42).fingerprint(),
    ]
    assert reference not in others
    assert len(set(others)) == 3


def test_save_and_reload_gives_identical_features_and_fingerprint(tmp_path):
    encoder = random_encoder(seed=3, image_size=42)
    fingerprint = encoder.fingerprint()  # taken before saving, as a cache or an index would
    pixels = torch.randn(2, 3, 42, 42)
    features = encoder(pixels)

    encoder.save_pretrained(tmp_path / "encoder")
    reloaded = FrozenEncoder.from_config(EncoderConfig(name=str(tmp_path / "encoder")))

    assert reloaded.preprocessing == encoder.preprocessing
    again = reloaded(pixels)
    torch.testing.assert_close(again.cls, features.cls, rtol=0, atol=0)
    torch.testing.assert_close(again.patches, features.patches, rtol=0, atol=0)
    assert reloaded.fingerprint() == fingerprint


def test_saved_dinov2_crop_preprocessing_round_trips(tmp_path):
    _, directory = save_tiny_encoder(tmp_path / "source", "dinov2", processor=DINOV2_PROCESSOR)
    encoder = FrozenEncoder.from_config(EncoderConfig(name=str(directory), image_size=112))
    encoder.save_pretrained(tmp_path / "copy")
    reloaded = FrozenEncoder.from_config(EncoderConfig(name=str(tmp_path / "copy")))
    assert reloaded.preprocessing == Preprocessing(112, 128, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert reloaded.fingerprint() == encoder.fingerprint()


def test_an_unsupported_model_type_is_refused_with_the_supported_ones(tmp_path):
    config = transformers.ViTConfig(**TINY, patch_size=16, image_size=32)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    with pytest.raises(
        ConfigError, match=r"'vit' model; dinobridge encoders are dinov2, dinov2_with_registers"
    ):
        FrozenEncoder.from_config(EncoderConfig(name=str(tmp_path / "vit")))
    with pytest.raises(ConfigError, match=r"dinov3_vit"):
        FrozenEncoder.from_config(EncoderConfig(architecture={"model_type": "vit", **TINY}))


def test_a_checkpoint_is_loaded_without_unpickling(tmp_path):
    # A pickle weights file beside the safetensors one must never be read: unpickling it makes a directory.
    _, directory = save_tiny_encoder(tmp_path / "model", "dinov2")
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    FrozenEncoder.from_config(EncoderConfig(name=str(directory)))
    assert not marker.exists()
