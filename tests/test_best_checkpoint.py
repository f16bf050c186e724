"""Small data: train.epochs instead of steps, and the best held-out step's projector kept as the result."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import stop_text_training_at, tiny_bridge_config

import training.align
from bridge.config import ConfigError, RunConfig, TrainConfig, load_config
from bridge.model import TextBridge
from training.align import train_text_bridge
from training.loop import steps_for_epochs

DATA = "synthetic:40"


def tiny_run(**train) -> RunConfig:
    options = dict(steps=12, batch_size=8, held_out=4, eval_every=3, checkpoint_every=3, warmup_steps=2)
    return RunConfig(
        bridge=tiny_bridge_config(width=32, num_heads=2), train=TrainConfig(**{**options, **train})
    )


@pytest.fixture
def scripted_metric(monkeypatch):
    """Held-out R@1 as a chosen function of the step just run (the real evaluation is replaced), so a run
    peaks where a test says. The step is the one whose batch was drawn last (grad_accum 1)."""
    real_sample = training.align.sample_batch
    state = {"step": 0, "script": {}}

    def sample(data, config, batch):
        state["step"] = batch + 1
        return real_sample(data, config, batch)

    def evaluate(bridge, data, batch_size=512):
        value = state["script"][state["step"]]
        return {"text_to_image_R@1": value, "image_to_text_R@1": value / 2}

    monkeypatch.setattr(training.align, "sample_batch", sample)
    monkeypatch.setattr(training.align, "evaluate_alignment", evaluate)
    return state


def saved_projector(out) -> dict[str, torch.Tensor]:
    return TextBridge.from_pretrained(out).projector.state_dict()


def checkpoint_projector(out, step: int) -> dict[str, torch.Tensor]:
    from bridge.model import read_safetensors

    head = read_safetensors(out / "checkpoints" / f"step-{step:07d}" / "head.safetensors")
    return {k.removeprefix("projector."): v for k, v in head.items() if k.startswith("projector.")}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_run_that_peaks_early_saves_the_peak(tmp_path, scripted_metric):
    scripted_metric["script"] = {3: 0.25, 6: 0.75, 9: 0.5, 12: 0.25}
    out = tmp_path / "run"
    _, result = train_text_bridge(tiny_run(), DATA, out, progress=False)
    assert_same_tensors(saved_projector(out), checkpoint_projector(out, 6))
    assert not torch.equal(
        checkpoint_projector(out, 6)["out.weight"], checkpoint_projector(out, 12)["out.weight"]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["best_metric"] == "text_to_image_R@1"
    assert (metrics["best_step"], metrics["text_to_image_R@1"], metrics["image_to_text_R@1"]) == (
        6,
        0.75,
        0.375,
    )
    assert (metrics["last_step"], metrics["last_text_to_image_R@1"]) == (12, 0.25)


def test_best_metric_none_saves_the_last_step(tmp_path, scripted_metric):
    scripted_metric["script"] = {3: 0.25, 6: 0.75, 9: 0.5, 12: 0.25}
    out = tmp_path / "run"
    _, result = train_text_bridge(tiny_run(best_metric="none"), DATA, out, progress=False)
    assert_same_tensors(saved_projector(out), checkpoint_projector(out, 12))
    assert "best_step" not in result.metrics and result.metrics["text_to_image_R@1"] == 0.25


def test_the_best_step_survives_a_resume(tmp_path, scripted_metric, monkeypatch):
    # Peaks at step 3; killed at step 8, after the step-6 checkpoint; the resumed steps 9 and 12 score less.
    scripted_metric["script"] = {3: 0.75, 6: 0.5, 9: 0.25, 12: 0.5}
    scripted_sample = stop_text_training_at(monkeypatch, 8)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_text_bridge(tiny_run(), DATA, out, progress=False)
    monkeypatch.setattr(training.align, "sample_batch", scripted_sample)
    _, resumed = train_text_bridge(tiny_run(), DATA, out, resume=True, progress=False)
    assert len(resumed.losses) == 6
    assert_same_tensors(saved_projector(out), checkpoint_projector(out, 3))
    assert (resumed.metrics["best_step"], resumed.metrics["text_to_image_R@1"]) == (3, 0.75)
    assert (resumed.metrics["last_step"], resumed.metrics["last_text_to_image_R@1"]) == (12, 0.5)


def test_the_best_step_of_a_real_run_is_the_one_saved(tmp_path, monkeypatch):
    """Real held-out evaluation: metrics.json's figure is the best one measured, and the saved bridge
    scores it again."""
    measured = []
    real_evaluate = training.align.evaluate_alignment

    def recording(bridge, data, batch_size=512):
        measured.append(real_evaluate(bridge, data, batch_size)["text_to_image_R@1"])
        return real_evaluate(bridge, data, batch_size)

    monkeypatch.setattr(training.align, "evaluate_alignment", recording)
    out = tmp_path / "run"
    bridge, result = train_text_bridge(tiny_run(held_out=16, lr=3e-2), DATA, out, progress=False)
    assert len(measured) == 4
    best = max(measured)
    assert result.metrics["text_to_image_R@1"] == best
    assert result.metrics["best_step"] == 3 * (measured.index(best) + 1)
    assert result.metrics["last_text_to_image_R@1"] == measured[-1]
    assert_same_tensors(saved_projector(out), checkpoint_projector(out, result.metrics["best_step"]))


@pytest.mark.parametrize(("epochs", "grad_accum", "steps"), [(2.5, 1, 13), (2.5, 2, 7), (0.1, 1, 1)])
def test_epochs_decide_the_steps(tmp_path, epochs, grad_accum, steps):
    # 40 training scenes, batches of 8: ceil(epochs x 40 / (8 x grad_accum)) optimiser steps.
    config = tiny_run(steps=1000, epochs=epochs, grad_accum=grad_accum, eval_every=0, checkpoint_every=0)
    _, result = train_text_bridge(config, DATA, tmp_path / "run", progress=False)
    assert result.steps == steps and len(result.losses) == steps
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))


def test_steps_for_epochs():
    assert steps_for_epochs(3, 100, 10) == 30  # whole: no extra step from float rounding
    assert steps_for_epochs(1, 100, 256) == 1  # a batch is capped at the training items
    assert steps_for_epochs(110, 4000, 256) == 1719


@pytest.mark.parametrize(
    ("setting", "named"), [("epochs: 0", "train.epochs"), ("best_metric: R@1", "train.best_metric")]
)
def test_bad_settings_are_named(tmp_path, setting, named):
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  {setting}\n")
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(path)
