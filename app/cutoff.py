"""Adaptive relevance cut-off: which hits of one query count as relevant, with nothing tuned per catalog.

No single score threshold works: the best hit of one query can score below the unrelated hits of another, and
text and image queries score on different scales. The rule here looks at each query's own scores instead:

    cut-off = background + fraction * (best - background)

``background`` is the median score of the query over the catalog (the typical unrelated image), ``best`` the
score of its best hit, and ``fraction`` a constant per query kind. It was chosen by measurement
(``python -m benchmarks.cutoff``: fixed threshold, z-score, score-gap autocut, mixture models, null-caption
calibration and this rule, on held-out Caltech-101 classes and on CIFAR-10); the constants were fitted once on a
fixed half of the Caltech-101 classes and reach at least 0.9x the F1 of a threshold tuned on each catalog's own
labels (the oracle), text and image queries alike.

The background needs the score distribution, not only the top hits: callers pass the query's scores against the
whole catalog (a flat index) or against a fixed random sample of it (any index; a few thousand vectors estimate
a median well), and the best score among the candidates they searched. Pure numpy; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.errors import BadQuery

QueryKind = Literal["text", "image"]

#: share of the way from the background to the best hit where relevance starts (fitted on half of Caltech-101)
FRACTIONS: dict[str, float] = {"text": 0.75, "image": 0.70}

#: what ``?cutoff=`` accepts: "auto" (this module's rule), "none" (every hit passes) or a cosine score
CutoffChoice = float | Literal["auto"] | None


@dataclass(frozen=True)
class Cutoff:
    """The score from which a query's hits are relevant, and what it was derived from."""

    score: float
    background: float
    best: float
    kind: QueryKind

    def passes(self, score: float) -> bool:
        return score >= self.score


def relevance_cutoff(background_scores: np.ndarray, best_score: float, kind: QueryKind) -> Cutoff:
    """The cut-off of one query from its scores over the catalog (or a sample of it) and its best score.

    ``background_scores`` may include the relevant images (they barely move a median); non-finite values are
    ignored. With no usable background (an empty catalog sample) only hits as good as the best one pass. The best
    hit always passes, and when every score is equal every hit passes (nothing tells them apart).
    """
    if kind not in FRACTIONS:
        raise ValueError(f"unknown query kind {kind!r}: use 'text' or 'image'")
    best = float(best_score)
    if not math.isfinite(best):
        raise ValueError(f"the best score must be a finite number, got {best_score!r}")
    scores = np.asarray(background_scores, dtype=np.float64).ravel()
    scores = scores[np.isfinite(scores)]
    background = min(float(np.median(scores)), best) if scores.size else best
    score = background + FRACTIONS[kind] * (best - background)
    return Cutoff(score=min(score, best), background=background, best=best, kind=kind)


def parse_cutoff(value: str | None) -> CutoffChoice:
    """``"auto"`` -> "auto", ``"none"``/empty -> None, ``"0.25"`` -> 0.25 (a cosine score, -1..1)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("", "none"):
        return None
    if text == "auto":
        return "auto"
    try:
        number = float(text)
    except ValueError:
        raise BadQuery(
            f"cutoff must be 'auto', 'none' or a score between -1 and 1, got {value!r}: "
            "use cutoff=auto to mark the relevant hits of each query"
        ) from None
    if not math.isfinite(number) or not -1.0 <= number <= 1.0:
        raise BadQuery(f"a cutoff score must be between -1 and 1 (cosine similarity), got {value!r}")
    return number
