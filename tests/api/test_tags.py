"""Tags and safe search through the API: facets, tag filters, safe=true, /tags and /images/{id}/tags.

The catalog is 18 Caltech-101 photos (six classes) indexed with the trained instrument model, tagged with a small
vocabulary of class names and flagged with a vocabulary whose one flag, "weapons", the revolver photos get.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from app.config import Settings
from app.encoder import Encoder
from app.store import Store
from app.tagging import TaggingPlan, tag_images
from app.zeroshot import classifier_cache_dir
from tests.api.conftest import api_settings, build_index
from tests.helpers import CALTECH_TAG_VOCABULARY, WEAPON_FLAG_VOCABULARY, copy_caltech

ALL = 200


def tagged_settings(data_dir: Path, model_dir: Path, vocabularies: Path, **overrides: object) -> Settings:
    (vocabularies / "tags.yaml").write_text(CALTECH_TAG_VOCABULARY)
    (vocabularies / "flags.yaml").write_text(WEAPON_FLAG_VOCABULARY)
    values: dict[str, object] = {
        "tag_vocabulary": str(vocabularies / "tags.yaml"),
        "safe_search_vocabulary": str(vocabularies / "flags.yaml"),
        "tag_top_k": 3,
    }
    return api_settings(data_dir, model_dir, **(values | overrides))


@pytest.fixture(scope="module")
def caltech(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[Path, str]:
    return copy_caltech(tmp_path_factory.mktemp("caltech"))


@pytest.fixture(scope="module")
def tags_settings(
    tmp_path_factory: pytest.TempPathFactory,
    instrument_model_dir: Path,
    instrument_encoder: Encoder,
    caltech: dict[Path, str],
) -> Settings:
    root = tmp_path_factory.mktemp("tags-data")
    settings = tagged_settings(root / "data", instrument_model_dir, root)
    build_index(settings, instrument_encoder, [next(iter(caltech)).parent])
    return settings


@pytest.fixture(scope="module", params=["memory", "database"])
def tags_client(tags_settings: Settings, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """The service reading labels from its in-memory snapshot (the default, once built), or from the database
    (CLIPSEARCH_LABELS_IN_MEMORY=false): every test below runs on both, which must answer the same."""
    settings = tags_settings.with_overrides(labels_in_memory=request.param == "memory")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while (source := client.get("/readyz").json()["labels"]) != request.param and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source == request.param
        yield client


@pytest.fixture(scope="module")
def ids(tags_client: TestClient, caltech: dict[Path, str]) -> dict[Path, int]:
    hits = tags_client.get("/search", params={"q": "a photo", "k": ALL}).json()["hits"]
    assert len(hits) == len(caltech)
    return {Path(hit["path"]): hit["id"] for hit in hits}


def search(client: TestClient, **params: object) -> dict:  # type: ignore[type-arg]
    response = client.get("/search", params={"k": ALL, **params})  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def labels_of(client: TestClient, image_id: int) -> dict[str, list[str]]:
    response = client.get(f"/images/{image_id}/tags")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == image_id
    return {kind: [item["label"] for item in body[kind]] for kind in ("tags", "flags")}


def test_each_photo_is_tagged_with_its_class_and_only_revolvers_are_flagged(
    tags_client: TestClient, ids: dict[Path, int], caltech: dict[Path, str]
) -> None:
    for path, expected in caltech.items():
        labels = labels_of(tags_client, ids[path])
        assert labels["tags"][:1] == [expected], path.name
        assert labels["flags"] == (["weapons"] if expected == "revolver" else []), path.name
    body = tags_client.get(f"/images/{ids[next(iter(caltech))]}/tags").json()
    scores = [item["score"] for item in body["tags"]]
    assert scores == sorted(scores, reverse=True) and all(0.05 <= s <= 1 for s in scores)


def test_facets_count_the_tags_of_all_hits_above_min_score(tags_client: TestClient) -> None:
    for params in ({"q": "a photo of an animal"}, {"q": "a photo of an animal", "min_score": 0.2}):
        body = search(tags_client, facets=100, **params)
        recount = Counter(tag for hit in body["hits"] for tag in labels_of(tags_client, hit["id"])["tags"])
        assert {f["label"]: f["count"] for f in body["facets"]} == dict(recount)
        counts = [f["count"] for f in body["facets"]]
        assert counts == sorted(counts, reverse=True)
    every, cut = (
        search(tags_client, q="a photo of an animal"),
        search(tags_client, q="a photo of an animal", min_score=0.2),
    )
    assert 0 < cut["total"] < every["total"]  # the cut-off changed the hits, and so the facets
    assert sum(f["count"] for f in cut["facets"]) < sum(f["count"] for f in every["facets"])
    # over every hit, not only the page shown
    assert search(tags_client, q="a photo of an animal", k=2)["facets"] == every["facets"]
    assert len(search(tags_client, q="a photo", facets=2)["facets"]) == 2
    assert search(tags_client, q="a photo", facets=0)["facets"] == []


def test_tag_filter_keeps_images_with_every_listed_tag(
    tags_client: TestClient, ids: dict[Path, int], caltech: dict[Path, str]
) -> None:
    leopards = {ids[p] for p, tag in caltech.items() if tag == "leopard"}
    body = search(tags_client, q="an airplane", tag="leopard")
    assert {hit["id"] for hit in body["hits"]} == leopards and body["total"] == len(leopards)
    assert body["facets"][0] == {"label": "leopard", "count": len(leopards)}
    # two tags: images with both (none here), not images with either
    assert search(tags_client, q="an airplane", tag=["leopard", "revolver"])["total"] == 0
    assert search(tags_client, q="an airplane", tag="no such tag")["total"] == 0
    # filters combine with the other filters and with "more like this"
    similar = tags_client.get(f"/similar/{min(leopards)}", params={"tag": "leopard", "k": ALL}).json()
    assert {hit["id"] for hit in similar["hits"]} == leopards - {min(leopards)}


def test_safe_search_hides_flagged_images_only_when_asked(
    tags_client: TestClient, ids: dict[Path, int], caltech: dict[Path, str]
) -> None:
    revolvers = {ids[p] for p, tag in caltech.items() if tag == "revolver"}
    unsafe = search(tags_client, q="a photo of a revolver")
    assert revolvers <= {hit["id"] for hit in unsafe["hits"]}  # safe search is off by default in the API
    safe = search(tags_client, q="a photo of a revolver", safe="true")
    assert not revolvers & {hit["id"] for hit in safe["hits"]}
    assert safe["total"] == unsafe["total"] - len(revolvers) == len(caltech) - len(revolvers)
    assert all(not labels_of(tags_client, hit["id"])["flags"] for hit in safe["hits"])
    assert "revolver" not in {f["label"] for f in safe["facets"]}
    assert search(tags_client, q="a photo", safe="true", tag="revolver")["total"] == 0
    image = tags_client.get(f"/similar/{min(revolvers)}", params={"safe": "true", "k": ALL}).json()
    assert not revolvers & {hit["id"] for hit in image["hits"]}


def test_tags_lists_the_catalog_labels_with_their_counts(tags_client: TestClient, ids: dict[Path, int]) -> None:
    body = tags_client.get("/tags").json()
    assert (body["vocabulary"], body["safe_search_vocabulary"]) == ("caltech-test", "weapon-flags")
    recount: Counter[str] = Counter()
    flags: Counter[str] = Counter()
    for image_id in ids.values():
        labels = labels_of(tags_client, image_id)
        recount.update(labels["tags"])
        flags.update(labels["flags"])
    assert {t["label"]: t["count"] for t in body["tags"]} == dict(recount)
    assert [t["count"] for t in body["tags"]] == sorted(recount.values(), reverse=True)
    assert {t["label"]: t["count"] for t in body["flags"]} == {"weapons": 3}
    everything = tags_client.get("/tags", params={"all": "true"}).json()
    listed = {t["label"]: t["count"] for t in everything["tags"]}
    assert set(listed) >= {"leopard", "wrist watch", "elephant", "chair", "lamp"}
    assert all(listed[label] == recount.get(label, 0) for label in listed)


def test_bad_tag_requests_get_clear_errors(tags_client: TestClient) -> None:
    assert tags_client.get("/images/999999/tags").status_code == 404
    assert tags_client.get("/images/0/tags").status_code == 422
    response = tags_client.get("/search", params={"q": "x", "tag": [f"t{i}" for i in range(17)]})
    assert response.status_code == 422 and "tag filters" in response.json()["detail"]
    assert tags_client.get("/search", params={"q": "x", "facets": 101}).status_code == 422


def test_a_running_service_sees_new_flags_after_a_retag(
    tmp_path: Path, instrument_model_dir: Path, instrument_encoder: Encoder, caltech: dict[Path, str]
) -> None:
    settings = tagged_settings(tmp_path / "data", instrument_model_dir, tmp_path)
    build_index(settings, instrument_encoder, [next(iter(caltech)).parent])
    with TestClient(create_app(settings)) as client:
        assert search(client, q="a photo", safe="true")["total"] == len(caltech) - 3
        # Flag everything (threshold 0), as 'clipsearch tags --retag' would with this setting.
        stricter = settings.with_overrides(safe_search_thresholds={"weapons": 0.0})
        store = Store(settings.effective_database_url)
        try:
            done = tag_images(
                store,
                TaggingPlan.from_settings(stricter),
                instrument_encoder,
                instrument_encoder.spec.name,
                cache_dir=classifier_cache_dir(settings),
            )
        finally:
            store.close()
        assert done == len(caltech)
        assert search(client, q="a photo", safe="true")["total"] == 0
        assert search(client, q="a photo")["total"] == len(caltech)
