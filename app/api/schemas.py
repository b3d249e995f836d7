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
    relevant: bool = Field(
        default=True, description="Passed the relevance cut-off (see `cutoff`); always true with cutoff=none."
    )


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
    cutoff: float | None = Field(
        default=None,
        description="The score from which hits are relevant: the one asked for, or the one cutoff=auto chose for "
        "this query; null with cutoff=none.",
    )
    relevant_total: int | None = Field(
        default=None, description="How many of the `total` hits pass the cut-off (the rest are less relevant)."
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


class DuplicateEvidence(BaseModel):
    """The numbers behind a verdict. Distances are query -> candidate; '_mirrored': the query's mirror image."""

    cosine: float | None = Field(description="CLIP cosine similarity (null when the index does not hold it).")
    same_pixels: bool = Field(description="Identical pixels after decoding.")
    phash_distance: int = Field(description="pHash Hamming distance in bits (of 64).")
    dhash_distance: int = Field(description="dHash Hamming distance in bits (of 64).")
    phash_distance_mirrored: int
    dhash_distance_mirrored: int
    matches: int = Field(description="Local-feature (ORB) matches passing the ratio test.")
    inliers: int = Field(description="Matches consistent with one geometric transform (RANSAC).")
    inlier_ratio: float
    agreement: float = Field(description="Share of the overlap whose aligned pixels agree, 0..1.")
    model: str = Field(description="The transform fitted: similarity, affine, homography or none.")
    mirrored: bool = Field(description="The copy is a mirror image of the query.")
    query_overlap: float = Field(description="Share of the query covered by the matched region.")
    candidate_overlap: float = Field(description="Share of the catalog image covered by the matched region.")
    query_box: list[float] | None = Field(description="Matched region in the query, [x0, y0, x1, y1] pixels.")
    candidate_box: list[float] | None = Field(description="Matched region in the catalog image, pixels.")


class DuplicateMatch(BaseModel):
    id: int = Field(description="Image id of the catalog image.")
    path: str
    width: int | None
    height: int | None
    image_url: str
    thumbnail_url: str
    verdict: Literal["exact", "near_duplicate", "similar", "different"]
    reason: str = Field(description="The rule that gave the verdict, with its numbers.")
    evidence: DuplicateEvidence


class LookupResponse(BaseModel):
    query: str = Field(description="'upload:NAME' or 'image:ID'.")
    verdict: Literal["exact", "near_duplicate", "similar", "different"] = Field(
        description="The strongest relation found to any catalog image ('different': none), even when "
        "min_verdict leaves that match out."
    )
    matches: list[DuplicateMatch] = Field(description="Catalog images judged min_verdict or stronger, strongest first.")
    candidates: int = Field(description="Catalog images verified (CLIP and perceptual-hash neighbours).")
    took_ms: float


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
    inference: str = Field(default="fp32", description="CPU inference mode of the model (CLIPSEARCH_INFERENCE).")
    labels: Literal["memory", "database"] = Field(
        default="database",
        description="Where tag filters and facets read labels: the in-memory snapshot, or the database while "
        "the snapshot is built (at start, and after labels change).",
    )
    warm_up: Literal["running", "done", "failed", "off"] = Field(
        default="off",
        description="The start's warm-up of one query's path (CLIPSEARCH_WARM_UP): queries answered while it runs "
        "share the cores with it; 'failed' only means the first query pays for what it would have prepared.",
    )


class Reloaded(BaseModel):
    index_file: str
    index_count: int
    built_at: str


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and what to do about it.")


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {code: {"model": ErrorBody} for code in codes}
