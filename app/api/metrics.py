"""Prometheus metrics, one registry per app so that tests can build many apps in one process."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.search import SearchPage

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "clipsearch_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "clipsearch_http_requests",
            "HTTP requests by route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.encode_seconds = Histogram(
            "clipsearch_encode_seconds",
            "Time in the model per query (text embeddings from the cache are not counted).",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.search_seconds = Histogram(
            "clipsearch_search_seconds",
            "Time in the index search, filters and metadata per query.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lookups = Counter(
            "clipsearch_lookups",
            "Near-duplicate look-ups (POST /lookup, /images/{id}/duplicates) by overall verdict.",
            ["verdict"],
            registry=self.registry,
        )
        self.lookup_stage_seconds = Histogram(
            "clipsearch_lookup_stage_seconds",
            "Time per look-up stage: decode, prepare (query ORB), encode (CLIP; overlaps prepare), candidates, "
            "verify, total.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lookup_candidates = Histogram(
            "clipsearch_lookup_candidates",
            "Catalog images verified per look-up.",
            buckets=(0, 1, 5, 10, 20, 50, 100, 200),
            registry=self.registry,
        )
        self.feature_images = Gauge(
            "clipsearch_dupes_feature_images",
            "Catalog images in the local-feature shortlist (below the catalog size while it is being prepared).",
            registry=self.registry,
        )
        self.index_size = Gauge(
            "clipsearch_index_vectors", "Vectors in the index being served.", registry=self.registry
        )
        self.text_batch_texts = Histogram(
            "clipsearch_text_batch_texts",
            "Texts per text-tower call: concurrent queries are encoded together (1 = a query alone).",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        self.text_token_rows = Gauge(
            "clipsearch_text_token_rows",
            "Token rows of text queries since the ONNX text tower opened: computed, or taken from the prefix cache "
            "(CLIPSEARCH_TEXT_PREFIX_CACHE_MB); 0 on torch.",
            ["kind"],
            registry=self.registry,
        )
        self.labels_in_memory = Gauge(
            "clipsearch_labels_in_memory",
            "1 while tag filters and facets read the in-memory labels snapshot, 0 while they read the database.",
            registry=self.registry,
        )

    def track_text_rows(self, rows: Callable[[], tuple[int, int]]) -> None:
        """``rows()``: the (computed, cached) token rows of the ONNX text tower, read at each scrape."""
        self.text_token_rows.labels("computed").set_function(lambda: float(rows()[0]))
        self.text_token_rows.labels("cached").set_function(lambda: float(rows()[1]))

    def track_index_size(self, count: Callable[[], float]) -> None:
        self.index_size.set_function(count)

    def track_labels_in_memory(self, in_memory: Callable[[], bool]) -> None:
        self.labels_in_memory.set_function(lambda: float(in_memory()))

    def observe_page(self, page: SearchPage, kind: str) -> None:
        if page.encode_seconds > 0:
            self.encode_seconds.labels(kind).observe(page.encode_seconds)
        self.search_seconds.observe(page.search_seconds)

    def observe_lookup(self, verdict: str, stages: Mapping[str, float], total_seconds: float, candidates: int) -> None:
        self.lookups.labels(verdict).inc()
        for stage, seconds in stages.items():
            self.lookup_stage_seconds.labels(stage).observe(seconds)
        self.lookup_stage_seconds.labels("total").observe(total_seconds)
        self.lookup_candidates.observe(candidates)

    def track_feature_images(self, count: Callable[[], float]) -> None:
        self.feature_images.set_function(count)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.request_seconds.labels(method, route).observe(seconds)
        self.requests.labels(method, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times every HTTP request and labels it with its route template ("/similar/{image_id}")."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe_request(scope["method"], _route_label(scope), status, time.perf_counter() - started)


def _route_label(scope: Scope) -> str:
    # The template, never the raw path: raw paths would make one time series per image id.
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return "unmatched"
    return path or "static"
