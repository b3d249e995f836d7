"""Image files by id: the original (looked up in the store, never a path from the request) and thumbnails."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse

from app.api.deps import MAX_ID, ServiceDep, SettingsDep
from app.api.schemas import error_responses
from app.thumbnails import THUMBNAIL_MEDIA_TYPES, ThumbnailCache, ThumbnailFormat, media_type

router = APIRouter(tags=["images"])

ImageIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="Image id from a search hit.")]
IMAGE_HEADERS = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}


@router.get(
    "/images/{image_id}",
    response_class=FileResponse,
    summary="The original image file",
    responses={200: {"content": {"image/*": {}}}, **error_responses(404, 422, 503)},
)
def original(image_id: ImageIdPath, service: ServiceDep) -> FileResponse:
    record = service.image_record(image_id)
    return FileResponse(
        record.path,
        media_type=media_type(record.format, record.path),
        filename=FsPath(record.path).name,
        content_disposition_type="inline",
        headers=IMAGE_HEADERS,
    )


@router.get(
    "/images/{image_id}/thumbnail",
    response_class=FileResponse,
    summary="An upright thumbnail (made once, then served from the disk cache)",
    responses={200: {"content": {"image/jpeg": {}, "image/webp": {}}}, **error_responses(404, 422, 503)},
)
def thumbnail(
    request: Request,
    image_id: ImageIdPath,
    service: ServiceDep,
    settings: SettingsDep,
    size: Annotated[int, Query(description="Longest side in pixels; one of CLIPSEARCH_THUMBNAIL_SIZES.")] = 256,
    image_format: Annotated[
        ThumbnailFormat | None, Query(alias="format", description="jpeg or webp (default: the server's setting).")
    ] = None,
) -> FileResponse:
    thumbnails: ThumbnailCache = request.app.state.thumbnails
    thumbnails.check_size(size)
    record = service.image_record(image_id)
    fmt = image_format or settings.thumbnail_format
    return FileResponse(thumbnails.get(record, size, fmt), media_type=THUMBNAIL_MEDIA_TYPES[fmt], headers=IMAGE_HEADERS)
