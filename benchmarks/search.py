"""Search latency and recall: the exact back-end against the FAISS index the size rule picks.

    python benchmarks/search.py                  # 1,000,000 random unit vectors, 512-d (~3 min on 2 cores)
    python benchmarks/search.py --n 100000       # smaller
    python benchmarks/search.py --data lowrank   # vectors with the low intrinsic dimension of real embeddings
    python benchmarks/search.py --hnsw           # also HNSW, the graph index this size rule rejected (~15 min)

Stores the vectors as the index does (float16, normalised), then times top-10 single queries (p50, p99),
measures FAISS's recall@10 against exact results, its build time and memory, and prints the ratio of the
two latencies. Random unit vectors in 512 dimensions are the worst case for any approximate index: no
structure, every point nearly orthogonal to every other. `--data lowrank` puts the vectors near a 32-d
subspace (plus noise), closer to how real image embeddings are spread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bridge.search import (  # noqa: E402
    FLAT_UP_TO,
    RERANK_FACTOR,
    build_faiss_index,
    exact_search,
    faiss_search,
    import_faiss,
)


def unit_vectors(count: int, dim: int, data: str, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    """(count, dim) float32 unit vectors, made in blocks to bound the float32 temporaries."""
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        rows = min(100_000, count - start)
        if data == "random":
            block = rng.standard_normal((rows, dim), np.float32)
        else:
            block = rng.standard_normal((rows, len(basis)), np.float32) @ basis
            block += 0.1 * rng.standard_normal((rows, dim), np.float32)
        out[start : start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reference_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The true top-k rows, every score in float32: each chunk upcast once for all the queries."""
    scores = np.empty((len(queries), len(embeddings)), np.float32)
    for start in range(0, len(embeddings), 65_536):
        scores[:, start : start + 65_536] = queries @ embeddings[start : start + 65_536].astype(np.float32).T
    rows = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(rows, np.argsort(-np.take_along_axis(scores, rows, 1), axis=1), 1)


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(truth, found, strict=True)]))


def latencies_ms(search, queries: np.ndarray) -> np.ndarray:
    times = []
    for query in queries:
        started = time.perf_counter()
        search(query[None])
        times.append(time.perf_counter() - started)
    return np.array(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the collection")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", choices=["random", "lowrank"], default="random")
    parser.add_argument(
        "--queries", type=int, default=200, help="FAISS queries (the exact back-end times a quarter)"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hnsw", action="store_true", help="also time HNSW (M=32), the rejected alternative")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((32, args.dim), np.float32)

    started = time.perf_counter()
    embeddings = unit_vectors(args.n, args.dim, args.data, rng, basis).astype(np.float16)
    queries = unit_vectors(args.queries, args.dim, args.data, rng, basis)
    print(f"{args.n:,} {args.data} unit vectors, {args.dim}-d, stored float16; top-{args.k} single queries")
    print(f"  (made in {time.perf_counter() - started:.1f} s; cores: {os.cpu_count()})")

    truth = np.concatenate([reference_top_k(embeddings, q, args.k) for q in np.array_split(queries, 4)])
    upcast_ms = latencies_ms(lambda q: reference_top_k(embeddings, q, args.k), queries[:10])
    exact_ms = latencies_ms(
        lambda q: exact_search(embeddings, q, args.k), queries[: max(20, args.queries // 4)]
    )
    per_million = embeddings.nbytes / args.n * 1e6 / 2**20
    exact_recall = recall(truth, exact_search(embeddings, queries, args.k)[1])
    rows = [
        ("exact: float16 product, float32 re-score", 0.0, exact_ms, exact_recall, per_million),
        ("exact: upcast to float32 in chunks (10 q)", 0.0, upcast_ms, 1.0, per_million),
    ]

    before = resident_mb()
    started = time.perf_counter()
    index = build_faiss_index(embeddings)
    build_s = time.perf_counter() - started
    faiss_mb = (resident_mb() - before) / args.n * 1e6
    flat = type(index).__name__ == "IndexFlatIP"
    kind = "IndexFlatIP" if flat else f"PQ fast-scan, {index.count()} shard(s)"
    for factor in [] if flat else [RERANK_FACTOR, 16, 64]:
        found = faiss_search(index, embeddings, queries, args.k, factor)[1]
        times = latencies_ms(lambda q, f=factor: faiss_search(index, embeddings, q, args.k, f), queries)
        label = f"faiss {kind} + re-rank {factor}k" + (" (default)" if factor == RERANK_FACTOR else "")
        rows.append((label, build_s, times, recall(truth, found), faiss_mb))
    if flat:
        times = latencies_ms(lambda q: faiss_search(index, embeddings, q, args.k), queries)
        found = faiss_search(index, embeddings, queries, args.k)[1]
        rows.append((f"faiss {kind}", build_s, times, recall(truth, found), faiss_mb))
    elif index.count() > 1:  # what the parallel shards gain: the same codes scanned by one thread
        started = time.perf_counter()
        one_scan = build_faiss_index(embeddings, shards=1)
        one_build = time.perf_counter() - started
        found = faiss_search(one_scan, embeddings, queries, args.k)[1]
        times = latencies_ms(lambda q: faiss_search(one_scan, embeddings, q, args.k), queries)
        label = f"faiss PQ fast-scan, 1 shard + re-rank {RERANK_FACTOR}k"
        rows.append((label, one_build, times, recall(truth, found), faiss_mb))
        del one_scan
    if args.hnsw:
        faiss = import_faiss()
        before, started = resident_mb(), time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
        for start in range(0, args.n, 65_536):
            hnsw.add(embeddings[start : start + 65_536].astype(np.float32))
        hnsw_build, hnsw_mb = time.perf_counter() - started, (resident_mb() - before) / args.n * 1e6
        for ef in [256, 1024]:
            hnsw.hnsw.efSearch = ef
            found = hnsw.search(queries, args.k)[1]
            times = latencies_ms(lambda q: hnsw.search(q, args.k), queries)
            rows.append((f"faiss HNSW M=32 efSearch={ef}", hnsw_build, times, recall(truth, found), hnsw_mb))

    print(f"\nsize rule: FAISS flat up to {FLAT_UP_TO:,} vectors, 4-bit PQ fast-scan above -> {kind}")
    print(f"{'back-end':<56}{'build s':>9}{'p50 ms':>9}{'p99 ms':>9}{'recall@10':>11}{'MB per 1M':>11}")
    for label, build, times, found, megabytes in rows:
        p50, p99 = np.percentile(times, [50, 99])
        print(f"{label:<56}{build:>9.1f}{p50:>9.2f}{p99:>9.2f}{found:>11.3f}{megabytes:>11,.0f}")
    exact_p50, faiss_p50 = np.median(rows[0][2]), np.median(rows[2][2])
    print(f"\nratio: exact p50 / FAISS p50 (default settings) = {exact_p50 / faiss_p50:.1f}x")
    print(
        "MB per 1M: exact = the float16 matrix it scans; FAISS = the resident memory its index adds on top "
        "(the re-rank reads the same float16 matrix)"
    )
    met = [label for label, _, times, found, _ in rows[2:] if np.median(times) <= 5 and found >= 0.95]
    print(f"target p50 <= 5 ms with recall@10 >= 0.95: {'met by ' + ', '.join(met) if met else 'not met'}")


if __name__ == "__main__":
    main()
