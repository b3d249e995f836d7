"""Dependencies shared by the routers: the service, the settings, query options, the API key."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Query, Request, UploadFile

from app.api.errors import upload_too_large
from app.config import Settings
from app.duplicates import DupeService
from app.errors import NotReady
from app.search import (
    DEFAULT_FACETS,
    MAX_FACETS,
    Filters,
    SearchOptions,
    SearchService,
    SortOrder,
    parse_formats,
    to_timestamp,
)

MAX_PAGE = 200
MAX_ID = 2**63 - 1

# The dependencies below are async on purpose: they only read memory, so they need no thread-pool hop.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_service(request: Request) -> SearchService:
    service: SearchService | None = request.app.state.service
    if service is None:
        raise NotReady("the model is still loading: retry in a few seconds")
    return service


async def get_dupes(request: Request) -> DupeService:
    dupes: DupeService | None = getattr(request.app.state, "dupes", None)
    if dupes is None:
        raise NotReady("the model is still loading: retry in a few seconds")
    return dupes


async def search_options(
    k: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Hits per page.")] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Hits to skip (pagination).")] = 0,
    min_score: Annotated[
        float | None, Query(ge=-1.0, le=1.0, description="Leave out hits scoring below this (cosine, -1..1).")
    ] = None,
    prefix: Annotated[
        str | None,
        Query(
            max_length=4096,
            description="Only files whose absolute path starts with this (end it with '/' for one folder).",
        ),
    ] = None,
    image_format: Annotated[
        str | None,
        Query(alias="format", max_length=100, description="Only these formats, comma-separated: jpeg,png,webp..."),
    ] = None,
    min_width: Annotated[int | None, Query(ge=1, description="Only images at least this wide (pixels).")] = None,
    min_height: Annotated[int | None, Query(ge=1, description="Only images at least this tall (pixels).")] = None,
    modified_after: Annotated[
        datetime | None, Query(description="Only files modified at or after (ISO 8601; naive = UTC).")
    ] = None,
    modified_before: Annotated[
        datetime | None, Query(description="Only files modified at or before (ISO 8601; naive = UTC).")
    ] = None,
    sort: Annotated[
        SortOrder, Query(description="relevance, or date (newest first, among the hits above min_score).")
    ] = "relevance",
    tag: Annotated[
        list[str] | None,
        Query(description="Only images with this tag (see /tags); repeat for images with all of them."),
    ] = None,
    safe: Annotated[bool, Query(description="Safe search: leave out images with a safe-search flag.")] = False,
    facets: Annotated[
        int, Query(ge=0, le=MAX_FACETS, description="How many tag facets to count over the hits (0: none).")
    ] = DEFAULT_FACETS,
) -> SearchOptions:
    filters = Filters(
        prefix=prefix or None,
        formats=parse_formats(image_format),
        min_width=min_width,
        min_height=min_height,
        modified_after=to_timestamp(modified_after),
        modified_before=to_timestamp(modified_before),
    )
    return SearchOptions(
        k=k,
        offset=offset,
        min_score=min_score,
        sort=sort,
        filters=filters,
        tags=tuple(dict.fromkeys(" ".join(t.split()) for t in tag or ())),
        safe=safe,
        facets=facets,
    )


def read_upload(file: UploadFile, limit: int) -> bytes:
    """The upload's bytes, refusing more than ``limit`` without reading them all into memory."""
    file.file.seek(0)
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(status_code=413, detail=upload_too_large(limit))
    return data


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    x_api_key: Annotated[str | None, Header(description="The CLIPSEARCH_API_KEY, when one is set.")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """Admin routes: open when no CLIPSEARCH_API_KEY is set, otherwise the key must come with the request."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    given = x_api_key
    if given is None and authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if given is None or not secrets.compare_digest(given.encode(), expected):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key: send the CLIPSEARCH_API_KEY in the 'X-API-Key' header",
            headers={"WWW-Authenticate": "Bearer"},
        )


ServiceDep = Annotated[SearchService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
OptionsDep = Annotated[SearchOptions, Depends(search_options)]
DupesDep = Annotated[DupeService, Depends(get_dupes)]
