"""app.preprocess: the single-pass resize + centre crop against open_clip's own transform."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose

from app.encoder import Encoder
from app.imaging import decode_image, model_draft_size
from app.preprocess import CenterCropResize, fast_transform, indexing_transform
from tests.helpers import embedding_fidelity


def _path(fast: CenterCropResize, which: str) -> Callable[[Image.Image], torch.Tensor]:
    """The indexer's torch resize, or the Pillow one that queries use (and, without torch, app.pixels)."""
    if which == "torch":
        indexing = indexing_transform(fast)
        assert indexing is not fast
        return pickle.loads(pickle.dumps(indexing))  # the Ray engine ships it to its workers
    return fast


PATHS = pytest.mark.parametrize("which", ["torch", "pillow"])


def _photos(shared_data: Path, count: int) -> list[Path]:
    coco = sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))
    caltech = sorted((shared_data / "caltech101").glob("*/image_0002.jpg"))
    return (coco[: count // 2] + caltech)[:count]


@PATHS
@pytest.mark.parametrize("size", [224, 64])
def test_same_pixels_as_open_clip_up_to_rounding_at_the_crop_edges(shared_data: Path, size: int, which: str) -> None:
    reference = open_clip.image_transform(size, is_train=False)
    fast = fast_transform(reference)
    assert isinstance(fast, CenterCropResize)
    transform = _path(fast, which)
    mean_diffs = []
    for path in _photos(shared_data, 40):
        image = decode_image(path.read_bytes(), max_pixels=50_000_000).image  # drafts: the test below
        want, got = reference(image), transform(image)
        assert got.shape == want.shape == (3, size, size) and got.dtype == torch.float32
        mean_diffs.append(float((want - got).abs().mean()))
        if which == "torch":  # the reference's own geometry: only the kernels' rounding differs, by 1-2 levels
            assert float((want - got).abs().max()) < 0.04
        else:
            assert float((want - got).abs().max()) < 0.25  # a few edge pixels by a few grey levels, at most
    # in normalised units (one grey level is about 0.015): 0.003 and 0.01 of a grey level on average
    assert np.mean(mean_diffs) < (1e-4 if which == "torch" else 1e-3)


@PATHS
def test_a_drafts_crop_is_the_whole_pictures_crop(shared_data: Path, tmp_path: Path, which: str) -> None:
    """A JPEG decoded at a reduced scale has its sides rounded up (475 rows at 1/2 scale: 238), which changed the
    resized width the reference truncates to (64 px: 85 from 632x475, 84 from 316x238): the crop must still be the
    whole picture's."""
    transform = _path(fast_transform(open_clip.image_transform(64, is_train=False)), which)
    diffs = []
    for i, source in enumerate(sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))[:40]):
        with Image.open(source) as im:
            odd = im.convert("RGB").crop((0, 0, min(im.width, 633) - i % 3, min(im.height, 475) - i % 2))
        if min(odd.size) < 2 * 192:
            continue  # not drafted
        odd.save(tmp_path / "odd.jpg", quality=90)
        data = (tmp_path / "odd.jpg").read_bytes()
        full = decode_image(data, max_pixels=10**8).image
        draft = decode_image(data, max_pixels=10**8, draft_size=192).image
        assert draft.width * 2 - full.width in (0, 1) and draft.height * 2 - full.height in (0, 1)
        diffs.append(float((transform(draft) - transform(full)).abs().mean()))
    # what is left is the draft's own decoding (libjpeg's scaled IDCT): about one grey level (0.015) on average
    assert len(diffs) >= 20 and max(diffs) < 0.04, diffs


@pytest.mark.parametrize("size", [224, 64])
def test_torch_resizes_a_draft_as_pillow_resizes_its_crop_region(shared_data: Path, size: int) -> None:
    """Drafted camera-size photos: the indexer's torch resize of the whole draft at the picture's scale against
    Pillow's resize of the crop's region in the draft (what drafts took before), within one grey level."""
    fast = fast_transform(open_clip.image_transform(size, is_train=False))
    assert isinstance(fast, CenterCropResize)
    indexing = indexing_transform(fast)
    scale, offset = fast.core.scale_offset()
    drafted, mean_diffs = 0, []
    for source in sorted((shared_data / "photo-samples").glob("*/*.jpg"))[:12]:
        with Image.open(source) as im:
            im = im.convert("RGB")
            for factor in (2.3, 4.1):  # about 1.3-8 MP, odd sides: the draft's are rounded up
                big = im.resize((int(im.width * factor) | 1, int(im.height * factor) | 1), Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                big.save(buffer, "JPEG", quality=90)
                draft = decode_image(buffer.getvalue(), max_pixels=10**9, draft_size=model_draft_size(size)).image
                if draft.size == big.size:
                    continue
                drafted += 1
                want = np.asarray(fast.core.crop(draft), dtype=np.float32).transpose(2, 0, 1)
                got = np.rint((indexing(draft).numpy() - offset) / scale)
                assert got.shape == want.shape == (3, size, size)
                assert np.abs(got - want).max() <= 1.0, source
                mean_diffs.append(float(np.abs(got - want).mean()))
    assert drafted >= 12 and np.mean(mean_diffs) < 0.02, (drafted, mean_diffs)


@PATHS
@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (257, 257), (64, 63), (64, 64), (1000, 101), (40, 30)])
def test_odd_shapes_and_other_modes_match(shape: tuple[int, int], which: str) -> None:
    """Shrinking, enlarging (40x30), no resize at all (64x64), and the modes other than RGB."""
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 255, (shape[1], shape[0], 3), dtype=np.uint8))
    reference = open_clip.image_transform(64, is_train=False)
    fast = fast_transform(reference)
    assert isinstance(fast, CenterCropResize)
    for mode in ("RGB", "L", "RGBA", "P"):
        converted = image.convert(mode)
        transform = _path(fast, which) if mode in ("RGB", "L") else fast  # other modes: the original transform
        want, got = reference(converted), transform(converted)
        assert got.shape == want.shape
        assert float((want - got).abs().mean()) < 0.01, mode


def test_other_transforms_are_left_alone() -> None:
    squash = open_clip.image_transform(64, is_train=False, resize_mode="squash")
    assert fast_transform(squash) is squash
    longest = open_clip.image_transform(64, is_train=False, resize_mode="longest")
    assert fast_transform(longest) is longest
    custom = Compose([lambda im: im])
    assert fast_transform(custom) is custom


@PATHS
def test_embeddings_of_the_trained_model_are_unchanged(
    shared_data: Path, instrument_encoder: Encoder, which: str
) -> None:
    encoder = instrument_encoder
    reference = open_clip.image_transform(encoder.image_size, is_train=False)
    fast_reference = fast_transform(reference)
    assert isinstance(fast_reference, CenterCropResize)
    fast = _path(fast_reference, which)
    images = [
        decode_image(p.read_bytes(), max_pixels=50_000_000, draft_size=model_draft_size(encoder.image_size)).image
        for p in _photos(shared_data, 120)
    ]
    want = encoder.encode_pixels(torch.stack([reference(im) for im in images]))
    got = encoder.encode_pixels(torch.stack([fast(im) for im in images]))
    cosine, overlap = embedding_fidelity(want, got)
    worst = float(np.min(np.sum(want * got, axis=1)))
    assert worst >= 0.999 and cosine >= 0.9999 and overlap >= 0.98, (worst, cosine, overlap)
