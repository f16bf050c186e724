"""The one training loop: every trainer (text route, LLM route, pre-alignment) runs its steps through it.

A trainer hands over what it trains (a module holding exactly the trained parameters) and a step body
(forward and backward of one micro-batch, given its number); the loop does the rest, the same way for all:

- `accelerate` places the run (device, mixed precision, N processes under `accelerate launch`) and
  accumulates gradients;
- AdamW, its learning rate a pure function of the optimiser step (`learning_rate`: warm-up, then cosine);
- accelerate's trackers (`report_to`: TensorBoard or W&B) get the loss, learning rate and step time of
  every step and the held-out metrics a trainer's `after_step` returns, besides `train_log.jsonl`;
- `steps` counts optimiser updates, each made of `grad_accum` micro-batches numbered
  `step * grad_accum + i`, so a checkpoint always falls between updates and `--resume` is exact whatever
  `grad_accum` is;
- the run directory: `run_config.json` (the config, data and base of the run, checked on `--resume`),
  `train_log.jsonl` (a line per step, flushed as it is written) and `checkpoints/step-NNNNNNN/` (the
  trained tensors and the optimiser state in safetensors, never a pickle), all written by the main
  process alone. A trainer checks the directory first (`check_out_dir`, `check_resume`): a new run never
  starts over an earlier one, and a run that fails on its data leaves an earlier one as it was.

Batches are a function of (seed, micro-batch number) (`epoch_order`), which is what lets a resumed run
continue the very same loss curve.

Not here: what a step computes (align.py, vlm.py, prealign.py), data (data.py), metrics (evaluate.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from bridge.config import ConfigError, to_dict
from bridge.model import read_safetensors
from bridge.runtime import cpu_only

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"
TRAIN_LOG = "train_log.jsonl"
# W&B's project; TensorBoard's event files go to <run directory>/dinobridge/ (`tensorboard --logdir RUN`).
TRACKER_PROJECT = "dinobridge"


class LoopConfig(Protocol):
    """The fields of TrainConfig and VLMTrainConfig that the loop reads."""

    steps: int  # optimiser updates
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_accum: int  # micro-batches an update
    mixed_precision: str  # no | bf16 | fp16
    checkpoint_every: int  # updates; 0: none
    report_to: str  # none | tensorboard | wandb: a tracker besides train_log.jsonl


# A step body: (accelerator, the prepared trained module, micro-batch number) -> that micro-batch's mean
# loss, after it has run its backward pass through `accelerator.backward`.
MicroStep = Callable[[Accelerator, nn.Module, int], float]


def run_loop(
    trainable: nn.Module,
    micro_step: MicroStep,
    config: LoopConfig,
    out_dir: str | Path | None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "training",
    after_step: Callable[[int], dict[str, float] | None] | None = None,
    best: BestCheckpoint | None = None,
) -> list[float]:
    """Run optimiser steps until `config.steps`; returns the loss of each step run in this call.

    `trainable`'s parameters that require gradients are optimised; under N processes it is wrapped for
    data parallelism, so the step body must run its forward pass through the module it is given.
    `out_dir` None: no log, no checkpoints (a sub-step of a larger job, such as pre-alignment).
    `after_step(done)` runs after each update (held-out evaluation, say); the metrics it returns go to
    the trackers of `config.report_to`, which a run without `out_dir` never starts.
    `best`: keeps the trained tensors of the step whose metrics score best, saved with every checkpoint
    (so `--resume` keeps it), and puts them back into `trainable` once the last step has run.
    """
    if config.grad_accum < 1:
        raise ConfigError(f"train.grad_accum is {config.grad_accum}; give 1 (no accumulation) or more")
    tracked = out_dir is not None and config.report_to != "none"
    if tracked:
        check_report_to(config.report_to)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=cpu_only(),  # as runtime.processes(): N CPU processes join with gloo
        log_with=config.report_to if tracked else None,
        project_dir=out_dir if tracked else None,
    )
    main = accelerator.is_main_process  # the one process that writes files
    out_dir = Path(out_dir) if out_dir is not None else None
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if out_dir is not None and resume:
        start = load_checkpoint(out_dir, trainable, optimizer, best)
    elif out_dir is not None and main:  # a fresh run: an older run's checkpoints must never be resumed
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    trainable, optimizer = accelerator.prepare(trainable, optimizer)
    train_log = TrainLog(out_dir, start, writes=main)
    if tracked:
        start_trackers(accelerator, config, Path(out_dir))
    steps = range(start, config.steps)
    bar = tqdm(steps, desc=desc, initial=start, total=config.steps, disable=not (progress and main))
    losses: list[float] = []
    try:
        for step in bar:
            started = time.perf_counter()
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = 0.0
            for micro in range(config.grad_accum):
                # accelerate steps the optimiser (and syncs gradients) on the last micro-batch only
                with accelerator.accumulate(trainable):
                    loss += micro_step(accelerator, trainable, step * config.grad_accum + micro)
                    optimizer.step()
                    optimizer.zero_grad()
            losses.append(loss / config.grad_accum)
            train_log.write(step + 1, losses[-1], lr)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            seconds = time.perf_counter() - started
            accelerator.log(
                {"train/loss": losses[-1], "train/lr": lr, "train/step_seconds": seconds}, step=done
            )
            # Evaluated before the checkpoint, which then holds the best-so-far including this step.
            metrics = after_step(done) if after_step is not None else None
            if metrics:
                accelerator.log({f"held_out/{name}": value for name, value in metrics.items()}, step=done)
                if best is not None:
                    best.offer(done, metrics, accelerator.unwrap_model(trainable))
            if (
                out_dir is not None
                and config.checkpoint_every
                and done % config.checkpoint_every == 0
                and main
            ):
                save_checkpoint(out_dir, accelerator.unwrap_model(trainable), optimizer, done, best)
        if best is not None and best.state is not None:  # every process: the same tensors, as DDP keeps
            accelerator.unwrap_model(trainable).load_state_dict(best.state)
    finally:  # an interrupted run still closes its log with a line per step it ran
        train_log.close()
        bar.close()
        # Not accelerator.end_training(): it also ends the process group, which the trainer still uses.
        for tracker in accelerator.trackers:
            tracker.finish()
    return losses


def check_report_to(report_to: str) -> None:
    """Refuse a tracker whose package is not installed, before a trainer does any work."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise ConfigError(
            f"train.report_to is '{report_to}' but the {report_to} package is not installed; "
            f"pip install {report_to}, or set train.report_to: none"
        )


def start_trackers(accelerator: Accelerator, config: LoopConfig, out_dir: Path) -> None:
    """Open the run's tracker with the config's plain settings as its hyperparameters. W&B writes under
    the run directory and, unless WANDB_MODE says otherwise or a W&B login is there, stays offline: a
    training run never reaches the network unasked (`wandb sync` uploads it later)."""
    settings = {k: v for k, v in to_dict(config).items() if isinstance(v, (bool, int, float, str))}
    init_kwargs = {}
    if config.report_to == "wandb":
        init_kwargs["wandb"] = {"dir": str(out_dir), "name": out_dir.resolve().name}
        if not os.environ.get("WANDB_MODE") and not _wandb_login():
            init_kwargs["wandb"]["mode"] = "offline"
    accelerator.init_trackers(TRACKER_PROJECT, config=settings, init_kwargs=init_kwargs)


def _wandb_login() -> bool:
    """Whether W&B has a key: $WANDB_API_KEY, or the entry `wandb login` writes to ~/.netrc."""
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


def learning_rate(config: LoopConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to zero: a function of the step alone, so resuming is exact."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of `count` items for `epoch`: what makes batches a function of the step."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def process_slice(batch: torch.Tensor, rank: int, world: int, what: str = "items") -> torch.Tensor:
    """Process `rank`'s share of a global batch under `world` processes: its `len(batch) / world`
    consecutive entries, so the processes together run the very batch one process would."""
    if len(batch) % world:
        raise ConfigError(
            f"the global batch of {len(batch)} {what} does not split over {world} processes; set "
            f"train.batch_size to a multiple of {world} (and no more than the training {what})"
        )
    return batch.view(world, -1)[rank]


# --- the run directory -----------------------------------------------------------------------------------


def run_settings(config, data: str, image_root: str | None = None, base: str | Path | None = None) -> dict:
    """What a run is, as `run_config.json` records it: the whole config (a dataclass), the data and image
    root (local paths made absolute, so a resume from another folder still matches) and the base model."""

    def absolute(path):
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path

    return {
        "run": to_dict(config),
        "data": absolute(data),
        "image_root": absolute(image_root),
        "base": absolute(base),
    }


def run_cache_dir(out_dir: str | Path, cache_dir: str | None) -> Path:
    """The run's feature cache: `train.cache_dir`, a relative one taken inside the run directory (as the
    other paths of a run are, not against whatever folder the command was started from), or
    `out_dir/cache`."""
    if cache_dir is None:
        return Path(out_dir) / "cache"
    cache = Path(cache_dir).expanduser()
    return cache if cache.is_absolute() else Path(out_dir) / cache


def check_out_dir(out_dir: str | Path, resume: bool, cache_dir: str | Path | None = None) -> None:
    """Refuse to start a run where it would replace what is there, or to resume one that is not there.

    A fresh run (no `resume`) needs an `out_dir` that is missing, empty, or holds only its feature cache
    (`cache_dir`, which a run that failed while filling it leaves behind and a rerun reuses). Anything else
    (an earlier run's checkpoints and log, a saved model, someone's files) stays as it is: the run is
    refused before any work, and the message gives the ways on. `resume` needs the record of a run
    (`run_config.json`, written once its data was ready), even one killed before its first checkpoint.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out '{out_dir}' is a file, not a directory; give a directory for the run")
    if resume:
        if not (out_dir / RUN_CONFIG).is_file():
            raise ConfigError(
                f"--resume: '{out_dir}' holds no run to continue (no {RUN_CONFIG}); leave out --resume "
                "to start a new run there"
            )
        return
    if not out_dir.is_dir():
        return
    cache = Path(cache_dir).resolve() if cache_dir is not None else None
    held = sorted(
        entry.name
        for entry in out_dir.iterdir()
        if cache is None or not (cache == entry.resolve() or entry.resolve() in cache.parents)
    )
    if not held:
        return
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    if RUN_CONFIG in held:
        raise ConfigError(
            f"--out '{out_dir}' already holds an earlier run ({shown}), which a new run would replace; "
            "continue that run with --resume, or train into another --out (a new or empty directory)"
        )
    raise ConfigError(
        f"--out '{out_dir}' is not empty ({shown}) and holds no run to continue; train into another --out "
        "(a new or empty directory)"
    )


def check_resume(out_dir: str | Path, settings: dict, resume: bool) -> None:
    """Refuse `--resume` of a run whose config, data or base differ from the saved run's; checked before
    any work, so a refused run changes nothing in `out_dir`."""
    saved = Path(out_dir) / RUN_CONFIG
    if resume and saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(settings)):
        raise ConfigError(
            f"--resume with a config, data or base that differs from the one in '{saved}'; use the same "
            "settings, or train into a new --out"
        )


def write_run_config(out_dir: str | Path, settings: dict) -> None:
    """Record what the run is (config, data, base) for `check_resume`; the main process calls this once
    the data is ready, so a run that fails on its data leaves an earlier run's record as it was."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / RUN_CONFIG).write_text(json.dumps(settings, indent=2))


class TrainLog:
    """`train_log.jsonl`, a line per optimiser step. Opened at `start`, it first drops the lines a killed
    run wrote past its last checkpoint, so a resumed run logs each step once. Only the process that
    `writes` (the main one under `accelerate launch`) touches the file; `out_dir` None logs nowhere."""

    def __init__(self, out_dir: Path | None, start: int, writes: bool = True):
        writes = writes and out_dir is not None
        if writes:
            path = out_dir / TRAIN_LOG
            out_dir.mkdir(parents=True, exist_ok=True)
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start]
                path.write_text("".join(line + "\n" for line in kept))
        self.file = (out_dir / TRAIN_LOG).open("a") if writes else open(os.devnull, "w")

    def write(self, step: int, loss: float, lr: float) -> None:
        self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")
        # Flushed per line: a killed run (SIGKILL, out of memory) runs no `finally`, and its log must
        # still hold every step it ran.
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def save_checkpoint(
    out_dir: Path,
    trainable: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    best: BestCheckpoint | None = None,
) -> None:
    """The trained tensors and the optimiser state after `step` updates, written to a temporary directory
    and renamed into place, so a kill mid-write leaves the previous checkpoints intact. With `best`, the
    best step's tensors so far (`best.safetensors`) and its record go along."""
    directory = out_dir / CHECKPOINTS / f"step-{step:07d}"
    temporary = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in trainable.state_dict().items()},
        temporary / "head.safetensors",
    )
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, values in state["state"].items()
        for name, value in values.items()
    }
    save_file(tensors, temporary / "optimizer.safetensors")
    trainer_state = {"step": step, "param_groups": state["param_groups"]}
    if best is not None and best.state is not None:
        save_file(best.state, temporary / "best.safetensors")
        trainer_state["best"] = best.record()
    (temporary / "trainer_state.json").write_text(json.dumps(trainer_state))
    shutil.rmtree(directory, ignore_errors=True)
    temporary.rename(directory)


def load_checkpoint(
    out_dir: Path, trainable: nn.Module, optimizer: torch.optim.Optimizer, best: BestCheckpoint | None = None
) -> int:
    """Restore the newest checkpoint (and into `best`, the best step so far it holds); returns its step
    (0 when there is none to resume from)."""
    checkpoints = sorted((out_dir / CHECKPOINTS).glob("step-???????"))
    if not checkpoints:
        log.warning("--resume: no checkpoint in '%s'; starting from step 0", out_dir / CHECKPOINTS)
        return 0
    latest = checkpoints[-1]
    trainable.load_state_dict(read_safetensors(latest / "head.safetensors"))
    trainer_state = json.loads((latest / "trainer_state.json").read_text())
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in read_safetensors(latest / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        per_parameter.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_parameter, "param_groups": trainer_state["param_groups"]})
    if best is not None and "best" in trainer_state:
        best.restore(trainer_state["best"], read_safetensors(latest / "best.safetensors"))
    log.info("resumed from %s", latest)
    return trainer_state["step"]


def steps_for_epochs(epochs: float, items: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimiser updates that pass `epochs` times over `items` training items in batches of `batch_size`
    (capped at `items`, as a batch is), `grad_accum` batches an update: ceil(epochs x items / batch)."""
    per_step = min(batch_size, items) * grad_accum
    return max(1, math.ceil(epochs * items / per_step - 1e-9))  # 3 epochs of 100 in 10s: 30, not 31


def with_epochs(config, items: int, what: str):
    """`config` (a TrainConfig or VLMTrainConfig) with `steps` decided by its `epochs` over `items`
    training `what` (logged), or as it is when `epochs` is unset."""
    if config.epochs is None:
        return config
    steps = steps_for_epochs(config.epochs, items, config.batch_size, config.grad_accum)
    log.info(
        "train.epochs %g over %d training %s in batches of %d x %d: %d steps (train.steps unused)",
        config.epochs,
        items,
        what,
        min(config.batch_size, items),
        config.grad_accum,
        steps,
    )
    return dataclasses.replace(config, steps=steps)


class BestCheckpoint:
    """The trained tensors of the step that scored best on held-out `metric` (higher is better, or lower
    with `lower_is_better`, as for a loss; the earlier step wins a tie), as transformers' Trainer keeps
    with `load_best_model_at_end`, and the metrics of the last step evaluated, to report both."""

    def __init__(self, metric: str, lower_is_better: bool = False):
        self.metric = metric
        self.sign = -1.0 if lower_is_better else 1.0
        self.step: int | None = None
        self.metrics: dict[str, float] = {}
        self.state: dict[str, torch.Tensor] | None = None
        self.last_step: int | None = None
        self.last_metrics: dict[str, float] = {}

    def offer(self, step: int, metrics: dict[str, float], trainable: nn.Module) -> None:
        if self.metric not in metrics:
            raise ConfigError(
                f"train.best_metric '{self.metric}' is not among the held-out metrics "
                f"({', '.join(metrics)}); choose one of those"
            )
        self.last_step, self.last_metrics = step, dict(metrics)
        if self.step is None or self.sign * metrics[self.metric] > self.sign * self.metrics[self.metric]:
            self.step, self.metrics = step, dict(metrics)
            self.state = {k: v.detach().cpu().clone() for k, v in trainable.state_dict().items()}

    def record(self) -> dict:
        """What a checkpoint keeps besides the tensors."""
        return {
            "step": self.step,
            "metrics": self.metrics,
            "last_step": self.last_step,
            "last_metrics": self.last_metrics,
        }

    def restore(self, record: dict, state: dict[str, torch.Tensor]) -> None:
        self.step, self.metrics, self.state = record["step"], record["metrics"], state
        self.last_step, self.last_metrics = record["last_step"], record["last_metrics"]

    def report(self) -> dict:
        """The saved bridge's held-out metrics (the best step's), which step that was, and the last
        step's figure of the same metric: what metrics.json records."""
        return {
            **self.metrics,
            "best_metric": self.metric,
            "best_step": self.step,
            "last_step": self.last_step,
            f"last_{self.metric}": self.last_metrics.get(self.metric),
        }
