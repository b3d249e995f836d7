"""Pillow's Lanczos resize of grey ("L") images, bit for bit, as float64 matrix products (BLAS).

Why it exists: hashing shrinks every photo to 32x32 (pHash) and 9x8 (dHash) with ``Image.resize(size, LANCZOS)``,
and Pillow resamples in a scalar C loop: 1.2-1.5 ms per shrink of a 640x426 photo, most of the cost of hashing. The
same work as BLAS matrix products (two shrinks sharing one product) takes about half the time.

Why it is exact: Pillow's 8-bit resampler multiplies uint8 pixels by integer fixed-point coefficients and sums the
products in an int accumulator. Here the same integers are multiplied and summed in float64: every product and
partial sum is an integer below 2**53, so float64 holds it exactly and the sums are the same in every bit whatever
order BLAS adds in. The coefficients are Pillow's integers (``_windows``); window bounds, rounding, clipping, the
uint8 intermediate, the order of the passes and the skipped passes follow ``src/libImaging/Resample.c``. At first
use ``pillow_pass_order`` checks on noise images that the installed Pillow gives exactly these pixels, and
``lanczos_resize`` falls back to Pillow where it does not (and for other modes, empty or very large images).

Two ways to run a pass, the same integers either way: where numpy's BLAS runs on one thread (``single_threaded_blas``,
which the indexer, the local-features step and the look-up service ask for), one dense product per pass, a few
large calls that leave the GIL to the other threads; elsewhere blocked products, each small enough for OpenBLAS
to keep on the calling thread.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height), as PIL takes it
PassOrder = Literal["pillow13", "horizontal-first"]

# Pillow's 8-bit passes keep 32 - 8 - 2 fraction bits in a coefficient (8 bits for the pixel, 2 for the overshoot
# of the negative lobes); the accumulator starts at one half, so the shift right by 22 rounds.
_PRECISION_BITS = 32 - 8 - 2
_ONE = float(1 << _PRECISION_BITS)
_HALF = float(1 << (_PRECISION_BITS - 1))
_SUPPORT = 3.0  # Lanczos-3
# A fixed-point coefficient computed here is within 3e-9 of Pillow's unrounded one (measured on ~250k windows: the
# float64 rounding errors of a few operations on values <= 2**22); one this close to halfway between two integers
# could still round the other way, so its window is recomputed the way the C code computes it (about 1 in 4,000).
_ROUNDING_GUARD = 1e-6
# The coefficients and the float64 copy of the image grow with the side; bigger images go to Pillow (hashing caps
# the side at 1024).
_MAX_SIDE = 4096
# OpenBLAS (numpy's BLAS) runs a product of m*k*n multiply-adds at most this many on the calling thread, a bigger
# one on up to all cores (interface/gemm.c). Its threads fight the indexer's decode threads and the model for the
# cores (measured on 2 cores with one product per photo: two threads hashing took 1.8 ms a photo instead of 1.1,
# and a torch model beside them got half the throughput), so a pass is cut into products this small.
_SINGLE_THREAD_PRODUCT = 1 << 18
# Inputs per block of a pass: each block multiplies only the outputs whose windows reach into it (a 32-wide
# shrink of 640 pixels: 13 of 32), and products of 128 inputs keep BLAS about as fast as one big product.
_BLOCK_DEPTH = 128


def _window_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output: first input, number of inputs, Pillow's fixed-point coefficients (out, ksize; zero past the
    window) and whether one of them lies within ``_ROUNDING_GUARD`` of a rounding tie.

    The bounds are computed as Pillow computes them (``precompute_coeffs``); the weights with one np.sin per tap
    (sinc(x) * sinc(x/3) = s^2 (3 - 4 s^2) / (3 t^2), t = pi x / 3, s = sin t), which is as accurate as the C
    code's two sin calls but not always the same in the last bits: hence the guard.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = math.ceil(support) * 2 + 1
    centers = (np.arange(out_size) + 0.5) * scale
    # C's (int) cast truncates; a negative start is clamped to 0 either way
    first = np.maximum(np.trunc(centers - support + 0.5), 0.0)
    count = np.minimum(np.trunc(centers + support + 0.5), float(in_size)) - first
    taps = np.arange(ksize, dtype=np.float64)
    x = first[:, None] + taps
    x -= centers[:, None]
    x += 0.5
    x *= 1.0 / filterscale
    t = x * (math.pi / 3.0)
    s2 = np.sin(t)
    s2 *= s2
    weights = 3.0 - 4.0 * s2
    weights *= s2
    t *= t
    t *= 3.0
    with np.errstate(invalid="ignore", divide="ignore"):
        weights /= t
    weights[x == 0.0] = 1.0
    weights[(taps >= count[:, None]) | (np.abs(x) > _SUPPORT) | (x == _SUPPORT)] = 0.0  # outside [-3, 3)
    weights *= _ONE / weights.sum(axis=1, keepdims=True)
    fixed = np.rint(weights)
    weights -= fixed
    near_tie = (np.abs(weights) > 0.5 - _ROUNDING_GUARD).any(axis=1)
    return first.astype(np.intp), count.astype(np.intp), fixed, near_tie


def _c_sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _c_window(in_size: int, out_size: int, index: int) -> tuple[int, list[int]]:
    """One output's first input and fixed-point coefficients, step for step as Resample.c computes them (Python
    floats are C doubles and math.sin is the C library's sin)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    center = (index + 0.5) * scale
    first = max(int(center - support + 0.5), 0)
    count = min(int(center + support + 0.5), in_size) - first
    weights = []
    for tap in range(count):
        x = (tap + first - center + 0.5) * (1.0 / filterscale)
        weights.append(_c_sinc(x) * _c_sinc(x / 3) if -_SUPPORT <= x < _SUPPORT else 0.0)
    total = 0.0
    for weight in weights:  # in order: np.sum would add pairwise
        total += weight
    if total != 0.0:
        weights = [weight / total for weight in weights]
    return first, [int(-0.5 + w * _ONE) if w < 0 else int(0.5 + w * _ONE) for w in weights]


def _windows(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's windows from ``in_size`` pixels to ``out_size``: each output's first input and number of inputs,
    and its fixed-point coefficients (out_size, ksize; zero past the window)."""
    first, count, fixed, near_tie = _window_coefficients(in_size, out_size)
    for index in np.flatnonzero(near_tie).tolist():
        _, exact = _c_window(in_size, out_size, index)
        fixed[index] = 0.0
        fixed[index, : len(exact)] = exact
    return first, count, fixed


@dataclass(frozen=True)
class _Pass:
    """A resampling pass along one axis as blocks of ``_BLOCK_DEPTH`` inputs, each holding the coefficients of only
    the outputs whose windows reach into it: row ``column + k`` of block ``b`` holds output ``output + k``'s
    coefficients for inputs ``b * depth ...``, for each ``(output, column, count)`` of ``spans[b]`` (zeros after)."""

    blocks: np.ndarray  # (blocks, width, depth) float64: block b's columns as rows
    spans: tuple[tuple[tuple[int, int, int], ...], ...]
    outputs: int


@functools.lru_cache(maxsize=256)
def _pass(in_size: int, out_sizes: tuple[int, ...]) -> _Pass:
    """The pass from ``in_size`` pixels to each of ``out_sizes`` side by side (cached, as photos share sizes: the
    pass of a 640-pixel side to 32 and 9 takes 100 kB)."""
    windows = [_windows(in_size, out_size) for out_size in out_sizes]
    depth = min(in_size, _BLOCK_DEPTH)
    count = -(-in_size // depth)
    block_starts = np.arange(count) * depth
    outputs = sum(out_sizes)
    ksize = max(fixed.shape[1] for _, _, fixed in windows)
    # each output's coefficients with `depth` zeros either side; the last row, all zeros, fills unused columns
    taps = np.zeros((outputs + 1, depth + ksize + depth), dtype=np.float64)
    firsts = np.zeros(outputs + 1, dtype=np.intp)
    spans: list[list[tuple[int, int, int]]] = [[] for _ in range(count)]
    offset = 0
    for first, inputs, fixed in windows:
        taps[offset : offset + len(first), depth : depth + fixed.shape[1]] = fixed
        firsts[offset : offset + len(first)] = first
        # windows move right with their output: the outputs reaching into a block are a range
        lows = np.searchsorted(first + inputs, block_starts, side="right").tolist()
        highs = np.searchsorted(first, block_starts + depth, side="left").tolist()
        for b, (low, high) in enumerate(zip(lows, highs, strict=True)):
            if high > low:
                spans[b].append((offset + low, sum(n for _, _, n in spans[b]), high - low))
        offset += len(first)
    columns = np.full((count, max(1, *(sum(n for _, _, n in block) for block in spans))), outputs)
    for b, block in enumerate(spans):
        for output, column, n in block:
            columns[b, column : column + n] = np.arange(output, output + n)
    # blocks[b, j, i]: coefficient of input b * depth + i for output o = columns[b, j], taps[o, depth + that - first]
    inputs_at = block_starts[:, None, None] + np.arange(depth)
    at = np.clip(depth + inputs_at - firsts[columns][:, :, None], 0, taps.shape[1] - 1)  # clips the zero row only
    blocks = taps[columns[:, :, None], at]
    blocks.flags.writeable = False
    return _Pass(blocks, tuple(tuple(block) for block in spans), outputs)


def _apply(resampling: _Pass, lines: np.ndarray) -> np.ndarray:
    """Each row of ``lines`` (pixel values, any dtype) resampled: (outputs, rows) float64 sums of products, so the
    result of a pass is the next pass's ``lines``.

    One batched matmul of (blocks of inputs, rows) tiles that each run on the calling thread; the partial sums of
    the blocks are integers below 2**53, so adding them up is exact too.
    """
    rows, in_size = lines.shape
    count, width, depth = resampling.blocks.shape
    stacks = -(-rows // max(1, _SINGLE_THREAD_PRODUCT // (depth * width)))
    height = -(-rows // stacks)  # rows per tile, as few padding rows as can be
    padded = np.zeros((stacks * height, count * depth), dtype=np.float64)
    padded[:rows, :in_size] = lines
    tiles = padded.reshape(stacks, height, count, depth).transpose(2, 0, 3, 1)  # (count, stacks, depth, height)
    products = resampling.blocks[:, None] @ tiles  # (count, stacks, width, height)
    sums = np.zeros((resampling.outputs, stacks, height), dtype=np.float64)
    for block, spans in zip(products, resampling.spans, strict=True):
        for output, column, n in spans:
            sums[output : output + n] += block[:, column : column + n].transpose(1, 0, 2)
    return sums.reshape(resampling.outputs, stacks * height)[:, :rows]


def _to_pixels(acc: np.ndarray) -> np.ndarray:
    """Accumulated products -> 0..255 (float64, the next pass's input): (1/2 + acc) >> 22, clipped to 0..255."""
    acc += _HALF
    acc *= 1.0 / _ONE
    np.floor(acc, out=acc)
    return np.clip(acc, 0.0, 255.0, out=acc)


def _vertical_first(order: PassOrder, in_size: Size, size: Size) -> bool:
    """Whether Pillow runs the vertical pass before the horizontal one (when both are needed).

    Pillow 13 (python-pillow/Pillow#9549) starts with the vertical pass when the height loses more than twice as
    many pixels as the width does; this rule was found by probing Pillow 13.0 (thousands of random shapes, both
    sides of the boundary) and ``pillow_pass_order`` checks it again at first use. Earlier Pillows always start
    with the horizontal pass.
    """
    (in_w, in_h), (out_w, out_h) = in_size, size
    return order == "pillow13" and out_h < in_h and in_h - out_h > 2 * (in_w - out_w)


@functools.lru_cache(maxsize=256)
def _dense(in_size: int, out_sizes: tuple[int, ...]) -> np.ndarray:
    """The passes from ``in_size`` pixels to each of ``out_sizes``, stacked: (sum(out_sizes), in_size) float64 of
    Pillow's fixed-point coefficients (cached: a 640-pixel side to 32 and 9 takes 210 kB)."""
    matrix = np.concatenate([lanczos_matrix(in_size, out_size) for out_size in out_sizes])
    matrix.flags.writeable = False
    return matrix


def _apply_dense(in_size: int, out_sizes: tuple[int, ...], lines: np.ndarray) -> np.ndarray:
    """``_apply`` as one product: (outputs, rows) sums for ``lines`` (rows, in_size). Every partial sum is an
    integer below 2**53 (as in the blocked products), so the result is the same in every bit."""
    return _dense(in_size, out_sizes) @ np.asarray(lines, dtype=np.float64).T


def _apply_blocked(in_size: int, out_sizes: tuple[int, ...], lines: np.ndarray) -> np.ndarray:
    return _apply(_pass(in_size, out_sizes), lines)


_blas_lock = threading.Lock()
_blas_single = [False]  # numpy's BLAS was set to one thread by single_threaded_blas (guarded by _blas_lock)


def single_threaded_blas() -> bool:
    """Run numpy's own BLAS on one thread for the rest of this process, so that the hashes' passes can be one dense
    product each (``resize_pixels``); True when it does (then or before), False where it cannot be set (no
    threadpoolctl, or a BLAS it does not know). FAISS's and torch's libraries keep their threads.

    For processes that hash photos on several threads beside a model (the indexer's lanes, the local-features step,
    the look-up service's pool): there OpenBLAS's own threads took the cores from the model (a 64 px model's
    indexing ran 215 img/s with dense passes on two-thread BLAS, 308 with the blocked passes, 330 with dense passes
    on one-thread BLAS; docs/PERFORMANCE.md, session 16), and numpy's other products in this project are small."""
    with _blas_lock:
        if _blas_single[0]:
            return True
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - a dependency; kept optional for library users
            return False
        package = Path(np.__file__).parent
        libraries = [
            lib
            for lib in ThreadpoolController().lib_controllers
            if lib.user_api == "blas" and Path(lib.filepath).parent.name in (package.name + ".libs", package.name)
        ]
        for lib in libraries:
            lib.set_num_threads(1)
        _blas_single[0] = bool(libraries) and all(lib.get_num_threads() == 1 for lib in libraries)
        if _blas_single[0]:
            logger.debug("numpy's BLAS on one thread: %s", ", ".join(lib.filepath for lib in libraries))
        return _blas_single[0]


def resize_pixels(
    pixels: np.ndarray, sizes: Sequence[Size], order: PassOrder = "pillow13", *, dense: bool | None = None
) -> list[np.ndarray]:
    """Pillow's LANCZOS resize of a (height, width) uint8 grey array to each of ``sizes`` (width, height).

    Always computed here (``lanczos_resize`` is the entry that checks that Pillow agrees). A pass is skipped where
    its side does not change, as Pillow does; the first passes of all sizes that start on the same axis are one
    product (the 32- and 9-wide shrinks of hashing share theirs). Vertical passes resample the columns of the
    transposed image: every pass is rows of pixels times coefficients. ``dense``: one product per pass (default:
    where ``single_threaded_blas`` has been set) or blocked products; the same pixels.
    """
    apply = _apply_dense if (_blas_single[0] if dense is None else dense) else _apply_blocked
    in_h, in_w = pixels.shape
    out: dict[int, np.ndarray] = {}
    horizontal_first: list[int] = []
    vertical_first: list[int] = []
    for i, (w, h) in enumerate(sizes):
        if w == in_w and h == in_h:
            out[i] = pixels.copy()
        elif h == in_h or (w != in_w and not _vertical_first(order, (in_w, in_h), (w, h))):
            horizontal_first.append(i)
        else:
            vertical_first.append(i)
    if horizontal_first:
        widths = tuple(sizes[i][0] for i in horizontal_first)
        passed = _to_pixels(apply(in_w, widths, pixels))  # (sum(widths), in_h): the columns of each size
        for i, start in zip(horizontal_first, np.cumsum((0, *widths[:-1])).tolist(), strict=True):
            w, h = sizes[i]
            columns = passed[start : start + w]
            out[i] = columns.T if h == in_h else _to_pixels(apply(in_h, (h,), columns))
    if vertical_first:
        heights = tuple(sizes[i][1] for i in vertical_first)
        passed = _to_pixels(apply(in_h, heights, pixels.T))  # (sum(heights), in_w): the rows of each size
        for i, start in zip(vertical_first, np.cumsum((0, *heights[:-1])).tolist(), strict=True):
            w, h = sizes[i]
            rows = passed[start : start + h]
            out[i] = rows if w == in_w else _to_pixels(apply(in_w, (w,), rows)).T
    return [np.ascontiguousarray(out[i], dtype=np.uint8) for i in range(len(sizes))]


@functools.cache
def pillow_pass_order() -> PassOrder | None:
    """The pass-order rule of the installed Pillow, checked on noise images (where the two orders differ in most
    pixels); None when ``resize_pixels`` does not match Pillow with either (``lanczos_resize`` then uses Pillow)."""
    rng = np.random.default_rng(0)
    # shrinking, enlarging, both; and the two sides of the pillow13 rule (91 - 70 > 2 * (50 - 40) = 90 - 70)
    cases = [
        ((120, 40), (20, 30)),
        ((40, 120), (30, 20)),
        ((30, 100), (45, 60)),
        ((100, 30), (60, 45)),
        ((50, 90), (40, 70)),
        ((50, 91), (40, 70)),
        ((64, 101), (32, 32)),
        ((7, 5), (9, 8)),
    ]
    images = [rng.integers(0, 256, (h, w), dtype=np.uint8) for (w, h), _ in cases]
    expected = [
        np.asarray(Image.fromarray(a).resize(size, Image.Resampling.LANCZOS))
        for a, (_, size) in zip(images, cases, strict=True)
    ]
    orders: tuple[PassOrder, ...] = ("pillow13", "horizontal-first")
    for order in orders:
        got = [resize_pixels(a, [size], order)[0] for a, (_, size) in zip(images, cases, strict=True)]
        if all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True)):
            return order
    logger.warning("Pillow's Lanczos resize differs from app.dupes.resample's: hashes are computed with Pillow's")
    return None


def lanczos_resize(image: Image.Image, sizes: Sequence[Size]) -> list[np.ndarray]:
    """``np.asarray(image.resize(size, Image.Resampling.LANCZOS))`` for each of ``sizes``: the same pixels, faster
    for a grey ("L") image; any other image, or a Pillow that does not match, is resized by Pillow."""
    order = pillow_pass_order()
    fits = min(image.size) > 0 and max(image.size) <= _MAX_SIDE and all(min(size) > 0 for size in sizes)
    if order is None or image.mode != "L" or not fits:
        return [np.asarray(image.resize(size, Image.Resampling.LANCZOS)) for size in sizes]
    return resize_pixels(np.asarray(image), sizes, order)


def lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's Lanczos pass from ``in_size`` pixels to ``out_size`` as a dense (out_size, in_size) float64 matrix
    of its fixed-point integer coefficients: ``rounded(matrix @ line)`` is Pillow's pass of one line (see
    ``round_pass``). For other array libraries (the indexer's device hashing); ``resize_pixels`` uses the blocked
    form."""
    first, count, fixed = _windows(in_size, out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for row, (start, n) in enumerate(zip(first.tolist(), count.tolist(), strict=True)):
        matrix[row, start : start + n] = fixed[row, :n]
    return matrix


#: a pass's sums become pixels as ``clip(floor((sums + PASS_HALF) / PASS_ONE), 0, 255)`` (``_to_pixels``)
PASS_HALF, PASS_ONE = _HALF, _ONE


def vertical_pass_first(in_size: Size, size: Size) -> bool:
    """Whether the installed Pillow resamples ``in_size`` to ``size`` (both (width, height)) starting with the
    vertical pass (see ``_vertical_first``; with a Pillow that ``resize_pixels`` does not match, Pillow 13's rule)."""
    return _vertical_first(pillow_pass_order() or "pillow13", in_size, size)
