"""app.dupes.resample (Pillow's Lanczos shrink as matrix products) and the hashes built on it: the same bits as
Pillow and imagehash, on real photos and on the shapes where an off-by-one would show."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps

from app.dupes import ImageHashes, resample
from app.dupes.hashing import _hash_input, _to_int
from app.dupes.resample import lanczos_resize, pillow_pass_order, resize_pixels

HASH_SIZES = [(32, 32), (9, 8)]
# sizes whose windows hit the image edges, a single pixel, enlarging, or a side kept as it is
ODD_SIZES = [(33, 7), (31, 7), (1, 1), (2, 1), (1, 40), (64, 3)]
# crops (width, height) of a photo: thin, tiny, and tall enough that Pillow 13 starts with the vertical pass
ODD_CROPS = [(33, 1000), (1000, 33), (9, 8), (31, 7), (1, 1), (2, 30), (30, 2), (70, 400), (400, 70)]


def _pillow(grey: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(grey.resize(size, Image.Resampling.LANCZOS))


def _grey(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("L")


def _photos(shared_data: Path, coco: int, samples: int, caltech: int, offset: int = 0) -> list[Path]:
    """A fixed mix of real photos: the first of COCO and the samples, and Caltech-101 photos spread over classes."""
    caltech_all = sorted((shared_data / "caltech101").glob("*/*.jpg"))
    return (
        sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))[offset : offset + coco]
        + sorted((shared_data / "photo-samples").glob("*/*.jpg"))[offset : offset + samples]
        + caltech_all[offset :: max(1, len(caltech_all) // caltech)][:caltech]
    )


@pytest.fixture(scope="module")
def pass_order() -> resample.PassOrder:
    order = pillow_pass_order()
    # otherwise lanczos_resize falls back to Pillow and the tests below would compare Pillow with itself
    assert order is not None, "Pillow's Lanczos resize no longer matches app.dupes.resample"
    return order


def _odd_crop(grey: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A crop of ``size`` from the photo's centre, stretched from a smaller one where the photo is smaller."""
    w, h = min(size[0], grey.width), min(size[1], grey.height)
    left, top = (grey.width - w) // 2, (grey.height - h) // 2
    crop = grey.crop((left, top, left + w, top + h))
    return crop if crop.size == size else crop.resize(size, Image.Resampling.NEAREST)


@pytest.mark.parametrize("dense", [False, True], ids=["blocked", "dense"])
def test_shrinks_are_pillows_pixels_on_300_real_photos(
    shared_data: Path, pass_order: resample.PassOrder, dense: bool
) -> None:
    photos = _photos(shared_data, coco=40, samples=40, caltech=220)
    assert len(photos) == 300
    for n, path in enumerate(photos):
        grey = _grey(path)
        sizes = HASH_SIZES + (ODD_SIZES if n % 10 == 0 else [])
        for size, got in zip(sizes, resize_pixels(np.asarray(grey), sizes, pass_order, dense=dense), strict=True):
            assert np.array_equal(got, _pillow(grey, size)), (path, size)
        if n % 10 == 1:
            for crop_size in ODD_CROPS:
                crop = _odd_crop(grey, crop_size)
                for size, got in zip(HASH_SIZES, lanczos_resize(crop, HASH_SIZES), strict=True):
                    assert np.array_equal(got, _pillow(crop, size)), (path, crop_size, size)


@pytest.mark.parametrize("dense", [False, True], ids=["blocked", "dense"])
def test_resizes_are_pillows_pixels_for_random_shapes(pass_order: resample.PassOrder, dense: bool) -> None:
    """Noise images, where the two pass orders and any misplaced tap give different pixels: shrinking, enlarging,
    one side kept, several sizes at once, and both sides of the pass-order rule."""
    rng = np.random.default_rng(7)
    pick = random.Random(7)
    shapes = [(pick.randint(1, 300), pick.randint(1, 300)) for _ in range(150)]
    shapes += [(50, 90), (50, 91), (40, 120), (120, 40), (1, 1), (1, 300), (300, 1)]
    for width, height in shapes:
        pixels = rng.integers(0, 256, (height, width), dtype=np.uint8)
        sizes = [*HASH_SIZES, (pick.randint(1, 350), pick.randint(1, 350)), (width, pick.randint(1, 80))]
        sizes += [(pick.randint(1, 80), height), (40, 70)]
        image = Image.fromarray(pixels)
        for size, got in zip(sizes, resize_pixels(pixels, sizes, pass_order, dense=dense), strict=True):
            assert np.array_equal(got, _pillow(image, size)), ((width, height), size)


def test_single_threaded_blas_limits_numpys_blas_only_and_turns_on_dense_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import faiss  # noqa: F401  (its own OpenBLAS, which must keep its threads)
    from threadpoolctl import threadpool_info

    def blas_threads() -> dict[str, int]:
        return {Path(i["filepath"]).parent.name: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    assert "numpy.libs" in before, before  # numpy's wheel bundles OpenBLAS: what the policy is for
    calls: list[str] = []
    for name in ("_apply_dense", "_apply_blocked"):
        original = getattr(resample, name)
        monkeypatch.setattr(resample, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    was_single = resample._blas_single[0]
    monkeypatch.setattr(resample, "_blas_single", [False])
    pixels = np.random.default_rng(3).integers(0, 256, (120, 90), dtype=np.uint8)
    blocked = resize_pixels(pixels, HASH_SIZES)
    assert set(calls) == {"_apply_blocked"}
    try:
        assert resample.single_threaded_blas() is True
        after = blas_threads()
        assert after["numpy.libs"] == 1
        assert {k: v for k, v in after.items() if k != "numpy.libs"} == {
            k: v for k, v in before.items() if k != "numpy.libs"
        }
        calls.clear()
        dense = resize_pixels(pixels, HASH_SIZES)
        assert set(calls) == {"_apply_dense"}
        assert all(np.array_equal(a, b) for a, b in zip(blocked, dense, strict=True))
    finally:  # numpy's BLAS as it was, with the flag monkeypatch restores
        from threadpoolctl import ThreadpoolController

        for lib in ThreadpoolController().lib_controllers:
            if lib.user_api == "blas" and Path(lib.filepath).parent.name == "numpy.libs":
                lib.set_num_threads(1 if was_single else before["numpy.libs"])


def test_coefficients_are_those_the_c_code_computes() -> None:
    """The vectorised coefficients against a step-for-step transcription of Resample.c's (math.sin is the C
    library's sin), including windows whose coefficient lies next to a rounding tie (recomputed the C way)."""
    in_sizes = [1, 2, 3, 7, 31, 32, 33, 64, 97, 255, 300, 427, 640, 1024]
    # (in, out) pairs with a coefficient within the rounding guard of a tie
    near_ties = [
        (i, o)
        for i, o in itertools.product(range(2, 1025, 7), (32, 9, 8))
        if resample._window_coefficients(i, o)[3].any()
    ]
    assert near_ties, "no window next to a rounding tie left to test the guard with"
    for in_size, out_size in [*itertools.product(in_sizes, (32, 9, 8, 1, 5, 50)), *near_ties[:3]]:
        first, inputs, fixed = resample._windows(in_size, out_size)
        for index in range(out_size):
            start, expected = resample._c_window(in_size, out_size, index)
            assert (first[index], inputs[index]) == (start, len(expected)), (in_size, out_size, index)
            assert fixed[index, : len(expected)].tolist() == expected, (in_size, out_size, index)
            assert not fixed[index, len(expected) :].any(), (in_size, out_size, index)


def test_lanczos_resize_hands_what_it_does_not_cover_to_pillow() -> None:
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for size, got in zip(HASH_SIZES, lanczos_resize(rgb, HASH_SIZES), strict=True):
        assert np.array_equal(got, np.asarray(rgb.resize(size, Image.Resampling.LANCZOS)))


def _imagehash_reference(image: Image.Image) -> ImageHashes:
    """What imagehash gives for the (grey, size-capped) photo and for its mirror image, hashed its own way."""
    grey = _hash_input(image)
    mirror = ImageOps.mirror(grey)
    return ImageHashes(
        phash=_to_int(imagehash.phash(grey)),
        dhash=_to_int(imagehash.dhash(grey)),
        phash_mirror=_to_int(imagehash.phash(mirror)),
        dhash_mirror=_to_int(imagehash.dhash(mirror)),
    )


def test_hashes_are_imagehash_of_100_more_photos_and_of_their_mirror(
    shared_data: Path, pass_order: resample.PassOrder
) -> None:
    # other photos than tests/test_dupes.py's (COCO's first 40 and Caltech-101's image_0001 files), but for one
    photos = _photos(shared_data, coco=20, samples=30, caltech=60, offset=40)
    assert len(photos) >= 100
    for path in photos:
        with Image.open(path) as image:
            image.load()
            assert ImageHashes.of(image) == _imagehash_reference(image), path


def test_hashes_are_imagehash_of_degenerate_and_tall_images(shared_data: Path, pass_order: resample.PassOrder) -> None:
    photo = _grey(shared_data / "photo-samples" / "opencv" / "fruits.jpg")
    stripes = np.tile(np.repeat(np.array([0, 0, 255, 255, 7], dtype=np.uint8), 9), (64, 3))
    images = [
        Image.new("L", (640, 480), 128),  # flat: every DCT coefficient but one is 0
        Image.new("RGB", (1, 1), (10, 200, 30)),
        Image.new("L", (2, 300), 40),
        Image.fromarray(np.tile(np.array([[0, 255]], dtype=np.uint8), (300, 1))),  # 2 pixels wide
        Image.fromarray(stripes),  # exactly repeated values
        Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (3, 1))),
        photo.crop((0, 0, 60, photo.height)),  # tall: Pillow 13 runs the vertical pass first
        photo.crop((0, 0, photo.width, 20)),
        photo.resize((2000, 1500)),  # reduced to 1024 before hashing
    ]
    for image in images:
        assert ImageHashes.of(image) == _imagehash_reference(image), image.size
