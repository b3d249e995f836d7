"""The indexer's second decoding lane: JPEGs decoded in batches on the model's device, with torchvision's
``decode_jpeg`` (nvjpeg on a GPU), then the model's crop resize, normalisation and the perceptual hashes there too.

Why: on a GPU host the model embeds tens of thousands of photos a second and the CPU threads that decode with Pillow
cannot keep up (the brief's H100 figures: nvjpeg decodes 0.3 MP photos at 13k/s, 16 Pillow processes at 3.7k/s).
The CPU threads still read every file and take its sha256; a JPEG then goes to this lane while its queue has room,
and is otherwise prepared on the CPU as before, so both lanes feed the model (``Indexer._prepared_stream``).

What it computes, against the CPU lane (``pipeline.prepare_bytes``):
- the model input: the reference's geometry (shorter side to the model size over the whole picture, centre crop) with
  torch's antialiased resize in float, one pass per axis, each rounded and clipped to 8-bit levels as Pillow's;
  the whole picture is decoded (nvjpeg has no draft mode), which is closer to the reference than the CPU lane's
  draft decoding of large photos;
- the four perceptual hashes, with Pillow's own integer arithmetic for the grey conversion and the Lanczos shrinks
  (``app.dupes.resample.lanczos_matrix``, float64 products whose sums are exact integers), so a photo the CPU lane
  decodes at full size gets the same bits up to the decoders' rounding; photos over 1,024 px are box-reduced first,
  as the CPU lane does (which decodes those in draft mode, so their bits may differ by a few);
- EXIF orientation applied from the header (nvjpeg does not read it), width, height and format from the header.
A file the lane cannot take (not a baseline or progressive JPEG in RGB, YCbCr or grey; a header or decode error)
is handed back to the CPU lane, which then gives the same result or the same error message as without this lane.
tests/test_device_jpeg.py checks pixels, vectors and hashes against the CPU lane on real photos (on the CPU device).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from app.dupes.hashing import DHASH_INPUT, HASH_FIELDS, HASH_INPUT_MAX_SIDE, HASH_SIZE, PHASH_INPUT
from app.dupes.resample import PASS_HALF, PASS_ONE, lanczos_matrix, vertical_pass_first
from app.errors import UnsupportedImage
from app.imaging import exif_orientation, open_checked
from app.preprocess import TorchCropResize
from indexer.walk import FileInfo

log = logging.getLogger(__name__)

#: torchvision 0.29 warns at every call that its image decoders are deprecated in favour of TorchCodec; filtered once
#: here, as warnings.catch_warnings around each call is not thread-safe (the decode threads use it too)
TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
warnings.filterwarnings("ignore", message=TORCHVISION_DEPRECATION, category=DeprecationWarning)

JPEG_MAGIC = b"\xff\xd8\xff"
# Pillow's RGB -> L conversion: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16 (ITU-R 601-2 luma, 16-bit fixed)
_LUMA = (19595, 38470, 7471)
_MODES = frozenset({"RGB", "L", "YCbCr"})
# photos of one size are resized and hashed together, at most this many 8-bit values at a time (~270 MB as float32)
_GROUP_VALUES = 1 << 26


@dataclass
class LaneItem:
    """A file the CPU lane has read and checksummed, waiting for the device lane."""

    info: FileInfo
    data: bytes
    sha256: str
    hash_only: bool = False


@dataclass
class LaneResult:
    """What the device lane made of an item: pixels on the device (None for hash-only items) and hashes, or None
    when the CPU lane must prepare the file instead."""

    item: LaneItem
    pixels: torch.Tensor | None = None
    hashes: dict[str, int] | None = None
    width: int = 0
    height: int = 0
    format: str = "JPEG"
    handed_back: bool = False


@dataclass(frozen=True)
class _Header:
    width: int  # upright, after EXIF orientation
    height: int
    orientation: int | None
    format: str


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


class DeviceJpegLane:
    """Prepares batches of JPEG files on ``device`` for a model whose indexing transform is ``transform``."""

    def __init__(self, transform: TorchCropResize, device: torch.device | str, max_pixels: int) -> None:
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.size = transform.crop.size
        self.core = transform.crop.core
        self.mode = transform.mode
        self.scale = transform.scale.to(self.device)
        self.offset = transform.offset.to(self.device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.prepared = 0  # files prepared here, and files handed back to the CPU lane (for logs and benchmarks)
        self.handed_back = 0

    @classmethod
    def for_transform(cls, transform: object, device: torch.device | str, max_pixels: int) -> DeviceJpegLane | None:
        """The lane for the indexer's transform, or None when that transform is not the standard resize + crop
        (``app.preprocess.indexing_transform`` returns it unchanged then), which only the CPU lane reproduces."""
        if not isinstance(transform, TorchCropResize):
            return None
        return cls(transform, device, max_pixels)

    def prepare(self, items: list[LaneItem]) -> list[LaneResult]:
        """One result per item, in order. Never raises for a bad file: it is handed back to the CPU lane.

        On a GPU the work runs on the lane's own CUDA stream, beside the model's; it is complete when this returns
        (the hashes' transfer to the host waits for it), so the model can take the pixels on its stream."""
        if self._stream is None:
            return self._prepare(items)
        with torch.cuda.stream(self._stream):
            return self._prepare(items)

    def _prepare(self, items: list[LaneItem]) -> list[LaneResult]:
        """Photos of one size (most of a camera's) are resized and hashed together, a group per set of tensor
        operations, as each operation on a GPU costs a launch whatever its size."""
        results = [LaneResult(item, handed_back=True) for item in items]
        headers = [self._header(item) for item in items]
        todo = [i for i, header in enumerate(headers) if header is not None]
        sizes: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for i, image in zip(todo, self._decode([items[i].data for i in todo]), strict=True):
            header = headers[i]
            if image is None or header is None:
                continue
            image = _upright(image, header.orientation)
            result = results[i]
            result.handed_back, result.width, result.height = False, header.width, header.height
            result.format = header.format
            sizes.setdefault((image.shape[-2], image.shape[-1]), []).append((i, image))
        hashed: list[int] = []
        bits: list[torch.Tensor] = []
        for (height, width), group in sizes.items():
            per_chunk = max(1, _GROUP_VALUES // (3 * height * width))
            for start in range(0, len(group), per_chunk):
                chunk = group[start : start + per_chunk]
                images = torch.stack([image for _, image in chunk])
                embed = [k for k, (i, _) in enumerate(chunk) if not items[i].hash_only]
                if embed:
                    pixels = self._model_input(images[embed] if len(embed) < len(chunk) else images)
                    for k, row in zip(embed, pixels, strict=True):
                        results[chunk[k][0]].pixels = row
                hashed += [i for i, _ in chunk]
                bits.append(hash_bits(images))
        self.handed_back += sum(r.handed_back for r in results)
        self.prepared += len(results) - sum(r.handed_back for r in results)
        if hashed:  # the bits of the whole batch in one transfer
            for i, rows in zip(hashed, torch.cat(bits).cpu().numpy(), strict=True):
                results[i].hashes = {
                    name: int.from_bytes(np.packbits(row).tobytes(), "big")
                    for name, row in zip(HASH_FIELDS, rows, strict=True)
                }
        return results

    # --- steps ---------------------------------------------------------------------------------------------------

    def _header(self, item: LaneItem) -> _Header | None:
        """The upright size and EXIF orientation, or None for a file the CPU lane must take (not a JPEG it can
        decode here, or any problem: the CPU lane then reports it)."""
        if not is_jpeg(item.data):
            return None
        try:
            img, fmt = open_checked(item.data, max_pixels=self.max_pixels)
        except UnsupportedImage:
            return None
        if fmt not in ("JPEG", "MPO") or img.mode not in _MODES:
            return None  # CMYK / YCCK: Pillow's colour conversion (MPO: a JPEG whose first picture both decode)
        width, height = img.size
        orientation = exif_orientation(img)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        return _Header(width, height, orientation, fmt)

    def _decode(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """(3, H, W) uint8 images on the device; None where a file does not decode (the whole batch is retried one
        by one after a failure, as torchvision returns nothing for a batch with one bad file)."""
        if not blobs:
            return []
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for tensor in tensors:
                try:
                    out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as exc:
                    log.debug("device lane hands back a JPEG it cannot decode: %s", exc)
                    out.append(None)
            return out

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float32 normalised pixels of (N, 3, H, W) uint8 images: the reference geometry, 8-bit
        levels, the model's mean and std."""
        s = self.size
        height, width = images.shape[-2:]
        new_w, new_h, left, top = self.core.resized(width, height)
        pixels = images.to(torch.float32)
        # two passes, each rounded and clipped to 8-bit levels as Pillow's (and torch's uint8) resize does: the
        # horizontal one first. One 2-D float pass keeps the bicubic overshoot between passes (up to 14 levels
        # off torch's uint8 resize at sharp edges, mean 0.14); two passes: at most 2, mean 0.003.
        for size in ((height, new_w), (new_h, new_w)):
            if size != tuple(pixels.shape[-2:]):
                pixels = F.interpolate(pixels, size=size, mode=self.mode, antialias=True).round_().clamp_(0.0, 255.0)
        crop = pixels[:, :, top : top + s, left : left + s]
        return torch.addcmul(self.offset, crop, self.scale).contiguous()


def _upright(image: torch.Tensor, orientation: int | None) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) image as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")`` of (..., 3, H, W) uint8 RGB images, bit for bit: (..., H, W) int32."""
    red, green, blue = images.to(torch.int32).unbind(-3)
    return (red * _LUMA[0] + green * _LUMA[1] + blue * _LUMA[2] + 0x8000) >> 16


def _hash_input(grey: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float64 grey levels, box-reduced by a whole factor when the longest side is over 1,024 px."""
    longest = max(grey.shape[-2:])
    levels = grey.to(torch.float64)
    if longest > HASH_INPUT_MAX_SIDE:
        factor = -(-longest // HASH_INPUT_MAX_SIDE)
        mean = F.avg_pool2d(levels[:, None], factor, ceil_mode=True, count_include_pad=False)[:, 0]
        levels = torch.floor(mean + 0.5)
    return levels


@functools.lru_cache(maxsize=512)
def _matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(lanczos_matrix(in_size, out_size)).to(device)


def _pass_pixels(sums: torch.Tensor) -> torch.Tensor:
    return torch.floor((sums + PASS_HALF) / PASS_ONE).clamp_(0.0, 255.0)


def lanczos(levels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's LANCZOS resize of (..., H, W) float64 grey levels to (..., height, width), bit for bit (passes in
    Pillow's order; a side that does not change is not resampled)."""
    in_h, in_w = levels.shape[-2:]
    device = levels.device

    def horizontal(x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-1] == width else _pass_pixels(x @ _matrix(x.shape[-1], width, device).T)

    def vertical(x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-2] == height else _pass_pixels(_matrix(x.shape[-2], height, device) @ x)

    if vertical_pass_first((in_w, in_h), (width, height)) and in_w != width:
        return horizontal(vertical(levels))
    return vertical(horizontal(levels))


@functools.lru_cache(maxsize=8)
def _dct_matrix(size: int, device: torch.device) -> torch.Tensor:
    """scipy.fftpack.dct's type II, unnormalised: y[k] = 2 sum_n x[n] cos(pi k (2n + 1) / 2N), as a matrix."""
    n = torch.arange(size, dtype=torch.float64)
    return (2.0 * torch.cos(math.pi * n[:, None] * (2.0 * n[None, :] + 1.0) / (2.0 * size))).to(device)


def _phash_bits(small: torch.Tensor) -> torch.Tensor:
    dct = _dct_matrix(small.shape[-1], small.device)
    low = (dct @ small @ dct.T)[..., :HASH_SIZE, :HASH_SIZE].flatten(-2)
    ranked = low.sort(dim=-1).values
    median = (ranked[..., 31:32] + ranked[..., 32:33]) / 2.0  # numpy's median of 64 values
    return low > median


def _dhash_bits(small: torch.Tensor) -> torch.Tensor:
    return (small[..., :, 1:] > small[..., :, :-1]).flatten(-2)


def hash_bits(images: torch.Tensor) -> torch.Tensor:
    """(N, 4, 64) bool: pHash, dHash, and both of the mirror image (``HASH_FIELDS`` order), of (N, 3, H, W) upright
    uint8 RGB images."""
    levels = _hash_input(grey_levels(images))
    small_p = lanczos(levels, *PHASH_INPUT)
    small_d = lanczos(levels, *DHASH_INPUT)
    return torch.stack(
        [_phash_bits(small_p), _dhash_bits(small_d), _phash_bits(small_p.flip(-1)), _dhash_bits(small_d.flip(-1))],
        dim=1,
    )
