"""Candidate shortlist by local features: catalog images that share many ORB descriptors with the query.

Hashes miss crops, rotations and overlays, and CLIP neighbours need a real model. Voting with the query's ORB
descriptors finds an edited copy without either: each query descriptor (of the image and of its mirror image)
looks up its nearest catalog descriptor and, when that is within VOTE_BITS, votes for the image it belongs to.
The images with the most votes go on to geometric verification.

The descriptors live in a FAISS binary IVF index whose coarse centroids are descriptors sampled from the
catalog (no k-means training: on ORB codes it shortlists as well as trained centroids, and builds in a second).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from app.dupes.features import DESCRIPTOR_BYTES, PreparedImage

#: Strongest descriptors per catalog image that are indexed (32 bytes + 8 for the owner id each).
PER_IMAGE = 400
#: Strongest descriptors of the query, and of its mirror image, that vote.
PER_QUERY = 300
#: A vote needs a descriptor within this Hamming distance (of 256 bits); unrelated ones sit near 128.
VOTE_BITS = 48
#: IVF lists probed per query descriptor.
NPROBE = 4
#: When no image gets DEEP_BELOW votes (a small crop, a heavy edit, or no copy at all), vote again with
#: DEEP_PER_QUERY descriptors and DEEP_NPROBE probes: the easy majority of look-ups stays fast (~20 ms of CPU
#: at 7k images), the hard ones get the effort (~65 ms).
DEEP_BELOW = 12
DEEP_PER_QUERY = 500
DEEP_NPROBE = 8
_BITS = DESCRIPTOR_BYTES * 8


@dataclass(frozen=True)
class FeatureHit:
    """A shortlisted image: its id, the votes it got, and whether the mirrored query voted for it more."""

    id: int
    votes: int
    mirrored: bool


def _nlist_for(count: int) -> int:
    """About 1.4 sqrt(n) lists (a power of two, 64..16384): the coarse search and the list scans then cost
    about the same, ~1000 descriptors per list for a 7k-image catalog."""
    target = 1.4 * np.sqrt(max(count, 1))
    return int(min(16384, max(64, 2 ** round(np.log2(target)))))


class FeatureIndex:
    """Shortlists catalog images by counting query descriptors whose nearest catalog descriptor they hold.

    Build it from the whole catalog (``FeatureIndex.build``); ``add`` later images as they come. When the
    catalog has grown several times over since the build, build it again (lists get long, search slows).
    """

    def __init__(
        self,
        centroids: np.ndarray | None,
        *,
        index: faiss.IndexBinaryIVF | None = None,
        per_image: int = PER_IMAGE,
        per_query: int = PER_QUERY,
        vote_bits: int = VOTE_BITS,
        nprobe: int = NPROBE,
        deep_below: int = DEEP_BELOW,
        deep_per_query: int = DEEP_PER_QUERY,
        deep_nprobe: int = DEEP_NPROBE,
    ) -> None:
        self.per_image = per_image
        self.deep_below = deep_below
        self.deep_per_query = deep_per_query
        self.deep_nprobe = deep_nprobe
        self._nprobe = nprobe
        self.per_query = per_query
        self.vote_bits = vote_bits
        if index is None:
            if centroids is None:
                raise ValueError("a FeatureIndex needs centroids or a deserialised index")
            self._quantizer = faiss.IndexBinaryFlat(_BITS)
            self._quantizer.add(np.ascontiguousarray(centroids, dtype=np.uint8))
            index = faiss.IndexBinaryIVF(self._quantizer, _BITS, len(centroids))
            index.is_trained = True
        self._index = index
        self._ids: set[int] = set()

    @classmethod
    def build(
        cls,
        ids: Sequence[int],
        prepared: Sequence[PreparedImage],
        *,
        per_image: int = PER_IMAGE,
        seed: int = 0,
        **options: int,
    ) -> FeatureIndex:
        """An index sized for these images, holding them."""
        codes = [p.features.descriptors for p in prepared]
        return cls.build_from_descriptors(ids, codes, per_image=per_image, seed=seed, **options)

    @classmethod
    def build_from_descriptors(
        cls,
        ids: Sequence[int],
        codes: Sequence[np.ndarray],
        *,
        per_image: int = PER_IMAGE,
        seed: int = 0,
        **options: int,
    ) -> FeatureIndex:
        """``build`` from each image's descriptors (strongest first), as a feature cache holds them."""
        codes = [c[:per_image] for c in codes]
        total = sum(len(c) for c in codes)
        rng = np.random.default_rng(seed)
        if total:
            pool = np.concatenate(codes)
            picks = rng.choice(total, size=min(total, _nlist_for(total)), replace=False)
            centroids = pool[np.sort(picks)]
        else:  # an empty catalog: random centroids until real descriptors arrive
            centroids = rng.integers(0, 256, size=(64, DESCRIPTOR_BYTES), dtype=np.uint8)
        index = cls(centroids, per_image=per_image, **options)  # type: ignore[arg-type]  # options are ints
        index.add_descriptors(ids, codes)
        return index

    def serialize(self) -> np.ndarray:
        """The FAISS index as bytes (uint8 array), for ``deserialize``; the ids held go alongside."""
        return np.asarray(faiss.serialize_index_binary(self._index), dtype=np.uint8)

    @classmethod
    def deserialize(cls, data: np.ndarray, ids: Sequence[int], **options: int) -> FeatureIndex:
        """The index ``serialize`` gave, holding the descriptors of ``ids`` (what was added to it)."""
        index = faiss.deserialize_index_binary(np.ascontiguousarray(data, dtype=np.uint8))
        if not isinstance(index, faiss.IndexBinaryIVF):
            index = faiss.downcast_IndexBinary(index)
        if not isinstance(index, faiss.IndexBinaryIVF) or index.d != _BITS:
            raise RuntimeError("not a binary IVF index of ORB descriptors")
        restored = cls(None, index=index, **options)
        restored._ids = {int(i) for i in ids}
        return restored

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._ids

    def add(self, ids: Sequence[int], prepared: Sequence[PreparedImage]) -> None:
        """Index the strongest ``per_image`` descriptors of each image (replacing those of a known id)."""
        if len(ids) != len(prepared):
            raise ValueError(f"{len(ids)} ids but {len(prepared)} prepared images")
        self.add_descriptors(ids, [item.features.descriptors for item in prepared])

    def add_descriptors(self, ids: Sequence[int], codes: Sequence[np.ndarray]) -> None:
        """``add`` from each image's descriptors (strongest first)."""
        if len(ids) != len(codes):
            raise ValueError(f"{len(ids)} ids but {len(codes)} descriptor sets")
        self.remove([i for i in ids if int(i) in self._ids])
        chunks, owners = [], []
        for image_id, descriptors in zip(ids, codes, strict=True):
            descriptors = np.asarray(descriptors[: self.per_image], dtype=np.uint8)
            chunks.append(descriptors)
            owners.append(np.full(len(descriptors), int(image_id), dtype=np.int64))
            self._ids.add(int(image_id))
        if chunks and sum(len(c) for c in chunks):
            self._index.add_with_ids(np.ascontiguousarray(np.concatenate(chunks)), np.concatenate(owners))

    def remove(self, ids: Sequence[int]) -> int:
        present = [int(i) for i in ids if int(i) in self._ids]
        if present:
            self._index.remove_ids(np.asarray(present, dtype=np.int64))  # type: ignore[arg-type]
            self._ids.difference_update(present)
        return len(present)

    def search(self, query: PreparedImage, k: int, *, min_votes: int = 1) -> list[FeatureHit]:
        """Up to ``k`` images with at least ``min_votes`` votes, most votes first (ties: smaller id)."""
        if not self._ids or k <= 0:
            return []
        hits = self._vote(query, self.per_query, self._nprobe)
        if not hits or hits[0].votes < self.deep_below:
            hits = self._vote(query, self.deep_per_query, self.deep_nprobe)
        return [h for h in hits[:k] if h.votes >= min_votes]

    def _vote(self, query: PreparedImage, per_query: int, nprobe: int) -> list[FeatureHit]:
        direct = query.features.descriptors[:per_query]
        mirror = query.mirrored.descriptors[:per_query] if query.mirrored is not None else direct[:0]
        codes = np.ascontiguousarray(np.concatenate([direct, mirror]))
        if len(codes) == 0:
            return []
        self._index.nprobe = min(nprobe, self._index.nlist)
        distances, owners = self._index.search(codes, 1)
        hit = (owners[:, 0] >= 0) & (distances[:, 0] <= self.vote_bits)
        images, votes = np.unique(owners[hit, 0], return_counts=True)
        if len(images) == 0:
            return []
        from_mirror = np.arange(len(codes)) >= len(direct)
        mirror_images, mirror_votes = np.unique(owners[hit & from_mirror, 0], return_counts=True)
        mirrored = dict(zip(mirror_images.tolist(), mirror_votes.tolist(), strict=True))
        order = np.lexsort((images, -votes))
        return [
            FeatureHit(int(images[i]), int(votes[i]), mirrored.get(int(images[i]), 0) * 2 > int(votes[i]))
            for i in order
        ]
