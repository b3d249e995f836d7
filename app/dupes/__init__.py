"""Near-duplicate look-up with evidence (placeholder docstring, expanded below when the API settles)."""

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
from app.dupes.lookup import Candidate, LookupResult, Match, group_duplicates, lookup
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
    "verify",
]
