"""The pure parts of search: query terms and weights, combining vectors, filters and ranking."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from app.errors import BadQuery
from app.search import (
    Filters,
    SearchOptions,
    Term,
    combine,
    parse_formats,
    parse_term,
    parse_terms,
    rank,
    top_candidates,
)
from app.store import ImageRecord


@pytest.mark.parametrize(
    ("raw", "term"),
    [
        ("beach", Term("beach", 1.0)),
        ("  sunset  over   the sea ", Term("sunset over the sea", 1.0)),
        ("-people", Term("people", -1.0)),
        ("- people", Term("people", -1.0)),
        ("+dog", Term("dog", 1.0)),
        ("sunset:0.5", Term("sunset", 0.5)),
        ("sunset : 2", Term("sunset", 2.0)),
        ("-dog:2", Term("dog", -2.0)),
        ("dog:-0.25", Term("dog", -0.25)),
        ("t-shirt", Term("t-shirt", 1.0)),
        ("note: meeting", Term("note: meeting", 1.0)),
        (":5", Term(":5", 1.0)),
    ],
)
def test_terms_and_weights(raw: str, term: Term) -> None:
    assert parse_term(raw) == term


@pytest.mark.parametrize("raw", ["", "  ", "-", "dog:0", "dog:1000", "x" * 1001])
def test_unusable_terms_are_bad_queries(raw: str) -> None:
    with pytest.raises(BadQuery):
        parse_terms([raw])


def test_combine_is_the_normalised_weighted_sum() -> None:
    a, b = np.array([1, 0, 0], np.float32), np.array([0, 1, 0], np.float32)
    np.testing.assert_allclose(combine([a, b], [1.0, -1.0]), np.array([1, -1, 0]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(combine([a, b], [3.0, 0.0001]), a, atol=1e-3)


def test_combine_needs_a_positive_term_and_terms_that_do_not_cancel() -> None:
    a = np.array([1, 0, 0], np.float32)
    with pytest.raises(BadQuery, match="positive"):
        combine([a], [-1.0])
    with pytest.raises(BadQuery, match="cancel"):
        combine([a, a], [1.0, -1.0])
    with pytest.raises(BadQuery):
        combine([], [])


def test_format_names_and_aliases() -> None:
    assert parse_formats("jpg") == {"JPEG", "MPO"}
    assert parse_formats(" PNG , .webp") == {"PNG", "WEBP"}
    assert parse_formats(None) == frozenset() == parse_formats("")
    with pytest.raises(BadQuery, match="psd"):
        parse_formats("png,psd")


def record(image_id: int, **fields: object) -> ImageRecord:
    values: dict = {
        "path": f"/photos/{image_id}.jpg",
        "width": 640,
        "height": 480,
        "format": "JPEG",
        "size": 1000,
        "mtime": 1000.0 + image_id,
        "status": "indexed",
        "error": None,
        "sha256": None,
    }
    values.update(fields)
    return ImageRecord(id=image_id, **values)


def test_filters_accept_only_matching_records() -> None:
    assert Filters(prefix="/photos/").accepts(record(1))
    assert not Filters(prefix="/other/").accepts(record(1))
    assert not Filters(formats=frozenset({"PNG"})).accepts(record(1))
    assert not Filters(min_width=641).accepts(record(1))
    assert Filters(min_width=640, min_height=480).accepts(record(1))
    assert not Filters(modified_after=1002.0).accepts(record(1))
    assert Filters(modified_after=1001.0, modified_before=1001.0).accepts(record(1))
    assert not Filters(modified_before=1000.5).accepts(record(1))
    assert not Filters().active and Filters(min_height=1).active
    with pytest.raises(BadQuery):
        Filters(modified_after=2.0, modified_before=1.0)


def test_rank_cuts_filters_and_sorts() -> None:
    records = {i: record(i, width=100 * i) for i in range(1, 6)}
    candidates = [(1, 0.9), (2, 0.8), (3, 0.8), (4, 0.5), (5, 0.1), (6, 0.95)]  # 6 has no record
    by_score = rank(candidates, records, SearchOptions(min_score=0.3))
    assert [i for i, _, _ in by_score] == [1, 2, 3, 4]
    by_date = rank(candidates, records, SearchOptions(min_score=0.3, sort="date"))
    assert [i for i, _, _ in by_date] == [4, 3, 2, 1]
    wide = rank(candidates, records, SearchOptions(filters=Filters(min_width=300)))
    assert [i for i, _, _ in wide] == [3, 4, 5]


@pytest.mark.parametrize("seed", range(5))
def test_top_candidates_orders_as_the_plain_sort(seed: int) -> None:
    """The numpy path gives what sorting (id, score) pairs in Python gives: -1 padding and excluded ids left out,
    best score first, ties (many copies of one photo) by id, cut at the depth."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, 3001, dtype=np.int64))[:1200]
    scores = rng.choice(np.linspace(-0.2, 0.4, 50).astype(np.float32), size=1200)  # many ties
    ids[rng.choice(1200, 30, replace=False)] = -1  # FAISS pads short answers with -1
    exclude = {int(ids[5]), int(ids[17]), 999_999}
    depth = 1000
    expected = sorted(
        ((int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0 and int(i) not in exclude),
        key=lambda c: (-c[1], c[0]),
    )[:depth]
    got = top_candidates(ids, scores, exclude, depth)
    assert got == expected
    assert all(type(i) is int and type(s) is float for i, s in got)
    assert (
        top_candidates(ids[:10], scores[:10], set(), 3)
        == sorted(
            ((int(i), float(s)) for i, s in zip(ids[:10], scores[:10], strict=True) if i >= 0),
            key=lambda c: (-c[1], c[0]),
        )[:3]
    )


@pytest.mark.parametrize("options", [{"k": 0}, {"k": 1001}, {"offset": -1}, {"sort": "size"}])
def test_search_options_are_checked(options: dict) -> None:
    with pytest.raises(BadQuery):
        SearchOptions(**options)


def test_naive_dates_are_utc() -> None:
    from app.search import to_timestamp

    assert to_timestamp(datetime(2020, 1, 1)) == to_timestamp(datetime(2020, 1, 1, tzinfo=UTC)) == 1_577_836_800
    assert to_timestamp(None) is None
