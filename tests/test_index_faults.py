"""Fault tests for the image index: two writers at once, damaged shards and manifests, a full disk.

Each fault is made for real (a second process holding the lock, bytes flipped in a shard, a manifest cut
short, writes that fail with ENOSPC or EACCES), and each test asserts what a user relies on: one line that
names the index, the file and the fix; no search answering from damaged data; the next `index` run giving
what a clean build gives; a failed write leaving the previous index and no partial file.
"""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import bridge.index_files as index_files
from bridge.cli import main as dinobridge
from bridge.index import ImageIndex
from bridge.index_files import MANIFEST, DamagedManifestError, IndexDamagedError, IndexFileError, IndexStore
from bridge.index_lock import LOCK_FILE, IndexBusyError, index_lock
from tests.test_index import build, by_path, make_photos

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def assert_same_index(index: ImageIndex, clean: ImageIndex, atol: float = 0.0) -> None:
    """The same files, records and embeddings as `clean`, whatever the order of its shards: equal, or
    within `atol` where the images were embedded in other batches (other processes)."""
    assert sorted(index.paths) == sorted(clean.paths)
    assert {p: index.store.record(p) for p in index.paths} == {p: clean.store.record(p) for p in clean.paths}
    rows, clean_rows = by_path(index), by_path(clean)
    for path in clean.paths:
        for space in (0, 1):
            np.testing.assert_allclose(
                rows[path][space], clean_rows[path][space], rtol=0, atol=atol, err_msg=path
            )


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- one writer at a time ---------------------------------------------------------------------------------

STALLING_INDEXER = """
import os, sys
from bridge.index import ImageIndex
from bridge.model import TextBridge

folder, model_dir, out_dir = sys.argv[1:]
real_replace = os.replace

def replace(source, target):
    if os.path.basename(target) == "manifest.json":  # shard 1 written, nothing committed yet
        print("stalled", flush=True)
        sys.stdin.readline()
    real_replace(source, target)

os.replace = replace
ImageIndex.build(folder, TextBridge.from_pretrained(model_dir), out_dir, workers=0, progress=False)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_the_first_completes(
    tmp_path: Path, tiny_bridge, capsys: pytest.CaptureFixture
) -> None:
    """A cron job and a person indexing two folders into one --out: the second is told who holds the
    index and writes nothing; the first ends with the index a clean build of its folder gives."""
    first, second, model_dir, out = (tmp_path / n for n in ("first", "second", "model", "index"))
    make_photos(first, 6)
    make_photos(second, 6, first_seed=50)
    tiny_bridge.save_pretrained(model_dir)
    (tmp_path / "indexer.py").write_text(STALLING_INDEXER)
    command = [sys.executable, str(tmp_path / "indexer.py"), str(first), str(model_dir), str(out)]
    with subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENVIRONMENT,
    ) as holder:
        watchdog = threading.Timer(120, holder.kill)  # never hang the suite if the holder never stalls
        watchdog.start()
        try:
            line = holder.stdout.readline()
            assert line == "stalled\n", holder.stderr.read() if not line else line
            capsys.readouterr()
            index_second = [
                "index",
                str(second),
                "--model",
                str(model_dir),
                "--out",
                str(out),
                "--workers",
                "0",
            ]
            assert dinobridge(index_second) == 2
            assert capsys.readouterr().err.splitlines()[-1] == (
                f"dinobridge index: error: index '{out}' is being updated by another process "
                f"(pid {holder.pid}: {shlex.join(command)}); wait for it to finish, or index into another --out"
            )
            holder.stdin.write("go on\n")
            holder.stdin.close()
            errors = holder.stderr.read()
            assert holder.wait() == 0, errors
        finally:
            watchdog.cancel()

    alone = build(first, tiny_bridge, tmp_path / "clean")
    assert_same_index(ImageIndex.load(out), alone, atol=2e-3)  # another process: other thread counts
    assert not (out / LOCK_FILE).exists()  # released: a later run takes it
    assert dinobridge(index_second) == 2  # and is then refused for the other folder, by name
    assert f"indexes folder '{first}', not '{second}'" in capsys.readouterr().err


HOLDER = """
import sys, time
from pathlib import Path
from bridge.index_lock import index_lock

with index_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_killed_writer_leaves_no_lock_behind(tmp_path: Path, tiny_bridge) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    make_photos(folder, 3)
    out.mkdir()
    command = [sys.executable, "-c", HOLDER, str(out)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=ENVIRONMENT) as holder:
        watchdog = threading.Timer(60, holder.kill)
        watchdog.start()
        try:
            assert holder.stdout.readline() == "locked\n"
            with pytest.raises(IndexBusyError, match=rf"\(pid {holder.pid}: .*index_lock.*\); wait for it"):
                build(folder, tiny_bridge, out)
            assert not (out / MANIFEST).exists()
            os.kill(holder.pid, signal.SIGKILL)
            assert holder.wait() == -signal.SIGKILL
        finally:
            watchdog.cancel()
    assert len(build(folder, tiny_bridge, out)) == 3  # the kernel released it with the process


def test_the_lock_nests_in_its_thread_and_refuses_another(tmp_path: Path) -> None:
    refused = []

    def second_writer() -> None:
        try:
            with index_lock(tmp_path):
                pass
        except IndexBusyError as error:
            refused.append(str(error))

    with index_lock(tmp_path):
        with index_lock(tmp_path):  # an update that compacts: the same writer, again
            pass
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()}: ")
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join()
    assert refused == [
        f"index '{tmp_path}' is being updated by another process (another thread of this process); "
        "wait for it to finish, or index into another --out"
    ]
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_writer_that_read_the_index_before_another_committed_adopts_that_commit(
    tmp_path: Path, tiny_bridge
) -> None:
    """Two runs that both read the directory before either took the lock: the later one must neither mix
    another folder's embeddings in nor write a manifest that forgets the earlier one's shards."""
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "index"
    names = make_photos(first, 6)
    make_photos(second, 4, first_seed=50)
    late = ImageIndex(
        IndexStore.open_or_create(out, tiny_bridge.fingerprint(), second.resolve()), tiny_bridge
    )
    build(first, tiny_bridge, out)
    with pytest.raises(ValueError, match=f"for the folder '{first}', not '{second}'; give each folder"):
        late.update(workers=0, progress=False)
    assert sorted(ImageIndex.load(out).paths) == names

    stale = ImageIndex.load(out, tiny_bridge)
    added = make_photos(first, 3, first_seed=20)
    build(first, tiny_bridge, out)  # another run commits the three new photos
    (first / names[0]).unlink()
    summary = stale.update(workers=0, progress=False)
    assert (summary.indexed, summary.removed) == (0, 1)  # nothing embedded twice, nothing forgotten
    assert sorted(ImageIndex.load(out).paths) == sorted(set(names + added) - {names[0]})
    assert_same_index(ImageIndex.load(out), build(first, tiny_bridge, tmp_path / "clean"), atol=2e-3)


def test_a_reader_opening_the_index_while_a_writer_compacts_it_sees_the_new_commit_whole(
    clean: ImageIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers take no lock: a compaction committed between reading the manifest and its shards (whose
    files it deletes) must not read as damage."""
    out = tmp_path / "index"
    shutil.copytree(clean.directory, out)
    real_read_manifest, reads = index_files.read_manifest, []

    def read_then_compact(directory: Path) -> dict:
        manifest = real_read_manifest(directory)
        reads.append(manifest)
        if len(reads) == 1:
            IndexStore.open(out).save(out)  # another process compacts: shards 1-3 become shard 4
        return manifest

    monkeypatch.setattr(index_files, "read_manifest", read_then_compact)
    store = IndexStore.open(out)
    assert [s.name for s in store.shards] == ["shard-000004"] and not store.damaged
    assert [s["name"] for s in reads[0]["shards"]] == ["shard-000001", "shard-000002", "shard-000003"]
    assert_same_index(ImageIndex(store, None), clean)


# --- damaged shards ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_bridge) -> ImageIndex:
    """12 photos in three shards of 4: the reference every repaired index must equal."""
    folder = tmp_path_factory.mktemp("photos")
    make_photos(folder, 12)
    index = build(folder, tiny_bridge, tmp_path_factory.mktemp("clean"), commit_every=4)
    assert [s.name for s in index.store.shards] == ["shard-000001", "shard-000002", "shard-000003"]
    return index


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def swap(a: Path, b: Path) -> None:
    a.rename(a.with_suffix(".swap"))
    b.rename(a)
    a.with_suffix(".swap").rename(b)


def swap_lines(path: Path) -> None:  # two photos' paths exchanged: every other byte still right
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[1], lines[0], *lines[2:]]))


DAMAGE = {  # name -> (what is done to the index, the query that reads it, the shards named, their reasons)
    "flipped text": (
        lambda out: flip_last_byte(out / "shard-000002.text.npy"),
        "text",
        {"shard-000002": "checksum mismatch in shard-000002.text.npy"},
    ),
    "flipped image": (
        lambda out: flip_last_byte(out / "shard-000002.image.npy"),
        "image",
        {"shard-000002": "checksum mismatch in shard-000002.image.npy"},
    ),
    "truncated": (
        lambda out: os.truncate(out / "shard-000002.text.npy", 200),
        "text",
        {"shard-000002": "unreadable: mmap length is greater than file size"},
    ),
    "emptied": (
        lambda out: os.truncate(out / "shard-000003.image.npy", 0),
        "image",
        {"shard-000003": "unreadable: No data left in file"},
    ),
    "text of two swapped": (
        lambda out: swap(out / "shard-000001.text.npy", out / "shard-000002.text.npy"),
        "text",
        {n: f"checksum mismatch in {n}.text.npy" for n in ("shard-000001", "shard-000002")},
    ),
    "rows reordered": (
        lambda out: swap_lines(out / "shard-000003.rows.jsonl"),
        "image",
        {"shard-000003": "checksum mismatch in shard-000003.rows.jsonl"},
    ),
    "deleted": (
        lambda out: [p.unlink() for p in out.glob("shard-000001.*")],
        "text",
        {"shard-000001": "shard-000001.rows.jsonl is missing"},
    ),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_shard_is_named_never_searched_and_rebuilt_by_the_next_run(
    damage: str, clean: ImageIndex, tiny_bridge, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_damage, space, named = DAMAGE[damage]
    out = tmp_path / "index"
    shutil.copytree(clean.directory, out)
    make_damage(out)

    damaged = ImageIndex.load(out, tiny_bridge)
    query = {"text": "a red square"} if space == "text" else {"image": clean.root / clean.paths[0]}
    listed = ", ".join(f"'{name}' ({reason})" for name, reason in named.items())
    one = len(named) == 1
    expected = (
        f"{'shard' if one else 'shards'} {listed} of index '{out}' {'is' if one else 'are'} damaged; run "
        f"`dinobridge index {clean.root} --model BRIDGE --out {out}` to rebuild what {'it' if one else 'they'} held"
    )
    for _ in range(2):  # named on every search, not only the first
        with pytest.raises(IndexDamagedError) as raised:
            damaged.search(**query, k=3)
        assert str(raised.value) == expected

    with caplog.at_level(logging.WARNING, logger="bridge.index_update"):
        repaired = build(clean.root, tiny_bridge, out, commit_every=4)
    assert repaired.summary.indexed == 4 * len(named)  # what the damaged shards held, and nothing else
    assert [r.getMessage() for r in caplog.records] == [
        f"index '{out}': shard '{name}' was damaged ({reason}); dropped, its 4 images are embedded again"
        for name, reason in named.items()
    ]
    assert_same_index(repaired, clean)
    assert_same_index(ImageIndex.load(out), clean)
    assert ImageIndex.load(out, tiny_bridge).search(**query, k=5) == clean.search(**query, k=5)
    committed = {s["name"] for s in json.loads((out / MANIFEST).read_text())["shards"]}
    assert {p.name.split(".")[0] for p in out.glob("shard-*")} == committed  # the damaged files are gone


def test_the_manifest_holds_each_files_checksum_and_its_kind_and_version(clean: ImageIndex) -> None:
    import hashlib

    manifest = json.loads((clean.directory / MANIFEST).read_text())
    assert (manifest["kind"], manifest["format_version"]) == ("dinobridge-image-index", 2)
    for entry in manifest["shards"]:
        name = entry["name"]
        rows = (clean.directory / f"{name}.rows.jsonl").read_bytes()
        assert entry["sha256"]["rows"] == hashlib.sha256(rows).hexdigest()
        for space in ("text", "image"):
            array = np.load(clean.directory / f"{name}.{space}.npy")
            assert entry["sha256"][space] == hashlib.sha256(array).hexdigest()


def test_an_index_of_the_first_format_opens_and_gets_its_checksums_on_the_next_update(
    clean: ImageIndex, tiny_bridge, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    shutil.copytree(clean.directory, out)
    manifest = json.loads((out / MANIFEST).read_text())
    checksums = [entry.pop("sha256") for entry in manifest["shards"]]
    del manifest["kind"], manifest["format_version"]
    (out / MANIFEST).write_text(json.dumps({"format": "dinobridge-index/1", **manifest}))

    old = ImageIndex.load(out, tiny_bridge)
    assert old.search(text="a red square", k=5) == clean.search(text="a red square", k=5)
    assert build(clean.root, tiny_bridge, out).summary.indexed == 0
    upgraded = json.loads((out / MANIFEST).read_text())
    assert upgraded["format_version"] == 2 and "format" not in upgraded
    assert [entry["sha256"] for entry in upgraded["shards"]] == checksums  # the same as when written
    flip_last_byte(out / "shard-000003.text.npy")
    with pytest.raises(
        IndexDamagedError, match="'shard-000003' \\(checksum mismatch in shard-000003.text.npy"
    ):
        ImageIndex.load(out, tiny_bridge).search(text="a red square")


# --- damaged manifests ------------------------------------------------------------------------------------


def cut_in_half(manifest: str) -> str:
    return manifest[: len(manifest) // 2]


def without(key: str):
    return lambda manifest: json.dumps({k: v for k, v in json.loads(manifest).items() if k != key})


def with_value(key: str, value):
    return lambda manifest: json.dumps(json.loads(manifest) | {key: value})


BAD_MANIFESTS = {  # name -> (what is done to manifest.json's text, the problem named)
    "truncated": (cut_in_half, "not JSON: "),
    "not JSON": (lambda _: "\x00\x13binary garbage", "not JSON: Expecting value: line 1 column 1 (char 0)"),
    "a list": (lambda _: "[1, 2]", "a JSON list, not an object"),
    "no shards": (without("shards"), "it has no 'shards'"),
    "no kind": (without("kind"), "it has no 'kind'"),
    "a string generation": (with_value("generation", "3"), "its 'generation' is '3', not a whole number"),
    "a shard without checksums": (
        lambda m: json.dumps(
            json.loads(m) | {"shards": [{"name": "shard-000001", "rows": 4, "dropped": []}]}
        ),
        "shard 1 (shard-000001) has no 'sha256' checksum of each of its files",
    ),
}


@pytest.mark.parametrize("damage", BAD_MANIFESTS, ids=list(BAD_MANIFESTS))
def test_a_damaged_manifest_is_named_and_the_next_update_moves_it_aside_and_rebuilds(
    damage: str, clean: ImageIndex, tiny_bridge, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    edit, problem = BAD_MANIFESTS[damage]
    out = tmp_path / "index"
    shutil.copytree(clean.directory, out)
    bad = edit((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(bad)

    with pytest.raises(DamagedManifestError) as raised:
        ImageIndex.load(out, tiny_bridge)
    message = str(raised.value)
    assert message.startswith(f"index manifest '{out / MANIFEST}' is damaged ({problem}")
    assert message.endswith(
        f"); `dinobridge index FOLDER --model BRIDGE --out {out}` moves it aside and builds the index afresh"
    )
    assert "\n" not in message

    # What `dinobridge index` starts from: the store it would open, or a new one where the manifest is bad.
    store = IndexStore.open_or_create(out, tiny_bridge.fingerprint(), clean.root)
    with caplog.at_level(logging.WARNING, logger="bridge.index_files"):
        rebuilt = ImageIndex(store, tiny_bridge)
        rebuilt.update(workers=0, progress=False, commit_every=4)
    aside = list(out.glob(f"{MANIFEST}.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == bad  # kept for a look, never read again
    assert [r.getMessage() for r in caplog.records] == [
        f"index manifest '{out / MANIFEST}' was damaged ({raised.value.problem}): moved it aside to "
        f"'{aside[0]}'; building the index afresh"
    ]
    assert rebuilt.summary.indexed == 12
    assert_same_index(ImageIndex.load(out), clean)
    assert {p.name.split(".")[0] for p in out.glob("shard-*")} == {s.name for s in rebuilt.store.shards}


def test_dinobridge_index_over_a_damaged_manifest_rebuilds_it(clean: ImageIndex, tiny_bridge, tmp_path: Path):
    out = tmp_path / "index"
    shutil.copytree(clean.directory, out)
    (out / MANIFEST).write_text(cut_in_half((out / MANIFEST).read_text()))
    assert_same_index(build(clean.root, tiny_bridge, out, commit_every=4), clean)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            with_value("format_version", 3),
            "index '{out}' has format version 3, but this dinobridge reads versions 1 to 2; upgrade dinobridge "
            "(pip install -U dinobridge) to use it, or index into another --out",
        ),
        (
            with_value("kind", "lancedb-table"),
            "'{out}/manifest.json' is the manifest of a 'lancedb-table', not of a 'dinobridge-image-index'; "
            "index into another --out",
        ),
    ],
    ids=["newer version", "another kind"],
)
def test_a_manifest_of_a_newer_version_or_another_kind_is_explained_and_left_alone(
    edit, expected: str, clean: ImageIndex, tiny_bridge, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    shutil.copytree(clean.directory, out)
    (out / MANIFEST).write_text(edit((out / MANIFEST).read_text()))
    before = listing(out)
    for attempt in (
        lambda: ImageIndex.load(out),
        lambda: IndexStore.open_or_create(out, tiny_bridge.fingerprint(), clean.root),
    ):
        with pytest.raises(ValueError) as raised:
            attempt()
        assert str(raised.value) == expected.format(out=out)
        assert not isinstance(
            raised.value, DamagedManifestError
        )  # not to be moved aside: not ours to rebuild
    assert listing(out) == before


def test_cli_search_names_a_damaged_shard_or_manifest_in_one_line(
    clean: ImageIndex, tiny_bridge, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, model_dir = tmp_path / "index", tmp_path / "model"
    shutil.copytree(clean.directory, out)
    tiny_bridge.save_pretrained(model_dir)
    search = ["search", str(out), "a red square", "--model", str(model_dir)]
    flip_last_byte(out / "shard-000003.text.npy")
    capsys.readouterr()
    assert dinobridge(search) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no result at all, rather than a wrong one
    assert captured.err.splitlines()[-1] == (
        "dinobridge search: error: shard 'shard-000003' (checksum mismatch in shard-000003.text.npy) of index "
        f"'{out}' is damaged; run `dinobridge index {clean.root} --model BRIDGE --out {out}` to rebuild "
        "what it held"
    )
    (out / MANIFEST).write_text("{")
    assert dinobridge(search[:3]) == 2  # without --model: the manifest is read for it
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(f"dinobridge search: error: index manifest '{out / MANIFEST}' is damaged (not JSON: ")
    )


# --- a full disk, no permission ---------------------------------------------------------------------------


@contextmanager
def failing_writes(directory: Path, error: int, after_bytes: int = 0, only: str = ""):
    """Writes into `directory` (to files whose name contains `only`) fail with `error` once `after_bytes`
    have been written: a disk that fills part way through a shard, or one that refuses everything."""
    real_open, written = builtins.open, [0]

    class FillingFile:
        def __init__(self, file):
            self.file = file

        def write(self, data) -> int:
            size = memoryview(data).nbytes
            if written[0] + size > after_bytes:
                self.file.write(bytes(memoryview(data).cast("B")[: max(after_bytes - written[0], 0)]))
                raise OSError(error, os.strerror(error), self.file.name)
            written[0] += size
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        target = Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None
        if target is not None and target.parent == directory and "w" in mode and only in target.name:
            if error == errno.EACCES:
                raise PermissionError(error, os.strerror(error), str(target))
            return FillingFile(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_on_a_full_disk
    try:
        yield
    finally:
        builtins.open = real_open


def test_a_full_disk_mid_shard_leaves_the_previous_index_and_no_partial_file(
    tmp_path: Path, tiny_bridge
) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    make_photos(folder, 6)
    previous = build(folder, tiny_bridge, out)
    before = listing(out)
    make_photos(folder, 6, first_seed=20)
    with failing_writes(out, errno.ENOSPC, after_bytes=300), pytest.raises(IndexFileError) as raised:
        build(folder, tiny_bridge, out)  # the new shard's text embeddings: header written, rows not
    assert str(raised.value) == (
        f"cannot write '{out / 'shard-000002.text.npy'}' (no space left on device); the index keeps its last "
        "complete commit; free some space on that disk, or index into another --out"
    )
    assert listing(out) == before  # no shard-000002 file, no temporary file, the same manifest
    assert_same_index(ImageIndex.load(out), previous)
    assert_same_index(build(folder, tiny_bridge, out), build(folder, tiny_bridge, tmp_path / "clean"))


def test_a_full_disk_at_the_commit_deletes_the_shard_it_was_to_commit(tmp_path: Path, tiny_bridge) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    make_photos(folder, 6)
    previous = build(folder, tiny_bridge, out)
    before = listing(out)
    make_photos(folder, 2, first_seed=20)
    with (
        failing_writes(out, errno.ENOSPC, after_bytes=100, only=MANIFEST),
        pytest.raises(IndexFileError) as raised,
    ):
        build(folder, tiny_bridge, out)
    assert str(raised.value).startswith(f"cannot write '{out / MANIFEST}' (no space left on device); ")
    assert listing(out) == before
    assert_same_index(ImageIndex.load(out), previous)


def test_a_new_index_into_a_full_disk_leaves_no_file(tmp_path: Path, tiny_bridge, capsys) -> None:
    folder, out, model_dir = tmp_path / "photos", tmp_path / "index", tmp_path / "model"
    make_photos(folder, 4)
    tiny_bridge.save_pretrained(model_dir)
    capsys.readouterr()
    with failing_writes(out, errno.ENOSPC):
        code = dinobridge(
            ["index", str(folder), "--model", str(model_dir), "--out", str(out), "--workers", "0"]
        )
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dinobridge index: error: cannot write '{out / 'shard-000001.text.npy'}' (no space left on device); "
        "the index keeps its last complete commit; free some space on that disk, or index into another --out"
    )
    assert list(out.iterdir()) == []  # not a 0-byte shard, not a lock file


def test_a_directory_without_write_permission_is_named_with_the_fix(tmp_path: Path, tiny_bridge) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    make_photos(folder, 3)
    with failing_writes(out, errno.EACCES), pytest.raises(IndexFileError) as raised:
        build(folder, tiny_bridge, out)
    assert str(raised.value) == (
        f"cannot write '{out / 'shard-000001.text.npy'}' (permission denied); the index keeps its last "
        f"complete commit; make '{out}' writable, or index into another --out"
    )
    assert list(out.iterdir()) == []
    (tmp_path / "a file").write_text("not a directory")
    with pytest.raises(
        IndexFileError, match="cannot create the index directory '.*a file' \\(file exists\\)"
    ):
        build(folder, tiny_bridge, tmp_path / "a file")


# --- N processes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_under_accelerate_launch_the_main_process_locks_and_repairs_for_all(
    tmp_path: Path, tiny_bridge
) -> None:
    """A busy index stops every process with the message (none waits at a barrier for ever); once free, two
    processes repair a damaged shard as one does."""
    folder, model_dir, out = tmp_path / "photos", tmp_path / "model", tmp_path / "index"
    make_photos(folder, 8)
    tiny_bridge.save_pretrained(model_dir)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    index = ["-m", "bridge.cli", "index", str(folder), "--model", str(model_dir), "--out", str(out)]

    def index_with_two() -> subprocess.CompletedProcess:
        with socket.socket() as probe:  # a free port, so parallel runs never collide
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [*launch, "--main_process_port", str(port), *index, "--workers", "0"]
        return subprocess.run(
            command, cwd=tmp_path, env=ENVIRONMENT, capture_output=True, text=True, timeout=600
        )

    out.mkdir()
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, env=ENVIRONMENT
    ) as holder:
        try:
            assert holder.stdout.readline() == b"locked\n"
            busy = index_with_two()
        finally:
            holder.kill()
    assert busy.returncode != 0
    refusal = f"index '{out}' is being updated by another process (pid {holder.pid}: "
    assert busy.stderr.count(f"dinobridge index: error: {refusal}") == 2, busy.stderr[-3000:]

    done = index_with_two()
    assert done.returncode == 0, done.stderr[-3000:]
    clean = build(folder, tiny_bridge, tmp_path / "clean")
    assert_same_index(ImageIndex.load(out), clean, atol=2e-3)
    flip_last_byte(next(out.glob("shard-*.text.npy")))
    repaired = index_with_two()
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "was damaged (checksum mismatch in shard-" in repaired.stderr
    assert_same_index(ImageIndex.load(out), clean, atol=2e-3)
