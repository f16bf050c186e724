"""Image-caption data sets (JSONL, CSV, COCO captions JSON, ImageFolder, the synthetic world) and, for the
LLM route, conversations in LLaVA's JSON format (and synthetic question-answer conversations).

Everything becomes a list of `Pair`s (an image and its captions) read up front, so a missing image or a
malformed line fails before any work, with the file and line named: every record's fields and their
types are checked, and a file is read as UTF-8 (with or without a byte-order mark) or refused by name.
Images are decoded later, once, by the feature cache; a corrupt image is skipped and counted there,
never a crash.

Not here: decoding pixels (bridge/images.py) or features (training/cache.py).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from bridge.images import is_supported_image, load_image
from bridge.synthetic import Scene, SyntheticWorld

if TYPE_CHECKING:
    from training.shards import ShardImage

# Captions per synthetic scene. Wording varies across scenes already; more captions per scene cost text
# encoding time and, measured, gain less than the same time spent on more scenes.
SYNTHETIC_CAPTIONS = 1


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the line and the fix."""


@dataclass
class Pair:
    # an absolute image path, or what renders one on demand: a synthetic scene, a shard's member
    # (training/shards.py ShardImage); those carry their own cache `key`
    image: str | Scene | ShardImage
    captions: list[str]
    origin: str  # where the pair was read, for messages: "pairs.jsonl:12"

    @property
    def key(self) -> str:
        """Identifies the image's content for caches: path, size and mtime, or the scene's or member's key."""
        if not isinstance(self.image, str):
            return self.image.key
        stat = os.stat(self.image)
        return f"{self.image}|{stat.st_size}|{stat.st_mtime_ns}"

    def load_image(self) -> Image.Image:
        return load_image(self.image) if isinstance(self.image, str) else self.image.render()


def load_pairs(spec: str, image_root: str | None = None) -> list[Pair]:
    """Read a data set: `x.jsonl`, `x.csv`, a COCO captions `x.json` (images under `image_root`, default
    the JSON's folder), or `synthetic:N` (N scenes of the synthetic world, seed 0; `synthetic:N:SEED`).
    """
    if spec.startswith("synthetic:"):
        count, seed = parse_synthetic_spec(spec)
        return synthetic_pairs(count, seed=seed)
    path = Path(spec)
    if path.is_dir():
        raise DataError(
            f"data '{spec}' is a folder; give a file that lists its images and captions: pairs.jsonl, "
            "pairs.csv or a COCO captions .json"
        )
    if not path.is_file():
        raise DataError(f"data file '{spec}' does not exist")
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv, ".json": _read_coco}
    suffix = path.suffix.lower()  # PAIRS.CSV, as Windows tools name files
    if suffix not in readers:
        raise DataError(f"data file '{spec}' is not .jsonl, .csv or COCO .json, nor synthetic:N")
    pairs = readers[suffix](path, _image_root(image_root))
    if not pairs:
        raise DataError(f"data file '{spec}' holds no image-caption pairs")
    return pairs


def synthetic_origin(scene: Scene, seed: int) -> str:
    """Where a synthetic scene comes from, for messages: the data spec and the scene's index."""
    return f"synthetic:{seed}:{scene.key.rsplit('/', 1)[1]}"


def synthetic_pairs(count: int, seed: int = 0, start: int = 0, distinct: bool = False) -> list[Pair]:
    world = SyntheticWorld(seed)
    return [
        Pair(scene, scene.captions(SYNTHETIC_CAPTIONS), synthetic_origin(scene, seed))
        for scene in world.scenes(start, count, distinct=distinct)
    ]


def synthetic_object_phrases(count: int, seed: int = 0, start: int = 0) -> list[Pair]:
    """Scenes with their objects' phrases as captions ("a small red circle in the top left"), one per
    object: finer-grained text than whole captions (training/prealign.py matches visual tokens to them)."""
    return [
        Pair(scene, [obj.phrase for obj in scene.objects], synthetic_origin(scene, seed))
        for scene in SyntheticWorld(seed).scenes(start, count)
    ]


# The held-out split when a config leaves `held_out` unset: a tenth of the data, at most this many, so a
# user's 120 pairs keep 108 to train on and COCO still holds out an evaluation set of 500.
HELD_OUT_CAP = 500


def held_out_count(held_out: float | None, total: int) -> int:
    """How many of `total` items `held_out` sets aside: a count, a fraction if < 1, None: the default."""
    if held_out is None:
        return min(HELD_OUT_CAP, total // 10)
    return round(total * held_out) if held_out < 1 else int(held_out)


def synthetic_held_out_count(held_out: float | None, total: int) -> int:
    """Held-out scenes of `synthetic:N`: new ones, which take nothing from training's `total`, so unset it
    is the full HELD_OUT_CAP."""
    return HELD_OUT_CAP if held_out is None else held_out_count(held_out, total)


def held_out_split(pairs: list, held_out: float | None, seed: int, what: str = "pairs") -> tuple[list, list]:
    """(train, held-out) of `pairs` (or conversations): a seeded shuffle, then `held_out` of them
    (`held_out_count`) aside."""
    count = held_out_count(held_out, len(pairs))
    if not 0 <= count < len(pairs):
        raise DataError(f"held_out={held_out} leaves no training data out of {len(pairs)} {what}; lower it")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return [pairs[i] for i in order[count:]], [pairs[i] for i in order[:count]]


def load_image_folder(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """An ImageFolder layout (root/class_name/image) -> (image paths, label indices, class names)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"'{root}' has no class sub-folders; expected root/<class name>/<image>")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and is_supported_image(path):
                paths.append(str(path))
                labels.append(label)
    if not paths:
        raise DataError(f"'{root}' holds no supported images under its class folders")
    return paths, labels, [name.replace("_", " ") for name in classes]


# The segmentation layout (VOC / ADE20K-like): images and same-named PNG label masks side by side.
SEGMENTATION_IMAGES, SEGMENTATION_MASKS, SEGMENTATION_CLASSES = "images", "masks", "classes.txt"


def load_segmentation_folder(root: str | Path) -> tuple[list[tuple[str, str]], list[str]]:
    """root/images/<name>.<ext>, root/masks/<name>.png, root/classes.txt -> ([(image, mask)], class names).

    classes.txt holds one name a line; a mask pixel's value is its class's line number counted from 0,
    and line 0 names the background (VOC's "background", ADE's "other"). An image without a mask fails
    here, before any work, with both paths named.
    """
    root = Path(root)
    names_file, image_dir, mask_dir = (
        root / n for n in (SEGMENTATION_CLASSES, SEGMENTATION_IMAGES, SEGMENTATION_MASKS)
    )
    for path in (names_file, image_dir, mask_dir):
        if not path.exists():
            raise DataError(
                f"'{root}' is not a segmentation folder: '{path.name}' is missing "
                f"(expected {SEGMENTATION_IMAGES}/, {SEGMENTATION_MASKS}/ and {SEGMENTATION_CLASSES})"
            )
    class_names = [line.strip() for line in read_text(names_file).splitlines() if line.strip()]
    if len(class_names) < 2:
        raise DataError(
            f"'{names_file}' names {len(class_names)} class(es); it needs the background on line 1 "
            "and at least one object class after it"
        )
    samples = []
    for image in sorted(p for p in image_dir.iterdir() if p.is_file() and is_supported_image(p)):
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"image '{image}' has no label mask (looked for '{mask}')")
        samples.append((str(image), str(mask)))
    if not samples:
        raise DataError(f"'{image_dir}' holds no supported images")
    return samples, class_names


def load_mask(path: str | Path) -> np.ndarray:
    """A PNG label mask -> (H, W) int64 labels. Palette (VOC) and greyscale (ADE) PNGs hold the labels
    as pixel values; an RGB mask holds colours, not labels, and is refused."""
    with Image.open(path) as mask:
        if mask.mode not in ("P", "L", "I", "I;16"):
            raise DataError(
                f"mask '{path}' is a {mask.mode} image; label masks are palette or greyscale PNGs whose pixel "
                "values are class indices"
            )
        return np.asarray(mask).astype(np.int64)


def parse_synthetic_spec(spec: str) -> tuple[int, int]:
    """`synthetic:N` or `synthetic:N:SEED` -> (N, SEED)."""
    parts = spec.split(":")
    try:
        count, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (ValueError, IndexError):
        raise DataError(f"'{spec}' is not synthetic:N or synthetic:N:SEED (e.g. synthetic:5000)") from None
    if count < 1:
        raise DataError(f"'{spec}' asks for {count} scenes; ask for at least 1")
    return count, seed


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with or without the byte-order mark Excel and Notepad write, or UTF-16
    with its byte-order mark. Any other encoding is refused with the file, line and byte named, never
    decoded as something it is not."""
    data = path.read_bytes()
    # Excel's "Unicode Text" and PowerShell's Out-File write UTF-16, always with a byte-order mark.
    utf16 = data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    try:
        text = data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}:{line}: not {'UTF-16' if utf16 else 'UTF-8'} text "
            f"(byte 0x{data[error.start]:02x} at offset {error.start:,}); "
            "re-save the file as UTF-8 (Excel: 'CSV UTF-8'; or iconv -f latin1 -t utf-8)"
        ) from None
    if not text.strip():
        raise DataError(f"data file '{path}' is empty")
    return text


def _read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def _shown(value, limit: int = 60) -> str:
    """A JSON value as the user wrote it, cut short, for messages."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _image_root(image_root: str | None) -> Path | None:
    if image_root is None:
        return None
    if not Path(image_root).is_dir():
        raise DataError(
            f"image root '{image_root}' is not a folder; give the folder the image paths are relative to"
        )
    return Path(image_root)


def _image_path(base: Path, name, origin: str, key: str = "image") -> str:
    if not isinstance(name, str) or not name.strip():
        raise DataError(f'{origin}: "{key}" must be an image path (a non-empty string), got {_shown(name)}')
    path = Path(name) if Path(name).is_absolute() else base / name
    if not path.exists():
        raise DataError(f"{origin}: image '{name}' not found (looked for '{path}')")
    if path.is_dir():
        raise DataError(f"{origin}: image '{name}' is a folder ('{path}'); name an image file")
    return str(path.resolve())


def _captions(record: dict, origin: str) -> list[str]:
    if "captions" in record:
        captions = record["captions"]
    elif "caption" in record:
        captions = record["caption"]
    else:
        raise DataError(f'{origin}: needs a non-empty "caption" string or "captions" list; it has neither')
    if isinstance(captions, str):
        captions = [captions]
    if (
        not isinstance(captions, list)
        or not captions
        or not all(isinstance(c, str) and c.strip() for c in captions)
    ):
        raise DataError(
            f'{origin}: needs a non-empty "caption" string or "captions" list of non-empty strings, '
            f"got {_shown(captions)}"
        )
    return [c.strip() for c in captions]


def _read_jsonl(path: Path, image_root: Path | None) -> list[Pair]:
    base = image_root or path.parent
    pairs = []
    # split("\n"), not splitlines(): a caption may hold U+2028 and other breaks that JSON leaves raw
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        origin = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{origin}: not valid JSON ({error.msg})") from None
        pairs.append(_record_pair(record, base, origin))
    return pairs


def _record_pair(record, base: Path, origin: str) -> Pair:
    """One {"image": path, "caption" or "captions": ...} record: a line of .jsonl, an item of a .json list."""
    if not isinstance(record, dict):
        raise DataError(
            f'{origin}: expected an object {{"image": "path", "caption": "..."}}, got {_shown(record)}'
        )
    if "image" not in record:
        raise DataError(f'{origin}: has no "image" key; expected {{"image": "path", "caption": "..."}}')
    return Pair(_image_path(base, record["image"], origin), _captions(record, origin), origin)


def _read_csv(path: Path, image_root: Path | None) -> list[Pair]:
    base = image_root or path.parent
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), skipinitialspace=True)
    try:
        if reader.fieldnames:  # "image, caption", as people type a header
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DataError(
                f"{path}: needs a header with 'image' and 'caption' columns, got {reader.fieldnames}"
            )
        # Several rows may caption one image; they become one pair with several captions.
        by_image: dict[str, Pair] = {}
        for row in reader:
            origin = f"{path}:{reader.line_num}"  # a quoted caption may span lines: its last one
            if None in row:  # DictReader's key for the cells past the header's columns
                raise DataError(
                    f"{origin}: has more cells than the header's {len(reader.fieldnames)} columns; put a "
                    'caption that holds a comma in double quotes ("a dog, running")'
                )
            missing = [column for column in ("image", "caption") if row[column] is None]
            if missing:
                raise DataError(
                    f"{origin}: has no '{missing[0]}' cell (fewer cells than the header's columns)"
                )
            image = _image_path(base, row["image"], origin)
            captions = _captions(row, origin)
            if image in by_image:
                by_image[image].captions.extend(captions)
            else:
                by_image[image] = Pair(image, captions, origin)
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({error})") from None
    return list(by_image.values())


def _read_coco(path: Path, image_root: Path | None) -> list[Pair]:
    """A COCO captions file, or a JSON list of the records a .jsonl holds a line each."""
    data = _read_json(path)
    if isinstance(data, list):
        base = image_root or path.parent
        return [_record_pair(record, base, f"{path}: record #{number}") for number, record in enumerate(data)]
    if not (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    ):
        raise DataError(
            f"{path}: not a COCO captions file: needs an object with 'images' and 'annotations' lists "
            '(or a list of {"image": "path", "caption": "..."} records)'
        )
    images: dict[int | str, str] = {}
    for number, item in enumerate(data["images"]):
        if not isinstance(item, dict) or not _is_id(item.get("id")) or "file_name" not in item:
            raise DataError(
                f'{path}: image #{number}: expected {{"id": 1, "file_name": "path"}}, got {_shown(item)}'
            )
        images[item["id"]] = item["file_name"]
    captions: dict[int | str, list[str]] = {}
    for number, item in enumerate(data["annotations"]):
        origin = f"{path}: annotation #{number}"
        if not isinstance(item, dict):
            raise DataError(f'{origin}: expected {{"image_id": 1, "caption": "..."}}, got {_shown(item)}')
        image_id = item.get("image_id")
        if not _is_id(image_id) or image_id not in images:
            raise DataError(f"{origin}: names image_id {_shown(image_id)}, not an id in 'images'")
        captions.setdefault(image_id, []).extend(_captions(item, origin))
    base = image_root or path.parent
    return [
        Pair(
            _image_path(base, images[i], f"{path}: image id {i}", "file_name"), caps, f"{path}: image id {i}"
        )
        for i, caps in captions.items()
    ]


def _is_id(value) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


# ---- LLM route: conversations ------------------------------------------------------------------------------

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's data writes this in the human turn where each image goes
CAPTION_PROMPT = "Describe the image."  # what image-caption data asks, as LLM-route conversations
LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Conversation:
    images: list[str | Scene | ShardImage]  # in the order of the placeholders in the turns
    turns: list[tuple[str, str]]  # (role: user | assistant | system, text); images as <image> in user turns
    origin: str  # "llava.json: entry 12", for messages
    kind: str = ""  # synthetic questions: colour | shape | position | count | caption

    def pairs(self) -> list[Pair]:
        """Its images as Pairs (no captions), the unit the feature cache stores."""
        return [Pair(image, [], f"{self.origin} image {i}") for i, image in enumerate(self.images)]


def load_conversations(spec: str, image_root: str | None = None) -> list[Conversation]:
    """LLaVA conversation JSON (a list of {"image": path or [paths], "conversations": [{"from": "human" |
    "gpt", "value": ...}]}, images relative to `image_root` or the file's folder), image-caption data
    (any `load_pairs` format, turned into "describe the image" conversations), or `synthetic:N[:SEED]`
    (N scenes, one question each, every kind the world asks)."""
    if spec.startswith("synthetic:"):
        count, seed = parse_synthetic_spec(spec)
        return synthetic_conversations(count, seed=seed)
    path = Path(spec)
    if path.suffix != ".json" or not path.is_file():
        return caption_conversations(load_pairs(spec, image_root))
    entries = _read_json(path)
    if isinstance(entries, dict) and "annotations" in entries:
        return caption_conversations(load_pairs(spec, image_root))  # COCO captions
    if not isinstance(entries, list):
        raise DataError(
            f"{path}: LLaVA conversation data is a JSON list of entries, got {type(entries).__name__}"
        )
    base = _image_root(image_root) or path.parent
    conversations = [
        _llava_entry(entry, f"{path}: entry {number}", base) for number, entry in enumerate(entries)
    ]
    if not conversations:
        raise DataError(f"{path} holds no conversations")
    return conversations


def caption_conversations(pairs: list[Pair], prompt: str = CAPTION_PROMPT) -> list[Conversation]:
    """Image-caption pairs as LLaVA stage-1 conversations: the image and a fixed prompt, the caption as
    the answer (the first caption of each pair)."""
    return [
        Conversation([pair.image], caption_turns(pair.captions[0], prompt), pair.origin, "caption")
        for pair in pairs
    ]


def caption_turns(caption: str, prompt: str = CAPTION_PROMPT) -> list[tuple[str, str]]:
    """A caption as a stage-1 conversation's turns: the image and `prompt` asked, the caption answered."""
    return [("user", f"{IMAGE_PLACEHOLDER}\n{prompt}"), ("assistant", caption)]


def synthetic_conversations(
    count: int,
    seed: int = 0,
    start: int = 0,
    kinds: tuple[str, ...] = ("colour", "shape", "position", "count", "caption"),
    caption_prompt: str = CAPTION_PROMPT,
) -> list[Conversation]:
    """One single-turn conversation per scene: a question of one of `kinds` (picked by a seeded draw among
    the kinds the scene can answer), or a caption request."""
    world = SyntheticWorld(seed)
    rng = random.Random(seed * 7919 + start)
    conversations = []
    for scene in world.scenes(start, count):
        options = [q for q in scene.questions() if q[2] in kinds]
        if "caption" in kinds:
            options.append((caption_prompt, scene.captions(1)[0], "caption"))
        if not options:
            continue
        question, answer, kind = rng.choice(options)
        origin = synthetic_origin(scene, seed)
        conversations.append(
            Conversation(
                [scene], [("user", f"{IMAGE_PLACEHOLDER}\n{question}"), ("assistant", answer)], origin, kind
            )
        )
    return conversations


def _llava_entry(entry, origin: str, base: Path) -> Conversation:
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise DataError(
            f'{origin}: expected {{"image": ..., "conversations": [{{"from": ..., "value": ...}}]}}, '
            f"got {_shown(entry)}"
        )
    names = entry.get("image", [])  # no "image" key: a text-only conversation
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list):
        raise DataError(
            f'{origin}: "image" must be a path or a list of paths (leave it out for a text-only '
            f"conversation), got {_shown(names)}"
        )
    images = [_image_path(base, name, origin) for name in names]
    turns = llava_turns(entry["conversations"], origin)
    check_placeholders(turns, len(images), origin)
    return Conversation(images, turns, origin)


def llava_turns(turns: list, origin: str) -> list[tuple[str, str]]:
    """LLaVA's `conversations` list ([{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}])
    as (role, text) turns; a turn that is not one, or no gpt/assistant turn to learn from, is a DataError
    naming `origin` (a file's entry, or a shard sample's member)."""
    checked = []
    for number, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(
                f'{origin}, turn {number}: needs "from" (one of {", ".join(LLAVA_ROLES)}) and a "value" '
                f"string, got {_shown(turn)}"
            )
        checked.append((role, turn["value"]))
    if not any(role == "assistant" for role, _ in checked):
        raise DataError(f"{origin}: has no gpt/assistant turn, so nothing to learn from")
    return checked


def check_placeholders(turns: list[tuple[str, str]], images: int, origin: str) -> None:
    """Refuse turns whose IMAGE_PLACEHOLDERs are not one per image: each image is spliced in at one."""
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placeholders != images:
        raise DataError(
            f"{origin}: {images} image(s) but {placeholders} {IMAGE_PLACEHOLDER} placeholder(s); "
            f"put one {IMAGE_PLACEHOLDER} in the human turns per image"
        )
