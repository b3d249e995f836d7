"""The model input of a photo as a numpy array: one resample of the centre crop's region, then normalisation.

The torch-free core of ``app.preprocess.CenterCropResize`` (which wraps it in a tensor), shared with the
service's ONNX start (``app.onnx_encoder``), which answers image queries without importing torch. The
arithmetic is the same float32 multiply-add in both, so both give the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: ``app.imaging.decode_image`` records here the whole picture's (width, height) when it decoded a JPEG at a reduced
#: scale (draft mode). The crop's geometry is then the whole picture's, as the reference computes it on a full
#: decode: a draft's sides are rounded up (475 rows at 1/2 scale give 238), which can change the resized width the
#: reference truncates to (64 px model: 85 from 632x475, 84 from 316x238), a shift and a 1 % zoom that moved the
#: 64 px model's vectors to cosine 0.94 on such photos.
FULL_SIZE_KEY = "clipsearch.full_size"


def full_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) of the picture ``image`` was decoded from: its own size unless drafted."""
    size = image.info.get(FULL_SIZE_KEY)
    return (int(size[0]), int(size[1])) if size else image.size


def draft_scale(full: tuple[int, int], size: tuple[int, int]) -> float:
    """The whole factor a ``full``-size picture was reduced by to ``size`` (sides rounded up): a JPEG draft's DCT
    scale (2, 4, 8) or ``Image.reduce``'s factor."""
    return float(max(1, round(max(full) / max(size)))) if full != size else 1.0


@dataclass(frozen=True)
class CropResize:
    """Resize-shorter-side-to-``size`` then centre-crop ``size`` x ``size`` (torchvision's sizes and rounding),
    as one resize of the crop's source region, then ``(x / 255 - mean) / std`` per channel."""

    size: int
    resample: Image.Resampling
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, size: int, resample: Image.Resampling, mean: Sequence[float], std: Sequence[float]) -> CropResize:
        return cls(int(size), Image.Resampling(resample), tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def resized(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The reference's geometry: the size of the whole picture with its shorter side resized to ``size``
        (width, height), and the top-left corner (left, top) of the centre crop in it."""
        s = self.size
        if width <= height:
            resized_w, resized_h = s, int(s * height / width)
        else:
            resized_w, resized_h = int(s * width / height), s
        return resized_w, resized_h, int(round((resized_w - s) / 2.0)), int(round((resized_h - s) / 2.0))

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of the original that becomes the crop."""
        s = self.size
        resized_w, resized_h, left, top = self.resized(width, height)
        sx, sy = width / resized_w, height / resized_h
        return (left * sx, top * sy, (left + s) * sx, (top + s) * sy)

    def crop(self, image: Image.Image) -> Image.Image:
        """The ``size`` x ``size`` RGB crop of an RGB or greyscale image (of a draft, the whole picture's crop)."""
        full = full_size(image)
        if image.mode == "L":  # grey resamples like its RGB conversion (three equal channels)
            image = image.convert("RGB")
        scale = draft_scale(full, image.size)
        left, top, right, bottom = self.source_box(*full)
        box = (left / scale, top / scale, min(right / scale, image.width), min(bottom / scale, image.height))
        return image.resize((self.size, self.size), self.resample, box=box)

    def scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel float32 (scale, offset), shape (3, 1, 1): ``x * scale + offset`` normalises a 0..255 value."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        scale = np.float32(1.0) / (np.float32(255.0) * std)
        return scale.astype(np.float32), (-mean / std).astype(np.float32)

    def array(self, image: Image.Image) -> np.ndarray:
        """(3, size, size) float32, normalised, of an RGB or greyscale image."""
        pixels = np.asarray(self.crop(image), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
        scale, offset = self.scale_offset()
        pixels *= scale
        pixels += offset
        return pixels
