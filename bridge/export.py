"""Embeddings out: an image index written as one Parquet file, for the stores users already have.

LanceDB, DuckDB, Polars, Qdrant's and Chroma's importers and clip-retrieval all read Parquet. One row per
indexed image: its id (the one `dinobridge serve` addresses it by), its absolute path, size, mtime and
content hash as the index recorded them, and its embedding as a fixed-size list of float32, L2-normalised
(so a dot product is the cosine `dinobridge search` ranks by). The bridge's fingerprint, the space and
the indexed folder travel as Parquet key-value metadata, so whoever loads the file can check that a
query embedded later comes from the same model.

Written a batch of rows at a time with pyarrow (an optional dependency: `pip install "dinobridge[export]"`),
under a temporary name renamed when complete, so a killed export never leaves half a file under the
name asked for.

Not here: reading an index (index_files.py), queries (index.py), any store's own client.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bridge.index import ImageIndex
from bridge.index_files import image_id

# What each --space writes: the index's stored spaces (index_files.py) and the column each goes to.
SPACES: dict[str, dict[str, str]] = {
    "text": {"text": "embedding"},  # the bridge's text space: search by text, as `dinobridge search`
    "image": {"image": "embedding"},  # DINOv2's CLS space: image-to-image similarity
    "both": {"text": "embedding", "image": "image_embedding"},
}
BATCH_ROWS = 8192  # rows converted to float32 and written at a time: 8192 x 768 floats is 25 MB


def export_parquet(
    index: ImageIndex | str | os.PathLike, path: str | os.PathLike, space: str = "text"
) -> int:
    """Write every image of `index` (an ImageIndex or its directory) to the Parquet file `path`, its
    `space` embeddings ("text", "image" or "both") as float32; the number of rows written."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # an optional dependency: one line that says how to get it
        raise ValueError('exporting to Parquet needs pyarrow: pip install "dinobridge[export]"') from None

    path = Path(path)
    if path.suffix.lower() not in ("", ".parquet"):  # a .csv holding Parquet would fool whoever opens it
        raise ValueError(
            f"'{path}' ends in '{path.suffix}', but export writes Parquet; name the file "
            f"'{path.with_suffix('.parquet')}'"
        )
    index = index if isinstance(index, ImageIndex) else ImageIndex.load(index)
    if path.is_dir():
        raise IsADirectoryError(
            f"'{path}' is a directory; give the Parquet file to write, e.g. {path}/index.parquet"
        )
    if not path.parent.is_dir():  # said before pyarrow names the temporary file instead
        raise FileNotFoundError(
            f"cannot write '{path}': folder '{path.parent}' does not exist; create it first"
        )
    views = {stored: index.store.view(stored) for stored in SPACES[space]}  # checksums verified here
    columns = [
        pa.field("id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("sha256", pa.string()),
    ]
    columns += [
        pa.field(column, pa.list_(pa.float32(), views[stored].shape[1]))
        for stored, column in SPACES[space].items()
    ]
    metadata = {
        "dinobridge.fingerprint": index.fingerprint,
        "dinobridge.space": space,
        "dinobridge.root": str(index.root),
        "dinobridge.model_dir": index.model_dir or "",
        "dinobridge.normalized": "true",
    }
    schema = pa.schema(columns, metadata=metadata)
    paths = index.paths
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(temporary, schema) as writer:
            for start in range(0, len(paths), BATCH_ROWS):
                batch = paths[start : start + BATCH_ROWS]
                records = [index.store.record(relative) for relative in batch]
                arrays = [
                    pa.array([image_id(relative) for relative in batch], pa.string()),
                    pa.array([str(index.root / relative) for relative in batch], pa.string()),
                    pa.array([record.size for record in records], pa.int64()),
                    pa.array([record.mtime_ns for record in records], pa.int64()),
                    pa.array([record.sha256 for record in records], pa.string()),
                ]
                for stored in SPACES[space]:
                    vectors = np.ascontiguousarray(views[stored][start : start + BATCH_ROWS], np.float32)
                    flat = pa.array(vectors.reshape(-1), pa.float32())
                    arrays.append(pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
                writer.write_batch(pa.record_batch(arrays, schema=schema))
        os.replace(temporary, path)
    except OSError as error:  # pyarrow's own words name the temporary file, which the user never gave
        reason = os.strerror(error.errno).lower() if error.errno else "the file cannot be written"
        raise ValueError(
            f"cannot write '{path}' ({reason}); give a path in a folder you can write to"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)
    return len(paths)
