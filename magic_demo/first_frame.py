"""First frames for image-to-video: generated (text-to-image), retrieved (gallery), or uploaded.

All three sources produce a :class:`FirstFrame`: an RGB ``PIL.Image`` already fitted to one of the I2V
resolution buckets, the name of its source, and a JSON-serialisable ``provenance`` dict that goes into the
generation report.

Uploads (:func:`load_upload`)
    Accepted: PNG, JPEG (MPO files from phones open as JPEG), WebP, GIF, BMP, TIFF, given as a path, ``bytes``, a binary
    file object or an already decoded ``PIL.Image``.

    * EXIF orientation is applied (phone photos come out upright).
    * Transparency (RGBA, LA, palette with a transparent index) is composited on ``background``
      (white by default).
    * Palette, 1-bit, grayscale, 16-bit (``I;16*``/``I``), float, CMYK, YCbCr and LAB images are
      converted to 8-bit RGB.
    * Animated images (GIF, WebP, APNG): the FIRST frame is used and ``provenance["animated"]`` /
      ``provenance["n_frames"]`` record it (documented choice: it is what a user dropping a GIF most
      likely expects, and the I2V model animates it anyway).

    Refusals are :class:`FirstFrameError` (a ``ValueError``) subclasses with a specific message, checked in
    this order: too many bytes (before reading more than ``max_bytes + 1`` bytes), not an image, too many
    pixels (checked on the header, BEFORE any pixel is decoded, so a decompression bomb is never
    decoded), too small, truncated / corrupt data (found while decoding).

Generation: :class:`magic_demo.text_to_image.TextToImage`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Resolution buckets (width, height) of the real presets, around 540p (DESIGN.md section 2).
DEFAULT_BUCKETS: list[tuple[int, int]] = [(960, 544), (544, 960), (624, 832), (832, 624), (720, 720)]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # 20 MiB
DEFAULT_MAX_PIXELS = 50_000_000  # ~ 8660 x 5773; decoding this as RGB needs ~150 MB
DEFAULT_MIN_SIDE = 64

# Pillow plugins tried when opening an upload; anything else is "not an image".
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]


# --------------------------------------------------------------------------------------------- errors
class FirstFrameError(ValueError):
    """A first frame could not be produced from the input (the message says why, for the user)."""


class NotAnImageError(FirstFrameError):
    pass


class TruncatedImageError(FirstFrameError):
    pass


class TooManyPixelsError(FirstFrameError):
    pass


class TooManyBytesError(FirstFrameError):
    pass


class ImageTooSmallError(FirstFrameError):
    pass


# --------------------------------------------------------------------------------------------- result
@dataclass
class FirstFrame:
    """An RGB first frame, already fitted to a resolution bucket, plus where it came from."""

    image: Image.Image
    source: str  # 'generated' | 'retrieved' | 'uploaded'
    provenance: dict[str, Any] = field(default_factory=dict)

    SOURCES = ("generated", "retrieved", "uploaded")

    def __post_init__(self) -> None:
        if self.source not in self.SOURCES:
            raise ValueError(f"source must be one of {self.SOURCES}, got {self.source!r}")
        if self.image.mode != "RGB":
            raise ValueError(f"FirstFrame.image must be RGB, got mode {self.image.mode!r}")

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def report(self) -> dict[str, Any]:
        """JSON-serialisable summary for the generation report."""
        return {"source": self.source, "size": list(self.image.size), **self.provenance}


# --------------------------------------------------------------------------------------------- buckets
def _check_buckets(buckets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for b in buckets:
        w, h = int(b[0]), int(b[1])
        if w <= 0 or h <= 0 or w % 16 or h % 16:
            raise ValueError(f"resolution bucket {b!r} must be positive multiples of 16 (width, height)")
        out.append((w, h))
    if not out:
        raise ValueError("at least one resolution bucket is needed")
    return out


def select_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size`` (compared in log space, so 2:1 and 1:2 are
    equally far from 1:1). Ties (same aspect) go to the bucket whose area is closest to the image's, then
    to the earlier bucket."""
    buckets = _check_buckets(buckets)
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    ar = math.log(w / h)
    area = math.log(w * h)
    return min(
        buckets,
        key=lambda b: (round(abs(math.log(b[0] / b[1]) - ar), 9), abs(math.log(b[0] * b[1]) - area)),
    )


def _cover_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    """Centred crop box in source coordinates with the target's aspect ratio, as large as possible."""
    w, h = size
    tw, th = target
    scale = max(tw / w, th / h)  # resize factor so the image covers the target
    cw, ch = tw / scale, th / scale
    left, top = (w - cw) / 2.0, (h - ch) / 2.0
    return (left, top, left + cw, top + ch)


def fit_to_bucket(image: Image.Image, buckets: Sequence[tuple[int, int]]) -> Image.Image:
    """Resize keeping aspect so the image covers the closest-aspect bucket, then centre-crop to it.

    Done in one resampling pass (``Image.resize`` with a source box), so no pixels are lost twice.
    Returns a new RGB image of exactly the bucket size."""
    bucket = select_bucket(image.size, buckets)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size == bucket:
        return image.copy()
    box = _cover_box(image.size, bucket)
    return image.resize(bucket, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


# --------------------------------------------------------------------------------------------- uploads
def _read_source(src: ImageSource, max_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """Read the raw bytes of an upload, refusing more than ``max_bytes`` without reading them all."""
    info: dict[str, Any] = {}
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        info["filename"] = path.name
        try:
            n = path.stat().st_size
        except FileNotFoundError:
            raise FirstFrameError(f"upload not found: {path}") from None
        if n > max_bytes:
            raise TooManyBytesError(
                f"file too large: {n} bytes, the limit is {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB)"
            )
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    elif hasattr(src, "read"):
        name = getattr(src, "name", None)
        if isinstance(name, str):
            info["filename"] = os.path.basename(name)
        data = src.read(max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise FirstFrameError("upload file object must be opened in binary mode")
        data = bytes(data)
    else:
        raise FirstFrameError(f"unsupported upload type {type(src).__name__}")
    if len(data) > max_bytes:
        whole = isinstance(src, (bytes, bytearray, memoryview))
        shown = f"{len(data)} bytes" if whole else f"more than {max_bytes} bytes"
        raise TooManyBytesError(
            f"file too large: {shown}, the limit is {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB)"
        )
    if not data:
        raise NotAnImageError("not an image: the file is empty")
    return data, info


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # broken EXIF must not make an otherwise fine image fail
        return 1


def _to_rgb(img: Image.Image, background: tuple[int, int, int], info: dict[str, Any]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency composited on ``background``."""
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
    elif mode in ("1", "L") and "transparency" in img.info:
        img = img.convert("LA")
    elif mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or mode == "I":
            hi = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        else:  # float images: assume [0, 1] if they look like it
            hi = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)  # 2-D uint8 -> "L"
        info["converted_from_high_bit_depth"] = True
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        info["alpha_composited"] = True
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        img = Image.alpha_composite(base, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX ...
    return img


def open_image_checked(
    src: ImageSource,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
    draft_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Open, validate and decode an image into upright 8-bit RGB. Returns (image, info).

    Raises the :class:`FirstFrameError` subclasses described in the module docstring. ``draft_size`` lets
    JPEG decode at a reduced scale (never below that size) to save time and memory."""
    if isinstance(src, Image.Image):
        info: dict[str, Any] = {"format": src.format}
        img = src
        w, h = img.size
        if w * h > max_pixels:
            raise TooManyPixelsError(f"image too large: {w}x{h} = {w * h} pixels, the limit is {max_pixels} pixels")
    else:
        data, info = _read_source(src, max_bytes)
        info["bytes"] = len(data)
        info["sha256"] = hashlib.sha256(data).hexdigest()
        # Our own pixel limit is checked right after the header is parsed; Pillow's bomb check (which can
        # fire inside Image.open for absurd sizes) is mapped to the same refusal.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            except Image.DecompressionBombError as e:
                raise TooManyPixelsError(f"image too large: {e}; the limit is {max_pixels} pixels") from None
            except UnidentifiedImageError:
                raise NotAnImageError(
                    "not an image: the data is not a readable PNG, JPEG, WebP, GIF, BMP or TIFF file"
                ) from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                # header present but broken (e.g. cut inside the header)
                raise TruncatedImageError(f"damaged or truncated image header: {e}") from None
        info["format"] = img.format
        w, h = img.size
        if w * h > max_pixels:
            raise TooManyPixelsError(
                f"image too large: {w}x{h} = {w * h} pixels, the limit is {max_pixels} pixels "
                "(refused before decoding)"
            )
    info["original_size"] = [w, h]
    info["original_mode"] = img.mode
    if min(w, h) < min_side:
        raise ImageTooSmallError(f"image too small: {w}x{h}, each side must be at least {min_side} pixels")

    n_frames = int(getattr(img, "n_frames", 1) or 1)
    info["animated"] = bool(getattr(img, "is_animated", False))
    if info["animated"]:
        info["n_frames"] = n_frames
        img.seek(0)  # documented choice: the first frame of an animation

    orientation = _exif_orientation(img)
    if draft_size is not None and img.format in ("JPEG", "MPO"):
        dw, dh = draft_size
        if orientation in (5, 6, 7, 8):  # stored sideways: the draft request is in stored coordinates
            dw, dh = dh, dw
        try:
            img.draft("RGB", (dw, dh))  # keeps size >= requested
        except (OSError, ValueError):  # a speed-up only: the full decode below still reads (or refuses) the file
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if getattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False):
                info["warning"] = "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncation is not detected"
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
            raise TruncatedImageError(f"truncated or corrupt image data: {e}") from None
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        info["exif_orientation"] = orientation
    img = _to_rgb(img, background, info)
    return img, info


def load_upload(
    src: ImageSource,
    buckets: Sequence[tuple[int, int]] = DEFAULT_BUCKETS,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    background: tuple[int, int, int] = (255, 255, 255),
) -> FirstFrame:
    """Validate and convert a user upload into a :class:`FirstFrame` fitted to the closest bucket.

    Raises :class:`FirstFrameError` subclasses (``ValueError``) with a message fit for the user."""
    buckets = _check_buckets(buckets)
    draft = None
    if not isinstance(src, Image.Image):
        # The JPEG draft needs the header size; cheap, since the bucket only depends on the aspect ratio.
        draft = max(buckets, key=lambda b: b[0] * b[1])
        draft = (max(draft), max(draft))  # conservative: never decode smaller than the largest bucket side
    img, info = open_image_checked(
        src, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side, background=background,
        draft_size=draft,
    )
    bucket = select_bucket(img.size, buckets)
    fitted = fit_to_bucket(img, [bucket])
    info["decoded_size"] = list(img.size)
    info["bucket"] = list(bucket)
    info["background"] = list(background) if info.get("alpha_composited") else None
    return FirstFrame(image=fitted, source="uploaded", provenance=info)
