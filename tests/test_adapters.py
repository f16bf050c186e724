"""LoRA adapters on a text bridge (bridge/adapters.py): training through the CLI, several adapters in one
directory, merging, the fingerprint an index checks, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import stop_text_training_at, tiny_bridge_config
from safetensors.torch import load_file

import training.align
from bridge import adapters, serve
from bridge.cli import DEFAULT_ADAPTER_NAME, main
from bridge.config import ConfigError, RunConfig, TrainConfig, load_config
from bridge.model import TextBridge
from bridge.synthetic import SHAPES
from training.align import train_text_bridge
from training.data import synthetic_pairs

TRAIN = dict(batch_size=8, held_out=4, eval_every=0, checkpoint_every=0, warmup_steps=1, lr=2e-2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny bridge trained for a few steps: the base every adapter here starts from."""
    out = tmp_path_factory.mktemp("base") / "bridge"
    train = TrainConfig(steps=4, cache_dir=str(out.parent / "cache"), **TRAIN)
    config = RunConfig(bridge=tiny_bridge_config(width=32, num_heads=2), train=train)
    train_text_bridge(config, "synthetic:24", out, progress=False)
    return out


def adapter_config(tmp_path, cache, name: str = "run", steps: int = 6, **train) -> str:
    """A run config of its own, the feature and caption caches shared with the base's run (faster)."""
    path = tmp_path / f"{name}.yaml"
    cache = str(cache)
    section = {**TRAIN, "steps": steps, "cache_dir": cache, "lora": {"r": 4, "alpha": 8}, **train}
    path.write_text(yaml.safe_dump({"train": section}))
    return str(path)


def train_adapter(tmp_path, base, out, name: str, data: str = "synthetic:32:7", cache=None, **train) -> int:
    config = adapter_config(tmp_path, cache or base.parent / "cache", name, **train)
    argv = ["train", "--base", str(base), "--lora", "--adapter", name, "--data", data, "--out", str(out)]
    return main([*argv, "--config", config])


@pytest.fixture(scope="module")
def two_adapters(base, tmp_path_factory):
    """Adapter 'a' trained on the base, then 'b' trained from a's directory: b's holds both."""
    tmp = tmp_path_factory.mktemp("adapters")
    assert train_adapter(tmp, base, tmp / "a", "a", checkpoint_every=3) == 0
    assert train_adapter(tmp, tmp / "a", tmp / "ab", "b", "synthetic:32:8", base.parent / "cache") == 0
    return tmp / "a", tmp / "ab"


def images(count: int = 6):
    return [pair.load_image() for pair in synthetic_pairs(count, seed=5, start=1000)]


def test_adapter_training_leaves_the_base_bitwise_unchanged(base, two_adapters):
    single, _ = two_adapters
    base_weights, adapted_weights = (
        load_file(base / "model.safetensors"),
        load_file(single / "model.safetensors"),
    )
    assert base_weights.keys() == adapted_weights.keys()
    assert all(torch.equal(base_weights[k], adapted_weights[k]) for k in base_weights)
    # Only the adapter trained: its B matrices moved off their zero start.
    weights = load_file(single / "adapters" / "a" / adapters.ADAPTER_WEIGHTS)
    assert all("lora_" in key for key in weights)
    assert any(key.endswith("lora_B.weight") and weights[key].abs().sum() > 0 for key in weights)
    # In memory too: with the adapter off, the loaded bridge is the base, bit for bit.
    bridge = TextBridge.from_pretrained(single, adapter="a")
    bridge.set_adapter(None)
    plain = TextBridge.from_pretrained(base)
    assert np.array_equal(bridge.encode_images(images()), plain.encode_images(images()))
    assert bridge.fingerprint() == plain.fingerprint()


def test_two_adapters_in_one_directory_give_their_own_embeddings(base, two_adapters):
    _, both = two_adapters
    assert adapters.saved_adapters(both) == ["a", "b"]
    pictures = images()
    plain = TextBridge.from_pretrained(base).encode_images(pictures)
    none = TextBridge.from_pretrained(both).encode_images(pictures)
    with_a = TextBridge.from_pretrained(both, adapter="a").encode_images(pictures)
    with_b = TextBridge.from_pretrained(both, adapter="b").encode_images(pictures)
    assert np.array_equal(none, plain)
    assert np.abs(with_a - plain).max() > 1e-3 and np.abs(with_b - plain).max() > 1e-3
    assert np.abs(with_a - with_b).max() > 1e-3
    # 'a' in the directory b was trained into is the very adapter trained first.
    single, _ = two_adapters
    assert np.array_equal(TextBridge.from_pretrained(single, adapter="a").encode_images(pictures), with_a)
    fingerprints = {TextBridge.from_pretrained(both, adapter=name).fingerprint() for name in ("a", "b")}
    assert len(fingerprints | {TextBridge.from_pretrained(both).fingerprint()}) == 3


def test_merged_bridge_matches_the_adapter_and_loads_without_peft(two_adapters, tmp_path, capsys):
    _, both = two_adapters
    assert main(["merge", str(both), "--adapter", "b", "--out", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "adapters").exists()
    merged = TextBridge.from_pretrained(tmp_path / "merged")
    assert merged.adapters is None
    adapted = TextBridge.from_pretrained(both, adapter="b")
    np.testing.assert_allclose(
        merged.encode_images(images()), adapted.encode_images(images()), atol=1e-5, rtol=0
    )
    # Merging into a directory that holds a model is refused, and the model is left as it was.
    capsys.readouterr()
    assert main(["merge", str(both), "--adapter", "b", "--out", str(tmp_path / "merged")]) == 2
    assert "already holds a model" in capsys.readouterr().err


def test_an_index_built_with_one_adapter_refuses_queries_through_another(two_adapters, tmp_path, capsys):
    _, both = two_adapters
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, picture in enumerate(images(4)):
        picture.save(folder / f"{number}.png")
    index = str(tmp_path / "index")
    assert (
        main(["index", str(folder), "--model", str(both), "--adapter", "a", "--out", index, "--workers", "0"])
        == 0
    )
    capsys.readouterr()
    # The adapter that built it is found from its fingerprint: a search needs no --adapter.
    assert main(["search", index, "a red circle", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert main(["search", index, "a red circle", "--adapter", "b"]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    print(error)
    assert "adapter 'a'" in error and "adapter 'b'" in error
    # dinobridge serve loads the bridge through the adapter that built the index, as search does.
    assert serve._load_bridge(Path(index), str(both)).adapter == "a"
    with pytest.raises(ValueError, match="base bridge"):
        from bridge.index import ImageIndex

        ImageIndex.load(index, TextBridge.from_pretrained(both)).search(text=["a red circle"])


def test_resume_continues_the_same_adapter_loss_curve(base, two_adapters, tmp_path, monkeypatch):
    whole, _ = two_adapters  # adapter 'a', trained in one go for 6 steps, with a checkpoint every 3
    real_sample = stop_text_training_at(monkeypatch, 5)
    assert train_adapter(tmp_path, base, tmp_path / "killed", "a", checkpoint_every=3) == 130
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    monkeypatch.setattr(training.align, "sample_batch", real_sample)
    config = adapter_config(tmp_path, base.parent / "cache", "a", checkpoint_every=3)
    argv = ["train", "--base", str(base), "--lora", "--adapter", "a", "--data", "synthetic:32:7"]
    assert main([*argv, "--out", str(tmp_path / "killed"), "--config", config, "--resume"]) == 0

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "killed")) == 6
    np.testing.assert_allclose(losses(tmp_path / "killed"), losses(whole), rtol=1e-5, atol=1e-6)
    resumed = TextBridge.from_pretrained(tmp_path / "killed", adapter="a").encode_images(images())
    once = TextBridge.from_pretrained(whole, adapter="a").encode_images(images())
    np.testing.assert_allclose(resumed, once, atol=1e-6, rtol=0)


def test_hard_negatives_and_the_dense_loss_train_an_adapter(base, tmp_path):
    extra = dict(dense_weight=1.0, hard_negative_words=[list(SHAPES)])
    assert train_adapter(tmp_path, base, tmp_path / "dense", "dense", steps=4, **extra) == 0
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "dense" / "train_log.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 4 and all(np.isfinite(losses))
    weights = load_file(tmp_path / "dense" / "adapters" / "dense" / adapters.ADAPTER_WEIGHTS)
    assert any(key.endswith("lora_B.weight") and weights[key].abs().sum() > 0 for key in weights)
    assert torch.equal(
        load_file(tmp_path / "dense" / "model.safetensors")["logit_scale"],
        load_file(base / "model.safetensors")["logit_scale"],
    )  # the temperature trains only when train.lora.train_temperature says so


def test_adapter_mistakes_are_one_line_each(base, two_adapters, tmp_path, capsys):
    single, _ = two_adapters
    argv = ["train", "--data", "synthetic:8", "--out"]
    assert main([*argv, str(tmp_path / "x"), "--lora"]) == 2
    assert "--base BRIDGE_DIR" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "x"), "--adapter", "a"]) == 2
    assert "add --lora" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "x"), "--base", str(single), "--lora", "--adapter", "a"]) == 2
    assert "already holds an adapter named 'a'" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "x"), "--base", str(base), "--lora", "--adapter", "no.dots"]) == 2
    assert "adapter name 'no.dots'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"no adapter 'z' \(it holds: a\)"):
        TextBridge.from_pretrained(single, adapter="z")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora:\n    targets: [decoder]\n")
    with pytest.raises(ConfigError, match="train.lora.targets"):
        load_config(bad)
    assert DEFAULT_ADAPTER_NAME == adapters.DEFAULT_ADAPTER


@pytest.mark.slow
def test_domain_shift_demo_adapter_learns_the_new_domain_and_leaves_the_base_when_off(tmp_path):
    """training/adapt_demo.py at a small size: 447 s measured on 2 cores shared with other jobs."""
    from training.adapt_demo import run_adapt_demo

    result = run_adapt_demo(
        tmp_path, base_scenes=600, new_pairs=400, gallery=100, base_steps=80, adapt_steps=60, progress=False
    )
    base, on, off = (result.row(name) for name in ("base", "adapter on", "adapter off"))
    assert result.adapter_off_bitwise
    assert (off.new_r1, off.old_r1) == (base.new_r1, base.old_r1)
    assert on.new_r1 > base.new_r1 + 0.03, result.report()
    assert 0 < on.trained < 0.2 * result.projector_parameters
    assert TextBridge.from_pretrained(result.bridge_dir, adapter="new").adapter == "new"
