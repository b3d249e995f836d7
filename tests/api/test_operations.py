"""Health, readiness, metrics, the admin key, CORS, the web UI mount and the OpenAPI description."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.api import create_app, routes_admin, routes_health, routes_images, routes_search
from app.config import Settings
from app.encoder import Encoder
from app.errors import ModelLoadError
from tests.api.conftest import Catalog, api_settings, build_index
from tests.helpers import copy_photos, save_local_dir_model


def metric_value(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_reports_model_and_counts(client: TestClient, catalog: Catalog, indexed_settings: Settings) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["model"] == f"local-dir:{Path(indexed_settings.model.removeprefix('local-dir:')).resolve()}"
    assert body["images"] == body["index_count"] == len(catalog.files)
    assert (indexed_settings.index_dir / body["index_file"]).is_file()


def test_without_an_index_the_service_is_up_but_not_ready(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = api_settings(tmp_path / "empty-data", tiny_model_dir)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "clipsearch index" in ready.json()["detail"]
        assert ready.headers["retry-after"]
        for path in ("/search?q=dog", "/similar/1"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert "clipsearch index" in response.json()["detail"]


def test_index_of_another_model_is_503_saying_how_to_fix_it(
    tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Encoder, shared_data: Path
) -> None:
    copy_photos(tmp_path / "catalog", 3)
    build_index(api_settings(tmp_path / "data", tiny_model_dir), tiny_encoder, [tmp_path / "catalog"])
    other_model = save_local_dir_model(tmp_path / "other-model", seed=1)
    with TestClient(create_app(api_settings(tmp_path / "data", other_model))) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "CLIPSEARCH_MODEL" in response.json()["detail"]
        assert client.get("/search", params={"q": "dog"}).status_code == 503


def test_metrics_use_route_templates_and_count_model_and_search_time(
    client: TestClient, ids_by_name: dict[str, int], catalog: Catalog
) -> None:
    image_id = ids_by_name["photo_002.jpg"]
    assert client.get(f"/similar/{image_id}").status_code == 200
    assert client.get("/search", params={"q": "an unusual query for metrics"}).status_code == 200
    assert client.get(f"/images/{image_id}").status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'route="/similar/{image_id}"' in text
    assert 'route="/images/{image_id}"' in text
    assert f'route="/similar/{image_id}"' not in text
    assert metric_value(text, 'clipsearch_http_request_duration_seconds_count{method="GET",route="/search"}')
    assert metric_value(text, 'clipsearch_encode_seconds_count{kind="text"}')
    assert metric_value(text, "clipsearch_search_seconds_count")
    assert 'clipsearch_http_requests_total{method="GET",route="/similar/{image_id}",status="200"}' in text
    assert metric_value(text, "clipsearch_index_vectors") == len(catalog.files)
    assert (metric_value(text, "clipsearch_text_batch_texts_count") or 0) >= 1  # the query's text, alone
    assert (metric_value(text, 'clipsearch_text_batch_texts_bucket{le="1.0"}') or 0) >= 1
    deadline = time.monotonic() + 30
    while client.get("/readyz").json()["labels"] != "memory" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric_value(client.get("/metrics").text, "clipsearch_labels_in_memory") == 1


def test_each_app_has_its_own_metrics(indexed_settings: Settings) -> None:
    with TestClient(create_app(indexed_settings)) as first, TestClient(create_app(indexed_settings)) as second:
        first.get("/healthz")
        first.get("/healthz")
        second.get("/healthz")
        prefix = 'clipsearch_http_request_duration_seconds_count{method="GET",route="/healthz"}'
        assert metric_value(first.get("/metrics").text, prefix) == 2
        assert metric_value(second.get("/metrics").text, prefix) == 1


def test_admin_reload_is_open_without_a_key(client: TestClient, catalog: Catalog) -> None:
    response = client.post("/admin/reload")
    assert response.status_code == 200
    assert response.json()["index_count"] == len(catalog.files)


def test_admin_reload_needs_the_api_key_when_one_is_set(indexed_settings: Settings) -> None:
    settings = indexed_settings.with_overrides(api_key="s3cret-key")
    with TestClient(create_app(settings)) as client:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            response = client.post("/admin/reload", headers=headers)
            assert response.status_code == 401
            assert "X-API-Key" in response.json()["detail"]
        assert client.post("/admin/reload", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert client.post("/admin/reload", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert client.get("/search", params={"q": "dog"}).status_code == 200  # searching needs no key


def test_cors_is_closed_by_default(client: TestClient) -> None:
    response = client.get("/search", params={"q": "dog"}, headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options(
        "/search", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_configured_origins_only(indexed_settings: Settings) -> None:
    settings = indexed_settings.with_overrides(cors_origins=["https://ui.example"])
    with TestClient(create_app(settings)) as client:
        allowed = client.get("/search", params={"q": "dog"}, headers={"Origin": "https://ui.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
        other = client.get("/search", params={"q": "dog"}, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_web_ui_is_served_at_root_after_the_api(indexed_settings: Settings, tmp_path: Path) -> None:
    frontend = tmp_path / "frontend"
    frontend.mkdir()
    (frontend / "index.html").write_text("<!doctype html><title>clipsearch ui</title>")
    (frontend / "app.js").write_text("console.log('hi')")
    with TestClient(create_app(indexed_settings.with_overrides(frontend_dir=frontend))) as client:
        page = client.get("/")
        assert page.status_code == 200 and "clipsearch ui" in page.text
        assert client.get("/app.js").text == "console.log('hi')"
        assert client.get("/search", params={"q": "dog"}).json()["total"] > 0
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/no-such-file.js").status_code == 404


def test_no_web_ui_without_an_index_html(indexed_settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "frontend").mkdir()
    with TestClient(create_app(indexed_settings.with_overrides(frontend_dir=tmp_path / "frontend"))) as client:
        assert client.get("/").status_code == 404
        assert client.get("/healthz").status_code == 200


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/no/such/route")
    assert response.status_code == 404
    assert isinstance(response.json()["detail"], str)


def test_openapi_documents_the_query_syntax_and_the_upload_field(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/search", "/similar/{image_id}", "/search/image", "/images/{image_id}",
                 "/images/{image_id}/thumbnail", "/healthz", "/readyz", "/metrics"):  # fmt: skip
        assert path in paths, path
    q = next(p for p in paths["/search"]["get"]["parameters"] if p["name"] == "q")
    assert "q=beach&q=-people" in q["description"] and ":number" in q["description"]
    assert "1000" in paths["/search"]["get"]["description"]
    body_ref = paths["/search/image"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body_schema = schema["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert "file" in body_schema["properties"]


def test_model_work_never_runs_on_the_event_loop() -> None:
    # Async endpoints run on the event loop; the ones that embed, search or read files must be sync
    # (FastAPI runs those on its thread pool).
    heavy = {"/search", "/similar/{image_id}", "/search/image", "/images/{image_id}", "/images/{image_id}/thumbnail",
             "/readyz", "/admin/reload"}  # fmt: skip
    routers = (routes_search.router, routes_search.upload_router, routes_images.router, routes_health.router,
               routes_admin.router)  # fmt: skip
    routes = {r.path: r for router in routers for r in router.routes if isinstance(r, APIRoute)}
    assert heavy <= set(routes)
    for path in heavy:
        assert not inspect.iscoroutinefunction(routes[path].endpoint), path


@pytest.mark.parametrize("origin_setting", ["https://a.example, https://b.example"])
def test_cors_origins_setting_reads_a_comma_separated_list(origin_setting: str) -> None:
    settings = Settings.model_validate({"cors_origins": origin_setting})
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


def test_a_model_that_cannot_load_stops_startup_with_the_reason(tmp_path: Path) -> None:
    settings = api_settings(tmp_path / "data", tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="open_clip_config.json"), TestClient(create_app(settings)):
        pass
