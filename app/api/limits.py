"""Upload size limit, checked on the declared length before any byte of the body is read."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import upload_too_large

# Multipart framing around the file: the body limit is the upload limit plus this.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class UploadLimitMiddleware:
    """413 as JSON {"detail": ...} for a declared Content-Length over the limit on the upload routes.

    A body sent without a length (chunked) is counted by the route's own ``max_body_size`` limiter instead,
    and the upload itself is checked against the exact limit when it is read.
    """

    def __init__(self, app: ASGIApp, *, paths: set[str], max_upload_bytes: int) -> None:
        self.app = app
        self.paths = paths
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_upload_bytes + MULTIPART_OVERHEAD_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                response = JSONResponse(
                    {"detail": upload_too_large(self.max_upload_bytes)},
                    status_code=413,
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
