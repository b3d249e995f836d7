"""Decoding with safe limits, EXIF orientation and colour normalisation (pure functions)."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ImageTooLarge, UnsupportedImage
from app.pixels import FULL_SIZE_KEY

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

# We check the pixel count ourselves (with a clear message); keep PIL's own guard as a backstop only.
Image.MAX_IMAGE_PIXELS = None


#: JPEG draft decoding keeps both sides >= this many times the model input. Measured with the trained 64 px
#: model on 400 real photos against full decoding: x2 gives mean cosine 0.9992 but top-10 neighbour overlap
#: 0.895; x3 gives 0.99989 / 0.987; x4 gives 0.99998 / 0.998 (benchmarks/ingest.py reports it for each run).
DRAFT_FACTOR = 3
#: ...and never below this many pixels, for margin on small models: the 64 px model at x3 (192 px, so 1/2 scale for
#: 0.3 MP photos) scored overlap 0.984 on 128 crops of COCO and the samples re-saved at 0.3 MP and 0.991 on the
#: samples' own photos (cosine 0.99995, 0.99996), just over the 0.98 bar; at 256 px, 1.000 and 1.000. Models of
#: 224 px and up keep x3: their drafts are larger already.
MIN_DRAFT_SIDE = 256
#: ...and never below 1/4 scale. libjpeg's 1/8 scale keeps only each 8x8 block's mean (its DC term): on 12 MP
#: photos the trained 64 px model's vectors then fall to mean cosine 0.9973 (min 0.985) against full decoding,
#: where 1/4 scale gives 0.99990 (min 0.9992) for 3.4 ms more decoding per photo (19.6 vs 16.2 ms, 24 photos).
MAX_DRAFT_SCALE = 4


def model_draft_size(image_size: int) -> int:
    """The draft size to decode images at for a model whose input is ``image_size`` pixels."""
    return max(image_size * DRAFT_FACTOR, MIN_DRAFT_SIDE)


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image ready for the model, with what the store records about the file."""

    image: Image.Image
    width: int
    height: int
    format: str


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_checked(data: bytes, *, max_pixels: int) -> tuple[Image.Image, str]:
    """Open image bytes lazily (only the header is read) and check them: a known format, sane dimensions, at most
    ``max_pixels`` pixels. Returns the unloaded image and its format (upper case).
    Raises UnsupportedImage (ImageTooLarge for too many pixels) with a reason a person can act on."""
    if not data:
        raise UnsupportedImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedImage("not a recognised image format (is it really an image?)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_failure(exc, "unreadable image header") from exc

    fmt = (img.format or "unknown").upper()
    width, height = img.size
    if width <= 0 or height <= 0:
        raise UnsupportedImage(f"invalid image dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image has {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(raise CLIPSEARCH_MAX_IMAGE_PIXELS if this file is trusted)"
        )
    return img, fmt


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> DecodedImage:
    """Decode image bytes into an upright 8-bit RGB image.

    ``draft_size`` lets JPEG decoding run at a reduced DCT scale while keeping both sides at least
    that many pixels (the model input is far smaller than most photos). Width and height reported
    are those of the full image, after EXIF orientation.
    Raises UnsupportedImage with a reason a person can act on.
    """
    img, fmt = open_checked(data, max_pixels=max_pixels)
    width, height = img.size
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        orientation = exif_orientation(img)
        if draft_size and fmt == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
            # PIL takes the largest of the scales 1/2, 1/4, 1/8 that keeps both sides >= the size asked for
            floor = (width // MAX_DRAFT_SCALE, height // MAX_DRAFT_SCALE)  # size // floor < 2 * MAX_DRAFT_SCALE
            img.draft("RGB" if img.mode != "L" else "L", (max(draft_size, floor[0]), max(draft_size, floor[1])))
        img.load()
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        upright: Image.Image = ImageOps.exif_transpose(img) if orientation not in (None, 1) else img
        rgb = to_rgb(upright)
        if rgb.size != (width, height):  # drafted: the model's crop follows the whole picture (app.pixels)
            rgb.info[FULL_SIZE_KEY] = (width, height)
    except UnsupportedImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_failure(exc, "corrupt image data") from exc
    return DecodedImage(image=rgb, width=width, height=height, format=fmt)


def _decode_failure(exc: BaseException, what: str) -> UnsupportedImage:
    reason = str(exc) or exc.__class__.__name__
    if "truncated" in reason.lower():
        return UnsupportedImage(f"truncated file (incomplete download or copy?): {reason}")
    return UnsupportedImage(f"{what}: {reason}")


def exif_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag (1-8) of an opened image, or None (none, or malformed EXIF)."""
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # malformed EXIF must not make a decodable photo fail
        return None
    return int(value) if isinstance(value, int) else None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha over white, 16-bit and float scaled, CMYK converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        gray = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def read_and_decode(path: Path, *, max_pixels: int, draft_size: int | None = None) -> tuple[bytes, DecodedImage]:
    data = path.read_bytes()
    return data, decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
