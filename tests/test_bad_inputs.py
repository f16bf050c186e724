"""Bad inputs across every verb, as a careless user types them: each ends in a non-zero exit and a message
that names the culprit, never a traceback.

One table. Each row builds what it needs in a scratch folder (a broken data file, a config with one bad
value, a model folder of the wrong kind) around a small world made once: a saved tiny bridge, a folder of
photos, its index and a saved tiny VisionLLM. Rows run through `bridge.cli.main` in this process, as the
`dinobridge` script does; an uncaught exception fails its row, which is the point.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from test_index import make_photos
from test_vlm import tiny_vlm

from bridge.cli import main


@dataclass(frozen=True)
class World:
    """What the rows start from; `scratch` is a fresh folder for each row."""

    bridge: Path  # a saved tiny TextBridge
    photos: Path  # a folder of 4 photos
    index: Path  # the index of `photos` made by `bridge`
    vlm: Path  # a saved tiny VisionLLM
    scratch: Path

    @property
    def photo(self) -> Path:
        return next(self.photos.glob("*.png"))

    def write(self, name: str, content: str | bytes) -> str:
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return str(path)

    def config(self, yaml: str) -> str:
        return self.write("config.yaml", yaml)

    def copy_of(self, folder: Path, edit: Callable[[Path], None]) -> str:
        """A copy of a saved model or index, changed by `edit`."""
        copy = self.scratch / folder.name
        shutil.copytree(folder, copy)
        edit(copy)
        return str(copy)


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        content = json.loads((folder / name).read_text())
        content = change(content) or content
        (folder / name).write_text(json.dumps(content))

    return edit


def overwrite(name: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return edit


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (
        shutil.rmtree(folder / name) if (folder / name).is_dir() else (folder / name).unlink()
    )


PAIR = '{"image": "photo.png", "caption": "a red circle"}\n'
TRAIN = ["train", "--steps", "1"]


def train(w: World, data: str, *extra: str) -> list[str]:
    return [*TRAIN, "--data", data, "--out", str(w.scratch / "run"), *extra]


def index(w: World, *extra: str) -> list[str]:
    """`dinobridge index` of the world's photos with its bridge into a fresh --out, and `extra`."""
    return ["index", str(w.photos), "--model", str(w.bridge), "--out", str(w.scratch / "i"), *extra]


def index_folder(w: World, *files: str, extra: tuple[str, ...] = ()) -> list[str]:
    """`dinobridge index` of a scratch folder holding `files` (empty ones) into a fresh --out."""
    folder = w.scratch / "folder"
    folder.mkdir()
    for name in files:
        w.write(f"folder/{name}", "")
    return ["index", str(folder), "--model", str(w.bridge), "--out", str(w.scratch / "i"), *extra]


def segment(w: World, classes: str, *extra: str) -> list[str]:
    return [
        "segment",
        str(w.photo),
        "--classes",
        classes,
        "--model",
        str(w.bridge),
        "--out",
        str(w.scratch / "s.png"),
        *extra,
    ]


def train_vlm(w: World, data: str, *extra: str) -> list[str]:
    return ["train-vlm", "--data", data, "--out", str(w.scratch / "v"), *extra]


def pairs(w: World, text: str | bytes, name: str = "pairs.jsonl") -> str:
    """A data file beside a real photo named photo.png, so only the file's own fault can fail it."""
    shutil.copy(w.photo, w.scratch / "photo.png")
    return w.write(name, text)


# (id, argv from the world, what the message must match). Exit code 2 unless the row says otherwise.
Row = tuple[str, Callable[[World], list[str]], str]

ROWS: list[Row] = [
    # ---- train: data files ----
    ("train-data-missing", lambda w: train(w, str(w.scratch / "nowhere.jsonl")), r"nowhere\.jsonl"),
    (
        "train-data-a-folder-of-captioned-images",
        lambda w: train(w, str(Path(pairs(w, "a red circle", "photo.txt")).parent)),
        r"holds no \.tar shards; --data takes .*\.txt list of shards, or a file that lists images and captions",
    ),
    ("train-data-empty", lambda w: train(w, pairs(w, "")), r"pairs\.jsonl"),
    (
        "train-jsonl-image-int",
        lambda w: train(w, pairs(w, '{"image": 5, "caption": "x"}\n')),
        r"pairs\.jsonl:1",
    ),
    (
        "train-jsonl-image-null",
        lambda w: train(w, pairs(w, '{"image": null, "caption": "x"}\n')),
        r"pairs\.jsonl:1",
    ),
    (
        "train-jsonl-no-caption",
        lambda w: train(w, pairs(w, PAIR + '{"image": "photo.png"}\n')),
        r"pairs\.jsonl:2",
    ),
    ("train-jsonl-not-json", lambda w: train(w, pairs(w, PAIR + "{oops\n")), r"pairs\.jsonl:2"),
    ("train-jsonl-a-list", lambda w: train(w, pairs(w, '["photo.png", "x"]\n')), r"pairs\.jsonl:1"),
    (
        "train-jsonl-caption-int",
        lambda w: train(w, pairs(w, '{"image": "photo.png", "caption": 7}\n')),
        r"pairs\.jsonl:1",
    ),
    (
        "train-csv-no-header",
        lambda w: train(w, pairs(w, "photo.png,a red circle\n", "pairs.csv")),
        r"pairs\.csv",
    ),
    (
        "train-csv-latin1",
        lambda w: train(
            w, pairs(w, "image,caption\nphoto.png,caf\xe9 au lait\n".encode("latin-1"), "pairs.csv")
        ),
        r"pairs\.csv.*UTF-8",
    ),
    (
        "train-coco-not-objects",
        lambda w: train(w, pairs(w, '{"images": [1, 2], "annotations": [3]}', "coco.json")),
        r"coco\.json",
    ),
    ("train-coco-no-annotations", lambda w: train(w, pairs(w, '{"images": []}', "coco.json")), r"coco\.json"),
    ("train-json-a-number", lambda w: train(w, pairs(w, "42", "data.json")), r"data\.json"),
    ("train-unknown-format", lambda w: train(w, pairs(w, "x", "data.parquet")), r"data\.parquet"),
    ("train-synthetic-zero", lambda w: train(w, "synthetic:0"), r"synthetic"),
    ("train-synthetic-word", lambda w: train(w, "synthetic:many"), r"synthetic"),
    (
        "train-image-root-missing",
        lambda w: train(w, pairs(w, PAIR), "--image-root", str(w.scratch / "none")),
        r"none",
    ),
    (
        "train-all-images-missing",
        lambda w: train(w, w.write("gone.jsonl", '{"image": "gone.png", "caption": "x"}\n')),
        r"gone",
    ),
    # ---- train: configs ----
    (
        "train-config-missing",
        lambda w: train(w, "synthetic:8", "--config", str(w.scratch / "no.yaml")),
        r"no\.yaml",
    ),
    (
        "train-config-syntax",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {steps: [1\n")),
        r"config\.yaml",
    ),
    ("train-config-empty", lambda w: train(w, "synthetic:8", "--config", w.config("")), r"config\.yaml"),
    (
        "train-config-a-list",
        lambda w: train(w, "synthetic:8", "--config", w.config("- 1\n- 2\n")),
        r"config\.yaml",
    ),
    (
        "train-config-unknown-key",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {stesp: 5}\n")),
        r"stesp",
    ),
    (
        "train-config-lr-word",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {lr: fast}\n")),
        r"train\.lr",
    ),
    (
        "train-config-lr-negative",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {lr: -1.0e-3}\n")),
        r"train\.lr",
    ),
    (
        "train-config-batch-zero",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {batch_size: 0}\n")),
        r"train\.batch_size",
    ),
    (
        "train-config-accum-zero",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {grad_accum: 0}\n")),
        r"train\.grad_accum",
    ),
    (
        "train-config-steps-negative",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {steps: -5}\n")),
        r"train\.steps",
    ),
    (
        "train-config-steps-float",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {steps: 2.5}\n")),
        r"train\.steps",
    ),
    (
        "train-config-steps-bool",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {steps: true}\n")),
        r"train\.steps",
    ),
    (
        "train-config-loss-unknown",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {loss: magic}\n")),
        r"magic",
    ),
    (
        "train-config-projector-unknown",
        lambda w: train(w, "synthetic:8", "--config", w.config("bridge: {projector: {kind: teleporter}}\n")),
        r"teleporter",
    ),
    (
        "train-config-tower-unknown",
        lambda w: train(w, "synthetic:8", "--config", w.config("bridge: {text: {kind: telepathy}}\n")),
        r"telepathy",
    ),
    (
        "train-config-section-a-string",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: fast\n")),
        r"train",
    ),
    (
        "train-config-flat-word-list",
        lambda w: train(
            w, "synthetic:8", "--config", w.config("train: {hard_negative_words: [circle, square]}\n")
        ),
        r"hard_negative_words",
    ),
    (
        "train-config-precision-unknown",
        lambda w: train(w, "synthetic:8", "--config", w.config("train: {mixed_precision: fp12}\n")),
        r"fp12",
    ),
    ("train-steps-flag-zero", lambda w: train(w, "synthetic:8", "--steps", "0"), r"--steps"),
    (
        "train-out-is-a-file",
        lambda w: [*TRAIN, "--data", "synthetic:8", "--out", w.write("taken", "x")],
        r"taken",
    ),
    ("train-resume-nothing", lambda w: train(w, "synthetic:8", "--resume"), r"run"),
    # ---- eval ----
    (
        "eval-model-missing",
        lambda w: ["eval", "retrieval", "--model", str(w.scratch / "none"), "--data", "synthetic:4"],
        r"none",
    ),
    (
        "eval-model-no-config",
        lambda w: [
            "eval",
            "retrieval",
            "--model",
            w.copy_of(w.bridge, remove("config.json")),
            "--data",
            "synthetic:4",
        ],
        r"config\.json",
    ),
    (
        "eval-model-config-not-json",
        lambda w: [
            "eval",
            "retrieval",
            "--model",
            w.copy_of(w.bridge, overwrite("config.json", "{half")),
            "--data",
            "synthetic:4",
        ],
        r"config\.json",
    ),
    (
        "eval-model-config-no-bridge-key",
        lambda w: [
            "eval",
            "retrieval",
            "--model",
            w.copy_of(w.bridge, edit_json("config.json", lambda c: {"other": 1})),
            "--data",
            "synthetic:4",
        ],
        r"config\.json",
    ),
    (
        "eval-model-weights-pickle",
        lambda w: [
            "eval",
            "retrieval",
            "--model",
            w.copy_of(w.bridge, overwrite("model.safetensors", b"\x80\x04K\x01.")),
            "--data",
            "synthetic:4",
        ],
        r"model\.safetensors",
    ),
    (
        "eval-model-other-projector",
        lambda w: [
            "eval",
            "retrieval",
            "--model",
            w.copy_of(
                w.bridge, edit_json("config.json", lambda c: c["bridge"]["projector"].update(kind="mlp"))
            ),
            "--data",
            "synthetic:4",
        ],
        r"config\.json|model\.safetensors",
    ),
    (
        "eval-model-no-encoder-dir",
        lambda w: [
            "eval",
            "retrieval",
            "--model",
            w.copy_of(w.bridge, remove("encoder")),
            "--data",
            "synthetic:4",
        ],
        r"encoder",
    ),
    (
        "eval-model-is-a-vlm",
        lambda w: ["eval", "retrieval", "--model", str(w.vlm), "--data", "synthetic:4"],
        r"VisionLLM|vision",
    ),
    (
        "eval-data-missing",
        lambda w: ["eval", "retrieval", "--model", str(w.bridge), "--data", str(w.scratch / "no.jsonl")],
        r"no\.jsonl",
    ),
    (
        "eval-data-a-folder",
        lambda w: ["eval", "retrieval", "--model", str(w.bridge), "--data", str(w.photos)],
        r"'.*photos' is a folder; give a file that lists its images and captions",
    ),
    (
        "eval-zeroshot-missing",
        lambda w: ["eval", "zeroshot", "--model", str(w.bridge), "--data", str(w.scratch / "none")],
        r"none",
    ),
    (
        "eval-zeroshot-no-classes",
        lambda w: ["eval", "zeroshot", "--model", str(w.bridge), "--data", str(w.photos / "trips")],
        r"trips",
    ),
    (
        "eval-segmentation-missing",
        lambda w: ["eval", "segmentation", "--model", str(w.bridge), "--data", str(w.scratch / "voc")],
        r"voc",
    ),
    # ---- index ----
    (
        "index-folder-missing",
        lambda w: ["index", str(w.scratch / "none"), "--model", str(w.bridge), "--out", str(w.scratch / "i")],
        r"none",
    ),
    (
        "index-folder-a-file",
        lambda w: ["index", str(w.photo), "--model", str(w.bridge), "--out", str(w.scratch / "i")],
        r"photo\d+\.png",
    ),
    (
        "index-model-missing",
        lambda w: ["index", str(w.photos), "--model", str(w.scratch / "none"), "--out", str(w.scratch / "i")],
        r"none",
    ),
    (
        "index-model-is-a-vlm",
        lambda w: ["index", str(w.photos), "--model", str(w.vlm), "--out", str(w.scratch / "i")],
        r"VisionLLM|vision",
    ),
    (
        "index-out-a-file",
        lambda w: ["index", str(w.photos), "--model", str(w.bridge), "--out", w.write("taken", "x")],
        r"taken",
    ),
    (
        "index-batch-negative",
        lambda w: index(w, "--batch-size", "-3"),
        r"--batch-size",
    ),
    (
        "index-batch-zero",
        lambda w: index(w, "--batch-size", "0"),
        r"--batch-size",
    ),
    (
        "index-batch-word",
        lambda w: index(w, "--batch-size", "big"),
        r"--batch-size",
    ),
    (
        "index-workers-negative",
        lambda w: index(w, "--workers", "-1"),
        r"--workers",
    ),
    (
        "index-threads-past-the-cores",
        lambda w: index(w, "--threads", "100000"),
        r"--threads 100000 is too many .* give at most",
    ),
    (
        "index-workers-past-the-cores",
        lambda w: index(w, "--workers", "100000"),
        r"--workers 100000 is too many .* give at most",
    ),
    (
        "index-device-bogus",
        lambda w: index(w, "--device", "bogus"),
        r"bogus",
    ),
    (
        "index-precision-bogus",
        lambda w: index(w, "--precision", "fp12"),
        r"fp12",
    ),
    ("index-folder-empty", lambda w: index_folder(w), r"folder'.*\.jpg.*the folder is empty"),
    (
        "index-folder-of-text-files",
        lambda w: index_folder(w, "a.txt", "b.txt", ".DS_Store"),
        r"folder'.*\.jpg.*2 files that are not images, 1 hidden or system names \(--include-hidden",
    ),
    (
        "index-exclude-everything",
        lambda w: index(w, "--exclude", "*"),
        r"photos'.*\.png.*3 names matching --exclude",
    ),
    (
        "index-another-folder",
        lambda w: [
            "index",
            str(w.photos / "trips"),
            "--model",
            str(w.bridge),
            "--out",
            w.copy_of(w.index, lambda _: None),
        ],
        r"another|not",
    ),
    (
        "search-manifest-damaged",
        lambda w: ["search", w.copy_of(w.index, overwrite("manifest.json", "{trunc")), "a red circle"],
        r"manifest",
    ),
    (
        "search-manifest-no-fingerprint",
        lambda w: [
            "search",
            w.copy_of(w.index, edit_json("manifest.json", lambda m: m.pop("fingerprint"))),
            "a red circle",
        ],
        r"manifest",
    ),
    (
        "search-model-moved",
        lambda w: [
            "search",
            w.copy_of(
                w.index, edit_json("manifest.json", lambda m: m.update(model_dir=str(w.scratch / "gone")))
            ),
            "a red circle",
        ],
        r"built with the bridge at '.*gone', which is not there any more; pass where it is now with --model",
    ),
    # ---- search ----
    ("search-index-missing", lambda w: ["search", str(w.scratch / "none"), "a red circle"], r"none"),
    ("search-index-not-an-index", lambda w: ["search", str(w.photos), "a red circle"], r"photos"),
    ("search-no-query", lambda w: ["search", str(w.index)], r"query"),
    ("search-minus-alone", lambda w: ["search", str(w.index), "--minus", "people"], r"query|text"),
    ("search-empty-text", lambda w: ["search", str(w.index), ""], r"empty"),
    ("search-blank-text", lambda w: ["search", str(w.index), "   "], r"empty"),
    ("search-k-zero", lambda w: ["search", str(w.index), "a red circle", "-k", "0"], r"-k"),
    ("search-k-negative", lambda w: ["search", str(w.index), "a red circle", "-k", "-1"], r"-k"),
    (
        "search-image-missing",
        lambda w: ["search", str(w.index), "--image", str(w.scratch / "none.jpg")],
        r"none\.jpg",
    ),
    (
        "search-image-not-an-image",
        lambda w: ["search", str(w.index), "--image", w.write("notes.jpg", "plain text")],
        r"notes\.jpg",
    ),
    (
        "search-model-not-a-bridge",
        lambda w: ["search", str(w.index), "a red circle", "--model", str(w.photos)],
        r"photos",
    ),
    (
        "search-model-is-a-vlm",
        lambda w: ["search", str(w.index), "a red circle", "--model", str(w.vlm)],
        r"VisionLLM|vision",
    ),
    (
        "search-another-bridge",
        lambda w: [
            "search",
            str(w.index),
            "a red circle",
            "--model",
            w.copy_of(w.bridge, edit_json("config.json", lambda c: c.update(fingerprint="0" * 16))),
        ],
        r"fingerprint",
    ),
    # ---- ground and segment ----
    (
        "ground-image-missing",
        lambda w: ["ground", str(w.scratch / "none.png"), "a red circle", "--model", str(w.bridge)],
        r"none\.png",
    ),
    (
        "ground-not-an-image",
        lambda w: ["ground", w.write("notes.png", "text"), "a red circle", "--model", str(w.bridge)],
        r"notes\.png",
    ),
    (
        "ground-truncated-image",
        lambda w: ["ground", w.write("half.png", w.photo.read_bytes()[:60]), "x", "--model", str(w.bridge)],
        r"half\.png",
    ),
    ("ground-empty-text", lambda w: ["ground", str(w.photo), "", "--model", str(w.bridge)], r"empty"),
    (
        "ground-model-missing",
        lambda w: ["ground", str(w.photo), "a red circle", "--model", str(w.scratch / "none")],
        r"none",
    ),
    (
        "ground-refine-negative",
        lambda w: ["ground", str(w.photo), "x", "--model", str(w.bridge), "--refine", "-1"],
        r"--refine",
    ),
    (
        "ground-scale-zero",
        lambda w: ["ground", str(w.photo), "x", "--model", str(w.bridge), "--scale", "0"],
        r"--scale",
    ),
    (
        "ground-scale-past-the-pixel-limit",
        lambda w: ["ground", str(w.photo), "x", "--model", str(w.bridge), "--scale", "100000"],
        r"scale 100000 would map .* over the limit .*; use a scale of at most \d+",
    ),
    (
        "ground-out-not-png",
        lambda w: [
            "ground",
            str(w.photo),
            "x",
            "--model",
            str(w.bridge),
            "--out",
            str(w.scratch / "map.txt"),
        ],
        r"map\.txt",
    ),
    (
        "segment-threshold-nan",
        lambda w: segment(w, "a,b", "--threshold", "nan"),
        r"--threshold",
    ),
    (
        "segment-threshold-big",
        lambda w: segment(w, "a,b", "--threshold", "2"),
        r"--threshold",
    ),
    (
        "segment-classes-empty",
        lambda w: segment(w, ""),
        r"class",
    ),
    (
        "segment-classes-repeated",
        lambda w: segment(w, "cat,dog, cat"),
        r"class name 'cat' given more than once",
    ),
    (
        "segment-classes-blank-item",
        lambda w: segment(w, "cat, ,dog"),
        r"class",
    ),
    (
        "segment-shifts-zero",
        lambda w: segment(w, "a,b", "--shifts", "0"),
        r"--shifts",
    ),
    # ---- the LLM route ----
    (
        "train-vlm-stage-3",
        lambda w: train_vlm(w, "synthetic:8", "--stage", "3"),
        r"--stage",
    ),
    (
        "train-vlm-data-missing",
        lambda w: train_vlm(w, str(w.scratch / "no.json")),
        r"no\.json",
    ),
    (
        "train-vlm-llava-not-a-list",
        lambda w: train_vlm(w, pairs(w, '{"image": "photo.png"}', "llava.json")),
        r"llava\.json",
    ),
    (
        "train-vlm-llava-image-int",
        lambda w: train_vlm(w, pairs(w, '[{"image": 5, "conversations": []}]', "llava.json")),
        r"llava\.json",
    ),
    (
        "train-vlm-llava-bad-turns",
        lambda w: train_vlm(w, pairs(w, '[{"image": "photo.png", "conversations": "hi"}]', "llava.json")),
        r"llava\.json",
    ),
    (
        "train-vlm-base-missing",
        lambda w: train_vlm(w, "synthetic:8", "--base", str(w.scratch / "none")),
        r"none",
    ),
    (
        "train-vlm-base-is-a-bridge",
        lambda w: train_vlm(w, "synthetic:8", "--base", str(w.bridge)),
        r"bridge|VisionLLM",
    ),
    (
        "train-vlm-config-bad",
        lambda w: train_vlm(w, "synthetic:8", "--config", w.config("train: {steps: -1}\n")),
        r"train\.steps",
    ),
    ("chat-model-missing", lambda w: ["chat", "what is it?", "--model", str(w.scratch / "none")], r"none"),
    (
        "chat-model-is-a-bridge",
        lambda w: ["chat", "what is it?", "--model", str(w.bridge)],
        r"bridge|VisionLLM",
    ),
    (
        "chat-image-missing",
        lambda w: ["chat", "what is it?", "--model", str(w.vlm), "--image", str(w.scratch / "no.png")],
        r"no\.png",
    ),
    ("chat-empty-question", lambda w: ["chat", "", "--model", str(w.vlm)], r"question|empty"),
    (
        "export-source-missing",
        lambda w: ["export-llava", str(w.scratch / "none"), str(w.scratch / "out")],
        r"none",
    ),
    (
        "export-source-is-a-bridge",
        lambda w: ["export-llava", str(w.bridge), str(w.scratch / "out")],
        r"bridge|VisionLLM",
    ),
    ("export-target-a-file", lambda w: ["export-llava", str(w.vlm), w.write("taken", "x")], r"taken"),
    # ---- demo and the command line itself ----
    ("demo-scenes-zero", lambda w: ["demo", "--scenes", "0", "--out", str(w.scratch / "d")], r"--scenes"),
    (
        "demo-scenes-negative",
        lambda w: ["demo", "--scenes", "-5", "--out", str(w.scratch / "d")],
        r"--scenes",
    ),
    ("demo-task-unknown", lambda w: ["demo", "painting"], r"painting"),
    ("unknown-verb", lambda w: ["teleport"], r"teleport"),
]


# Inputs that look wrong but are fine, each with why; they must succeed.
ACCEPTED: list[tuple[str, Callable[[World], list[str]], str]] = [
    (
        "train-csv-with-bom",
        lambda w: train(
            w,
            pairs(
                w, "\ufeffimage,caption\nphoto.png,a red circle\nphoto.png,a red circle again\n", "pairs.csv"
            ),
            "--config",
            w.config("train: {held_out: 0, batch_size: 2}\n"),
        ),
        "Excel writes UTF-8 with a byte-order mark",
    ),
    (
        "train-jsonl-upper-case-suffix",
        lambda w: train(
            w,
            pairs(w, PAIR + PAIR, "PAIRS.JSONL"),
            "--config",
            w.config("train: {held_out: 0, batch_size: 2}\n"),
        ),
        "Windows tools write upper-case names",
    ),
    (
        "index-over-a-damaged-manifest",
        lambda w: [
            "index",
            str(w.photos),
            "--model",
            str(w.bridge),
            "--out",
            w.copy_of(w.index, overwrite("manifest.json", "{trunc")),
        ],
        "the index is rebuilt, the damaged manifest kept aside and named",
    ),
    (
        "search-punctuation-only",
        lambda w: ["search", str(w.index), "???", "-k", "1"],
        "a query of symbols is still text",
    ),
    (
        "search-k-past-the-index",
        lambda w: ["search", str(w.index), "a red circle", "-k", "1000"],
        "k above the image count gives them all",
    ),
]


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's refusals
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bridge) -> World:
    from bridge.index import ImageIndex

    base = tmp_path_factory.mktemp("world")
    tiny_bridge.save_pretrained(base / "bridge")
    make_photos(base / "photos", 4)
    ImageIndex.build(
        base / "photos", tiny_bridge, base / "index", workers=0, model_dir=base / "bridge", progress=False
    )
    tiny_vlm().save_pretrained(base / "vlm")
    return World(base / "bridge", base / "photos", base / "index", base / "vlm", base)


def test_the_table_is_large_and_its_names_unique() -> None:
    names = [name for name, _, _ in ROWS]
    assert len(names) >= 80 and len(set(names)) == len(names)


@pytest.mark.parametrize(("name", "argv", "culprit"), ROWS, ids=[row[0] for row in ROWS])
def test_a_bad_input_is_one_clear_line(name, argv, culprit, world: World, tmp_path: Path, capsys) -> None:
    world = World(world.bridge, world.photos, world.index, world.vlm, tmp_path)
    code, err = run(argv(world), capsys)
    assert code != 0, f"{name} was accepted"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors, f"no error line in: {err}"
    assert re.search(culprit, errors[-1]), f"{errors[-1]!r} does not name {culprit!r}"


@pytest.mark.parametrize(("name", "argv", "why"), ACCEPTED, ids=[row[0] for row in ACCEPTED])
def test_inputs_that_only_look_bad_are_accepted(
    name, argv, why, world: World, tmp_path: Path, capsys
) -> None:
    world = World(world.bridge, world.photos, world.index, world.vlm, tmp_path)
    code, err = run(argv(world), capsys)
    assert code == 0, f"{name} refused ({why}): {err}"


def test_with_v_the_traceback_is_shown_too(world: World, capsys) -> None:
    code, err = run(["-v", "search", str(world.scratch / "none"), "a red circle"], capsys)
    assert code == 2 and "Traceback" in err and "error:" in err.splitlines()[-1]


def test_good_inputs_beside_the_bad_ones_still_work(world: World, capsys) -> None:
    # The table's world is sound: the same verbs with its good files succeed.
    assert run(["search", str(world.index), "a red circle", "-k", "2"], capsys)[0] == 0
    Image.open(world.photo).verify()


def test_eval_with_no_readable_image_is_one_line(world: World, tmp_path: Path, monkeypatch, capsys) -> None:
    # Every image of the data file is corrupt: nothing to measure, said in one line (it was a KeyError).
    monkeypatch.setenv("DINOBRIDGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ghost.png").write_text("not an image")
    data = tmp_path / "ghosts.jsonl"
    data.write_text('{"image": "ghost.png", "caption": "a red circle"}\n')
    code, err = run(["eval", "retrieval", "--model", str(world.bridge), "--data", str(data)], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"dinobridge eval: error: no image of '{data}' could be read; see the warnings above"
    )
