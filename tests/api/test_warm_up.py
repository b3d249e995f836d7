"""The service's start warms one query's path in the background (CLIPSEARCH_WARM_UP): the text tower, the index and the
automatic cut-off's catalog sample, without putting anything in the query cache; and the app's routes."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api import create_app
from app.config import Settings
from app.encoder import Encoder
from app.search import WARM_UP_TEXT, SearchService
from tests.api.conftest import api_settings, build_index
from tests.api.test_operations import metric_value
from tests.helpers import copy_photos

WAIT_S = 120.0


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Four real photos indexed with the tiny model; settings serving them on ONNX Runtime."""
    root = tmp_path_factory.mktemp("warm")
    copy_photos(root / "catalog", 4)
    settings = api_settings(root / "data", tiny_model_dir, inference="onnx")
    build_index(settings, Encoder.from_settings(settings), [root / "catalog"])
    return settings


def service_of(client: TestClient) -> SearchService:
    service: SearchService = client.app.state.service  # type: ignore[attr-defined]
    return service


def test_the_start_warms_the_text_tower_the_index_and_the_cutoff_sample(
    served: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real = SearchService.warm_up

    def held(self: SearchService) -> float:
        release.wait(WAIT_S)
        return real(self)

    monkeypatch.setattr(SearchService, "warm_up", held)
    with TestClient(create_app(served)) as client:
        service = service_of(client)
        assert client.get("/readyz").json()["warm_up"] == "running"
        release.set()
        assert service.warmed is not None
        seconds = service.warmed.result(timeout=WAIT_S)
        assert seconds is not None and seconds > 0
        assert client.get("/readyz").json()["warm_up"] == "done"
        warmed = client.get("/metrics").text
        # the warm-up's tokens ran through the tower; nothing of it is a cached query
        assert metric_value(warmed, 'clipsearch_text_token_rows{kind="computed"}') >= len(WARM_UP_TEXT.split()) + 2
        assert len(service.text_cache) == 0
        # the cut-off's sample is read, for the index being served
        background = service._background
        assert background is not None and background[0] is service._index and len(background[1]) == 4
        body = client.get("/search", params={"q": f"{WARM_UP_TEXT} dog", "k": 4, "cutoff": "auto"}).json()
        assert body["cutoff"] is not None and len(body["hits"]) == 4
        after = client.get("/metrics").text
    # the query took "<start> a photo of a" from the warm-up's prefixes
    cached = metric_value(after, 'clipsearch_text_token_rows{kind="cached"}')
    assert cached >= len(WARM_UP_TEXT.split()) + 1


def routes_prepared(app: FastAPI) -> Future[bool] | None:
    prepared: Future[bool] | None = app.state.routes_prepared
    return prepared


def app_routes_prepared(app: FastAPI) -> bool:
    """What the start's preparing of the routes returned (waiting for it)."""
    prepared = routes_prepared(app)
    assert prepared is not None, "the start did not prepare the routes"
    return prepared.result(timeout=WAIT_S)


def test_the_start_prepares_every_route_ahead_of_its_first_request(served: Settings) -> None:
    app = create_app(served)
    assert routes_prepared(app) is None and app.openapi_schema is None
    with TestClient(app) as client:
        assert app_routes_prepared(app) is True
        # the schema that preparing them builds, for every router the app includes
        paths: set[str] = set(app.openapi_schema["paths"]) if app.openapi_schema else set()
        assert {"/search", "/images/{image_id}/thumbnail", "/tags", "/lookup", "/readyz"} <= paths
        assert client.get("/search", params={"q": "a dog", "k": 2}).status_code == 200


def test_routes_that_cannot_be_prepared_ahead_are_logged_and_still_answer(
    served: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(served)

    def broken() -> dict[str, object]:
        raise ValueError("a schema nobody can write")

    app.openapi = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="app.api.main"), TestClient(app) as client:
        assert app_routes_prepared(app) is False
        assert client.get("/search", params={"q": "a dog", "k": 2}).status_code == 200
    assert "could not prepare the routes ahead (the first requests will be slower): a schema nobody" in caplog.text


def test_no_warm_up_when_turned_off(served: Settings) -> None:
    app = create_app(served.model_copy(update={"warm_up": False}))
    with TestClient(app) as client:
        service = service_of(client)
        assert client.get("/readyz").status_code == 200
        assert service.warmed is None and service._background is None
        assert client.get("/readyz").json()["warm_up"] == "off"
        assert routes_prepared(app) is None and app.openapi_schema is None
        assert metric_value(client.get("/metrics").text, 'clipsearch_text_token_rows{kind="computed"}') == 0


def test_a_failed_warm_up_is_logged_and_the_service_still_answers(
    served: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: SearchService) -> float:
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(SearchService, "warm_up", broken)
    with caplog.at_level(logging.WARNING, logger="app.api.main"), TestClient(create_app(served)) as client:
        service = service_of(client)
        assert service.warmed is not None and service.warmed.result(timeout=WAIT_S) is None
        assert client.get("/readyz").json()["warm_up"] == "failed"
        response = client.get("/search", params={"q": "a dog", "k": 2})
        assert response.status_code == 200 and len(response.json()["hits"]) == 2
    assert "warm-up failed (the first query will be slower): the disk went away" in caplog.text


def test_a_new_index_gets_its_cutoff_sample_read_ahead(tiny_model_dir: Path, tmp_path: Path) -> None:
    # a service started before its first index: once a query has swapped the index in, its sample is read ahead
    settings = api_settings(tmp_path / "data", tiny_model_dir, inference="onnx")
    copy_photos(tmp_path / "catalog", 3)
    with TestClient(create_app(settings)) as client:
        service = service_of(client)
        assert service.warmed is not None and service.warmed.result(timeout=WAIT_S) is not None
        assert client.get("/search", params={"q": "a dog"}).status_code == 503 and service.sample_read is None
        build_index(settings, Encoder.from_settings(settings), [tmp_path / "catalog"])
        assert client.get("/search", params={"q": "a dog"}).json()["total"] == 3  # the query that swaps it in
        assert service.sample_read is not None
        sample = service.sample_read.result(timeout=WAIT_S)
        assert len(sample) == 3 and service._background is not None and service._background[0] is service._index
        manifest = service.reload()  # the admin reload reads it ahead too
        assert manifest.count == 3 and service.sample_read.result(timeout=WAIT_S) is service._background[1]
    off = settings.model_copy(update={"warm_up": False})
    with TestClient(create_app(off)) as client:
        service = service_of(client)
        service.reload()
        assert service.sample_read is None and service._background is None
