"""The model's image preprocessing with one resampling pass over the pixels that are kept.

open_clip's standard transform resizes the whole picture so that its shorter side is the model input, then crops
the centre square, with Pillow's bicubic filter; that resize is the most expensive step of preparing a photo
after decoding. ``fast_transform`` recognises that transform and returns one that computes the same pixels faster:

- in the indexer (``CenterCropResize``), torch's antialiased uint8 resize, which uses Pillow's kernel and
  fixed-point arithmetic with SIMD, on the whole picture (the reference's geometry exactly), then the crop: the
  same pixels as the reference to within a grey level here and there (mean absolute difference about 0.003 of a
  grey level on real photos, 2 at most), about 2x faster than Pillow on one core;
- without torch (``app.pixels.CropResize``, the service's ONNX start), Pillow's ``resize(box=...)`` of the
  centre region only, straight to the model input, which equals the reference to within rounding at the crop
  edges (about 0.01 of a grey level on average).

Both then convert and normalise as the original does; tests/test_preprocess.py checks pixels and embeddings.
Any other transform (squash or longest-side resize, extra steps) is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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
# the filters torch's uint8 antialiased resize computes as Pillow does (same kernels, same fixed point)
_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


class CenterCropResize:
    """Resize-shorter-side-to-S then centre-crop SxS, then RGB, tensor in [0, 1] and the model's normalisation:
    with torch's resize for bicubic and bilinear (``resize_and_crop``), else Pillow's resize of the crop's
    source region (``app.pixels.CropResize``)."""

    def __init__(self, size: int, resample: Image.Resampling, mean: Any, std: Any, fallback: Transform) -> None:
        self.fallback = fallback  # the original transform: for modes it resamples differently (palette, alpha)
        self.core = CropResize.of(size, resample, mean, std)  # the torch-free arithmetic (app.pixels)
        self.size = self.core.size
        self.resample = self.core.resample
        self._torch_mode = _TORCH_MODES.get(self.resample)
        scale, offset = self.core.scale_offset()
        self._scale, self._offset = torch.from_numpy(scale), torch.from_numpy(offset)

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of the original that becomes the SxS crop, with torchvision's sizes and rounding."""
        return self.core.source_box(width, height)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode not in ("RGB", "L"):
            return self.fallback(image)  # decode_image gives RGB: this is for other callers
        if self._torch_mode is None:
            return torch.from_numpy(self.core.array(image))
        return self.resize_and_crop(image, self._torch_mode)

    def resize_and_crop(self, image: Image.Image, mode: str) -> torch.Tensor:
        """The reference's steps with torch's uint8 antialiased resize (bicubic or bilinear): shorter side to
        ``size`` over the whole picture, centre crop, then normalise."""
        if image.mode == "L":
            image = image.convert("RGB")
        width, height = image.size
        s = self.size
        new_w, new_h = (s, int(s * height / width)) if width <= height else (int(s * width / height), s)
        # np.array, not asarray: Pillow hands over read-only bytes, which torch warns about
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # channels-last
        if (new_w, new_h) != (width, height):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode=mode, antialias=True)
        left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))
        crop = pixels[0, :, top : top + s, left : left + s].to(torch.float32)
        return torch.addcmul(self._offset, crop, self._scale).contiguous()

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
