"""Decoding in worker processes: the one parallel input pipeline of the index and the feature cache.

`ordered_map(function, tasks, workers)` runs `function(*task)` in worker processes and yields the results
in task order, a bounded number ahead of the consumer, so decoding overlaps the encoder without decoded
images piling up in memory. The model stays in the calling process.

Workers start by "forkserver": they fork from a clean process that imported the function's module once,
not from the caller, whose torch and tokenizer threads fork does not copy safely (a fork pool hung here
once torch had run), and without re-importing everything as "spawn" does. Each worker runs torch on one
thread, so N workers use N cores. A script that calls this needs an `if __name__ == "__main__":` guard.

Not here: what a worker does with a file (images.py loads, vision.py preprocesses).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

import torch


def default_workers() -> int:
    """One decoding process per core but one, which the encoder keeps."""
    return max(1, (os.cpu_count() or 2) - 1)


def ordered_map(
    function: Callable,
    tasks: Sequence[tuple],
    workers: int | None = None,
    window: int = 4,
    timing: dict[str, float] | None = None,
) -> Iterator[tuple[tuple, object]]:
    """(task, function(*task)) for each task, in order. `workers` 0 runs here; None: `default_workers()`.

    At most max(window, 4 * workers) tasks are in flight. `timing["wait"]`, when given, accumulates the
    seconds the caller spent waiting for results: the share of the time decoding is the bottleneck.
    `function` must be importable (module level) and should return its errors rather than raise them.
    """
    timing = {"wait": 0.0} if timing is None else timing
    workers = default_workers() if workers is None else workers
    if workers == 0 or not tasks:
        for task in tasks:
            clock = time.perf_counter()
            result = function(*task)
            timing["wait"] += time.perf_counter() - clock
            yield task, result
        return
    methods = multiprocessing.get_all_start_methods()  # Windows has only spawn
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([function.__module__])
    pool = ProcessPoolExecutor(workers, context, initializer=torch.set_num_threads, initargs=(1,))
    pending: deque = deque()

    def oldest() -> tuple[tuple, object]:
        task, future = pending.popleft()
        clock = time.perf_counter()
        result = future.result()
        timing["wait"] += time.perf_counter() - clock
        return task, result

    try:
        for task in tasks:
            pending.append((task, pool.submit(function, *task)))
            if len(pending) >= max(window, 4 * workers):
                yield oldest()
        while pending:
            yield oldest()
    finally:
        pool.shutdown(cancel_futures=True)
