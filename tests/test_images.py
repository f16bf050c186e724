"""Tests for bridge/images.py: a corpus of bad and awkward image files, each made here in tmp_path.

Bad files must raise ImageLoadError naming the file and the specific reason; awkward but valid files
must come out as upright RGB with the exact size and the pixel values a user would expect.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from bridge.images import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    ImageLoadError,
    is_supported_image,
    load_image,
    try_load_image,
)

# Any warning out of the loader (Pillow's DecompressionBombWarning above all, or an unclosed file) fails
# the test; deprecations stay ignored, as pyproject.toml has it for the whole suite.
pytestmark = pytest.mark.filterwarnings("error", "ignore::DeprecationWarning")

WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)


def noise_image(size: tuple[int, int] = (64, 64)) -> Image.Image:
    # Noise does not compress, so cutting the file in half really cuts image data.
    return Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))


def encoded(image: Image.Image, fmt: str, **save_options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_options)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb that costs nothing to make."""
    data = encoded(Image.new("L", (4, 4)), "PNG")
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of header data, which the CRC covers
    ihdr[4:12] = struct.pack(">II", width, height)
    return data[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def assert_close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 3) -> None:
    # JPEG is lossy: solid colours come back within a few levels.
    assert all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True)), (pixel, expected)


# --- files that must be refused -------------------------------------------------------------------------


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def broken_symlink(tmp_path: Path) -> tuple[Path, str]:
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    return link, f"broken symbolic link to '{tmp_path / 'gone.jpg'}'"


def directory_named_like_an_image(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "album.jpg").mkdir()
    return tmp_path / "album.jpg", "is a directory, not a file"


BAD_FILES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "zero bytes": lambda d: (write(d / "empty.jpg", b""), "empty file (0 bytes)"),
    "truncated jpeg": lambda d: (
        write(d / "cut.jpg", encoded(noise_image(), "JPEG")[:1500]),
        "truncated file (image file is truncated",
    ),
    "truncated png": lambda d: (
        write(d / "cut.png", encoded(noise_image(), "PNG")[:6000]),
        "truncated file (image file is truncated",
    ),
    "text named .jpg": lambda d: (
        write(d / "notes.jpg", b"these are my holiday notes, not a photo\n"),
        "not an image (Pillow cannot identify it)",
    ),
    "decompression bomb": lambda d: (
        write(d / "bomb.png", png_claiming_size(30_000, 30_000)),
        "too large: 30000x30000 = 900,000,000 pixels, over the limit of 64,000,000; "
        "shrink it under the limit (in Python, load_image's max_pixels=900_000_000 allows it)",
    ),
    "unsupported format named .png": lambda d: (
        write(d / "icon.png", encoded(Image.new("RGB", (16, 16)), "ICO")),
        "unsupported format 'ICO' (supported: JPEG, MPO, PNG, WEBP, BMP, GIF, TIFF, AVIF, HEIF)",
    ),
    "broken symlink": broken_symlink,
    "directory": directory_named_like_an_image,
    "missing file": lambda d: (d / "nowhere.jpg", "no such file"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_raises_error_naming_file_and_reason(tmp_path: Path, kind: str) -> None:
    path, reason = BAD_FILES[kind](tmp_path)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    assert caught.value.path == str(path)
    assert caught.value.reason.startswith(reason)
    assert str(caught.value).startswith(f"image '{path}': {reason}")


def test_unreadable_file_simulated_so_it_runs_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "secret.png", encoded(Image.new("RGB", (2, 2)), "PNG"))
    real_open = builtins.open

    def open_as_other_user(file: object, *args: object, **kwargs: object) -> object:
        if file == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_as_other_user)
    with pytest.raises(ImageLoadError, match=r"^image '.*secret\.png': permission denied$") as caught:
        load_image(path)
    assert caught.value.path == str(path)


def test_unreadable_file_for_real(tmp_path: Path) -> None:
    path = write(tmp_path / "secret.png", encoded(Image.new("RGB", (2, 2)), "PNG"))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root (or similar), which reads files whatever their permissions")
        with pytest.raises(ImageLoadError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_error_names_the_path_as_the_caller_gave_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, error = try_load_image("photos/a.jpg")
    assert error is not None and error.path == "photos/a.jpg"
    assert str(error) == "image 'photos/a.jpg': no such file"


# --- awkward files that must load ----------------------------------------------------------------------


def test_cmyk_jpeg_converts_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    cmyk = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # no ink: paper white
    cmyk.paste((255, 0, 0, 0), (8, 0, 16, 8))  # full cyan ink on the right
    cmyk.save(path, "JPEG", quality=95)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (16, 8))
    assert_close(image.getpixel((2, 4)), WHITE)
    assert_close(image.getpixel((13, 4)), (0, 255, 255))


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    grey16 = Image.new("I;16", (3, 1))
    for x, value in enumerate([0, 32768, 65535]):
        grey16.putpixel((x, 0), value)
    grey16.save(path)
    with Image.open(path) as stored:
        assert stored.mode in ("I;16", "I")  # the file really is 16-bit
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (3, 1))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_palette_png_transparent_index_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "logo.png"
    palette = Image.new("P", (2, 1))
    palette.putpalette([*RED, *GREEN])
    palette.putpixel((1, 0), 1)
    palette.save(path, transparency=1)  # index 1 (green) is fully transparent
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (2, 1))
    assert [image.getpixel((x, 0)) for x in range(2)] == [RED, WHITE]


def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "cutout.png"
    rgba = Image.new("RGBA", (3, 1))
    for x, pixel in enumerate([(0, 0, 255, 255), (255, 0, 0, 0), (0, 0, 0, 128)]):
        rgba.putpixel((x, 0), pixel)
    rgba.save(path)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (3, 1))
    assert image.getpixel((0, 0)) == BLUE
    assert image.getpixel((1, 0)) == WHITE  # transparent red: on black it would come out (0, 0, 0)
    assert_close(image.getpixel((2, 0)), (127, 127, 127), tolerance=1)  # half-transparent black


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_rotated_jpeg_comes_out_upright(
    tmp_path: Path, orientation: int, top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> None:
    # Stored 40 wide x 20 high, red left and blue right, as a phone held sideways writes it. Orientation 6
    # says "turn 90 degrees clockwise to view", which brings the left (red) half to the top; 8 the reverse.
    path = tmp_path / "sideways.jpg"
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", exif=exif, quality=95)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (20, 40))
    assert_close(image.getpixel((10, 5)), top)
    assert_close(image.getpixel((10, 35)), bottom)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_file_gives_first_frame(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"frames.{fmt.lower()}"
    first, *rest = (Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE))
    first.save(path, fmt, save_all=True, append_images=rest, duration=100)
    with Image.open(path) as stored:
        assert stored.n_frames == 3  # the file really has three frames
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (8, 6))
    assert image.getpixel((4, 3)) == RED


def test_extreme_aspect_ratio_loads_whole(tmp_path: Path) -> None:
    path = tmp_path / "panorama.png"
    strip = Image.new("RGB", (10_000, 3), (10, 20, 30))
    strip.putpixel((9_999, 2), WHITE)
    strip.save(path)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (10_000, 3))
    assert (image.getpixel((0, 0)), image.getpixel((9_999, 2))) == ((10, 20, 30), WHITE)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("1", 1, WHITE),
        ("L", 77, (77, 77, 77)),
        ("LA", (0, 0), WHITE),
        ("LA", (0, 255), (0, 0, 0)),
        ("PA", (0, 0), WHITE),
        ("I", 65535, WHITE),
        ("I;16B", 32768, (128, 128, 128)),
        ("F", 0.5, (128, 128, 128)),
        ("F", 1.0, WHITE),
        ("CMYK", (0, 0, 0, 0), WHITE),
        ("RGBA", (255, 0, 0, 0), WHITE),
    ],
)
def test_pil_image_modes_convert_to_rgb(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    image = load_image(Image.new(mode, (2, 2), value))
    assert (image.mode, image.size) == ("RGB", (2, 2))
    assert image.getpixel((1, 1)) == expected


def test_pil_image_input_is_converted_into_a_new_image() -> None:
    original = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    image = load_image(original)
    assert image is not original
    assert (original.mode, original.getpixel((0, 0))) == ("RGBA", (0, 0, 0, 0))
    with pytest.raises(ImageLoadError, match=r"^image '<PIL.Image>': too large: 2x2 = 4 pixels"):
        load_image(original, max_pixels=3)


# --- inputs, limits and helpers --------------------------------------------------------------------------


def test_bytes_input_loads_and_reports_as_bytes() -> None:
    image = load_image(encoded(Image.new("RGB", (5, 4), GREEN), "PNG"))
    assert (image.mode, image.size, image.getpixel((4, 3))) == ("RGB", (5, 4), GREEN)
    with pytest.raises(ImageLoadError) as caught:
        load_image(encoded(noise_image(), "JPEG")[:1500])
    assert caught.value.path == "<bytes>"
    assert str(caught.value).startswith("image '<bytes>': truncated file (image file is truncated")
    _, empty = try_load_image(b"")
    assert empty is not None and str(empty) == "image '<bytes>': empty file (0 bytes)"


def test_pixel_limit_is_inclusive_and_checked_before_decoding(tmp_path: Path) -> None:
    path = write(tmp_path / "ten.png", encoded(Image.new("RGB", (10, 10), RED), "PNG"))
    assert load_image(path, max_pixels=100).size == (10, 10)
    with pytest.raises(
        ImageLoadError, match="10x10 = 100 pixels, over the limit of 99; shrink it .*max_pixels=100 allows it"
    ):
        load_image(path, max_pixels=99)
    # 100 MP is over Pillow's own threshold, where Image.open would warn; ours alone decides, both ways.
    bomb = png_claiming_size(10_000, 10_000)
    assert "over the limit of 64,000,000" in str(try_load_image(bomb)[1])
    _, error = try_load_image(bomb, max_pixels=100_000_000)  # allowed: decoding finds the data missing
    assert error is not None and error.reason.startswith("truncated file")


def test_pillow_global_settings_are_left_alone() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for source in [png_claiming_size(30_000, 30_000), encoded(noise_image(), "JPEG")[:1500]]:
        assert try_load_image(source)[1] is not None
    assert load_image(encoded(noise_image(), "JPEG")).size == (64, 64)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_try_load_image_returns_image_or_error(tmp_path: Path) -> None:
    good = write(tmp_path / "good.bmp", encoded(Image.new("RGB", (3, 2), BLUE), "BMP"))
    image, error = try_load_image(good)
    assert error is None and image is not None
    assert (image.mode, image.size, image.getpixel((2, 1))) == ("RGB", (3, 2), BLUE)
    image, error = try_load_image(tmp_path / "empty.jpg")
    assert image is None and isinstance(error, ImageLoadError)
    assert error.reason == "no such file"


def test_error_survives_pickling_for_worker_processes() -> None:
    error = pickle.loads(pickle.dumps(ImageLoadError("a.jpg", "truncated file")))
    assert (error.path, error.reason, str(error)) == (
        "a.jpg",
        "truncated file",
        "image 'a.jpg': truncated file",
    )


def test_wrong_source_type_and_limit_are_caller_errors() -> None:
    with pytest.raises(TypeError, match="got BytesIO; for an open file pass file.read()"):
        load_image(io.BytesIO(b"x"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels must be a positive number of pixels, got 0"):
        load_image(b"x", max_pixels=0)


@pytest.mark.parametrize(
    ("name", "supported"),
    [
        ("a.jpg", True),
        ("B.JPEG", True),
        (Path("dir/c.Png"), True),
        ("d.webp", True),
        ("e.tif", True),
        ("f.txt", False),
        ("g.jpg.txt", False),
        ("h", False),
        ("i.svg", False),
    ],
)
def test_is_supported_image_goes_by_extension(name: str | Path, supported: bool) -> None:
    assert is_supported_image(name) is supported


def test_public_constants() -> None:
    assert SUPPORTED_EXTENSIONS == {
        *(".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
        *(".heic", ".heif", ".avif"),  # decoded by Pillow's AVIF plugin and pillow-heif
    }
    assert all(ext == ext.lower() and ext.startswith(".") for ext in SUPPORTED_EXTENSIONS)
    assert DEFAULT_MAX_PIXELS == 64_000_000
