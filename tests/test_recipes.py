"""Tests for configs/*.yaml: every recipe loads, and each runs end to end on tiny stand-ins.

A stand-in has the recipe's formats (the same transformers classes, tower kind, preprocessor style and
checkpoint file type) at a tiny size, saved in tmp_path. Only the recipe's model names are replaced;
everything else (layer, image size, projector options) comes from the YAML as written.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import open_clip
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from bridge.config import RunConfig, load_config
from bridge.model import TextBridge
from bridge.text import resolve_model_name

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

RECIPES = {
    "dinov2-b14-clip-b16.yaml": {
        "encoder": "facebook/dinov2-base",
        "text": ("hf-clip", "openai/clip-vit-base-patch16", None),
        "resize_shortest_edge": 256,  # then a centre crop to 224
    },
    "dinov2-l14-reg-siglip.yaml": {
        "encoder": "facebook/dinov2-with-registers-large",
        "text": ("hf-siglip", "google/siglip-base-patch16-224", None),
        "resize_shortest_edge": 256,
    },
    "dinov3-b16-openclip.yaml": {
        "encoder": "facebook/dinov3-vitb16-pretrain-lvd1689m",
        "text": ("open_clip", "ViT-B-16", "laion2b_s34b_b88k"),
        "resize_shortest_edge": None,  # a straight resize to 224x224
    },
}

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
DINOV2_PROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "size": {"shortest_edge": 256},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    **IMAGENET,
}
DINOV3_PROCESSOR = {
    "image_processor_type": "DINOv3ViTImageProcessorFast",
    "size": {"height": 224, "width": 224},
    **IMAGENET,
}
# recipe encoder -> (class, tiny config overrides mirroring the real one's layout, processor style)
ENCODER_STAND_INS = {
    "facebook/dinov2-base": (
        transformers.Dinov2Model,
        {"patch_size": 14, "image_size": 518},
        DINOV2_PROCESSOR,
    ),
    "facebook/dinov2-with-registers-large": (
        transformers.Dinov2WithRegistersModel,
        {"patch_size": 14, "image_size": 518, "num_register_tokens": 4},
        DINOV2_PROCESSOR,
    ),
    "facebook/dinov3-vitb16-pretrain-lvd1689m": (
        transformers.DINOv3ViTModel,
        {"patch_size": 16, "image_size": 224, "num_register_tokens": 4},
        DINOV3_PROCESSOR,
    ),
}
OPEN_CLIP_NAME = "dinobridge-test-recipe-clip"
OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_encoder_stand_in(directory: Path, recipe_name: str) -> None:
    model_class, overrides, processor = ENCODER_STAND_INS[recipe_name]
    model_class(model_class.config_class(**TINY, **overrides)).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))


def save_hf_text_stand_in(directory: Path, kind: str) -> None:
    """A tiny CLIP or SigLIP text model with MiniLM's tokenizer saved beside it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        resolve_model_name("sentence-transformers/all-MiniLM-L6-v2")
    )
    sizes = {**TINY, "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 16}
    if kind == "hf-clip":
        ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "bos_token_id": None,
        }
        model = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**sizes, **ids, projection_dim=24)
        )
    else:
        model = transformers.SiglipTextModel(transformers.SiglipTextConfig(**sizes))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_open_clip_stand_in(directory: Path) -> Path:
    """Register the tiny open_clip model under OPEN_CLIP_NAME; its weights as a safetensors file."""
    directory.mkdir()
    (directory / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(directory)
    model = open_clip.create_model(OPEN_CLIP_NAME)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "tiny.safetensors")
    return directory / "tiny.safetensors"


def recipe_on_stand_ins(recipe: str, root: Path) -> RunConfig:
    """The recipe with its model names pointed at stand-ins saved under `root` (the working directory).

    Encoder and transformers text tower are named by relative paths, as a user in that directory would.
    """
    config = load_config(CONFIGS / recipe)
    # Named "encoder" on purpose: a bridge's own encoder/ folder must not be mistaken for it.
    save_encoder_stand_in(root / "encoder", config.bridge.encoder.name)
    config.bridge.encoder.name = "encoder"
    if config.bridge.text.kind == "open_clip":
        save_open_clip_stand_in(root / "open_clip")
        config.bridge.text.pretrained = "open_clip/tiny.safetensors"
        config.bridge.text.name = OPEN_CLIP_NAME
    else:
        save_hf_text_stand_in(root / "text", config.bridge.text.kind)
        config.bridge.text.name = "text"
    return config


def test_every_yaml_in_configs_loads_with_the_declared_types():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= set(RECIPES)
    for path in files:
        assert path.read_text().startswith("#"), f"{path.name} has no comment header"
        config = load_config(path)
        _assert_field_types(config, path.name)


def _assert_field_types(config, where: str) -> None:
    """Every value has its field's type, so "1e-3" (a string to YAML) cannot pass for a float."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            _assert_field_types(value, where)
            continue
        hint = hints[field.name]
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        allowed = tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,)))
        allowed += (int,) if float in allowed else ()  # YAML's 500 is a fine float
        assert isinstance(value, allowed), f"{where}: {field.name}={value!r} is not {hints[field.name]}"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_names_the_real_checkpoints(recipe):
    config = load_config(CONFIGS / recipe)
    expected = RECIPES[recipe]
    assert config.bridge.encoder.name == expected["encoder"]
    text = config.bridge.text
    assert (text.kind, text.name, text.pretrained) == expected["text"]
    assert config.bridge.projector.kind == "attention"
    # Widths are taken from the models, so the recipe fits its checkpoints and any stand-in alike.
    assert config.bridge.projector.in_dim is None and config.bridge.projector.out_dim is None


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_runs_end_to_end_and_round_trips(recipe, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    torch.manual_seed(0)
    config = recipe_on_stand_ins(recipe, work)
    as_written = load_config(CONFIGS / recipe)

    bridge = TextBridge.from_config(config.bridge)
    with torch.no_grad():  # stands in for training, so a reload that re-initialised would show
        for parameter in bridge.projector.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        bridge.logit_scale.fill_(3.0)
    images = [Image.new("RGB", (320, 240), (200, 30, 30)), Image.new("RGB", (180, 260), (20, 90, 220))]
    texts = ["a red picture", "a blue picture"]

    image_embeddings = bridge.encode_image(images)
    text_embeddings = bridge.encode_text(texts)
    patch_embeddings = bridge.encode_image_patches(images)

    width = bridge.tower.embed_dim
    grid = 224 // bridge.encoder.patch_size
    assert bridge.encoder.preprocessing.image_size == as_written.bridge.encoder.image_size == 224
    assert bridge.encoder.preprocessing.resize_shortest_edge == RECIPES[recipe]["resize_shortest_edge"]
    assert image_embeddings.shape == (2, width) and text_embeddings.shape == (2, width)
    assert patch_embeddings.shape == (2, grid * grid, width)
    for embeddings in (image_embeddings, text_embeddings, patch_embeddings):
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(embeddings.shape[:-1]))
    assert not torch.allclose(image_embeddings[0], image_embeddings[1])

    bridge.save_pretrained("saved")
    saved = json.loads((work / "saved" / "config.json").read_text())["bridge"]
    assert saved["encoder"]["name"] == str(work.resolve() / "encoder")
    if config.bridge.text.kind == "open_clip":
        assert saved["text"]["name"] == OPEN_CLIP_NAME
        assert saved["text"]["pretrained"] == str(work.resolve() / "open_clip" / "tiny.safetensors")
    else:
        assert saved["text"]["name"] == str(work.resolve() / "text")
    # Apart from the names (and the widths now known), the saved bridge is the recipe as written.
    assert saved["encoder"]["layer"] == as_written.bridge.encoder.layer
    assert saved["encoder"]["image_size"] == as_written.bridge.encoder.image_size
    assert saved["text"]["max_length"] == as_written.bridge.text.max_length
    assert saved["projector"]["kind"] == as_written.bridge.projector.kind
    assert saved["projector"]["options"] == as_written.bridge.projector.options
    assert (saved["projector"]["in_dim"], saved["projector"]["out_dim"]) == (32, width)

    monkeypatch.chdir(elsewhere)  # the relative names given above no longer resolve from here
    reloaded = TextBridge.from_pretrained(work / "saved")

    torch.testing.assert_close(reloaded.encode_image(images), image_embeddings, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.encode_text(texts), text_embeddings, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.encode_image_patches(images), patch_embeddings, rtol=0, atol=0)
    assert reloaded.logit_scale.item() == 3.0
    assert reloaded.encoder.fingerprint() == bridge.encoder.fingerprint()


def test_a_relative_open_clip_checkpoint_path_survives_a_change_of_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = recipe_on_stand_ins("dinov3-b16-openclip.yaml", tmp_path)
    config.bridge.text.pretrained = "open_clip/tiny.safetensors"
    bridge = TextBridge.from_config(config.bridge)
    bridge.save_pretrained("saved")
    monkeypatch.chdir(tmp_path / "open_clip")  # where "open_clip/tiny.safetensors" names nothing
    texts = ["a red picture", "a blue picture"]
    reloaded = TextBridge.from_pretrained(tmp_path / "saved")  # its weights, not a fresh random tower
    assert torch.equal(reloaded.encode_text(texts), bridge.encode_text(texts))


def test_the_bridge_fingerprint_survives_save_and_reload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = recipe_on_stand_ins("dinov2-b14-clip-b16.yaml", tmp_path)
    bridge = TextBridge.from_config(config.bridge)
    bridge.save_pretrained("saved")
    assert TextBridge.from_pretrained(tmp_path / "saved").fingerprint() == bridge.fingerprint()
