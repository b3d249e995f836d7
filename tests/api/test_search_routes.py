"""GET /search and GET /similar/{id}: the response shape, paging, cut-off, filters and query arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.schemas import SearchResponse
from tests.api.conftest import BASE_MTIME, DAY, Catalog

HIT_KEYS = {"id", "path", "score", "width", "height", "image_url", "thumbnail_url", "relevant"}
ALL = 200


def search(client: TestClient, **params: object) -> dict:
    response = client.get("/search", params=params)
    assert response.status_code == 200, response.text
    body: dict = response.json()
    return body


def scores_by_id(client: TestClient, q: str) -> dict[int, float]:
    return {hit["id"]: hit["score"] for hit in search(client, q=q, k=ALL)["hits"]}


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for word in words:
        assert word in detail, detail


def test_search_returns_ranked_hits_with_links(client: TestClient, catalog: Catalog) -> None:
    body = search(client, q="a dog on a beach", k=5)
    assert set(body) == {
        *("query", "model", "took_ms", "total", "offset", "k", "hits", "facets", "cutoff", "relevant_total")
    }
    assert body["query"] == "a dog on a beach"
    assert body["model"].startswith("local-dir:")
    assert body["total"] == len(catalog.files)
    assert (body["offset"], body["k"]) == (0, 5)
    assert body["took_ms"] >= 0
    assert len(body["hits"]) == 5
    scores = [hit["score"] for hit in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    for hit in body["hits"]:
        assert set(hit) == HIT_KEYS
        assert hit["image_url"] == f"/images/{hit['id']}"
        assert hit["thumbnail_url"] == f"/images/{hit['id']}/thumbnail?size=256"
        assert Path(hit["path"]) in catalog.files
        assert hit["width"] > 0 and hit["height"] > 0


def test_search_bodies_are_the_documented_model_as_json(client: TestClient) -> None:
    """The routes serialise their pages themselves: the body must still be the response model the OpenAPI schema
    documents, as JSON (uploads go through the same function as these two)."""
    schema = client.get("/openapi.json").json()
    for path in ("/search", "/similar/{image_id}"):
        ok = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": "#/components/schemas/SearchResponse"}
    first = search(client, q="a red bicycle", k=3, facets=5)
    responses = [
        client.get("/search", params={"q": "a red bicycle", "k": 3}),
        client.get(f"/similar/{first['hits'][0]['id']}", params={"k": 3}),
    ]
    for response in responses:
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = SearchResponse.model_validate_json(response.content)
        assert body.model_dump(mode="json") == response.json() and len(body.hits) == 3


def test_hits_report_upright_size_of_rotated_photo(client: TestClient, catalog: Catalog) -> None:
    hits = search(client, q="a photo", k=ALL)["hits"]
    rotated = next(h for h in hits if h["path"] == str(catalog.rotated))
    assert (rotated["width"], rotated["height"]) == (60, 120)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"q": ""}, ["empty"]),
        ({"q": "   "}, ["empty"]),
        ({}, ["q", "image_id"]),
        ({"q": "dog", "k": 0}, ["'k'"]),
        ({"q": "dog", "k": 201}, ["'k'", "200"]),
        ({"q": "dog", "k": "many"}, ["'k'"]),
        ({"q": "dog", "offset": -1}, ["'offset'"]),
        ({"q": "dog", "min_score": 1.5}, ["'min_score'"]),
        ({"q": "dog", "sort": "size"}, ["'sort'"]),
        ({"q": "dog", "format": "psd"}, ["psd", "jpeg"]),
        ({"q": "dog", "modified_after": "yesterday"}, ["'modified_after'"]),
        ({"q": "dog", "modified_after": "2021-01-01", "modified_before": "2020-01-01"}, ["modified_after"]),
        ({"q": "-people"}, ["positive"]),
        ({"q": "beach:0"}, ["weight"]),
        ({"q": ["dog", ""]}, ["empty"]),
        ({"q": ["t"] * 17}, ["at most"]),
    ],
)
def test_bad_search_parameters_are_422_with_a_hint(client: TestClient, params: dict, words: list[str]) -> None:
    assert_error(client.get("/search", params=params), 422, *words)


def test_pages_do_not_overlap_and_concatenate_to_the_unpaged_result(client: TestClient) -> None:
    for extra in ({}, {"sort": "date"}, {"prefix": "/", "min_width": 100}):
        unpaged = search(client, q="a street at night", k=ALL, **extra)
        collected: list[int] = []
        for offset in range(0, unpaged["total"] + 7, 7):
            page = search(client, q="a street at night", k=7, offset=offset, **extra)
            assert page["total"] == unpaged["total"]
            assert page["offset"] == offset
            collected += [hit["id"] for hit in page["hits"]]
        assert len(collected) == len(set(collected))
        assert collected == [hit["id"] for hit in unpaged["hits"]]


def test_offset_past_the_end_gives_an_empty_page(client: TestClient) -> None:
    body = search(client, q="a cat", offset=500)
    assert body["hits"] == [] and body["total"] > 0


def test_min_score_cuts_off_weaker_hits_and_total_counts_the_rest(client: TestClient) -> None:
    scores = sorted(scores_by_id(client, "a bowl of fruit").values(), reverse=True)
    cutoff = scores[4]
    body = search(client, q="a bowl of fruit", k=ALL, min_score=cutoff)
    assert body["total"] == sum(1 for s in scores if s >= cutoff) >= 5
    assert all(hit["score"] >= cutoff for hit in body["hits"])
    assert search(client, q="a bowl of fruit", min_score=1.0)["total"] == 0


def test_prefix_filter_keeps_one_folder(client: TestClient, catalog: Catalog) -> None:
    body = search(client, q="a photo", k=ALL, prefix=f"{catalog.trips}/")
    in_folder = [f for f in catalog.files if f.parent == catalog.trips]
    assert body["total"] == len(in_folder) > 0
    assert {hit["path"] for hit in body["hits"]} == {str(f) for f in in_folder}


def test_format_filter(client: TestClient, catalog: Catalog) -> None:
    png = search(client, q="a photo", k=ALL, format="png")
    assert [hit["path"] for hit in png["hits"]] == [str(catalog.png)]
    jpeg = search(client, q="a photo", k=ALL, format="JPG,jpeg")
    assert jpeg["total"] == len(catalog.files) - 1
    both = search(client, q="a photo", k=ALL, format="png,jpeg")
    assert both["total"] == len(catalog.files)


def test_minimum_size_filters(client: TestClient) -> None:
    everything = search(client, q="a photo", k=ALL)["hits"]
    wide = search(client, q="a photo", k=ALL, min_width=500)
    assert wide["total"] == sum(1 for h in everything if h["width"] >= 500)
    assert 0 < wide["total"] < len(everything)
    tall = search(client, q="a photo", k=ALL, min_height=500, min_width=400)
    expected = {h["id"] for h in everything if h["height"] >= 500 and h["width"] >= 400}
    assert {h["id"] for h in tall["hits"]} == expected


def test_modified_date_filters(client: TestClient, catalog: Catalog) -> None:
    # File i was modified on day i of 2020.
    after = search(client, q="a photo", k=ALL, modified_after="2020-01-11T00:00:00Z")
    assert {h["path"] for h in after["hits"]} == {str(f) for f in catalog.files[10:]}
    before = search(client, q="a photo", k=ALL, modified_before="2020-01-05")
    assert {h["path"] for h in before["hits"]} == {str(f) for f in catalog.files[:5]}
    window = search(client, q="a photo", k=ALL, modified_after="2020-01-03", modified_before="2020-01-04T00:00:00")
    assert {h["path"] for h in window["hits"]} == {str(catalog.files[2]), str(catalog.files[3])}


def test_sort_by_date_orders_newest_first_among_hits_above_the_cutoff(client: TestClient, catalog: Catalog) -> None:
    mtime = {str(f): BASE_MTIME + i * DAY for i, f in enumerate(catalog.files)}
    scores = sorted(scores_by_id(client, "mountains").values(), reverse=True)
    cutoff = scores[9]
    body = search(client, q="mountains", k=ALL, sort="date", min_score=cutoff)
    assert body["total"] == 10
    dates = [mtime[hit["path"]] for hit in body["hits"]]
    assert dates == sorted(dates, reverse=True)
    by_relevance = search(client, q="mountains", k=ALL, min_score=cutoff)
    assert {h["id"] for h in by_relevance["hits"]} == {h["id"] for h in body["hits"]}


def test_negative_term_pushes_its_images_down(client: TestClient) -> None:
    wanted, unwanted = "a dog running on grass", "a red car"
    s_wanted, s_unwanted = scores_by_id(client, wanted), scores_by_id(client, unwanted)
    plain = [h["id"] for h in search(client, q=wanted, k=ALL)["hits"]]
    combined = search(client, q=[wanted, f"-{unwanted}"], k=ALL)
    assert combined["query"] == f"{wanted} -{unwanted}"
    order = [h["id"] for h in combined["hits"]]
    # The images most like the negative term drop in the ranking...
    most_unwanted = sorted(s_unwanted, key=lambda i: -s_unwanted[i])[:3]
    assert sum(order.index(i) for i in most_unwanted) > sum(plain.index(i) for i in most_unwanted)
    # ...and the ranking is that of (similarity to the wanted term) - (similarity to the unwanted one).
    keys = [s_wanted[i] - s_unwanted[i] for i in order]
    assert all(a >= b - 1e-5 for a, b in zip(keys, keys[1:], strict=False))


def test_term_weights_scale_each_term(client: TestClient) -> None:
    s_a, s_b = scores_by_id(client, "a boat"), scores_by_id(client, "snow")
    body = search(client, q=["a boat:3", "snow:0.5"], k=ALL)
    keys = [3 * s_a[h["id"]] + 0.5 * s_b[h["id"]] for h in body["hits"]]
    assert all(a >= b - 1e-5 for a, b in zip(keys, keys[1:], strict=False))
    plus_minus = search(client, q=["a boat:3", "-snow:0.5"], k=ALL)
    keys = [3 * s_a[h["id"]] - 0.5 * s_b[h["id"]] for h in plus_minus["hits"]]
    assert all(a >= b - 1e-5 for a, b in zip(keys, keys[1:], strict=False))


def test_text_combined_with_an_indexed_image(client: TestClient, ids_by_name: dict[str, int]) -> None:
    image_id = ids_by_name["photo_003.jpg"]
    s_text = scores_by_id(client, "at night")
    s_image = {h["id"]: h["score"] for h in client.get(f"/similar/{image_id}", params={"k": ALL}).json()["hits"]}
    body = search(client, q="at night", image_id=image_id, k=ALL)
    ids = [h["id"] for h in body["hits"]]
    assert image_id not in ids and body["total"] == len(s_image)
    keys = [s_text[i] + s_image[i] for i in ids]
    assert all(a >= b - 1e-5 for a, b in zip(keys, keys[1:], strict=False))
    alone = search(client, image_id=image_id, k=ALL)
    assert [h["id"] for h in alone["hits"]] == list(s_image)


def test_unknown_image_id_in_search_is_404(client: TestClient) -> None:
    assert_error(client.get("/search", params={"q": "dog", "image_id": 999_999}), 404, "999999")


def test_similar_excludes_the_image_itself(client: TestClient, catalog: Catalog, ids_by_name: dict) -> None:
    image_id = ids_by_name["photo_005.jpg"]
    response = client.get(f"/similar/{image_id}", params={"k": ALL})
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == len(catalog.files) - 1
    assert image_id not in [h["id"] for h in body["hits"]]
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    page = client.get(f"/similar/{image_id}", params={"k": 3, "offset": 3, "min_score": -1}).json()
    assert [h["id"] for h in page["hits"]] == [h["id"] for h in body["hits"][3:6]]


@pytest.mark.parametrize(("path", "status"), [("/similar/999999", 404), ("/similar/abc", 422), ("/similar/0", 422)])
def test_similar_to_unknown_or_malformed_id(client: TestClient, path: str, status: int) -> None:
    assert_error(client.get(path), status)


def test_similar_rejects_k_out_of_range(client: TestClient, ids_by_name: dict) -> None:
    assert_error(client.get(f"/similar/{ids_by_name['photo_001.jpg']}", params={"k": 500}), 422, "'k'")


def test_repeated_text_query_is_embedded_once(client: TestClient) -> None:
    def text_encodes() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('clipsearch_encode_seconds_count{kind="text"}'):
                return float(line.split()[-1])
        return 0.0

    before = text_encodes()
    first = search(client, q="a lighthouse by the sea")
    after_first = text_encodes()
    second = search(client, q="a   lighthouse by the sea ")
    assert after_first == before + 1
    assert text_encodes() == after_first
    assert [h["id"] for h in first["hits"]] == [h["id"] for h in second["hits"]]
