"""Search back-ends: the k nearest of a set of normalised float16 embeddings to a query, exactly or with FAISS.

Exact search is one float16 matrix product, fast enough up to about 1e5 vectors. Above that, FAISS. The
FAISS index type follows FAISS's own guidelines for "a few million vectors, recall matters, memory is
not the constraint", chosen by measurement (benchmarks/search.py, figures in benchmarks/RESULTS.md):

- up to FLAT_UP_TO vectors: `IndexFlatIP`, exact.
- above: product quantisation with 4-bit fast-scan codes (`PQ{d/2}x4fs`: 2 dimensions a sub-quantiser,
  d/4 bytes a vector), scanned in full with SIMD, then the best k * RERANK_FACTOR candidates re-scored
  exactly against the stored float16 vectors. The codes are split into one shard per core
  (`IndexShards`), scanned in parallel threads: FAISS spreads a batch of queries over cores, but a
  single query, the interactive case, would otherwise scan on one.

Graph and cluster indexes (HNSW, IVF) skip most of the collection, which is what makes them fast, and what
makes them miss on embeddings without cluster structure: on 1M random 512-d vectors HNSW (M=32, efSearch
256) found 5% of the true top 10 and IVF at a 5 ms budget under 50%, where the full fast-scan with
re-ranking finds 98% in 4.5 ms (2 cores).

An index searches through the `SearchBackend` protocol: `build` over one space's embeddings, then
`search`. A new back-end is one class here under `@register_backend("name")`, which puts it in
`BACKENDS`; `choose_backend` holds the rule "auto" follows.

Not here: what an index stores or how it is updated (index_files.py, index_update.py), how a query
vector is made (index.py).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

EXACT_UP_TO = 100_000  # backend="auto": one matrix product up to here, FAISS above
FLAT_UP_TO = 50_000  # FAISS: an exact flat index up to here, product quantisation above
RERANK_FACTOR = 32  # candidates re-scored exactly per result wanted (16 gave recall@10 0.948, 32 0.980)
TRAIN_ROWS = 65_536  # vectors the quantiser learns from: 16 centroids per sub-quantiser need few
SHARD_ROWS = 100_000  # at least this many vectors a shard: below, a thread costs more than it saves
MAX_SHARDS = 8  # the scan is bound by memory bandwidth, which a few cores already saturate
CHUNK_ROWS = 16_384  # NumPy exact search: rows upcast to float32 at a time (32 MB of 512-d vectors)


@dataclass(frozen=True)
class CacheFiles:
    """Where a back-end may keep what is slow to rebuild for one space of an index: files in the index
    directory named by back-end, space and manifest generation, so that any commit makes them stale."""

    directory: Path
    space: str  # "text" or "image"
    generation: int

    def path(self, backend: str) -> Path:
        return self.directory / f"{backend}-{self.space}-{self.generation}.npz"

    def stale(self, backend: str) -> Iterator[Path]:
        """The back-end's files for this space, of any generation: delete them before writing `path`."""
        return self.directory.glob(f"{backend}-{self.space}-*")


class SearchBackend(Protocol):
    """The k nearest of one fixed set of (N, D) normalised float16 embeddings to each query."""

    @classmethod
    def build(cls, embeddings: np.ndarray, cache: CacheFiles) -> SearchBackend:
        """Ready to search `embeddings` (rows in the index's order), reading or writing `cache` at will."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries (Q, D) -> (scores, rows), (Q, k) each, best first; a row of -1 is no result."""
        ...


BACKENDS: dict[str, type[SearchBackend]] = {}  # name -> class, filled by @register_backend


def register_backend(name: str):
    """Class decorator: `ImageIndex.search(..., backend=name)` searches with the class."""

    def register(cls: type[SearchBackend]) -> type[SearchBackend]:
        BACKENDS[name] = cls
        return cls

    return register


@register_backend("exact")
class ExactBackend:
    """One float16 matrix product over every embedding, re-scored in float32 (`exact_search`)."""

    def __init__(self, embeddings: np.ndarray):
        self.embeddings = embeddings

    @classmethod
    def build(cls, embeddings: np.ndarray, cache: CacheFiles) -> ExactBackend:
        return cls(embeddings)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_search(self.embeddings, queries, k)


@register_backend("faiss")
class FaissBackend:
    """A `build_faiss_index` index, its candidates re-scored exactly (`faiss_search`). A quantised one is
    slow to train, so it is cached in the index directory; without faiss installed, exact search."""

    def __init__(self, index, embeddings: np.ndarray):
        self.index, self.embeddings = index, embeddings

    @classmethod
    def build(cls, embeddings: np.ndarray, cache: CacheFiles) -> FaissBackend | ExactBackend:
        if import_faiss() is None:
            return ExactBackend.build(embeddings, cache)
        path = cache.path("faiss")
        if path.is_file():
            return cls(read_faiss_index(path), embeddings)
        index = build_faiss_index(embeddings, flat_up_to=FLAT_UP_TO)
        if len(embeddings) > FLAT_UP_TO:
            try:  # searching a read-only index still works, only slower to start
                for stale in cache.stale("faiss"):
                    stale.unlink()
                write_faiss_index(index, f"{path}.tmp")
                os.replace(f"{path}.tmp", path)
            except (OSError, RuntimeError) as error:
                log.warning("could not cache the FAISS index in '%s': %s", path, error)
        return cls(index, embeddings)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss_search(self.index, self.embeddings, queries, k)


def choose_backend(name: str, count: int) -> str:
    """The name in BACKENDS that searches `count` embeddings for `name`: itself, or for "auto" one matrix
    product up to EXACT_UP_TO and FAISS above."""
    if name == "auto":
        return "exact" if count <= EXACT_UP_TO else "faiss"
    if name not in BACKENDS:
        *others, last = [repr(known) for known in ["auto", *BACKENDS]]
        raise ValueError(f"backend must be {', '.join(others)} or {last}, got {name!r}")
    return name


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of queries (Q, D) with float16 embeddings (N, D): (scores, rows), (Q, k) each,
    best first, scored in float32.

    In a process that has torch loaded (the library, a server), one float16 matrix product (torch reads
    the stored matrix as it is, ~10x faster here than upcasting it) picks max(4k, k+64) candidates, which
    are re-scored in float32: float32-exact unless that many scores lie within float16 rounding (under
    5e-4) of the k-th. Without torch (a one-shot `dinobridge search` by text, which never imports it:
    the import alone takes ~3.5 s), NumPy scores every row in float32, CHUNK_ROWS at a time.

    Several queries cost about what each costs alone (100,000 x 384, one core: 9 ms a query in float16);
    scoring them in float32, upcast chunk by chunk to share one reading of the rows, was measured slower
    (2 queries 63 ms, 8 queries 116 ms against 19 and 69 ms).
    """
    queries = np.asarray(queries, np.float32)
    torch = torch_if_loaded()
    if torch is None:
        scores = np.concatenate(
            [
                queries @ np.asarray(embeddings[start : start + CHUNK_ROWS], np.float32).T
                for start in range(0, len(embeddings), CHUNK_ROWS)
            ],
            axis=1,
        )
        wanted = min(len(embeddings), k)
        rows = np.argpartition(-scores, wanted - 1, axis=1)[:, :wanted]
        return _best_first(np.take_along_axis(scores, rows, 1), rows)
    rough = torch.from_numpy(queries).half() @ torch.from_numpy(np.asarray(embeddings, np.float16)).T
    wanted = min(len(embeddings), max(4 * k, k + 64))
    return rescore(embeddings, queries, torch.topk(rough, wanted, dim=1).indices.numpy(), k)


def rescore(
    embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidate rows (Q, C), scored in float32: (scores, rows), (Q, k) each.

    Rows below 0 (FAISS's "no result") score -inf and come last, as -1. In torch when it is loaded: its
    gather and batched product take 0.07 ms for 320 candidates of 512 dimensions, NumPy's 0.3 ms.
    """
    candidates = np.asarray(candidates, np.int64)
    missing = candidates < 0
    torch = torch_if_loaded()
    if torch is None:
        vectors = np.asarray(embeddings, np.float16)[candidates.clip(min=0)].astype(np.float32)
        scores = np.einsum("qcd,qd->qc", vectors, np.asarray(queries, np.float32))
    else:
        vectors = torch.from_numpy(np.asarray(embeddings, np.float16))[
            torch.from_numpy(candidates).clamp(min=0)
        ]
        query = torch.from_numpy(np.asarray(queries, np.float32))[:, :, None]
        scores = torch.bmm(vectors.float(), query)[..., 0].numpy()
    scores = np.where(missing, -np.inf, scores).astype(np.float32)
    wanted = min(k, candidates.shape[1])
    order = np.argpartition(-scores, wanted - 1, axis=1)[:, :wanted]
    scores, rows = _best_first(np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1))
    return scores, np.where(np.isinf(scores), -1, rows)


def _best_first(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) scores and their rows sorted best first, ties by row (a stable order on every run)."""
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def torch_if_loaded():
    """torch if this process has already imported it, else None: worth using then, not worth importing."""
    return sys.modules.get("torch")


def build_faiss_index(
    embeddings: np.ndarray, flat_up_to: int = FLAT_UP_TO, shards: int | None = None, chunk_rows: int = 65_536
):
    """An inner-product FAISS index over (N, D) normalised embeddings, its type chosen by size (above).

    `shards`: how many parallel scans a quantised index is split into (default: one a core, at most
    MAX_SHARDS, each of at least SHARD_ROWS vectors).
    """
    faiss = import_faiss()
    if faiss is None:
        raise ImportError("the FAISS back-end needs faiss-cpu: pip install faiss-cpu")
    count, dim = embeddings.shape
    if count <= flat_up_to:
        index = faiss.IndexFlatIP(dim)
        for start in range(0, count, chunk_rows):
            index.add(np.ascontiguousarray(embeddings[start : start + chunk_rows], np.float32))
        return index
    sub_quantisers = dim // 2 if dim % 2 == 0 else dim
    quantiser = faiss.index_factory(dim, f"PQ{sub_quantisers}x4fs", faiss.METRIC_INNER_PRODUCT)
    # Evenly spaced rows, so the same collection always trains the same quantiser.
    sample = np.linspace(0, count - 1, min(count, TRAIN_ROWS)).astype(np.int64)
    quantiser.train(np.ascontiguousarray(embeddings[sample], np.float32))
    # Consecutive row ranges, one a shard; successive ids make a shard's local row i global row start + i.
    if shards is None:
        shards = max(1, min(os.cpu_count() or 1, MAX_SHARDS, count // SHARD_ROWS))
    index = faiss.IndexShards(dim, True, True)  # threaded
    bounds = np.linspace(0, count, shards + 1).astype(np.int64)
    for first, end in zip(bounds[:-1], bounds[1:], strict=True):
        shard = faiss.clone_index(quantiser)
        for start in range(first, end, chunk_rows):
            shard.add(np.ascontiguousarray(embeddings[start : min(start + chunk_rows, end)], np.float32))
        index.add_shard(shard)  # faiss's wrapper keeps the shard alive as long as `index`
    return index


def write_faiss_index(index, path: str | Path) -> None:
    """Save a `build_faiss_index` index to one file. FAISS cannot write `IndexShards` itself: each shard
    is serialised by FAISS and the shards stored together, in order."""
    faiss = import_faiss()
    shards = [index.at(i) for i in range(index.count())] if isinstance(index, faiss.IndexShards) else [index]
    with open(path, "wb") as file:
        np.savez(file, *[faiss.serialize_index(shard) for shard in shards])


def read_faiss_index(path: str | Path):
    """The index `write_faiss_index` saved at `path`."""
    faiss = import_faiss()
    with np.load(path, allow_pickle=False) as saved:
        shards = [faiss.deserialize_index(saved[f"arr_{i}"]) for i in range(len(saved.files))]
    if isinstance(shards[0], faiss.IndexFlatIP):  # small collections: one flat index, never sharded
        return shards[0]
    index = faiss.IndexShards(shards[0].d, True, True)
    for shard in shards:
        index.add_shard(shard)
    return index


def faiss_search(
    index, embeddings: np.ndarray, queries: np.ndarray, k: int, rerank_factor: int = RERANK_FACTOR
) -> tuple[np.ndarray, np.ndarray]:
    """Like `exact_search`, through a `build_faiss_index` index over the same embeddings.

    A quantised index only proposes candidates; their scores come from the stored vectors, so a score
    never carries quantisation error and the order among the candidates is exact.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    k = min(k, len(embeddings))
    if isinstance(index, import_faiss().IndexFlatIP):
        return index.search(queries, k)
    _, candidates = index.search(queries, min(len(embeddings), k * rerank_factor))
    return rescore(embeddings, queries, candidates, k)


_faiss_missing_logged = False


def import_faiss():
    """The faiss module, or None (said once) when faiss-cpu is not installed: search falls back to exact."""
    global _faiss_missing_logged
    try:
        import faiss
    except ImportError:
        if not _faiss_missing_logged:
            log.warning("faiss is not installed (pip install faiss-cpu): searching with the exact back-end")
            _faiss_missing_logged = True
        return None
    return faiss
