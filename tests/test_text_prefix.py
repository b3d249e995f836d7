"""Many prompts through the text tower with each shared prefix computed once (app.text_prefix): the chunks, the
exactness against open_clip's full encode, bf16 products on the trained model, and the vocabulary path using it."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import app.text_prefix as text_prefix
from app.config import Settings
from app.encoder import Encoder, _pooled_positions
from app.quantize import swap_self_attention
from app.text_prefix import CHUNK_ROWS, PrefixTower, prefix_chunks
from app.vocab import imagenet_vocabulary, parse_vocabulary
from app.zeroshot import class_embeddings

LABELS = ["cat", "hot dog", "great white shark", "great grey owl", "a", "tree", "tree", "sea lion", "sea urchin"]
ODD = ["x", "a photo of a", "a photo of a cat.", "a photo of a cat. a photo of a cat.", "", "?!", "a photo of a cat."]


def _prompts() -> list[str]:
    """Simple templates x labels with shared first words and duplicates, plus prompts that share nothing, repeat
    each other or are prefixes of others."""
    vocab = parse_vocabulary({"templates": "simple", "labels": sorted(set(LABELS))})
    return [p for prompts in vocab.prompts_per_label() for p in prompts] + ODD


def _rows(tokens: torch.Tensor, pooled: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(tokens[i, : int(pooled[i]) + 1].tolist()) for i in range(len(tokens))]


def test_chunks_cover_every_row_once_and_share_their_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    templates = [(1, 5, 6, 7), (1, 5, 6, 8, 9), (1, 10), (1, 5)]
    rows = [t + tuple(rng.integers(11, 30, rng.integers(1, 5))) + (99,) for t in templates for _ in range(70)]
    rows += [(1, 99), (1, 99), (1, 5, 99), (1, 5, 6, 7, 99)]  # duplicates, and rows that end where others go on
    monkeypatch.setattr(text_prefix, "CHUNK_ROWS", 32)
    chunks = prefix_chunks(rows)
    seen = sorted(i for members, _ in chunks for i in members)
    assert seen == list(range(len(rows)))
    for members, prefix in chunks:
        assert 1 <= len(members) <= 32 and prefix >= 0
        heads = {rows[i][:prefix] for i in members}
        assert len(heads) == 1 and all(len(rows[i]) > prefix for i in members)  # the pooled token stays out
        lengths = [len(rows[i]) for i in members]
        assert lengths == sorted(lengths)  # cut by length: little padding
    # each template (70 rows) is a group of its own that shares the template's tokens: no chunk mixes two
    for t in templates:
        mine = {i for i, r in enumerate(rows[:280]) if r[: len(t)] == t and (t != (1, 5) or r[2] != 6)}
        for members, prefix in chunks:
            if set(members) & mine:
                assert prefix >= len(t), (t, prefix)
    assert prefix_chunks([]) == [] and prefix_chunks([(1, 99)]) == [([0], 1)]
    assert CHUNK_ROWS == 256


@pytest.mark.parametrize("attention", ["multi-head", "linear projections"])
def test_shared_prefixes_give_the_full_encode(
    tiny_model_dir: Path, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within 1e-5 of open_clip's own 77-token encode_text, row for row, in the caller's order."""
    monkeypatch.setattr(text_prefix, "MIN_GROUP", 4)  # groups of this small vocabulary's size (8 labels a template)
    monkeypatch.setattr(text_prefix, "CHUNK_ROWS", 6)  # and several chunks in a group
    encoder = Encoder.from_settings(Settings(model=f"local-dir:{tiny_model_dir}"))
    model = encoder.model
    if attention == "linear projections":  # as a bf16 encoder's image tower has them (app.quantize)
        assert swap_self_attention(model.transformer) > 0
    texts = _prompts()
    tokens = encoder.tokenizer(texts)
    tower = PrefixTower.of(model)
    assert tower is not None
    calls: list[int] = []
    with torch.inference_mode():
        got = tower.encode(tokens, _pooled_positions(model, tokens), calls.append)
        expected = model.encode_text(tokens)
    assert sum(calls) == len(texts) and len(calls) < len(texts)
    assert float((got - expected).abs().max()) <= 1e-5
    chunks = prefix_chunks(_rows(tokens, _pooled_positions(model, tokens)))
    assert max(prefix for _, prefix in chunks) >= 5  # it did share prefixes ("<start> a photo of a")


def test_only_plain_causal_towers_share_prefixes(tiny_model_dir: Path) -> None:
    encoder = Encoder.from_settings(Settings(model=f"local-dir:{tiny_model_dir}"))
    assert encoder.shares_prompt_prefixes
    int8 = Encoder.from_settings(Settings(model=f"local-dir:{tiny_model_dir}", inference="int8"))
    assert not int8.shares_prompt_prefixes and PrefixTower.of(int8.model) is None
    with pytest.raises(ValueError, match="cannot share prompt prefixes"):
        int8.encode_prompts(["a photo of a cat."])
    assert PrefixTower.of(torch.nn.Linear(2, 2)) is None


def test_a_vocabulary_goes_through_the_shared_prefixes(tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """class_embeddings encodes through Encoder.encode_prompts, reports every prompt and gives the vectors of the
    plain path (each prompt on its own)."""
    vocab = parse_vocabulary({"templates": "simple", "labels": sorted(set(LABELS))})
    prompts = vocab.prompts_per_label()
    used: list[int] = []
    real = Encoder.encode_prompts

    def counting(self: Encoder, texts: list[str], on_encoded=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        used.append(len(texts))
        return real(self, texts, on_encoded)

    monkeypatch.setattr(Encoder, "encode_prompts", counting)
    reported: list[int] = []
    got = class_embeddings(tiny_encoder, prompts, reported.append)
    total = sum(len(p) for p in prompts)
    assert used == [total] and sum(reported) == total
    plain = np.stack([np.mean([v / np.linalg.norm(v) for v in tiny_encoder.encode_texts(p)], axis=0) for p in prompts])
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    np.testing.assert_allclose(got, plain, atol=2e-5)


@pytest.mark.slow
def test_bf16_prompts_keep_the_trained_models_classes(
    instrument_model_dir: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 encoder's vocabulary (ImageNet labels x 16 templates on the trained 64 px model): class vectors
    within cosine 0.9995 of fp32's, and the same best tag for the Caltech-101 photos; on a CPU that would emulate
    bf16, the fp32 products."""
    from PIL import Image

    import app.encoder

    model = f"local-dir:{instrument_model_dir}"
    fp32 = Encoder.from_settings(Settings(model=model, inference="fp32"))
    bf16 = Encoder.from_settings(Settings(model=model, inference="bf16"))
    vocab = imagenet_vocabulary()
    prompts = [p[:16] for p in vocab.prompts_per_label()]
    reference = class_embeddings(fp32, prompts)
    monkeypatch.setattr(app.encoder, "bf16_pays", lambda: False)
    np.testing.assert_array_equal(class_embeddings(bf16, prompts), reference)  # emulated bf16: fp32's products
    monkeypatch.setattr(app.encoder, "bf16_pays", lambda: True)
    got = class_embeddings(bf16, prompts)
    cosines = (reference * got).sum(axis=1)
    assert cosines.min() >= 0.9995 and not np.array_equal(reference, got)  # close, and really another path
    paths = list(itertools.islice(sorted((shared_data / "caltech101").glob("*/*.jpg"))[::17], 160))
    images = fp32.encode_images([Image.open(p).convert("RGB") for p in paths])
    best_fp32, best_bf16 = (images @ reference.T).argmax(axis=1), (images @ got.T).argmax(axis=1)
    assert (best_fp32 == best_bf16).mean() >= 0.98
