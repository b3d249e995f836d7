"""Zero-shot classifier: ensemble math, scoring with thresholds and background, and the class-embedding cache."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import app.zeroshot as zeroshot
from app.config import Settings
from app.encoder import Encoder
from app.errors import ConfigError
from app.evaluation import embed_image_files
from app.vocab import parse_vocabulary
from app.zeroshot import (
    Tag,
    ZeroShotClassifier,
    build_classifier,
    class_embeddings,
    classifier_cache_dir,
    classify,
    load_classifier,
    model_logit_scale,
)


class TableEncoder:
    """A text encoder that returns fixed (not normalised) vectors per text, and counts what it encodes."""

    def __init__(self, table: dict[str, Sequence[float]]) -> None:
        self.table = table
        self.encoded: list[str] = []
        self.dim = len(next(iter(table.values())))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded += list(texts)
        return np.array([self.table[t] for t in texts], dtype=np.float32)


class CountingEncoder:
    """A real encoder that counts the texts it is asked to encode."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder
        self.spec, self.dim, self.model = encoder.spec, encoder.dim, encoder.model
        self.texts = 0

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        return self._encoder.encode_texts(texts)


def _classifier(
    embeddings: np.ndarray, thresholds: Sequence[float], background: np.ndarray | None = None, scale: float = 1.0
) -> ZeroShotClassifier:
    dim = embeddings.shape[1]
    return ZeroShotClassifier(
        vocabulary="test",
        vocabulary_hash="x",
        model="m",
        labels=tuple(f"l{i}" for i in range(len(embeddings))),
        embeddings=np.asarray(embeddings, dtype=np.float32),
        background=np.zeros((0, dim), np.float32) if background is None else np.asarray(background, np.float32),
        thresholds=np.asarray(thresholds, dtype=np.float32),
        logit_scale=scale,
    )


def test_class_embedding_is_the_renormalised_mean_of_normalised_prompt_embeddings() -> None:
    encoder = TableEncoder({"a": [2.0, 0.0], "b": [0.0, 1.0], "c": [3.0, 4.0]})
    vectors = class_embeddings(encoder, [["a", "b"], ["c"]])
    # [2,0] and [0,1] normalise to [1,0] and [0,1] before averaging: the longer vector does not win.
    np.testing.assert_allclose(vectors, [[2**-0.5, 2**-0.5], [0.6, 0.8]], atol=1e-6)


def test_ensemble_matches_a_direct_per_prompt_computation(
    tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = parse_vocabulary(
        {"templates": "simple", "labels": ["cat", {"name": "hot dog", "synonyms": ["frankfurter"]}, "tree"]}
    )
    monkeypatch.setattr(zeroshot, "PROMPTS_PER_GROUP", 10)  # several groups, as a large vocabulary gets
    got = class_embeddings(tiny_encoder, vocab.prompts_per_label())
    expected = []
    for prompts in vocab.prompts_per_label():
        unit = [v / np.linalg.norm(v) for v in (tiny_encoder.encode_texts([p])[0] for p in prompts)]
        mean = np.mean(unit, axis=0)
        expected.append(mean / np.linalg.norm(mean))
    assert len(vocab.prompts_per_label()[1]) == 14  # 7 templates x (name + synonym)
    np.testing.assert_allclose(got, np.array(expected), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_scores_are_a_softmax_at_the_model_temperature_with_background_absorbing_mass() -> None:
    classifier = _classifier(np.eye(3)[:2], [0.0, 0.0], background=np.eye(3)[2:], scale=2.0)
    image = np.array([[1.0, 0.0, 0.0]])
    e = np.exp([2.0, 0.0, 0.0])
    np.testing.assert_allclose(classifier.scores(image), [e[:2] / e.sum()], rtol=1e-6)
    np.testing.assert_allclose(classifier.similarities(image), [[1.0, 0.0]])


def test_classify_returns_best_first_above_thresholds_and_top_k() -> None:
    classifier = _classifier(np.eye(3), [0.1, 0.1, 0.5], scale=10.0)  # image 0: softmax 0.88, 0.12, 0.0003
    images = np.array([[0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.6, 0.0, 0.8]])
    tags = classify(images, classifier, top_k=2)
    assert [[t.label for t in row] for row in tags] == [["l0", "l1"], ["l2"], ["l2", "l0"]]
    probabilities = classifier.scores(images)
    assert tags[0][0] == Tag("l0", pytest.approx(float(probabilities[0, 0])))
    assert [t.label for t in classify(images, classifier, top_k=1)[0]] == ["l0"]
    # A float replaces every threshold; a mapping replaces the labels it names.
    assert classify(images, classifier, top_k=None, thresholds=0.99) == [
        [],
        [Tag("l2", pytest.approx(0.99991, abs=1e-4))],
        [],
    ]
    assert [t.label for t in classify(images, classifier, thresholds={"l1": 0.9})[0]] == ["l0"]
    with pytest.raises(ConfigError, match="not in vocabulary 'test': nope"):
        classify(images, classifier, thresholds={"nope": 0.1})


def test_an_image_matching_the_background_gets_no_flag() -> None:
    classifier = _classifier(np.eye(3)[:2], [0.5, 0.5], background=np.eye(3)[2:], scale=10.0)
    assert classify(np.array([[0.0, 0.0, 1.0]]), classifier, top_k=None) == [[]]
    assert [t.label for t in classify(np.array([[0.0, 1.0, 0.0]]), classifier, top_k=None)[0]] == ["l1"]


def test_model_temperature_comes_from_the_model(tiny_encoder: Encoder) -> None:
    assert model_logit_scale(tiny_encoder) == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's initial value
    assert model_logit_scale(object()) == 100.0


def test_class_embeddings_are_cached_per_model_and_vocabulary(tiny_encoder: Encoder, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    cache = classifier_cache_dir(settings)
    assert cache == tmp_path / "data" / "classifiers"
    vocab = parse_vocabulary({"name": "Pets & Plants", "templates": "simple", "labels": ["cat", "fern"]})
    encoder = CountingEncoder(tiny_encoder)

    first = load_classifier(encoder, vocab, cache)
    assert encoder.texts == 14
    files = sorted(p.name for p in cache.iterdir())
    assert (
        len(files) == 2
        and files[0].startswith("pets-plants-")
        and {Path(f).suffix for f in files}
        == {
            ".json",
            ".npy",
        }
    )
    meta = json.loads(next(cache.glob("*.json")).read_text())
    assert meta["labels"] == ["cat", "fern"] and meta["vocabulary_hash"] == vocab.content_hash

    again = load_classifier(encoder, vocab, cache)
    assert encoder.texts == 14  # read back, not encoded again
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    np.testing.assert_allclose(first.embeddings, build_classifier(tiny_encoder, vocab).embeddings, atol=1e-6)

    # New thresholds reuse the cached vectors; a new label text does not.
    stricter = parse_vocabulary(
        {"name": "Pets & Plants", "templates": "simple", "threshold": 0.9, "labels": ["cat", "fern"]}
    )
    assert load_classifier(encoder, stricter, cache).thresholds.tolist() == pytest.approx([0.9, 0.9])
    assert encoder.texts == 14
    load_classifier(encoder, parse_vocabulary({"templates": "simple", "labels": ["cat", "moss"]}), cache)
    assert encoder.texts == 28 and len(list(cache.glob("*.npy"))) == 2


def test_a_corrupt_cache_entry_is_rebuilt(tiny_encoder: Encoder, tmp_path: Path) -> None:
    vocab = parse_vocabulary({"templates": "single", "labels": ["cat", "dog"]})
    encoder = CountingEncoder(tiny_encoder)
    reference = load_classifier(encoder, vocab, tmp_path)
    next(tmp_path.glob("*.npy")).write_bytes(b"not an array")
    rebuilt = load_classifier(encoder, vocab, tmp_path)
    assert encoder.texts == 4
    np.testing.assert_allclose(rebuilt.embeddings, reference.embeddings, atol=1e-6)
    assert load_classifier(encoder, vocab, tmp_path) is not None and encoder.texts == 4  # the rewrite is good


def test_another_model_gets_its_own_cache_entry(tiny_encoder: Encoder, tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.helpers import save_local_dir_model

    other = Encoder.from_settings(Settings(model=f"local-dir:{save_local_dir_model(tmp_path / 'm2', seed=1)}"))
    vocab = parse_vocabulary({"templates": "single", "labels": ["cat", "dog"]})
    a = load_classifier(tiny_encoder, vocab, tmp_path / "cache")
    b = load_classifier(other, vocab, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert not np.allclose(a.embeddings, b.embeddings)


def test_instrument_model_tags_photos_with_the_right_label(instrument_encoder: Encoder, shared_data: Path) -> None:
    """With the trained model, a small user vocabulary tags Caltech photos by what they show."""
    classes = {"Leopards": "leopard", "airplanes": "airplane", "Motorbikes": "motorbike", "pizza": "pizza"}
    paths, truth = [], []
    for folder, label in classes.items():
        files = sorted((shared_data / "caltech101" / folder).glob("*.jpg"))[:4]
        paths += files
        truth += [label] * len(files)
    vectors, failed = embed_image_files(instrument_encoder, paths)
    assert not failed
    vocab = parse_vocabulary({"labels": list(classes.values()), "background": ["a photo of a room."]})
    tagger = build_classifier(instrument_encoder, vocab)
    tags = classify(vectors, tagger, top_k=1, thresholds=0.0)
    right = sum(row[0].label == label for row, label in zip(tags, truth, strict=True))
    assert right >= 14, [(row[0].label, label) for row, label in zip(tags, truth, strict=True)]
    # With a 0.5 threshold a confident tag is kept and a doubtful one dropped, never a wrong confident one.
    kept = classify(vectors, tagger, top_k=1, thresholds=0.5)
    assert sum(bool(row) for row in kept) >= 12
    assert all(row[0].label == label for row, label in zip(kept, truth, strict=True) if row)


def test_classifying_many_images_in_chunks_gives_each_image_its_own_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(6, 4))
    classifier = _classifier(embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), [0.05] * 6, scale=5.0)
    images = rng.normal(size=(11, 4)).astype(np.float32)
    monkeypatch.setattr(zeroshot, "CLASSIFY_CHUNK", 3)
    tags = classify(images, classifier, top_k=3)
    for image, row in zip(images, tags, strict=True):
        probabilities = classifier.scores(image)[0]
        expected = [i for i in np.argsort(-probabilities)[:3] if probabilities[i] >= 0.05]
        assert [t.label for t in row] == [f"l{i}" for i in expected]
        assert [t.score for t in row] == pytest.approx([probabilities[i] for i in expected], rel=1e-5)
    assert classify(np.zeros((0, 4)), classifier) == []


def test_encoding_a_vocabulary_shows_a_progress_bar_and_a_cached_one_does_not(
    tiny_encoder: Encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3 labels x 7 templates = 21 prompts, in groups of 8 (as ImageNet's 80,000 go in groups of 4,096), plus 2
    # background prompts: the bar counts every prompt encoded and ends at the total.
    monkeypatch.setattr(zeroshot, "PROMPTS_PER_GROUP", 8)
    vocab = parse_vocabulary(
        {"name": "garden", "templates": "simple", "labels": ["cat", "fern", "moss"], "background": ["a wall", "sky"]}
    )
    seen: list[int] = []
    encoder = CountingEncoder(tiny_encoder)  # encodes prompts one call per group (no shared prefixes)
    class_embeddings(encoder, vocab.prompts_per_label(), seen.append)
    assert seen == [7, 7, 7]  # whole labels per group: 7 + 7 would pass 8, so each group holds one label

    load_classifier(encoder, vocab, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "encoding vocabulary 'garden' (once per model)" in err and "23/23" in err and encoder.texts == 44
    load_classifier(tiny_encoder, vocab, tmp_path / "other", progress=True)  # shared prefixes: per chunk
    assert "encoding vocabulary 'garden' (once per model)" in (err := capsys.readouterr().err) and "23/23" in err

    load_classifier(encoder, vocab, tmp_path, progress=True)  # from the cache: nothing encoded, no bar
    assert capsys.readouterr().err == "" and encoder.texts == 44
    load_classifier(encoder, parse_vocabulary({"templates": "single", "labels": ["a", "b"]}), tmp_path)
    assert "encoding vocabulary" not in capsys.readouterr().err  # progress is off by default
