"""The image index: every image under a folder, embedded once, searchable by text, by image, or both.

`ImageIndex` is what users hold: it builds, updates, loads and saves an index, and composes queries
(text + image - minus) into one vector for a search back-end. Opening and searching an index import
neither the decoding workers nor FAISS (only `update` needs the first, only large indexes the second),
nor torch when the queries are texts embedded by a `TextQueryEncoder` (numpy_text.py).

Not here: the files and how a commit is made atomic (index_files.py), the update pipeline
(index_update.py), the search back-ends (search.py), argument parsing and printing (cli.py), image
decoding rules (images.py), models (model.py).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from bridge.adapters import adapter_reason
from bridge.hub import is_hub_name
from bridge.images import load_image
from bridge.index_files import IndexStore
from bridge.queries import check_texts
from bridge.search import BACKENDS, CacheFiles, SearchBackend, choose_backend

if TYPE_CHECKING:
    import torch

    from bridge.model import TextBridge
    from bridge.numpy_text import TextQueryEncoder

Query = str | os.PathLike | Image.Image


class IndexMismatchError(ValueError):
    """A bridge whose fingerprint differs from the one that built the index."""


@dataclass
class IndexSummary:
    indexed: int = 0  # embedded in this run: new files and files whose content changed
    unchanged: int = 0  # already indexed, including files touched but with the same content
    removed: int = 0  # indexed before but gone from the folder
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), as in failures.log
    # (path, reason) of what was not tried, as in failures.log: not images (RAW, video, ...), linked folders
    # walked already; the reason's words before its first ":" say what kind it is, for the counts
    skipped: list[tuple[str, str]] = field(default_factory=list)
    excluded: int = 0  # files and folders not walked (index_update.FolderWalk)...
    hidden: int = 0  # ... of which hidden and system names; the others matched an `exclude` pattern
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
        if self.skipped:
            kinds = Counter(reason.partition(":")[0] for _, reason in self.skipped)
            what = ", ".join(
                f"{count} {kind}" for kind, count in sorted(kinds.items(), key=lambda kc: (-kc[1], kc[0]))
            )
            lines.append(f"  skipped {len(self.skipped)} ({what}), listed in {self.failure_log}")
        if self.hidden:
            lines.append(
                f"  excluded {self.hidden} hidden or system files and folders (--include-hidden walks them)"
            )
        if self.excluded > self.hidden:
            lines.append(f"  excluded {self.excluded - self.hidden} files and folders matching --exclude")
        return "\n".join(lines)


class ImageIndex:
    """Embeddings of the images under one folder, made by one bridge. Make one with `ImageIndex.build`,
    open one with `ImageIndex.load`; `search` returns [(absolute path, score)], best first."""

    def __init__(self, store: IndexStore, bridge: TextBridge | TextQueryEncoder | None):
        self.store = store  # the directory's files and what they commit
        self.directory, self.root = store.directory, store.root
        self.fingerprint: str = store.manifest["fingerprint"]
        self.summary: IndexSummary | None = None  # of the last build or update
        self._bridge = None
        self._backends: dict[tuple[str, str], SearchBackend] = {}  # (back-end, space) -> built
        self._backends_generation = store.generation  # the store's state they were built from
        self._rows: tuple[int, dict[str, int]] | None = None  # (generation, relative path -> row), for like=
        if bridge is not None:
            self._use_bridge(bridge)

    @property
    def model_dir(self) -> str | None:
        """Where the bridge that built the index is saved, if that was said."""
        return self.store.manifest["model_dir"]

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
        # A damaged manifest opens as a new index, which the update builds afresh (the old one kept aside).
        index = cls(IndexStore.open_or_create(directory, bridge.fingerprint(), root), bridge)
        if index.root != root:
            raise ValueError(
                f"index '{directory}' indexes folder '{index.root}', not '{root}'; "
                "give each folder its own index directory"
            )
        if model_dir is not None:  # written with the next commit
            # A Hub repo id is recorded as given (a search loads it from the Hub's cache), a folder by
            # its absolute path.
            local = Path(model_dir).exists() or not is_hub_name(str(model_dir))
            index.store.manifest["model_dir"] = str(Path(model_dir).resolve()) if local else str(model_dir)
        index.update(workers=workers, **options)
        return index

    def update(
        self,
        bridge: TextBridge | None = None,
        workers: int | None = None,
        batch_size: int = 64,
        commit_every: int = 512,
        progress: bool = True,
        gpu_decode: bool | None = None,
        include_hidden: bool = False,
        exclude: Sequence[str] = (),
    ) -> IndexSummary:
        """Bring the index in line with its folder: embed new and changed files, drop deleted ones.

        Files are decoded in `workers` processes (None: one per core but one; 0: in this process), and
        embedded here, `batch_size` at a time; every `commit_every` images are committed, so a killed run
        keeps them. A file whose size or mtime changed is hashed, and re-embedded only if its content
        changed. Failed files are reported in the summary and failures.log, and retried on the next run.
        `gpu_decode` (None: when the encoder is on a GPU) decodes JPEGs on the encoder's device (decoding.py).
        Hidden and system files and folders (index_update.DEFAULT_EXCLUDES) are not walked unless
        `include_hidden`; `exclude` adds glob patterns; files that are not images are listed in failures.log.
        Worker processes start like `multiprocessing`'s "forkserver": a script calling this needs an
        `if __name__ == "__main__":` guard.

        Under `accelerate launch` with N processes, each embeds every N-th file to do and writes its
        shards as a part; the main process then commits all parts in one manifest write (a killed run
        leaves the previous index, and the next run redoes the uncommitted parts). Only the main
        process's summary counts the whole run; the others' cover their own files.
        """
        # The pipeline brings the decoding workers and accelerate, which opening and searching never need.
        from bridge.index_update import FolderWalk, update_index

        bridge = self._use_bridge(bridge)
        self.summary = update_index(
            self.store,
            bridge,
            workers=workers,
            batch_size=batch_size,
            commit_every=commit_every,
            progress=progress,
            gpu_decode=gpu_decode,
            walk=FolderWalk(include_hidden, tuple(exclude)),
        )
        return self.summary

    # --- saving and loading ---------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index compacted into as few shards as possible: into its own directory (in place,
        atomically), or into a new empty one (a copy; this object keeps following its own)."""
        self.store.save(Path(directory))

    @classmethod
    def load(
        cls, directory: str | os.PathLike, bridge: TextBridge | TextQueryEncoder | None = None
    ) -> ImageIndex:
        """Open a saved index; with `bridge`, check that it is the one that built the index. Embeddings are
        memory-mapped until the first search. A `TextQueryEncoder` (numpy_text.py) in place of the bridge
        searches by text without loading torch."""
        return cls(IndexStore.open(Path(directory)), bridge)

    # --- searching ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.store)

    @property
    def paths(self) -> list[str]:
        """Indexed paths relative to `root`, in the row order of the search matrices."""
        return self.store.paths

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
        like: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> list[tuple[str, float]]:
        """The k best (path, cosine score), best first.

        `image` alone searches DINOv2's CLS space: image-to-image similarity, where DINOv2 is strong.
        Anything with text searches the bridge's text space, with the sum of the normalised query vectors,
        +1 for each `text` and `image`, -1 for each `minus` ("a beach" minus "people"), renormalised, as
        rclip does. `like`: images already in the index (paths, absolute or relative to `root`), each
        counted as an `image` but with its stored embeddings, so nothing is decoded or encoded ("more like
        this"; the file need not exist any more). `backend`: a name in search.BACKENDS ("exact", "faiss")
        or "auto" (exact up to search.EXACT_UP_TO images).
        """
        bridge = self._use_bridge(None)
        texts, images, minus = _as_list(text), _as_list(image), _as_list(minus)
        rows = [self._row_of(path) for path in _as_list(like)]
        if not texts and not images and not rows:
            raise ValueError(
                "search needs text=..., image=... or like=...; minus=... alone says what to avoid"
            )
        texts = check_texts(texts) if texts else []
        minus = check_texts(minus, "minus text", '"people"') if minus else []
        if images and not hasattr(bridge, "encoder"):
            raise ValueError(
                "an image query needs the whole bridge, with its image encoder: load the index with "
                "TextBridge.from_pretrained(...), not a TextQueryEncoder"
            )
        space = "text" if texts or minus else "image"  # images alone: DINOv2's own CLS space
        vectors = []  # per query image, its normalised embedding in `space`
        if images:
            pixels = bridge.encoder.preprocessing([load_image(i) for i in images]).to(bridge.encoder.device)
            text_space, image_space = embed_images(bridge, pixels)
            vectors = list((text_space if space == "text" else image_space).astype(np.float32))
        # An indexed image's stored row of that space alone: the other space is never read or verified.
        vectors += [self.store.view(space)[row].astype(np.float32) for row in rows]
        parts = [bridge.encode_texts(texts).sum(0)] if texts else []
        parts += vectors
        parts += [-bridge.encode_texts(minus).sum(0)] if minus else []
        return self._nearest(space, _normalize(np.sum(parts, axis=0)), k, backend)

    def prepare(self, backend: str = "auto") -> None:
        """Read both spaces' embeddings and build `backend` over them now, where a server wants it done
        before its first query rather than by it."""
        if len(self):
            for space in ("text", "image"):
                self._backend(choose_backend(backend, len(self)), space)

    def _row_of(self, path: str | os.PathLike) -> int:
        """The row of an indexed image, by its path (absolute, or relative to `root`)."""
        relative = Path(path)
        if relative.is_absolute():
            try:
                relative = relative.relative_to(self.root)
            except ValueError:
                raise ValueError(f"'{path}' is not under the indexed folder '{self.root}'") from None
        if self._rows is None or self._rows[0] != self.store.generation:
            self._rows = (self.store.generation, {p: row for row, p in enumerate(self.paths)})
        row = self._rows[1].get(relative.as_posix())
        if row is None:
            raise ValueError(
                f"'{path}' is not in index '{self.directory}'; like=... takes an indexed image (search by a "
                "file that is not indexed with image=...)"
            )
        return row

    def _nearest(self, space: str, query: np.ndarray, k: int, backend: str) -> list[tuple[str, float]]:
        backend = choose_backend(backend, len(self))
        if len(self) == 0:
            return []
        scores, rows = self._backend(backend, space).search(query[None], k)
        found = zip(scores[0].tolist(), rows[0].tolist(), strict=True)
        return [(str(self.root / self.paths[row]), score) for score, row in found if row >= 0]

    def _backend(self, name: str, space: str) -> SearchBackend:
        """Back-end `name` over one space, built once for each committed state of the index."""
        if self._backends_generation != self.store.generation:
            self._backends, self._backends_generation = {}, self.store.generation
        if (name, space) not in self._backends:
            cache = CacheFiles(self.directory, space, self.store.generation)
            self._backends[name, space] = BACKENDS[name].build(self.store.view(space), cache)
        return self._backends[name, space]

    def _use_bridge(self, bridge: TextBridge | TextQueryEncoder | None) -> TextBridge | TextQueryEncoder:
        if bridge is not None and bridge is not self._bridge:
            if bridge.fingerprint() != self.fingerprint:
                made_by = f" (saved at '{self.model_dir}')" if self.model_dir else ""
                made_by += adapter_reason(self.model_dir, self.fingerprint, getattr(bridge, "adapter", None))
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


def embed_images(bridge: TextBridge, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images (B, 3, S, S) on the encoder's device -> (text-space, DINOv2 CLS) embeddings,
    normalised float16, from one encoder pass: what an index stores and what an image query is."""
    import torch  # here, not at the top: opening an index and searching it by text never need torch

    with torch.no_grad():
        features = bridge.encoder(pixels)
        text = bridge.encode_image(features)
        image = torch.nn.functional.normalize(features.cls.float(), dim=-1)
    return text.cpu().numpy().astype(np.float16), image.cpu().numpy().astype(np.float16)


def _normalize(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike, Image.Image)) else list(value)
