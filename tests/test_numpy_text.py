"""The NumPy twins of the text towers compute what the torch towers compute, and a text search through
the CLI never imports torch.

Each twin is held against transformers: the real all-MiniLM-L6-v2 (a BERT encoder) and tiny random CLIP
text models (with MiniLM's tokenizer, as tests/test_text.py builds them). Towers without a twin give None,
so the caller falls back to torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_index import make_photos
from test_text import CAPTIONS, minilm_folder, save_tiny_hf_text_model

from bridge import numpy_text
from bridge.config import TextConfig
from bridge.index import ImageIndex
from bridge.numpy_text import TextQueryEncoder, numpy_tower
from bridge.text import build_text_tower

REPO = Path(__file__).resolve().parents[1]
# What tokenizers meet in the wild: accents, other scripts, emoji, an empty query, padding-free long text.
TEXTS = [
    *CAPTIONS,
    "Ünïcödé café, naïve façade; 東京タワー 🚀",
    "",
    "   spaces   and\ttabs\n",
    "the same word " * 300,  # past MiniLM's 512 positions
]


def index_photos(tmp_path: Path, bridge, count: int) -> ImageIndex:
    """`count` photos under tmp_path/photos, the bridge saved in tmp_path/bridge, indexed in tmp_path/index."""
    make_photos(tmp_path / "photos", count)
    bridge.save_pretrained(tmp_path / "bridge")
    return ImageIndex.build(
        tmp_path / "photos",
        bridge,
        tmp_path / "index",
        workers=0,
        model_dir=tmp_path / "bridge",
        progress=False,
    )


def assert_twin_equals_torch(config: TextConfig, texts: list[str]) -> None:
    twin, tower = numpy_tower(config), build_text_tower(config)
    assert twin is not None and twin.embed_dim == tower.embed_dim
    np.testing.assert_allclose(twin.encode(texts), tower.encode(texts).numpy(), atol=2e-5, rtol=1e-4)


def test_minilm_twin_equals_the_torch_tower() -> None:
    assert_twin_equals_torch(TextConfig(), TEXTS)


def test_minilm_twin_tokenizes_and_truncates_as_transformers() -> None:
    for max_length in (None, 8):
        config = TextConfig(max_length=max_length)
        twin, tower = numpy_tower(config), build_text_tower(config)
        for text in TEXTS:
            expected = tower.tokenizer(text, truncation=True, max_length=tower.context_length)["input_ids"]
            assert twin.tokenizer.encode(text).ids == expected
    assert_twin_equals_torch(TextConfig(max_length=8), TEXTS)


def tiny_clip(folder: Path, legacy_eos: bool) -> TextConfig:
    """A tiny random CLIP text model (16 positions) saved in `folder`, and the config of its tower."""
    save_tiny_hf_text_model(folder, "hf-clip")
    if legacy_eos:  # CLIP checkpoints from before transformers' fix say 2 and pool at the largest id
        settings = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**settings, "eos_token_id": 2}))
    return TextConfig(kind="hf-clip", name=str(folder))


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_clip_twin_equals_the_torch_tower(tmp_path: Path, legacy_eos: bool) -> None:
    assert_twin_equals_torch(tiny_clip(tmp_path, legacy_eos), TEXTS)


# Texts of very different lengths for one call: a word, a query, a caption, ~60 words (past the tiny
# towers' limits) and 300 (past MiniLM's 256 tokens): the longest are cut to the limit.
PACK = [
    "star",
    "a small red star in the top left number 123",
    "a red circle on the left of a blue square and three green triangles below it",
    "the quick brown fox jumps over the lazy dog " * 7,
    "cat",
    "the same word " * 100,
]


def assert_packed_equals_alone(twin, limit: int, monkeypatch) -> None:
    """The texts of one call run as one pack, in one forward pass, and each gets what it gets alone; a call
    longer than PACK_TOKENS runs as several packs, with the same result."""

    lengths = [len(twin.tokenizer.encode(text).ids) for text in PACK]
    assert min(lengths) <= 3 and max(lengths) == limit  # the pack really mixes lengths, up to the limit
    alone = np.concatenate([twin.encode([text]) for text in PACK])
    passes, forward = [], twin.forward
    monkeypatch.setattr(twin, "forward", lambda pack: passes.append(len(pack.texts)) or forward(pack))
    packed = twin.encode(PACK)
    assert passes == [len(PACK)] and packed.dtype == np.float32 and packed.shape == alone.shape
    np.testing.assert_allclose(packed, alone, atol=1e-6, rtol=0)
    monkeypatch.setattr(numpy_text, "PACK_TOKENS", limit)
    passes.clear()
    np.testing.assert_allclose(twin.encode(PACK), alone, atol=1e-6, rtol=0)
    assert len(passes) >= 2 and sum(passes) == len(PACK)


def test_minilm_twin_packs_texts_as_it_runs_them_alone(monkeypatch) -> None:
    assert_packed_equals_alone(numpy_tower(TextConfig()), 256, monkeypatch)


@pytest.mark.parametrize(
    "pooling, dense, normalize",
    [
        ("cls", True, True),
        ("mean", False, False),
        ("max", True, False),
        ("weightedmean", False, True),
        ("lasttoken", False, False),
        ("mean_sqrt_len_tokens", True, True),
    ],
)
def test_sentence_twin_packs_texts_as_it_runs_them_alone(
    tmp_path: Path, monkeypatch, pooling, dense, normalize
) -> None:
    from test_sentence_towers import MAX_SEQ_LENGTH, save_sentence_model  # skips without the library

    save_sentence_model(tmp_path, pooling, dense, normalize)
    twin = numpy_tower(TextConfig(kind="sentence-transformers", name=str(tmp_path / "model")))
    assert_packed_equals_alone(twin, MAX_SEQ_LENGTH, monkeypatch)


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_clip_twin_packs_texts_as_it_runs_them_alone(tmp_path: Path, monkeypatch, legacy_eos: bool) -> None:
    assert_packed_equals_alone(numpy_tower(tiny_clip(tmp_path, legacy_eos)), 16, monkeypatch)


def test_a_random_bert_with_other_sizes_and_prefixed_weights(tmp_path: Path) -> None:
    # A BertForMaskedLM checkpoint names its encoder weights "bert.*"; AutoModel reads them as a BertModel.
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(tmp_path)
    assert_twin_equals_torch(TextConfig(name=str(tmp_path)), TEXTS)


@pytest.mark.parametrize(
    "case", ["siglip", "relative positions", "bfloat16 weights", "no tokenizer.json", "open_clip"]
)
def test_towers_without_a_twin_give_none(tmp_path: Path, case: str) -> None:
    if case == "siglip":
        save_tiny_hf_text_model(tmp_path, "hf-siglip")
        config = TextConfig(kind="hf-siglip", name=str(tmp_path))
    elif case == "open_clip":
        config = TextConfig(kind="open_clip", name="ViT-B-32")
    else:
        bert = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            position_embedding_type="relative_key" if case == "relative positions" else "absolute",
        )
        model = transformers.BertModel(bert)
        model.to(torch.bfloat16 if case == "bfloat16 weights" else torch.float32).save_pretrained(tmp_path)
        transformers.AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(tmp_path)
        if case == "no tokenizer.json":
            (tmp_path / "tokenizer.json").unlink()
        config = TextConfig(name=str(tmp_path))
    assert numpy_tower(config) is None


def test_query_encoder_matches_the_saved_bridge(tmp_path: Path, tiny_bridge) -> None:
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    queries = TextQueryEncoder.from_pretrained(tmp_path / "bridge")
    assert queries is not None and queries.fingerprint() == tiny_bridge.fingerprint()
    np.testing.assert_allclose(queries.encode_texts(TEXTS), tiny_bridge.encode_texts(TEXTS), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(queries.encode_texts(TEXTS), axis=1), 1.0, rtol=1e-5)
    # Not a saved bridge, or one saved before fingerprints were kept: the caller loads the whole bridge.
    assert TextQueryEncoder.from_pretrained(tmp_path) is None
    saved = json.loads((tmp_path / "bridge" / "config.json").read_text())
    del saved["fingerprint"]
    (tmp_path / "bridge" / "config.json").write_text(json.dumps(saved))
    assert TextQueryEncoder.from_pretrained(tmp_path / "bridge") is None


def test_cli_text_search_never_imports_torch_and_answers_as_the_library(tmp_path: Path, tiny_bridge) -> None:
    index = index_photos(tmp_path, tiny_bridge, 12)
    query = ["a red square", "--minus", "a blue circle", "-k", "5", "--json"]
    script = (
        "import sys; from bridge.cli import main; code = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'a text search imported torch'; sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "search", str(tmp_path / "index"), *query],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    expected = index.search(text="a red square", minus="a blue circle", k=5)  # the torch path, in process
    assert [hit["path"] for hit in found] == [path for path, _ in expected]
    np.testing.assert_allclose([hit["score"] for hit in found], [score for _, score in expected], atol=1e-4)


def test_an_image_query_through_a_query_encoder_says_what_it_needs(tmp_path: Path, tiny_bridge) -> None:
    index_photos(tmp_path, tiny_bridge, 2)
    index = ImageIndex.load(tmp_path / "index", TextQueryEncoder.from_pretrained(tmp_path / "bridge"))
    with pytest.raises(ValueError, match="needs the whole bridge"):
        index.search(image=next((tmp_path / "photos").iterdir()))
    assert len(index.search(text="a red square", k=2)) == 2


def test_the_cli_falls_back_to_torch_for_a_tower_without_a_twin(
    tmp_path: Path, tiny_bridge, monkeypatch
) -> None:
    from bridge.cli import main

    monkeypatch.setattr(numpy_text, "numpy_tower", lambda config: None)
    index_photos(tmp_path, tiny_bridge, 3)
    assert TextQueryEncoder.from_pretrained(tmp_path / "bridge") is None
    assert main(["search", str(tmp_path / "index"), "a red square", "-k", "2"]) == 0


def test_the_gelu_without_torch_is_torchs_gelu(monkeypatch):
    """A one-shot search never imports torch: its twin's GELU is NumPy's polynomial erf, not torch's."""
    x = np.linspace(-8, 8, 4001, dtype=np.float32).reshape(1, -1)
    with_torch = numpy_text._gelu(x)
    monkeypatch.setattr(numpy_text, "torch_if_loaded", lambda: None)
    without = numpy_text._gelu(x)
    expected = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(with_torch, expected, atol=5e-7)
    np.testing.assert_allclose(without, expected, atol=5e-7)
    assert without.dtype == np.float32 and not np.array_equal(with_torch, without)  # two different ways
