"""Scale-out under `accelerate launch`: 2 CPU processes (gloo) give what 1 process gives.

Each test starts a real `accelerate launch --multi_gpu --num_processes 2` (on a machine without a GPU,
accelerate joins the processes with gloo) and compares its output with a 1-process run of the same job.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bridge.config import RunConfig, load_config, to_dict
from bridge.index import ImageIndex
from bridge.model import TextBridge
from tests.conftest import tiny_bridge_config
from tests.test_index import BAD_FILES, by_path, make_photos
from training.align import train_text_bridge

REPO = Path(__file__).resolve().parents[1]


def accelerate_launch(processes: int, *command: str, cwd: Path) -> str:
    """`accelerate launch` of `python -m bridge.cli *command` on `processes` CPU processes: its stdout."""
    with socket.socket() as probe:  # a free port, so parallel runs never collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    launch += ["--multi_gpu", "--num_processes", str(processes), "-m", "bridge.cli", *command]
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(launch, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def tiny_run_config(tmp_path: Path) -> Path:
    config = RunConfig(bridge=tiny_bridge_config(width=32, num_heads=2))
    train = config.train
    train.steps, train.batch_size, train.held_out, train.lr, train.warmup_steps = 12, 32, 16, 1e-2, 2
    train.eval_every, train.checkpoint_every = 0, 6
    train.cache_dir = str(tmp_path / "cache")  # shared: the 2-process run reads what the 1-process one made
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def test_two_process_training_matches_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    config_file = tiny_run_config(tmp_path)
    _, single = train_text_bridge(load_config(config_file), "synthetic:128", tmp_path / "one", progress=False)
    accelerate_launch(
        2, "train", "--config", str(config_file), "--data", "synthetic:128", "--out", "two", cwd=tmp_path
    )
    logged = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 13))  # one log, written by one process
    # Same global batch of 32 (16 a process), same seed: the same loss at every step, to float rounding.
    two = [entry["loss"] for entry in logged]
    assert max(abs(a - b) for a, b in zip(single.losses, two, strict=True)) < 1e-4
    assert single.losses[-1] < single.losses[0] - 0.1  # and it did train
    one_bridge = TextBridge.from_pretrained(tmp_path / "one")
    two_bridge = TextBridge.from_pretrained(tmp_path / "two")
    for (name, a), (_, b) in zip(
        one_bridge.projector.state_dict().items(), two_bridge.projector.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"projector weight {name}")


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(tmp_path: Path) -> None:
    from training.loop import process_slice

    with pytest.raises(
        ValueError, match="33 images does not split over 2 processes; set train.batch_size to a multiple of 2"
    ):
        process_slice(torch.arange(33), 0, 2, "images")


def test_two_process_index_equals_the_one_process_index_and_so_does_its_update(
    tmp_path: Path, tiny_bridge
) -> None:
    folder, model_dir = tmp_path / "photos", tmp_path / "model"
    names = make_photos(folder, 13)
    (folder / "cut.jpg").write_bytes(BAD_FILES["cut.jpg"][0])
    tiny_bridge.save_pretrained(model_dir)

    def index_both() -> str:
        """Index (or update) with 1 process here and 2 under accelerate; check they agree; the 2's report."""
        one = ImageIndex.build(folder, tiny_bridge, tmp_path / "one", workers=0, progress=False)
        command = ["index", str(folder), "--model", str(model_dir), "--out", str(tmp_path / "two")]
        printed = accelerate_launch(2, *command, "--workers", "0", cwd=tmp_path)
        two = ImageIndex.load(tmp_path / "two", tiny_bridge)
        # The same files with the same records (rows come in another order: each process's shards in turn).
        assert sorted(two.paths) == sorted(one.paths) and len(set(two.paths)) == len(two.paths)
        assert {p: two.store.record(p) for p in two.paths} == {p: one.store.record(p) for p in one.paths}
        # Each process embeds every other file, so batches differ: equal to float16 rounding.
        expected, found = by_path(one), by_path(two)
        for path in one.paths:
            for space in (0, 1):
                np.testing.assert_allclose(found[path][space], expected[path][space], atol=2e-3, err_msg=path)
        assert not [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("part-")]
        # One summary of the whole run, printed once, with the failure the other process met.
        assert printed.count(f"failed: {folder / 'cut.jpg'}: ") == 1, printed
        return printed

    assert "indexed 13, unchanged 0, removed 0, failed 1" in index_both()
    make_photos(folder, 2, first_seed=100)  # two new files
    (folder / names[0]).unlink()  # one deleted
    noise = np.random.default_rng(7).integers(0, 256, (36, 48, 3), np.uint8)
    Image.fromarray(noise).save(folder / names[1])  # one changed
    assert "indexed 3, unchanged 11, removed 1, failed 1" in index_both()
