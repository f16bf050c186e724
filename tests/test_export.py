"""Tests for embeddings out (export.py and `dinobridge export`): the Parquet file holds exactly the index's
rows, ids and embeddings, says which model made them, and a store reading it (LanceDB) finds what
`dinobridge search` finds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bridge.cli import main as dinobridge
from bridge.export import export_parquet
from bridge.index import ImageIndex
from bridge.serve import image_id

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory: pytest.TempPathFactory, tiny_bridge) -> tuple[ImageIndex, Path]:
    """12 photos (shapes of four colours on noise) indexed by the tiny bridge, saved where the CLI finds it."""
    root = tmp_path_factory.mktemp("export")
    folder, model_dir = root / "photos", root / "model"
    rng = np.random.default_rng(0)
    for i in range(12):
        name, colour = list(COLOURS.items())[i % 4]
        pixels = rng.integers(0, 256, (40, 48, 3), np.uint8)
        pixels[8 + i : 28 + i, 10 : 30 + i] = colour
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / name / f"{i:02d}.{'png' if i % 3 else 'jpg'}")
    tiny_bridge.save_pretrained(model_dir)
    index = ImageIndex.build(
        folder, tiny_bridge, root / "index", workers=0, progress=False, model_dir=model_dir
    )
    return index, root


def test_the_parquet_file_holds_the_index_rows_and_says_which_model_made_them(
    photo_index, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    index, _ = photo_index
    out = tmp_path / "photos.parquet"
    assert dinobridge(["export", str(index.directory), str(out), "--space", "both"]) == 0
    assert capsys.readouterr().out == f"wrote 12 images' both embeddings to {out}\n"

    table = pq.read_table(out)
    assert table.num_rows == len(index) == 12
    assert table.column_names == ["id", "path", "size", "mtime_ns", "sha256", "embedding", "image_embedding"]
    assert table["id"].to_pylist() == [image_id(path) for path in index.paths]
    assert table["path"].to_pylist() == [str(index.root / path) for path in index.paths]
    for column in ("size", "mtime_ns", "sha256"):
        assert table[column].to_pylist() == [getattr(index.store.record(p), column) for p in index.paths]
    kind = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(kind) and (kind.list_size, kind.value_type) == (384, pa.float32())
    np.testing.assert_array_equal(
        np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
        index.store.view("text").astype(np.float32),
    )
    np.testing.assert_array_equal(
        np.stack(table["image_embedding"].to_numpy(zero_copy_only=False)),
        index.store.view("image").astype(np.float32),
    )
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert metadata["dinobridge.fingerprint"] == index.fingerprint == index.bridge.fingerprint()
    assert (metadata["dinobridge.space"], metadata["dinobridge.root"]) == ("both", str(index.root))

    # The Python API writes the same rows; one space gives one embedding column.
    assert export_parquet(index.directory, tmp_path / "image.parquet", space="image") == 12
    image_only = pq.read_table(tmp_path / "image.parquet")
    assert image_only.column_names[-1] == "embedding" and "image_embedding" not in image_only.column_names
    assert image_only["embedding"].to_pylist() == table["image_embedding"].to_pylist()


def test_lancedb_finds_the_same_top_5_as_dinobridge_search(
    photo_index, tmp_path: Path, tiny_bridge, capsys: pytest.CaptureFixture
) -> None:
    lancedb = pytest.importorskip("lancedb")
    index, _ = photo_index
    out = tmp_path / "photos.parquet"
    assert dinobridge(["export", str(index.directory), str(out)]) == 0
    capsys.readouterr()
    assert dinobridge(["search", str(index.directory), "a red square", "-k", "5", "--json"]) == 0
    searched = [hit["path"] for hit in json.loads(capsys.readouterr().out)]

    # The README's recipe: load the file into LanceDB, embed the query with the bridge, search by cosine.
    table = lancedb.connect(tmp_path / "lance").create_table("photos", data=pq.read_table(out))
    query = tiny_bridge.encode_texts(["a red square"])[0]
    for metric in ("cosine", "dot"):
        hits = table.search(query, vector_column_name="embedding").distance_type(metric).limit(5).to_list()
        assert [hit["path"] for hit in hits] == searched, metric
    assert len(set(searched)) == 5


def test_export_refuses_a_directory_and_an_unknown_space(photo_index, tmp_path: Path, capsys) -> None:
    index, _ = photo_index
    assert dinobridge(["export", str(index.directory), str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"dinobridge export: error: '{tmp_path}' is a directory")
    assert dinobridge(["export", str(index.directory), str(tmp_path / "new" / "x.parquet")]) == 2
    assert f"folder '{tmp_path / 'new'}' does not exist; create it first" in capsys.readouterr().err
    with pytest.raises(ValueError, match="space must be one of text, image, both, got 'patch'"):
        export_parquet(index, tmp_path / "x.parquet", space="patch")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_export_refuses_another_suffix_and_names_an_unwritable_path(
    photo_index, tmp_path: Path, capsys, monkeypatch
) -> None:
    index, _ = photo_index
    assert dinobridge(["export", str(index.directory), str(tmp_path / "out.csv")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dinobridge export: error: '{tmp_path / 'out.csv'}' ends in '.csv', but export writes Parquet; "
        f"name the file '{tmp_path / 'out.parquet'}'"
    )

    import pyarrow.parquet as pq

    def refused(where, schema):  # what pyarrow raises for a folder it may not write to
        raise PermissionError(
            13, f"Failed to open local file '{where}'. Detail: [errno 13] Permission denied"
        )

    monkeypatch.setattr(pq, "ParquetWriter", refused)
    assert dinobridge(["export", str(index.directory), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dinobridge export: error: cannot write '{tmp_path / 'out'}' (permission denied); "
        "give a path in a folder you can write to"
    )
    assert not list(tmp_path.iterdir())
