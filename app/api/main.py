"""The FastAPI app factory. Settings come in as an argument; the model and index load in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app.api import routes_admin, routes_dupes, routes_health, routes_images, routes_search, routes_tags
from app.api.errors import install_error_handlers
from app.api.limits import MULTIPART_OVERHEAD_BYTES, UploadLimitMiddleware
from app.api.metrics import Metrics, MetricsMiddleware
from app.config import Settings
from app.duplicates import DupeService
from app.preload import IndexPreload
from app.search import SearchService, in_background, open_service
from app.thumbnails import ThumbnailCache

log = logging.getLogger(__name__)

DEFAULT_FRONTEND_DIR = Path(__file__).resolve().parents[2] / "frontend"

DESCRIPTION = """
Semantic search over your own photos with CLIP.

* `GET /search?q=...` text to images, with query arithmetic (`q=beach&q=-people`, `q=sunset:0.5`, `image_id=`),
  `min_score`, filters (`prefix`, `format`, `min_width`, `min_height`, `modified_after`, `modified_before`),
  `sort=relevance|date` and pagination (`offset`, `k`).
* `GET /similar/{id}`, `POST /search/image` (multipart field `file`): image to images.
* `GET /images/{id}`, `GET /images/{id}/thumbnail?size=256`: the files, by id.
* Zero-shot tags: `tag=` (repeatable) and `safe=true` on the searches, `facets` in their answers;
  `GET /tags` (labels with counts), `GET /images/{id}/tags` (an image's tags and flags with scores).
* `POST /lookup` (multipart field `file`), `GET /images/{id}/duplicates`: copies of an image in the catalog
  (verdicts exact / near_duplicate / similar, with the evidence: hash distances, inliers, matched regions).
* `GET /healthz`, `GET /readyz`, `GET /metrics`: operations.

Errors are JSON `{"detail": "..."}`: 422 bad parameters, 404 unknown id, 413 upload too large, 415 not an image,
503 not ready (no index yet, or still loading).
"""


def _version() -> str:
    try:
        return version("clipsearch")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None, *, preload: IndexPreload | None = None) -> FastAPI:
    """A new app with its own metrics registry; nothing loads until the lifespan starts (but ``preload``,
    the index already being read on a background thread, see app.preload)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.warm_up:
            app.state.routes_prepared = in_background(lambda: _prepare_routes(app), name="routes")
        # Loading the model and reading the index block: do it on a worker thread.
        service = await anyio.to_thread.run_sync(_open_service, settings, preload)
        app.state.service = service
        app.state.dupes = DupeService(settings, service)
        app.state.dupes.start()  # the local-feature index of the catalog is prepared in the background
        metrics.track_index_size(lambda: service.index_count)
        metrics.track_labels_in_memory(lambda: service.labels.table is not None)
        metrics.track_text_rows(lambda: getattr(service.encoder, "text_prefix_rows", (0, 0)))
        service.text_batcher.on_batch = metrics.text_batch_texts.observe
        metrics.track_feature_images(lambda: len(app.state.dupes.features) if app.state.dupes is not None else 0)
        try:
            yield
        finally:
            app.state.dupes.close()
            app.state.dupes = None
            app.state.service = None
            service.store.close()

    app = FastAPI(title="clipsearch", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.routes_prepared = None
    app.state.service = None
    app.state.dupes = None
    app.state.thumbnails = ThumbnailCache(
        settings.data_dir / "thumbnails",
        settings.thumbnail_sizes,
        quality=settings.thumbnail_quality,
        max_pixels=settings.max_image_pixels,
    )
    install_error_handlers(app, settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", "X-API-Key"],
        )
    app.add_middleware(
        UploadLimitMiddleware, paths={"/search/image", "/lookup"}, max_upload_bytes=settings.max_upload_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.include_router(routes_health.router)
    app.include_router(routes_search.router)
    app.include_router(routes_search.upload_router, max_body_size=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    app.include_router(routes_images.router)
    app.include_router(routes_tags.router)
    app.include_router(routes_dupes.router)
    app.include_router(routes_dupes.upload_router, max_body_size=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    app.include_router(routes_admin.router)
    _mount_frontend(app, settings.frontend_dir or DEFAULT_FRONTEND_DIR)
    return app


def _open_service(settings: Settings, preload: IndexPreload | None) -> SearchService:
    service = open_service(settings, require_index=False, export_in_background=True)
    readiness = service.start(preload)
    service.labels.start()  # the labels snapshot for facets and tag filters, on a background thread
    if readiness.ready:
        log.info("ready: %s, %d images", service.spec.label, service.index_count)
    if settings.warm_up:
        service.warmed = in_background(lambda: _warm_up(service), name="warm-up")
    return service


def _warm_up(service: SearchService) -> float | None:
    """``service.warm_up()``, logged; None when it failed (the first query then pays for it, nothing more)."""
    try:
        seconds = service.warm_up()
    except Exception as exc:  # noqa: BLE001 - logged, and the service serves as it would have without it
        log.warning("warm-up failed (the first query will be slower): %s", exc)
        return None
    log.info("warmed up in %.0f ms", seconds * 1000.0)
    return seconds


def _prepare_routes(app: FastAPI) -> bool:
    """Prepare every route ahead of its first request, part of the start's warm-up: FastAPI builds the routes of an
    included router (their parameters' validators) when the first request reaches that router, on the event loop:
    12-16 ms of the first /search of a start, and of the first thumbnail, tag or look-up request. Generating the
    OpenAPI schema builds them all (about 50 ms, on this thread, while the model loads) and has /docs' schema
    ready too. False when it failed: the first requests then pay for it, nothing more."""
    try:
        app.openapi()
    except Exception as exc:  # noqa: BLE001 - logged, and every route still works unprepared
        log.warning("could not prepare the routes ahead (the first requests will be slower): %s", exc)
        return False
    return True


def _mount_frontend(app: FastAPI, folder: Path) -> None:
    """The web UI at /, after the API routes so that they take precedence."""
    if (folder / "index.html").is_file():
        app.mount("/", StaticFiles(directory=folder, html=True), name="frontend")
    else:
        log.info("no web UI: %s has no index.html", folder)
