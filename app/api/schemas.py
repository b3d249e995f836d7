"""Response bodies of the API (the contract the web UI codes against)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class SearchHit(BaseModel):
    id: int = Field(description="Image id; use it with /images/{id} and /similar/{id}.")
    path: str = Field(description="Absolute path of the file on the server.")
    score: float = Field(description="Cosine similarity to the query, -1..1 (higher is closer).")
    width: int | None = Field(description="Width in pixels, upright (EXIF orientation applied).")
    height: int | None = Field(description="Height in pixels, upright.")
    image_url: str = Field(description="The original file.")
    thumbnail_url: str = Field(description="A small upright JPEG/WebP of it.")


class TagCount(BaseModel):
    label: str = Field(description="A tag (or flag) of the configured vocabulary.")
    count: int = Field(description="How many images carry it (among the hits, for search facets).")


class SearchResponse(BaseModel):
    query: str = Field(description="The query as understood (terms, image id or upload name).")
    model: str = Field(description="The CLIP model that embedded the catalog and the query.")
    took_ms: float = Field(description="Server time for the query, in milliseconds.")
    total: int = Field(
        description="Hits passing min_score and the filters among the top candidates (at most the "
        "candidate depth, CLIPSEARCH_SEARCH_MAX_CANDIDATES, 1000 by default)."
    )
    offset: int
    k: int
    hits: list[SearchHit]
    facets: list[TagCount] = Field(
        default_factory=list,
        description="The most frequent tags over all the hits (not only this page), most first; filter with tag=.",
    )


class ScoredLabel(BaseModel):
    label: str
    score: float = Field(description="Zero-shot probability, 0..1 (stored only above the label's threshold).")


class ImageTags(BaseModel):
    id: int
    tags: list[ScoredLabel] = Field(description="Its best tags, best first (CLIPSEARCH_TAG_TOP_K at most).")
    flags: list[ScoredLabel] = Field(description="Its safe-search flags; safe=true hides an image that has any.")


class TagsResponse(BaseModel):
    vocabulary: str | None = Field(description="The tag vocabulary (CLIPSEARCH_TAG_VOCABULARY); null: disabled.")
    safe_search_vocabulary: str | None = Field(description="The flag vocabulary; null: disabled.")
    tags: list[TagCount] = Field(description="Tags with the number of images carrying them, most first.")
    flags: list[TagCount] = Field(description="Safe-search flags with the number of images carrying them.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    images: int = Field(description="Images the store holds as indexed with this model.")
    index_count: int = Field(description="Vectors in the index being served.")
    index_file: str
    built_at: str
    dim: int


class Reloaded(BaseModel):
    index_file: str
    index_count: int
    built_at: str


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and what to do about it.")


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {code: {"model": ErrorBody} for code in codes}
