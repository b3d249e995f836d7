"""app.preprocess: the single-pass resize + centre crop against open_clip's own transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose

from app.encoder import Encoder
from app.imaging import decode_image, model_draft_size
from app.preprocess import CenterCropResize, fast_transform
from tests.helpers import embedding_fidelity


def _photos(shared_data: Path, count: int) -> list[Path]:
    coco = sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))
    caltech = sorted((shared_data / "caltech101").glob("*/image_0002.jpg"))
    return (coco[: count // 2] + caltech)[:count]


@pytest.mark.parametrize("size", [224, 64])
def test_same_pixels_as_open_clip_up_to_rounding_at_the_crop_edges(shared_data: Path, size: int) -> None:
    reference = open_clip.image_transform(size, is_train=False)
    fast = fast_transform(reference)
    assert isinstance(fast, CenterCropResize)
    mean_diffs = []
    for path in _photos(shared_data, 40):
        image = decode_image(path.read_bytes(), max_pixels=50_000_000, draft_size=model_draft_size(size)).image
        want, got = reference(image), fast(image)
        assert got.shape == want.shape == (3, size, size) and got.dtype == torch.float32
        mean_diffs.append(float((want - got).abs().mean()))
        assert float((want - got).abs().max()) < 0.25  # a few edge pixels by a few grey levels, at most
    assert np.mean(mean_diffs) < 1e-3  # in normalised units: about 0.1 % of a grey level on average


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (257, 257), (64, 63), (1000, 101)])
def test_odd_shapes_and_other_modes_match(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 255, (shape[1], shape[0], 3), dtype=np.uint8))
    reference = open_clip.image_transform(64, is_train=False)
    fast = fast_transform(reference)
    for mode in ("RGB", "L", "RGBA", "P"):
        converted = image.convert(mode)
        want, got = reference(converted), fast(converted)
        assert got.shape == want.shape
        assert float((want - got).abs().mean()) < 0.01, mode


def test_other_transforms_are_left_alone() -> None:
    squash = open_clip.image_transform(64, is_train=False, resize_mode="squash")
    assert fast_transform(squash) is squash
    longest = open_clip.image_transform(64, is_train=False, resize_mode="longest")
    assert fast_transform(longest) is longest
    custom = Compose([lambda im: im])
    assert fast_transform(custom) is custom


def test_embeddings_of_the_trained_model_are_unchanged(shared_data: Path, instrument_encoder: Encoder) -> None:
    encoder = instrument_encoder
    reference = open_clip.image_transform(encoder.image_size, is_train=False)
    fast = fast_transform(reference)
    images = [
        decode_image(p.read_bytes(), max_pixels=50_000_000, draft_size=model_draft_size(encoder.image_size)).image
        for p in _photos(shared_data, 120)
    ]
    want = encoder.encode_pixels(torch.stack([reference(im) for im in images]))
    got = encoder.encode_pixels(torch.stack([fast(im) for im in images]))
    cosine, overlap = embedding_fidelity(want, got)
    worst = float(np.min(np.sum(want * got, axis=1)))
    assert worst >= 0.999 and cosine >= 0.9999 and overlap >= 0.98, (worst, cosine, overlap)
