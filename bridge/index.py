"""The image index: every image under a folder, embedded once, searchable by text, by image, or both.

The files it is made of, and why a killed run loses nothing, are in index_files.py.

Not here: argument parsing and printing (cli.py), image decoding rules (images.py), models (model.py),
the search back-ends (search.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from bridge.decoding import decode_jpegs, gpu_decodable, ordered_map, pixel_batch
from bridge.images import ImageLoadError, is_supported_image, load_image, try_load_image
from bridge.index_files import (
    FORMAT,
    MANIFEST,
    FileRecord,
    Part,
    Shard,
    delete_shard_files,
    read_manifest,
    read_shard,
    write_atomic,
    write_shard,
)
from bridge.model import TextBridge
from bridge.runtime import processes
from bridge.search import BACKENDS, CacheFiles, SearchBackend, choose_backend

log = logging.getLogger(__name__)

FAILURE_LOG = "failures.log"
COMPACT_SHARDS = 32  # an update leaving more shards than this (or 25% of rows dropped) compacts the index
SHARD_ROWS = 65_536  # rows per shard when compacting or saving

Query = str | os.PathLike | Image.Image


class IndexMismatchError(ValueError):
    """A bridge whose fingerprint differs from the one that built the index."""


@dataclass
class IndexSummary:
    indexed: int = 0  # embedded in this run: new files and files whose content changed
    unchanged: int = 0  # already indexed, including files touched but with the same content
    removed: int = 0  # indexed before but gone from the folder
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), as in failures.log
    total: int = 0  # images in the index after the run
    seconds: float = 0.0
    model_seconds: float = 0.0  # of which running the model
    decode_wait_seconds: float = 0.0  # of which waiting for decoded images
    failure_log: str = ""

    def __str__(self) -> str:
        lines = [
            f"indexed {self.indexed}, unchanged {self.unchanged}, removed {self.removed}, failed "
            f"{len(self.failed)} in {self.seconds:.1f} s; the index holds {self.total} images"
        ]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failed[:10]]
        if self.failed:
            lines.append(f"  ({len(self.failed)} failures in all, listed in {self.failure_log})")
        return "\n".join(lines)


class ImageIndex:
    """Embeddings of the images under one folder, made by one bridge. Make one with `ImageIndex.build`,
    open one with `ImageIndex.load`; `search` returns [(absolute path, score)], best first."""

    def __init__(self, directory: Path, manifest: dict, shards: list[Shard], bridge: TextBridge | None):
        self.directory, self.root = directory, Path(manifest["root"])
        self.fingerprint: str = manifest["fingerprint"]
        self.model_dir: str | None = manifest["model_dir"]  # where the bridge is saved, if it was said
        self.summary: IndexSummary | None = None  # of the last build or update
        self._manifest, self._bridge = manifest, None
        self._set_shards(shards)
        if bridge is not None:
            self._use_bridge(bridge)

    def _set_shards(self, shards: list[Shard]) -> None:
        self._shards = shards
        self._live = {r.path: (s, i) for s in shards for i, r in enumerate(s.records) if i not in s.dropped}
        self._views: dict[str, np.ndarray] = {}  # "text"/"image" -> (N, dim) live rows, made on first use
        self._backends: dict[tuple[str, str], SearchBackend] = {}  # (back-end, space) -> built
        self._paths: list[str] | None = None

    # --- building and updating ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        folder: str | os.PathLike,
        bridge: TextBridge,
        out_dir: str | os.PathLike,
        workers: int | None = None,
        model_dir: str | os.PathLike | None = None,
        **options,
    ) -> ImageIndex:
        """Index every image under `folder` into `out_dir`, or update the index already there (embedding
        only new and changed files). `model_dir`, where `bridge` is saved, is recorded for later searches.
        `options` go to `update`; its summary is in `.summary`."""
        root, directory = Path(folder).resolve(), Path(out_dir)
        if (directory / MANIFEST).is_file():
            index = cls.load(directory, bridge)
            if index.root != root:
                raise ValueError(
                    f"index '{directory}' indexes folder '{index.root}', not '{root}'; "
                    "give each folder its own index directory"
                )
        else:
            directory.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT, "fingerprint": bridge.fingerprint(), "root": str(root)}
            manifest |= {"model_dir": None, "generation": 0, "next_shard": 1, "shards": []}
            index = cls(directory, manifest, [], bridge)
        if model_dir is not None:
            index._manifest["model_dir"] = index.model_dir = str(Path(model_dir).resolve())
        index.summary = index.update(workers=workers, **options)
        return index

    def update(
        self,
        bridge: TextBridge | None = None,
        workers: int | None = None,
        batch_size: int = 64,
        commit_every: int = 512,
        progress: bool = True,
        gpu_decode: bool | None = None,
    ) -> IndexSummary:
        """Bring the index in line with its folder: embed new and changed files, drop deleted ones.

        Files are decoded in `workers` processes (None: one per core but one; 0: in this process), and
        embedded here, `batch_size` at a time; every `commit_every` images are committed, so a killed run
        keeps them. A file whose size or mtime changed is hashed, and re-embedded only if its content
        changed. Failed files are reported in the summary and failures.log, and retried on the next run.
        `gpu_decode` (None: when the encoder is on a GPU) decodes JPEGs on the encoder's device (decoding.py).
        Worker processes start like `multiprocessing`'s "forkserver": a script calling this needs an
        `if __name__ == "__main__":` guard.

        Under `accelerate launch` with N processes, each embeds every N-th file to do and writes its
        shards as a part; the main process then commits all parts in one manifest write (a killed run
        leaves the previous index, and the next run redoes the uncommitted parts). Only the main
        process's summary counts the whole run; the others' cover their own files.
        """
        bridge = self._use_bridge(bridge)
        if not self.root.is_dir():  # an unmounted drive must not read as "every image was deleted"
            raise FileNotFoundError(f"folder '{self.root}' indexed by '{self.directory}' is not there")
        started, summary = time.perf_counter(), IndexSummary()
        state = processes()
        rank, world = state.process_index, state.num_processes
        if rank == 0:
            self._remove_orphans()
        state.wait_for_everyone()
        tasks, gone = self._scan(summary if rank == 0 else IndexSummary())
        tasks = tasks[rank::world]
        part = Part(self.directory, rank, world, self._manifest["next_shard"]) if world > 1 else None
        commit = self._commit if part is None else part.add
        if gone and rank == 0:
            self._commit([], [], [], drops=gone)
            summary.removed = len(gone)

        records, text, image, drops, batch = [], [], [], [], []
        preprocessing, device = bridge.encoder.preprocessing, bridge.encoder.device
        gpu_decode = device.type == "cuda" if gpu_decode is None else gpu_decode

        def embed_batch() -> None:
            clock = time.perf_counter()
            decoded = _decode_left_for_the_device(batch, preprocessing, device)
            for record, error in [(r, p) for r, p in decoded if isinstance(p, ImageLoadError)]:
                summary.failed.append((str(self.root / record.path), error.reason))
                summary.indexed -= 1
                if record.path in self._live:  # changed and now unreadable: its old embedding is stale
                    drops.append(self._live[record.path])
            good = [(record, pixels) for record, pixels in decoded if not isinstance(pixels, ImageLoadError)]
            if good:
                vectors = _embed(bridge, [pixels for _, pixels in good])
                records.extend(record for record, _ in good)
                text.extend(vectors[0])
                image.extend(vectors[1])
            summary.model_seconds += time.perf_counter() - clock
            batch.clear()

        timing = {"wait": 0.0}
        jobs = [(path, known, preprocessing, gpu_decode) for path, _, _, _, known in tasks]
        results = ordered_map(_prepare, jobs, workers, 2 * batch_size, timing)
        for (path, relative, size, mtime_ns, _), (_, result) in tqdm(
            zip(tasks, results, strict=True),
            total=len(tasks),
            desc="indexing",
            unit="img",
            disable=not progress,
        ):
            if isinstance(result, ImageLoadError):
                summary.failed.append((path, result.reason))
                if relative in self._live:  # changed and now unreadable: its old embedding is stale
                    drops.append(self._live[relative])
                continue
            record = FileRecord(relative, size, mtime_ns, sha256=result[0])
            if result[1] is None:  # touched but the same content: keep the embeddings, update the record
                shard, row = self._live[relative]
                records.append(record)
                text.append(shard.text[row])
                image.append(shard.image[row])
                summary.unchanged += 1
            else:
                batch.append((record, result[1]))
                summary.indexed += 1
                if len(batch) >= batch_size or len(records) + len(batch) >= commit_every:
                    embed_batch()
            if len(records) >= commit_every:
                commit(records, text, image, drops)
                records, text, image, drops = [], [], [], []
        if batch:
            embed_batch()
        if records or drops:
            commit(records, text, image, drops)
        if part is not None:
            part.finish(
                {"indexed": summary.indexed, "unchanged": summary.unchanged, "failed": summary.failed}
                | {"model_seconds": summary.model_seconds}
            )
            state.wait_for_everyone()
            if rank == 0:
                self._merge_parts(world, summary)
            state.wait_for_everyone()
            if rank != 0:
                return summary
        if len(self._shards) > COMPACT_SHARDS or 4 * sum(len(s.dropped) for s in self._shards) > len(self):
            self.save(self.directory)

        summary.failure_log = str(self.directory / FAILURE_LOG)
        write_atomic(self.directory / FAILURE_LOG, "".join(f"{p}: {r}\n" for p, r in summary.failed))
        summary.total, summary.decode_wait_seconds = len(self), timing["wait"]
        summary.seconds = time.perf_counter() - started
        log.info("index '%s': %s", self.directory, summary)
        return summary

    def _scan(self, summary: IndexSummary) -> tuple[list[tuple], list[tuple[Shard, int]]]:
        """Walk the folder: (files to read, rows of files gone). Files whose size and mtime match their
        record count as unchanged unread; files that cannot even be stat'ed count as failed."""
        tasks, seen = [], set()
        for path in _image_files(self.root, summary.failed):
            relative = path.relative_to(self.root).as_posix()
            try:
                stat = path.stat()
            except OSError:  # a broken link, say: the loader words the reason
                error = try_load_image(path)[1] or ImageLoadError(str(path), "cannot read its size")
                summary.failed.append((str(path), error.reason))
                continue
            seen.add(relative)
            old = self._record(relative)
            if old is not None and (old.size, old.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                summary.unchanged += 1
            else:
                known = old.sha256 if old else None
                tasks.append((str(path), relative, stat.st_size, stat.st_mtime_ns, known))
        return tasks, [self._live[relative] for relative in self._live if relative not in seen]

    def _commit(self, records: list[FileRecord], text: list, image: list, drops: list) -> None:
        """Write one shard (if there are records) and the manifest naming it: the moment the index changes."""
        number = self._manifest["next_shard"]
        new = (
            [write_shard(self.directory, number, records, np.stack(text), np.stack(image))] if records else []
        )
        self._commit_shards(new, drops, next_shard=number + len(new))

    def _commit_shards(self, new: list[Shard], drops: list[tuple[Shard, int]], next_shard: int) -> None:
        """Add written shards and drop rows in one manifest write. A record whose path is indexed replaces
        that row in the same commit, so no path is ever doubled."""
        drops = drops + [self._live[r.path] for s in new for r in s.records if r.path in self._live]
        shards = self._shards + new
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

    def _merge_parts(self, world: int, summary: IndexSummary) -> None:
        """The main process commits every process's part at once and adds their counts to `summary`."""
        shards, drops, next_shard = [], [], self._manifest["next_shard"]
        for rank in range(world):
            part = json.loads((self.directory / Part.file_name(rank)).read_text())
            shards += [
                read_shard(self.directory, {"name": n, "rows": r, "dropped": []}) for n, r in part["shards"]
            ]
            drops += [self._live[path] for path in part["drops"] if path in self._live]
            next_shard = max(next_shard, part["next_shard"])
            if rank:  # the main process's own counts are in `summary` already
                summary.indexed += part["indexed"]
                summary.unchanged += part["unchanged"]
                summary.failed += [tuple(failure) for failure in part["failed"]]
                summary.model_seconds = max(summary.model_seconds, part["model_seconds"])
        self._commit_shards(shards, drops, next_shard)
        for rank in range(world):
            (self.directory / Part.file_name(rank)).unlink()

    def _write_manifest(self, shards: list[Shard], dropped: dict[str, set[int]], next_shard: int) -> None:
        manifest = dict(self._manifest, generation=self._manifest["generation"] + 1, next_shard=next_shard)
        manifest["shards"] = [
            {"name": s.name, "rows": len(s.records), "dropped": sorted(dropped[s.name])} for s in shards
        ]
        write_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self._manifest = manifest

    def _remove_orphans(self) -> None:
        """Files a killed run wrote but never committed. Only writers call this; readers never delete."""
        named = {s.name for s in self._shards}
        for path in self.directory.iterdir():
            orphan = path.name.startswith("shard-") and path.name.split(".")[0] not in named
            if orphan or path.suffix == ".tmp" or path.name.startswith(Part.PREFIX):
                path.unlink()

    def _record(self, relative: str) -> FileRecord | None:
        shard, row = self._live.get(relative, (None, 0))
        return shard.records[row] if shard else None

    # --- saving and loading ---------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index compacted into as few shards as possible: into its own directory (in place,
        atomically), or into a new empty one (a copy; this object keeps following its own)."""
        directory = Path(directory)
        in_place = directory.resolve() == self.directory.resolve()
        if not in_place and directory.exists() and any(directory.iterdir()):
            raise FileExistsError(f"cannot save the index into '{directory}': it is not empty")
        directory.mkdir(parents=True, exist_ok=True)
        first = self._manifest["next_shard"] if in_place else 1
        paths, text, image, shards = self.paths, self._view("text"), self._view("image"), []
        for number, start in enumerate(range(0, len(paths), SHARD_ROWS), start=first):
            rows = slice(start, start + SHARD_ROWS)
            records = [self._record(p) for p in paths[rows]]
            shards.append(write_shard(directory, number, records, text[rows], image[rows]))
        target = self if in_place else ImageIndex(directory, dict(self._manifest, generation=0), [], None)
        old = self._shards if in_place else []
        target._write_manifest(shards, {s.name: set() for s in shards}, next_shard=first + len(shards))
        target._set_shards(shards)
        for shard in old:
            delete_shard_files(directory, shard.name)

    @classmethod
    def load(cls, directory: str | os.PathLike, bridge: TextBridge | None = None) -> ImageIndex:
        """Open a saved index; with `bridge`, check that it is the one that built the index. Embeddings are
        memory-mapped until the first search."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        return cls(directory, manifest, [read_shard(directory, e) for e in manifest["shards"]], bridge)

    # --- searching ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    @property
    def paths(self) -> list[str]:
        """Indexed paths relative to `root`, in the row order of the search matrices."""
        if self._paths is None:
            self._paths = [
                r.path for s in self._shards for i, r in enumerate(s.records) if i not in s.dropped
            ]
        return self._paths

    @property
    def bridge(self) -> TextBridge | None:
        return self._bridge

    def search(
        self,
        text: str | Sequence[str] | None = None,
        image: Query | Sequence[Query] | None = None,
        minus: str | Sequence[str] | None = None,
        k: int = 10,
        backend: str = "auto",
    ) -> list[tuple[str, float]]:
        """The k best (path, cosine score), best first.

        `image` alone searches DINOv2's CLS space: image-to-image similarity, where DINOv2 is strong.
        Anything with text searches the bridge's text space, with the sum of the normalised query vectors,
        +1 for each `text` and `image`, -1 for each `minus` ("a beach" minus "people"), renormalised, as
        rclip does. `backend`: a name in search.BACKENDS ("exact", "faiss") or "auto" (exact up to
        search.EXACT_UP_TO images).
        """
        bridge = self._use_bridge(None)
        texts, images, minus = _as_list(text), _as_list(image), _as_list(minus)
        if not texts and not images:
            raise ValueError("search needs text=... or image=...; minus=... alone says what to avoid")
        if images:  # each image gives its bridge embedding and its DINOv2 CLS token, both normalised
            pixels = [p.numpy() for p in bridge.encoder.preprocessing([load_image(i) for i in images])]
            bridged, cls = (torch.from_numpy(v.astype(np.float32)).sum(0) for v in _embed(bridge, pixels))
        if not texts and not minus:
            return self._nearest("image", F.normalize(cls, dim=0).numpy(), k, backend)
        with torch.no_grad():
            parts = [bridge.encode_text(texts).sum(0).cpu()] if texts else []
            parts += [bridged] if images else []
            parts += [-bridge.encode_text(minus).sum(0).cpu()] if minus else []
        return self._nearest("text", F.normalize(torch.stack(parts).sum(0), dim=0).numpy(), k, backend)

    def _nearest(self, space: str, query: np.ndarray, k: int, backend: str) -> list[tuple[str, float]]:
        backend = choose_backend(backend, len(self))
        if len(self) == 0:
            return []
        scores, rows = self._backend(backend, space).search(query[None], k)
        found = zip(scores[0].tolist(), rows[0].tolist(), strict=True)
        return [(str(self.root / self.paths[row]), score) for score, row in found if row >= 0]

    def _view(self, space: str) -> np.ndarray:
        """(N, dim) float16 live rows of one space ("text" or "image"), in `paths` order."""
        if space not in self._views:
            parts = [np.delete(getattr(s, space), sorted(s.dropped), axis=0) for s in self._shards]
            self._views[space] = np.concatenate(parts) if parts else np.zeros((0, 1), np.float16)
        return self._views[space]

    def _backend(self, name: str, space: str) -> SearchBackend:
        """Back-end `name` over one space, built once for each committed state of the index."""
        if (name, space) not in self._backends:
            cache = CacheFiles(self.directory, space, self._manifest["generation"])
            self._backends[name, space] = BACKENDS[name].build(self._view(space), cache)
        return self._backends[name, space]

    def _use_bridge(self, bridge: TextBridge | None) -> TextBridge:
        if bridge is not None and bridge is not self._bridge:
            if bridge.fingerprint() != self.fingerprint:
                made_by = f" (saved at '{self.model_dir}')" if self.model_dir else ""
                raise IndexMismatchError(
                    f"index '{self.directory}' was built by the bridge with fingerprint {self.fingerprint}"
                    f"{made_by}, but this bridge's fingerprint is {bridge.fingerprint()}; the embeddings of "
                    "two models never mix. Query with the bridge that built it, or rebuild the index with "
                    f"this model into a new directory: dinobridge index '{self.root}' --model <this model's "
                    "directory> --out <new index directory>"
                )
            self._bridge = bridge
        if self._bridge is None:
            raise ValueError(
                f"index '{self.directory}' needs the bridge that built it to embed queries: "
                f"ImageIndex.load(directory, bridge), with the bridge saved at '{self.model_dir or 'unknown'}'"
            )
        return self._bridge


# --- decoding (in worker processes, by decoding.py) and embedding here -----------------------------------------------------


def _prepare(
    path: str, known_sha256: str | None, preprocessing, gpu_decode: bool = False
) -> tuple[str, np.ndarray | bytes | None] | ImageLoadError:
    """One file -> (sha256, preprocessed pixels (3, S, S) float32, or None if the content is the known
    one, or with `gpu_decode` the file's bytes if it is a JPEG the GPU decodes exactly), or its
    ImageLoadError. Runs in a worker, so it returns errors rather than raising them."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return try_load_image(path)[1] or ImageLoadError(path, "cannot read the file")
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 == known_sha256:
        return sha256, None
    if gpu_decode and gpu_decodable(data):
        return sha256, data
    image, error = try_load_image(data)
    if error is not None:
        return ImageLoadError(path, error.reason)  # the loader saw bytes; name the file
    return sha256, preprocessing([image])[0].numpy()


def _decode_left_for_the_device(batch: list[tuple], preprocessing, device: torch.device) -> list[tuple]:
    """(record, pixels or JPEG bytes) -> (record, pixels or ImageLoadError): the JPEGs workers left as
    bytes decoded on `device` in one call; one the GPU decoder rejects goes to the CPU loader, which
    decodes it or says why not, as it would have in a worker."""
    jpegs = [i for i, (_, item) in enumerate(batch) if isinstance(item, bytes)]
    decoded = list(batch)
    for i, pixels in zip(
        jpegs, decode_jpegs([batch[i][1] for i in jpegs], preprocessing, device), strict=True
    ):
        record, data = batch[i]
        if pixels is None:
            loaded, error = try_load_image(data)
            pixels = preprocessing([loaded])[0] if error is None else error
        decoded[i] = (record, pixels)
    return decoded


@torch.no_grad()
def _embed(bridge: TextBridge, pixels: list) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images (CPU arrays or tensors) -> (text-space, DINOv2 CLS) embeddings, normalised
    float16, from one encoder pass."""
    features = bridge.encoder(pixel_batch(pixels, bridge.encoder.device))
    text = bridge.encode_image(features)
    image = F.normalize(features.cls.float(), dim=-1)
    return text.cpu().numpy().astype(np.float16), image.cpu().numpy().astype(np.float16)


# --- files ----------------------------------------------------------------------------------------------


def _image_files(root: Path, failed: list[tuple[str, str]]) -> Iterator[Path]:
    """Supported image files under `root`, recursively, sorted. Links to files are followed, links to
    folders are not (no loops); folders that cannot be listed are reported in `failed`."""

    def unlisted(error: OSError) -> None:
        failed.append((str(error.filename), f"cannot list the folder ({error.strerror or error})"))

    for folder, subfolders, files in os.walk(root, onerror=unlisted):
        subfolders.sort()
        yield from (Path(folder, name) for name in sorted(files) if is_supported_image(name))


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike, Image.Image)) else list(value)
