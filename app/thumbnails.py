"""Thumbnails: made once per (image content, size, format), upright, and cached on disk."""

from __future__ import annotations

import io
import mimetypes
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image

from app.errors import BadQuery, NotFound
from app.imaging import decode_image
from app.store import ImageRecord

ThumbnailFormat = Literal["jpeg", "webp"]

THUMBNAIL_MEDIA_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "webp": "image/webp"}
_EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "webp": "webp"}

# PIL format name -> the media type to serve the original with.
MEDIA_TYPES: dict[str, str] = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


def media_type(image_format: str | None, path: str) -> str:
    """The content type of an original: from the format found when decoding, else from the name."""
    if image_format and image_format.upper() in MEDIA_TYPES:
        return MEDIA_TYPES[image_format.upper()]
    guessed, _ = mimetypes.guess_type(path)
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


def make_thumbnail(
    data: bytes, size: int, *, fmt: ThumbnailFormat = "jpeg", quality: int = 85, max_pixels: int
) -> bytes:
    """Encode an upright (EXIF orientation applied) thumbnail whose longest side is at most ``size``."""
    decoded = decode_image(data, max_pixels=max_pixels, draft_size=size)
    image = decoded.image
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "webp":
        image.save(out, format="WEBP", quality=quality, method=4)
    else:
        image.save(out, format="JPEG", quality=quality, optimize=True, progressive=True)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails under ``root/<size>/``, named by image id and content hash so a changed file gets a new one."""

    def __init__(self, root: Path, sizes: Sequence[int], *, quality: int = 85, max_pixels: int) -> None:
        self.root = root
        self.sizes = tuple(sorted(sizes))
        self.quality = quality
        self.max_pixels = max_pixels

    def check_size(self, size: int) -> None:
        if size not in self.sizes:
            allowed = ", ".join(str(s) for s in self.sizes)
            raise BadQuery(f"thumbnail size {size} is not offered: use one of {allowed}")

    def path_for(self, record: ImageRecord, size: int, fmt: ThumbnailFormat) -> Path:
        version = (record.sha256 or f"{record.size}-{record.mtime}")[:16]
        return self.root / str(size) / f"{record.id}-{version}.{_EXTENSIONS[fmt]}"

    def get(self, record: ImageRecord, size: int, fmt: ThumbnailFormat) -> Path:
        """The cached thumbnail file, made now if it is not there yet."""
        self.check_size(size)
        target = self.path_for(record, size, fmt)
        if target.is_file():
            return target
        try:
            data = Path(record.path).read_bytes()
        except OSError as exc:
            raise NotFound(
                f"the file of image {record.id} cannot be read ({exc.strerror or exc}): "
                "run 'clipsearch index' again to update the catalog"
            ) from exc
        thumbnail = make_thumbnail(data, size, fmt=fmt, quality=self.quality, max_pixels=self.max_pixels)
        _atomic_write(target, thumbnail)
        return target


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
