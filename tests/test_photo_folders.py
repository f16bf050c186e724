"""Tests for indexing a real photo folder (index_update.py's walk, images.py's HEIF/AVIF support, the CLI's
`index` options): phone formats are decoded upright, everything else a photo library holds is reported or
excluded, never silently dropped, and a link loop is walked once.

The folder is made here: what an iPhone, a Synology NAS, a camera and a developer's home folder leave in it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bridge.cli import main as dinobridge
from bridge.images import load_image, not_an_image_reason
from bridge.index import ImageIndex
from bridge.index_update import _prepare

RED, BLUE = (255, 0, 0), (0, 0, 255)


def sideways(fmt: str) -> bytes:
    """Stored 40x20, red left and blue right, EXIF orientation 6: upright it is 20x40, red on top."""
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()  # to write one; reading registers it by itself
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, fmt, exif=exif.tobytes(), quality=90)
    return buffer.getvalue()


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def photo_library(folder: Path) -> None:
    files = {
        "plain.jpg": jpeg(1),
        "deep/shot.png": None,  # written below as a PNG
        "phone/IMG_0001.HEIC": sideways("HEIF"),
        "phone/IMG_0002.avif": sideways("AVIF"),
        "camera/IMG_0003.CR2": b"II*\x00\x10\x00\x00\x00CR\x02\x00" + bytes(64),  # a RAW file's header
        "camera/DSC_0004.NEF": b"MM\x00*" + bytes(64),
        "phone/IMG_0005.MOV": b"\x00\x00\x00\x14ftypqt  " + bytes(64),
        "notes.xyz": b"not a photo",
        ".hidden/secret.jpg": jpeg(2),
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        "@eaDir/plain.jpg/SYNOPHOTO_THUMB_M.jpg": jpeg(3),
        "node_modules/pkg/logo.png": None,
        "Thumbs.db": b"\xd0\xcf\x11\xe0",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            Image.new("RGB", (16, 12), (10, 200, 30)).save(folder / name)
        else:
            (folder / name).write_bytes(data)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # photos/loop/loop/loop/...
    (folder / "shortcut").symlink_to(folder / "deep", target_is_directory=True)  # deep, a second time
    (folder / "alias.jpg").symlink_to(folder / "plain.jpg")  # a link to a file is followed


INDEXED = ["alias.jpg", "deep/shot.png", "phone/IMG_0001.HEIC", "phone/IMG_0002.avif", "plain.jpg"]


def expected_log(folder: Path) -> list[str]:
    walked_already = "folder walked already: the same folder as '{}' (a link loop or a second link)"
    return [
        f"{folder / 'camera/DSC_0004.NEF'}: RAW camera file: not decoded; export a JPEG (or TIFF) of it to index it",
        f"{folder / 'camera/IMG_0003.CR2'}: RAW camera file: not decoded; export a JPEG (or TIFF) of it to index it",
        f"{folder / 'loop'}: {walked_already.format(folder)}",
        f"{folder / 'notes.xyz'}: unknown extension '.xyz': not an image the index reads",
        f"{folder / 'phone/IMG_0005.MOV'}: video: not indexed",
        f"{folder / 'shortcut'}: {walked_already.format(folder / 'deep')}",
    ]


@pytest.mark.parametrize("name", ["IMG_0001.HEIC", "IMG_0002.avif"])
def test_phone_formats_load_upright(tmp_path: Path, name: str) -> None:
    photo_library(tmp_path)
    image = load_image(tmp_path / "phone" / name)
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[:15].mean((0, 1)), np.asarray(image)[-15:].mean((0, 1))
    assert top[0] > 200 > 60 > top[2] and bottom[2] > 200 > 60 > bottom[0]  # red on top, blue below


def test_the_cli_indexes_images_reports_other_files_and_excludes_system_folders(
    tmp_path: Path, tiny_bridge, capsys: pytest.CaptureFixture
) -> None:
    folder, out, model_dir = tmp_path / "photos", tmp_path / "index", tmp_path / "model"
    photo_library(folder)
    tiny_bridge.save_pretrained(model_dir)
    command = ["index", str(folder), "--model", str(model_dir), "--out", str(out), "--workers", "0"]
    assert dinobridge(command) == 0
    printed = capsys.readouterr().out.splitlines()

    index = ImageIndex.load(out)
    assert sorted(index.paths) == INDEXED
    assert sorted((out / "failures.log").read_text().splitlines()) == expected_log(folder)
    assert printed[0].startswith("indexed 5, unchanged 0, removed 0, failed 0 in ")
    assert printed[1:] == [
        "  skipped 6 (2 RAW camera file, 2 folder walked already, 1 unknown extension '.xyz', 1 video), "
        f"listed in {out / 'failures.log'}",
        "  excluded 5 hidden or system files and folders (--include-hidden walks them)",
    ]
    # Upright at the encoder too: what the index's decoding workers hand the encoder, red on top.
    for name in ("phone/IMG_0001.HEIC", "phone/IMG_0002.avif"):
        _, pixels = _prepare(str(folder / name), None, tiny_bridge.encoder.preprocessing)
        top, bottom = pixels[:, :20].mean((1, 2)), pixels[:, -20:].mean((1, 2))
        assert top[0] > top[2] + 1 and bottom[2] > bottom[0] + 1, name  # normalised: 1 is about 0.25 of range

    # A rerun reads nothing again and reports the same.
    assert dinobridge(command) == 0
    rerun = capsys.readouterr().out.splitlines()
    assert rerun[0].startswith("indexed 0, unchanged 5, removed 0, failed 0 in ") and rerun[1:] == printed[1:]


def test_include_hidden_and_exclude_change_what_is_walked(tmp_path: Path, tiny_bridge) -> None:
    folder = tmp_path / "photos"
    photo_library(folder)
    index = ImageIndex.build(
        folder, tiny_bridge, tmp_path / "index", workers=0, progress=False, include_hidden=True,
        exclude=["phone", "deep/*.png"],
    )  # fmt: skip
    assert sorted(index.paths) == [
        ".hidden/secret.jpg",
        "@eaDir/plain.jpg/SYNOPHOTO_THUMB_M.jpg",
        "alias.jpg",
        "node_modules/pkg/logo.png",
        "plain.jpg",
    ]
    assert index.summary.excluded == 2  # "phone" and "deep/shot.png"; "shortcut" is the walked "deep"
    assert str(index.summary).splitlines()[-1] == "  excluded 2 files and folders matching --exclude"
    log = (tmp_path / "index" / "failures.log").read_text()
    assert f"{folder / '.DS_Store'}: no extension: not read as an image" in log
    assert f"{folder / 'Thumbs.db'}: unknown extension '.db'" in log
    assert "IMG_0005.MOV" not in log  # inside the excluded folder: not walked at all


def test_the_summary_counts_what_exclude_passed_over_apart_from_hidden_files(
    tmp_path: Path, tiny_bridge
) -> None:
    folder = tmp_path / "photos"
    photo_library(folder)
    index = ImageIndex.build(
        folder, tiny_bridge, tmp_path / "index", workers=0, progress=False, exclude=["phone"]
    )
    assert (index.summary.excluded, index.summary.hidden) == (6, 5)
    assert str(index.summary).splitlines()[-2:] == [
        "  excluded 5 hidden or system files and folders (--include-hidden walks them)",
        "  excluded 1 files and folders matching --exclude",
    ]


def test_walking_a_folder_made_only_of_links_ends(tmp_path: Path, tiny_bridge) -> None:
    """Two folders linking to each other, a link back to the root and a link to itself: each folder is
    walked once, each extra link reported once."""
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    (folder / "a" / "photo.jpg").write_bytes(jpeg(4))
    (folder / "a" / "to_b").symlink_to(folder / "b", target_is_directory=True)
    (folder / "b" / "to_a").symlink_to(folder / "a", target_is_directory=True)
    (folder / "b" / "up").symlink_to(folder, target_is_directory=True)
    (folder / "dangling").symlink_to(folder / "dangling")  # resolves to nothing: not even a folder
    index = ImageIndex.build(folder, tiny_bridge, tmp_path / "index", workers=0, progress=False)
    assert index.paths == ["a/photo.jpg"]
    assert sorted(
        (Path(path).relative_to(folder).as_posix(), reason.split(":")[0])
        for path, reason in index.summary.skipped
    ) == [
        ("a/to_b", "folder walked already"),
        ("b/to_a", "folder walked already"),
        ("b/up", "folder walked already"),
        ("dangling", "no extension"),
    ]


@pytest.mark.parametrize(
    ("name", "start"),
    [
        ("a.HEIC", None),
        ("b.heif", None),
        ("c.AVIF", None),
        ("d.dng", "RAW camera file"),
        ("e.ARW", "RAW camera file"),
        ("f.mp4", "video"),
        ("g.xmp", "sidecar file"),
        ("README", "no extension"),
        ("h.txt", "unknown extension '.txt'"),
    ],
)
def test_not_an_image_reason_goes_by_extension(name: str, start: str | None) -> None:
    reason = not_an_image_reason(name)
    assert reason is None if start is None else reason.startswith(start)


@pytest.mark.parametrize("inside", ["index", "."])
def test_an_index_kept_inside_its_folder_does_not_index_itself(tmp_path: Path, tiny_bridge, inside) -> None:
    """--out under the folder, or the folder itself: a rerun neither lists the index's files as skipped
    nor indexes the JPEG thumbnails a server caches beside the index."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(2):
        (folder / f"{seed}.jpg").write_bytes(jpeg(seed))
    (folder / "notes.txt").write_text("mine")
    out = folder / inside
    for _ in range(2):
        index = ImageIndex.build(folder, tiny_bridge, out, workers=0, progress=False)
        thumbnails = out.resolve().with_name(out.resolve().name + ".thumbnails") / "ab"
        thumbnails.mkdir(parents=True, exist_ok=True)
        (thumbnails / "ab12-256.jpg").write_bytes(jpeg(7))
    assert sorted(index.paths) == ["0.jpg", "1.jpg"]
    assert (
        out / "failures.log"
    ).read_text() == f"{folder / 'notes.txt'}: unknown extension '.txt': not an image the index reads\n"
