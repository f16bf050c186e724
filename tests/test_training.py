"""Text-route training: data sets, caches, losses, checkpoints and the train/eval commands."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import stop_text_training_at, tiny_bridge_config

import training.align
from bridge.cli import main
from bridge.config import ConfigError, RunConfig, TrainConfig, load_config
from bridge.model import TextBridge
from bridge.synthetic import SyntheticWorld
from training.align import train_text_bridge
from training.cache import FeatureCache
from training.data import DataError, held_out_split, load_pairs
from training.evaluate import retrieval_recall
from training.losses import infonce_loss, sigmoid_loss


def tiny_run(steps: int = 12, **train) -> RunConfig:
    options = dict(steps=steps, batch_size=8, held_out=4, eval_every=0, checkpoint_every=6, warmup_steps=2)
    return RunConfig(
        bridge=tiny_bridge_config(width=32, num_heads=2), train=TrainConfig(**{**options, **train})
    )


@pytest.fixture
def photo_folder(tmp_path):
    """16 synthetic scenes saved as JPEG files, with a pairs.jsonl naming them by relative path."""
    folder = tmp_path / "photos"
    folder.mkdir()
    lines = []
    for index, scene in enumerate(SyntheticWorld(seed=3).scenes(0, 16)):
        scene.render().save(folder / f"scene{index:02d}.jpg", quality=95)
        lines.append(json.dumps({"image": f"photos/scene{index:02d}.jpg", "captions": scene.captions(2)}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture(scope="module")
def trained_bridge(tmp_path_factory):
    """A bridge trained on 128 synthetic scenes and scored on 32 new ones."""
    out = tmp_path_factory.mktemp("trained")
    config = tiny_run(steps=60, batch_size=64, lr=1e-2, held_out=32, warmup_steps=5, checkpoint_every=0)
    _, result = train_text_bridge(config, "synthetic:128", out, progress=False)
    return out, result


def test_training_retrieves_scenes_it_never_saw_well_above_chance(trained_bridge):
    out, result = trained_bridge
    metrics = result.metrics
    # Chance is 1 in 32, as the untrained bridge scores; seeds 0 to 2 get 6 to 9 of 32 right both ways.
    # Both ways: text->image counts ties as right, so a bridge giving every image one embedding scores 1.0.
    assert metrics["text_to_image_R@1"] >= 5 / 32 and metrics["image_to_text_R@1"] >= 5 / 32, metrics
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.7 * first, f"the loss only fell from {first:.2f} to {last:.2f}"  # 4.04 to 2.22
    assert json.loads((out / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_an_aligned_batch_has_a_lower_loss_than_a_shuffled_one(loss):
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(16, 32), dim=-1)
    images = F.normalize(texts + 0.3 * torch.randn(16, 32), dim=-1)
    shuffled = images[torch.roll(torch.arange(16), 1)]
    scale, bias = torch.tensor(2.3), torch.tensor(-5.0)
    args = (scale,) if loss == "infonce" else (scale, bias)
    fn = infonce_loss if loss == "infonce" else sigmoid_loss
    assert fn(images, texts, *args) < fn(shuffled, texts, *args) - 1.0


def test_retrieval_recall_counts_the_paired_image_as_ground_truth():
    images = torch.eye(3)
    # Captions 0 and 1 belong to image 0, caption 2 to image 1 but points at image 2; image 2 has none.
    texts = torch.stack([torch.eye(3)[0], torch.eye(3)[0], torch.eye(3)[2]])
    metrics = retrieval_recall(images, texts, [0, 0, 1])
    assert metrics["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert metrics["text_to_image_R@5"] == 1.0
    assert metrics["image_to_text_R@1"] == pytest.approx(1 / 3)  # only image 0 has its caption on top


def test_retrieval_recall_counts_a_tie_as_a_miss():
    """Embeddings that are all alike tell nothing apart: they must not score R@1 1.0."""
    same = torch.nn.functional.normalize(torch.ones(12, 4), dim=-1)
    metrics = retrieval_recall(same, same, list(range(12)))
    assert all(
        metrics[f"{direction}_R@{k}"] == 0.0
        for direction in ("text_to_image", "image_to_text")
        for k in (1, 5, 10)
    )


def test_a_jsonl_line_whose_image_is_missing_names_the_file_and_line(photo_folder):
    pairs = photo_folder / "pairs.jsonl"
    lines = pairs.read_text().splitlines()
    lines[2] = json.dumps({"image": "photos/gone.jpg", "caption": "a red circle"})
    pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: image 'photos/gone\.jpg' not found"):
        load_pairs(str(pairs))


def test_malformed_jsonl_csv_and_coco_files_fail_with_the_place_named(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "a.jpg"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_pairs(str(bad_json))
    no_caption = tmp_path / "empty.jsonl"
    no_caption.write_text('{"image": "a.jpg", "caption": "  "}\n')
    with pytest.raises(DataError, match=r"empty\.jsonl:1: needs a non-empty"):
        load_pairs(str(no_caption))
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,text\na.jpg,hello\n")
    with pytest.raises(DataError, match="'image' and 'caption' columns"):
        load_pairs(str(bad_csv))
    with pytest.raises(DataError, match="synthetic:N"):
        load_pairs("synthetic:many")


def test_csv_and_coco_captions_group_captions_by_image(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "pairs.csv").write_text("image,caption\na.jpg,one\nb.jpg,two\na.jpg,three\n")
    pairs = load_pairs(str(tmp_path / "pairs.csv"))
    assert [(p.image.rsplit("/", 1)[1], p.captions) for p in pairs] == [
        ("a.jpg", ["one", "three"]),
        ("b.jpg", ["two"]),
    ]
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 9, "caption": "a dog"},
            {"image_id": 7, "caption": "a cat"},
            {"image_id": 9, "caption": "a puppy"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    pairs = load_pairs(str(tmp_path / "captions.json"))
    assert {p.image.rsplit("/", 1)[1]: p.captions for p in pairs} == {
        "b.jpg": ["a dog", "a puppy"],
        "a.jpg": ["a cat"],
    }


def test_the_feature_cache_is_computed_once_and_keyed_by_the_encoder(tmp_path, tiny_bridge):
    pairs = load_pairs("synthetic:6")
    cache = FeatureCache(tmp_path, tiny_bridge.encoder)
    first = cache.features(pairs, batch_size=4, progress=False)
    direct = tiny_bridge.encoder.encode([p.load_image() for p in pairs])
    torch.testing.assert_close(first[[0, 5]].patches, direct.patches[[0, 5]], atol=2e-3, rtol=2e-3)
    # A second cache object over the same folder finds every image already encoded.
    again = FeatureCache(tmp_path, tiny_bridge.encoder)
    again._compute = lambda *args: pytest.fail("encoded an image that was already cached")
    torch.testing.assert_close(again.features(pairs, progress=False)[[3, 1]].cls, first[[3, 1]].cls)
    other_config = tiny_bridge_config(width=32, num_heads=2)
    other_config.encoder.seed = 1
    other = TextBridge.from_config(other_config)
    assert FeatureCache(tmp_path, other.encoder).directory != cache.directory


def test_decode_workers_give_the_same_features_as_the_main_process(tmp_path, tiny_bridge):
    pairs = load_pairs("synthetic:10")
    alone = FeatureCache(tmp_path / "alone", tiny_bridge.encoder).features(
        pairs, batch_size=3, progress=False
    )
    workers = FeatureCache(tmp_path / "workers", tiny_bridge.encoder).features(
        pairs, batch_size=3, workers=2, progress=False
    )
    assert torch.equal(alone[list(range(10))].patches, workers[list(range(10))].patches)


def test_a_corrupt_image_is_skipped_and_counted_never_a_crash(photo_folder):
    (photo_folder / "photos" / "scene05.jpg").write_bytes(b"this is a text file, not a jpeg")
    _, result = train_text_bridge(
        tiny_run(steps=4), str(photo_folder / "pairs.jsonl"), photo_folder / "run", progress=False
    )
    assert len(result.skipped) == 1
    origin, reason = result.skipped[0]
    assert origin.endswith("pairs.jsonl:6") and "not an image" in reason
    assert reason.startswith(
        f"image '{photo_folder / 'photos' / 'scene05.jpg'}': "
    )  # the file, not just the line
    assert len(result.losses) == 4 and all(loss == loss for loss in result.losses)  # no NaN


def test_resuming_from_a_checkpoint_continues_the_same_loss_curve(tmp_path, monkeypatch):
    _, whole = train_text_bridge(tiny_run(steps=12), "synthetic:40", tmp_path / "whole", progress=False)

    # Kill the run at step 9, after its step-6 checkpoint, then resume it to the end.
    real_sample = stop_text_training_at(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        train_text_bridge(tiny_run(steps=12), "synthetic:40", tmp_path / "killed", progress=False)
    monkeypatch.setattr(training.align, "sample_batch", real_sample)
    _, resumed = train_text_bridge(
        tiny_run(steps=12), "synthetic:40", tmp_path / "killed", resume=True, progress=False
    )
    assert len(resumed.losses) == 6
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(whole.losses[6:]), rtol=1e-5, atol=1e-6
    )
    log = (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 13))  # steps 7-8 not logged twice


def test_resume_refuses_a_different_config(tmp_path):
    train_text_bridge(tiny_run(steps=6), "synthetic:20", tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="differs from the one in"):
        train_text_bridge(tiny_run(steps=7), "synthetic:20", tmp_path / "run", resume=True, progress=False)


def test_save_and_load_round_trip_exactly(tmp_path, tiny_bridge):
    images = [scene.render() for scene in SyntheticWorld(1).scenes(0, 3)]
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    loaded = TextBridge.from_pretrained(tmp_path / "bridge")
    assert torch.equal(loaded.encode_image(images), tiny_bridge.encode_image(images))
    assert torch.equal(loaded.encode_text(["a red star"]), tiny_bridge.encode_text(["a red star"]))
    assert loaded.fingerprint() == tiny_bridge.fingerprint()
    assert (tmp_path / "bridge" / "model.safetensors").stat().st_size < 5_000_000


def test_a_checkpoint_that_is_not_safetensors_is_refused_never_unpickled(tmp_path, tiny_bridge):
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "bridge" / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError, match="not a safetensors file.*never unpickles"):
        TextBridge.from_pretrained(tmp_path / "bridge")
    assert not marker.exists()


def test_a_config_with_an_unknown_key_fails_naming_the_key_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("bridge:\n  projector:\n    kind: attention\n    widht: 64\ntrain:\n  steps: 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'widht' in .*run\.yaml \(section 'bridge\.projector'\)"
    ):
        load_config(path)


def test_a_projector_whose_input_does_not_match_the_encoder_fails_before_any_work(tmp_path, monkeypatch):
    config = tiny_run()
    config.bridge.projector.in_dim = 768
    monkeypatch.setattr("training.align.FeatureCache", lambda *a: pytest.fail("cached features first"))
    with pytest.raises(ConfigError, match="projector expects 768-d patches but the encoder gives 32-d"):
        train_text_bridge(config, "synthetic:20", tmp_path / "run", progress=False)


def test_train_and_eval_retrieval_commands_on_a_jsonl_of_ones_own_images(photo_folder, capsys, monkeypatch):
    monkeypatch.setenv("DINOBRIDGE_CACHE", str(photo_folder / "eval-cache"))
    config = photo_folder / "run.yaml"
    config.write_text(
        "bridge:\n  encoder:\n    architecture: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,"
        " intermediate_size: 64, patch_size: 14, image_size: 56}\n"
        "  projector: {kind: attention, options: {width: 32, num_heads: 2}}\n"
        "train: {steps: 60, warmup_steps: 5, batch_size: 8, held_out: 4, eval_every: 0, checkpoint_every: 0}\n"
    )
    data, out = str(photo_folder / "pairs.jsonl"), str(photo_folder / "bridge")
    assert main(["train", "--config", str(config), "--data", data, "--out", out]) == 0
    assert "held-out text->image R@1/5/10" in capsys.readouterr().out
    assert main(["eval", "retrieval", "--model", out, "--data", data, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 16 and metrics["skipped"] == 0
    # 60 steps on 12 images: it learnt them, well above the 1/16 chance of a random bridge (0.59 and 0.69).
    assert metrics["text_to_image_R@1"] >= 0.5 and metrics["image_to_text_R@1"] >= 0.5, metrics
    # `eval retrieval` on the 4 pairs training held out gives the figures training reported for them.
    _, held_out = held_out_split(load_pairs(data), 4, seed=0)
    held_out_file = photo_folder / "held_out.jsonl"
    held_out_file.write_text(
        "".join(json.dumps({"image": p.image, "captions": p.captions}) + "\n" for p in held_out)
    )
    assert main(["eval", "retrieval", "--model", out, "--data", str(held_out_file), "--json"]) == 0
    reported = json.loads((photo_folder / "bridge" / "metrics.json").read_text())
    evaluated = json.loads(capsys.readouterr().out)
    # metrics.json also says which step was kept (best_step, last_step, last_...): not eval's to report
    assert evaluated == {"images": 4, "skipped": 0, **{k: reported[k] for k in evaluated if k in reported}}
    assert reported["best_step"] == reported["last_step"] == 60  # evaluated only at the end


def test_eval_zeroshot_on_an_image_folder_counts_images_classes_and_skips_bad_files(
    tmp_path, trained_bridge, capsys, monkeypatch
):
    monkeypatch.setenv("DINOBRIDGE_CACHE", str(tmp_path / "eval-cache"))
    world = SyntheticWorld(seed=5, max_objects=1)
    for index, scene in enumerate(world.scenes(0, 24)):
        folder = tmp_path / "classes" / scene.objects[0].colour
        folder.mkdir(parents=True, exist_ok=True)
        scene.render().save(folder / f"{index}.png")
    classes = sorted(p.name for p in (tmp_path / "classes").iterdir())
    (tmp_path / "classes" / classes[0] / "broken.jpg").write_bytes(b"not an image")
    model, _ = trained_bridge
    argv = ["eval", "zeroshot", "--model", str(model), "--data", str(tmp_path / "classes"), "--json"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert (metrics["images"], metrics["classes"], metrics["skipped"]) == (24, len(classes), 1)
    # 6 colours, so 1 in 6 by chance; seeds 0 to 2 of the bridge get 13 to 16 of the 24 right.
    assert metrics["top1"] >= 0.4, metrics
