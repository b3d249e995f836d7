"""Perceptual hashes (pHash, dHash; of the image and of its mirror image) and a Hamming-radius index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import faiss
import imagehash
import numpy as np
from PIL import Image

from app.dupes.resample import lanczos_resize

HASH_BITS = 64
HASH_FIELDS = ("phash", "dhash", "phash_mirror", "dhash_mirror")
# Hashing reads a 32x32 (pHash) or 9x8 (dHash) grey version: shrinking big photos first with a cheap box
# filter changes a hash by 0-2 bits and makes it ~50x faster on a 12 MP photo.
HASH_INPUT_MAX_SIDE = 1024
# imagehash's default hash_size (8x8 bits), and the sizes its phash and dhash shrink to (highfreq_factor=4)
HASH_SIZE = 8
PHASH_INPUT = (32, 32)
DHASH_INPUT = (9, 8)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two (unsigned) hashes."""
    return (int(a) ^ int(b)).bit_count()


def _to_int(value: imagehash.ImageHash) -> int:
    return _bits_to_int(np.asarray(value.hash, dtype=bool))


def _bits_to_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def _phash(pixels: np.ndarray) -> int:
    """``imagehash.phash`` of a 32x32 grey image (hash_size=8), computed with the same calls: the same bits, without
    imagehash's copies of the image (a same-size convert and resize)."""
    import scipy.fftpack  # as imagehash does: importing scipy.fftpack takes ~0.3 s

    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:HASH_SIZE, :HASH_SIZE]
    return _bits_to_int(low > np.median(low))


def _dhash(pixels: np.ndarray) -> int:
    """``imagehash.dhash`` of a 9x8 grey image (hash_size=8): is each pixel brighter than its left neighbour."""
    return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def _hash_input(image: Image.Image) -> Image.Image:
    longest = max(image.size)
    if longest > HASH_INPUT_MAX_SIDE:
        image = image.reduce(-(-longest // HASH_INPUT_MAX_SIDE))
    return image.convert("L")


@dataclass(frozen=True)
class ImageHashes:
    """64-bit pHash and dHash of an image and of its horizontal mirror image, as unsigned ints.

    ``dataclasses.asdict`` gives the store's column names (``HASH_FIELDS``).
    """

    phash: int
    dhash: int
    phash_mirror: int
    dhash_mirror: int

    @classmethod
    def of(cls, image: Image.Image) -> ImageHashes:
        grey = _hash_input(image)
        # imagehash first shrinks the grey image to 32x32 (pHash) or 9x8 (dHash) with a Lanczos filter, and
        # a same-size resize is a copy: shrinking once here and mirroring the small images gives the same bits
        # as hashing the mirrored photo (the filter is symmetric; tests/test_dupes.py checks it on real photos)
        # for two resizes instead of four, the most expensive part of hashing. The two shrinks are done by
        # app.dupes.resample in about half the time of Pillow's scalar loop, and are exactly Pillow's pixels: the
        # same integer arithmetic, carried out in float64 matrix products where every sum is an exact integer.
        small_p, small_d = lanczos_resize(grey, (PHASH_INPUT, DHASH_INPUT))
        return cls(
            phash=_phash(small_p),
            dhash=_dhash(small_d),
            phash_mirror=_phash(np.ascontiguousarray(small_p[:, ::-1])),
            dhash_mirror=_dhash(small_d[:, ::-1]),
        )

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> ImageHashes:
        return cls(**{k: int(values[k]) for k in HASH_FIELDS})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def distances(self, other: ImageHashes) -> HashDistances:
        """Distances from this image (the query) to ``other``, directly and with this image mirrored."""
        return HashDistances(
            phash=hamming(self.phash, other.phash),
            dhash=hamming(self.dhash, other.dhash),
            phash_mirror=hamming(self.phash_mirror, other.phash),
            dhash_mirror=hamming(self.dhash_mirror, other.dhash),
        )


@dataclass(frozen=True)
class HashDistances:
    """Hamming distances query -> candidate; ``*_mirror``: the query's mirror image against the candidate."""

    phash: int
    dhash: int
    phash_mirror: int
    dhash_mirror: int

    @property
    def mirrored(self) -> bool:
        """True when the mirror image is the closer one (a flipped copy)."""
        return self.phash_mirror + self.dhash_mirror < self.phash + self.dhash

    @property
    def best_phash(self) -> int:
        return self.phash_mirror if self.mirrored else self.phash

    @property
    def best_dhash(self) -> int:
        return self.dhash_mirror if self.mirrored else self.dhash


def pack_hashes(values: Sequence[int]) -> np.ndarray:
    """Unsigned 64-bit hashes -> (n, 8) uint8 codes for a FAISS binary index (big-endian bit order)."""
    return pack_hash_array(np.array([int(v) for v in values], dtype=np.uint64))


def pack_hash_array(values: np.ndarray) -> np.ndarray:
    """``pack_hashes`` of a uint64 array, without a Python object per hash."""
    return np.ascontiguousarray(values.astype(">u8")).view(np.uint8).reshape(-1, HASH_BITS // 8)


@dataclass(frozen=True)
class HashNeighbour:
    """A catalog image near the query by pHash or dHash, with the distances of the closer orientation."""

    id: int
    distances: HashDistances

    @property
    def phash_distance(self) -> int:
        return self.distances.best_phash

    @property
    def dhash_distance(self) -> int:
        return self.distances.best_dhash

    @property
    def mirrored(self) -> bool:
        return self.distances.mirrored


class HashIndex:
    """Exact Hamming search over the pHash and dHash of a catalog (FAISS binary flat indexes, 64 bits).

    Only the catalog images' own hashes are indexed; queries are run with both the query's hashes and those
    of its mirror image, so a flipped copy is found at the distance of an unflipped one.

    ``from_arrays`` loads a whole catalog at once and keeps its hashes as arrays (a 1M-image catalog: no million
    ``ImageHashes``; 1.4-2.3 s from the store, where ``add`` in chunks took 5.0-5.2 s and twice the memory);
    ``add`` and ``remove`` work on top of them.
    """

    def __init__(self) -> None:
        self._phash = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(HASH_BITS))
        self._dhash = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(HASH_BITS))
        self._hashes: dict[int, ImageHashes] = {}
        # from_arrays' rows: ids sorted, their hashes (uint64, HASH_FIELDS' order), which are still held
        self._bulk_ids = np.empty(0, dtype=np.int64)
        self._bulk = np.empty((0, len(HASH_FIELDS)), dtype=np.uint64)
        self._bulk_live = np.empty(0, dtype=bool)
        self._bulk_count = 0

    @classmethod
    def from_arrays(cls, ids: np.ndarray, hashes: np.ndarray) -> HashIndex:
        """An index of ``ids`` (n,) with their ``hashes`` (n, 4) unsigned, in ``HASH_FIELDS``' order: what
        ``add`` would build, in a few array operations (ids must be distinct)."""
        ids = np.asarray(ids, dtype=np.int64)
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(len(ids), len(HASH_FIELDS))
        order = np.argsort(ids, kind="stable")
        ids, hashes = ids[order], hashes[order]
        if len(ids) and bool(np.any(ids[1:] == ids[:-1])):
            raise ValueError("from_arrays needs distinct ids")
        index = cls()
        index._bulk_ids, index._bulk = ids, hashes
        index._bulk_live = np.ones(len(ids), dtype=bool)
        index._bulk_count = len(ids)
        if len(ids):
            index._phash.add_with_ids(pack_hash_array(index._bulk[:, 0]), index._bulk_ids)
            index._dhash.add_with_ids(pack_hash_array(index._bulk[:, 1]), index._bulk_ids)
        return index

    def __len__(self) -> int:
        return len(self._hashes) + self._bulk_count

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, int | np.integer):
            return False
        return int(image_id) in self._hashes or self._bulk_row(int(image_id)) is not None

    def _bulk_row(self, image_id: int) -> int | None:
        """The row of a held image of the bulk load, or None."""
        row = int(np.searchsorted(self._bulk_ids, image_id))
        if row < len(self._bulk_ids) and self._bulk_ids[row] == image_id and self._bulk_live[row]:
            return row
        return None

    def add(self, ids: Sequence[int], hashes: Sequence[ImageHashes]) -> None:
        """Add (or replace) images by id."""
        if len(ids) != len(hashes):
            raise ValueError(f"{len(ids)} ids but {len(hashes)} hashes")
        known = [int(i) for i in ids if int(i) in self]
        if known:
            self.remove(known)
        if not ids:
            return
        labels = np.asarray(ids, dtype=np.int64)
        self._phash.add_with_ids(pack_hashes([h.phash for h in hashes]), labels)
        self._dhash.add_with_ids(pack_hashes([h.dhash for h in hashes]), labels)
        self._hashes.update(zip(labels.tolist(), hashes, strict=True))

    def remove(self, ids: Sequence[int]) -> int:
        present = [i for i in dict.fromkeys(map(int, ids)) if i in self]
        if not present:
            return 0
        selector = np.asarray(present, dtype=np.int64)
        self._phash.remove_ids(selector)  # type: ignore[arg-type]  # the SWIG wrapper takes an id array too
        self._dhash.remove_ids(selector)  # type: ignore[arg-type]
        for image_id in present:
            if self._hashes.pop(image_id, None) is None:
                row = self._bulk_row(image_id)
                if row is not None:
                    self._bulk_live[row] = False
                    self._bulk_count -= 1
        return len(present)

    def get(self, image_id: int) -> ImageHashes | None:
        found = self._hashes.get(int(image_id))
        if found is None and (row := self._bulk_row(int(image_id))) is not None:
            found = ImageHashes(*(int(v) for v in self._bulk[row]))
        return found

    def _held(self, image_id: int) -> ImageHashes:
        found = self.get(image_id)
        assert found is not None, image_id  # FAISS returned an id it holds
        return found

    def range_search(self, query: ImageHashes, radius: int) -> list[HashNeighbour]:
        """Every image whose pHash or dHash is within ``radius`` bits of the query's (either orientation).

        Sorted by the summed pHash + dHash distance of the closer orientation, then id.
        """
        if not len(self) or radius < 0:
            return []
        found: set[int] = set()
        for index, codes in (
            (self._phash, (query.phash, query.phash_mirror)),
            (self._dhash, (query.dhash, query.dhash_mirror)),
        ):
            # FAISS returns distances strictly below the radius it is given.
            _, _, labels = index.range_search(pack_hashes(codes), radius + 1)
            found.update(int(label) for label in labels)
        return self._sorted(found, query)

    def search(self, query: ImageHashes, k: int) -> list[HashNeighbour]:
        """The ``k`` images nearest by pHash (either orientation of the query)."""
        if not len(self) or k <= 0:
            return []
        k = min(k, len(self))
        _, labels = self._phash.search(pack_hashes((query.phash, query.phash_mirror)), k)
        found = {int(label) for label in labels.ravel() if label >= 0}
        ranked = sorted(
            (HashNeighbour(i, query.distances(self._held(i))) for i in found),
            key=lambda n: (n.phash_distance, n.dhash_distance, n.id),
        )
        return ranked[:k]

    def _sorted(self, ids: set[int], query: ImageHashes) -> list[HashNeighbour]:
        neighbours = [HashNeighbour(i, query.distances(self._held(i))) for i in ids]
        return sorted(neighbours, key=lambda n: (n.phash_distance + n.dhash_distance, n.id))
