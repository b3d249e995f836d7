"""Geometric verification: ORB matches + RANSAC, the matched region in both images, pixel agreement."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import faiss
import numpy as np

from app.dupes.features import DESCRIPTOR_BYTES, LocalFeatures, PreparedImage
from app.dupes.settings import DupeThresholds

# The agreement check compares the two grey thumbnails after alignment, in CELL x CELL blocks of the query
# thumbnail: a block agrees when its local correlation is at least NCC_AGREE, or when both blocks are flat.
# Blocks clipped to black or white in one image (over-exposure after a brightness edit) say nothing and are
# left out. Two readings (benchmarks/dupes.py calibrated both):
# - agreement: both blurred by BLUR_SIGMA, best correlation over shifts of up to SHIFT pixels, so that JPEG
#   noise, resampling and a pixel of misregistration do not count against a copy;
# - texture agreement: blurred by TEXTURE_SIGMA, no shift, over the blocks that are not flat in both images:
#   a white product-shot background agrees with any other, the objects on it must agree too.
CELL = 12
BLUR_SIGMA = 1.5
SHIFT = 1
TEXTURE_SIGMA = 1.0
NCC_AGREE = 0.6
FLAT_STD = 2.0
# A model with more degrees of freedom is kept only with this many times the inliers (+2) of a simpler one.
MODEL_GAIN = 1.1
# ... and a homography is only tried when the simpler models leave this share of the matches unexplained.
HOMOGRAPHY_WORTH = 0.9
MAX_ANISOTROPY = 4.0


@dataclass(frozen=True)
class Box:
    """An axis-aligned region in original-image pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    def as_list(self) -> list[float]:
        return [round(self.x0, 1), round(self.y0, 1), round(self.x1, 1), round(self.y1, 1)]


EMPTY_BOX = Box(0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class GeometricMatch:
    """The outcome of aligning a candidate onto the query.

    ``transform`` maps candidate pixels to query pixels (original images, the query unmirrored);
    ``query_box``/``candidate_box`` bound the overlap of the two images in each one's pixels.
    """

    matches: int
    inliers: int
    inlier_ratio: float
    model: str  # "similarity" | "affine" | "homography" | "none"
    mirrored: bool
    agreement: float
    texture_agreement: float
    query_overlap: float
    candidate_overlap: float
    query_box: Box
    candidate_box: Box
    transform: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def containment(self) -> float:
        """How much of the more covered image the overlap fills (1.0: one image lies inside the other)."""
        return max(self.query_overlap, self.candidate_overlap)

    def is_copy(self, thresholds: DupeThresholds) -> bool:
        return (
            self.inliers >= thresholds.min_inliers
            and self.inlier_ratio >= thresholds.min_inlier_ratio
            and self.agreement >= thresholds.min_agreement
            and self.texture_agreement >= thresholds.min_texture_agreement
            and self.containment >= thresholds.min_containment
        )


NO_MATCH = GeometricMatch(0, 0, 0.0, "none", False, 0.0, 0.0, 0.0, 0.0, EMPTY_BOX, EMPTY_BOX)


def match_features(query: LocalFeatures, candidate: LocalFeatures, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Ratio-test matches as (candidate points, query points), each (n, 2) in work pixels."""
    if len(query) < 2 or len(candidate) < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    index = faiss.IndexBinaryFlat(DESCRIPTOR_BYTES * 8)
    index.add(candidate.descriptors)
    distances, neighbours = index.search(query.descriptors, 2)
    keep = np.nonzero(distances[:, 0] < ratio * distances[:, 1])[0]
    return candidate.points[neighbours[keep, 0]], query.points[keep]


def _fit(
    src: np.ndarray, dst: np.ndarray, ransac_px: float, enough: int, frame: tuple[int, int]
) -> tuple[str, np.ndarray, int]:
    """The simplest model that explains the matches: (model, 3x3 matrix, inliers).

    A similarity (rotation, uniform scale, translation) covers resizes, crops and rotations and, having the
    fewest degrees of freedom, aligns most precisely; an affine or a homography must earn its extra freedom
    with MODEL_GAIN more inliers. The homography is tried only once ``enough`` inliers are found: among
    random matches its RANSAC runs all its iterations (~30 ms) for a spurious fit.
    """
    best: tuple[str, np.ndarray, int] = ("none", np.eye(3), 0)
    for model, estimate in (("similarity", cv2.estimateAffinePartial2D), ("affine", cv2.estimateAffine2D)):
        matrix, mask = estimate(src, dst, method=cv2.RANSAC, ransacReprojThreshold=ransac_px, maxIters=2000)
        if matrix is None or mask is None:
            continue
        full = np.vstack([matrix, [0.0, 0.0, 1.0]])
        inliers = int(mask.sum())
        if inliers > best[2] * MODEL_GAIN + 2 and _plausible(full):
            best = (model, full, inliers)
    if enough <= best[2] < HOMOGRAPHY_WORTH * len(src) and len(src) >= 4:
        homography, mask = cv2.findHomography(src, dst, cv2.RANSAC, ransac_px, maxIters=1000, confidence=0.995)
        if homography is not None and mask is not None:
            inliers = int(mask.sum())
            if inliers > best[2] * MODEL_GAIN + 2 and _plausible(homography) and _keeps_convex(homography, frame):
                best = ("homography", homography, inliers)
    return best


def _plausible(matrix: np.ndarray) -> bool:
    """Rejects collapsed, exploded, or strongly sheared fits that RANSAC finds among random matches."""
    if not np.all(np.isfinite(matrix)) or abs(matrix[2, 2]) < 1e-9:
        return False
    linear = matrix[:2, :2] / matrix[2, 2]
    if np.linalg.det(linear) <= 0:  # a reflection: flips are matched through the mirrored query instead
        return False
    singular = np.linalg.svd(linear, compute_uv=False)
    if singular[1] < 1e-3 or singular[0] / singular[1] > MAX_ANISOTROPY:
        return False
    return 1 / 16 <= float(np.sqrt(singular[0] * singular[1])) <= 16


def _keeps_convex(matrix: np.ndarray, frame: tuple[int, int]) -> bool:
    """A homography that folds the candidate's frame (a view through the horizon) is no copy's."""
    quad = _project(matrix, _rect(*frame))
    return bool(np.all(np.isfinite(quad)) and cv2.isContourConvex(quad.reshape(-1, 1, 2)))


def _rect(width: float, height: float) -> np.ndarray:
    return np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)


def _project(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    projected = cv2.perspectiveTransform(points.reshape(-1, 1, 2).astype(np.float64), matrix)
    return projected.reshape(-1, 2).astype(np.float32)


def _overlap(matrix: np.ndarray, source: tuple[int, int], target: tuple[int, int]) -> tuple[float, np.ndarray]:
    """Share of ``target`` covered by ``source`` mapped through ``matrix``, and the overlap's bounds."""
    quad = _project(matrix, _rect(*source))
    if not np.all(np.isfinite(quad)) or not cv2.isContourConvex(quad.reshape(-1, 1, 2)):
        return 0.0, np.zeros(4, np.float32)
    area, polygon = cv2.intersectConvexConvex(quad, _rect(*target))
    if polygon is None or area <= 0:
        return 0.0, np.zeros(4, np.float32)
    polygon = polygon.reshape(-1, 2)
    bounds = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])
    return float(area) / float(target[0] * target[1]), bounds


def _cells(values: np.ndarray) -> np.ndarray:
    rows, cols = values.shape[0] // CELL, values.shape[1] // CELL
    trimmed = values[: rows * CELL, : cols * CELL]
    return trimmed.reshape(rows, CELL, cols, CELL).transpose(0, 2, 1, 3).reshape(rows * cols, CELL * CELL)


def pixel_agreement(query_thumb: np.ndarray, candidate_thumb: np.ndarray, matrix: np.ndarray) -> tuple[float, float]:
    """(agreement, texture agreement) of the query thumbnail's overlap cells (see CELL above).

    ``matrix`` maps candidate-thumbnail pixels to query-thumbnail pixels.
    """
    height, width = query_thumb.shape
    if height < CELL or width < CELL:
        return 0.0, 0.0
    warped = cv2.warpPerspective(candidate_thumb, matrix, (width, height), flags=cv2.INTER_LINEAR)
    inside = cv2.warpPerspective(
        np.full(candidate_thumb.shape, 255, np.uint8), matrix, (width, height), flags=cv2.INTER_NEAREST
    )
    query, candidate = query_thumb.astype(np.float32), warped.astype(np.float32)
    valid = _cells(inside).min(axis=1) > 0

    a = _cells(cv2.GaussianBlur(query, (0, 0), BLUR_SIGMA))
    blurred = cv2.GaussianBlur(candidate, (0, 0), BLUR_SIGMA)
    b = _cells(blurred)
    centred = _centred(a)
    best = np.max([_ncc(centred, _cells(_shifted(blurred, dy, dx))) for dy, dx in _SHIFTS], axis=0)
    agree, counted = _judge_cells(a, b, best, valid)
    agreement = float(agree[counted].mean()) if counted.any() else 0.0

    a = _cells(cv2.GaussianBlur(query, (0, 0), TEXTURE_SIGMA))
    b = _cells(cv2.GaussianBlur(candidate, (0, 0), TEXTURE_SIGMA))
    agree, counted = _judge_cells(a, b, _ncc(_centred(a), b), valid)
    textured = counted & ((a.std(axis=1) >= FLAT_STD) | (b.std(axis=1) >= FLAT_STD))
    texture = float(agree[textured].mean()) if textured.any() else 0.0
    return agreement, texture


_SHIFTS = [(dy, dx) for dy in range(-SHIFT, SHIFT + 1) for dx in range(-SHIFT, SHIFT + 1)]


def _shifted(values: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return np.roll(values, (dy, dx), axis=(0, 1)) if dy or dx else values


def _centred(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells minus their means, and their norms: the part of a correlation that one side can reuse."""
    centred = cells - cells.mean(axis=1, keepdims=True)
    return centred, np.sqrt(np.einsum("ij,ij->i", centred, centred))


def _ncc(a: tuple[np.ndarray, np.ndarray], b: np.ndarray) -> np.ndarray:
    """Per-cell normalised cross-correlation of centred cells ``a`` with cells ``b``."""
    b_centred, b_norm = _centred(b)
    return np.einsum("ij,ij->i", a[0], b_centred) / np.maximum(a[1] * b_norm, 1e-6)


def _judge_cells(a: np.ndarray, b: np.ndarray, ncc: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(agreeing cells, cells that count) for per-cell correlations ``ncc``."""
    std_a, std_b = a.std(axis=1), b.std(axis=1)
    both_flat = (std_a < FLAT_STD) & (std_b < FLAT_STD)
    agree = both_flat | ((std_a >= FLAT_STD) & (std_b >= FLAT_STD) & (ncc >= NCC_AGREE))
    clipped = (a.min(axis=1) >= 250) | (a.max(axis=1) <= 5) | (b.min(axis=1) >= 250) | (b.max(axis=1) <= 5)
    return agree, valid & ~(clipped & ~both_flat)


def _scale_matrix(factor: float) -> np.ndarray:
    return np.diag([factor, factor, 1.0])


def _mirror_matrix(width: int) -> np.ndarray:
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _align(
    query: PreparedImage, candidate: PreparedImage, mirrored: bool, thresholds: DupeThresholds
) -> GeometricMatch | None:
    query_features = query.mirrored if mirrored else query.features
    if query_features is None:
        return None
    src, dst = match_features(query_features, candidate.features, thresholds.ratio)
    if len(src) < 3:
        return None
    model, matrix, inliers = _fit(
        src, dst, thresholds.ransac_px, thresholds.similar_inliers, candidate.features.work_size
    )
    if model == "none":
        return GeometricMatch(len(src), 0, 0.0, "none", mirrored, 0.0, 0.0, 0.0, 0.0, EMPTY_BOX, EMPTY_BOX)

    q_work, c_work = query_features.work_size, candidate.features.work_size
    query_overlap, q_bounds = _overlap(matrix, c_work, q_work)
    try:
        inverse = np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        return None
    candidate_overlap, c_bounds = _overlap(inverse, q_work, c_work)

    agreement = texture = 0.0
    if inliers >= thresholds.similar_inliers:
        q_thumb = np.ascontiguousarray(query.thumb[:, ::-1]) if mirrored else query.thumb
        to_q_thumb = _scale_matrix(q_thumb.shape[1] / q_work[0])
        from_c_thumb = _scale_matrix(c_work[0] / candidate.thumb.shape[1])
        agreement, texture = pixel_agreement(q_thumb, candidate.thumb, to_q_thumb @ matrix @ from_c_thumb)

    # Back to original pixels, with the query unmirrored.
    unmirror = _mirror_matrix(q_work[0]) if mirrored else np.eye(3)
    to_query = _scale_matrix(1 / query_features.scale) @ unmirror
    transform = to_query @ matrix @ _scale_matrix(candidate.features.scale)
    qx0, qy0, qx1, qy1 = (float(v) / query_features.scale for v in q_bounds)
    if mirrored:
        qx0, qx1 = query.width - qx1, query.width - qx0
    cx0, cy0, cx1, cy1 = (float(v) / candidate.features.scale for v in c_bounds)
    return GeometricMatch(
        matches=len(src),
        inliers=inliers,
        inlier_ratio=inliers / len(src),
        model=model,
        mirrored=mirrored,
        agreement=agreement,
        texture_agreement=texture,
        query_overlap=min(1.0, query_overlap),
        candidate_overlap=min(1.0, candidate_overlap),
        query_box=_clip(Box(qx0, qy0, qx1, qy1), query.width, query.height),
        candidate_box=_clip(Box(cx0, cy0, cx1, cy1), candidate.width, candidate.height),
        transform=transform / transform[2, 2],
    )


def _clip(box: Box, width: int, height: int) -> Box:
    return Box(
        min(max(box.x0, 0.0), width),
        min(max(box.y0, 0.0), height),
        min(max(box.x1, 0.0), width),
        min(max(box.y1, 0.0), height),
    )


def verify(query: PreparedImage, candidate: PreparedImage, thresholds: DupeThresholds | None = None) -> GeometricMatch:
    """Align ``candidate`` onto ``query`` with ORB + RANSAC; the mirrored query is tried when the direct
    alignment does not verify a copy. Returns NO_MATCH when there is nothing to align."""
    thresholds = thresholds or DupeThresholds()
    best: GeometricMatch | None = None
    for mirrored in (False, True):
        found = _align(query, candidate, mirrored, thresholds)
        if found is None:
            continue
        if best is None or _strength(found, thresholds) > _strength(best, thresholds):
            best = found
        if best.is_copy(thresholds):
            break
    return best or NO_MATCH


def _strength(match: GeometricMatch, thresholds: DupeThresholds) -> tuple[bool, int]:
    return (match.is_copy(thresholds), match.inliers)
