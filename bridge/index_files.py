"""The on-disk format of an image index: a checked manifest naming immutable, checksummed shards.

An index is a directory:

    manifest.json              what is committed: kind, format version, bridge fingerprint, folder, and each
                               shard's rows, dropped rows and the SHA-256 of its three files' contents
    shard-000001.rows.jsonl    one JSON object a line: path (relative to the folder), size, mtime_ns, sha256
    shard-000001.text.npy      (n, E) float16, L2-normalised bridge embeddings (the text space)
    shard-000001.image.npy     (n, D) float16, L2-normalised DINOv2 CLS tokens (image-to-image search)
    failures.log               the files the last run could not index, one "path: reason" a line
    faiss-<space>-<gen>.npz    what a search back-end caches between searches (search.py): FAISS's index
                               of a large collection, named by the manifest generation it was built from
    part-<rank>.json           only during a run of N processes: what process <rank> wrote, for the merge
    writer.lock                while a writer runs: the lock (index_lock.py) and who holds it; one a
                               killed writer leaves is harmless, its lock died with it

Why a killed run loses nothing: every file is written under a temporary name and renamed when complete, a
shard under a name no manifest mentions yet, then one `os.replace` of manifest.json commits it. Shards are
never modified; the manifest lists the rows of deleted or changed files as dropped. So a run killed at any
moment, or stopped by a full disk, leaves the last manifest, naming only complete shards, and the next run
deletes the orphans and embeds only what that manifest lacks.

Why nothing damaged is searched: a shard's checksums are computed from what was written and kept in the
manifest. Opening an index checks each shard's rows (small, read anyway); its embeddings are memory-mapped
and checked on first use, once per process and space: one read, measured on 100k rows (2 cores, warm
page cache) at 0.05-0.1 s for 384-d text embeddings (77 MB) and 0.13-0.2 s for 768-d CLS tokens, against
about 1 s to open the index at all. A damaged shard is refused by name when searching, and
dropped and embedded again by the next update. A damaged manifest is named with its path; an update moves
it aside and builds afresh. Manifests of format 1 (no kind, no checksums) still open, their shards
unverified until the next update checksums them.

`IndexStore` owns these files and the committed state they describe: every change to an index (new
shards, dropped rows, the parts of N processes, a compaction, a repair) goes through it, as one manifest
write, by the one process that holds the index's lock.

Not here: the lock (index_lock.py), what goes into an index or when (index_update.py), queries (index.py,
search.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bridge.index_lock import index_lock

KIND = "dinobridge-image-index"
FORMAT_VERSION = 2
FIRST_FORMAT = "dinobridge-index/1"  # format 1 said only this, in a "format" key, and had no checksums
MANIFEST = "manifest.json"
FAILURE_LOG = "failures.log"
SHARD_FILES = {"rows": "rows.jsonl", "text": "text.npy", "image": "image.npy"}  # what -> file suffix
COMPACT_SHARDS = 32  # an update leaving more shards than this (or 25% of rows dropped) compacts the index
SHARD_ROWS = 65_536  # rows per shard when compacting or saving

log = logging.getLogger(__name__)


class IndexFileError(ValueError):
    """A file of an index that cannot be written or read (a full disk, no permission), said in one line
    with its path and the fix; a ValueError, so the command line reports it without a traceback."""

    @classmethod
    def of(cls, path: Path, error: OSError, action: str = "write") -> IndexFileError:
        reason = (error.strerror or str(error)).lower()
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free some space on that disk, or index into another --out"
        elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"make '{path.parent}' writable, or index into another --out"
        else:
            fix = "index into another --out"
        kept = "; the index keeps its last complete commit" if action == "write" else ""
        return cls(f"cannot {action} '{path}' ({reason}){kept}; {fix}")


class IndexDamagedError(ValueError):
    """An index whose files are not what its manifest says they are."""


class DamagedManifestError(IndexDamagedError):
    """A manifest that is not JSON or lacks what an index needs; an update moves it aside and starts afresh."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(
            f"index manifest '{path}' is damaged ({problem}); `dinobridge index FOLDER --model BRIDGE --out "
            f"{shlex.quote(str(path.parent))}` moves it aside and builds the index afresh"
        )


class _ShardDamage(Exception):
    """What is wrong with one shard's files, said in a few words."""


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
    sha256: dict[str, str] | None = None  # SHARD_FILES key -> digest of what was written; None: format 1
    verified: set[str] = field(default_factory=set)  # SHARD_FILES keys checked against sha256 here


class Part:
    """What one of N processes indexed, written as shards the manifest does not name yet.

    Process r numbers its shards first + r, first + r + N, ..., so no two processes write the same name;
    `part-<r>.json` lists them, with their checksums, the rows they replace and the counts, for the main
    process to merge.
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
            self.shards.append((shard.name, len(records), shard.sha256))
            self.number += self.world

    def finish(self, counts: dict) -> None:
        """Write `part-<rank>.json`: the shards, the paths whose old rows they replace, and `counts`."""
        part = {"shards": self.shards, "drops": self.drops, "next_shard": self.number, **counts}
        write_atomic(self.directory / self.file_name(self.rank), json.dumps(part))


class IndexStore:
    """The files of one index directory and the committed state they hold: the manifest, its shards, and
    where each indexed path's live row is. Memory follows the disk only once a manifest write succeeds.

    Shards whose files are damaged are kept apart in `damaged`: what asks for the rows (`len`, `paths`,
    `view`) refuses, naming them, and a writer's `repair` drops them."""

    def __init__(self, directory: Path, manifest: dict, shards: list[Shard], damaged: dict | None = None):
        self.directory, self.manifest = directory, manifest
        self.damaged: dict[str, tuple[str, int]] = dict(damaged or {})  # name -> (what is wrong, live rows)
        self._set_shards(shards)

    @classmethod
    def create(cls, directory: Path, fingerprint: str, root: Path) -> IndexStore:
        """An empty index of folder `root` in `directory`; its manifest is written by the first commit."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IndexFileError.of(directory, error, "create the index directory") from error
        return cls(directory, _empty_manifest(fingerprint, str(root)), [])

    @classmethod
    def open(cls, directory: Path) -> IndexStore:
        """The index committed in `directory`; embeddings stay memory-mapped until a view is asked for.
        Damaged shards are listed in `damaged` rather than raised, so that an update can repair them."""
        for _ in range(3):  # a compaction committed between reading the manifest and its shards: read again
            manifest = read_manifest(directory)
            shards, damaged = _read_shards(directory, manifest)
            if not damaged or _committed(directory) == manifest:
                break
        return cls(directory, manifest, shards, damaged)

    @classmethod
    def open_or_create(cls, directory: Path, fingerprint: str, root: Path) -> IndexStore:
        """What an update of folder `root` into `directory` starts from: the index there, or an empty one
        where there is none or its manifest is damaged (the update moves that aside: `catch_up`)."""
        if (directory / MANIFEST).is_file():
            with contextlib.suppress(DamagedManifestError):
                return cls.open(directory)
        return cls.create(directory, fingerprint, root)

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
        self._refuse_damaged()
        return len(self.live)

    @property
    def paths(self) -> list[str]:
        """Live paths relative to the indexed folder, in the row order of `view`."""
        self._refuse_damaged()
        if self._paths is None:
            self._paths = [r.path for s in self.shards for i, r in enumerate(s.records) if i not in s.dropped]
        return self._paths

    def view(self, space: str) -> np.ndarray:
        """(N, dim) float16 live rows of one space ("text" or "image"), in `paths` order, checked against
        their checksums the first time."""
        if space not in self._views:
            self._verify([space])
            self._refuse_damaged()
            parts = [np.delete(getattr(s, space), sorted(s.dropped), axis=0) for s in self.shards]
            self._views[space] = np.concatenate(parts) if parts else np.zeros((0, 1), np.float16)
        return self._views[space]

    def record(self, relative: str) -> FileRecord | None:
        shard, row = self.live.get(relative, (None, 0))
        return shard.records[row] if shard else None

    def _verify(self, spaces: Iterable[str]) -> None:
        """Check the shards' embeddings of `spaces` against their checksums, each once; a mismatch moves
        the shard to `damaged`."""
        for shard in self.shards:
            for space in spaces:
                if shard.sha256 is None or space in shard.verified:
                    continue
                if _sha256(getattr(shard, space)) != shard.sha256[space]:
                    what = f"checksum mismatch in {shard.name}.{SHARD_FILES[space]}"
                    self.damaged[shard.name] = (what, len(shard.records) - len(shard.dropped))
                    break
                shard.verified.add(space)
        if any(s.name in self.damaged for s in self.shards):
            self._set_shards([s for s in self.shards if s.name not in self.damaged])

    def _refuse_damaged(self) -> None:
        if not self.damaged:
            return
        one = len(self.damaged) == 1
        named = ", ".join(f"'{name}' ({what})" for name, (what, _) in sorted(self.damaged.items()))
        command = shlex.join(
            ["dinobridge", "index", str(self.root), "--model", self.manifest["model_dir"] or "BRIDGE"]
            + ["--out", str(self.directory)]
        )
        raise IndexDamagedError(
            f"{'shard' if one else 'shards'} {named} of index '{self.directory}' {'is' if one else 'are'} "
            f"damaged; run `{command}` to rebuild what {'it' if one else 'they'} held"
        )

    # --- writing: only the process holding the index's lock ------------------------------------------

    def catch_up(self) -> None:
        """Adopt what is committed now, which another writer may have changed since this store was read.
        A damaged manifest is moved aside, said in a warning, and the index starts afresh; an index of
        another folder or bridge is refused."""
        path = self.directory / MANIFEST
        try:
            committed = read_manifest(self.directory) if path.is_file() else None
        except DamagedManifestError as error:
            aside = path.with_name(f"{MANIFEST}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.replace(path, aside)
            except OSError as failure:
                raise IndexFileError.of(aside, failure, "move the damaged manifest to") from failure
            log.warning(
                "index manifest '%s' was damaged (%s): moved it aside to '%s'; building the index afresh",
                path,
                error.problem,
                aside,
            )
            committed = None
        model_dir = self.manifest["model_dir"]  # set for the next commit by whoever started this update
        if committed is None:
            if self.generation or self.shards or self.damaged:
                self.manifest = _empty_manifest(self.manifest["fingerprint"], str(self.root))
                self.damaged = {}
                self._set_shards([])
        else:
            for key, what in (("root", "folder"), ("fingerprint", "bridge with fingerprint")):
                if committed[key] != self.manifest[key]:
                    raise ValueError(
                        f"index '{self.directory}' was just written by another run, for the {what} "
                        f"'{committed[key]}', not '{self.manifest[key]}'; give each folder and bridge its "
                        "own index directory (--out)"
                    )
            if committed | {"model_dir": None} != self.manifest | {"model_dir": None}:
                shards, self.damaged = _read_shards(self.directory, committed)
                self.manifest = committed
                self._set_shards(shards)
        self.manifest["model_dir"] = model_dir or self.manifest["model_dir"]

    def repair(self) -> dict[str, tuple[str, int]]:
        """Check every shard against its checksums (one read of the index) and drop the damaged ones in one
        manifest write, deleting their files, so that the update that follows embeds their images again;
        what was dropped, as in `damaged`. Shards of format 1 get their checksums in the same write."""
        self._verify(["text", "image"])
        dropped = dict(self.damaged)
        if dropped or any(s.sha256 is None for s in self.shards):
            self._write_manifest(self.shards, {s.name: s.dropped for s in self.shards}, self.next_shard)
            self.damaged = {}
            for name in dropped:
                delete_shard_files(self.directory, name)
        return dropped

    @property
    def next_shard(self) -> int:
        return self.manifest["next_shard"]

    def commit(self, records: list[FileRecord], text: list, image: list, drops: list) -> None:
        """Write one shard (if there are records) and the manifest naming it: the moment the index changes.
        `drops` are (shard, row) pairs of `live`."""
        number = self.next_shard
        new = (
            [write_shard(self.directory, number, records, np.stack(text), np.stack(image))] if records else []
        )
        self._commit_shards(new, drops, next_shard=number + len(new))

    def merge_parts(self, world: int) -> list[dict]:
        """Commit the parts of `world` processes (Part) in one manifest write and delete their files; the
        parts as they were written, by rank, for the counts each process added."""
        parts = [json.loads((self.directory / Part.file_name(rank)).read_text()) for rank in range(world)]
        shards, drops, next_shard = [], [], self.next_shard
        for part in parts:
            for name, rows, sha256 in part["shards"]:
                entry = {"name": name, "rows": rows, "dropped": [], "sha256": sha256}
                try:
                    shards.append(read_shard(self.directory, entry))
                except _ShardDamage as damage:
                    raise IndexDamagedError(
                        f"shard '{name}' of index '{self.directory}', written by this run, is damaged "
                        f"({damage}); run the index again"
                    ) from None
            drops += [self.live[path] for path in part["drops"] if path in self.live]
            next_shard = max(next_shard, part["next_shard"])
        self._commit_shards(shards, drops, next_shard)
        for rank in range(world):
            (self.directory / Part.file_name(rank)).unlink()
        return parts

    def _commit_shards(self, new: list[Shard], drops: list[tuple[Shard, int]], next_shard: int) -> None:
        """Add written shards and drop rows in one manifest write. A record whose path is indexed replaces
        that row in the same commit, so no path is ever doubled. Shards of a failed write are deleted."""
        drops = drops + [self.live[r.path] for s in new for r in s.records if r.path in self.live]
        shards = self.shards + new
        dropped = {s.name: set(s.dropped) for s in shards}
        for shard, row in drops:
            dropped[shard.name].add(row)
        kept = [s for s in shards if len(dropped[s.name]) < len(s.records)]
        try:
            self._write_manifest(kept, dropped, next_shard=next_shard)
        except IndexFileError:
            for shard in new:
                delete_shard_files(self.directory, shard.name)
            raise
        for shard in shards:  # committed: only now does the index in memory follow
            shard.dropped = dropped[shard.name]
            if shard not in kept:
                delete_shard_files(self.directory, shard.name)
        self._set_shards(kept)

    def _write_manifest(self, shards: list[Shard], dropped: dict[str, set[int]], next_shard: int) -> None:
        manifest = dict(self.manifest, kind=KIND, format_version=FORMAT_VERSION)
        manifest |= {"generation": self.generation + 1, "next_shard": next_shard}
        manifest["shards"] = [
            {"name": s.name, "rows": len(s.records), "dropped": sorted(dropped[s.name])}
            | {"sha256": s.sha256 or _checksums(self.directory, s)}
            for s in shards
        ]
        write_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self.manifest = manifest
        for shard, entry in zip(shards, manifest["shards"], strict=True):
            shard.sha256 = entry["sha256"]

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
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IndexFileError.of(directory, error, "create the index directory") from error
        with index_lock(directory):
            if in_place and _committed(directory) is not None:  # else memory holds the last good commit
                self.catch_up()
            first = self.next_shard if in_place else 1
            paths, text, image, shards = self.paths, self.view("text"), self.view("image"), []
            target = self if in_place else IndexStore(directory, dict(self.manifest, generation=0), [])
            try:
                for number, start in enumerate(range(0, len(paths), SHARD_ROWS), start=first):
                    rows = slice(start, start + SHARD_ROWS)
                    records = [self.record(p) for p in paths[rows]]
                    shards.append(write_shard(directory, number, records, text[rows], image[rows]))
                target._write_manifest(
                    shards, {s.name: set() for s in shards}, next_shard=first + len(shards)
                )
            except IndexFileError:
                for shard in shards:
                    delete_shard_files(directory, shard.name)
                raise
            old = self.shards if in_place else []
            target._set_shards(shards)
            for shard in old:
                delete_shard_files(directory, shard.name)


def _empty_manifest(fingerprint: str, root: str) -> dict:
    return {"kind": KIND, "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "root": root} | {
        "model_dir": None,
        "generation": 0,
        "next_shard": 1,
        "shards": [],
    }


# --- files ------------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """`text` in `path`, whole or not at all."""
    _write_file(path, lambda file: file.write(text.encode("utf-8", "surrogateescape")))  # any file name


def _write_file(path: Path, write: Callable) -> None:
    """Call `write(file)` on a temporary file, then rename it to `path`; a failure (a full disk) leaves
    nothing behind and is raised as an IndexFileError naming `path`."""
    temporary = path.with_name(f"{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise IndexFileError.of(path, error) from error


def write_shard(directory: Path, number: int, records: list, text: np.ndarray, image: np.ndarray) -> Shard:
    """Write a shard's three files and checksum them: a Shard the manifest does not name yet. A failure
    leaves none of its files."""
    name = f"shard-{number:06d}"
    text, image = np.ascontiguousarray(text, np.float16), np.ascontiguousarray(image, np.float16)
    rows = "".join(json.dumps(asdict(r)) + "\n" for r in records).encode()
    try:
        for space, array in (("text", text), ("image", image)):
            path = directory / f"{name}.{SHARD_FILES[space]}"
            _write_file(path, lambda file, array=array: np.save(file, array, allow_pickle=False))
        _write_file(directory / f"{name}.{SHARD_FILES['rows']}", lambda file: file.write(rows))
    except IndexFileError:
        delete_shard_files(directory, name)
        raise
    sha256 = {"rows": _sha256(rows), "text": _sha256(text), "image": _sha256(image)}
    return Shard(name, list(records), text, image, sha256=sha256, verified=set(SHARD_FILES))


def delete_shard_files(directory: Path, name: str) -> None:
    """A shard's files, gone where they can be; what cannot be deleted is an orphan the next writer removes."""
    for suffix in SHARD_FILES.values():
        for path in (directory / f"{name}.{suffix}", directory / f"{name}.{suffix}.tmp"):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _sha256(data) -> str:
    """Of bytes, or of a C-contiguous array's memory (a memory-mapped one is read once)."""
    return hashlib.sha256(data).hexdigest()


def _checksums(directory: Path, shard: Shard) -> dict[str, str]:
    """A format-1 shard's checksums, from its files as they are now."""
    rows = (directory / f"{shard.name}.{SHARD_FILES['rows']}").read_bytes()
    return {"rows": _sha256(rows), "text": _sha256(shard.text), "image": _sha256(shard.image)}


# --- reading ----------------------------------------------------------------------------------------------


# Every name an index writes in its directory (the table above, a damaged manifest kept aside, and each
# while written, as ".tmp"): a walk of a folder that is also the index's directory passes over them.
_INDEX_FILE = re.compile(
    r"(manifest\.json(\.damaged-.+)?|shard-\d+\.(rows\.jsonl|text\.npy|image\.npy)|failures\.log"
    r"|faiss-.+\.npz|part-\d+\.json|writer\.lock)(\.tmp)?"
)


def is_index_file(name: str) -> bool:
    """Whether a file named `name` in an index's directory is one of the index's own files."""
    return _INDEX_FILE.fullmatch(name) is not None


def image_id(relative_path: str) -> str:
    """The id of an indexed file (what `dinobridge serve` and `dinobridge export` call it): stable while the
    file keeps its path, and no path in itself."""
    return hashlib.blake2b(relative_path.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def read_manifest(directory: Path) -> dict:
    """The manifest committed in `directory`, checked; one of format 1 reads as the current format, with
    shards that have no checksums. Raises DamagedManifestError saying what is wrong."""
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"'{directory}' is not an image index: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise IndexFileError.of(path, error, "read") from error
    except ValueError as error:  # not JSON, or not UTF-8
        raise DamagedManifestError(path, f"not JSON: {error}") from None
    return _checked_manifest(manifest, path)


MANIFEST_KEYS = {  # key -> (types, what they are called in a message)
    "fingerprint": (str, "a string"),
    "root": (str, "a string"),
    "model_dir": ((str, type(None)), "a string or null"),
    "generation": (int, "a whole number"),
    "next_shard": (int, "a whole number"),
    "shards": (list, "a list"),
}
SHARD_KEYS = {"name": (str, "a string"), "rows": (int, "a whole number"), "dropped": (list, "a list")}


def _checked_manifest(manifest, path: Path) -> dict:
    def damaged(problem: str) -> DamagedManifestError:
        return DamagedManifestError(path, problem)

    def check_keys(mapping: dict, expected: dict, owner: str) -> None:
        for key, (types, called) in expected.items():
            if key not in mapping:
                raise damaged(f"{owner} has no '{key}'")
            if not isinstance(mapping[key], types) or isinstance(mapping[key], bool):
                whose = "its" if owner == "it" else f"{owner}'s"
                raise damaged(f"{whose} '{key}' is {mapping[key]!r}, not {called}")

    if not isinstance(manifest, dict):
        raise damaged(f"a JSON {type(manifest).__name__}, not an object")
    if "kind" not in manifest and manifest.get("format") == FIRST_FORMAT:
        manifest = {k: v for k, v in manifest.items() if k != "format"} | {"kind": KIND, "format_version": 1}
    if "kind" not in manifest:
        raise damaged("it has no 'kind'")
    if manifest["kind"] != KIND:
        raise ValueError(
            f"'{path}' is the manifest of a {manifest['kind']!r}, not of a {KIND!r}; index into another --out"
        )
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise damaged(f"'format_version' is {version!r}, not a whole number from 1")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"index '{path.parent}' has format version {version}, but this dinobridge reads versions 1 to "
            f"{FORMAT_VERSION}; upgrade dinobridge (pip install -U dinobridge) to use it, or index into "
            "another --out"
        )
    check_keys(manifest, MANIFEST_KEYS, "it")
    numbers = set()
    for position, entry in enumerate(manifest["shards"]):
        where = f"shard {position + 1}"
        if not isinstance(entry, dict):
            raise damaged(f"{where} is {entry!r}, not an object")
        check_keys(entry, SHARD_KEYS, where)
        match = re.fullmatch(r"shard-(\d{6,})", entry["name"])
        if not match or int(match[1]) in numbers or int(match[1]) >= manifest["next_shard"]:
            raise damaged(f"{where} has the name {entry['name']!r}: not a shard name, or one used twice")
        numbers.add(int(match[1]))
        rows, dropped = entry["rows"], entry["dropped"]
        if rows < 1 or not all(type(r) is int and 0 <= r < rows for r in dropped) or len(dropped) >= rows:
            raise damaged(f"{where} ({entry['name']}) has {rows!r} rows of which it drops {dropped!r}")
        sha256 = entry.get("sha256")
        if version >= 2 and not (
            isinstance(sha256, dict)
            and set(sha256) == set(SHARD_FILES)
            and all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in sha256.values())
        ):
            raise damaged(f"{where} ({entry['name']}) has no 'sha256' checksum of each of its files")
    return manifest


def _committed(directory: Path) -> dict | None:
    """The manifest committed now, or None where there is none that reads."""
    try:
        return read_manifest(directory)
    except (ValueError, OSError):
        return None


def _read_shards(directory: Path, manifest: dict) -> tuple[list[Shard], dict[str, tuple[str, int]]]:
    """The manifest's shards that read, and the damaged ones: name -> (what is wrong, live rows)."""
    shards, damaged = [], {}
    for entry in manifest["shards"]:
        try:
            shards.append(read_shard(directory, entry))
        except _ShardDamage as damage:
            damaged[entry["name"]] = (str(damage), entry["rows"] - len(entry["dropped"]))
    return shards, damaged


def read_shard(directory: Path, entry: dict) -> Shard:
    """The shard a manifest entry names, its rows checked against their checksum and its embeddings
    memory-mapped (checked on first use: `IndexStore.view`). Raises _ShardDamage saying what is wrong."""
    name, sha256 = entry["name"], entry.get("sha256")
    try:
        rows = (directory / f"{name}.{SHARD_FILES['rows']}").read_bytes()
        if sha256 is not None and _sha256(rows) != sha256["rows"]:
            raise _ShardDamage(f"checksum mismatch in {name}.{SHARD_FILES['rows']}")
        records = [FileRecord(**json.loads(line)) for line in rows.decode().splitlines()]
        text, image = (
            np.load(directory / f"{name}.{SHARD_FILES[s]}", mmap_mode="r", allow_pickle=False)
            for s in ("text", "image")
        )
    except FileNotFoundError as error:
        raise _ShardDamage(f"{Path(error.filename).name} is missing") from None
    except (OSError, ValueError, TypeError, EOFError) as error:  # EOFError: numpy's word for an empty file
        raise _ShardDamage(f"unreadable: {error}") from None
    for space, array in (("text", text), ("image", image)):
        if array.dtype != np.float16 or array.ndim != 2 or not array.flags.c_contiguous:
            raise _ShardDamage(f"{name}.{SHARD_FILES[space]} is not a float16 matrix")
    if not len(records) == len(text) == len(image) == entry["rows"]:
        raise _ShardDamage(
            f"the manifest says {entry['rows']} rows, its files hold {len(records)} records, "
            f"{len(text)} and {len(image)} embeddings"
        )
    verified = {"rows"} if sha256 is not None else set()
    return Shard(name, records, text, image, set(entry["dropped"]), sha256=sha256, verified=verified)
