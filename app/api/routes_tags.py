"""Zero-shot tags and safe-search flags: the catalog's labels with counts, and one image's labels."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.api.deps import MAX_ID, ServiceDep
from app.api.schemas import ImageTags, ScoredLabel, TagCount, TagsResponse, error_responses
from app.store import TagKind

router = APIRouter(tags=["tags"])


@router.get(
    "/tags",
    response_model=TagsResponse,
    summary="Tags and safe-search flags in the catalog, with how many images carry each",
    responses=error_responses(503),
)
def tags(
    service: ServiceDep,
    include_unused: Annotated[
        bool, Query(alias="all", description="Also list the vocabularies' labels that no image carries (count 0).")
    ] = False,
) -> TagsResponse:
    def counts(kind: TagKind) -> list[TagCount]:
        found = service.label_counts(kind, include_unused=include_unused)
        return [TagCount(label=label, count=count) for label, count in found.items()]

    return TagsResponse(
        vocabulary=service.vocabulary_name(TagKind.TAG),
        safe_search_vocabulary=service.vocabulary_name(TagKind.FLAG),
        tags=counts(TagKind.TAG),
        flags=counts(TagKind.FLAG),
    )


@router.get(
    "/images/{image_id}/tags",
    response_model=ImageTags,
    summary="The tags and safe-search flags of one image, with their scores",
    responses=error_responses(404, 422, 503),
)
def image_tags(
    service: ServiceDep,
    image_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Image id from a search hit.")],
) -> ImageTags:
    found = service.image_tags(image_id)
    return ImageTags(
        id=image_id,
        tags=[ScoredLabel(label=t.label, score=t.score) for t in found if t.kind == TagKind.TAG],
        flags=[ScoredLabel(label=t.label, score=t.score) for t in found if t.kind == TagKind.FLAG],
    )
