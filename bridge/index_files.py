"""The on-disk format of an image index: a manifest naming immutable shards, each file written atomically.

An index is a directory:

    manifest.json              what is committed: format, bridge fingerprint, folder, shards and dropped rows
    shard-000001.rows.jsonl    one JSON object a line: path (relative to the folder), size, mtime_ns, sha256
    shard-000001.text.npy      (n, E) float16, L2-normalised bridge embeddings (the text space)
    shard-000001.image.npy     (n, D) float16, L2-normalised DINOv2 CLS tokens (image-to-image search)
    failures.log               the files the last run could not index, one "path: reason" a line
    faiss-<space>-<gen>.npz    what a search back-end caches between searches (search.py): FAISS's index
                               of a large collection, named by the manifest generation it was built from
    part-<rank>.json           only during a run of N processes: what process <rank> wrote, for the merge

Why a killed run loses nothing: a shard is written under a name no manifest mentions yet, then one
`os.replace` of manifest.json commits it. Shards are never modified; the manifest lists the rows of deleted
or changed files as dropped. So a run killed at any moment leaves the last manifest, naming only complete
shards, and the next run deletes the orphans and embeds only what that manifest lacks.

`IndexStore` owns these files and the committed state they describe: every change to an index (new
shards, dropped rows, the parts of N processes, a compaction) goes through it, as one manifest write.

Not here: what goes into an index or when (index_update.py), queries (index.py, search.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "dinobridge-index/1"
MANIFEST = "manifest.json"
FAILURE_LOG = "failures.log"
COMPACT_SHARDS = 32  # an update leaving more shards than this (or 25% of rows dropped) compacts the index
SHARD_ROWS = 65_536  # rows per shard when compacting or saving


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


class IndexStore:
    """The files of one index directory and the committed state they hold: the manifest, its shards, and
    where each indexed path's live row is. Memory follows the disk only once a manifest write succeeds."""

    def __init__(self, directory: Path, manifest: dict, shards: list[Shard]):
        self.directory, self.manifest = directory, manifest
        self._set_shards(shards)

    @classmethod
    def create(cls, directory: Path, fingerprint: str, root: Path) -> IndexStore:
        """An empty index of folder `root` in `directory`; its manifest is written by the first commit."""
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "fingerprint": fingerprint, "root": str(root)}
        manifest |= {"model_dir": None, "generation": 0, "next_shard": 1, "shards": []}
        return cls(directory, manifest, [])

    @classmethod
    def open(cls, directory: Path) -> IndexStore:
        """The index committed in `directory`; embeddings stay memory-mapped until a view is asked for."""
        manifest = read_manifest(directory)
        return cls(directory, manifest, [read_shard(directory, entry) for entry in manifest["shards"]])

    def _set_shards(self, shards: list[Shard]) -> None:
        self.shards = shards
        # path -> (shard, row) of every row not dropped: what the index holds
        self.live = {r.path: (s, i) for s in shards for i, r in enumerate(s.records) if i not in s.dropped}
        self._views: dict[str, np.ndarray] = {}  # "text"/"image" -> (N, dim) live rows, made on first use
        self._paths: list[str] | None = None

    @property
    def root(self) -> Path:
        """The indexed folder; records name files relative to it."""
        return Path(self.manifest["root"])

    @property
    def generation(self) -> int:
        """Counts the manifest writes: what is computed from the live rows is valid for one generation."""
        return self.manifest["generation"]

    def __len__(self) -> int:
        return len(self.live)

    @property
    def paths(self) -> list[str]:
        """Live paths relative to the indexed folder, in the row order of `view`."""
        if self._paths is None:
            self._paths = [r.path for s in self.shards for i, r in enumerate(s.records) if i not in s.dropped]
        return self._paths

    def view(self, space: str) -> np.ndarray:
        """(N, dim) float16 live rows of one space ("text" or "image"), in `paths` order."""
        if space not in self._views:
            parts = [np.delete(getattr(s, space), sorted(s.dropped), axis=0) for s in self.shards]
            self._views[space] = np.concatenate(parts) if parts else np.zeros((0, 1), np.float16)
        return self._views[space]

    def record(self, relative: str) -> FileRecord | None:
        shard, row = self.live.get(relative, (None, 0))
        return shard.records[row] if shard else None

    def commit(self, records: list[FileRecord], text: list, image: list, drops: list) -> None:
        """Write one shard (if there are records) and the manifest naming it: the moment the index changes.
        `drops` are (shard, row) pairs of `live`."""
        number = self.manifest["next_shard"]
        new = (
            [write_shard(self.directory, number, records, np.stack(text), np.stack(image))] if records else []
        )
        self._commit_shards(new, drops, next_shard=number + len(new))

    def merge_parts(self, world: int) -> list[dict]:
        """Commit the parts of `world` processes (Part) in one manifest write and delete their files; the
        parts as they were written, by rank, for the counts each process added."""
        parts = [json.loads((self.directory / Part.file_name(rank)).read_text()) for rank in range(world)]
        shards, drops, next_shard = [], [], self.manifest["next_shard"]
        for part in parts:
            shards += [
                read_shard(self.directory, {"name": n, "rows": r, "dropped": []}) for n, r in part["shards"]
            ]
            drops += [self.live[path] for path in part["drops"] if path in self.live]
            next_shard = max(next_shard, part["next_shard"])
        self._commit_shards(shards, drops, next_shard)
        for rank in range(world):
            (self.directory / Part.file_name(rank)).unlink()
        return parts

    def _commit_shards(self, new: list[Shard], drops: list[tuple[Shard, int]], next_shard: int) -> None:
        """Add written shards and drop rows in one manifest write. A record whose path is indexed replaces
        that row in the same commit, so no path is ever doubled."""
        drops = drops + [self.live[r.path] for s in new for r in s.records if r.path in self.live]
        shards = self.shards + new
        dropped = {s.name: set(s.dropped) for s in shards}
        for shard, row in drops:
            dropped[shard.name].add(row)
        kept = [s for s in shards if len(dropped[s.name]) < len(s.records)]
        self._write_manifest(kept, dropped, next_shard=next_shard)
        for shard in shards:  # committed: only now does the index in memory follow
            shard.dropped = dropped[shard.name]
            if shard not in kept:
                delete_shard_files(self.directory, shard.name)
        self._set_shards(kept)

    def _write_manifest(self, shards: list[Shard], dropped: dict[str, set[int]], next_shard: int) -> None:
        manifest = dict(self.manifest, generation=self.manifest["generation"] + 1, next_shard=next_shard)
        manifest["shards"] = [
            {"name": s.name, "rows": len(s.records), "dropped": sorted(dropped[s.name])} for s in shards
        ]
        write_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self.manifest = manifest

    def remove_orphans(self) -> None:
        """Files a killed run wrote but never committed. Only writers call this; readers never delete."""
        named = {s.name for s in self.shards}
        for path in self.directory.iterdir():
            orphan = path.name.startswith("shard-") and path.name.split(".")[0] not in named
            if orphan or path.suffix == ".tmp" or path.name.startswith(Part.PREFIX):
                path.unlink()

    def fragmented(self) -> bool:
        """Whether enough shards or dropped rows piled up that `save` in place should compact them."""
        return len(self.shards) > COMPACT_SHARDS or 4 * sum(len(s.dropped) for s in self.shards) > len(self)

    def save(self, directory: Path) -> None:
        """Write the live rows compacted into as few shards as possible: into this directory (in place,
        atomically), or into a new empty one (a copy; this store keeps following its own)."""
        in_place = directory.resolve() == self.directory.resolve()
        if not in_place and directory.exists() and any(directory.iterdir()):
            raise FileExistsError(f"cannot save the index into '{directory}': it is not empty")
        directory.mkdir(parents=True, exist_ok=True)
        first = self.manifest["next_shard"] if in_place else 1
        paths, text, image, shards = self.paths, self.view("text"), self.view("image"), []
        for number, start in enumerate(range(0, len(paths), SHARD_ROWS), start=first):
            rows = slice(start, start + SHARD_ROWS)
            records = [self.record(p) for p in paths[rows]]
            shards.append(write_shard(directory, number, records, text[rows], image[rows]))
        target = self if in_place else IndexStore(directory, dict(self.manifest, generation=0), [])
        old = self.shards if in_place else []
        target._write_manifest(shards, {s.name: set() for s in shards}, next_shard=first + len(shards))
        target._set_shards(shards)
        for shard in old:
            delete_shard_files(directory, shard.name)


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
