"""Decoding in worker processes: the one parallel input pipeline of the index and the feature cache.

`ordered_map(function, tasks, workers)` runs `function(*task)` in worker processes and yields the results
in task order, a bounded number ahead of the consumer, so decoding overlaps the encoder without decoded
images piling up in memory. The model stays in the calling process.

Workers start by "forkserver": they fork from a clean process that imported the function's module once,
not from the caller, whose torch and tokenizer threads fork does not copy safely (a fork pool hung here
once torch had run), and without re-importing everything as "spawn" does. Each worker runs torch on one
thread, so N workers use N cores. A script that calls this needs an `if __name__ == "__main__":` guard.

On a GPU, JPEGs are decoded there instead (`decode_jpegs`, nvJPEG through torchvision): workers only
read and hash the bytes and check the header (`gpu_decodable`); every file the GPU would not decode as the
CPU loader does (EXIF-rotated, CMYK, too large, not a JPEG), and any nvJPEG rejects, goes to the CPU
loader, so a bad file is reported the same way on either path.

Not here: what a worker does with a file (images.py loads, vision.py preprocesses).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

from bridge.images import DEFAULT_MAX_PIXELS
from bridge.vision import Preprocessing

EXIF_ORIENTATION = 0x0112


def start_fork_server(context, module: str) -> None:
    """Start the fork server (once a process) with `module` preloaded, without the working directory on
    its import path.

    The server runs as `python -c ...`, which puts the working directory first on sys.path, and Python
    3.11's server does not take the caller's path: a folder there named like a package (a bridge saved as
    ./bridge, say) would shadow that package in every worker, and each would die on import.
    PYTHONSAFEPATH (Python 3.11 and later) keeps the directory off.
    """
    from multiprocessing import forkserver

    context.set_forkserver_preload([module])
    saved = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONSAFEPATH"]
        else:
            os.environ["PYTHONSAFEPATH"] = saved


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
        start_fork_server(context, function.__module__)
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


def gpu_decodable(data: bytes) -> bool:
    """Whether nvJPEG gives what `load_image` would for these bytes: an upright RGB or greyscale JPEG
    within the pixel limit. Reads the header only (no pixels), so it is cheap enough for every file."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            upright = image.getexif().get(EXIF_ORIENTATION, 1) == 1  # nvJPEG ignores EXIF rotation
            small = image.width * image.height <= DEFAULT_MAX_PIXELS
            return image.format == "JPEG" and image.mode in ("RGB", "L") and upright and small
    except Exception:  # anything unreadable is the CPU loader's to report
        return False


def decode_jpegs(
    datas: Sequence[bytes], preprocessing: Preprocessing, device: torch.device | str
) -> list[torch.Tensor | None]:
    """JPEG bytes -> preprocessed (3, S, S) float32 pixels on `device`, decoded there (nvJPEG on a GPU,
    one batched call); None for each image the decoder rejects, for the caller to give the CPU loader."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings():  # torchvision 0.29 points decoding at TorchCodec; nvJPEG is still here
        warnings.simplefilter("ignore")
        try:
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: decode one by one to find it
            images = [_decode_one(tensor, device) for tensor in tensors]
    return [None if image is None else preprocessing.from_tensor(image) for image in images]


def _decode_one(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def pixel_batch(pixels: Sequence[np.ndarray | torch.Tensor], device: torch.device) -> torch.Tensor:
    """(B, 3, S, S) on `device` from CPU-preprocessed arrays and already-decoded tensors, in order.

    The CPU arrays go in one pinned host copy, which reaches a GPU without blocking the encoder.
    """
    on_host = [i for i, p in enumerate(pixels) if isinstance(p, np.ndarray)]
    host = torch.from_numpy(np.stack([pixels[i] for i in on_host])) if on_host else None
    if len(on_host) == len(pixels) and device.type == "cpu":
        return host
    if host is not None and device.type == "cuda":
        host = host.pin_memory()
    shape = tuple(pixels[0].shape)
    batch = torch.empty((len(pixels), *shape), dtype=torch.float32, device=device)
    if host is not None:
        batch[on_host] = host.to(device, non_blocking=True)
    for i, tensor in enumerate(pixels):
        if not isinstance(tensor, np.ndarray):
            batch[i] = tensor
    return batch
