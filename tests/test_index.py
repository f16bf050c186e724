"""Tests for the image index (index.py, index_update.py, index_files.py, search.py and the CLI's two verbs):
building, updating, surviving a kill, refusing a foreign model, searching.

Every folder is made here in tmp_path; the model is the tiny bridge from conftest.py. Each test asserts what
a user relies on: which files are indexed or reported with which reason, that a rerun embeds nothing it
need not, that a killed run leaves a readable index and the next run completes it exactly.
"""

from __future__ import annotations

import builtins
import copy
import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bridge.search as search_module
from bridge.cli import main as dinobridge
from bridge.images import load_image
from bridge.index import ImageIndex, IndexMismatchError
from bridge.search import (
    ExactBackend,
    build_faiss_index,
    exact_search,
    faiss_search,
    read_faiss_index,
    rescore,
    write_faiss_index,
)

REPO = Path(__file__).resolve().parents[1]
RED, BLUE = (255, 0, 0), (0, 0, 255)


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_photos(folder: Path, count: int, first_seed: int = 0) -> list[str]:
    """`count` distinct small photos, JPEG and PNG, some in a subfolder; their paths relative to `folder`."""
    names = []
    for seed in range(first_seed, first_seed + count):
        name = f"{'trips/' if seed % 3 == 0 else ''}photo{seed:03d}.{'png' if seed % 2 else 'jpg'}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        noise((48, 36), seed).save(folder / name)
        names.append(name)
    return sorted(names)


def by_path(index: ImageIndex) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    text, image = index.store.view("text"), index.store.view("image")
    return {path: (text[row], image[row]) for row, path in enumerate(index.paths)}


def build(folder: Path, bridge, out: Path, **options) -> ImageIndex:
    return ImageIndex.build(folder, bridge, out, **{"workers": 0, "progress": False, **options})


@contextmanager
def encoder_inputs(bridge):
    """Every pixel batch the encoder receives while inside the block."""
    batches: list[torch.Tensor] = []
    handle = bridge.encoder.register_forward_pre_hook(lambda _, args: batches.append(args[0].clone()))
    try:
        yield batches
    finally:
        handle.remove()


# --- the corpus of awkward and bad files ----------------------------------------------------------------


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb that costs nothing to make."""
    data = encoded(Image.new("L", (4, 4)), "PNG")
    header = bytearray(data[12:29])
    header[4:12] = struct.pack(">II", width, height)
    return data[:12] + bytes(header) + struct.pack(">I", zlib.crc32(header)) + data[33:]


def sideways_jpeg() -> bytes:
    """Stored 40x20, red left and blue right, EXIF orientation 6: upright it is 20x40, red on top."""
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(stored, "JPEG", exif=exif, quality=95)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 12), colour) for colour in (RED, (0, 255, 0), BLUE)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def sixteen_bit_png() -> bytes:
    grey = Image.new("I;16", (8, 8))
    grey.putpixel((3, 3), 65535)
    return encoded(grey, "PNG")


def palette_png() -> bytes:
    palette = Image.new("P", (8, 8))
    palette.putpalette([*RED, *BLUE])
    palette.putpixel((1, 1), 1)
    return encoded(palette, "PNG", transparency=1)


GOOD_FILES = {
    "plain.jpg": lambda: encoded(noise((32, 24), 1), "JPEG"),
    "cmyk.jpg": lambda: encoded(Image.new("CMYK", (16, 8), (255, 0, 0, 0)), "JPEG"),
    "scan16.png": sixteen_bit_png,
    "logo.png": palette_png,
    "cutout.png": lambda: encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG"),
    "sideways.jpg": sideways_jpeg,
    "frames.gif": animated_gif,
    "panorama.png": lambda: encoded(Image.new("RGB", (10_000, 3), (10, 20, 30)), "PNG"),
    "deep/nested/ok.webp": lambda: encoded(noise((20, 20), 2), "WEBP"),
}
BAD_FILES = {  # name -> (bytes, the start of the reason the user is shown)
    "empty.jpg": (b"", "empty file (0 bytes)"),
    "cut.jpg": (encoded(noise((64, 64), 3), "JPEG")[:1500], "truncated file"),
    "cut.png": (encoded(noise((64, 64), 4), "PNG")[:6000], "truncated file"),
    "notes.jpg": (b"holiday notes, not a photo\n", "not an image (Pillow cannot identify it)"),
    "bomb.png": (png_claiming_size(30_000, 30_000), "too large: 30000x30000 = 900,000,000 pixels"),
    "icon.png": (encoded(Image.new("RGB", (16, 16)), "ICO"), "unsupported format 'ICO'"),
    "secret.png": (encoded(Image.new("RGB", (4, 4)), "PNG"), "permission denied"),  # made unreadable below
}


def test_every_bad_file_is_reported_and_every_good_one_indexed(
    tmp_path: Path, tiny_bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    for name, make in GOOD_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(make())
    for name, (data, _) in BAD_FILES.items():
        (folder / name).write_bytes(data)
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")
    (folder / "album.jpg").mkdir()  # a folder named like an image: walked into, not reported
    (folder / "readme.txt").write_text("not an image extension: never opened, listed as skipped")
    secret, real_open = str(folder / "secret.png"), builtins.open

    def open_as_another_user(file, *args, **kwargs):  # chmod 0 means nothing to root, so simulate
        if str(file) == secret:
            raise PermissionError(13, "Permission denied", secret)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_as_another_user)
    with encoder_inputs(tiny_bridge) as batches:
        index = build(folder, tiny_bridge, out)
    monkeypatch.undo()

    expected = {str(folder / name): reason for name, (_, reason) in BAD_FILES.items()}
    expected[str(folder / "gone.jpg")] = f"broken symbolic link to '{folder / 'deleted.jpg'}'"
    failed = dict(index.summary.failed)
    assert failed.keys() == expected.keys()
    assert all(failed[path].startswith(reason) for path, reason in expected.items()), failed
    log_lines = (out / "failures.log").read_text().splitlines()
    skipped = f"{folder / 'readme.txt'}: unknown extension '.txt': not an image the index reads"
    assert index.summary.skipped == [(str(folder / "readme.txt"), skipped.partition(": ")[2])]
    assert sorted(log_lines) == sorted([*(f"{path}: {reason}" for path, reason in failed.items()), skipped])
    assert sorted(index.paths) == sorted(GOOD_FILES)
    assert (index.summary.indexed, index.summary.total) == (len(GOOD_FILES), len(GOOD_FILES))

    # The EXIF-rotated photo reaches the encoder upright: red on top, exactly as if rotated by hand.
    pixels = torch.cat(batches)
    preprocess = tiny_bridge.encoder.preprocessing
    with Image.open(folder / "sideways.jpg") as stored:
        sideways = stored.convert("RGB")
    upright = preprocess([sideways.transpose(Image.Transpose.ROTATE_270)])[0]
    assert any(torch.equal(row, upright) for row in pixels)
    assert not any(torch.allclose(row, preprocess([sideways])[0], atol=0.1) for row in pixels)
    top, bottom = upright[:, :20].mean((1, 2)), upright[:, -20:].mean((1, 2))
    assert top[0] > top[2] and bottom[2] > bottom[0]  # red channel on top, blue at the bottom


def test_worker_processes_give_the_same_index_as_one_process(tmp_path: Path, tiny_bridge) -> None:
    folder = tmp_path / "photos"
    names = make_photos(folder, 10)
    (folder / "cut.jpg").write_bytes(BAD_FILES["cut.jpg"][0])
    (folder / "sideways.jpg").write_bytes(sideways_jpeg())
    alone = build(folder, tiny_bridge, tmp_path / "alone", workers=0, batch_size=4)
    pooled = build(folder, tiny_bridge, tmp_path / "pooled", workers=2, batch_size=4)
    assert pooled.paths == alone.paths == sorted([*names, "sideways.jpg"])
    assert pooled.summary.failed == alone.summary.failed
    assert [path for path, _ in pooled.summary.failed] == [str(folder / "cut.jpg")]
    np.testing.assert_array_equal(pooled.store.view("text"), alone.store.view("text"))
    np.testing.assert_array_equal(pooled.store.view("image"), alone.store.view("image"))


# --- reruns, kills, and a foreign model -----------------------------------------------------------------

STALLING_INDEXER = """
import os, sys, time
from bridge.index import ImageIndex
from bridge.model import TextBridge

folder, model_dir, out_dir = sys.argv[1:]
real_replace, commits = os.replace, 0

def replace(source, target):
    global commits
    if os.path.basename(target) == "manifest.json":
        commits += 1
        if commits == 3:  # shard 3 is on disk but not committed: the worst moment to be killed
            print("stalled", flush=True)
            time.sleep(600)
    real_replace(source, target)

os.replace = replace
bridge = TextBridge.from_pretrained(model_dir)
ImageIndex.build(folder, bridge, out_dir, workers=0, commit_every=4, batch_size=4, progress=False)
"""


def test_killed_run_leaves_a_readable_index_that_the_next_run_completes(tmp_path: Path, tiny_bridge) -> None:
    folder, out, model_dir = tmp_path / "photos", tmp_path / "index", tmp_path / "model"
    names = make_photos(folder, 20)
    tiny_bridge.save_pretrained(model_dir)
    (tmp_path / "indexer.py").write_text(STALLING_INDEXER)
    command = [sys.executable, str(tmp_path / "indexer.py"), str(folder), str(model_dir), str(out)]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    ) as child:
        watchdog = threading.Timer(120, child.kill)  # never hang the suite if the child never stalls
        watchdog.start()
        line = child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
        errors = child.stderr.read()
        watchdog.cancel()
    assert line == "stalled\n", errors
    assert child.returncode == -signal.SIGKILL

    killed = ImageIndex.load(out, tiny_bridge)  # the previous commit, readable and searchable
    assert len(killed) == 8 and len(killed.search(text="a photo", k=3)) == 3
    assert (out / "shard-000003.text.npy").exists()  # written, never committed

    with encoder_inputs(tiny_bridge) as batches:
        resumed = build(folder, tiny_bridge, out, commit_every=4, batch_size=4)
    assert (resumed.summary.indexed, resumed.summary.unchanged) == (12, 8)
    assert sum(len(b) for b in batches) == 12  # only what the killed run had not committed
    single = build(folder, tiny_bridge, tmp_path / "single", commit_every=4, batch_size=4)
    assert resumed.paths == single.paths == names  # nothing missing, nothing twice
    resumed_rows, single_rows = by_path(ImageIndex.load(out)), by_path(single)
    for path in names:
        for resumed_part, single_part in zip(resumed_rows[path], single_rows[path], strict=True):
            np.testing.assert_allclose(resumed_part, single_part, atol=2e-3)
    committed = {s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    on_disk = {p.name.split(".")[0] for p in out.glob("shard-*")}
    assert on_disk == committed  # the orphan of the killed run is gone


def test_rerun_embeds_only_new_and_changed_files(tmp_path: Path, tiny_bridge) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    names = make_photos(folder, 8)
    first = build(folder, tiny_bridge, out)
    before = by_path(first)

    with encoder_inputs(tiny_bridge) as batches:
        summary = build(folder, tiny_bridge, out).summary
    assert (summary.indexed, summary.unchanged, summary.removed, summary.total) == (0, 8, 0, 8)
    assert batches == []  # the model never ran

    edited, touched, deleted = (folder / n for n in names[:3])
    noise((48, 36), 99).save(edited)  # new content
    os.utime(touched, ns=(1, 1_000_000_000))  # new mtime, same content
    deleted.unlink()
    noise((48, 36), 100).save(folder / "trips" / "new.jpg")
    with encoder_inputs(tiny_bridge) as batches:
        index = build(folder, tiny_bridge, out)
    summary = index.summary
    assert (summary.indexed, summary.unchanged, summary.removed, summary.total) == (2, 6, 1, 8)
    assert sum(len(b) for b in batches) == 2
    assert sorted(index.paths) == sorted({*names, "trips/new.jpg"} - {names[2]})
    assert index.store.record(names[1]).mtime_ns == 1_000_000_000
    after = by_path(index)
    np.testing.assert_array_equal(after[names[1]][0], before[names[1]][0])  # touched: carried over
    fresh = tiny_bridge.encode_image([load_image(edited)]).detach().numpy()[0]
    np.testing.assert_allclose(after[names[0]][0], fresh, atol=2e-3)  # edited: re-embedded
    assert index.search(image=folder / "trips" / "new.jpg", k=1)[0][0] == str(folder / "trips" / "new.jpg")
    assert sorted(ImageIndex.load(out).paths) == sorted(index.paths)  # what was committed is what we see
    os.utime(folder / names[3], ns=(1, 2_000_000_000))
    returned = index.update(progress=False)  # an update on an open index keeps its summary too
    assert index.summary is returned and (returned.indexed, returned.unchanged) == (0, 8)


def test_missing_folder_is_an_error_not_a_mass_deletion(tmp_path: Path, tiny_bridge) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    make_photos(folder, 3)
    index = build(folder, tiny_bridge, out)
    folder.rename(tmp_path / "unmounted")
    with pytest.raises(FileNotFoundError, match=f"folder '{folder}' indexed by '{out}' is not there"):
        index.update(progress=False)
    assert len(ImageIndex.load(out)) == 3


def test_index_refuses_a_bridge_with_another_fingerprint(tmp_path: Path, tiny_bridge) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    make_photos(folder, 3)
    build(folder, tiny_bridge, out)
    other = copy.deepcopy(tiny_bridge)
    with torch.no_grad():
        next(other.projector.parameters()).add_(1.0)
    ours, theirs = tiny_bridge.fingerprint(), other.fingerprint()
    assert ours != theirs
    message = rf"built by the bridge with fingerprint {ours}.*this bridge's fingerprint is {theirs}.*rebuild"
    with pytest.raises(IndexMismatchError, match=message):
        ImageIndex.load(out, other)
    with pytest.raises(IndexMismatchError, match=message):
        build(folder, other, out)  # no embeddings of the second model are added
    with pytest.raises(IndexMismatchError, match=message):
        ImageIndex.load(out, tiny_bridge).update(other)
    assert ImageIndex.load(out).fingerprint == ours


# --- searching ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, tiny_bridge) -> ImageIndex:
    folder = tmp_path_factory.mktemp("photos")
    make_photos(folder, 30)
    return build(folder, tiny_bridge, tmp_path_factory.mktemp("index"), commit_every=8)


def test_text_minus_and_image_queries_follow_their_definitions(photo_index: ImageIndex, tiny_bridge) -> None:
    text = photo_index.store.view("text").astype(np.float32)
    image = photo_index.store.view("image").astype(np.float32)
    root = photo_index.root
    plus, minus = tiny_bridge.encode_text("a red square")[0], tiny_bridge.encode_text("people")[0]
    query = torch.nn.functional.normalize(plus - minus, dim=0).numpy()
    expected = np.argsort(-(text @ query))[:5]
    results = photo_index.search(text="a red square", minus="people", k=5)
    assert [p for p, _ in results] == [str(root / photo_index.paths[r]) for r in expected]
    np.testing.assert_allclose([s for _, s in results], (text @ query)[expected], atol=1e-3)

    # An image alone searches DINOv2's CLS space: the photo itself comes first, with cosine 1.
    path = photo_index.paths[7]
    best, score = photo_index.search(image=root / path, k=1)[0]
    assert best == str(root / path) and score == pytest.approx(1.0, abs=2e-3)
    assert np.argmax(image @ image[7]) == 7
    # Text and image together search the text space, with the image's bridge embedding.
    both = photo_index.search(text="a red square", image=root / path, k=3)
    assert best in [p for p, _ in both]
    with pytest.raises(ValueError, match=r"search needs text=\.\.\., image=\.\.\. or like=\.\.\."):
        photo_index.search(minus="people")


def test_like_searches_with_the_stored_embeddings_of_an_indexed_image(photo_index: ImageIndex) -> None:
    root, path = photo_index.root, photo_index.paths[7]
    image = photo_index.store.view("image").astype(np.float32)
    by_file = photo_index.search(image=root / path, k=5)
    for like in (path, root / path):  # relative to the folder, or absolute
        by_row = photo_index.search(like=like, k=5)
        assert [p for p, _ in by_row] == [p for p, _ in by_file]
        expected = image @ (image[7] / np.linalg.norm(image[7]))
        np.testing.assert_allclose([s for _, s in by_row], np.sort(expected)[::-1][:5], atol=1e-5)
    # With text, its stored bridge embedding counts as an image's would.
    with_text = photo_index.search(text="a red square", like=path, k=5)
    assert [p for p, _ in with_text] == [
        p for p, _ in photo_index.search(text="a red square", image=root / path, k=5)
    ]
    with pytest.raises(ValueError, match=r"'elsewhere\.png' is not in index"):
        photo_index.search(like="elsewhere.png")
    with pytest.raises(ValueError, match="is not under the indexed folder"):
        photo_index.search(like="/somewhere/else.png")


def test_exact_and_faiss_back_ends_agree(photo_index: ImageIndex) -> None:
    for query in ["a red square", "a photo of noise", "blue"]:
        exact = photo_index.search(text=query, k=5, backend="exact")
        approximate = photo_index.search(text=query, k=5, backend="faiss")
        assert [p for p, _ in approximate] == [p for p, _ in exact]
        np.testing.assert_allclose([s for _, s in approximate], [s for _, s in exact], atol=1e-5)


def test_a_new_back_end_is_one_class_in_the_registry(
    photo_index: ImageIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    class ReversedRows:
        """Exact search over the rows stored in reverse: a back-end must map its own row order back."""

        def __init__(self, embeddings: np.ndarray):
            self.exact, self.last = ExactBackend(embeddings[::-1].copy()), len(embeddings) - 1

        @classmethod
        def build(cls, embeddings: np.ndarray, cache) -> ReversedRows:
            return cls(embeddings)

        def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            scores, rows = self.exact.search(queries, k)
            return scores, np.where(rows >= 0, self.last - rows, -1)

    monkeypatch.setitem(search_module.BACKENDS, "reversed", ReversedRows)
    for query in [
        {"text": "a red square", "minus": "people"},
        {"image": photo_index.root / photo_index.paths[3]},
    ]:
        found = photo_index.search(**query, k=5, backend="reversed")
        assert found == photo_index.search(**query, k=5, backend="exact")
    with pytest.raises(
        ValueError, match="backend must be 'auto', 'exact', 'faiss' or 'reversed', got 'annoy'"
    ):
        photo_index.search(text="a red square", backend="annoy")


def test_an_unknown_back_end_is_refused_with_the_names_there_are(photo_index: ImageIndex) -> None:
    with pytest.raises(ValueError, match="backend must be 'auto', 'exact' or 'faiss', got 'hnsw'"):
        photo_index.search(text="a red square", backend="hnsw")


def test_a_quantised_faiss_index_is_saved_in_the_index_and_read_back(
    photo_index: ImageIndex, tiny_bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Above FLAT_UP_TO (lowered here to 10 of the 30 photos) the trained index is cached on disk.
    monkeypatch.setattr(search_module, "FLAT_UP_TO", 10)
    monkeypatch.setattr(photo_index, "_backends", {})
    exact = photo_index.search(text="a red square", k=5, backend="exact")
    assert photo_index.search(text="a red square", k=5, backend="faiss") == exact  # 32 x k re-ranked: all 30
    saved = list(photo_index.directory.glob("faiss-text-*"))
    assert [p.name for p in saved] == [f"faiss-text-{photo_index.store.generation}.npz"]
    monkeypatch.setattr(search_module, "build_faiss_index", lambda *_, **__: pytest.fail("rebuilt, not read"))
    reopened = ImageIndex.load(photo_index.directory, tiny_bridge)
    assert reopened.search(text="a red square", k=5, backend="faiss") == exact
    saved[0].unlink()


def test_large_collections_use_fast_scan_codes_reranked_exactly() -> None:
    # Above the size rule's threshold FAISS holds 4-bit product codes; the candidates they propose are
    # re-scored against the stored vectors, so the scores are exact and the top 10 nearly always is.
    vectors = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    index = build_faiss_index(vectors, flat_up_to=1000)
    import faiss

    shard = faiss.downcast_index(index.at(0))
    assert index.count() == 1 and type(shard).__name__ == "IndexPQFastScan"
    assert shard.pq.M == 32 and shard.pq.nbits == 4
    queries = np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth_scores, truth = exact_search(vectors, queries, 10)
    scores, found = faiss_search(index, vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    assert recall >= 0.95
    np.testing.assert_allclose(
        scores, np.einsum("qd,qkd->qk", queries, vectors[found].astype(np.float32)), rtol=1e-6
    )
    assert (np.diff(scores, axis=1) <= 0).all()


def test_sharded_fast_scan_finds_what_one_scan_finds_and_survives_a_save(tmp_path: Path) -> None:
    # Shards are scanned in parallel threads and merged by code score: the same candidates as one scan.
    vectors = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    queries = vectors[[5, 1500, 2999]].astype(np.float32)
    one = faiss_search(build_faiss_index(vectors, flat_up_to=1000, shards=1), vectors, queries, 10)
    three = build_faiss_index(vectors, flat_up_to=1000, shards=3)
    assert three.count() == 3 and three.ntotal == 3000
    for found in [faiss_search(three, vectors, queries, 10), None]:
        if found is None:  # the same index, saved and read back
            write_faiss_index(three, tmp_path / "faiss.npz")
            found = faiss_search(read_faiss_index(tmp_path / "faiss.npz"), vectors, queries, 10)
        np.testing.assert_array_equal(found[1], one[1])
        assert found[1][:, 0].tolist() == [5, 1500, 2999]  # each vector finds itself: global row ids
    flat = build_faiss_index(vectors[:100], flat_up_to=1000)
    write_faiss_index(flat, tmp_path / "flat.npz")
    assert type(read_faiss_index(tmp_path / "flat.npz")).__name__ == "IndexFlatIP"


def test_rescore_puts_missing_candidates_last() -> None:
    vectors = np.eye(4, dtype=np.float16)
    scores, rows = rescore(vectors, np.array([[0.0, 1.0, 0.0, 0.0]], np.float32), np.array([[-1, 0, 1]]), 3)
    assert rows.tolist() == [[1, 0, -1]]
    assert scores[0, :2].tolist() == [1.0, 0.0] and scores[0, 2] == -np.inf


def test_without_faiss_search_falls_back_to_exact_and_says_so_once(
    photo_index: ImageIndex, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exact = photo_index.search(text="a red square", k=4, backend="exact")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    monkeypatch.setattr(search_module, "_faiss_missing_logged", False)
    monkeypatch.setattr(photo_index, "_backends", {})
    with caplog.at_level(logging.WARNING, logger="bridge.search"):
        assert photo_index.search(text="a red square", k=4, backend="faiss") == exact
        assert photo_index.search(text="a red square", k=4, backend="faiss") == exact
    assert [r.getMessage() for r in caplog.records].count(
        "faiss is not installed (pip install faiss-cpu): searching with the exact back-end"
    ) == 1


def test_save_compacts_and_load_gives_the_same_results(photo_index: ImageIndex, tmp_path: Path) -> None:
    assert len(photo_index.store.shards) == 4  # 30 images committed 8 at a time
    photo_index.save(tmp_path / "copy")
    copy_ = ImageIndex.load(tmp_path / "copy", photo_index.bridge)
    assert [p.name for p in sorted((tmp_path / "copy").iterdir())] == [
        "manifest.json",
        "shard-000001.image.npy",
        "shard-000001.rows.jsonl",
        "shard-000001.text.npy",
    ]
    assert copy_.paths == photo_index.paths
    assert copy_.search(text="a red square", k=5) == photo_index.search(text="a red square", k=5)
    with pytest.raises(FileExistsError, match="it is not empty"):
        photo_index.save(tmp_path / "copy")


def test_cli_index_and_search_print_the_summary_scores_and_paths(
    tmp_path: Path, tiny_bridge, capsys: pytest.CaptureFixture
) -> None:
    folder, out, model_dir = tmp_path / "photos", tmp_path / "index", tmp_path / "model"
    make_photos(folder, 5)
    (folder / "empty.jpg").write_bytes(b"")
    tiny_bridge.save_pretrained(model_dir)
    index_command = ["index", str(folder), "--model", str(model_dir), "--out", str(out), "--workers", "0"]
    assert dinobridge(index_command) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("indexed 5, unchanged 0, removed 0, failed 1 in ")
    assert f"failed: {folder / 'empty.jpg'}: empty file (0 bytes)" in printed

    assert dinobridge(["search", str(out), "a red square", "--minus", "people", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines:
        score, path = line.split("  ")
        assert -1 <= float(score) <= 1 and Path(path).is_file()
    query = ["search", str(out), "--image", str(folder / "trips/photo000.jpg"), "-k", "2", "--json"]
    assert dinobridge([*query, "--model", str(model_dir)]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [set(r) for r in records] == [{"path", "score"}] * 2
    assert records[0]["path"] == str(folder / "trips/photo000.jpg")


def test_decode_workers_start_when_the_working_directory_holds_a_folder_named_bridge(
    tmp_path: Path, tiny_bridge
) -> None:
    """A bridge saved as ./bridge, then `dinobridge index photos --model bridge`: the fork server must not
    import that folder as the `bridge` package (every worker died on import)."""
    make_photos(tmp_path / "photos", 3)
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    script = Path(sys.executable).with_name("dinobridge")  # the installed command, as a user runs it
    if not script.is_file():
        pytest.skip("dinobridge is not installed in this environment (pip install -e .)")
    command = [str(script), "index", "photos", "--model", "bridge", "--out", "index", "--workers", "1"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("indexed 3, unchanged 0, removed 0, failed 0 in ")


def test_cli_search_says_when_the_index_is_empty_or_does_not_record_its_model(
    tmp_path: Path, tiny_bridge, capsys: pytest.CaptureFixture
) -> None:
    folder, model_dir = tmp_path / "photos", tmp_path / "model"
    names = make_photos(folder, 2)
    tiny_bridge.save_pretrained(model_dir)
    build(folder, tiny_bridge, tmp_path / "unrecorded")
    assert dinobridge(["search", str(tmp_path / "unrecorded"), "a red square"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the progress bars of saving the model
        f"dinobridge search: error: index '{tmp_path / 'unrecorded'}' does not record its model; "
        "pass the bridge directory (--model)"
    )

    build(folder, tiny_bridge, tmp_path / "index", model_dir=model_dir)
    for name in names:
        (folder / name).unlink()
    assert len(build(folder, tiny_bridge, tmp_path / "index")) == 0
    assert dinobridge(["search", str(tmp_path / "index"), "a red square"]) == 0
    assert capsys.readouterr().out == f"index '{tmp_path / 'index'}' is empty\n"


def test_several_queries_at_once_find_what_each_finds_alone() -> None:
    # A server's concurrent searches go through one float32 product; one query through float16 + rescore.
    vectors = np.random.default_rng(2).standard_normal((40_000, 32)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    queries = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    together = exact_search(vectors, queries, 10)
    for number, query in enumerate(queries):
        scores, rows = exact_search(vectors, query[None], 10)
        np.testing.assert_array_equal(together[1][number], rows[0])
        np.testing.assert_allclose(together[0][number], scores[0], rtol=1e-5)


def test_exact_search_and_rescore_agree_with_and_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # A one-shot text search runs these in NumPy (torch is never imported); a loaded process in torch.
    from bridge import search

    vectors = np.random.default_rng(0).standard_normal((40_000, 32)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    queries = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    candidates = np.array([[5, -1, 7, 9], [0, 1, 2, -1], [3, 3, 8, 4]])
    with_torch = exact_search(vectors, queries, 10), rescore(vectors, queries, candidates, 3)
    monkeypatch.setattr(search, "torch_if_loaded", lambda: None)
    without = exact_search(vectors, queries, 10), rescore(vectors, queries, candidates, 3)
    for (scores, rows), (numpy_scores, numpy_rows) in zip(with_torch, without, strict=True):
        np.testing.assert_array_equal(numpy_rows, rows)
        np.testing.assert_allclose(numpy_scores, scores, rtol=1e-5)
    assert (np.diff(without[0][0], axis=1) <= 0).all()  # best first, across CHUNK_ROWS boundaries
    scores, rows = rescore(
        np.eye(4, dtype=np.float16), np.eye(4, dtype=np.float32)[[1]], np.array([[-1, 0, 1]]), 3
    )
    assert rows.tolist() == [[1, 0, -1]] and scores[0, 2] == -np.inf  # a missing candidate comes last
