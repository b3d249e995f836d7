"""The one place where domain errors (app.errors) become HTTP responses: JSON {"detail": "..."}."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import Settings
from app.errors import (
    BadQuery,
    ClipSearchError,
    ConfigError,
    ImageTooLarge,
    IndexMismatch,
    ModelLoadError,
    NotFound,
    NotReady,
    StoreError,
    UnsupportedImage,
)

log = logging.getLogger(__name__)

# First match wins: keep subclasses above their bases.
STATUS_BY_ERROR: tuple[tuple[type[ClipSearchError], int], ...] = (
    (BadQuery, 422),
    (NotFound, 404),
    (ImageTooLarge, 413),
    (UnsupportedImage, 415),
    (NotReady, 503),
    (IndexMismatch, 503),
    (ModelLoadError, 503),
    (StoreError, 503),
    (ConfigError, 500),
)
RETRY_AFTER_SECONDS = "5"

_WHERE = {"query": "query parameter", "path": "path parameter", "body": "form field", "header": "header"}


def status_for(exc: ClipSearchError) -> int:
    for error_type, status in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return status
    return 400


def upload_too_large(limit: int) -> str:
    return (
        f"the upload is larger than the limit of {limit:,} bytes ({limit / 1_048_576:.1f} MiB): send a smaller "
        "image (or raise CLIPSEARCH_MAX_UPLOAD_BYTES)"
    )


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """FastAPI's error list as one sentence per problem: where, what, and the value received."""
    parts = []
    for error in errors:
        loc = [str(x) for x in error.get("loc", ())]
        where = f"{_WHERE.get(loc[0], loc[0])} '{'.'.join(loc[1:])}'" if len(loc) > 1 else "request"
        message = str(error.get("msg", "invalid value"))
        if error.get("type") == "missing":
            hint = ": upload the image as multipart form field 'file'" if loc[-1:] == ["file"] else ""
            parts.append(f"{where} is required{hint}")
            continue
        received = error.get("input")
        got = f" (got {received!r})" if isinstance(received, str | int | float) and len(repr(received)) < 80 else ""
        parts.append(f"{where}: {message}{got}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, settings: Settings) -> None:
    async def domain_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ClipSearchError)
        status = status_for(exc)
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
        if status >= 500:
            log.warning("%s: %s", exc.__class__.__name__, exc)
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": describe_validation_errors(exc.errors())}, status_code=422)

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail
        if exc.status_code == 413:
            # Starlette's body limiter (a streamed upload over the route's max_body_size) says only this.
            detail = upload_too_large(settings.max_upload_bytes)
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(ClipSearchError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
