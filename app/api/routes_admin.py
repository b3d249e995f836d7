"""Admin routes; they need the CLIPSEARCH_API_KEY when one is set."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.deps import ServiceDep, require_api_key
from app.api.schemas import Reloaded, error_responses

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_api_key)])


@router.post(
    "/reload",
    response_model=Reloaded,
    summary="Load the index on disk now (it is also picked up on its own when the manifest changes)",
    responses=error_responses(401, 503),
)
def reload_index(service: ServiceDep) -> Reloaded:
    manifest = service.reload()
    return Reloaded(index_file=manifest.index_file, index_count=manifest.count, built_at=manifest.built_at)
