"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response

from app.api.deps import ServiceDep
from app.api.metrics import Metrics
from app.api.schemas import Health, Ready, error_responses
from app.errors import NotReady
from app.search import SearchService

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Model and index loaded (503 with the reason otherwise)",
    responses=error_responses(503),
)
def readyz(service: ServiceDep) -> Ready:
    readiness = service.readiness()
    if not readiness.ready or readiness.manifest is None:
        raise NotReady(readiness.reason or "not ready")
    manifest = readiness.manifest
    return Ready(
        model=service.spec.label,
        images=readiness.images,
        index_count=manifest.count,
        index_file=manifest.index_file,
        built_at=manifest.built_at,
        dim=manifest.dim,
        inference=getattr(service.encoder, "inference", "fp32"),
        labels="memory" if service.labels.table is not None else "database",
        warm_up=_warm_up_state(service),
    )


def _warm_up_state(service: SearchService) -> Literal["running", "done", "failed", "off"]:
    warmed = service.warmed
    if warmed is None:
        return "off"
    if not warmed.done():
        return "running"
    return "done" if warmed.exception() is None and warmed.result() is not None else "failed"


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)
