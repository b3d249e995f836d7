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

import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

from app.pixels import CropResize

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
        self.core = CropResize.of(size, resample, mean, std)  # the torch-free arithmetic (app.pixels)
        self.size = self.core.size
        self.resample = self.core.resample

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of the original that becomes the SxS crop, with torchvision's sizes and rounding."""
        return self.core.source_box(width, height)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode not in ("RGB", "L"):
            return self.fallback(image)  # decode_image gives RGB: this is for other callers
        return torch.from_numpy(self.core.array(image))

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
