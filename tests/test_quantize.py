"""The opt-in int8 CPU path keeps the model's embedding space; thread settings reach torch and FAISS."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.config import Settings
from app.encoder import Encoder, ModelSpec
from app.errors import ModelLoadError
from app.quantize import (
    INT8,
    FullRangeDynamicLinear,
    LinearSelfAttention,
    check_inference,
    quantize,
    set_cpu_threads,
    swap_self_attention,
)
from tests.helpers import embedding_fidelity

QUERIES = [
    "a dog",
    "a photo of a leopard",
    "a red bicycle leaning on a wall",
    "an airplane in the sky",
    "a bowl of fruit on a wooden table",
    "two people walking on a beach at sunset",
    "a grand piano",
    "a motorbike parked in the street",
    "a close-up of a sunflower",
    "a face",
]


def _photos(data: Path, count: int = 200) -> list[bytes]:
    paths = sorted((data / "coco-mini" / "images").glob("*.jpg"))[:80]
    paths += sorted((data / "photo-samples").glob("*/*.jpg"))[:40]
    caltech = sorted((data / "caltech101").glob("*/*.jpg"))
    paths += caltech[:: max(1, len(caltech) // (count - len(paths)))][: count - len(paths)]
    return [p.read_bytes() for p in paths]


def test_linear_self_attention_computes_what_multihead_attention_does() -> None:
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
        linear = LinearSelfAttention(mha).eval()
        x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)  # (batch, length) or (length, batch)
        causal = torch.full((7, 7), float("-inf")).triu(1)
        for mask in (None, causal, causal.isinf()):  # none, additive float, boolean (True = masked out)
            with torch.inference_mode():
                want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
                got = linear(x, x, x, need_weights=False, attn_mask=mask)[0]
            assert torch.allclose(want, got, atol=1e-5), (batch_first, mask)
    with pytest.raises(ValueError, match="self-attention"):
        linear(x, torch.randn(3, 7, 32), x)


def test_swapped_attention_gives_the_same_vectors(tiny_encoder: Encoder) -> None:
    model = copy.deepcopy(tiny_encoder.model)
    assert swap_self_attention(model) > 0
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    pixels = torch.randn(4, 3, tiny_encoder.image_size, tiny_encoder.image_size)
    tokens = tiny_encoder.tokenizer(QUERIES)
    with torch.inference_mode():
        assert torch.allclose(model.encode_image(pixels), tiny_encoder.model.encode_image(pixels), atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), tiny_encoder.model.encode_text(tokens), atol=1e-5)


def test_int8_quantises_every_linear_layer_attention_included(tiny_encoder: Encoder) -> None:
    linear_layers = sum(isinstance(m, nn.Linear) for m in tiny_encoder.model.modules())
    attention_modules = sum(isinstance(m, nn.MultiheadAttention) for m in tiny_encoder.model.modules())
    quantized = quantize(tiny_encoder.model, INT8)
    dynamic = [m for m in quantized.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert all(isinstance(m, FullRangeDynamicLinear) for m in dynamic)
    # each attention module's out_proj was counted already; its in_proj becomes one more linear layer
    assert len(dynamic) == linear_layers + attention_modules
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    # the fp32 model the caller holds is left alone
    assert any(isinstance(m, nn.MultiheadAttention) for m in tiny_encoder.model.modules())


def test_int8_encoder_keeps_the_model_identity_and_says_so(tiny_model_dir: Path) -> None:
    fp32 = Settings(model=f"local-dir:{tiny_model_dir}", device="cpu")
    int8 = fp32.with_overrides(inference="int8")
    assert ModelSpec.from_settings(int8) == ModelSpec.from_settings(fp32)  # same manifest, same index
    encoder = Encoder.from_settings(int8)
    assert encoder.inference == "int8" and Encoder.from_settings(fp32).inference == "fp32"
    vectors = encoder.encode_texts(QUERIES)  # the truncated text path runs on the quantised tower
    assert vectors.shape == (len(QUERIES), encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_int8_on_a_gpu_or_an_unknown_mode_is_refused_with_what_to_do() -> None:
    with pytest.raises(ModelLoadError, match="CLIPSEARCH_DEVICE=cpu"):
        check_inference("int8", torch.device("cuda"))
    with pytest.raises(ModelLoadError, match="use one of auto, fp32, int8"):
        check_inference("int4", torch.device("cpu"))
    assert check_inference("fp32", torch.device("cuda")) == "fp32"


def test_thread_setting_reaches_torch_and_faiss() -> None:
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        set_cpu_threads(1)
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        set_cpu_threads(0)  # 0: leave the defaults as they are
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


@pytest.mark.slow
def test_int8_keeps_the_trained_models_embeddings_and_neighbours(
    instrument_encoder: Encoder, instrument_model_dir: Path, shared_data: Path
) -> None:
    """200 real photos and a set of queries through the int8 encoder vs fp32: the bar of the opt-in path."""
    from app.imaging import decode_image, model_draft_size

    settings = Settings(model=f"local-dir:{instrument_model_dir}", device="cpu", inference="int8")
    int8 = Encoder.from_settings(settings)
    draft = model_draft_size(instrument_encoder.image_size)
    images = [decode_image(d, max_pixels=10**9, draft_size=draft).image for d in _photos(shared_data)]
    assert len(images) == 200
    cosine, overlap = embedding_fidelity(
        instrument_encoder.encode_images(images, batch_size=64), int8.encode_images(images, batch_size=64)
    )
    assert cosine >= 0.995 and overlap >= 0.95, (cosine, overlap)
    text_cosine = np.sum(instrument_encoder.encode_texts(QUERIES) * int8.encode_texts(QUERIES), axis=1)
    assert text_cosine.mean() >= 0.995, text_cosine


def test_an_index_built_in_fp32_is_served_by_an_int8_service_that_says_so(
    tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Encoder, shared_data: Path
) -> None:
    from tests.api.conftest import assert_served_in_mode

    assert_served_in_mode(tmp_path, tiny_model_dir, tiny_encoder, "int8")
