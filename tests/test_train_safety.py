"""A run is never lost: `train` and `train-vlm` check everything before they write to --out, a new run
never starts over an earlier one, a run that fails leaves the earlier one resumable, the log is on disk
line by line when a run is killed, and `eval` never writes into the model it reads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import training.align
import training.demo
import training.vlm
from bridge.cli import main
from bridge.config import ConfigError, TrainConfig, VLMRunConfig, VLMTrainConfig
from bridge.synthetic import SyntheticWorld
from tests.test_training import tiny_run
from tests.test_vlm import tiny_vlm_config
from training.align import train_text_bridge
from training.cache import user_cache_dir
from training.data import DataError
from training.loop import CHECKPOINTS, TRAIN_LOG, run_loop
from training.vlm import train_vlm

REPO = Path(__file__).resolve().parent.parent


def photo_pairs(folder: Path, count: int = 16) -> Path:
    """`count` synthetic scenes saved as PNG files and a pairs.jsonl naming them by relative path."""
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, scene in enumerate(SyntheticWorld(seed=3, image_size=56).scenes(0, count)):
        scene.render().save(folder / "photos" / f"{index:02d}.png")
        lines.append(json.dumps({"image": f"photos/{index:02d}.png", "captions": scene.captions(1)}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under `directory`: its content hash and mtime, to show that nothing was touched."""
    return {
        str(path.relative_to(directory)): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / TRAIN_LOG).read_text().splitlines()]


def break_line_3(data: Path) -> str:
    """Make line 3 of a pairs.jsonl name no image; returns the good text to put back."""
    good = data.read_text()
    lines = good.splitlines()
    lines[2] = json.dumps({"image": 5, "caption": "a red circle"})
    data.write_text("\n".join(lines) + "\n")
    return good


REFUSED = r"already holds an earlier run .*continue that run with --resume, or train into another --out"


def killed(monkeypatch, train, module, batches: str, at: int = 2) -> None:
    """Run `train(resume=False)` with `module.batches(data, config, batch, ...)` interrupted at micro-batch
    `at` (2: in step 3, after a step-2 checkpoint), as a kill would stop it."""
    real = getattr(module, batches)

    def dies(*args, **kwargs):
        if args[2] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, batches, dies)
    with pytest.raises(KeyboardInterrupt):
        train(resume=False)
    monkeypatch.setattr(module, batches, real)


def refused_and_failed_runs_change_nothing(train, data: Path, out: Path):
    """A new run into `out` is refused, whatever its settings; a resume whose data file has gone bad since
    fails on it; neither touches a file of `out`. Returns the result of the resume once the data is good."""
    before = snapshot(out)
    with pytest.raises(ConfigError, match=rf"--out '{re.escape(str(out))}' {REFUSED}"):
        train(resume=False)
    good = break_line_3(data)
    with pytest.raises(DataError, match=r'pairs\.jsonl:3: "image" must be an image path'):
        train(resume=True)
    assert snapshot(out) == before
    data.write_text(good)
    return train(resume=True)


def test_a_failed_text_run_leaves_the_earlier_run_resumable(tmp_path, monkeypatch):
    data, out = photo_pairs(tmp_path), tmp_path / "run"

    def train(resume):
        config = tiny_run(steps=4, checkpoint_every=2)
        return train_text_bridge(config, str(data), out, resume=resume, progress=False)[1]

    killed(monkeypatch, train, training.align, "sample_batch")
    assert sorted(p.name for p in (out / CHECKPOINTS).iterdir()) == ["step-0000002"]
    resumed = refused_and_failed_runs_change_nothing(train, data, out)
    assert len(resumed.losses) == 2  # steps 3 and 4: it went on from its checkpoint
    assert logged_steps(out) == [1, 2, 3, 4]


def tiny_vlm_run(steps: int = 3) -> VLMRunConfig:
    train = VLMTrainConfig(stage=1, steps=steps, batch_size=4, held_out=0, warmup_steps=1, checkpoint_every=1)
    return VLMRunConfig(vlm=tiny_vlm_config(), train=train)


def test_a_failed_llm_route_run_leaves_the_earlier_run_resumable(tmp_path, monkeypatch):
    data, out = photo_pairs(tmp_path, 8), tmp_path / "vlm"

    def train(resume):
        return train_vlm(tiny_vlm_run(), str(data), out, resume=resume, progress=False)[1]

    killed(monkeypatch, train, training.vlm, "batch_indices")
    resumed = refused_and_failed_runs_change_nothing(train, data, out)
    assert len(resumed.losses) == 1 and logged_steps(out) == [1, 2, 3]


def test_stage_2_into_the_stage_1_directory_is_refused_before_it_reads_its_base(tmp_path):
    out = tmp_path / "stage1"
    train_vlm(tiny_vlm_run(steps=1), "synthetic:8", out, progress=False)
    before = snapshot(out)
    stage2 = tiny_vlm_run(steps=1)
    stage2.train.stage = 2
    with pytest.raises(ConfigError, match=REFUSED):
        train_vlm(stage2, "synthetic:8", out, base=out, progress=False)
    assert snapshot(out) == before


def test_the_cli_refuses_a_new_run_over_an_old_one_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(
        "bridge:\n  encoder:\n    architecture: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,"
        " intermediate_size: 64, patch_size: 14, image_size: 56}\n"
        "  projector: {kind: attention, options: {width: 32, num_heads: 2}}\n"
        "train: {steps: 2, warmup_steps: 1, batch_size: 8, held_out: 4, eval_every: 0, checkpoint_every: 1}\n"
    )
    argv = ["train", "--config", str(tmp_path / "run.yaml"), "--data", "synthetic:16", "--out", str(out)]
    assert main(argv) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.fullmatch(rf"dinobridge train: error: --out '.*run' {REFUSED}.*", error)
    assert snapshot(out) == before
    assert main([*argv, "--resume"]) == 0  # the fix it names works


def bad_loss(config):
    config.train.loss = "hinge"


def bad_projector(config):
    config.bridge.projector.in_dim = 768


@pytest.mark.parametrize(
    "change, data, image_root, message",
    [
        (bad_loss, "synthetic:16", None, "unknown loss 'hinge'"),
        (bad_projector, "synthetic:16", None, "projector expects 768-d patches"),
        (None, "missing.jsonl", None, "data file 'missing.jsonl' does not exist"),
        (None, "pairs.jsonl", "nowhere", "image root 'nowhere' is not a folder"),
        (None, "broken.jsonl", None, r"broken\.jsonl:3: "),
    ],
)
def test_config_data_and_image_root_are_checked_before_out_is_made(
    tmp_path, monkeypatch, change, data, image_root, message
):
    monkeypatch.chdir(tmp_path)
    photo_pairs(tmp_path, 4)
    (tmp_path / "broken.jsonl").write_text((tmp_path / "pairs.jsonl").read_text())
    break_line_3(tmp_path / "broken.jsonl")
    config = tiny_run(steps=2)
    if change:
        change(config)
    with pytest.raises(ValueError, match=message):
        train_text_bridge(config, data, tmp_path / "run", image_root=image_root, progress=False)
    assert not (tmp_path / "run").exists()


def test_the_base_and_the_stage_are_checked_before_out_is_made(tmp_path):
    with pytest.raises(FileNotFoundError, match="'.*nowhere' is not a saved VisionLLM"):
        train_vlm(tiny_vlm_run(), "synthetic:8", tmp_path / "out", base=tmp_path / "nowhere", progress=False)
    frozen = tiny_vlm_run()
    frozen.train.freeze_projector = True  # stage 1 trains the projector alone: nothing left
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        train_vlm(frozen, "synthetic:8", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--out '.*notes.txt' is a file, not a directory"):
        train_text_bridge(tiny_run(steps=2), "synthetic:16", tmp_path / "notes.txt", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_needs_a_run_and_a_new_run_needs_an_empty_out(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"--resume: '.*nothing' holds no run to continue \(no run_config\.json\)"
    ):
        train_text_bridge(
            tiny_run(steps=2), "synthetic:16", tmp_path / "nothing", resume=True, progress=False
        )
    assert not (tmp_path / "nothing").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(
        ConfigError, match=r"'.*mine' is not empty \(notes\.txt\) and holds no run to continue"
    ):
        train_text_bridge(tiny_run(steps=2), "synthetic:16", mine, progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    # Killed in its first step, before any checkpoint: refused as a new run, continued from step 0.
    out = tmp_path / "run"

    def train(resume):
        return train_text_bridge(tiny_run(steps=2), "synthetic:16", out, resume=resume, progress=False)[1]

    killed(monkeypatch, train, training.align, "sample_batch", at=0)
    with pytest.raises(ConfigError, match=REFUSED):
        train(resume=False)
    assert len(train(resume=True).losses) == 2


def test_an_empty_out_and_one_holding_only_a_failed_runs_cache_are_fine(tmp_path):
    data = photo_pairs(tmp_path, 12)
    pictures = sorted((tmp_path / "photos").iterdir())
    for picture in pictures:
        picture.write_bytes(b"not a picture")
    out = tmp_path / "run"
    out.mkdir()  # empty
    with pytest.raises(ConfigError, match="no training image of .* could be read"):
        train_text_bridge(tiny_run(steps=2), str(data), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["cache"]  # what it filled before it found out
    photo_pairs(tmp_path, 12)
    _, result = train_text_bridge(tiny_run(steps=2), str(data), out, progress=False)
    assert len(result.losses) == 2 and not result.skipped


def test_a_relative_cache_dir_is_inside_the_run_not_the_working_directory(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = tiny_run(steps=2)
    config.train.cache_dir = "features"
    train_text_bridge(config, "synthetic:16", tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "features" / "features").is_dir()
    assert list(elsewhere.iterdir()) == []


# --- the training log -------------------------------------------------------------------------------------


def test_each_log_line_is_on_disk_when_its_step_ends(tmp_path):
    config = TrainConfig(steps=5, warmup_steps=1, checkpoint_every=0)
    lines_on_disk = []

    def after_step(done):
        lines_on_disk.append(len((tmp_path / TRAIN_LOG).read_text().splitlines()))

    def body(accelerator, model, batch):
        loss = model(torch.ones(2, 3)).square().mean()
        accelerator.backward(loss)
        return loss.item()

    run_loop(nn.Linear(3, 1), body, config, tmp_path, progress=False, after_step=after_step)
    assert lines_on_disk == [1, 2, 3, 4, 5]


KILLED_RUN = """
import os, signal, sys
import torch
from torch import nn
from bridge.config import TrainConfig
from training.loop import run_loop

def body(accelerator, model, batch):
    loss = model(torch.ones(2, 3)).square().mean()
    accelerator.backward(loss)
    return loss.item()

def after_step(done):
    if done == 126:  # no finally, no atexit: what is not on disk by now is lost
        os.kill(os.getpid(), signal.SIGKILL)

config = TrainConfig(steps=200, warmup_steps=1, checkpoint_every=0)
run_loop(nn.Linear(3, 1), body, config, sys.argv[1], progress=False, after_step=after_step)
"""


def test_a_run_killed_at_step_126_of_200_leaves_126_log_lines(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path)], env=environment, capture_output=True, timeout=300
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert logged_steps(tmp_path) == list(range(1, 127))


# --- eval reads a saved model, never writes to it ------------------------------------------------------------


def test_eval_writes_its_cache_outside_the_model_directory(tmp_path, tiny_bridge, monkeypatch, capsys):
    model = tmp_path / "model"
    tiny_bridge.save_pretrained(model)
    before = snapshot(model)
    monkeypatch.setenv("DINOBRIDGE_CACHE", str(tmp_path / "user-cache"))
    data = photo_pairs(tmp_path / "data", 8)
    assert main(["eval", "retrieval", "--model", str(model), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8
    classes = tmp_path / "classes"
    for index, scene in enumerate(SyntheticWorld(seed=5, max_objects=1, image_size=56).scenes(0, 6)):
        (classes / scene.objects[0].colour).mkdir(parents=True, exist_ok=True)
        scene.render().save(classes / scene.objects[0].colour / f"{index}.png")
    assert main(["eval", "zeroshot", "--model", str(model), "--data", str(classes), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    assert snapshot(model) == before
    assert (tmp_path / "user-cache" / "features").is_dir() and (tmp_path / "user-cache" / "text").is_dir()


def test_the_user_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOBRIDGE_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DINOBRIDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "dinobridge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "dinobridge"


# --- the demo reruns into its own directory ------------------------------------------------------------------


def test_the_demo_runs_twice_into_the_same_directory(tmp_path, monkeypatch, capsys):
    def tiny_demo_config():
        return tiny_run(steps=2, held_out=8, checkpoint_every=1)

    monkeypatch.setattr(training.demo, "RunConfig", tiny_demo_config)
    argv = ["demo", "--out", str(tmp_path / "demo"), "--scenes", "24"]
    assert main(argv) == 0
    assert main(argv) == 0  # a second demo overwrites the first, as a demo should
    assert "patch-token attention" in capsys.readouterr().out
    assert logged_steps(tmp_path / "demo" / "patch-token-attention") == [1, 2]
    assert (tmp_path / "demo" / "bridge" / "model.safetensors").is_file()
