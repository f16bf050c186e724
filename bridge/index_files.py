"""The on-disk format of an image index: a manifest naming immutable shards, each file written atomically.

An index is a directory:

    manifest.json              what is committed: format, bridge fingerprint, folder, shards and dropped rows
    shard-000001.rows.jsonl    one JSON object a line: path (relative to the folder), size, mtime_ns, sha256
    shard-000001.text.npy      (n, E) float16, L2-normalised bridge embeddings (the text space)
    shard-000001.image.npy     (n, D) float16, L2-normalised DINOv2 CLS tokens (image-to-image search)
    failures.log               the files the last run could not index, one "path: reason" a line
    faiss-<space>-<gen>.npz    the FAISS index of a large index (bridge/search.py), cached between searches
    part-<rank>.json           only during a run of N processes: what process <rank> wrote, for the merge

Why a killed run loses nothing: a shard is written under a name no manifest mentions yet, then one
`os.replace` of manifest.json commits it. Shards are never modified; the manifest lists the rows of deleted
or changed files as dropped. So a run killed at any moment leaves the last manifest, naming only complete
shards, and the next run deletes the orphans and embeds only what that manifest lacks.

Not here: what goes into an index or when (index.py), searching it (search.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "dinobridge-index/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the indexed folder, "/"-separated
    size: int
    mtime_ns: int
    sha256: str


@dataclass(eq=False)
class Shard:
    name: str
    records: list[FileRecord]
    text: np.ndarray  # (n, E) float16
    image: np.ndarray  # (n, D) float16
    dropped: set[int] = field(default_factory=set)


class Part:
    """What one of N processes indexed, written as shards the manifest does not name yet.

    Process r numbers its shards first + r, first + r + N, ..., so no two processes write the same name;
    `part-<r>.json` lists them, with the rows they replace and the counts, for the main process to merge.
    """

    PREFIX = "part-"

    def __init__(self, directory: Path, rank: int, world: int, first: int):
        self.directory, self.rank, self.world = directory, rank, world
        self.number, self.shards, self.drops = first + rank, [], []

    @classmethod
    def file_name(cls, rank: int) -> str:
        return f"{cls.PREFIX}{rank}.json"

    def add(self, records: list[FileRecord], text: list, image: list, drops: list) -> None:
        self.drops += [shard.records[row].path for shard, row in drops]
        if records:
            shard = write_shard(self.directory, self.number, records, np.stack(text), np.stack(image))
            self.shards.append((shard.name, len(records)))
            self.number += self.world

    def finish(self, counts: dict) -> None:
        """Write `part-<rank>.json`: the shards, the paths whose old rows they replace, and `counts`."""
        part = {"shards": self.shards, "drops": self.drops, "next_shard": self.number, **counts}
        write_atomic(self.directory / self.file_name(self.rank), json.dumps(part))


def write_atomic(path: Path, text: str) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8", errors="surrogateescape") as file:  # any file name
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(f"{path}.tmp", path)


def write_shard(directory: Path, number: int, records: list, text: np.ndarray, image: np.ndarray) -> Shard:
    name = f"shard-{number:06d}"
    text, image = np.ascontiguousarray(text, np.float16), np.ascontiguousarray(image, np.float16)
    for suffix, array in (("text", text), ("image", image)):
        with open(directory / f"{name}.{suffix}.npy", "wb") as file:
            np.save(file, array, allow_pickle=False)
            file.flush()
            os.fsync(file.fileno())
    write_atomic(directory / f"{name}.rows.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in records))
    return Shard(name, list(records), text, image)


def read_manifest(directory: Path) -> dict:
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(f"'{directory}' is not an image index: it has no {MANIFEST}")
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"'{directory / MANIFEST}' has format {manifest.get('format')!r}, not {FORMAT!r}")
    return manifest


def read_shard(directory: Path, entry: dict) -> Shard:
    name = entry["name"]
    records = [
        FileRecord(**json.loads(line)) for line in (directory / f"{name}.rows.jsonl").read_text().splitlines()
    ]
    text, image = (
        np.load(directory / f"{name}.{s}.npy", mmap_mode="r", allow_pickle=False) for s in ("text", "image")
    )
    if not len(records) == len(text) == len(image) == entry["rows"]:
        raise ValueError(
            f"index shard '{directory / name}' is damaged: the manifest says {entry['rows']} rows, its files "
            f"hold {len(records)} records, {len(text)} and {len(image)} embeddings; rebuild the index"
        )
    return Shard(name, records, text, image, set(entry["dropped"]))


def delete_shard_files(directory: Path, name: str) -> None:
    for suffix in ("rows.jsonl", "text.npy", "image.npy"):
        (directory / f"{name}.{suffix}").unlink(missing_ok=True)
