"""Reduced-scale JPEG decoding (images.load_image's short_side) and the split of cores between decode
workers and the encoder's threads (decoding.split_cores)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bridge.decoding import split_cores, usable_cores
from bridge.images import load_image
from bridge.vision import Preprocessing

ORIENTATION = 0x0112
# What each EXIF orientation does to the stored image to make it upright (the inverse is how it was stored).
UPRIGHT = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}
INVERSE = {
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
}


def upright_scene(width: int = 960, height: int = 720) -> Image.Image:
    """An asymmetric picture (a red block top left, a blue one bottom right on a gradient): any wrong
    rotation or flip moves them."""
    ramp = np.linspace(60, 200, width, dtype=np.float32)[None, :, None]
    pixels = np.broadcast_to(ramp, (height, width, 3)).copy()
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, 360, 260), fill=(220, 30, 30))
    draw.ellipse((width - 300, height - 250, width - 60, height - 40), fill=(30, 40, 210))
    return image


def jpeg(image: Image.Image, orientation: int = 1, **options) -> bytes:
    stored = image
    for step in reversed(UPRIGHT.get(orientation, [])):
        stored = stored.transpose(INVERSE.get(step, step))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=92, exif=exif, **options)
    return buffer.getvalue()


def encoder_input(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    return preprocessing([image])[0].numpy()


PREPROCESSINGS = {
    "straight 112": Preprocessing(image_size=112, resize_shortest_edge=None),
    "shortest 128, crop 112": Preprocessing(image_size=112, resize_shortest_edge=128),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decoding_keeps_every_exif_orientation(orientation: int) -> None:
    data = jpeg(upright_scene(), orientation)
    full = load_image(data)
    reduced = load_image(data, short_side=112)
    assert full.size == (960, 720)  # upright, whatever the stored orientation
    assert reduced.size == (240, 180)  # 1/4: 1/8 would leave a short side of 90, below 112
    prep = PREPROCESSINGS["straight 112"]
    difference = np.abs(encoder_input(reduced, prep) - encoder_input(full, prep))
    assert difference.mean() < 0.05  # normalised units: ~3 levels in 255 at most on average
    red = np.asarray(reduced)[20:60, 20:80].mean(axis=(0, 1))
    assert red[0] > 180 and red[2] < 80  # the red block is still top left


@pytest.mark.parametrize(
    "mode, options",
    [("L", {}), ("CMYK", {}), ("RGB", {"progressive": True}), ("L", {"progressive": True})],
)
@pytest.mark.parametrize("name", list(PREPROCESSINGS))
def test_grey_cmyk_and_progressive_jpegs_match_a_full_decode(mode: str, options: dict, name: str) -> None:
    prep = PREPROCESSINGS[name]
    data = jpeg(upright_scene().convert(mode), 6, **options)
    full, reduced = load_image(data), load_image(data, short_side=prep.short_side)
    assert reduced.mode == "RGB" and reduced.size < full.size
    difference = np.abs(encoder_input(reduced, prep) - encoder_input(full, prep))
    assert difference.mean() < 0.05 and np.quantile(difference, 0.99) < 0.5


@pytest.mark.parametrize("side", [2100, 1001, 449, 225, 113, 112, 60])
@pytest.mark.parametrize("short_side", [112, 224, 256])
def test_the_decoded_size_is_never_below_what_the_encoder_needs(side: int, short_side: int) -> None:
    # An odd, narrow size: the ceiling Pillow's draft rounds to is what keeps it from going under.
    image = Image.new("RGB", (side * 4 // 3 + 1, side), (120, 130, 140))
    reduced = load_image(jpeg(image, 8), short_side=short_side)
    assert min(reduced.size) >= min(short_side, side)
    assert reduced.size[0] > reduced.size[1]  # stored portrait, shown upright: landscape as made
    if side >= 2 * short_side:  # room to shrink: it is shrunk
        assert min(reduced.size) < side


def test_a_non_jpeg_still_decodes_in_full() -> None:
    buffer = io.BytesIO()
    upright_scene().save(buffer, "PNG")
    assert load_image(buffer.getvalue(), short_side=112).size == (960, 720)
    assert load_image(upright_scene(), short_side=112).size == (960, 720)  # a PIL image: as given


def test_short_side_must_be_positive() -> None:
    with pytest.raises(ValueError, match="short_side must be a positive number of pixels"):
        load_image(jpeg(upright_scene()), short_side=0)


def test_the_encoder_says_what_short_side_it_needs() -> None:
    assert PREPROCESSINGS["straight 112"].short_side == 112
    assert Preprocessing(image_size=224, resize_shortest_edge=256).short_side == 256


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("on_gpu", [False, True])
def test_the_default_split_never_exceeds_the_cores(cores: int, on_gpu: bool) -> None:
    workers, threads = split_cores(cores, on_gpu)
    assert workers >= 0 and threads >= 1
    assert workers + threads <= cores
    if not on_gpu:
        assert workers + threads == cores  # every core used
        assert workers == (0 if cores <= 2 else cores // 2)  # small machines decode between batches


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
def test_one_override_fills_the_rest_of_the_cores(cores: int) -> None:
    for workers in range(cores + 2):
        chosen, threads = split_cores(cores, workers=workers)
        assert chosen == workers and threads >= 1
        assert workers + threads <= max(cores, workers + 1)
    for threads in range(1, cores + 2):
        workers, chosen = split_cores(cores, threads=threads)
        assert chosen == threads and workers == max(0, cores - threads)
    assert split_cores(cores, workers=5, threads=7) == (5, 7)  # both given: as given


def test_usable_cores_is_this_process_share() -> None:
    assert 1 <= usable_cores() <= (__import__("os").cpu_count() or 1)
