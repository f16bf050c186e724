"""Decoding in worker processes: the one parallel input pipeline of the index and the feature cache.

`ordered_map(function, tasks, workers)` runs `function(*task)` in worker processes and yields the results
in task order, a bounded number ahead of the consumer, so decoding overlaps the encoder without decoded
images piling up in memory. The model stays in the calling process.

Workers start by "forkserver": they fork from a clean process that imported the function's module once,
not from the caller, whose torch and tokenizer threads fork does not copy safely (a fork pool hung here
once torch had run), and without re-importing everything as "spawn" does. Each worker runs torch on one
thread, so N workers use N cores. A script that calls this needs an `if __name__ == "__main__":` guard.

Every process started here dies with the caller, even one killed with SIGKILL, which runs no clean-up:
each worker exits when a pipe only the caller writes to reaches end-of-file (its death closes it), and
on Linux the kernel also kills the fork server when the caller dies and each worker when the fork server
dies (PR_SET_PDEATHSIG). Without that a killed `dinobridge index` left its workers waiting forever on a
queue they themselves hold open, and they in turn kept the fork server and the resource tracker alive.

On a GPU, JPEGs are decoded there instead (`decode_jpegs`, nvJPEG through torchvision): workers only
read and hash the bytes and check the header (`gpu_decodable`); every file the GPU would not decode as the
CPU loader does (EXIF-rotated, CMYK, too large, not a JPEG), and any nvJPEG rejects, goes to the CPU
loader, so a bad file is reported the same way on either path.

Not here: what a worker does with a file (images.py loads, vision.py preprocesses).
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import signal
import sys
import threading
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
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Set, to the caller's pid, while the fork server starts: the server reads it when it imports this module.
FORK_SERVER_PARENT = "DINOBRIDGE_FORK_SERVER_PARENT"


def die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this process as soon as its parent exits; elsewhere nothing.

    The kernel watches the parent *thread* that started this process, not the whole parent process.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _guard_fork_server() -> None:
    """Run where this module is imported: in the fork server, tie it to the caller that started it."""
    parent = os.environ.pop(FORK_SERVER_PARENT, None)
    if parent is None:
        return
    die_with_parent()
    if os.getppid() != int(parent):  # the caller died before the guard was set: nothing is left to serve
        os._exit(0)


_guard_fork_server()


def start_fork_server(context, module: str) -> None:
    """Start the fork server (once a process) with `module` preloaded, without the working directory on
    its import path, and tied to the caller's life.

    The server runs as `python -c ...`, which puts the working directory first on sys.path, and Python
    3.11's server does not take the caller's path: a folder there named like a package (a bridge saved as
    ./bridge, say) would shadow that package in every worker, and each would die on import.
    PYTHONSAFEPATH (Python 3.11 and later) keeps the directory off.

    The server preloads this module first, which makes the kernel kill it with the caller. Only when
    the main thread starts it: the kernel would kill it when a passing thread that started it ends. (A
    server started elsewhere still exits once the caller and its workers are gone, as multiprocessing
    has it do.)
    """
    from multiprocessing import forkserver

    context.set_forkserver_preload([__name__, module])
    settings = {"PYTHONSAFEPATH": "1"}
    if threading.current_thread() is threading.main_thread():
        settings[FORK_SERVER_PARENT] = str(os.getpid())
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _start_worker(caller_alive) -> None:
    """A worker's start-up: torch on one thread, and an exit as soon as the caller is gone.

    `caller_alive` is the read end of a pipe whose only write end the caller holds: reading it returns
    end-of-file when the caller dies, however it dies. This works under any start method and on every
    platform; the kernel's parent-death signal (Linux) adds a kill when the fork server dies.
    """
    torch.set_num_threads(1)
    die_with_parent()
    threading.Thread(target=_exit_when_closed, args=(caller_alive,), name="caller-watch", daemon=True).start()


def _exit_when_closed(caller_alive) -> None:
    try:
        caller_alive.recv_bytes()  # nothing is ever sent: this returns only by end-of-file
    except (EOFError, OSError):
        pass
    os._exit(1)


def default_workers() -> int:
    """One decoding process per core but one, which the encoder keeps."""
    return max(1, (os.cpu_count() or 2) - 1)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or taskset's share), not the
    machine's count, which overstates it wherever the process is pinned."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def split_cores(
    cores: int, on_gpu: bool = False, workers: int | None = None, threads: int | None = None
) -> tuple[int, int]:
    """(decode worker processes, torch threads of the encoding process) for `cores` cores.

    On a CPU the two share the cores, never more than there are (workers + threads <= cores): a thread
    more than the cores makes the encoder's matmuls and the decoders wait for each other. On one or two
    cores no worker: the one process decodes (at reduced scale) between batches and torch has every
    core; measured on 2 cores this beat one worker beside one thread by 1.5-3x (benchmarks/RESULTS.md,
    "Indexing a phone's photos on a CPU"): a worker costs a second process's start-up (seconds) and
    leaves the encoder one core. On more cores half go to decoding, the odd one to the encoder (not
    measured here: no such machine). On a GPU the encoder needs one thread to feed it and every other
    core decodes. An override of either fills the rest of the cores with the other; both given are
    taken as they are.
    """
    if cores < 1:
        raise ValueError(f"cores must be at least 1, got {cores}")
    if workers is not None and threads is not None:
        return workers, threads
    if workers is not None:
        return workers, max(1, cores - workers)
    if threads is not None:
        return max(0, cores - threads), threads
    if on_gpu:
        return cores - 1, 1
    if cores <= 2:
        return 0, cores
    return cores // 2, cores - cores // 2


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
    # The write end stays here, open until the pool is shut down: workers start on demand, each taking
    # a copy of the read end, and exit when the write end closes.
    caller_alive, alive_writer = context.Pipe(duplex=False)
    pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(caller_alive,))
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
        caller_alive.close()
        alive_writer.close()


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
