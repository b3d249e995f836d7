"""Near-duplicate and copy look-up with evidence: pure functions, no store, no HTTP.

A look-up runs in three stages, each usable on its own:

1. **Candidates** -- ``shortlist(query, hashes=HashIndex, features=FeatureIndex, clip_neighbours=[(id, cos)])``:
   perceptual-hash neighbours (re-encodes, resizes, colour edits, flips through the mirror hashes), ORB-vote
   neighbours (crops, rotations, overlays, canvases, no model needed) and the CLIP neighbours the caller found.
2. **Verification** -- ``verify(query, candidate)``: ORB matches + ratio test + RANSAC (similarity, affine or
   homography, the simplest that explains the matches), retried with the mirrored query; gives the inliers,
   the matched region in both images, and how much of the aligned overlap agrees pixel-wise.
3. **Verdict** -- ``compare(query, candidate, cosine=None)`` -> ``Evidence``: exact / near_duplicate / similar /
   different with the reason and every number behind it; ``lookup`` does it for many candidates and sorts.

Thresholds live in ``DupeThresholds`` (pydantic, frozen); defaults are calibrated by ``python -m
benchmarks.dupes`` (see benchmarks/results/dupes.md for the data and the reasoning).

Public API
----------
Preparing images (decode and EXIF-rotate first, e.g. with ``app.imaging.decode_image``)::

    prepare_query(image: PIL.Image) -> PreparedImage            # 1000 ORB keypoints, also of the mirror image
    prepare_catalog_image(image: PIL.Image) -> PreparedImage    # 500 keypoints, no mirror; keep it
    PreparedImage.to_bytes() -> bytes / PreparedImage.from_bytes(data) -> PreparedImage
        # ~25-40 kB for a catalog image (descriptors, keypoints, a 256-px grey JPEG thumbnail); from_bytes
        # raises ValueError for another FEATURES_VERSION: prepare the image again.
    PreparedImage.width, .height, .pixel_digest, .hashes: ImageHashes, .features, .mirrored, .thumb

Hashes (what the store keeps per image: ``dataclasses.asdict(h)`` keys are ``HASH_FIELDS``)::

    ImageHashes.of(image) -> ImageHashes(phash, dhash, phash_mirror, dhash_mirror)   # unsigned 64-bit ints
    ImageHashes.from_dict(d) / .as_dict() / .distances(other) -> HashDistances
    hamming(a: int, b: int) -> int
    pack_hashes(values: Sequence[int]) -> np.ndarray   # (n, 8) uint8 codes for a FAISS binary index
    HashIndex(): .add(ids, hashes) .remove(ids) .get(id) .range_search(query: ImageHashes, radius) .search(query, k)
        -> list[HashNeighbour(id, distances)]  (queried with the query's normal and mirror hashes)

Local-feature shortlist (in memory; ``app.dupes.cache`` keeps it and the prepared catalog images on disk)::

    FeatureIndex.build(ids, prepared) -> FeatureIndex; .add(ids, prepared) .remove(ids)
    FeatureIndex.search(query: PreparedImage, k, min_votes=1) -> list[FeatureHit(id, votes, mirrored)]

Comparing and looking up::

    verify(query, candidate, thresholds=None) -> GeometricMatch
        (matches, inliers, inlier_ratio, model, mirrored, agreement, texture_agreement, query_overlap,
         candidate_overlap,
         query_box: Box, candidate_box: Box, transform: 3x3 candidate px -> query px)
    compare(query, candidate, *, cosine=None, thresholds=None) -> Evidence
        (verdict: Verdict, reason: str, cosine, hashes: HashDistances, same_pixels, geometry; .to_dict())
    shortlist(query, *, hashes=None, features=None, clip_neighbours=()) -> list[Shortlisted(id, sources, cosine)]
    lookup(query, candidates: Iterable[Candidate(id, prepared, cosine=None)], *, thresholds=None,
           min_verdict="similar", limit=None) -> LookupResult(verdict, matches: list[Match(id, evidence)])
    group_duplicates(pairs: Iterable[(id_a, id_b, Verdict | str | Evidence)], *, min_verdict="near_duplicate")
        -> list[list[int]]   # connected components, largest first; 'similar' pairs (burst shots) link nothing

Verdicts (``Verdict``, a StrEnum with ``.rank`` and ``.at_least``)::

    exact           identical decoded pixels, or pHash = dHash = 0 at the same size (not contradicted)
    near_duplicate  an edited copy: >= min_inliers RANSAC inliers (>= min_inlier_ratio of the matches),
                    >= min_agreement of the aligned overlap agrees
                    (and >= min_texture_agreement of its non-flat part), the overlap fills >= min_containment
                    of one image; or pHash and dHash <= hash_near when local features cannot judge
    similar         same scene or object without a verified copy: >= similar_inliers inliers (a burst shot, a
                    re-shoot, a stereo pair), or CLIP cosine >= similar_cosine, or pHash <= hash_similar
    different       none of the above

Example (the service side)::

    query = prepare_query(decode_image(data, max_pixels=...).image)
    listed = shortlist(query, hashes=hash_index, features=feature_index, clip_neighbours=clip_hits)
    result = lookup(query, [Candidate(s.id, load_prepared(s.id), s.cosine) for s in listed])
    result.to_dict()  # {"verdict": "near_duplicate", "matches": [{"id": 12, "verdict": ..., "reason": ...}]}

Costs on one core of a 2-core AMD EPYC: prepare_query 30-50 ms, shortlist 10-40 ms at 15k images, compare
2-8 ms per candidate. FAISS binary searches are tiny: on a busy machine run FAISS single-threaded
(``faiss.omp_set_num_threads(1)``), OpenMP spin-waiting can make them 100x slower.
"""

from app.dupes.features import (
    FEATURES_VERSION,
    LocalFeatures,
    PreparedImage,
    pixel_digest,
    prepare_catalog_image,
    prepare_image,
    prepare_query,
)
from app.dupes.geometry import Box, GeometricMatch, verify
from app.dupes.hashing import (
    HASH_FIELDS,
    HashDistances,
    HashIndex,
    HashNeighbour,
    ImageHashes,
    hamming,
    pack_hashes,
)
from app.dupes.lookup import Candidate, LookupResult, Match, Shortlisted, group_duplicates, lookup, shortlist
from app.dupes.settings import DupeThresholds, Verdict
from app.dupes.shortlist import FeatureHit, FeatureIndex
from app.dupes.verdict import Evidence, compare

__all__ = [
    "FEATURES_VERSION",
    "HASH_FIELDS",
    "Box",
    "Candidate",
    "DupeThresholds",
    "Evidence",
    "FeatureHit",
    "FeatureIndex",
    "GeometricMatch",
    "HashDistances",
    "HashIndex",
    "HashNeighbour",
    "ImageHashes",
    "LocalFeatures",
    "LookupResult",
    "Match",
    "PreparedImage",
    "Shortlisted",
    "Verdict",
    "compare",
    "group_duplicates",
    "hamming",
    "lookup",
    "pack_hashes",
    "pixel_digest",
    "prepare_catalog_image",
    "prepare_image",
    "prepare_query",
    "shortlist",
    "verify",
]
