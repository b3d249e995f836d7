"""Ranking regression suite: the top-10 of 20 text and 5 image queries over Caltech-101 with the trained model.

The hits are compared with a stored snapshot (tests/data/ranking/), so that a change that quietly degrades
ranking (preprocessing, index type, fast paths) fails CI. Hits whose snapshot scores are within TIE_TOLERANCE of
each other may swap places (and swap in or out at the 10th place); anything else that moves, changes score by more
than SCORE_TOLERANCE, or goes missing is reported.

Regenerate the snapshot after an intended change (and say why in the commit):

    CLIPSEARCH_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_ranking_regression.py
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from torchvision import transforms

from app.search import SearchOptions, SearchService
from tests.conftest import TrainedCatalog

SNAPSHOT = Path(__file__).parent / "data" / "ranking" / "caltech101-clipsearch-tiny-64.json"
UPDATE = os.environ.get("CLIPSEARCH_UPDATE_SNAPSHOTS") == "1"
TOP_K = 10
TIE_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-3

TEXT_QUERIES = [
    "a photo of a leopard",
    "a photo of an airplane",
    "a photo of a motorbike",
    "a photo of a centered face",
    "a photo of a sunflower",
    "a photo of a pizza",
    "a photo of a revolver",
    "a photo of a wrist watch",
    "a photo of a grand piano",
    "a photo of a butterfly",
    "a photo of a chair",
    "a photo of an elephant",
    "a photo of a lotus",
    "a photo of a ketch",
    "a photo of a bonsai",
    "a photo of a helicopter",
    "a photo of a dolphin",
    "a photo of the side of a car",
    "a red flower",
    "an animal with spots",
]
IMAGE_QUERIES = [
    "Leopards/image_0011.jpg",
    "airplanes/image_0034.jpg",
    "sunflower/image_0004.jpg",
    "pizza/image_0002.jpg",
    "revolver/image_0005.jpg",
]


@dataclass(frozen=True)
class RankedHit:
    path: str  # relative to the catalog root, e.g. 'Leopards/image_0011.jpg'
    score: float


Ranking = dict[str, list[RankedHit]]  # query key ('text: ...' / 'image: ...') -> top hits, best first


def compare_rankings(
    expected: Ranking, actual: Ranking, *, tie: float = TIE_TOLERANCE, score_tolerance: float = SCORE_TOLERANCE
) -> list[str]:
    """Readable differences between two rankings; empty when they agree up to ties and score noise."""
    problems: list[str] = []
    for query, want in expected.items():
        got = actual.get(query)
        if got is None:
            problems.append(f"{query}: missing from the new ranking")
            continue
        lines = _compare_one(want, got, tie, score_tolerance)
        if lines:
            problems.append(f"{query}:")
            problems += [f"    {line}" for line in lines]
            problems += ["    expected                                 | got"]
            for i in range(max(len(want), len(got))):
                left = f"{want[i].path} {want[i].score:.5f}" if i < len(want) else ""
                right = f"{got[i].path} {got[i].score:.5f}" if i < len(got) else ""
                problems.append(f"    {i + 1:2d}. {left:<38} | {right}")
    problems += [f"{query}: not in the snapshot" for query in actual.keys() - expected.keys()]
    return problems


def _compare_one(want: list[RankedHit], got: list[RankedHit], tie: float, score_tolerance: float) -> list[str]:
    lines: list[str] = []
    if len(got) != len(want):
        lines.append(f"{len(got)} hits instead of {len(want)}")
    want_score = {h.path: h.score for h in want}
    got_score = {h.path: h.score for h in got}
    # At the cut: an item tied with the last expected one may be replaced by another item of that tie.
    boundary = want[-1].score if want else 0.0
    for hit in want:
        if hit.path not in got_score and hit.score > boundary + tie:
            lines.append(f"missing {hit.path} (was {hit.score:.5f})")
    for hit in got:
        if hit.path not in want_score and hit.score > boundary + tie:
            lines.append(f"new {hit.path} ({hit.score:.5f}) ranks above the snapshot's 10th ({boundary:.5f})")
        elif hit.path in want_score and abs(hit.score - want_score[hit.path]) > score_tolerance:
            lines.append(f"{hit.path} scores {hit.score:.5f} instead of {want_score[hit.path]:.5f}")
    # Order: a pair may appear inverted only when their snapshot scores tie.
    common = [h.path for h in got if h.path in want_score]
    for i, first in enumerate(common):
        for second in common[i + 1 :]:
            if want_score[second] > want_score[first] + tie:
                lines.append(f"{second} now ranks below {first} (snapshot: above)")
    return lines


def ranking_of(
    catalog: TrainedCatalog,
    service: SearchService,
    preprocess: Callable[[Image.Image], object] | None = None,
) -> Ranking:
    """The top-10 of every query through the product path (the API's paged query). ``preprocess`` replaces the
    model's image preprocessing for the image queries (to show that a changed one is caught)."""
    ranking: Ranking = {}
    options = SearchOptions(k=TOP_K, facets=0)
    for text in TEXT_QUERIES:
        page = service.query([text], options=options)
        ranking[f"text: {text}"] = [RankedHit(catalog.relative(h.path), h.score) for h in page.hits]
    for name in IMAGE_QUERIES:
        path = catalog.root / name
        if preprocess is None:
            page = service.query_image_bytes(path.read_bytes(), options=options)
            hits = [RankedHit(catalog.relative(h.path), h.score) for h in page.hits]
        else:
            with Image.open(path) as image:
                pixels = preprocess(image.convert("RGB"))
            vector = service.encoder.encode_pixels(pixels[None])[0]  # type: ignore[index]
            hits = [RankedHit(catalog.relative(h.path), h.score) for h in service.search_vector(vector, TOP_K)]
        ranking[f"image: {name}"] = hits
    return ranking


def save_snapshot(ranking: Ranking, path: Path, model: str) -> None:
    payload = {
        "about": "top-10 per query; regenerate: CLIPSEARCH_UPDATE_SNAPSHOTS=1 pytest tests/test_ranking_regression.py",
        "model": model,
        "catalog": "caltech101",
        "queries": {q: [{"path": h.path, "score": round(h.score, 6)} for h in hits] for q, hits in ranking.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


def load_snapshot(path: Path) -> Ranking:
    if not path.exists():
        pytest.fail(f"no ranking snapshot at {path}: create it with CLIPSEARCH_UPDATE_SNAPSHOTS=1 pytest {__file__}")
    queries = json.loads(path.read_text())["queries"]
    return {q: [RankedHit(h["path"], float(h["score"])) for h in hits] for q, hits in queries.items()}


@pytest.fixture(scope="module")
def service(trained_caltech: TrainedCatalog) -> Iterator[SearchService]:
    service = trained_caltech.open_service()
    yield service
    service.store.close()


@pytest.fixture(scope="module")
def current(trained_caltech: TrainedCatalog, service: SearchService) -> Ranking:
    return ranking_of(trained_caltech, service)


@pytest.mark.slow
def test_ranking_matches_the_snapshot(trained_caltech: TrainedCatalog, current: Ranking) -> None:
    assert len(current) == len(TEXT_QUERIES) + len(IMAGE_QUERIES) == 25
    assert all(len(hits) == TOP_K for hits in current.values())
    if UPDATE:
        save_snapshot(current, SNAPSHOT, "clipsearch-tiny-64")
        warnings.warn(f"ranking snapshot rewritten: {SNAPSHOT}", stacklevel=1)
    problems = compare_rankings(load_snapshot(SNAPSHOT), current)
    assert not problems, "ranking differs from the snapshot (regenerate only if intended):\n" + "\n".join(problems)


@pytest.mark.slow
def test_image_query_finds_itself_first(current: Ranking) -> None:
    for name in IMAGE_QUERIES:
        top = current[f"image: {name}"][0]
        assert top.path == name and top.score == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_changed_preprocessing_is_reported(trained_caltech: TrainedCatalog, service: SearchService) -> None:
    """A preprocessing change (squash to 40 px, then up to the model's size, instead of the model's resize) moves
    image-query hits: the comparison must report it."""
    size = service.encoder.image_size
    degraded = transforms.Compose(
        [
            transforms.Resize((40, 40)),
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    problems = compare_rankings(load_snapshot(SNAPSHOT), ranking_of(trained_caltech, service, degraded))
    assert problems
    assert any(line.startswith("image: ") for line in problems)
    assert not any(line.startswith("text: ") for line in problems)  # text queries do not use preprocessing


def test_comparison_tolerates_ties_but_not_missing_or_moved_hits() -> None:
    def hits(*pairs: tuple[str, float]) -> list[RankedHit]:
        return [RankedHit(p, s) for p, s in pairs]

    snapshot = {"q": hits(("a", 0.9), ("b", 0.8), ("c", 0.79995), ("d", 0.7), ("e", 0.6))}
    tie_swapped = {"q": hits(("a", 0.9), ("c", 0.79995), ("b", 0.8), ("d", 0.7), ("e", 0.6))}
    boundary_swap = {"q": hits(("a", 0.9), ("b", 0.8), ("c", 0.79995), ("d", 0.7), ("x", 0.59995))}
    assert compare_rankings(snapshot, tie_swapped) == []
    assert compare_rankings(snapshot, boundary_swap) == []

    missing = {"q": hits(("a", 0.9), ("b", 0.8), ("c", 0.79995), ("e", 0.6), ("x", 0.55))}
    assert any("missing d" in line for line in compare_rankings(snapshot, missing))
    moved = {"q": hits(("b", 0.8), ("a", 0.9), ("c", 0.79995), ("d", 0.7), ("e", 0.6))}
    assert any("a now ranks below b" in line for line in compare_rankings(snapshot, moved))
    rescored = {"q": hits(("a", 0.95), ("b", 0.8), ("c", 0.79995), ("d", 0.7), ("e", 0.6))}
    assert any("a scores 0.95000 instead of 0.90000" in line for line in compare_rankings(snapshot, rescored))
    assert compare_rankings(snapshot, {}) == ["q: missing from the new ranking"]
