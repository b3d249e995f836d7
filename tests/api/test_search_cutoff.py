"""?cutoff=auto|none|<score> on /search, /similar/{id} and POST /search/image: every hit says whether it is relevant."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Catalog

ALL = 200


def get(client: TestClient, url: str, **params: object) -> dict:
    response = client.get(url, params=params)
    assert response.status_code == 200, response.text
    body: dict = response.json()
    return body


def assert_split(body: dict) -> None:
    """Hits are relevant exactly when they reach the cut-off; relevant_total counts them over all the hits."""
    cutoff = body["cutoff"]
    assert cutoff is not None
    flags = [hit["relevant"] for hit in body["hits"]]
    assert flags == [hit["score"] >= cutoff for hit in body["hits"]]
    if len(body["hits"]) == body["total"]:
        assert body["relevant_total"] == sum(flags)


def test_without_cutoff_every_hit_is_relevant_and_no_cutoff_is_reported(client: TestClient, catalog: Catalog) -> None:
    for params in ({}, {"cutoff": "none"}):
        body = get(client, "/search", q="a dog", k=ALL, **params)
        assert body["cutoff"] is None
        assert body["relevant_total"] == body["total"] == len(catalog.files)
        assert all(hit["relevant"] for hit in body["hits"])


def test_auto_cutoff_marks_the_best_hits_relevant_and_keeps_the_others(client: TestClient, catalog: Catalog) -> None:
    body = get(client, "/search", q="a dog", k=ALL, cutoff="auto")
    assert body["total"] == len(catalog.files)  # nothing is left out, only marked
    assert_split(body)
    assert body["hits"][0]["relevant"]
    assert 1 <= body["relevant_total"] < body["total"]


def test_auto_cutoff_marks_the_same_hits_on_every_page(client: TestClient) -> None:
    full = get(client, "/search", q="a building", k=ALL, cutoff="auto")
    pages = [get(client, "/search", q="a building", k=5, offset=o, cutoff="auto") for o in range(0, full["total"], 5)]
    assert [h["relevant"] for p in pages for h in p["hits"]] == [h["relevant"] for h in full["hits"]]
    assert {p["cutoff"] for p in pages} == {full["cutoff"]}
    assert {p["relevant_total"] for p in pages} == {full["relevant_total"]}


def test_a_numeric_cutoff_is_used_as_given(client: TestClient) -> None:
    scores = [h["score"] for h in get(client, "/search", q="a car", k=ALL)["hits"]]
    middle = sorted(scores)[len(scores) // 2]
    body = get(client, "/search", q="a car", k=ALL, cutoff=str(middle))
    assert body["cutoff"] == pytest.approx(middle)
    assert_split(body)
    assert body["relevant_total"] == sum(s >= middle for s in scores)


def test_similar_and_image_id_queries_take_the_cutoff(client: TestClient, ids_by_name: dict[str, int]) -> None:
    image_id = next(iter(ids_by_name.values()))
    similar = get(client, f"/similar/{image_id}", k=ALL, cutoff="auto")
    assert_split(similar)
    assert image_id not in {h["id"] for h in similar["hits"]}
    combined = get(client, "/search", image_id=image_id, k=ALL, cutoff="auto")
    assert_split(combined)


def test_uploaded_image_queries_take_the_cutoff(client: TestClient, catalog: Catalog) -> None:
    data = catalog.files[0].read_bytes()
    response = client.post(
        "/search/image", files={"file": ("q.jpg", data, "image/jpeg")}, params={"cutoff": "auto", "k": ALL}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert_split(body)
    assert body["hits"][0]["path"] == str(catalog.files[0]) and body["hits"][0]["relevant"]


@pytest.mark.parametrize("value", ["maybe", "2", "-1.5", "nan"])
def test_an_invalid_cutoff_is_422_with_what_to_use(client: TestClient, value: str) -> None:
    response = client.get("/search", params={"q": "a dog", "cutoff": value})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "auto" in detail or "between -1 and 1" in detail, detail
    response = client.get("/similar/1", params={"cutoff": value})
    assert response.status_code == 422, response.text
