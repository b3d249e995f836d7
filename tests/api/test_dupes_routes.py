"""POST /lookup and GET /images/{id}/duplicates: copies found with evidence, the upload limits of image search.

The shared catalog (tests/api/conftest.py) holds drawing.png, a grey 300x200 copy of its first photo.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from app.api import create_app
from app.config import Settings
from app.encoder import Encoder
from tests.api.conftest import Catalog, api_settings, build_index
from tests.api.test_operations import metric_value
from tests.api.test_upload import files_under, png_header_bomb
from tests.test_duplicates import unrelated_photo

UPLOAD_LIMIT = 50_000


def post_lookup(client: TestClient, data: bytes, name: str = "query.jpg", **params: object):
    return client.post("/lookup", files={"file": (name, data, "image/jpeg")}, params=params)


def cropped_copy(path: Path, side: int = 400) -> bytes:
    """The middle 70 % of a photo, scaled down and re-encoded: an edited copy someone might post."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    image = image.crop((width * 15 // 100, height * 15 // 100, width * 85 // 100, height * 85 // 100))
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return out.getvalue()


@pytest.fixture(scope="module")
def small_upload_client(indexed_settings: Settings) -> Iterator[TestClient]:
    settings = indexed_settings.with_overrides(max_upload_bytes=UPLOAD_LIMIT, max_upload_pixels=1_000_000)
    with TestClient(create_app(settings)) as client:
        yield client


def test_lookup_finds_the_original_of_a_cropped_copy_with_evidence(
    client: TestClient, catalog: Catalog, ids_by_name: dict[str, int]
) -> None:
    original = catalog.files[5]
    response = post_lookup(client, cropped_copy(original), name="found-online.jpg")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == "upload:found-online.jpg"
    assert body["verdict"] == "near_duplicate"
    assert body["took_ms"] > 0 and body["candidates"] >= 1
    best = body["matches"][0]
    assert best["id"] == ids_by_name[original.name] and best["path"] == str(original)
    assert best["verdict"] == "near_duplicate" and best["reason"]
    assert best["image_url"] == f"/images/{best['id']}"
    assert best["thumbnail_url"].startswith(f"/images/{best['id']}/thumbnail?size=")
    evidence = best["evidence"]
    assert evidence["inliers"] >= 15 and len(evidence["candidate_box"]) == 4 and len(evidence["query_box"]) == 4
    assert {"cosine", "phash_distance", "dhash_distance", "agreement", "mirrored"} <= evidence.keys()
    assert all(m["verdict"] in ("near_duplicate", "exact") for m in body["matches"])


def test_lookup_of_a_non_image_is_415(client: TestClient) -> None:
    response = post_lookup(client, b"not a picture at all\n" * 50, name="holiday.jpg")
    assert response.status_code == 415
    assert "not a recognised image" in response.json()["detail"]


def test_lookup_too_large_is_413(small_upload_client: TestClient, catalog: Catalog) -> None:
    response = post_lookup(small_upload_client, b"\xff" * (UPLOAD_LIMIT + 1))
    assert response.status_code == 413
    assert "50,000 bytes" in response.json()["detail"]
    far_too_large = post_lookup(small_upload_client, b"\xff" * (20 * UPLOAD_LIMIT))
    assert far_too_large.status_code == 413
    assert post_lookup(small_upload_client, cropped_copy(catalog.files[3], side=200)).status_code == 200


def test_lookup_of_a_decompression_bomb_is_413(small_upload_client: TestClient) -> None:
    response = post_lookup(small_upload_client, png_header_bomb(50_000, 50_000), name="innocent.png")
    assert response.status_code == 413
    assert "pixels" in response.json()["detail"]


def test_lookup_upload_is_never_stored(client: TestClient, indexed_settings: Settings, catalog: Catalog) -> None:
    before = files_under(indexed_settings.data_dir)
    marker = cropped_copy(catalog.files[9], side=150)
    assert post_lookup(client, marker, name="secret.jpg").status_code == 200
    assert files_under(indexed_settings.data_dir) == before


def test_lookup_with_a_bad_min_verdict_is_422(client: TestClient, catalog: Catalog) -> None:
    response = post_lookup(client, cropped_copy(catalog.files[2]), min_verdict="twin")
    assert response.status_code == 422
    assert "min_verdict" in response.json()["detail"]


def test_lookup_in_an_empty_catalog_says_different(
    tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Encoder, catalog: Catalog
) -> None:
    settings = api_settings(tmp_path / "data", tiny_model_dir)
    (tmp_path / "empty").mkdir()
    build_index(settings, tiny_encoder, [tmp_path / "empty"])
    with TestClient(create_app(settings)) as client:
        response = post_lookup(client, cropped_copy(catalog.files[0]))
    assert response.status_code == 200, response.text
    assert response.json()["verdict"] == "different" and response.json()["matches"] == []


def test_lookup_without_an_index_is_503(tmp_path: Path, tiny_model_dir: Path, catalog: Catalog) -> None:
    with TestClient(create_app(api_settings(tmp_path / "data", tiny_model_dir))) as client:
        response = post_lookup(client, cropped_copy(catalog.files[0]))
    assert response.status_code == 503
    assert "clipsearch index" in response.json()["detail"]


def test_duplicates_of_an_indexed_image_find_its_copy_and_leave_it_out(
    client: TestClient, catalog: Catalog, ids_by_name: dict[str, int]
) -> None:
    image_id = ids_by_name[catalog.files[0].name]
    response = client.get(f"/images/{image_id}/duplicates")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == f"image:{image_id}"
    found = {m["id"]: m for m in body["matches"]}
    assert image_id not in found
    copy = found[ids_by_name[catalog.png.name]]  # the grey, resized copy
    assert copy["verdict"] == "near_duplicate" and copy["evidence"]["inliers"] >= 15
    assert body["verdict"] == "near_duplicate"


def test_duplicates_of_an_unknown_image_is_404(client: TestClient) -> None:
    response = client.get("/images/987654/duplicates")
    assert response.status_code == 404
    assert "987654" in response.json()["detail"]


def test_lookups_are_counted_by_verdict_with_stage_timings_in_metrics(
    indexed_settings: Settings, catalog: Catalog
) -> None:
    with TestClient(create_app(indexed_settings)) as fresh:  # its own metrics registry: counts start at zero
        assert post_lookup(fresh, cropped_copy(catalog.files[5])).json()["verdict"] == "near_duplicate"
        other = post_lookup(fresh, unrelated_photo(), name="other.jpg").json()["verdict"]
        assert other in ("similar", "different")  # not a copy (the random-weight model's cosines may say similar)
        text = fresh.get("/metrics").text
    assert metric_value(text, 'clipsearch_lookups_total{verdict="near_duplicate"}') == 1
    assert metric_value(text, f'clipsearch_lookups_total{{verdict="{other}"}}') == 1
    for stage in ("decode", "prepare", "encode", "candidates", "verify", "total"):
        assert metric_value(text, f'clipsearch_lookup_stage_seconds_count{{stage="{stage}"}}') == 2, stage
        assert (metric_value(text, f'clipsearch_lookup_stage_seconds_sum{{stage="{stage}"}}') or 0) > 0, stage
    assert metric_value(text, "clipsearch_lookup_candidates_count") == 2
    assert metric_value(text, "clipsearch_dupes_feature_images") is not None
