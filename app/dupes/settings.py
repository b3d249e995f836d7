"""Verdicts and the thresholds that decide them (one place, calibrated by benchmarks/dupes.py)."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field


class Verdict(enum.StrEnum):
    """How a candidate relates to the query, strongest first."""

    EXACT = "exact"
    NEAR_DUPLICATE = "near_duplicate"
    SIMILAR = "similar"
    DIFFERENT = "different"

    @property
    def rank(self) -> int:
        """3 for exact ... 0 for different: compare verdicts by rank."""
        return _RANK[self]

    def at_least(self, other: Verdict | str) -> bool:
        return self.rank >= Verdict(other).rank


_RANK = {Verdict.DIFFERENT: 0, Verdict.SIMILAR: 1, Verdict.NEAR_DUPLICATE: 2, Verdict.EXACT: 3}


class DupeThresholds(BaseModel):
    """Every threshold of the near-duplicate decision, with the defaults the benchmark calibrated.

    See benchmarks/results/dupes.md for the data behind each default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- matching local features ---
    ratio: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Lowe's ratio test: a match is kept when its Hamming distance is below ratio x that of "
        "the second best. 0.8 is the usual ORB value.",
    )
    ransac_px: float = Field(
        default=4.0,
        gt=0,
        description="RANSAC reprojection tolerance in work-image pixels (images are matched at 512 px).",
    )
    # --- near_duplicate: a verified, edited copy ---
    min_inliers: int = Field(
        default=15,
        ge=4,
        description="Geometric inliers needed to call a pair a copy. Unrelated photos reach at most ~11 "
        "with 1000 ORB features; copies, even cropped to 50 % or re-encoded at JPEG 10, have dozens to hundreds.",
    )
    min_inlier_ratio: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description="Inliers as a share of the ratio-test matches. A copy keeps most of its matches (99 % of "
        "them keep more than half); a repetitive pattern (a chessboard, a tiled floor) aligns a few of hundreds.",
    )
    min_agreement: float = Field(
        default=0.85,
        ge=0,
        le=1,
        description="Share of the overlapping area whose aligned pixels agree (local correlation). Copies, "
        "text overlays included, stay above it; burst shots and re-shoots of one scene (the subject moved, "
        "the viewpoint changed) align on the background but fall below it.",
    )
    min_texture_agreement: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="The same over the overlap's non-flat areas only: two product shots on white agree on "
        "their backgrounds, not on their objects.",
    )
    min_containment: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="The overlap must cover at least this share of one of the two images (a crop lies inside "
        "its original, a pasted copy inside its canvas); two views that merely overlap are 'similar'.",
    )
    hash_near: int = Field(
        default=4,
        ge=0,
        le=64,
        description="pHash and dHash both within this many bits: near_duplicate on the hashes alone, "
        "unless local features contradict it.",
    )
    # --- similar: same scene or subject, not a copy ---
    similar_inliers: int = Field(
        default=12,
        ge=4,
        description="Inliers that show the same scene or object without a verified copy.",
    )
    hash_similar: int = Field(
        default=10,
        ge=0,
        le=64,
        description="pHash within this many bits: similar (global layout alike).",
    )
    similar_cosine: float = Field(
        default=0.9,
        ge=-1,
        le=1,
        description="CLIP cosine at or above which a pair is 'similar'. Depends on the model: 0.9 suits "
        "ViT-B-32 LAION; with random weights every cosine is meaningless and this stage adds nothing.",
    )
