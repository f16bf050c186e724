"""Training at scale: the feature cache's size checked before it is filled, the held-out split sized to the
data, and the trackers (TensorBoard) that log the same figures as train_log.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_bridge_config

import training.cache
from bridge.cli import main
from bridge.config import RunConfig, TrainConfig
from bridge.synthetic import SyntheticWorld
from training.align import AlignmentData, train_text_bridge
from training.cache import FeatureCache
from training.data import DataError, held_out_count, held_out_split, load_pairs

TINY_TRAIN = dict(batch_size=8, eval_every=0, checkpoint_every=0, warmup_steps=1, lr=1e-2)


def write_pairs(folder: Path, count: int) -> Path:
    """`count` synthetic scenes saved as small JPEG files and a pairs.jsonl naming them."""
    (folder / "photos").mkdir(parents=True)
    lines = []
    for index, scene in enumerate(SyntheticWorld(seed=5, image_size=56).scenes(0, count)):
        scene.render().save(folder / "photos" / f"scene{index:03d}.jpg", quality=90)
        lines.append(json.dumps({"image": f"photos/scene{index:03d}.jpg", "captions": scene.captions(1)}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def cached_arrays(root: Path) -> list[Path]:
    return sorted(root.rglob("*.npy"))


# --- a cache that fits ------------------------------------------------------------------------------------


def test_the_cache_estimate_is_the_bytes_the_cache_then_holds(tmp_path, tiny_bridge):
    data = write_pairs(tmp_path, 12)
    pairs = load_pairs(str(data))
    cache = FeatureCache(tmp_path / "cache", tiny_bridge.encoder)
    estimate = cache.check_room(pairs)
    # The tiny DINOv2 at 56 px: a CLS and 4 x 4 patches of 32 floats, stored as float16.
    assert estimate == 12 * (1 + 16) * 32 * 2
    cache.features(pairs, progress=False)
    held = sum(np.load(path, mmap_mode="r").nbytes for path in cached_arrays(tmp_path / "cache"))
    assert held == estimate
    assert cache.check_room(pairs) == 0  # nothing left to fill: nothing to estimate or refuse


def test_a_cache_the_disk_cannot_hold_is_refused_before_any_encoding(tmp_path, monkeypatch, capsys, caplog):
    data = write_pairs(tmp_path, 16)
    (tmp_path / "run.yaml").write_text(
        "bridge:\n  encoder:\n    architecture: {model_type: dinov2, hidden_size: 32, num_hidden_layers: 2, "
        "num_attention_heads: 2, intermediate_size: 64, patch_size: 14, image_size: 56}\n"
        "  projector: {kind: attention, options: {width: 32, num_heads: 2}}\n"
        "train: {steps: 2, batch_size: 8, held_out: 4, eval_every: 0, checkpoint_every: 0}\n"
    )
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        training.cache.shutil, "disk_usage", lambda path: usage._replace(free=30 * 2**20)
    )  # 31.46 MB free: less than the 64 MiB margin alone
    out = tmp_path / "run"
    code = main(["train", "--config", str(tmp_path / "run.yaml"), "--data", str(data), "--out", str(out)])
    error = capsys.readouterr().err.splitlines()[-1]  # after the tower's loading bar
    directory = next((out / "cache" / "features").iterdir())  # named by the encoder's fingerprint
    assert code == 2
    assert error == (
        "dinobridge train: error: the feature cache of 16 images x 17 tokens x 32 float16 needs 0.02 MB "
        f"in '{directory}', but that disk has 31.46 MB free; train on fewer tokens (pooled features) or "
        "give a train.cache_dir on a larger disk"
    )
    # The size was shown first, without -v, and nothing was encoded or written.
    assert "feature cache: 16 images x 17 tokens x 32 float16 = 0.02 MB in " in caplog.text
    assert cached_arrays(tmp_path) == [] and not (out / "run_config.json").exists()


# --- the held-out split -----------------------------------------------------------------------------------


def test_the_default_held_out_split_is_a_tenth_capped_at_500():
    assert [held_out_count(None, total) for total in (5, 120, 4_000, 118_287)] == [0, 12, 400, 500]
    assert held_out_count(30, 120) == 30 and held_out_count(0.25, 120) == 30  # a user's value as given
    pairs = list(range(120))
    with pytest.raises(DataError, match="held_out=120 leaves no training data out of 120 pairs"):
        held_out_split(pairs, 120, seed=0)


def test_120_pairs_train_with_the_default_split_and_hold_out_12(tmp_path, tiny_bridge):
    data = str(write_pairs(tmp_path, 120))
    config = RunConfig(
        bridge=tiny_bridge_config(width=32, num_heads=2), train=TrainConfig(steps=3, **TINY_TRAIN)
    )
    assert config.train.held_out is None
    # The run's own cache folder, which the run then reads instead of encoding again.
    split = AlignmentData.prepare(tiny_bridge, data, config.train, tmp_path / "run" / "cache", progress=False)
    train_images = {pair.image for pair in split.train.features.pairs}
    held_images = {pair.image for pair in split.held_out.features.pairs}
    assert (len(train_images), len(held_images)) == (108, 12) and not train_images & held_images
    _, result = train_text_bridge(config, data, tmp_path / "run", progress=False)
    assert len(result.losses) == 3 and 0 <= result.metrics["text_to_image_R@1"] <= 1
