"""The one training loop (training/loop.py): accumulation, the schedule, checkpoints and an exact resume,
and the run directory's checks, on a tiny regression and on the text route's trainer."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bridge.config import ConfigError, TrainConfig
from tests.test_training import tiny_run
from training.align import train_text_bridge
from training.loop import CHECKPOINTS, RUN_CONFIG, TRAIN_LOG, learning_rate, run_loop

# 40 micro-batches of 8 rows of a noisy linear map: enough for 20 steps of 2 micro-batches.
generator = torch.Generator().manual_seed(0)
INPUTS = torch.randn(40, 8, 4, generator=generator)
TARGETS = INPUTS @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(
    40, 8, 1, generator=generator
)


def regression_config(steps: int = 6, grad_accum: int = 2, checkpoint_every: int = 0) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        lr=0.05,
        warmup_steps=2,
        weight_decay=0.01,
        grad_accum=grad_accum,
        checkpoint_every=checkpoint_every,
    )


def fresh_model() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(4, 1)


class Recorder:
    """A step body on the regression that records the micro-batch numbers it was given."""

    def __init__(self, dies_at: int | None = None):
        self.batches: list[int] = []
        self.dies_at = dies_at

    def __call__(self, accelerator, model: nn.Module, batch: int) -> float:
        if batch == self.dies_at:
            raise KeyboardInterrupt
        self.batches.append(batch)
        loss = nn.functional.mse_loss(model(INPUTS[batch]), TARGETS[batch])
        accelerator.backward(loss)
        return loss.item()


def test_a_step_is_one_update_of_grad_accum_micro_batches_as_plain_torch_computes_it():
    config = regression_config(steps=5, grad_accum=3)
    model, body = fresh_model(), Recorder()
    losses = run_loop(model, body, config, None, progress=False)
    assert body.batches == list(range(15))  # steps count updates; micro-batches numbered step * 3 + i

    # The same by hand: the mean of 3 micro-batches' gradients, AdamW at the step's learning rate.
    reference = fresh_model()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    expected = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        micro = [
            nn.functional.mse_loss(reference(INPUTS[b]), TARGETS[b]) for b in range(3 * step, 3 * step + 3)
        ]
        (sum(micro) / 3).backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(sum(loss.item() for loss in micro) / 3)
    assert losses == pytest.approx(expected, abs=1e-6)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_accumulating_two_half_batches_updates_as_one_whole_batch():
    """grad_accum 2 over halves of each batch gives the update of the whole batch (mean losses)."""
    seen: list[int] = []
    whole = fresh_model()
    run_loop(whole, Recorder(), regression_config(steps=4, grad_accum=1), None, progress=False)

    def half_batches(accelerator, model, batch):
        step, half = divmod(batch, 2)
        rows = slice(4 * half, 4 * half + 4)
        loss = nn.functional.mse_loss(model(INPUTS[step][rows]), TARGETS[step][rows])
        accelerator.backward(loss)
        seen.append(batch)
        return loss.item()

    accumulated = fresh_model()
    run_loop(accumulated, half_batches, regression_config(steps=4, grad_accum=2), None, progress=False)
    assert seen == list(range(8))
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_accumulation_continues_the_same_run_exactly(tmp_path):
    config = regression_config(steps=6, grad_accum=2, checkpoint_every=2)
    whole = fresh_model()
    whole_losses = run_loop(whole, Recorder(), config, tmp_path / "whole", progress=False)

    # Killed in step 5's second micro-batch (number 9), after the step-4 checkpoint; resumed in a new model.
    with pytest.raises(KeyboardInterrupt):
        run_loop(fresh_model(), Recorder(dies_at=9), config, tmp_path / "killed", progress=False)
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / CHECKPOINTS).iterdir())
    assert checkpoints == ["step-0000002", "step-0000004"]
    resumed, body = fresh_model(), Recorder()
    resumed_losses = run_loop(resumed, body, config, tmp_path / "killed", resume=True, progress=False)
    assert body.batches == list(range(8, 12))  # from the first micro-batch of step 5
    assert resumed_losses == pytest.approx(whole_losses[4:], abs=1e-7)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-7, msg=name)
    log = [json.loads(line) for line in (tmp_path / "killed" / TRAIN_LOG).read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]  # step 5 not logged twice
    assert [entry["lr"] for entry in log] == [learning_rate(config, step) for step in range(6)]


def test_a_fresh_run_never_resumes_an_older_runs_checkpoints(tmp_path):
    old = regression_config(steps=6, grad_accum=1, checkpoint_every=3)
    run_loop(fresh_model(), Recorder(), old, tmp_path, progress=False)
    new = regression_config(steps=2, grad_accum=1, checkpoint_every=1)
    run_loop(fresh_model(), Recorder(), new, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step-0000001", "step-0000002"]


def test_without_a_directory_the_loop_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_loop(fresh_model(), Recorder(), regression_config(checkpoint_every=1), None, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_grad_accum_below_one_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="train.grad_accum is 0; give 1"):
        run_loop(fresh_model(), Recorder(), regression_config(grad_accum=0), None, progress=False)


def test_resume_with_other_data_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    train_text_bridge(tiny_run(steps=6), "synthetic:20", out, progress=False)
    saved = (out / RUN_CONFIG).read_text()
    with pytest.raises(ConfigError, match="config, data or base that differs from the one in"):
        train_text_bridge(tiny_run(steps=6), "synthetic:24", out, resume=True, progress=False)
    assert (out / RUN_CONFIG).read_text() == saved
    assert json.loads(saved)["data"] == "synthetic:20"
