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
import training.loop
from bridge.cli import main
from bridge.config import RunConfig, TrainConfig
from bridge.synthetic import SyntheticWorld
from training.align import AlignmentData, train_text_bridge
from training.cache import FeatureCache
from training.data import DataError, held_out_count, held_out_split, load_pairs
from training.loop import TRACKER_PROJECT, start_trackers

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
        f"in '{directory}', but that disk has 31.46 MB free; train without a cache (train.cache: false), "
        "on fewer tokens (pooled features), or give a train.cache_dir on a larger disk"
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


# --- trackers -----------------------------------------------------------------------------------------


def test_a_tensorboard_run_logs_every_step_as_train_log_jsonl_does(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = RunConfig(
        bridge=tiny_bridge_config(width=32, num_heads=2),
        train=TrainConfig(steps=20, held_out=8, report_to="tensorboard", **{**TINY_TRAIN, "eval_every": 10}),
    )
    out = tmp_path / "run"
    _, result = train_text_bridge(config, "synthetic:32", out, progress=False)
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / TRACKER_PROJECT))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [event.step for event in losses] == list(range(1, 21)) == [line["step"] for line in logged]
    # TensorBoard keeps float32: the same numbers to float32's precision.
    assert [event.value for event in losses] == pytest.approx([line["loss"] for line in logged], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([x["lr"] for x in logged], rel=1e-6)
    recall = events.Scalars("held_out/text_to_image_R@1")
    assert [event.step for event in recall] == [10, 20]  # where the trainer evaluates: eval_every and the end
    assert recall[-1].value == pytest.approx(result.metrics["text_to_image_R@1"], rel=1e-6)
    assert json.loads((out / "metrics.json").read_text()) == result.metrics


def test_a_tracker_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    from bridge.config import ConfigError, load_config

    (tmp_path / "bad.yaml").write_text("train:\n  report_to: mlflow\n")
    with pytest.raises(
        ConfigError, match=r"train.report_to is 'mlflow'; it must be one of none, tensorboard, wandb"
    ):
        load_config(tmp_path / "bad.yaml")
    find_spec = training.loop.importlib.util.find_spec
    monkeypatch.setattr(
        training.loop.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else find_spec(name, *a),
    )
    (tmp_path / "run.yaml").write_text("train:\n  report_to: wandb\n")
    out = tmp_path / "run"
    code = main(
        ["train", "--config", str(tmp_path / "run.yaml"), "--data", "synthetic:16", "--out", str(out)]
    )
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "dinobridge train: error: train.report_to is 'wandb' but the wandb package is not installed; "
        "pip install wandb, or set train.report_to: none"
    )
    assert not out.exists()


def test_wandb_stays_offline_without_a_login_or_wandb_mode(tmp_path, monkeypatch):
    class Recorder:
        def init_trackers(self, project, config, init_kwargs):
            self.project, self.config, self.init_kwargs = project, config, init_kwargs

    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    config = TrainConfig(report_to="wandb")
    offline = Recorder()
    start_trackers(offline, config, tmp_path / "run")
    assert offline.init_kwargs["wandb"]["mode"] == "offline" and offline.config["report_to"] == "wandb"
    assert offline.init_kwargs["wandb"]["dir"] == str(tmp_path / "run")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password key\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    logged_in = Recorder()
    start_trackers(logged_in, config, tmp_path / "run")
    assert "mode" not in logged_in.init_kwargs["wandb"]  # a login: wandb's own default (online)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "online")
    asked = Recorder()
    start_trackers(asked, config, tmp_path / "run")
    assert "mode" not in asked.init_kwargs["wandb"]  # WANDB_MODE, read by wandb itself, decides
