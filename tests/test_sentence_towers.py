"""Sentence-transformers towers embed as `SentenceTransformer.encode` does: pooling, Dense, Normalize and
max length as the model's modules.json says, in torch and in the NumPy twin.

Each model is a tiny random BERT (MiniLM's tokenizer) wrapped and saved by sentence-transformers itself,
so the files are exactly the ones it writes and reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_text import CAPTIONS, minilm_folder

from bridge.config import ConfigError, TextConfig
from bridge.numpy_text import numpy_tower
from bridge.text import HFEncoderTower, SentenceTransformerTower, build_text_tower

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.base.modules import Dense, Normalize, Transformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

TEXTS = [*CAPTIONS, "a much longer caption " * 12, "", "Ünïcödé café"]
MAX_SEQ_LENGTH = 24  # below BERT's positions, so truncation is the model's own


def save_sentence_model(folder: Path, pooling: str, dense: bool, normalize: bool) -> st.SentenceTransformer:
    torch.manual_seed(0)
    bert = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    transformers.BertModel(bert).save_pretrained(folder / "bert")
    transformers.AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder / "bert")
    modules = [
        Transformer(str(folder / "bert"), max_seq_length=MAX_SEQ_LENGTH),
        Pooling(32, pooling_mode=pooling),
    ]
    if dense:
        modules.append(Dense(32, 16))  # Tanh, as sentence-transformers' default
    if normalize:
        modules.append(Normalize())
    model = st.SentenceTransformer(modules=modules, device="cpu")
    model.save(str(folder / "model"))
    return model


@pytest.mark.parametrize(
    "pooling, dense, normalize",
    [("cls", True, True), ("mean", False, False), ("max", True, False), ("weightedmean", False, True)],
)
def test_tower_embeds_as_sentence_transformers_encode(tmp_path: Path, pooling, dense, normalize) -> None:
    model = save_sentence_model(tmp_path, pooling, dense, normalize)
    expected = model.encode(TEXTS, convert_to_numpy=True)
    for kind in ("sentence-transformers", "hf-encoder"):  # an hf-encoder with modules.json follows them
        tower = build_text_tower(TextConfig(kind=kind, name=str(tmp_path / "model")))
        assert isinstance(tower, SentenceTransformerTower)
        assert tower.embed_dim == (16 if dense else 32) and tower.context_length == MAX_SEQ_LENGTH
        np.testing.assert_allclose(tower.encode(TEXTS, batch_size=3).numpy(), expected, atol=1e-5)
    twin = numpy_tower(TextConfig(kind="sentence-transformers", name=str(tmp_path / "model")))
    assert twin is not None
    np.testing.assert_allclose(twin.encode(TEXTS), expected, atol=1e-5)


def test_the_stack_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    """Same weights, another pooling: other embeddings, so another fingerprint (caches and indexes)."""
    from bridge.fingerprint import fingerprint

    save_sentence_model(tmp_path, "cls", dense=False, normalize=False)
    cls_tower = build_text_tower(TextConfig(kind="sentence-transformers", name=str(tmp_path / "model")))
    pooling = tmp_path / "model" / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode": "mean"}))
    mean_tower = build_text_tower(TextConfig(kind="sentence-transformers", name=str(tmp_path / "model")))
    assert fingerprint(cls_tower) != fingerprint(mean_tower)


def test_offline_default_follows_minilm_modules() -> None:
    """all-MiniLM-L6-v2 is mean pooling + Normalize at 256 tokens: the default tower now says so, and its
    embeddings are the hand-pooled ones normalised (what every caller did with them already)."""
    tower = build_text_tower(TextConfig())
    assert isinstance(tower, SentenceTransformerTower)
    assert tower.stack.pooling == ("mean",) and tower.stack.normalize and tower.context_length == 256
    hand_pooled = HFEncoderTower(TextConfig()).encode(CAPTIONS)
    np.testing.assert_allclose(
        tower.encode(CAPTIONS).numpy(), torch.nn.functional.normalize(hand_pooled, dim=-1).numpy(), atol=1e-6
    )


def test_modules_it_cannot_reproduce_are_refused(tmp_path: Path) -> None:
    save_sentence_model(tmp_path, "mean", dense=False, normalize=False)
    modules_file = tmp_path / "model" / "modules.json"
    modules = json.loads(modules_file.read_text())
    modules.append(
        {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    )
    modules_file.write_text(json.dumps(modules))
    config = TextConfig(kind="sentence-transformers", name=str(tmp_path / "model"))
    with pytest.raises(ConfigError, match="'LayerNorm' module .* cannot reproduce"):
        build_text_tower(config)
    assert numpy_tower(config) is None  # declines: the torch path says why


def test_a_plain_encoder_is_not_a_sentence_transformers_model(tmp_path: Path) -> None:
    save_sentence_model(tmp_path, "mean", dense=False, normalize=False)
    with pytest.raises(ConfigError, match="no modules.json.*kind 'hf-encoder'"):
        build_text_tower(TextConfig(kind="sentence-transformers", name=str(tmp_path / "bert")))
    tower = build_text_tower(TextConfig(kind="hf-encoder", name=str(tmp_path / "bert")))
    assert type(tower) is HFEncoderTower  # no modules.json: mean pooled by hand, as before


def test_a_sentence_transformers_model_by_hub_name_from_the_offline_cache(tmp_path, monkeypatch) -> None:
    """modules.json, the Pooling config and the Dense weights come through the hub cache as the
    transformer's files do: the same embeddings as from the folder."""
    from huggingface_hub import constants
    from test_hub import lay_out_in_hub_cache

    save_sentence_model(tmp_path, "cls", dense=True, normalize=True)
    lay_out_in_hub_cache(tmp_path / "model", tmp_path / "cache", "someone/tiny-sentence-model")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    by_name = build_text_tower(TextConfig(name="someone/tiny-sentence-model"))
    by_folder = build_text_tower(TextConfig(name=str(tmp_path / "model")))
    assert isinstance(by_name, SentenceTransformerTower) and by_name.embed_dim == 16
    np.testing.assert_array_equal(by_name.encode(TEXTS).numpy(), by_folder.encode(TEXTS).numpy())
