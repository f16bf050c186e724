"""The update pipeline of an image index: walk the folder, decode in worker processes, embed, commit.

`update_index` brings an index in line with its folder (what `ImageIndex.update` promises is said
there): files are read, hashed and decoded in workers (decoding.py), embedded here a batch at a time, and
committed every `commit_every` images; under `accelerate launch` each process does its share and the main
process merges the parts. The main process holds the index's lock for the whole run (index_lock.py): it
alone commits, so the others trust it. Before anything else it adopts what is committed now and drops
damaged shards, whose images the run then embeds again like any file the index lacks.

Not here: how a commit is made atomic, what the files are and how damage is found (index_files.py),
queries (index.py, search.py), the rules that say whether a file is an image and why it failed (images.py).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from bridge.decoding import decode_jpegs, gpu_decodable, ordered_map, pixel_batch, split_cores, usable_cores
from bridge.images import SUPPORTED_EXTENSIONS, ImageLoadError, not_an_image_reason, try_load_image
from bridge.index import IndexSummary, embed_images
from bridge.index_files import (
    FAILURE_LOG,
    MANIFEST,
    FileRecord,
    IndexStore,
    Part,
    Shard,
    is_index_file,
    write_atomic,
)
from bridge.index_lock import index_lock
from bridge.runtime import processes

if TYPE_CHECKING:
    from bridge.model import TextBridge

log = logging.getLogger(__name__)


def update_index(
    store: IndexStore,
    bridge: TextBridge,
    *,
    workers: int | None,
    batch_size: int,
    commit_every: int,
    progress: bool,
    gpu_decode: bool | None,
    walk: FolderWalk | None = None,
) -> IndexSummary:
    """Embed the new and changed files of the folder `store` indexes, drop the deleted ones; the run's
    summary (arguments as `ImageIndex.update` takes them). The main process holds the index's lock
    throughout; a second writer is refused (index_lock.py)."""
    root = store.root
    if not root.is_dir():  # an unmounted drive must not read as "every image was deleted"
        raise FileNotFoundError(f"folder '{root}' indexed by '{store.directory}' is not there")
    started, summary, state = time.perf_counter(), IndexSummary(), processes()
    rank, world = state.process_index, state.num_processes
    with _taking_over(store, state):
        walked = summary if rank == 0 else IndexSummary()
        tasks, gone = _scan(root, store, walked, walk or FolderWalk())
        if not (tasks or store.live or (store.directory / MANIFEST).is_file()):
            raise ValueError(_nothing_to_index(root, walked))  # a new index of no images: say why
        tasks = tasks[rank::world]
        part = Part(store.directory, rank, world, store.manifest["next_shard"]) if world > 1 else None
        commit = store.commit if part is None else part.add
        if gone and rank == 0:
            store.commit([], [], [], drops=gone)
            summary.removed = len(gone)

        records, text, image, drops, batch = [], [], [], [], []
        preprocessing, device = bridge.encoder.preprocessing, bridge.encoder.device
        gpu_decode = device.type == "cuda" if gpu_decode is None else gpu_decode

        def embed_batch() -> None:
            clock = time.perf_counter()
            decoded = _decode_left_for_the_device(batch, preprocessing, device)
            for record, error in [(r, p) for r, p in decoded if isinstance(p, ImageLoadError)]:
                summary.failed.append((str(root / record.path), error.reason))
                summary.indexed -= 1
                if record.path in store.live:  # changed and now unreadable: its old embedding is stale
                    drops.append(store.live[record.path])
            good = [(record, pixels) for record, pixels in decoded if not isinstance(pixels, ImageLoadError)]
            if good:
                vectors = embed_images(bridge, pixel_batch([pixels for _, pixels in good], device))
                records.extend(record for record, _ in good)
                text.extend(vectors[0])
                image.extend(vectors[1])
            summary.model_seconds += time.perf_counter() - clock
            batch.clear()

        timing = {"wait": 0.0}
        jobs = [(path, known, preprocessing, gpu_decode) for path, _, _, _, known in tasks]
        if workers is None:  # the workers' share of the cores (the CLI also sets the encoder's threads)
            workers = split_cores(usable_cores(), device.type != "cpu")[0]
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
                if relative in store.live:  # changed and now unreadable: its old embedding is stale
                    drops.append(store.live[relative])
                continue
            record = FileRecord(relative, size, mtime_ns, sha256=result[0])
            if result[1] is None:  # touched but the same content: keep the embeddings, update the record
                shard, row = store.live[relative]
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
                for other in store.merge_parts(world)[1:]:  # the main process's own counts are in `summary`
                    summary.indexed += other["indexed"]
                    summary.unchanged += other["unchanged"]
                    summary.failed += [tuple(failure) for failure in other["failed"]]
                    summary.model_seconds = max(summary.model_seconds, other["model_seconds"])
            state.wait_for_everyone()
            if rank != 0:
                return summary
        if store.fragmented():
            store.save(store.directory)

        summary.failure_log = str(store.directory / FAILURE_LOG)
        reported = summary.failed + summary.skipped  # what was tried and failed, then what was not tried
        write_atomic(store.directory / FAILURE_LOG, "".join(f"{p}: {r}\n" for p, r in reported))
        summary.total, summary.decode_wait_seconds = len(store), timing["wait"]
        summary.seconds = time.perf_counter() - started
        log.info("index '%s': %s", store.directory, summary)
        return summary


@contextlib.contextmanager
def _taking_over(store: IndexStore, state) -> Iterator[None]:
    """Inside the block, `store` is the index this run changes. The main process takes the lock (held
    until the block ends), adopts what is committed now (another run may have committed since `store` was
    read), drops damaged shards so that their images are embedded again, and removes what killed runs
    left; then the other processes read the result. An error in the main process is raised in every
    process, so that none waits for it forever."""
    error, held = None, contextlib.ExitStack()
    if state.is_main_process:
        try:
            held.enter_context(index_lock(store.directory))
            store.catch_up()
            for name, (what, rows) in store.repair().items():
                log.warning(
                    "index '%s': shard '%s' was damaged (%s); dropped, its %d images are embedded again",
                    store.directory,
                    name,
                    what,
                    rows,
                )
            store.remove_orphans()
        except Exception as caught:  # raised below, once the other processes know
            error = caught
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if error is None else str(error)])[0]
        if not state.is_main_process:
            if message is not None:
                raise ValueError(message)
            store.catch_up()  # the main process holds the lock: this only reads
    if error is not None:
        held.close()
        raise error
    with held:
        yield


def _scan(
    root: Path, store: IndexStore, summary: IndexSummary, walk: FolderWalk
) -> tuple[list[tuple], list[tuple[Shard, int]]]:
    """Walk the folder: (files to read, rows of files gone). Files whose size and mtime match their
    record count as unchanged unread; files that cannot even be stat'ed count as failed."""
    tasks, seen = [], set()
    for path in _image_files(root, walk, summary, store.directory):
        relative = path.relative_to(root).as_posix()
        try:
            stat = path.stat()
        except OSError:  # a broken link, say: the loader words the reason
            error = try_load_image(path)[1] or ImageLoadError(str(path), "cannot read its size")
            summary.failed.append((str(path), error.reason))
            continue
        seen.add(relative)
        old = store.record(relative)
        if old is not None and (old.size, old.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            summary.unchanged += 1
        else:
            known = old.sha256 if old else None
            tasks.append((str(path), relative, stat.st_size, stat.st_mtime_ns, known))
    return tasks, [store.live[relative] for relative in store.live if relative not in seen]


def _nothing_to_index(root: Path, walked: IndexSummary) -> str:
    """Why a walk of `root` found no image, in one line: what it looked for and what it passed over.
    (An index whose images were all deleted since is an update, not this.)"""
    passed = [f"{len(walked.skipped)} files that are not images"] if walked.skipped else []
    if walked.hidden:
        passed.append(f"{walked.hidden} hidden or system names (--include-hidden walks them)")
    if walked.excluded > walked.hidden:
        passed.append(f"{walked.excluded - walked.hidden} names matching --exclude")
    if walked.failed:
        path, reason = walked.failed[0]
        passed.append(f"{len(walked.failed)} unreadable ('{path}': {reason})")
    extensions = " ".join(sorted(SUPPORTED_EXTENSIONS))
    found = f"it passed over {', '.join(passed)}" if passed else "the folder is empty"
    return f"no images to index in folder '{root}': looked for {extensions} files; {found}"


# Names that are no one's photos: hidden files and folders (".git", ".DS_Store", ".Trash", editors'
# "._" files), NAS thumbnails (Synology "@eaDir", "#recycle"), Windows' and macOS's bookkeeping, and code.
# rclip skips the same; a photo library holds thousands of thumbnails in "@eaDir" that would be indexed twice.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".*",
    "@eaDir",
    "#recycle",
    "node_modules",
    "__MACOSX",
    "Thumbs.db",
    "desktop.ini",
    "$RECYCLE.BIN",
    "System Volume Information",
)


@dataclass(frozen=True)
class FolderWalk:
    """Which files and folders under the indexed folder are walked. A pattern (fnmatch, case-sensitive)
    matches a name, or with a "/" in it the path relative to the folder; an excluded folder is not
    entered. Excluded files are counted in the summary (hidden ones apart), not listed."""

    include_hidden: bool = False  # walk DEFAULT_EXCLUDES too
    exclude: tuple[str, ...] = ()  # more patterns, as `dinobridge index --exclude` gives them

    def excluded_by(self, relative: str, name: str) -> str | None:
        """Why the walk passes over `name` at `relative`: "exclude" (a pattern given), "hidden" (a
        DEFAULT_EXCLUDES name), or None: it is walked. The user's patterns are asked first, so that a
        summary counts what they excluded as theirs."""

        def matches(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(relative if "/" in p else name, p) for p in patterns)

        if matches(self.exclude):
            return "exclude"
        return "hidden" if not self.include_hidden and matches(DEFAULT_EXCLUDES) else None

    def count_excluded(self, relative: str, name: str, summary: IndexSummary) -> bool:
        """Whether the walk passes over `name`; if so, counted in `summary` by why."""
        why = self.excluded_by(relative, name)
        summary.excluded += why is not None
        summary.hidden += why == "hidden"
        return why is not None


def _image_files(
    root: Path, walk: FolderWalk, summary: IndexSummary, index_dir: Path | None = None
) -> Iterator[Path]:
    """Supported image files under `root`, recursively, sorted. Excluded names (`walk`) are counted in
    `summary.excluded` (and `summary.hidden`); other files that are not images, with the reason, in
    `summary.skipped`; folders that cannot be listed in `summary.failed`. Links are followed, to files and to folders, but a folder
    is walked once whatever the links to it (found by device and inode), so a link loop ends.

    The index's own files are no one's photos: its directory `index_dir` and the thumbnails a server
    caches beside it (`<index_dir>.thumbnails`, serve.py) are not entered when inside `root`, and where
    `index_dir` is `root` itself, the index's files there are passed over unreported."""

    def unlisted(error: OSError) -> None:
        summary.failed.append((str(error.filename), f"cannot list the folder ({error.strerror or error})"))

    stat = root.stat()
    walked = {(stat.st_dev, stat.st_ino): root}
    own = set()  # (device, inode) of the index's folders
    if index_dir is not None:
        index_dir = index_dir.resolve()
        for folder in (index_dir, index_dir.with_name(index_dir.name + ".thumbnails")):
            with contextlib.suppress(OSError):  # not made yet
                found = folder.stat()
                own.add((found.st_dev, found.st_ino))
    index_is_root = (stat.st_dev, stat.st_ino) in own
    for folder, subfolders, files in os.walk(root, onerror=unlisted, followlinks=True):
        relative = Path(folder).relative_to(root)
        entered = []
        for name in sorted(subfolders):
            path = Path(folder, name)
            if walk.count_excluded((relative / name).as_posix(), name, summary):
                continue
            try:
                stat = path.stat()
            except OSError as error:  # gone since it was listed, or a link that stopped resolving
                unlisted(error)
                continue
            if (stat.st_dev, stat.st_ino) in own:
                continue
            first = walked.setdefault((stat.st_dev, stat.st_ino), path)
            if first != path:
                summary.skipped.append(
                    (
                        str(path),
                        f"folder walked already: the same folder as '{first}' (a link loop or a second link)",
                    )
                )
                continue
            entered.append(name)
        subfolders[:] = entered  # os.walk enters only these
        for name in sorted(files):
            path = Path(folder, name)
            if walk.count_excluded((relative / name).as_posix(), name, summary):
                continue
            if index_is_root and relative == Path(".") and is_index_file(name):
                continue
            if reason := not_an_image_reason(name):
                summary.skipped.append((str(path), reason))
            else:
                yield path


# --- decoding: `_prepare` runs in the worker processes, the rest here --------------------------------------


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
    # A JPEG is decoded only as large as the encoder's input needs (1/8 of a phone photo's sides).
    image, error = try_load_image(data, short_side=preprocessing.short_side)
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
