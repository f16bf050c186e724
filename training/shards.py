"""Webdataset tar shards as training data, both routes: `--data 'shards/{00000..00127}.tar'`, a `.txt`
list of shard paths or URLs (one a line), or a folder of `.tar` files.

A sample is what img2dataset writes: `00000001.jpg` (or .jpeg/.png/.webp) with `00000001.txt` holding the
caption, or `00000001.json` with a "caption" field. For the LLM route the `.json` may instead hold a LLaVA
"conversations" list (`[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]`, one
`<image>` for the sample's image); a captioned sample there becomes a "Describe the image." conversation,
as caption files do. Shards are streamed (the `webdataset` package's tar readers, shards split over
loader workers) straight into the feature cache: images are encoded a batch at a time and their bytes
dropped, so memory holds one fill batch of image bytes and every sample's captions or turns, never the
shards. Each image is keyed in the cache by shard, shard size and mtime, member name and member size, so
training then runs from cached features exactly as for image files, and a second run (or another
process under `accelerate launch`) reads a manifest of the samples instead of the shards.

A bad sample (corrupt image, no image, no caption or conversation, a blank caption, malformed turns) or
an unreadable shard is skipped and reported with its shard and key; the rest trains.

Not here: the feature cache (cache.py), file data sets (data.py), the training loops (align.py, vlm.py,
loop.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from bridge.config import ConfigError
from bridge.images import load_image
from training.cache import _write_json_atomically
from training.data import (
    Conversation,
    DataError,
    Pair,
    caption_turns,
    check_placeholders,
    llava_turns,
    read_text,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Images held in memory at once while filling the cache: about 100 MB of img2dataset's 256 px JPEGs.
FILL_BATCH = 1024
_REMOTE = ("http://", "https://", "pipe:", "s3://", "gs://")


def is_shard_spec(spec: str) -> bool:
    """Whether `--data` names shards: a `.tar` path or brace pattern, a `.txt` list, or a folder."""
    return spec.endswith((".tar", ".txt")) or ("{" in spec and ".tar" in spec) or Path(spec).is_dir()


def shard_urls(spec: str) -> list[str]:
    """The shards `spec` names, in order: a brace pattern expanded, a `.txt` list read (relative paths
    from its folder; blank lines and # comments skipped), a folder's `*.tar` sorted. A local shard that
    is missing fails here, before any work, with its name."""
    from braceexpand import braceexpand

    if Path(spec).is_dir():
        urls = sorted(str(path) for path in Path(spec).glob("*.tar"))
        if not urls:
            raise DataError(
                f"folder '{spec}' holds no .tar shards; --data takes a folder of webdataset .tar shards, a "
                "shard pattern ('shards/{00000..00127}.tar'), a .txt list of shards, or a file that lists "
                "images and captions (pairs.jsonl, pairs.csv, a COCO captions .json)"
            )
        return urls
    if spec.endswith(".txt"):
        listing = Path(spec)
        if not listing.is_file():
            raise DataError(f"shard list '{spec}' does not exist")
        lines = [line.strip() for line in read_text(listing).splitlines()]
        names = [line for line in lines if line and not line.startswith("#")]
        urls = [name if _is_remote(name) else str(listing.parent / name) for name in names]
        if not urls:
            raise DataError(f"shard list '{spec}' names no shards; put one path or URL a line")
    else:
        urls = list(braceexpand(spec))
    missing = [url for url in urls if not _is_remote(url) and not Path(url).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"shard '{missing[0]}'{more} of '{spec}' does not exist; check the path or range")
    return urls


@dataclass
class ShardImage:
    """An image member of a shard. Its bytes are held only until the feature cache has encoded it."""

    shard: str
    member: str  # "00000001.jpg"
    key: str  # the feature cache's key: shard, shard size and mtime, member and member size
    data: bytes | None = field(default=None, repr=False)

    def render(self) -> Image.Image:
        """The decoded image (Pair.load_image calls this, as it does a synthetic scene's)."""
        if self.data is None:
            raise OSError(f"'{self.member}' of shard '{self.shard}' is no longer in memory; train again")
        return load_image(self.data)


# What a sample is labelled with besides its image, read from its members (extension -> bytes): a
# JSON-able dict, or a DataError whose message says why the sample cannot train.
Label = Callable[[dict], dict]


def stream_shards(
    spec: str, feature_cache, workers: int = 0, progress: bool = True
) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Every usable sample of the shards as a Pair, its features in `feature_cache` (filled as the shards
    stream by), and the skipped samples as (origin "shard:key", reason)."""
    samples, skipped = _stream(spec, feature_cache, workers, progress, _captions, "")
    return [Pair(pair.image, label["captions"], pair.origin) for pair, label in samples], skipped


def stream_conversation_shards(
    spec: str, feature_cache, workers: int = 0, progress: bool = True
) -> tuple[list[Conversation], list[tuple[str, str]]]:
    """The LLM route's `stream_shards`: every usable sample as a one-image Conversation (its LLaVA
    turns, or its caption asked for), and the skipped samples as (origin "shard:key", reason)."""
    samples, skipped = _stream(spec, feature_cache, workers, progress, _conversation, "-conversations")
    conversations = [
        Conversation([pair.image], [tuple(turn) for turn in label["turns"]], pair.origin, label["kind"])
        for pair, label in samples
    ]
    return conversations, skipped


def check_cached(spec: str, cache: bool) -> None:
    """Refuse shards with `train.cache: false`: they are read once, into the feature cache."""
    if not cache:
        raise ConfigError(
            f"webdataset shards '{spec}' are read through the feature cache; train.cache: false takes file "
            "data sets only: set train.cache: true (and train.cache_dir on a large disk)"
        )


def _stream(
    spec: str, feature_cache, workers: int, progress: bool, label: Label, kind: str
) -> tuple[list[tuple[Pair, dict]], list[tuple[str, str]]]:
    """Every usable sample as (a Pair of its image, its `label`), its features in `feature_cache`, and
    the skipped samples as (origin, reason).

    The samples are kept in a manifest next to the features (`kind` tells one reading of the shards from
    another); when it exists and every image it names is in the cache, the shards are not read again
    (another process, a resumed or repeated run).
    """
    urls = shard_urls(spec)
    manifest = feature_cache.directory / "shards" / f"{_manifest_name(urls)}{kind}.json"
    known = _read_manifest(manifest, feature_cache)
    if known is not None:
        return known
    samples: list[tuple[Pair, dict]] = []
    skipped: list[tuple[str, str]] = []
    batch: list[Pair] = []

    def fill() -> None:
        feature_cache.fill(batch, workers=workers, progress=False)
        for pair in batch:
            pair.image.data = None  # encoded (or failed): the bytes are not needed again
        batch.clear()

    count = 0
    for record in _samples(urls, workers, label):
        count += 1
        if "error" in record:
            skipped.append((record["origin"], record["error"]))
            continue
        image = ShardImage(record["shard"], record["member"], record["cache_key"], record["data"])
        pair = Pair(image, [], record["origin"])
        samples.append((pair, record["label"]))
        batch.append(pair)
        if len(batch) >= FILL_BATCH:
            feature_cache.check_room(batch)
            fill()
        if progress and count % 10_000 == 0:
            log.info("read %s samples of %d shards", f"{count:,}", len(urls))
    feature_cache.check_room(batch)
    fill()
    if not samples:
        raise DataError(f"no usable sample in the {len(urls)} shard(s) of '{spec}'; see the skipped list")
    _write_manifest(manifest, samples, skipped)
    for origin, reason in skipped:
        log.warning("skipped %s: %s", origin, reason)
    return samples, skipped


def _samples(urls: list[str], workers: int, label: Label) -> Iterator[dict]:
    """Records of the shards' samples, read by `workers` loader processes (0: here), each its own shards
    (webdataset's split_by_worker)."""
    import webdataset as wds
    from torch.utils.data import DataLoader, IterableDataset

    class Samples(IterableDataset):
        def __iter__(self):
            for url in wds.split_by_worker(urls):
                yield from _shard_records(url, label)

    loader = DataLoader(Samples(), batch_size=None, num_workers=min(workers, len(urls)))
    yield from loader


def _shard_records(url: str, label: Label) -> Iterator[dict]:
    """One shard's samples as records: usable ones with their bytes and label, bad ones with the
    reason; a shard that breaks off is reported once, after the samples read before the break."""
    import webdataset as wds
    from webdataset.tariterators import base_plus_ext, tar_file_expander

    stamp = ""
    if not _is_remote(url):
        stat = os.stat(url)
        stamp = f"{stat.st_size}|{stat.st_mtime_ns}"
    sample: dict = {}  # grouped here, not by webdataset's group_by_keys, which drops the sample in
    # progress when the shard breaks: its members read before the break are still reported
    try:
        for member in tar_file_expander([{"url": url, "stream": wds.gopen(url)}]):
            key, extension = base_plus_ext(member.get("fname", ""))
            if key is None:  # the end-of-shard marker, or a member without an extension
                continue
            if key != sample.get("__key__"):
                if sample:
                    yield _record(url, stamp, sample, label)
                sample = {"__key__": key}
            sample[extension.lower()] = member["data"]
    except Exception as error:  # a truncated or unreadable tar: what was read before it stays
        if sample:
            yield _record(url, stamp, sample, label)
        yield {"origin": url, "error": f"shard unreadable past this point ({_first_message(error)})"}
        return
    if sample:
        yield _record(url, stamp, sample, label)
    # tarfile takes a shard cut at a member's header for its end; a whole tar ends in two zero blocks.
    if stamp and not _ends_like_a_tar(url):
        yield {
            "origin": url,
            "error": "shard cut short (no end-of-archive blocks): samples after the cut lost",
        }


def _ends_like_a_tar(path: str) -> bool:
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size % 512 or size < 1024:
            return False
        file.seek(size - 1024)
        return not any(file.read(1024))


def _first_message(error: Exception) -> str:
    """The first text in an exception's arguments (webdataset wraps the reader's error with its stream
    and URL), without the stream's repr."""
    parts = list(error.args)
    while parts and not isinstance(parts[0], str):
        parts = list(parts[0]) if isinstance(parts[0], tuple) else parts[1:]
    return parts[0].split(" @ <")[0] if parts else type(error).__name__


def _record(url: str, stamp: str, sample: dict, label: Label) -> dict:
    key = sample["__key__"]
    origin = f"{url}:{key}"
    extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if extension is None:
        members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
        return {"origin": origin, "error": f"no image member (.jpg/.jpeg/.png/.webp), only: {members}"}
    try:
        labelled = label(sample)
    except DataError as error:
        return {"origin": origin, "error": str(error)}
    member, data = f"{key}.{extension}", sample[extension]
    return {
        "origin": origin,
        "shard": url,
        "member": member,
        "cache_key": f"{url}|{stamp}|{member}|{len(data)}",
        "data": data,
        "label": labelled,
    }


NO_CAPTION = 'no caption (a .txt member, or .json with a "caption" field)'


def _captions(sample: dict) -> dict:
    """The text route's label: {"captions": [the caption]}, from `.txt` or the `.json`'s "caption"."""
    caption = None
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError("the .txt caption is not UTF-8 text") from None
    elif "json" in sample:
        caption = _json_object(sample).get("caption")
    if caption is None:
        raise DataError(NO_CAPTION)
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"blank caption {json.dumps(caption)}")
    return {"captions": [caption.strip()]}


def _conversation(sample: dict) -> dict:
    """The LLM route's label: {"turns": [(role, text)], "kind": ...}: the `.json`'s LLaVA "conversations"
    (one <image>, the sample's), or else the caption as a "Describe the image." conversation."""
    entry = _json_object(sample) if "json" in sample else {}
    if "conversations" in entry:
        if not isinstance(entry["conversations"], list):
            raise DataError(
                f'"conversations" is {json.dumps(entry["conversations"])[:60]}, not a list of '
                '{"from": ..., "value": ...} turns'
            )
        turns = llava_turns(entry["conversations"], "conversations")
        check_placeholders(turns, 1, "conversations")
        return {"turns": turns, "kind": ""}
    if "txt" not in sample and "caption" not in entry:
        raise DataError(
            f'no conversations (a .json member with a LLaVA "conversations" list) and {NO_CAPTION}'
        )
    return {"turns": caption_turns(_captions(sample)["captions"][0]), "kind": "caption"}


def _json_object(sample: dict) -> dict:
    try:
        entry = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        entry = None
    if not isinstance(entry, dict):
        raise DataError("the .json member is not a JSON object")
    return entry


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE)


def _manifest_name(urls: list[str]) -> str:
    """Names the shard list as it is now: a shard rewritten (size or mtime) gives another manifest."""
    stamps = [
        url if _is_remote(url) else f"{url}|{os.stat(url).st_size}|{os.stat(url).st_mtime_ns}" for url in urls
    ]
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:20]


# A manifest entry's fields besides the sample's label.
_PLACE = ("shard", "member", "key", "origin")


def _read_manifest(path: Path, feature_cache) -> tuple[list[tuple[Pair, dict]], list[tuple[str, str]]] | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    samples = [
        (
            Pair(ShardImage(entry["shard"], entry["member"], entry["key"]), [], entry["origin"]),
            {name: value for name, value in entry.items() if name not in _PLACE},
        )
        for entry in saved["pairs"]
    ]
    if not feature_cache.holds([pair.key for pair, _ in samples]):
        return None  # features deleted since: read the shards again
    return samples, [tuple(item) for item in saved["skipped"]]


def _write_manifest(path: Path, samples: list[tuple[Pair, dict]], skipped: list[tuple[str, str]]) -> None:
    entries = [
        {"shard": p.image.shard, "member": p.image.member, "key": p.key, "origin": p.origin, **label}
        for p, label in samples
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(path, {"pairs": entries, "skipped": skipped})
