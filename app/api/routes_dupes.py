"""Near-duplicate look-up: is an uploaded picture (or an indexed one) a copy of images in the catalog?"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Path, Query, Request, UploadFile

from app.api.deps import MAX_ID, DupesDep, SettingsDep, read_upload
from app.api.metrics import Metrics
from app.api.routes_search import _thumbnail_size
from app.api.schemas import DuplicateEvidence, DuplicateMatch, LookupResponse, error_responses
from app.dupes import Verdict
from app.duplicates import MAX_MATCHES, DupeReport

router = APIRouter(tags=["duplicates"])
upload_router = APIRouter(tags=["duplicates"])

VERDICTS = """
Each match has a verdict, with the evidence for it: `exact` (identical pixels after decoding, or pHash and dHash
equal at the same size), `near_duplicate` (an edited copy: re-encoded, resized, cropped, flipped, rotated,
recoloured, overlaid or bordered, verified by local features and pixel agreement), `similar` (the same scene or
subject, not a copy: a burst shot, a re-shoot). The thresholds are the `CLIPSEARCH_DUPE_*` settings.
"""

MinVerdictQuery = Annotated[
    Verdict, Query(description="Leave out matches weaker than this: exact, near_duplicate, similar or different.")
]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_MATCHES, description="At most this many matches.")]


def present(request: Request, report: DupeReport, query: str) -> LookupResponse:
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.observe_lookup(report.verdict.value, report.stages, report.took_ms / 1000.0, report.candidates)
    root = request.scope.get("root_path", "")
    size = _thumbnail_size(request)
    return LookupResponse(
        query=query,
        verdict=report.verdict.value,
        matches=[
            DuplicateMatch(
                id=match.id,
                path=match.path,
                width=match.width,
                height=match.height,
                image_url=f"{root}/images/{match.id}",
                thumbnail_url=f"{root}/images/{match.id}/thumbnail?size={size}",
                verdict=match.verdict.value,
                reason=match.evidence.reason,
                evidence=DuplicateEvidence(**match.evidence_dict()),
            )
            for match in report.matches
        ],
        candidates=report.candidates,
        took_ms=round(report.took_ms, 3),
    )


@upload_router.post(
    "/lookup",
    response_model=LookupResponse,
    summary="Look up copies of an uploaded image in the catalog (not stored)",
    description="Multipart upload in form field `file`, with the limits of POST /search/image: the content is "
    "sniffed, too many bytes give 413, non-images 415, images with too many pixels 413. An empty catalog answers "
    "verdict `different` with no matches; no index at all, 503." + VERDICTS,
    responses=error_responses(413, 415, 422, 503),
)
def lookup(
    request: Request,
    dupes: DupesDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The image to look up (JPEG, PNG, WebP, GIF, BMP, TIFF).")],
    min_verdict: MinVerdictQuery = Verdict.NEAR_DUPLICATE,
    limit: LimitQuery = 20,
) -> LookupResponse:
    data = read_upload(file, settings.max_upload_bytes)
    report = dupes.lookup_bytes(data, min_verdict=min_verdict, limit=limit)
    return present(request, report, f"upload:{file.filename or 'image'}")


@router.get(
    "/images/{image_id}/duplicates",
    response_model=LookupResponse,
    summary="Copies of an indexed image in the catalog (itself left out)",
    description=VERDICTS,
    responses=error_responses(404, 422, 503),
)
def duplicates(
    request: Request,
    dupes: DupesDep,
    image_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Image id from a search hit.")],
    min_verdict: MinVerdictQuery = Verdict.NEAR_DUPLICATE,
    limit: LimitQuery = 20,
) -> LookupResponse:
    report = dupes.duplicates_of(image_id, min_verdict=min_verdict, limit=limit)
    return present(request, report, f"image:{image_id}")
