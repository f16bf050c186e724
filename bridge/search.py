"""Search back-ends: the k nearest of a set of normalised float16 embeddings to a query, exactly or with FAISS.

Exact search is one float16 matrix product, fast enough up to about 1e5 vectors. Above that, FAISS. The
FAISS index type follows FAISS's own guidelines for "a few million vectors, recall matters, memory is
not the constraint", chosen by measurement (benchmarks/search.py, figures in benchmarks/RESULTS.md):

- up to FLAT_UP_TO vectors: `IndexFlatIP`, exact.
- above: product quantisation with 4-bit fast-scan codes (`PQ{d/2}x4fs`: 2 dimensions a sub-quantiser,
  d/4 bytes a vector), scanned in full with SIMD, then the best k * RERANK_FACTOR candidates re-scored
  exactly against the stored float16 vectors. Graph and cluster indexes (HNSW, IVF) skip most of the
  collection, which is what makes them fast, and what makes them miss on embeddings without cluster
  structure: on 1M random 512-d vectors HNSW (M=32, efSearch 256) found 5% of the true top 10 and IVF
  at a 5 ms budget under 50%, where the full fast-scan with re-ranking finds over 95% in about 5 ms.

Not here: what an index stores or how it is updated (index.py).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

EXACT_UP_TO = 100_000  # backend="auto": one matrix product up to here, FAISS above (DESIGN.md)
FLAT_UP_TO = 50_000  # FAISS: an exact flat index up to here, product quantisation above
RERANK_FACTOR = 32  # candidates re-scored exactly per result wanted (16 gave recall@10 0.955, 32 0.983)
TRAIN_ROWS = 65_536  # vectors the quantiser learns from: 16 centroids per sub-quantiser need few


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of queries (Q, D) with float16 embeddings (N, D): (scores, rows), (Q, k) each,
    best first. One float16 matrix product (torch reads the stored matrix as it is, ~10x faster here than
    upcasting it in chunks) picks max(4k, k+64) candidates, which are re-scored in float32; the result
    is float32-exact unless that many scores lie within float16 rounding (under 5e-4) of the k-th."""
    queries = np.asarray(queries, np.float32)
    rough = torch.from_numpy(queries).half() @ torch.from_numpy(np.asarray(embeddings, np.float16)).T
    wanted = min(len(embeddings), max(4 * k, k + 64))
    return rescore(embeddings, queries, torch.topk(rough, wanted, dim=1).indices.numpy(), k)


def rescore(
    embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidate rows (Q, C), scored in float32: (scores, rows), (Q, k) each.

    Rows below 0 (FAISS's "no result") score -inf and come last, as -1.
    """
    missing = candidates < 0
    rows = np.where(missing, 0, candidates)
    scores = np.einsum("qd,qcd->qc", queries, embeddings[rows].astype(np.float32))
    scores[missing] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, candidates.shape[1])]
    scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)
    return scores, np.where(np.isinf(scores), -1, rows)


def build_faiss_index(embeddings: np.ndarray, flat_up_to: int = FLAT_UP_TO, chunk_rows: int = 65_536):
    """An inner-product FAISS index over (N, D) normalised embeddings, its type chosen by size (above)."""
    faiss = import_faiss()
    if faiss is None:
        raise ImportError("the FAISS back-end needs faiss-cpu: pip install faiss-cpu")
    count, dim = embeddings.shape
    if count <= flat_up_to:
        index = faiss.IndexFlatIP(dim)
    else:
        sub_quantisers = dim // 2 if dim % 2 == 0 else dim
        index = faiss.index_factory(dim, f"PQ{sub_quantisers}x4fs", faiss.METRIC_INNER_PRODUCT)
        # Evenly spaced rows, so the same collection always trains the same quantiser.
        sample = np.linspace(0, count - 1, min(count, TRAIN_ROWS)).astype(np.int64)
        index.train(np.ascontiguousarray(embeddings[sample], np.float32))
    for start in range(0, count, chunk_rows):
        index.add(np.ascontiguousarray(embeddings[start : start + chunk_rows], np.float32))
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
    if index.__class__.__name__ == "IndexFlatIP":
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
