"""The LLM route at real scale and on small data: `train-vlm` from webdataset shards of LLaVA conversations
(1 and 2 processes), `train.epochs`, the best held-out step kept, and `train.cache: false`.

Tiny models from configs (tests/test_vlm.py, tests/test_vlm_scale.py) and shards of synthetic scenes
written here as img2dataset writes them, with a corrupt image, a sample without conversations and one
whose turns have no answer among them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import training.vlm
from bridge.cli import main
from bridge.config import VLMRunConfig, to_dict
from bridge.model import read_safetensors
from bridge.synthetic import SyntheticWorld
from bridge.vlm import VisionLLM
from tests.test_distributed import accelerate_launch
from tests.test_shards import image_bytes, write_tars
from tests.test_vlm import tiny_vlm
from tests.test_vlm_scale import logged_losses, tiny_vlm_run
from training.data import CAPTION_PROMPT, IMAGE_PLACEHOLDER
from training.loop import CHECKPOINTS
from training.vlm import prepare_conversations, train_vlm

QUESTIONS, CAPTIONS = 18, 2  # good samples: LLaVA conversations, and captioned images (8 + 2 in shard 1)
GOOD = QUESTIONS + CAPTIONS
# The bad samples, in the second shard, and the reason each is reported with.
BAD = {
    "corrupt": "truncated",
    "noconversation": 'no conversations (a .json member with a LLaVA "conversations" list)',
    "noanswer": "conversations: has no gpt/assistant turn",
}
# Of the 21 conversations read (the corrupt image's among them), a tenth (2) is held out by default; the
# corrupt one falls in training, so 18 good ones train: 3 batches of 6 an epoch.
HELD_OUT, BATCH = 2, 6


def llava(question: str, answer: str) -> bytes:
    turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"}, {"from": "gpt", "value": answer}]
    return json.dumps({"id": "x", "conversations": turns}).encode()


def write_conversation_shards(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Two shards of synthetic scenes: JPEG + LLaVA .json in the first; PNG + .json, JPEG + .txt caption and
    the BAD samples in the second. Returns each good sample's origin ("shard:key") -> its turns."""
    scenes = SyntheticWorld(0, image_size=56).scenes(0, GOOD + 1)
    members: list[list[tuple[str, bytes]]] = [[], []]
    turns = {}
    for index, scene in enumerate(scenes[:GOOD]):
        key, number = f"{index:08d}", index // 10
        if index >= QUESTIONS:  # a captioned image: a "Describe the image." conversation
            caption = scene.captions(1)[0]
            members[number] += [
                (f"{key}.jpg", image_bytes(scene.render(), "JPEG")),
                (f"{key}.txt", caption.encode()),
            ]
            turns[(number, key)] = [
                ("user", f"{IMAGE_PLACEHOLDER}\n{CAPTION_PROMPT}"),
                ("assistant", caption),
            ]
            continue
        question, answer, _ = scene.questions()[index % len(scene.questions())]
        encoding, extension = ("JPEG", "jpg") if number == 0 else ("PNG", "png")
        image = (f"{key}.{extension}", image_bytes(scene.render(), encoding))
        members[number] += [image, (f"{key}.json", llava(question, answer))]
        turns[(number, key)] = [("user", f"{IMAGE_PLACEHOLDER}\n{question}"), ("assistant", answer)]
    photo = image_bytes(scenes[-1].render(), "JPEG")
    only_asked = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nWhat is this?"}]
    members[1] += [
        ("corrupt.jpg", photo[: len(photo) // 2]),
        ("corrupt.json", llava("What colour is the circle?", "red")),
        ("noconversation.jpg", photo),
        ("noconversation.json", b'{"url": "http://example.com/a.jpg"}'),
        ("noanswer.jpg", photo),
        ("noanswer.json", json.dumps({"conversations": only_asked}).encode()),
    ]
    shards = write_tars(folder, members)
    return {f"{shards[number]}:{key}": sample for (number, key), sample in turns.items()}


def shard_run(tmp_path: Path, cache_folder: str, **train) -> VLMRunConfig:
    """Stage 2 with LoRA on the tiny VLM, the default held-out split, held-out loss every 2 steps."""
    settings = {
        "held_out": None,
        "batch_size": BATCH,
        "eval_every": 2,
        "cache_dir": str(tmp_path / cache_folder),
    }
    return tiny_vlm_run(tmp_path, **(settings | train))


def config_file(tmp_path: Path, config: VLMRunConfig, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def reported(printed: str, key: str) -> list[str]:
    """The lines `train-vlm` printed about the bad sample `key` of the second shard."""
    return [line for line in printed.splitlines() if f"00001.tar:{key}: " in line]


def record_batches(monkeypatch) -> list[list[str]]:
    """The origins of the conversations each micro-batch trains on, as training draws them."""
    seen: list[list[str]] = []
    real = training.vlm.backward_batch

    def recording(trainable, data, indices, *args):
        seen.append([data.conversations[int(i)].conversation.origin for i in indices])
        return real(trainable, data, indices, *args)

    monkeypatch.setattr(training.vlm, "backward_batch", recording)
    return seen


def record_held_out_losses(monkeypatch, script: list[float] | None = None) -> list[float]:
    """Each held-out loss training measures, in order; with `script`, those figures stand in for them."""
    measured: list[float] = []
    real = training.vlm.held_out_loss

    def recording(model, data, batch_size=32):
        measured.append(script[len(measured)] if script else real(model, data, batch_size))
        return measured[-1]

    monkeypatch.setattr(training.vlm, "held_out_loss", recording)
    return measured


def trained_tensors(out: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """The projector and LoRA weights of the saved model, or of checkpoint `step`, by the checkpoint's
    names (TrainableParts: `projector.*`, `llm.<name with . as __>`)."""
    if step is not None:
        return read_safetensors(out / CHECKPOINTS / f"step-{step:07d}" / "head.safetensors")
    model = VisionLLM.from_pretrained(out)
    tensors = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    lora = model.llm.named_parameters()
    return tensors | {"llm." + n.replace(".", "__"): p.detach() for n, p in lora if "lora_" in n}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 4
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# --- reading the shards -----------------------------------------------------------------------------------


def test_conversation_shards_give_each_good_sample_once_and_name_the_bad_ones(tmp_path, monkeypatch):
    good = write_conversation_shards(tmp_path / "shards")
    config = shard_run(tmp_path, "cache").train
    model = tiny_vlm()
    spec = str(tmp_path / "shards" / "{00000..00001}.tar")
    train, held_out, skipped = prepare_conversations(model, spec, config, tmp_path / "cache", progress=False)

    def origins(data) -> list[str]:
        return [item.conversation.origin for item in data.conversations]

    assert len(origins(held_out)) == HELD_OUT and len(origins(train)) == GOOD - HELD_OUT
    assert sorted(origins(train) + origins(held_out)) == sorted(good)  # each once, none of the bad ones
    read = [item.conversation for item in train.conversations + held_out.conversations]
    assert all(conversation.turns == good[conversation.origin] for conversation in read)
    # The captioned images asked for their caption, as caption files are.
    assert [c.kind for c in read].count("caption") == CAPTIONS
    second = str(tmp_path / "shards" / "00001.tar")
    reported = dict(skipped)
    assert set(reported) == {f"{second}:{key}" for key in BAD}, reported
    for key, reason in BAD.items():
        assert reason in reported[f"{second}:{key}"], reported

    # A brace range, a list file and the folder are the same shards; runs after the first read the
    # manifest beside the features, not the shards.
    def no_reading(url, label):
        raise AssertionError(f"read shard {url} again")

    monkeypatch.setattr("training.shards._shard_records", no_reading)
    listing = tmp_path / "shards.txt"
    listing.write_text("shards/00000.tar\nshards/00001.tar\n")
    for again in (str(listing), str(tmp_path / "shards")):
        train_again, _, skipped_again = prepare_conversations(
            model, again, config, tmp_path / "cache", progress=False
        )
        assert origins(train_again) == origins(train) and skipped_again == skipped


def test_shards_with_the_encoder_in_the_loop_are_refused_before_any_work(tmp_path):
    write_conversation_shards(tmp_path / "shards")
    config = shard_run(tmp_path, "cache", cache=False)
    with pytest.raises(ValueError, match="read through the feature cache; train.cache: false takes file"):
        train_vlm(config, str(tmp_path / "shards"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# --- training from them: epochs, every sample once an epoch, the best step kept, N processes ------------------


def test_train_vlm_from_shards_for_two_epochs_sees_each_sample_once_an_epoch_and_keeps_the_best_step(
    tmp_path, monkeypatch, capsys
):
    good = write_conversation_shards(tmp_path / "shards")
    batches = record_batches(monkeypatch)
    measured = record_held_out_losses(monkeypatch)
    path = config_file(tmp_path, shard_run(tmp_path, "one", epochs=2), "one")
    out = tmp_path / "run"
    assert (
        main(["train-vlm", "--config", str(path), "--data", str(tmp_path / "shards"), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    # 2 epochs of 18 training conversations in batches of 6: 6 steps, an epoch every 3.
    assert "train.epochs 2: 6 steps" in printed
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [
        *range(1, 7)
    ]
    trained = sorted(batches[0] + batches[1] + batches[2])
    assert len(trained) == GOOD - HELD_OUT and set(trained) < set(good)
    assert sorted(batches[3] + batches[4] + batches[5]) == trained  # the same ones, again once each
    for key, reason in BAD.items():
        assert len(reported(printed, key)) == 1 and reason in reported(printed, key)[0], printed
    # Held-out loss at steps 2, 4 and 6; the lowest one's step (the earlier of a tie) is the one saved.
    assert len(measured) == 3
    best_step = 2 * (measured.index(min(measured)) + 1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["best_metric"], metrics["best_step"], metrics["loss"]) == (
        "loss",
        best_step,
        min(measured),
    )
    assert (metrics["last_step"], metrics["last_loss"]) == (6, measured[-1])
    assert f"kept step {best_step} of 6, the best held-out loss ({min(measured):.4f})" in printed
    assert_same_tensors(trained_tensors(out), trained_tensors(out, best_step))


def test_a_run_whose_held_out_loss_is_lowest_early_saves_that_step(tmp_path, monkeypatch):
    record_held_out_losses(monkeypatch, script=[2.0, 0.5, 1.0])  # steps 2, 4, 6: lowest at 4
    _, result = train_vlm(
        shard_run(tmp_path, "cache", steps=6), "synthetic:24", tmp_path / "run", progress=False
    )
    assert (result.best["best_step"], result.best["loss"], result.best["last_loss"]) == (4, 0.5, 1.0)
    assert_same_tensors(trained_tensors(tmp_path / "run"), trained_tensors(tmp_path / "run", 4))
    step_4, step_6 = (trained_tensors(tmp_path / "run", step) for step in (4, 6))
    assert not torch.equal(step_4["projector.mlp.0.weight"], step_6["projector.mlp.0.weight"])
    # best_metric none: the last step, whatever the held-out loss said.
    record_held_out_losses(monkeypatch, script=[2.0, 0.5, 1.0])
    config = shard_run(tmp_path, "cache", steps=6, best_metric="none")
    _, last = train_vlm(config, "synthetic:24", tmp_path / "last", progress=False)
    assert last.best == {} and "best_step" not in json.loads((tmp_path / "last" / "metrics.json").read_text())
    assert_same_tensors(trained_tensors(tmp_path / "last"), trained_tensors(tmp_path / "last", 6))


def test_steps_and_epochs_together_are_refused_in_one_line(tmp_path, capsys):
    path = config_file(tmp_path, shard_run(tmp_path, "cache", epochs=2), "run")
    args = ["train-vlm", "--config", str(path), "--data", "synthetic:8", "--out", str(tmp_path / "o")]
    assert main([*args, "--steps", "5"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--steps 5 and train.epochs 2 both say how long to train" in error and len(error.splitlines()) == 1


def test_two_processes_train_vlm_from_shards_as_one_process_does(tmp_path):
    # A 2-process `accelerate launch`: 16 s on the 2-core build machine, so in the default suite.
    write_conversation_shards(tmp_path / "shards")
    spec = str(tmp_path / "shards" / "{00000..00001}.tar")
    # Separate caches: the 2-process run streams the shards itself (its main process), the other reads.
    config = shard_run(tmp_path, "one", epochs=2)
    _, single = train_vlm(config, spec, tmp_path / "one", progress=False)
    two = config_file(tmp_path, shard_run(tmp_path, "two", epochs=2), "two")
    printed = accelerate_launch(
        2, "train-vlm", "--config", str(two), "--data", spec, "--out", "b", cwd=tmp_path
    )
    # Same conversations, same global batches of 6 (3 a process): the same loss at every step.
    assert max(abs(a - b) for a, b in zip(single.losses, logged_losses(tmp_path / "b"), strict=True)) < 1e-4
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["best_step"] == single.best["best_step"]
    # The main process alone reports the run, the bad samples once.
    assert printed.count("skipped 3 unreadable") == 1 and printed.count("saved the VisionLLM") == 1, printed
    for key, reason in BAD.items():
        lines = reported(printed, key)
        assert len(lines) == 1 and reason in lines[0], printed


# --- train.cache: false -----------------------------------------------------------------------------------------


def test_training_without_a_cache_follows_the_cached_loss_curve(tmp_path):
    cached_config = shard_run(tmp_path, "cache", steps=8, held_out=4, eval_every=4, lr=3e-3)
    _, cached = train_vlm(cached_config, "synthetic:24", tmp_path / "cached", progress=False)
    encoded_config = shard_run(tmp_path, "nocache", steps=8, held_out=4, eval_every=4, lr=3e-3, cache=False)
    _, encoded = train_vlm(encoded_config, "synthetic:24", tmp_path / "encoded", progress=False)
    assert (tmp_path / "cache").is_dir() and not (tmp_path / "nocache").exists()
    assert not (tmp_path / "encoded" / "cache").exists()
    # The same batches (a function of seed and step), so the same curve up to the cache's float16 rounding
    # of each feature: measured 6e-6 at most in losses near 3.9; another batch order (seed 1) moves the
    # same losses by 0.004 to 0.19.
    difference = (torch.tensor(encoded.losses) - torch.tensor(cached.losses)).abs()
    assert difference.max() < 1e-4, difference
    assert difference.max() > 0  # the features were encoded anew, not read from a float16 cache
    assert encoded.best["best_step"] == cached.best["best_step"]
