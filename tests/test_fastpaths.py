"""Fast paths give the reference results: truncated text encoding vs open_clip's full 77-token pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.encoder import Encoder, ModelSpec
from tests.helpers import embedding_fidelity, resaved_crop

QUERIES = [
    "dog",
    "a photo of a leopard",
    "a red bicycle leaning on a wall",
    "two people walking on a beach at sunset holding a bright yellow kite",
    "",
    "café Straße 東京 🚲",
    "word " * 100,  # longer than the context: truncated by the tokenizer, EOT at the last position
]


def _assert_same_as_full(encoder: Encoder) -> None:
    assert encoder.supports_truncated_text
    full = encoder.encode_texts(QUERIES, truncate=False)
    fast = encoder.encode_texts(QUERIES)
    assert np.abs(full - fast).max() <= 1e-5
    for query in QUERIES[:4]:  # alone, each query is cut at its own length
        single = encoder.encode_texts([query])
        assert np.abs(single - encoder.encode_texts([query], truncate=False)).max() <= 1e-5


def test_truncated_text_equals_full_encode_tiny(tiny_encoder: Encoder) -> None:
    _assert_same_as_full(tiny_encoder)


def test_truncated_text_equals_full_encode_trained_model(instrument_encoder: Encoder) -> None:
    _assert_same_as_full(instrument_encoder)


@pytest.mark.slow
def test_truncated_text_equals_full_encode_vit_b_32_random_weights() -> None:
    torch.manual_seed(0)
    _assert_same_as_full(Encoder(ModelSpec("ViT-B-32", ""), torch.device("cpu")))


def test_towers_without_a_causal_mask_fall_back_to_the_full_pass(tiny_encoder: Encoder) -> None:
    mask = tiny_encoder.model.attn_mask
    try:
        tiny_encoder.model.attn_mask = None  # what a bidirectional (HF-style) tower looks like
        assert not tiny_encoder.supports_truncated_text
    finally:
        tiny_encoder.model.attn_mask = mask
    assert tiny_encoder.supports_truncated_text


@pytest.mark.slow
def test_draft_decoding_keeps_embeddings_and_neighbours_of_the_trained_model(
    instrument_encoder: Encoder, shared_data
) -> None:  # type: ignore[no-untyped-def]
    """The default fast image path (JPEG draft decoding) against full decoding, on 300 real photos."""
    from app.imaging import decode_image, model_draft_size

    paths = sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))
    paths += sorted((shared_data / "photo-samples").glob("*/*.jpg"))
    paths += sorted((shared_data / "caltech101").glob("*/*.jpg"))[:: 3345 // 150][:150]
    datas = [p.read_bytes() for p in paths]
    draft = model_draft_size(instrument_encoder.image_size)

    def embed(draft_size: int | None) -> np.ndarray:
        images = [decode_image(d, max_pixels=10**9, draft_size=draft_size).image for d in datas]
        return instrument_encoder.encode_images(images, batch_size=64)

    cosine, overlap = embedding_fidelity(embed(None), embed(draft))
    assert len(paths) >= 280
    assert cosine >= 0.999 and overlap >= 0.98, (cosine, overlap)


@pytest.mark.slow
def test_draft_decoding_of_photos_re_saved_at_odd_sizes_keeps_the_trained_models_vectors(
    instrument_encoder: Encoder, shared_data, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Crops of real photos re-saved at about 1.2 MP with odd sides (e.g. 1265x949), drafted at 1/2 scale: a draft
    rounds its sides up, and resizing it with its own geometry instead of the whole picture's moved the crop (top-10
    overlap 0.973 here, cosine down to 0.94 on some 0.3 MP photos at 1/2 scale)."""
    from app.imaging import decode_image, model_draft_size

    sources = sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))
    sources += sorted((shared_data / "photo-samples").glob("*/*.jpg"))
    datas, odd = [], 0
    for i, source in enumerate(sources[:128]):
        width, height = resaved_crop(source, tmp_path / f"{i}.jpg", 1.2, seed=i)
        odd += width % 2 or height % 2
        datas.append((tmp_path / f"{i}.jpg").read_bytes())
    assert odd >= 32

    def embed(draft_size: int | None) -> np.ndarray:
        images = [decode_image(d, max_pixels=10**9, draft_size=draft_size).image for d in datas]
        return instrument_encoder.encode_images(images, batch_size=64)

    cosine, overlap = embedding_fidelity(embed(None), embed(model_draft_size(instrument_encoder.image_size)))
    assert cosine >= 0.999 and overlap >= 0.98, (cosine, overlap)
