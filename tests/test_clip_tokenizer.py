"""The torch-free CLIP tokenizer gives open_clip's token ids, on real captions and on awkward text."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import open_clip
import pytest
from open_clip.tokenizer import default_bpe

from app.clip_tokenizer import ClipTokenizer, byte_characters
from app.onnx_encoder import TOKENIZER_PROBES


@pytest.fixture(scope="module")
def pair() -> tuple[ClipTokenizer, object]:
    return ClipTokenizer(Path(default_bpe())), open_clip.get_tokenizer("ViT-B-32")


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Mixed scripts, digits, punctuation, emoji, combining marks, HTML entities and odd whitespace."""
    rng = random.Random(seed)
    pieces = [
        "a", "photo", "of", "The", "DOG", "it's", "we'll", "I'd", "3", "42", "3.5", "&amp;", "&lt;b&gt;", "...",
        "!!", "--", "é", "ß", "İ", "ﬁ", "x\u0301", "東京", "фото", "صورة", "🐕", "🚲", "\t", "\u00a0", "  ",
        "<end_of_text>", "<start_of_text>", "_", "'s", "#hash", "e-mail", "C++", "naïve", "Ångström",
    ]  # fmt: skip
    out = []
    for _ in range(count):
        words = [rng.choice(pieces) for _ in range(rng.randint(0, 12))]
        out.append(rng.choice(["", " "]).join(words) if rng.random() < 0.3 else " ".join(words))
    return out


def test_byte_table_is_a_permutation_of_printable_characters() -> None:
    chars = byte_characters()
    assert len(chars) == len(set(chars)) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars)
    assert chars[0] == "!"  # the printable bytes come first, in byte order


def test_same_ids_as_open_clip_on_captions_and_class_names(pair, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    light, reference = pair
    with (shared_data / "coco-mini" / "captions.csv").open(newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    classes = [p.name.replace("_", " ") for p in (shared_data / "caltech101").iterdir() if p.is_dir()]
    texts = captions + [f"a photo of a {c}." for c in classes]
    assert len(texts) > 400
    np.testing.assert_array_equal(light(texts), reference(texts).numpy())


def test_same_ids_as_open_clip_on_awkward_text(pair) -> None:  # type: ignore[no-untyped-def]
    light, reference = pair
    texts = [*TOKENIZER_PROBES, *random_texts(400), "", "   "]
    ours, theirs = light(texts), reference(texts).numpy()
    differ = [t for t, a, b in zip(texts, ours, theirs, strict=True) if not np.array_equal(a, b)]
    assert not differ, f"{len(differ)} texts tokenised differently, e.g. {differ[:3]!r}"


def test_long_text_is_cut_with_the_end_token_kept(pair) -> None:  # type: ignore[no-untyped-def]
    light, reference = pair
    text = " ".join(f"word{i}" for i in range(200))
    tokens = light([text])
    assert tokens.shape == (1, 77)
    assert tokens[0, 0] == light.sot_token_id and tokens[0, -1] == light.eot_token_id
    np.testing.assert_array_equal(tokens, reference([text]).numpy())
    short = light(["a dog"], context_length=8)
    assert short.shape == (1, 8) and short[0, 3] == light.eot_token_id and not short[0, 4:].any()
    assert light.vocab_size == 49408
