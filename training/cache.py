"""Frozen-feature and caption-embedding caches: computed once, memory-mapped, reused every epoch.

The encoder and the text tower are frozen, so their outputs for an image or a caption never change:
training on cached outputs costs the projector alone (see benchmarks/cache_epoch.py). Features live in
`<root>/features/<encoder fingerprint>/` (the fingerprint covers weights, layer and preprocessing) as
float16 .npy chunks keyed by image path, size and mtime; caption embeddings in
`<root>/text/<tower fingerprint>/`. Chunks are written to a temporary name and renamed, so a killed
run loses at most the chunk in progress. A corrupt image is recorded with its reason and skipped.

Not here: the training loop (align.py), data set parsing (data.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bridge.config import ConfigError
from bridge.decoding import ordered_map
from bridge.fingerprint import fingerprint
from bridge.images import ImageLoadError
from bridge.text import TextTower
from bridge.vision import FrozenEncoder, Preprocessing, VisionFeatures
from training.data import Pair

log = logging.getLogger(__name__)

CHUNK_SIZE = 4096  # images per chunk file: what a killed run can lose at most

CACHE_ENV = "DINOBRIDGE_CACHE"

# Room a cache fill leaves free beyond its own estimate: the caption embeddings, a chunk's temporary copy,
# checkpoints and whatever else shares the disk.
FREE_MARGIN_FRACTION = 0.10
FREE_MARGIN_BYTES = 64 * 2**20


def user_cache_dir() -> Path:
    """The cache of commands that only read a saved model (`dinobridge eval`): $DINOBRIDGE_CACHE, else
    $XDG_CACHE_HOME/dinobridge, else ~/.cache/dinobridge.

    Never the model's own directory, which may be read-only, shared or a hub snapshot, and which a user
    copies or publishes as it is. One cache serves every model: entries are keyed by the encoder's and the
    tower's fingerprints and by each image's path, size and mtime.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dinobridge"


class _Chunks:
    """A directory of chunk-*/ folders, each with `keys.json` and one .npy per array, memory-mapped."""

    def __init__(self, directory: Path, arrays: Sequence[str]):
        self.directory = directory
        self.arrays = tuple(arrays)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"cannot create the feature cache '{directory}' ({error.strerror}); point the cache at a "
                f"writable folder: train.cache_dir when training, ${CACHE_ENV} for dinobridge eval"
            ) from None
        self.chunks: list[dict[str, np.ndarray]] = []
        self.where: dict[str, tuple[int, int]] = {}  # key -> (chunk, row)
        for chunk_dir in sorted(directory.glob("chunk-*")):
            self._open(chunk_dir)

    def _open(self, chunk_dir: Path) -> None:
        keys = json.loads((chunk_dir / "keys.json").read_text())
        number = len(self.chunks)
        self.chunks.append({name: np.load(chunk_dir / f"{name}.npy", mmap_mode="r") for name in self.arrays})
        for row, key in enumerate(keys):
            self.where[key] = (number, row)

    def write(self, keys: list[str], values: dict[str, np.ndarray]) -> None:
        """Add one chunk atomically: write to a temporary folder, then rename it into place."""
        temporary = self.directory / f".tmp-{uuid.uuid4().hex}"
        temporary.mkdir()
        for name in self.arrays:
            np.save(temporary / f"{name}.npy", values[name], allow_pickle=False)
        (temporary / "keys.json").write_text(json.dumps(keys))
        final = self.directory / f"chunk-{len(self.chunks):05d}-{uuid.uuid4().hex[:8]}"
        os.replace(temporary, final)
        self._open(final)

    def gather(self, name: str, locations: np.ndarray) -> np.ndarray:
        """Rows at `locations` ((n, 2) chunk/row pairs) of array `name`, in that order."""
        template = self.chunks[0][name]
        out = np.empty((len(locations), *template.shape[1:]), dtype=template.dtype)
        for chunk in np.unique(locations[:, 0]):
            mask = locations[:, 0] == chunk
            out[mask] = self.chunks[chunk][name][locations[mask, 1]]
        return out


def _skipped(pair: Pair, reason: str) -> tuple[str, str]:
    """(origin, reason) of a pair whose image was skipped; a file is named by its path, which the data
    line gives only relative to the data file's folder (a scene or shard member names itself by origin)."""
    return pair.origin, f"image '{pair.image}': {reason}" if isinstance(pair.image, str) else reason


@dataclass
class CachedFeatures:
    """Features of the pairs whose images loaded; `pairs[i]` goes with row i. Gathers batches lazily."""

    pairs: list[Pair]
    failures: list[tuple[str, str]]  # (origin, reason) of each image that was skipped
    store: _Chunks
    locations: np.ndarray  # (len(pairs), 2): chunk and row of each pair's features
    grid_hw: tuple[int, int]
    layer: int | None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, indices) -> VisionFeatures:
        """Features (float32 tensors) of the pairs at `indices` (a list, array or tensor of ints)."""
        rows = self.locations[np.asarray(indices, dtype=np.int64)]
        parts = [torch.from_numpy(self.store.gather(name, rows)).float() for name in self.store.arrays]
        return VisionFeatures(*parts, self.grid_hw, self.layer)


@dataclass
class EncodedFeatures:
    """CachedFeatures' stand-in for `train.cache: false`: a batch's images are decoded and run through
    the frozen encoder each time they are asked for, and nothing is written. Features come out float32,
    where a cache rounds them to float16."""

    pairs: list[Pair]
    failures: list[tuple[str, str]]
    encoder: FrozenEncoder
    workers: int = 0

    @classmethod
    def check(
        cls, pairs: Sequence[Pair], encoder: FrozenEncoder, workers: int = 0, progress: bool = True
    ) -> EncodedFeatures:
        """Decode every image once, to skip the unreadable ones before training as a cache fill does (so
        the batches, a function of the readable images, are the cached run's)."""
        kept, failures = [], []
        bar = tqdm(total=len(pairs), desc="checking images", unit="img", disable=not progress)
        for (batch, _), decoded in _decoded(pairs, encoder.preprocessing, 64, workers):
            for pair, (_, reason) in zip(batch, decoded, strict=True):
                if reason is None:
                    kept.append(pair)
                else:
                    failures.append(_skipped(pair, reason))
                    log.warning("skipped %s: %s", *failures[-1])
            bar.update(len(batch))
        bar.close()
        return cls(kept, failures, encoder, workers)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, indices) -> VisionFeatures:
        chosen = [self.pairs[i] for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        pixels = []
        for (batch, _), decoded in _decoded(chosen, self.encoder.preprocessing, 64, self.workers):
            for pair, (image, reason) in zip(batch, decoded, strict=True):
                if reason is not None:  # readable when checked, not now: the batch cannot be the same
                    raise OSError(f"{pair.origin} can no longer be read ({reason}) while training")
                pixels.append(image)
        return self.encoder(torch.stack(pixels)).to("cpu").to(torch.float32)


class FeatureCache:
    """Encoder features for image-caption pairs, computed once per encoder and image."""

    def __init__(self, root: str | Path, encoder: FrozenEncoder):
        self.encoder = encoder
        key = encoder.fingerprint()
        if encoder.dtype != torch.float32:  # features computed in bfloat16 differ by ~1e-2: kept apart
            key += "-" + str(encoder.dtype).removeprefix("torch.")
        self.directory = Path(root) / "features" / key
        self.store = _Chunks(self.directory, ("cls", "registers", "patches"))
        self.failures_file = self.directory / "failures.json"

    def check_room(self, pairs: Sequence[Pair]) -> int:
        """Bytes the features of `pairs` not cached yet will take; logged in one line, and refused with a
        ConfigError before any encoding when the cache's disk lacks that room (plus a margin).

        Every token is kept (CLS, registers, patches) in float16: a DINOv2-B/14 at 224 px stores
        257 x 768 x 2 bytes = 0.39 MB an image, 47 GB for COCO's 118k images.
        """
        images = len(self._missing(pairs)[1])
        if not images:
            return 0
        height, width = self.encoder.grid_hw
        tokens = 1 + self.encoder.num_registers + height * width
        size = images * tokens * self.encoder.hidden_size * np.dtype(np.float16).itemsize
        log.info(
            "feature cache: %s images x %d tokens x %d float16 = %s in %s",
            f"{images:,}",
            tokens,
            self.encoder.hidden_size,
            _readable_size(size),
            self.directory,
        )
        free = shutil.disk_usage(self.directory).free
        if size * (1 + FREE_MARGIN_FRACTION) + FREE_MARGIN_BYTES > free:
            raise ConfigError(
                f"the feature cache of {images:,} images x {tokens} tokens x {self.encoder.hidden_size} "
                f"float16 needs {_readable_size(size)} in '{self.directory}', but that disk has "
                f"{_readable_size(free)} free; train without a cache (train.cache: false), on fewer tokens "
                "(pooled features), or give a train.cache_dir on a larger disk"
            )
        return size

    def features(
        self, pairs: Sequence[Pair], batch_size: int = 64, workers: int = 0, progress: bool = True
    ) -> CachedFeatures:
        """Features for every pair whose image loads; missing ones are computed and cached first."""
        failed = self.fill(pairs, batch_size, workers, progress)
        keys = [pair.key for pair in pairs]
        kept = [i for i, key in enumerate(keys) if key in self.store.where]
        failures = [_skipped(pairs[i], failed[key]) for i, key in enumerate(keys) if key in failed]
        for origin, reason in failures:
            log.warning("skipped %s: %s", origin, reason)
        locations = np.array([self.store.where[keys[i]] for i in kept], dtype=np.int64).reshape(-1, 2)
        return CachedFeatures(
            [pairs[i] for i in kept],
            failures,
            self.store,
            locations,
            self.encoder.grid_hw,
            self.encoder.layer,
        )

    def fill(
        self, pairs: Sequence[Pair], batch_size: int = 64, workers: int = 0, progress: bool = True
    ) -> dict[str, str]:
        """Compute and cache the features of `pairs` not cached yet (a streamed data set fills the cache a
        batch at a time through this); returns every image known to fail, key -> reason."""
        failed, todo = self._missing(pairs)
        if todo:
            failed.update(self._compute(todo, batch_size, workers, progress))
            _write_json_atomically(self.failures_file, failed)
        return failed

    def holds(self, keys: Sequence[str]) -> bool:
        """Whether every image key is cached or known to fail: nothing left to read."""
        failed = json.loads(self.failures_file.read_text()) if self.failures_file.exists() else {}
        return all(key in self.store.where or key in failed for key in keys)

    def _missing(self, pairs: Sequence[Pair]) -> tuple[dict[str, str], list[Pair]]:
        """(the images known to fail, key -> reason; the pairs whose features are still to compute)."""
        failed = json.loads(self.failures_file.read_text()) if self.failures_file.exists() else {}
        todo = [p for p in pairs if p.key not in self.store.where and p.key not in failed]
        return failed, list({p.key: p for p in todo}.values())  # an image named twice is encoded once

    def _compute(self, pairs: list[Pair], batch_size: int, workers: int, progress: bool) -> dict[str, str]:
        failed: dict[str, str] = {}
        keys: list[str] = []
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.store.arrays}
        bar = tqdm(total=len(pairs), desc="encoding images", unit="img", disable=not progress)

        def flush() -> None:
            if keys:
                self.store.write(
                    list(keys), {n: np.concatenate(v).astype(np.float16) for n, v in parts.items()}
                )
                keys.clear()
                for chunks in parts.values():
                    chunks.clear()

        for (batch, _), decoded in _decoded(pairs, self.encoder.preprocessing, batch_size, workers):
            good = [
                (pair, pixels)
                for pair, (pixels, reason) in zip(batch, decoded, strict=True)
                if reason is None
            ]
            for pair, (_, reason) in zip(batch, decoded, strict=True):
                if reason is not None:
                    failed[pair.key] = reason
            if good:
                features = self.encoder(torch.stack([pixels for _, pixels in good])).to("cpu")
                keys.extend(pair.key for pair, _ in good)
                parts["cls"].append(features.cls.float().numpy())
                parts["registers"].append(features.registers.float().numpy())
                parts["patches"].append(features.patches.float().numpy())
            bar.update(len(batch))
            if len(keys) >= CHUNK_SIZE:
                flush()
        flush()
        bar.close()
        return failed


class TextCache:
    """Frozen-tower embeddings of captions, computed once per tower and caption."""

    def __init__(self, root: str | Path | None, tower: TextTower, progress: bool = True):
        """`root` None: embeddings are computed on each call and nothing is written (`train.cache: false`)."""
        self.tower = tower
        self.progress = progress
        settings = json.dumps(tower.config.__dict__, sort_keys=True, default=str)
        self.store = (
            None
            if root is None
            else _Chunks(Path(root) / "text" / fingerprint(tower, settings), ("embeddings",))
        )

    def embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """(len(captions), E) float32 embeddings, unnormalised, in the order given."""
        if self.store is None:
            unique = list(dict.fromkeys(captions))
            if not unique:
                return torch.empty(0, self.tower.embed_dim)
            row = {caption: i for i, caption in enumerate(unique)}
            computed = self.tower.encode(unique, progress=self.progress).float()
            return computed[torch.tensor([row[c] for c in captions])]
        missing = list(dict.fromkeys(c for c in captions if c not in self.store.where))
        for start in range(0, len(missing), CHUNK_SIZE * 4):
            chunk = missing[start : start + CHUNK_SIZE * 4]
            self.store.write(
                chunk,
                {"embeddings": self.tower.encode(chunk, progress=self.progress).numpy().astype(np.float32)},
            )
        if not captions:
            return torch.empty(0, self.tower.embed_dim)
        rows = np.array([self.store.where[c] for c in captions], dtype=np.int64)
        return torch.from_numpy(self.store.gather("embeddings", rows))


def _decoded(pairs: Sequence[Pair], preprocessing: Preprocessing, batch_size: int, workers: int):
    """((batch, preprocessing), [(pixels or None, reason or None)] for each pair) per batch of pairs."""
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    # At most 4 batches in flight: decoding overlaps the encoder without holding the whole set.
    jobs = [(batch, preprocessing) for batch in batches]
    return ordered_map(_decode_batch, jobs, max(0, workers), window=4)


def _decode_batch(
    batch: list[Pair], preprocessing: Preprocessing
) -> list[tuple[torch.Tensor | None, str | None]]:
    decoded = []
    for pair in batch:
        try:
            decoded.append((preprocessing([pair.load_image()])[0], None))
        except ImageLoadError as error:
            decoded.append((None, error.reason))
        except OSError as error:  # a file that vanished or went unreadable after the data set was read
            decoded.append((None, str(error)))
    return decoded


def _readable_size(size: int) -> str:
    """A size as people read a disk's: GB (10^9 bytes), MB below a tenth of one."""
    return f"{size / 1e9:,.2f} GB" if size >= 1e8 else f"{size / 1e6:,.2f} MB"


def _write_json_atomically(path: Path, data) -> None:
    temporary = path.with_suffix(f".tmp-{uuid.uuid4().hex}")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)
