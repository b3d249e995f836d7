"""The model's image preprocessing, faster than open_clip's transform and faithful to it.

open_clip's standard transform resizes the whole picture so that its shorter side is the model input, then crops
the centre square, with Pillow's bicubic filter; that resize is the most expensive step of preparing a photo
after decoding. ``fast_transform`` recognises that transform and returns a ``CenterCropResize``, which has two
ways to compute it:

- called directly (queries; and without torch, ``app.pixels.CropResize``, the service's ONNX start, which gives the
  same pixels), Pillow's ``resize(box=...)`` of the centre region only, straight to the model input: the
  reference's pixels to within rounding at the crop edges (about 0.01 of a grey level on average);
- ``indexing_transform`` (the indexer, where it is paid per photo), torch's antialiased uint8 resize, which uses
  Pillow's kernels and fixed point with SIMD, at the whole picture's scale (the reference's geometry exactly, JPEG
  drafts included), up to the crop's far edges, then the crop: mean absolute difference about 0.003 of a grey
  level on real photos, 2 at most, and 2-3x faster than Pillow's box resize on one core.

Both then convert and normalise as the original does; tests/test_preprocess.py checks pixels and embeddings.
Any other transform (squash or longest-side resize, extra steps) is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.pixels import CropResize, draft_scale, full_size

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
    that it pickles (the Ray engine ships it).

    The resize computes only the rows and columns up to the crop's far edges, and is given the reference's scale
    (the whole picture's side over its resized side) instead of taking it from the sizes. A JPEG draft
    (``app.pixels.FULL_SIZE_KEY``) is then resized at the whole picture's geometry too: its sides are rounded up
    (a 1282-px side at 1/4 scale gives 321 for 320.5), so resizing the whole draft to the resized size moved the
    64 px model's vectors to cosine 0.996, while with the scale given each output pixel's centre falls where the
    reference puts it (a draft pixel covers ``k`` of the picture's). Pillow's resize of the crop's region
    (``CropResize.crop``), which drafts took before, gives the same pixels within one grey level (0.002 on average
    over 73 drafted photos) in about a third of the time (2.0 ms against 6.5 at 1-4 MP drafts).
    """

    def __init__(self, crop: CenterCropResize, mode: str) -> None:
        self.crop, self.mode = crop, mode
        scale, offset = crop.core.scale_offset()
        self.scale, self.offset = torch.from_numpy(scale), torch.from_numpy(offset)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode not in ("RGB", "L"):
            return self.crop.fallback(image)
        if image.mode == "L":
            image = image.convert("RGB")
        width, height = full_size(image)
        k = draft_scale((width, height), image.size)
        s = self.crop.size
        new_w, new_h, left, top = self.crop.core.resized(width, height)
        # np.array, not asarray: Pillow hands over read-only bytes, which torch warns about
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # channels-last
        if (new_w, new_h) != image.size:
            resized = _resize_to_scale(pixels, (top + s, left + s), (new_h * k / height, new_w * k / width), self.mode)
            if resized is None:  # a torch without the operator: Pillow's resize of the crop's region
                return self.crop(image)
            pixels = resized
        crop = pixels[0, :, top : top + s, left : left + s].to(torch.float32)
        return torch.addcmul(self.offset, crop, self.scale).contiguous()


def _resize_to_scale(
    pixels: torch.Tensor, size: tuple[int, int], scales: tuple[float, float], mode: str
) -> torch.Tensor | None:
    """The first ``size`` (rows, columns) of ``pixels`` (uint8, 1x3xHxW) resized by ``scales`` (output over input
    per axis) with torch's antialiased filter: ``F.interpolate`` takes either a size or a scale, the operator under
    it both. None where this torch lacks the operator."""
    op = getattr(torch.ops.aten, f"_upsample_{mode}2d_aa", None)
    if op is None:
        return None
    # torch skips an axis whose output size is its input size whatever the scale: one more row or column then
    rows, columns = (
        n + (n == have and scale != 1.0) for n, have, scale in zip(size, pixels.shape[2:], scales, strict=True)
    )
    return op.default(pixels, [rows, columns], False, scales[0], scales[1])


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
