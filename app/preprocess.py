"""The model's image preprocessing, faster than open_clip's transform and faithful to it.

open_clip's standard transform resizes the whole picture so that its shorter side is the model input, then crops
the centre square, with Pillow's bicubic filter; that resize is the most expensive step of preparing a photo
after decoding. ``fast_transform`` recognises that transform and returns a ``CenterCropResize``, which has two
ways to compute it:

- called directly (queries; and without torch, ``app.pixels.CropResize``, the service's ONNX start, which gives the
  same pixels), Pillow's ``resize(box=...)`` of the centre region only, straight to the model input: the
  reference's pixels to within rounding at the crop edges (about 0.01 of a grey level on average);
- ``indexing_transform`` (the indexer, where it is paid per photo), torch's antialiased uint8 resize, which uses
  Pillow's kernels and fixed point with SIMD, on the whole picture (the reference's geometry exactly), then the
  crop: mean absolute difference about 0.003 of a grey level on real photos, 2 at most, and about 2x faster than
  Pillow's box resize on one core.

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

from app.pixels import FULL_SIZE_KEY, CropResize

Transform = Callable[[Image.Image], torch.Tensor]

# torchvision's InterpolationMode values -> Pillow's filters (torchvision is imported only by fast_transform: with
# the torch.compile machinery it pulls in, it took 2 s of a no-op `clipsearch index`, which otherwise needs no model)
_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
}
# the filters torch's uint8 antialiased resize computes as Pillow does (same kernels, same fixed point)
_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


class CenterCropResize:
    """Resize-shorter-side-to-S then centre-crop SxS, then RGB, tensor in [0, 1] and the model's normalisation:
    Pillow's resize of the crop's source region (``app.pixels.CropResize``), or for the indexer torch's resize of
    the whole picture (``TorchCropResize``, ``indexing_transform``)."""

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


class TorchCropResize:
    """The indexer's ``CenterCropResize``: the reference's steps with torch's uint8 antialiased resize (bicubic or
    bilinear): shorter side to ``size`` over the whole picture, centre crop, then normalise. A plain object, so
    that it pickles (the Ray engine ships it)."""

    def __init__(self, crop: CenterCropResize, mode: str) -> None:
        self.crop, self.mode = crop, mode
        scale, offset = crop.core.scale_offset()
        self.scale, self.offset = torch.from_numpy(scale), torch.from_numpy(offset)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode not in ("RGB", "L"):
            return self.crop.fallback(image)
        if FULL_SIZE_KEY in image.info:
            # A draft (app.pixels.FULL_SIZE_KEY): Pillow's resize of the whole picture's crop region, at its exact
            # place in the draft. Resizing the whole draft to the whole picture's resized size is off by the draft's
            # rounded-up sides (a 1282-px side at 1/4 scale: 321 for 320.5), which moved the 64 px model's vectors
            # to cosine 0.996 (mean pixel difference 0.02) on such photos.
            return self.crop(image)
        if image.mode == "L":
            image = image.convert("RGB")
        width, height = image.size
        s = self.crop.size
        new_w, new_h, left, top = self.crop.core.resized(width, height)
        # np.array, not asarray: Pillow hands over read-only bytes, which torch warns about
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # channels-last
        if (new_w, new_h) != (width, height):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode=self.mode, antialias=True)
        crop = pixels[0, :, top : top + s, left : left + s].to(torch.float32)
        return torch.addcmul(self.offset, crop, self.scale).contiguous()


def fast_transform(transform: Transform) -> Transform:
    """A single-pass equivalent of open_clip's resize + centre-crop transform, or ``transform`` itself when it
    has another shape."""
    from torchvision.transforms import CenterCrop, Compose, Normalize, Resize

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
        or getattr(resize.interpolation, "value", None) not in _PIL_FILTERS
    ):
        return transform
    resample = _PIL_FILTERS[resize.interpolation.value]
    return CenterCropResize(size, resample, normalize.mean, normalize.std, transform)


def indexing_transform(transform: Transform) -> Transform:
    """The transform the indexer runs per photo: ``TorchCropResize`` for a ``CenterCropResize`` whose filter torch
    computes as Pillow does, else ``transform``. Queries keep Pillow's, which the torch-free ONNX start computes
    bit for bit."""
    if isinstance(transform, CenterCropResize) and (mode := _TORCH_MODES.get(transform.resample)):
        return TorchCropResize(transform, mode)
    return transform
