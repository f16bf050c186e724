"""LLM-route training: LLaVA JSON data, answer-only labels, frozen weights, resume, and the CLI verbs.

Tiny models from configs (tests/test_vlm.py) and data made in the test; a few steps each.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml

from bridge.cli import main
from bridge.config import VLMRunConfig, VLMTrainConfig, load_config, to_dict
from bridge.offline_llm import build_tokenizer
from bridge.synthetic import SyntheticWorld
from bridge.vlm import VisionLLM
from tests.conftest import TINY_DINOV2
from tests.test_recipes import DINOV2_PROCESSOR
from tests.test_vlm import TINY_LLAMA, tiny_vlm, tiny_vlm_config
from training.data import DataError, load_conversations, synthetic_conversations
from training.vlm import (
    IGNORE,
    ConversationData,
    batch_indices,
    encode_conversation,
    fewest_padding_runs,
    fit_vlm,
    frozen_state,
    training_batch,
)


@pytest.fixture(scope="module")
def scenes_56():
    return [scene.render() for scene in SyntheticWorld(0, image_size=56).scenes(0, 2)]


def write_llava_json(folder, entries) -> str:
    world = SyntheticWorld(0, image_size=56)
    for i in range(3):
        world.scene(i).render().save(folder / f"scene{i}.png")
    path = folder / "llava.json"
    path.write_text(json.dumps(entries))
    return str(path)


LLAVA_ENTRIES = [
    {
        "id": "a",
        "image": "scene0.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the star?"},
            {"from": "gpt", "value": "blue"},
            {"from": "human", "value": "Where is the star?"},
            {"from": "gpt", "value": "top left"},
        ],
    },
    {
        "id": "b",
        "image": ["scene1.png", "scene2.png"],
        "conversations": [
            {"from": "human", "value": "<image> <image>\nHow many objects are there?"},
            {"from": "gpt", "value": "three"},
        ],
    },
]


def test_llava_json_multi_turn_and_multi_image(tmp_path):
    conversations = load_conversations(write_llava_json(tmp_path, LLAVA_ENTRIES))
    assert [len(c.images) for c in conversations] == [1, 2]
    assert [role for role, _ in conversations[0].turns] == ["user", "assistant", "user", "assistant"]
    assert conversations[1].images[1].endswith("scene2.png")


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {
                "image": "scene0.png",
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
            },
            "1 image.* but 0 <image> placeholder",
        ),
        (
            {"image": "gone.png", "conversations": [{"from": "human", "value": "<image>"}]},
            "image 'gone.png' not found",
        ),
        (
            {"image": "scene0.png", "conversations": [{"from": "human", "value": "<image>"}]},
            "no gpt/assistant turn",
        ),
        ({"conversations": [{"from": "robot", "value": "x"}]}, 'turn 0: needs "from"'),
    ],
)
def test_bad_llava_entries_are_named(tmp_path, entry, message):
    with pytest.raises(DataError, match=f"entry 0.*{message}|{message}"):
        load_conversations(write_llava_json(tmp_path, [entry]))


def test_loss_only_on_answer_tokens(tmp_path):
    model = tiny_vlm()
    conversation = load_conversations(write_llava_json(tmp_path, LLAVA_ENTRIES))[0]
    ids, labels = encode_conversation(model, conversation.turns)
    learnt = [token for token, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert model.tokenizer.decode(learnt) == "blue <|end|> top left <|end|>"
    assert model.tokenizer.decode(ids).startswith("<|user|> <image> what colour is the star ?")
    data = ConversationData.prepare(model, [conversation], tmp_path / "cache", progress=False)
    batch = training_batch(model, data, [0])
    image_positions = batch["input_ids"][0] == model.image_token_id
    assert int(image_positions.sum()) == model.tokens_per_image()
    assert (batch["labels"][0][image_positions] == IGNORE).all()


def test_conversations_with_unreadable_images_are_skipped_with_the_reason(tmp_path):
    path = write_llava_json(tmp_path, LLAVA_ENTRIES)
    (tmp_path / "scene2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    model = tiny_vlm()
    data = ConversationData.prepare(model, load_conversations(path), tmp_path / "cache", progress=False)
    assert len(data.conversations) == 1
    assert "entry 1" in data.skipped[0][0] and data.skipped[0][1]


def stage2_config(steps: int, **overrides) -> VLMTrainConfig:
    return VLMTrainConfig(
        stage=2, steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=2, **overrides
    )


def test_lora_stage_changes_only_lora_and_projector(tmp_path):
    model = tiny_vlm()
    data = ConversationData.prepare(model, synthetic_conversations(8), tmp_path / "cache", progress=False)
    model.add_lora()
    frozen_before = frozen_state(model)
    projector_before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    lora_before = {k: v.clone() for k, v in model.llm.named_parameters() if "lora_" in k}
    result = fit_vlm(model, data, None, stage2_config(3), tmp_path / "run", progress=False)
    assert len(result.losses) == 3
    frozen_after = frozen_state(model)
    assert frozen_before.keys() == frozen_after.keys() and len(frozen_before) > 20
    assert all(np.array_equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    assert any(not torch.equal(v, model.projector.state_dict()[k]) for k, v in projector_before.items())
    lora_after = dict(model.llm.named_parameters())
    assert any(not torch.equal(v, lora_after[k]) for k, v in lora_before.items())


def test_resume_continues_the_same_run(tmp_path):
    conversations = synthetic_conversations(8)

    def run(out, steps, resume):
        model = tiny_vlm()
        data = ConversationData.prepare(model, conversations, tmp_path / "cache", progress=False)
        result = fit_vlm(model, data, None, stage2_config(steps), out, resume=resume, progress=False)
        return model, result

    whole, whole_result = run(tmp_path / "whole", 4, False)
    run(tmp_path / "parts", 2, False)
    resumed, resumed_result = run(tmp_path / "parts", 4, True)
    assert resumed_result.losses == pytest.approx(whole_result.losses[2:], abs=1e-6)
    for (name, a), b in zip(
        whole.projector.state_dict().items(), resumed.projector.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    log = [json.loads(line) for line in (tmp_path / "parts" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]


@pytest.mark.parametrize("projector", ["mlp", "patch-merge"])
def test_conversations_learnt_by_heart_are_answered_word_for_word(tmp_path, capsys, projector):
    """Stage 0 on six scenes asked the same question: only the image tells the answers apart."""
    conversations = synthetic_conversations(6, kinds=("count",))
    question, answers = "How many objects are there?", [c.turns[1][1] for c in conversations]
    assert {c.turns[0][1] for c in conversations} == {f"<image>\n{question}"} and len(set(answers)) > 1
    model = tiny_vlm(projector=projector)
    data = ConversationData.prepare(model, conversations, tmp_path / "cache", progress=False)
    config = VLMTrainConfig(stage=0, steps=40, batch_size=6, lr=1e-2, warmup_steps=1, checkpoint_every=0)
    losses = fit_vlm(model, data, None, config, tmp_path / "run", progress=False).losses
    assert np.mean(losses[-5:]) < 0.1 * np.mean(losses[:5]), losses
    images = [[c.images[0].render()] for c in conversations]
    assert model.generate([model.chat_prompt(question, 1)] * 6, images) == answers
    # `dinobridge chat` on the saved model gives the same replies, each ending at the end-of-turn token.
    model.save_pretrained(tmp_path / "model")
    differs = next(i for i, answer in enumerate(answers) if answer != answers[0])
    for index in (0, differs):
        picture = tmp_path / f"{index}.png"
        images[index][0].save(picture)
        capsys.readouterr()
        assert main(["chat", "--model", str(tmp_path / "model"), "--image", str(picture), question]) == 0
        assert capsys.readouterr().out == answers[index] + "\n"


def test_cli_train_chat_and_export(tmp_path, capsys):
    config = {"vlm": to_dict(tiny_vlm_config()), "train": {"steps": 2, "batch_size": 4, "held_out": 4}}
    (tmp_path / "vlm.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "model"
    args = ["train-vlm", "--config", str(tmp_path / "vlm.yaml"), "--data", "synthetic:12", "--out", str(out)]
    assert main([*args, "--stage", "1"]) == 0
    assert "held-out answer accuracy" in capsys.readouterr().out
    assert not (out / "adapter").exists()  # stage 1: the projector alone
    stage2 = tmp_path / "lora"
    assert main([*args[:-1], str(stage2), "--base", str(out)]) == 0  # stage 2 is the config's default
    assert (stage2 / "adapter" / "adapter_config.json").is_file()
    image = tmp_path / "scene.png"
    SyntheticWorld(0, image_size=56).scene(0).render().save(image)
    # Two steps teach nothing to say (what chat prints is checked on a model that learnt its answers,
    # test_conversations_learnt_by_heart_are_answered_word_for_word): here chat loads the LoRA directory.
    assert main(["chat", "--model", str(stage2), "--image", str(image), "what colour is the star ?"]) == 0
    assert main(["chat", "--model", str(stage2), "what colour is the star ?", "--image", str(tmp_path)]) == 2
    assert main(["export-llava", str(stage2), str(tmp_path / "llava")]) == 0
    assert (tmp_path / "llava" / "config.json").is_file()
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["model_type"] == "llava"


VLM_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "dinov2-b14-qwen2.5-0.5b.yaml"


def test_vlm_recipe_names_real_checkpoints_and_runs_on_stand_ins(tmp_path, monkeypatch, scenes_56):
    """The recipe as written, with only its two names pointed at tiny stand-ins in the same formats: a
    DINOv2 with a BitImageProcessor (resize 256, crop 224) and a Qwen2 whose tokenizer has no <image>
    and no pad token, so loading adds the placeholder and grows the embeddings."""
    config = load_config(VLM_RECIPE, VLMRunConfig)
    assert (config.vlm.encoder.name, config.vlm.llm.name) == (
        "facebook/dinov2-base",
        "Qwen/Qwen2.5-0.5B-Instruct",
    )
    assert config.vlm.projector.kind == "mlp" and config.vlm.encoder.layer == -1 and config.train.lr == 2e-4
    transformers.Dinov2Model(transformers.Dinov2Config(**{**TINY_DINOV2, "image_size": 224})).save_pretrained(
        tmp_path / "dinov2"
    )
    (tmp_path / "dinov2" / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR))
    tokenizer = build_tokenizer(image_token="<im>")
    tokenizer.pad_token = None
    qwen = transformers.Qwen2Config(
        **{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, vocab_size=len(tokenizer)
    )
    transformers.Qwen2ForCausalLM(qwen).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    config.vlm.encoder.name, config.vlm.llm.name = str(tmp_path / "dinov2"), str(tmp_path / "qwen")
    model = VisionLLM.from_config(config.vlm).eval()
    assert model.tokens_per_image() == 256 and model.image_token_id == len(tokenizer)
    assert "lora_A" in "".join(name for name, _ in model.llm.named_parameters())
    prompt = model.chat_prompt("what colour is the star ?", 1)
    with torch.no_grad():
        batch = model.batch([prompt], [[scenes_56[0]]])
        logits = model(batch["input_ids"], batch["attention_mask"], batch["visual_tokens"]).logits
    model.save_pretrained(tmp_path / "saved")
    monkeypatch.chdir(tmp_path / "qwen")
    reloaded = VisionLLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        batch = reloaded.batch([prompt], [[scenes_56[0]]])
        again = reloaded(batch["input_ids"], batch["attention_mask"], batch["visual_tokens"]).logits
    assert torch.equal(logits, again)  # the grown embedding rows are rebuilt the same way
    assert not (tmp_path / "saved" / "llm").exists()  # a named LLM is not copied, only its adapter


def test_grouping_by_length_keeps_every_conversation_once_an_epoch_in_batches_of_like_length():
    lengths = tuple([10] * 300 + [60] * 100)  # questions and a quarter of long captions
    config = VLMTrainConfig(batch_size=8, seed=3)
    epoch = [batch_indices(len(lengths), config, step, lengths) for step in range(50)]
    assert sorted(torch.cat(epoch).tolist()) == list(range(400))
    mixed = sum(len({lengths[i] for i in batch.tolist()}) > 1 for batch in epoch)
    assert mixed <= 2, f"{mixed} of 50 batches mix short and long conversations"
    # lengths within one bucket keep their random order: kinds of the same length stay mixed
    kinds = tuple([9] * 150 + [10] * 150 + [60] * 100)
    grouped = [batch_indices(len(kinds), config, step, kinds) for step in range(50)]
    assert sum(len({kinds[i] for i in batch.tolist()} - {60}) > 1 for batch in grouped) > 20
    plain = [batch_indices(len(lengths), config, step) for step in range(50)]
    assert sum(len({lengths[i] for i in batch.tolist()}) > 1 for batch in plain) > 30
    assert not torch.equal(epoch[0], batch_indices(len(lengths), config, 50, lengths))  # a new epoch


def test_fewest_padding_runs_finds_the_cheapest_cuts():
    def padded(sizes, runs):
        return sum((end - start) * sizes[end - 1] for start, end in runs)

    assert fewest_padding_runs([27] * 26 + [45, 48, 53], 2) == [(0, 26), (26, 29)]
    assert fewest_padding_runs([5, 5, 5], 3) == [(0, 3)]  # one length: nothing to cut
    rng = random.Random(0)
    for _ in range(50):
        sizes = sorted(rng.choice([3, 4, 9, 20, 21, 40]) for _ in range(rng.randint(1, 9)))
        parts = rng.randint(1, 4)
        runs = fewest_padding_runs(sizes, parts)
        assert runs[0][0] == 0 and runs[-1][1] == len(sizes) and len(runs) <= parts
        assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
        every_cut = (
            [0, *cuts, len(sizes)]
            for k in range(parts)
            for cuts in itertools.combinations(range(1, len(sizes)), k)
        )
        least = min(padded(sizes, list(itertools.pairwise(cuts))) for cuts in every_cut)
        assert padded(sizes, runs) == least


def test_sub_batches_train_exactly_as_the_whole_padded_batch(tmp_path):
    conversations = synthetic_conversations(12)  # captions and short questions: lengths differ
    runs = []
    for parts in (1, 3):
        torch.manual_seed(0)
        model = tiny_vlm()
        data = ConversationData.prepare(model, conversations, tmp_path / "cache", progress=False)
        config = VLMTrainConfig(
            stage=0, steps=4, batch_size=8, warmup_steps=1, checkpoint_every=0, sub_batches=parts
        )
        runs.append((fit_vlm(model, data, None, config, tmp_path / f"run{parts}", progress=False), model))
    (whole, whole_model), (split, split_model) = runs
    assert split.losses == pytest.approx(whole.losses, abs=1e-5)
    for (name, a), b in zip(
        whole_model.llm.state_dict().items(), split_model.llm.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5), name
