"""Orchestration: judge a query against candidates; group a catalog's verified pairs into duplicate sets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.dupes.features import PreparedImage
from app.dupes.hashing import HashIndex
from app.dupes.settings import DupeThresholds, Verdict
from app.dupes.shortlist import FeatureIndex
from app.dupes.verdict import Evidence, compare

#: Hash neighbours: those within HASH_RADIUS bits (pHash or dHash, either orientation), at most HASH_MAX of
#: them, plus the HASH_KNN nearest by pHash whatever their distance.
HASH_RADIUS = 10
HASH_MAX = 5
HASH_KNN = 3
#: Local-feature neighbours: the FEATURE_K images with most ORB votes, if they have at least MIN_VOTES.
FEATURE_K = 6
MIN_VOTES = 6


@dataclass(frozen=True)
class Shortlisted:
    """A candidate id, which stages proposed it ("hash", "orb", "clip") and the CLIP cosine if CLIP did."""

    id: int
    sources: tuple[str, ...]
    cosine: float | None = None


def shortlist(
    query: PreparedImage,
    *,
    hashes: HashIndex | None = None,
    features: FeatureIndex | None = None,
    clip_neighbours: Iterable[tuple[int, float]] = (),
) -> list[Shortlisted]:
    """Stage 1: the union of hash neighbours, ORB-vote neighbours and the caller's CLIP (id, cosine) pairs.

    Hashes find re-encodes, resizes, colour edits and (through the mirror hashes) flips; ORB votes find
    crops, rotations, overlays and canvases; CLIP adds semantic neighbours when a real model is loaded.
    Returned in first-proposed order: hash, then ORB, then CLIP.
    """
    sources: dict[int, list[str]] = {}
    cosines: dict[int, float] = {}

    def propose(image_id: int, source: str) -> None:
        names = sources.setdefault(int(image_id), [])
        if source not in names:
            names.append(source)

    if hashes is not None:
        for neighbour in hashes.range_search(query.hashes, HASH_RADIUS)[:HASH_MAX]:
            propose(neighbour.id, "hash")
        for neighbour in hashes.search(query.hashes, HASH_KNN):
            propose(neighbour.id, "hash")
    if features is not None:
        for hit in features.search(query, FEATURE_K, min_votes=MIN_VOTES):
            propose(hit.id, "orb")
    for image_id, cosine in clip_neighbours:
        propose(image_id, "clip")
        cosines[int(image_id)] = max(float(cosine), cosines.get(int(image_id), -2.0))
    return [Shortlisted(i, tuple(names), cosines.get(i)) for i, names in sources.items()]


@dataclass(frozen=True)
class Candidate:
    """A catalog image to check: its id, prepared features and, when CLIP proposed it, the cosine."""

    id: int
    prepared: PreparedImage
    cosine: float | None = None


@dataclass(frozen=True)
class Match:
    id: int
    evidence: Evidence

    @property
    def verdict(self) -> Verdict:
        return self.evidence.verdict

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.evidence.to_dict()}


@dataclass(frozen=True)
class LookupResult:
    """The overall verdict (that of the strongest match, or 'different') and the matches, strongest first."""

    verdict: Verdict
    matches: list[Match]

    @property
    def best(self) -> Match | None:
        return self.matches[0] if self.matches else None

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "matches": [m.to_dict() for m in self.matches]}


def lookup(
    query: PreparedImage,
    candidates: Iterable[Candidate],
    *,
    thresholds: DupeThresholds | None = None,
    min_verdict: Verdict | str = Verdict.SIMILAR,
    limit: int | None = None,
) -> LookupResult:
    """Compare the query with every candidate; keep those judged ``min_verdict`` or stronger.

    Candidates come from the caller (hash neighbours, CLIP neighbours, FeatureIndex); duplicates by id are
    compared once, keeping the highest cosine. Matches are sorted by verdict, then pixel agreement and
    inliers, then cosine, then hash distance.
    """
    thresholds = thresholds or DupeThresholds()
    floor = Verdict(min_verdict)
    unique: dict[int, Candidate] = {}
    for candidate in candidates:
        known = unique.get(candidate.id)
        if known is None or (candidate.cosine or -2.0) > (known.cosine or -2.0):
            unique[candidate.id] = candidate
    matches = []
    for candidate in unique.values():
        evidence = compare(query, candidate.prepared, cosine=candidate.cosine, thresholds=thresholds)
        if evidence.verdict.at_least(floor):
            matches.append(Match(candidate.id, evidence))
    matches.sort(key=lambda m: (m.evidence.sort_key(), -m.id), reverse=True)
    if limit is not None:
        matches = matches[:limit]
    verdict = matches[0].verdict if matches else Verdict.DIFFERENT
    return LookupResult(verdict, matches)


def group_duplicates(
    pairs: Iterable[tuple[int, int, Verdict | str | Evidence]],
    *,
    min_verdict: Verdict | str = Verdict.NEAR_DUPLICATE,
) -> list[list[int]]:
    """Connected components over the pairs judged ``min_verdict`` or stronger.

    Pairs weaker than that (a burst shot is 'similar') link nothing. Returns groups of two or more ids,
    each sorted, the largest group first (ties by smallest id).
    """
    floor = Verdict(min_verdict)
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b, judged in pairs:
        verdict = judged.verdict if isinstance(judged, Evidence) else Verdict(judged)
        if not verdict.at_least(floor):
            continue
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for node in parent:
        groups.setdefault(root(node), []).append(node)
    result = [sorted(members) for members in groups.values() if len(members) > 1]
    return sorted(result, key=lambda g: (-len(g), g[0]))
