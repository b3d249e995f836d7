"""One query-candidate pair: every piece of evidence, and the verdict the thresholds give."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.dupes.features import PreparedImage
from app.dupes.geometry import Box, GeometricMatch, verify
from app.dupes.hashing import HashDistances
from app.dupes.settings import DupeThresholds, Verdict

# Local features contradict a close hash only when both images had plenty of keypoints to match.
_CONTRADICTING_KEYPOINTS = 100


@dataclass(frozen=True)
class Evidence:
    """Why a candidate got its verdict. Boxes are in each image's own pixels: (x0, y0, x1, y1)."""

    verdict: Verdict
    reason: str
    cosine: float | None
    hashes: HashDistances
    same_pixels: bool
    geometry: GeometricMatch

    @property
    def phash_distance(self) -> int:
        return self.hashes.best_phash

    @property
    def dhash_distance(self) -> int:
        return self.hashes.best_dhash

    @property
    def inliers(self) -> int:
        return self.geometry.inliers

    @property
    def inlier_ratio(self) -> float:
        return self.geometry.inlier_ratio

    @property
    def query_box(self) -> Box:
        return self.geometry.query_box

    @property
    def candidate_box(self) -> Box:
        return self.geometry.candidate_box

    def sort_key(self) -> tuple[float, ...]:
        """Larger is stronger: verdict, then verified agreement and inliers, then cosine, then hashes."""
        return (
            self.verdict.rank,
            round(self.geometry.agreement, 2) if self.geometry.inliers else 0.0,
            self.geometry.inliers,
            self.cosine if self.cosine is not None else -2.0,
            -(self.hashes.best_phash + self.hashes.best_dhash),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for the API and the CLI."""
        geometry = self.geometry
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "cosine": None if self.cosine is None else round(float(self.cosine), 4),
            "same_pixels": self.same_pixels,
            "phash_distance": self.hashes.phash,
            "dhash_distance": self.hashes.dhash,
            "phash_distance_mirrored": self.hashes.phash_mirror,
            "dhash_distance_mirrored": self.hashes.dhash_mirror,
            "matches": geometry.matches,
            "inliers": geometry.inliers,
            "inlier_ratio": round(geometry.inlier_ratio, 3),
            "agreement": round(geometry.agreement, 3),
            "texture_agreement": round(geometry.texture_agreement, 3),
            "model": geometry.model,
            "mirrored": geometry.mirrored,
            "query_overlap": round(geometry.query_overlap, 3),
            "candidate_overlap": round(geometry.candidate_overlap, 3),
            "query_box": geometry.query_box.as_list() if geometry.inliers else None,
            "candidate_box": geometry.candidate_box.as_list() if geometry.inliers else None,
        }


def compare(
    query: PreparedImage,
    candidate: PreparedImage,
    *,
    cosine: float | None = None,
    thresholds: DupeThresholds | None = None,
) -> Evidence:
    """Hashes, geometric verification and pixel agreement of one pair, and the verdict they give."""
    thresholds = thresholds or DupeThresholds()
    hashes = query.hashes.distances(candidate.hashes)
    same_pixels = query.pixel_digest == candidate.pixel_digest
    geometry = verify(query, candidate, thresholds)
    verdict, reason = decide(hashes, geometry, cosine, same_pixels, query, candidate, thresholds)
    return Evidence(verdict, reason, cosine, hashes, same_pixels, geometry)


def decide(
    hashes: HashDistances,
    geometry: GeometricMatch,
    cosine: float | None,
    same_pixels: bool,
    query: PreparedImage,
    candidate: PreparedImage,
    thresholds: DupeThresholds,
) -> tuple[Verdict, str]:
    """The verdict rules, in order; the reason names the rule that fired and its numbers."""
    t = thresholds
    if same_pixels:
        return Verdict.EXACT, "identical decoded pixels"
    if (
        hashes.phash == 0
        and hashes.dhash == 0
        and query.size == candidate.size
        and not _contradicted(geometry, query, candidate, t)
    ):
        return Verdict.EXACT, f"pHash and dHash distance 0 and the same size {query.width}x{query.height}"
    flip = ", mirrored" if geometry.mirrored else ""
    if geometry.is_copy(t):
        return Verdict.NEAR_DUPLICATE, (
            f"verified copy{flip}: {geometry.inliers} {geometry.model} inliers "
            f"({geometry.inlier_ratio:.0%} of matches), {geometry.agreement:.0%} of the overlap agrees "
            f"pixel-wise, overlap covers {geometry.containment:.0%} of one image"
        )
    close_hash = hashes.best_phash <= t.hash_near and hashes.best_dhash <= t.hash_near
    if close_hash and not _contradicted(geometry, query, candidate, t):
        return Verdict.NEAR_DUPLICATE, (
            f"perceptual hashes nearly equal (pHash {hashes.best_phash}, dHash {hashes.best_dhash} bits"
            f"{', mirrored' if hashes.mirrored else ''})"
        )
    if geometry.inliers >= t.similar_inliers:
        why = _not_a_copy(geometry, t)
        return Verdict.SIMILAR, f"same scene or object, not a copy{flip}: {geometry.inliers} inliers, but {why}"
    if cosine is not None and cosine >= t.similar_cosine:
        return Verdict.SIMILAR, f"CLIP cosine {cosine:.3f} >= {t.similar_cosine}, no geometric match"
    if hashes.best_phash <= t.hash_similar:
        return Verdict.SIMILAR, f"pHash distance {hashes.best_phash} <= {t.hash_similar}, no geometric match"
    return Verdict.DIFFERENT, f"no evidence of a copy ({geometry.inliers} inliers, pHash {hashes.best_phash})"


def _contradicted(geometry: GeometricMatch, query: PreparedImage, candidate: PreparedImage, t: DupeThresholds) -> bool:
    """Close hashes are overruled when both images had keypoints to spare and still do not align as copies."""
    enough = min(len(query.features), len(candidate.features)) >= _CONTRADICTING_KEYPOINTS
    return enough and not geometry.is_copy(t)


def _not_a_copy(geometry: GeometricMatch, t: DupeThresholds) -> str:
    if geometry.inliers < t.min_inliers:
        return f"fewer than {t.min_inliers} needed for a copy"
    if geometry.inlier_ratio < t.min_inlier_ratio:
        return f"they are only {geometry.inlier_ratio:.0%} of the matches (< {t.min_inlier_ratio:.0%})"
    if geometry.containment < t.min_containment:
        return f"the images only overlap ({geometry.containment:.0%} of the larger share)"
    if geometry.agreement < t.min_agreement:
        return f"only {geometry.agreement:.0%} of the overlap agrees pixel-wise (< {t.min_agreement:.0%})"
    return (
        f"only {geometry.texture_agreement:.0%} of its textured part agrees pixel-wise "
        f"(< {t.min_texture_agreement:.0%})"
    )
