"""The model's image preprocessing with one resampling pass over the pixels that are kept.

open_clip's standard transform resizes the whole picture so that its shorter side is the model input, then crops
the centre square: for a 4:3 photo a quarter of the resampling work goes to pixels the crop throws away, and the
bicubic resize is the most expensive step of preparing a photo (2.8 of ~10 core-ms per photo here, for ViT-B-32).
``fast_transform`` recognises that transform and returns one that resamples only the centre region, straight to
the model input (Pillow's ``resize(box=...)`` with the same filter and scale), then converts and normalises as the
original does. The result equals the original's to within rounding at the crop edges (mean absolute difference
about 0.01 of a grey level on real photos; tests/test_preprocess.py checks pixels and embeddings). Any other
transform (squash or longest-side resize, extra steps) is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

Transform = Callable[[Image.Image], torch.Tensor]

_PIL_FILTERS = {
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
}


class CenterCropResize:
    """Resize-shorter-side-to-S then centre-crop SxS, done as one resize of the crop's source region, then
    RGB, tensor in [0, 1] and the model's normalisation."""

    def __init__(self, size: int, resample: Image.Resampling, mean: Any, std: Any, fallback: Transform) -> None:
        self.fallback = fallback  # the original transform: for modes it resamples differently (palette, alpha)
        self.size = int(size)
        self.resample = resample
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add per pixel
        self.scale = 1.0 / (255.0 * std_t)
        self.offset = -mean_t / std_t

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of the original that becomes the SxS crop, with torchvision's sizes and rounding."""
        s = self.size
        if width <= height:
            resized_w, resized_h = s, int(s * height / width)
        else:
            resized_w, resized_h = int(s * width / height), s
        left = int(round((resized_w - s) / 2.0))
        top = int(round((resized_h - s) / 2.0))
        sx, sy = width / resized_w, height / resized_h
        return (left * sx, top * sy, (left + s) * sx, (top + s) * sy)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode not in ("RGB", "L"):
            return self.fallback(image)  # decode_image gives RGB: this is for other callers
        if image.mode == "L":  # grey resamples like its RGB conversion (three equal channels)
            image = image.convert("RGB")
        crop = image.resize((self.size, self.size), self.resample, box=self.source_box(*image.size))
        pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).contiguous()
        return pixels.mul_(self.scale).add_(self.offset)

    def __repr__(self) -> str:
        return f"CenterCropResize(size={self.size}, resample={self.resample.name})"


def fast_transform(transform: Transform) -> Transform:
    """A single-pass equivalent of open_clip's resize + centre-crop transform, or ``transform`` itself when it
    has another shape."""
    steps = list(getattr(transform, "transforms", [])) if isinstance(transform, Compose) else []
    names = [type(step).__name__ for step in steps]
    if names != ["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"]:
        return transform
    resize, crop, convert, _, normalize = steps
    assert isinstance(resize, Resize) and isinstance(crop, CenterCrop) and isinstance(normalize, Normalize)
    size = resize.size[0] if isinstance(resize.size, list | tuple) and len(resize.size) == 1 else resize.size
    crop_size = tuple(crop.size) if isinstance(crop.size, list | tuple) else (crop.size, crop.size)
    if (
        not isinstance(size, int)
        or resize.max_size is not None
        or crop_size != (size, size)
        or getattr(convert, "mode", "RGB") != "RGB"
        or resize.interpolation not in _PIL_FILTERS
    ):
        return transform
    return CenterCropResize(size, _PIL_FILTERS[resize.interpolation], normalize.mean, normalize.std, transform)
