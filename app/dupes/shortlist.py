"""Candidate shortlist by local features: catalog images that share many ORB descriptors with the query.

Hashes miss crops, rotations and overlays, and CLIP neighbours need a real model. Voting with the query's
ORB descriptors against the catalog's finds an edited copy without either: every query descriptor looks up
its nearest catalog descriptors (a FAISS binary multi-index hash, no training, exact Hamming distances)
and votes for the images they belong to; the images with the most votes are verified geometrically.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from app.dupes.features import DESCRIPTOR_BYTES, PreparedImage

#: Strongest descriptors per catalog image that are indexed (memory: 32 bytes + 8 for the id each).
PER_IMAGE = 200
#: Strongest descriptors of the query (and of its mirror image) that vote.
PER_QUERY = 500
#: A vote needs a descriptor within this Hamming distance (of 256 bits); unrelated ones sit near 128.
VOTE_BITS = 48
NEIGHBOURS = 4


class FeatureIndex:
    """Shortlists catalog images by counting query descriptors whose near neighbours they hold."""

    def __init__(
        self,
        *,
        per_image: int = PER_IMAGE,
        per_query: int = PER_QUERY,
        vote_bits: int = VOTE_BITS,
        nhash: int = 16,
    ) -> None:
        self.per_image = per_image
        self.per_query = per_query
        self.vote_bits = vote_bits
        bits = DESCRIPTOR_BYTES * 8
        self._index = faiss.IndexBinaryMultiHash(bits, nhash, bits // nhash)
        self._index.nflip = 0
        self._owner: list[np.ndarray] = []
        self._owners = np.zeros(0, dtype=np.int64)
        self._ids: set[int] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids: Sequence[int], prepared: Sequence[PreparedImage]) -> None:
        """Index the strongest ``per_image`` descriptors of each image (ids must be new)."""
        chunks, owners = [], []
        for image_id, item in zip(ids, prepared, strict=True):
            if int(image_id) in self._ids:
                raise ValueError(f"image {image_id} is already in the feature index")
            descriptors = item.features.descriptors[: self.per_image]
            chunks.append(descriptors)
            owners.append(np.full(len(descriptors), int(image_id), dtype=np.int64))
            self._ids.add(int(image_id))
        if not chunks:
            return
        codes = np.ascontiguousarray(np.concatenate(chunks))
        if len(codes):
            self._index.add(codes)
            self._owners = np.concatenate([self._owners, *owners])

    def search(self, query: PreparedImage, k: int) -> list[tuple[int, int]]:
        """Up to ``k`` (image id, votes) pairs, most votes first; both orientations of the query vote."""
        if not self._ids or k <= 0 or self._index.ntotal == 0:
            return []
        sets = [query.features] + ([query.mirrored] if query.mirrored is not None else [])
        codes = np.ascontiguousarray(np.concatenate([f.descriptors[: self.per_query] for f in sets]))
        if len(codes) == 0:
            return []
        distances, rows = self._index.search(codes, NEIGHBOURS)
        hit = (rows >= 0) & (distances <= self.vote_bits)
        owners = np.where(hit, self._owners[np.clip(rows, 0, None)], -1)
        # One vote per query descriptor and image, however many of its descriptors matched.
        voter = np.repeat(np.arange(len(codes)), NEIGHBOURS)
        pairs = np.unique(np.stack([voter, owners.ravel()], axis=1)[owners.ravel() >= 0], axis=0)
        if len(pairs) == 0:
            return []
        images, votes = np.unique(pairs[:, 1], return_counts=True)
        order = np.lexsort((images, -votes))[:k]
        return [(int(images[i]), int(votes[i])) for i in order]
