"""The one image loader: a path, bytes or PIL image in, a fully decoded, upright RGB image out.

Everything in the project that reads pixels goes through `load_image`, so every caller gets the same
answer to the awkward cases: EXIF rotation, transparency (composited on white), CMYK, 16-bit and float
greyscale, multi-frame files (first frame), and a pixel limit checked from the header before decoding.
A file that cannot be loaded raises `ImageLoadError` naming the file and the reason; skipping it or
stopping is the caller's choice, and `try_load_image` serves batch callers that skip and count.

Not here: resizing and normalisation (the encoder's preprocessing, vision.py), colour management
(embedded ICC profiles are ignored, as torchvision and timm do), walking folders (`is_supported_image`
is the filter walkers use), logging, and any change to Pillow's process-wide settings
(`Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES`), which other code in the process relies on.
"""

from __future__ import annotations

import functools
import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

# What a photo folder holds besides images, and why the index does not take it: walkers report these
# (failures.log) rather than drop them silently. RAW files need a demosaicing step whose choices (white
# balance, exposure) belong to the photographer's converter, not to a search index.
_RAW_EXTENSIONS = frozenset(
    ".3fr .arw .cr2 .cr3 .crw .dcr .dng .erf .iiq .k25 .kdc .mef .mos .mrw .nef .nrw .orf .pef .raf .raw "
    ".rw2 .rwl .sr2 .srf .srw .x3f".split()
)
_VIDEO_EXTENSIONS = frozenset(
    ".3gp .avi .flv .m2ts .m4v .mkv .mov .mp4 .mpeg .mpg .mts .ogv .webm .wmv".split()
)
_SIDECAR_EXTENSIONS = frozenset(".aae .thm .xmp".split())  # edits and metadata written next to a photo

# 64 megapixels holds any ordinary photo (48 MP phones, 61 MP full-frame cameras) while bounding one
# decoded RGB image to ~190 MB. It is also under Pillow's own bomb threshold (~89 MP), which some of its
# decoders still consult, so under the default ours is the only limit a caller meets.
DEFAULT_MAX_PIXELS: int = 64_000_000

# The formats Pillow may parse. Restricting them keeps the parsers that see untrusted files to the few we
# need. MPO is what many phones write for JPEG photos; Pillow reaches it through the JPEG parser. AVIF is
# Pillow's own (11.3 and later, when built with libavif); HEIF (iPhone photos, and AVIF where Pillow lacks
# it) is pillow-heif's, registered on the first file that looks like one (`_register_heif`).
_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF")

# Pillow's convert() clips these to 0..255, turning every 16-bit value over 255 white, so we scale the
# full range instead. "I" is how Pillow often holds 16-bit data, so it is read as 16-bit too; float
# images are taken as 0..1, the convention of the editors and libraries that write them.
_FULL_SCALE: dict[str, float] = {**dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N", "I"), 65535.0), "F": 1.0}


class ImageLoadError(ValueError):
    """One image that could not be loaded: `path` as the caller gave it, `reason` a short human phrase."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"image {path!r}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[str, str]]:
        # The default pickling calls ImageLoadError(message) and fails; worker processes pickle errors.
        return ImageLoadError, (self.path, self.reason)


def is_supported_image(path: str | os.PathLike[str]) -> bool:
    """Whether `path` has a supported image extension (case-insensitive). Nothing is opened: this is the
    filter for folder walkers, while `load_image` goes by content whatever the name."""
    return os.path.splitext(os.fspath(path))[1].lower() in SUPPORTED_EXTENSIONS


def not_an_image_reason(path: str | os.PathLike[str]) -> str | None:
    """Why a walker does not take `path`, by its name alone (None: a supported image): the line that
    failures.log gives a RAW file, a video, a sidecar or an unknown extension."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension in SUPPORTED_EXTENSIONS:
        return None
    if extension in _RAW_EXTENSIONS:
        return "RAW camera file: not decoded; export a JPEG (or TIFF) of it to index it"
    if extension in _VIDEO_EXTENSIONS:
        return "video: not indexed"
    if extension in _SIDECAR_EXTENSIONS:
        return "sidecar file (edits or metadata of a photo): not an image"
    if not extension:
        return "no extension: not read as an image"
    return f"unknown extension {extension!r}: not an image the index reads"


def load_image(
    source: str | os.PathLike[str] | bytes | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short_side: int | None = None,
) -> Image.Image:
    """A fully decoded RGB image (mode "RGB") from a path, the bytes of a file, or a PIL image.

    Raises `ImageLoadError` for anything that cannot be loaded, including images over `max_pixels`
    (width * height, read from the header before decoding). Errors name the path as given, "<bytes>" for
    bytes, or the PIL image's filename. A PIL image skips the file and format checks but gets the same
    limit, rotation and mode rules; it is never modified in place.

    `short_side` (None: full size) is the shortest side the caller needs: a JPEG is then decoded at a
    reduced scale (libjpeg's DCT scaling, 1/2, 1/4 or 1/8) to the smallest size whose shortest side is
    not below it, several times faster than a full decode of a phone photo; other formats decode in full.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be a positive number of pixels or None, got {short_side}")
    if isinstance(source, Image.Image):
        # Full size: a draft would change the caller's image in place, and it may be decoded already.
        return _decode(source, getattr(source, "filename", "") or "<PIL.Image>", max_pixels)
    if isinstance(source, (bytes, bytearray)):
        return _load_stream(io.BytesIO(source), "<bytes>", max_pixels, short_side)
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        with _open_file(path) as file:
            return _load_stream(file, path, max_pixels, short_side)
    raise TypeError(
        f"load_image takes a path, bytes or a PIL.Image.Image, got {type(source).__name__}; "
        "for an open file pass file.read()"
    )


def try_load_image(
    source: str | os.PathLike[str] | bytes | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short_side: int | None = None,
) -> tuple[Image.Image | None, ImageLoadError | None]:
    """`load_image` for batch callers that skip and count bad files: (image, None) or (None, error)."""
    try:
        return load_image(source, max_pixels=max_pixels, short_side=short_side), None
    except ImageLoadError as err:
        return None, err


def _open_file(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError as err:
        if os.path.islink(path):
            raise ImageLoadError(path, f"broken symbolic link to {os.readlink(path)!r}") from err
        raise ImageLoadError(path, "no such file") from err
    except IsADirectoryError as err:
        raise ImageLoadError(path, "is a directory, not a file") from err
    except PermissionError as err:
        raise ImageLoadError(path, "permission denied") from err
    except OSError as err:
        raise ImageLoadError(path, f"cannot read the file ({err.strerror or err})") from err


def _load_stream(stream: BinaryIO, name: str, max_pixels: int, short_side: int | None) -> Image.Image:
    head = stream.read(16)  # what Pillow's format checks look at
    if not head:
        raise ImageLoadError(name, "empty file (0 bytes)")
    image = _parse_header(stream, head, name)
    if image.format not in _FORMATS:  # a parser may hand back another format than its own (JPEG gives MPO)
        raise ImageLoadError(name, f"unsupported format {image.format!r}")
    return _decode(image, name, max_pixels, short_side)


def _parse_header(stream: BinaryIO, head: bytes, name: str) -> ImageFile.ImageFile:
    """Image.open(stream, formats=_FORMATS) without Pillow's process-wide size check.

    Image.open compares the size with Image.MAX_IMAGE_PIXELS before returning: it warns, or raises without
    saying the width and height, and `max_pixels` could never be raised past it. Calling the registered
    parsers that Image.open calls reads the same header lazily and leaves the limit to `_decode`.
    """
    Image.init()  # registers every parser on the first call, returns at once after
    iso_media = head[4:8] == b"ftyp"  # HEIF, AVIF, or an MP4/MOV video
    heif_readable = iso_media and _register_heif()
    for fmt in _FORMATS:
        if fmt not in Image.OPEN or not _matches(Image.OPEN[fmt][1], head):
            continue
        stream.seek(0)
        try:
            return Image.OPEN[fmt][0](stream, name)
        except Exception as err:  # the magic bytes matched, so any parser error means a broken file
            raise ImageLoadError(name, _failure_reason(err, f"corrupt or truncated {fmt} header")) from err
    other = next((fmt for fmt, (_, accept) in Image.OPEN.items() if _matches(accept, head)), None)
    if other is not None:
        raise ImageLoadError(name, f"unsupported format {other!r} (supported: {', '.join(_FORMATS)})")
    if iso_media and not heif_readable:
        raise ImageLoadError(
            name, "an ISO media file (HEIF/HEIC?) and pillow-heif is not installed to read it"
        )
    raise ImageLoadError(name, "not an image (Pillow cannot identify it)")


@functools.cache
def _register_heif() -> bool:
    """Add pillow-heif's HEIF parser to Pillow's, once per process; False if pillow-heif is missing.
    Imported only here: it loads libheif, which a folder of JPEGs never needs. It applies the file's
    rotation while decoding and then clears the EXIF orientation, so `_decode` does not rotate twice."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _matches(accept: object, head: bytes) -> bool:
    # A plugin's magic-byte check returns a bool, or a string for "maybe, with a warning", which we treat as
    # no; it may also trip over a short file. A plugin without one would claim any file.
    try:
        result = callable(accept) and accept(head)
    except Exception:
        return False
    return bool(result) and not isinstance(result, str)


def _decode(image: Image.Image, name: str, max_pixels: int, short_side: int | None = None) -> Image.Image:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            name,
            # Both remedies: the command line has no option for the limit; a library caller has one.
            f"too large: {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
            f"shrink it under the limit (in Python, load_image's max_pixels={width * height:_} allows it)",
        )
    try:
        image.getexif()  # before decoding: a multi-page TIFF drops its file once loaded (Pillow 10.0)
        if short_side is not None and image.format in ("JPEG", "MPO") and min(width, height) > short_side:
            _draft(image, short_side)
        image.load()  # the first frame only; a truncated file fails here, not later in a worker
        image = ImageOps.exif_transpose(image)  # a copy, upright, free of the open file
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageLoadError(name, _failure_reason(err, "corrupt image data")) from err
    return _to_rgb(image, name)


def _draft(image: Image.Image, short_side: int) -> None:
    """Have libjpeg decode `image` at the largest DCT scale-down whose shortest side stays >= short_side.

    The request keeps the stored aspect ratio, so the shortest side is the same side before and after
    the EXIF rotation (a rotation swaps width and height, never which is shorter). Pillow's draft picks
    the scale from min(width // w, height // h) and rounds the scaled size up, so it never goes below.
    The colour mode is left to the file (grey stays grey, CMYK stays CMYK): `_to_rgb` converts after.
    """
    width, height = image.size
    shortest = min(width, height)
    wanted = (-(-width * short_side // shortest), -(-height * short_side // shortest))  # ceilings
    image.draft(None, wanted)


def _failure_reason(err: Exception, otherwise: str) -> str:
    if isinstance(err, Image.DecompressionBombError):
        return f"over Pillow's own limit Image.MAX_IMAGE_PIXELS ({err})"
    if "truncated" in str(err).lower():
        return f"truncated file ({err})"
    return f"{otherwise} ({type(err).__name__}: {err})"


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode in _FULL_SCALE:
        values = np.nan_to_num(np.asarray(image, dtype=np.float64)) * (255 / _FULL_SCALE[image.mode])
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    try:
        if _has_transparency(image):
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:  # a mode Pillow cannot convert, such as premultiplied "La"
        raise ImageLoadError(name, f"unsupported pixel mode {image.mode!r} ({err})") from err


def _has_transparency(image: Image.Image) -> bool:
    # Image.has_transparency_data, which Pillow only has from 10.1: an alpha band, a palette with alpha,
    # or a transparent colour or palette index in info.
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")
