"""The LLM route at scale: N processes equal one, steps are updates whatever grad_accum is, half-precision
loading, gradient checkpointing, and QLoRA's refusal on a CPU.

Tiny models from configs (tests/test_vlm.py) and synthetic conversations; the N-process tests start a real
`accelerate launch --multi_gpu --num_processes 2` (gloo on a CPU), as tests/test_distributed.py does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from bridge.cli import main
from bridge.config import (
    ConfigError,
    LoraSettings,
    RunConfig,
    VLMRunConfig,
    VLMTrainConfig,
    load_config,
    to_dict,
)
from bridge.model import TextBridge
from bridge.vlm import VisionLLM
from tests.test_distributed import accelerate_launch, tiny_run_config
from tests.test_vlm import tiny_vlm, tiny_vlm_config
from training import align, vlm
from training.data import synthetic_conversations
from training.loop import CHECKPOINTS, TRAIN_LOG, process_slice
from training.vlm import ConversationData, TrainableParts, check_engine, set_stage, train_vlm, training_inputs


def logged_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / TRAIN_LOG).read_text().splitlines()]


def trained_tensors(model: VisionLLM) -> dict[str, torch.Tensor]:
    """The projector and the LoRA weights: what stage 2 trains."""
    tensors = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    return tensors | {k: v.detach() for k, v in model.llm.named_parameters() if "lora_" in k}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float) -> None:
    assert a.keys() == b.keys() and len(a) > 4
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tolerance, rtol=tolerance, msg=name)


def tiny_vlm_run(tmp_path: Path, **train) -> VLMRunConfig:
    """Stage 2 with LoRA on the tiny VLM; the feature cache shared by every run of a test."""
    config = VLMRunConfig(vlm=tiny_vlm_config())
    config.vlm.lora = LoraSettings(r=4)
    settings = {"stage": 2, "steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "held_out": 0}
    settings |= {"checkpoint_every": 2, "cache_dir": str(tmp_path / "cache")} | train
    config.train = VLMTrainConfig(**settings)
    return config


# --- N processes -------------------------------------------------------------------------------------------


def one_process_run(tmp_path: Path) -> tuple[list[str], VisionLLM]:
    """The tiny stage-2 run in this process, and the train-vlm command that runs it from a file."""
    config_file = tmp_path / "vlm.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(tiny_vlm_run(tmp_path))))
    one, _ = train_vlm(
        load_config(config_file, VLMRunConfig), "synthetic:16", tmp_path / "one", progress=False
    )
    return ["train-vlm", "--config", str(config_file), "--data", "synthetic:16"], one


def test_two_process_train_vlm_equals_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    command, one = one_process_run(tmp_path)
    accelerate_launch(2, *command, "--out", "two", cwd=tmp_path)
    two_dir = tmp_path / "two"
    # One set of files, written by one process: the same as one process writes, a log line per step.
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert [json.loads(line)["step"] for line in (two_dir / TRAIN_LOG).read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    # Same global batch of 4 (2 a process), same seed: the same loss at every step and the same weights
    # (Adam hides a gradient off by a constant factor from the losses, not from the weights).
    single, double = logged_losses(tmp_path / "one"), logged_losses(two_dir)
    assert max(abs(a - b) for a, b in zip(single, double, strict=True)) < 1e-4
    assert single[-1] < single[0]  # and it did train
    assert_same_tensors(trained_tensors(one), trained_tensors(VisionLLM.from_pretrained(two_dir)), 1e-4)


@pytest.mark.slow  # a second `accelerate launch` (30 s to 2 minutes on the 2-core build machine)
def test_two_process_resume_continues_the_same_curve(tmp_path: Path) -> None:
    command, one = one_process_run(tmp_path)
    # A run killed after its step-2 checkpoint (the 1-process run's, cut back), resumed under 2 processes:
    # steps 3 and 4 run again on the very same curve, to the same weights.
    shutil.copytree(tmp_path / "one", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / CHECKPOINTS / "step-0000004")
    accelerate_launch(2, *command, "--out", "killed", "--resume", cwd=tmp_path)
    single, resumed = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "killed")
    assert len(resumed) == 4 and max(abs(a - b) for a, b in zip(single, resumed, strict=True)) < 1e-4
    killed = VisionLLM.from_pretrained(tmp_path / "killed")
    assert_same_tensors(trained_tensors(one), trained_tensors(killed), 1e-4)


def test_a_slice_of_the_global_batch_per_process_and_a_batch_that_does_not_split_is_refused() -> None:
    batch = torch.arange(8)
    assert torch.cat([process_slice(batch, rank, 4) for rank in range(4)]).tolist() == batch.tolist()
    with pytest.raises(ConfigError, match="set train.batch_size to a multiple of 3"):
        process_slice(batch, 0, 3, "conversations")


def test_engines_that_shard_the_trained_parts_are_refused_with_the_alternatives(monkeypatch) -> None:
    check_engine()  # DDP, or one process: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="does not run under FSDP.*deepspeed-zero2.yaml"):
        check_engine()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="ZeRO-3.*use ZeRO-2"):
        check_engine()


# --- steps are optimiser updates: killed mid-accumulation, resumed exactly ------------------------------------


def kill_at(module, name: str, micro_batch: int, monkeypatch) -> None:
    """Make `module.name(..., batch number, ...)` raise on micro-batch `micro_batch`: a run killed there."""
    original = getattr(module, name)

    def dying(*args, **kwargs):
        if micro_batch in args:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


def test_llm_route_grad_accum_3_resumed_after_a_kill_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    config = tiny_vlm_run(tmp_path, steps=5, grad_accum=3, checkpoint_every=2)
    whole, _ = train_vlm(config, "synthetic:16", tmp_path / "whole", progress=False)
    with monkeypatch.context() as patch:
        kill_at(vlm, "batch_indices", 3 * 3 + 1, patch)  # inside update 4, after the step-2 checkpoint
        with pytest.raises(KeyboardInterrupt):
            train_vlm(config, "synthetic:16", tmp_path / "killed", progress=False)
    assert sorted(p.name for p in (tmp_path / "killed" / CHECKPOINTS).iterdir()) == ["step-0000002"]
    resumed, result = train_vlm(config, "synthetic:16", tmp_path / "killed", resume=True, progress=False)
    whole_losses = logged_losses(tmp_path / "whole")
    assert result.losses == pytest.approx(whole_losses[2:], abs=1e-6)
    assert logged_losses(tmp_path / "killed") == pytest.approx(whole_losses, abs=1e-6)
    assert_same_tensors(trained_tensors(whole), trained_tensors(resumed), 1e-6)


def test_text_route_grad_accum_3_resumed_after_a_kill_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    config = load_config(tiny_run_config(tmp_path), RunConfig)
    config.train.steps, config.train.grad_accum, config.train.checkpoint_every = 5, 3, 2
    config.train.batch_size, config.train.eval_every = 16, 0
    whole, _ = align.train_text_bridge(config, "synthetic:64", tmp_path / "whole", progress=False)
    with monkeypatch.context() as patch:
        kill_at(align, "sample_batch", 3 * 3 + 1, patch)
        with pytest.raises(KeyboardInterrupt):
            align.train_text_bridge(config, "synthetic:64", tmp_path / "killed", progress=False)
    assert sorted(p.name for p in (tmp_path / "killed" / CHECKPOINTS).iterdir()) == ["step-0000002"]
    _, result = align.train_text_bridge(
        config, "synthetic:64", tmp_path / "killed", resume=True, progress=False
    )
    whole_losses = logged_losses(tmp_path / "whole")
    assert result.losses == pytest.approx(whole_losses[2:], abs=1e-6)
    assert logged_losses(tmp_path / "killed") == pytest.approx(whole_losses, abs=1e-6)
    resumed = TextBridge.from_pretrained(tmp_path / "killed")
    for name, value in whole.projector.state_dict().items():
        torch.testing.assert_close(
            resumed.projector.state_dict()[name], value, atol=1e-6, rtol=1e-6, msg=name
        )


# --- precision and memory ------------------------------------------------------------------------------------


def test_bf16_loading_keeps_the_frozen_base_bf16_and_trains_float32_parts(tmp_path: Path) -> None:
    config = tiny_vlm_run(tmp_path, steps=2, precision="bf16")
    model, result = train_vlm(config, "synthetic:8", tmp_path / "run", progress=False)
    dtypes = {name: p.dtype for name, p in model.llm.named_parameters()}
    assert {dtypes[n] for n in dtypes if "lora_" in n} == {torch.float32}
    assert {dtypes[n] for n in dtypes if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.projector.parameters()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
    # The saved adapters reload onto a bf16 base as float32 again.
    again = VisionLLM.from_pretrained(tmp_path / "run", dtype=torch.bfloat16)
    assert_same_tensors(trained_tensors(model), trained_tensors(again), 0)


def test_gradient_checkpointing_recomputes_the_llm_and_gives_the_same_loss_and_gradients(tmp_path) -> None:
    model = tiny_vlm(lora=True)
    data = ConversationData.prepare(model, synthetic_conversations(4), tmp_path / "cache", progress=False)
    set_stage(model, 2)
    trainable = TrainableParts(model).train()
    model.train()
    inputs = training_inputs(model, data, range(4))
    layer_runs = []
    # The layer's first module: a recomputation stops once it has what the backward pass needs.
    model.llm.get_decoder().layers[0].input_layernorm.register_forward_hook(lambda *_: layer_runs.append(1))

    def loss_and_gradients() -> tuple[float, dict[str, torch.Tensor]]:
        trainable.zero_grad()
        layer_runs.clear()
        loss = trainable(**inputs)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in trainable.named_parameters()}

    plain_loss, plain = loss_and_gradients()
    assert len(layer_runs) == 1
    model.enable_gradient_checkpointing()
    loss, checkpointed = loss_and_gradients()
    assert len(layer_runs) == 2  # the layer ran again in the backward pass: its activations were not kept
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert any("lora_" in name for name in plain)
    assert_same_tensors(plain, checkpointed, 1e-5)


def test_qlora_on_a_cpu_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys) -> None:
    config = tiny_vlm_run(tmp_path, quantization="4bit")
    (tmp_path / "vlm.yaml").write_text(yaml.safe_dump(to_dict(config)))
    out = tmp_path / "run"
    args = ["train-vlm", "--config", str(tmp_path / "vlm.yaml"), "--data", "synthetic:8", "--out", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert (
        "train.quantization '4bit' (QLoRA) needs a CUDA GPU" in error
        and "set train.quantization: none" in error
    )
    assert len(error.splitlines()) == 1 and not out.exists()
