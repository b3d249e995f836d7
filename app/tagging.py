"""Zero-shot tags and safe-search flags of indexed images, computed from the vectors already in the store.

Two vocabularies come from the settings: the tag vocabulary (``tag_vocabulary``: the top ``tag_top_k`` labels
above their threshold are stored) and the safe-search vocabulary (``safe_search_vocabulary``: every flag above
its threshold is stored). :class:`TaggingPlan` resolves them from the settings (fast: it reads and validates
vocabulary files, it encodes nothing) and gives the *key* of a configuration: a hash of the model, of the
vocabularies' texts and of the effective thresholds. Each image records the key its labels were computed with,
so :func:`tag_images` re-labels exactly the images that are new, re-embedded, or labelled under another
configuration, from their stored vectors: changing a vocabulary or a threshold never re-embeds an image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from app.config import Settings
from app.errors import ConfigError
from app.store import Store, StoredTag, TagKind
from app.vocab import BUILTIN_VOCABULARIES, Vocabulary, resolve_vocabulary
from app.zeroshot import ZeroShotClassifier, classify, load_classifier, model_fingerprint

log = logging.getLogger(__name__)

DISABLED = "none"
#: what stored labels are keyed with when neither vocabulary is enabled (no model is involved)
DISABLED_KEY = "none"
#: images labelled per store transaction
TAG_BATCH = 1000
KEY_FORMAT = 1


@dataclass(frozen=True)
class LabelSet:
    """One configured vocabulary: its labels, their effective thresholds, and how many to keep per image."""

    kind: TagKind
    vocabulary: Vocabulary
    thresholds: tuple[float, ...]
    top_k: int | None

    def fingerprint(self) -> dict[str, Any]:
        return {
            "vocabulary": self.vocabulary.content_hash,
            "labels": self.vocabulary.label_names(),
            "thresholds": [round(t, 6) for t in self.thresholds],
            "top_k": self.top_k,
        }


def effective_thresholds(
    vocabulary: Vocabulary, override: float | Mapping[str, float] | None, setting: str
) -> tuple[float, ...]:
    """The vocabulary's per-label thresholds with a setting's override applied (one number, or some labels)."""
    base = [float(t) for t in vocabulary.thresholds()]
    if override is None:
        return tuple(base)
    if isinstance(override, int | float):
        return tuple(float(override) for _ in base)
    names = vocabulary.label_names()
    unknown = sorted(set(override) - set(names))
    if unknown:
        raise ConfigError(
            f"{setting} names {', '.join(repr(u) for u in unknown)}, not in vocabulary '{vocabulary.name}' "
            f"(its labels: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''})"
        )
    return tuple(float(override.get(name, t)) for name, t in zip(names, base, strict=True))


def _resolve(spec: str, setting: str) -> Vocabulary | None:
    spec = spec.strip()
    if spec.lower() == DISABLED:
        return None
    if spec not in BUILTIN_VOCABULARIES and not Path(spec).expanduser().exists():
        known = ", ".join(BUILTIN_VOCABULARIES)
        raise ConfigError(
            f"{setting}={spec!r} is neither a built-in vocabulary ({known}) nor an existing YAML/JSON file; "
            f"or '{DISABLED}' to switch it off"
        )
    try:
        return resolve_vocabulary(spec)
    except ConfigError as exc:
        raise ConfigError(f"{setting}: {exc}") from exc


@dataclass(frozen=True)
class TaggingPlan:
    """What the settings ask to label images with; either part may be disabled ('none')."""

    tags: LabelSet | None
    flags: LabelSet | None

    @classmethod
    def from_settings(cls, settings: Settings) -> TaggingPlan:
        tags = flags = None
        tag_vocabulary = _resolve(settings.tag_vocabulary, "CLIPSEARCH_TAG_VOCABULARY")
        if tag_vocabulary is not None:
            thresholds = effective_thresholds(tag_vocabulary, settings.tag_threshold, "CLIPSEARCH_TAG_THRESHOLD")
            tags = LabelSet(TagKind.TAG, tag_vocabulary, thresholds, settings.tag_top_k)
        flag_vocabulary = _resolve(settings.safe_search_vocabulary, "CLIPSEARCH_SAFE_SEARCH_VOCABULARY")
        if flag_vocabulary is not None:
            thresholds = effective_thresholds(
                flag_vocabulary, settings.safe_search_thresholds or None, "CLIPSEARCH_SAFE_SEARCH_THRESHOLDS"
            )
            flags = LabelSet(TagKind.FLAG, flag_vocabulary, thresholds, None)
        elif settings.safe_search_thresholds:
            raise ConfigError(
                "CLIPSEARCH_SAFE_SEARCH_THRESHOLDS is set but CLIPSEARCH_SAFE_SEARCH_VOCABULARY is 'none': "
                "enable a vocabulary or drop the thresholds"
            )
        return cls(tags, flags)

    @property
    def enabled(self) -> bool:
        return self.tags is not None or self.flags is not None

    def key(self, encoder: Any) -> str:
        """Identifies the labels this plan gives the vectors of ``encoder``'s model."""
        if not self.enabled:
            return DISABLED_KEY
        payload = {
            "v": KEY_FORMAT,
            "model": model_fingerprint(encoder),
            "tags": self.tags.fingerprint() if self.tags else None,
            "flags": self.flags.fingerprint() if self.flags else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def load(self, encoder: Any, cache_dir: Path | None, *, progress: bool = False) -> Tagger:
        """Class embeddings of both vocabularies (encoded once per model and vocabulary, then cached; ``progress``:
        a bar while one is encoded)."""
        tags = load_classifier(encoder, self.tags.vocabulary, cache_dir, progress=progress) if self.tags else None
        flags = load_classifier(encoder, self.flags.vocabulary, cache_dir, progress=progress) if self.flags else None
        return Tagger(self, self.key(encoder), tags, flags)


@dataclass(frozen=True)
class Tagger:
    """A plan with its classifiers loaded: labels image vectors."""

    plan: TaggingPlan
    key: str
    tag_classifier: ZeroShotClassifier | None
    flag_classifier: ZeroShotClassifier | None

    def label(self, vectors: np.ndarray) -> list[list[StoredTag]]:
        """Per image: its tags (best first, at most top_k) then its flags, each above its threshold."""
        out: list[list[StoredTag]] = [[] for _ in range(len(vectors))]
        parts = ((self.plan.tags, self.tag_classifier), (self.plan.flags, self.flag_classifier))
        for label_set, classifier in parts:
            if label_set is None or classifier is None:
                continue
            thresholds = dict(zip(classifier.labels, label_set.thresholds, strict=True))
            for row, found in zip(out, classify(vectors, classifier, label_set.top_k, thresholds), strict=True):
                row.extend(StoredTag(label_set.kind.value, tag.label, tag.score) for tag in found)
        return out


def tag_images(
    store: Store,
    plan: TaggingPlan,
    encoder: Any,
    model: str,
    *,
    cache_dir: Path | None,
    everything: bool = False,
    progress: bool = False,
) -> int:
    """Label the indexed images (vectors of ``model``) whose labels are missing or were computed with another
    configuration (``everything``: all of them), from their stored vectors. Returns how many were labelled.

    Each batch is one transaction that records the key on its images: an interrupted run resumes where it
    stopped. The vocabularies are only encoded (or read from ``cache_dir``) when some image needs them."""
    key = plan.key(encoder)
    todo = store.ids_to_tag(model, None if everything else key)
    if not todo:
        return 0
    if not plan.enabled:  # labels switched off: drop the old ones, no vector needed
        for i in range(0, len(todo), TAG_BATCH):
            store.save_tags({image_id: [] for image_id in todo[i : i + TAG_BATCH]}, key)
        return len(todo)
    tagger = plan.load(encoder, cache_dir, progress=progress)
    done = 0
    with tqdm(total=len(todo), unit="img", desc="tagging", disable=not progress, dynamic_ncols=True) as bar:
        for ids, vectors in store.iter_vectors_for(todo, model, chunk=TAG_BATCH):
            labels = tagger.label(vectors)
            store.save_tags({int(i): row for i, row in zip(ids, labels, strict=True)}, key)
            done += len(ids)
            bar.update(len(ids))
    log.info("tagged %d images (key %s)", done, key)
    return done


def label_names(plan: TaggingPlan, kind: TagKind) -> Sequence[str]:
    """The labels of the configured vocabulary of this kind (empty when it is disabled)."""
    label_set = plan.tags if kind is TagKind.TAG else plan.flags
    return label_set.vocabulary.label_names() if label_set else ()
