"""Zero-shot classification: a vocabulary's labels, through the text encoder, become a classifier for image vectors.

The class embedding of a label is the mean of the L2-normalised embeddings of all its prompts (every template
filled with its name and each synonym, plus its own prompts), normalised again: the prompt ensemble of the CLIP
paper. Scores are softmax probabilities over the labels and the background prompts (which are scored but never
returned), at the model's own learned temperature, so a threshold means the same for every image.

Integration (tags at index time, facets, safe-search), all pure functions over vectors already in the index::

    from app.vocab import resolve_vocabulary                 # "imagenet", "safe-search" or a YAML/JSON path
    from app.zeroshot import classify, classifier_cache_dir, load_classifier

    tagger = load_classifier(encoder, resolve_vocabulary("imagenet"), classifier_cache_dir(settings))
    tags = classify(image_vectors, tagger, top_k=5)          # list[list[Tag]]: per image, best first
    flagger = load_classifier(encoder, resolve_vocabulary("safe-search"), classifier_cache_dir(settings))
    flags = classify(image_vectors, flagger, top_k=None)     # every flag above its own threshold

- ``image_vectors``: (N, dim) float32, L2-normalised, as ``Encoder.encode_*`` and the index hold them; re-tagging
  an existing catalog needs no image re-embedding.
- ``thresholds``: ``None`` uses the vocabulary's per-label thresholds, a float replaces them all, a mapping
  ``{label: threshold}`` replaces those it names (what settings would carry). Tags below are not returned.
- ``load_classifier`` encodes the vocabulary once per (model, vocabulary content) and caches the class embeddings
  as ``<cache_dir>/<vocabulary>-<key>.npy`` + ``.json`` (atomic writes); ``classifier_cache_dir(settings)`` is
  ``<data_dir>/classifiers``, beside the index. A changed model or vocabulary text gives a new key; thresholds are
  not part of it (they come from the vocabulary or the caller on every load).
- Encoding the built-in ImageNet vocabulary (998 labels x 80 templates) takes a while on a CPU the first time;
  loading it from the cache takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from app.config import Settings
from app.errors import ConfigError
from app.vocab import Vocabulary

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_LOGIT_SCALE = 100.0
# Prompts encoded per model call group: bounds memory for large vocabularies (ImageNet: ~80k prompts).
PROMPTS_PER_GROUP = 4096
# ... for an encoder that shares prompt prefixes (Encoder.encode_prompts): a group is whole labels (all their
# templates), so a template meets ~400 labels in one group, enough for chunks of 256 rows (app.text_prefix).
BULK_PROMPTS_PER_GROUP = 32768
CLASSIFY_CHUNK = 4096


class TextEncoder(Protocol):
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Tag:
    """A label given to an image, with its score (softmax probability, 0..1)."""

    label: str
    score: float


@dataclass(frozen=True, eq=False)
class ZeroShotClassifier:
    """Class embeddings of a vocabulary for one model, plus what scoring needs."""

    vocabulary: str
    vocabulary_hash: str
    model: str
    labels: tuple[str, ...]
    embeddings: np.ndarray  # (labels, dim), unit rows
    background: np.ndarray  # (background prompts, dim), unit rows; may have 0 rows
    thresholds: np.ndarray  # (labels,), in 0..1
    logit_scale: float

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def similarities(self, image_vectors: np.ndarray) -> np.ndarray:
        """Cosine similarity of each image to each label: (N, labels)."""
        return _as_matrix(image_vectors, self.dim) @ self.embeddings.T

    def scores(self, image_vectors: np.ndarray) -> np.ndarray:
        """Softmax probability of each label for each image, background included in the softmax: (N, labels)."""
        vectors = _as_matrix(image_vectors, self.dim)
        logits = self.logit_scale * (vectors @ np.concatenate([self.embeddings, self.background]).T)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        probabilities = weights / weights.sum(axis=1, keepdims=True)
        return probabilities[:, : len(self.labels)]

    def threshold_vector(self, thresholds: float | Mapping[str, float] | None = None) -> np.ndarray:
        if thresholds is None:
            return self.thresholds
        if isinstance(thresholds, int | float):
            return np.full(len(self.labels), float(thresholds), dtype=np.float32)
        unknown = sorted(set(thresholds) - set(self.labels))
        if unknown:
            raise ConfigError(
                f"thresholds name labels not in vocabulary '{self.vocabulary}': {', '.join(unknown)} "
                f"(its labels: {', '.join(self.labels[:10])}{', ...' if len(self.labels) > 10 else ''})"
            )
        out = self.thresholds.copy()
        for position, label in enumerate(self.labels):
            if label in thresholds:
                out[position] = float(thresholds[label])
        return out


def classify(
    image_vectors: np.ndarray,
    classifier: ZeroShotClassifier,
    top_k: int | None = 5,
    thresholds: float | Mapping[str, float] | None = None,
) -> list[list[Tag]]:
    """Per image, its labels scoring at least their threshold, best first, at most ``top_k`` (None: all)."""
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be at least 1 (or None for every label above its threshold)")
    vectors = _as_matrix(image_vectors, classifier.dim)
    limits = classifier.threshold_vector(thresholds)
    count = len(classifier.labels)
    k = count if top_k is None else min(top_k, count)
    out: list[list[Tag]] = []
    for start in range(0, len(vectors), CLASSIFY_CHUNK):  # bounds memory: a chunk's scores are (chunk, labels)
        probabilities = classifier.scores(vectors[start : start + CLASSIFY_CHUNK])
        if k < count:
            best = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
        else:
            best = np.broadcast_to(np.arange(count), probabilities.shape)
        top = np.take_along_axis(probabilities, best, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        best, top = np.take_along_axis(best, order, axis=1), np.take_along_axis(top, order, axis=1)
        keep = top >= limits[best]
        for labels, scores, kept in zip(best, top, keep, strict=True):
            out.append(
                [Tag(classifier.labels[i], float(p)) for i, p, ok in zip(labels, scores, kept, strict=True) if ok]
            )
    return out


def class_embeddings(
    encoder: TextEncoder,
    prompts_per_label: Sequence[Sequence[str]],
    on_encoded: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Per label, the mean of its prompts' unit embeddings, renormalised: (labels, dim) float32.

    An encoder that shares prompt prefixes (``Encoder.shares_prompt_prefixes``) encodes them through
    ``encode_prompts`` (app.text_prefix); any other through ``encode_texts``, sorted by length. ``on_encoded`` is
    called with the number of prompts encoded as they are done (each chunk, or each group of labels): a progress
    bar."""
    shares_prefixes = bool(getattr(encoder, "shares_prompt_prefixes", False))
    per_group = BULK_PROMPTS_PER_GROUP if shares_prefixes else PROMPTS_PER_GROUP
    groups: list[list[int]] = [[]]
    size = 0
    for position, prompts in enumerate(prompts_per_label):
        if not prompts:
            raise ValueError(f"label #{position} has no prompt to encode")
        if size and size + len(prompts) > per_group:
            groups.append([])
            size = 0
        groups[-1].append(position)
        size += len(prompts)
    rows: list[np.ndarray] = []
    for group in groups:
        texts = [text for position in group for text in prompts_per_label[position]]
        if shares_prefixes:  # reports each chunk as it is done
            vectors = np.asarray(encoder.encode_prompts(texts, on_encoded), dtype=np.float32)  # type: ignore[attr-defined]
        else:
            vectors = _encode_by_length(encoder, texts)
            if on_encoded is not None:
                on_encoded(len(texts))
        start = 0
        for position in group:
            count = len(prompts_per_label[position])
            rows.append(vectors[start : start + count].mean(axis=0))
            start += count
    if not rows:
        raise ValueError("no labels to encode")
    return _unit_rows(np.stack(rows))


def build_classifier(encoder: Any, vocabulary: Vocabulary, *, progress: bool = False) -> ZeroShotClassifier:
    """Encode a vocabulary with the encoder's text tower (no cache); ``progress``: a bar of the prompts encoded
    on stderr (the built-in ImageNet vocabulary has 79,840: about a minute on a 2-core CPU for ViT-B-32)."""
    prompts = vocabulary.prompts_per_label()
    total = sum(len(p) for p in prompts) + len(vocabulary.background)
    desc = f"encoding vocabulary '{vocabulary.name}' (once per model)"
    with tqdm(total=total, unit="prompt", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        embeddings = class_embeddings(encoder, prompts, bar.update)
        background = (
            _unit_rows(np.asarray(encoder.encode_texts(list(vocabulary.background)), dtype=np.float32))
            if vocabulary.background
            else np.zeros((0, embeddings.shape[1]), dtype=np.float32)
        )
        bar.update(len(vocabulary.background))
    return _assemble(encoder, vocabulary, embeddings, background)


def load_classifier(
    encoder: Any, vocabulary: Vocabulary, cache_dir: Path | None, *, progress: bool = False
) -> ZeroShotClassifier:
    """The vocabulary's classifier for this encoder, from ``cache_dir`` when cached there, else built and cached
    (``progress``: a bar while it is encoded)."""
    if cache_dir is None:
        return build_classifier(encoder, vocabulary, progress=progress)
    model = model_fingerprint(encoder)
    key = hashlib.sha256(f"{CACHE_FORMAT}|{model}|{vocabulary.content_hash}".encode()).hexdigest()[:20]
    base = Path(cache_dir) / f"{_slug(vocabulary.name)}-{key}"
    cached = _read_cache(base, model, vocabulary)
    if cached is not None:
        embeddings, background = cached
        return _assemble(encoder, vocabulary, embeddings, background)
    log.info("encoding vocabulary '%s' (%d labels) for %s", vocabulary.name, len(vocabulary.labels), model)
    classifier = build_classifier(encoder, vocabulary, progress=progress)
    try:
        _write_cache(base, model, vocabulary, classifier)
    except OSError as exc:  # a read-only data dir must not stop tagging; it only costs the encoding next time
        log.warning("could not cache class embeddings in %s: %s", cache_dir, exc)
    return classifier


def classifier_cache_dir(settings: Settings) -> Path:
    """Where class embeddings are cached: beside the index, in the data dir."""
    return settings.data_dir / "classifiers"


def model_logit_scale(encoder: Any) -> float:
    """The temperature the model was trained with (exp of its logit_scale, capped at 100 as CLIP does)."""
    parameter = getattr(getattr(encoder, "model", None), "logit_scale", None)
    if parameter is None:
        return DEFAULT_LOGIT_SCALE
    value = float(np.exp(float(parameter.detach().float().cpu().reshape(-1)[0])))
    return min(value, DEFAULT_LOGIT_SCALE) if np.isfinite(value) and value > 0 else DEFAULT_LOGIT_SCALE


def model_fingerprint(encoder: Any) -> str:
    """What identifies the model's text vectors: its spec, and the size and time of local weight files."""
    spec = getattr(encoder, "spec", None)
    label = spec.label if spec is not None else type(encoder).__name__
    parts = [label, f"dim={getattr(encoder, 'dim', '?')}"]
    if spec is not None:
        candidates = [Path(spec.pretrained)] if spec.pretrained else []
        if spec.name.startswith("local-dir:"):
            folder = Path(spec.name.removeprefix("local-dir:"))
            candidates += [folder / "open_clip_model.safetensors", folder / "open_clip_pytorch_model.bin"]
        for path in candidates:
            if path.is_file():
                stat = path.stat()
                parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return " ".join(parts)


# --- helpers ---


def _assemble(
    encoder: Any, vocabulary: Vocabulary, embeddings: np.ndarray, background: np.ndarray
) -> ZeroShotClassifier:
    return ZeroShotClassifier(
        vocabulary=vocabulary.name,
        vocabulary_hash=vocabulary.content_hash,
        model=model_fingerprint(encoder),
        labels=tuple(vocabulary.label_names()),
        embeddings=embeddings,
        background=background,
        thresholds=np.asarray(vocabulary.thresholds(), dtype=np.float32),
        logit_scale=model_logit_scale(encoder),
    )


def _read_cache(base: Path, model: str, vocabulary: Vocabulary) -> tuple[np.ndarray, np.ndarray] | None:
    meta_path, array_path = base.with_suffix(".json"), base.with_suffix(".npy")
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        matrix = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable class-embedding cache %s: %s", base, exc)
        return None
    count, extra = len(vocabulary.labels), len(vocabulary.background)
    expected = {
        "format": CACHE_FORMAT,
        "model": model,
        "vocabulary_hash": vocabulary.content_hash,
        "labels": vocabulary.label_names(),
    }
    if any(meta.get(k) != v for k, v in expected.items()) or matrix.ndim != 2 or matrix.shape[0] != count + extra:
        log.warning("ignoring stale class-embedding cache %s", base)
        return None
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return matrix[:count], matrix[count:]


def _write_cache(base: Path, model: str, vocabulary: Vocabulary, classifier: ZeroShotClassifier) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    matrix = np.concatenate([classifier.embeddings, classifier.background]).astype(np.float32)
    meta = {
        "format": CACHE_FORMAT,
        "model": model,
        "vocabulary": vocabulary.name,
        "vocabulary_hash": vocabulary.content_hash,
        "labels": vocabulary.label_names(),
        "background_prompts": len(vocabulary.background),
        "dim": classifier.dim,
    }
    # The .npy first, the .json last: the .json is what makes an entry count, so a crash leaves none half-written.
    _atomic_write(base.with_suffix(".npy"), lambda f: np.save(f, matrix, allow_pickle=False))
    _atomic_write(base.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _atomic_write(path: Path, write: Any) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _encode_by_length(encoder: TextEncoder, texts: Sequence[str]) -> np.ndarray:
    """Unit embeddings of texts, in their order. They are encoded shortest first, so that each model batch holds
    texts of about the same length and stops near its longest real token (see Encoder.encode_texts)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    encoded = _unit_rows(np.asarray(encoder.encode_texts([texts[i] for i in order]), dtype=np.float32))
    vectors = np.empty_like(encoded)
    vectors[order] = encoded
    return vectors


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "vocabulary"


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"image vectors must be (N, {dim}) for this classifier, not {matrix.shape}")
    return matrix
