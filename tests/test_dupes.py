"""Near-duplicate core (app.dupes): hashes, hash index, geometric verification, verdicts, grouping."""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.dupes import (
    HASH_FIELDS,
    HashIndex,
    ImageHashes,
    PreparedImage,
    Verdict,
    group_duplicates,
    hamming,
    pack_hashes,
    prepare_image,
)

OPENCV = Path("photo-samples") / "opencv"


def _open(shared_data: Path, relative: str) -> Image.Image:
    return Image.open(shared_data / relative).convert("RGB")


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def fruits(shared_data: Path) -> Image.Image:
    return _open(shared_data, str(OPENCV / "fruits.jpg"))


@pytest.fixture(scope="module")
def fruits_prepared(fruits: Image.Image) -> PreparedImage:
    return prepare_image(fruits, mirrored=False)


# --- hashes --------------------------------------------------------------------------------------


def test_hamming_counts_differing_bits() -> None:
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(0, (1 << 64) - 1) == 64


def test_hashes_are_64_bit_and_named_like_the_store_columns(fruits: Image.Image) -> None:
    hashes = ImageHashes.of(fruits)
    assert tuple(asdict(hashes)) == HASH_FIELDS
    assert all(0 <= v < 1 << 64 for v in asdict(hashes).values())
    assert ImageHashes.from_dict(hashes.as_dict()) == hashes


def test_mirror_hashes_match_a_flipped_copy(fruits: Image.Image) -> None:
    original = ImageHashes.of(fruits)
    flipped = ImageHashes.of(ImageOps.mirror(fruits))
    distances = flipped.distances(original)
    assert distances.phash_mirror <= 2 and distances.dhash_mirror <= 2
    assert distances.phash > 10  # unflipped, the flipped copy looks different to pHash
    assert distances.mirrored


def test_re_encoded_copy_is_a_few_bits_away_and_another_photo_is_far(fruits: Image.Image, shared_data: Path) -> None:
    original = ImageHashes.of(fruits)
    copy = ImageHashes.of(_jpeg(fruits, 50))
    other = ImageHashes.of(_open(shared_data, str(OPENCV / "baboon.jpg")))
    assert hamming(copy.phash, original.phash) <= 4
    assert hamming(other.phash, original.phash) >= 16


def test_pack_hashes_keeps_bit_distances() -> None:
    rng = random.Random(1)
    values = [rng.getrandbits(64) for _ in range(20)]
    codes = pack_hashes(values)
    assert codes.shape == (20, 8) and codes.dtype == np.uint8
    for (i, a), (j, b) in itertools.combinations(enumerate(values), 2):
        assert int(np.unpackbits(codes[i] ^ codes[j]).sum()) == hamming(a, b)


def _random_hashes(rng: random.Random, n: int) -> list[ImageHashes]:
    base = [rng.getrandbits(64) for _ in range(4)]
    out = []
    for _ in range(n):
        # Clustered around a few bases so that small radii find something.
        out.append(ImageHashes(*(b ^ _random_flips(rng, rng.randrange(0, 30)) for b in base)))
    return out


def _random_flips(rng: random.Random, count: int) -> int:
    mask = 0
    for _ in range(count):
        mask ^= 1 << rng.randrange(64)
    return mask


@pytest.mark.parametrize("radius", [0, 3, 8, 14])
def test_hash_index_range_search_equals_brute_force(radius: int) -> None:
    rng = random.Random(radius)
    catalog = _random_hashes(rng, 400)
    ids = list(range(1000, 1400))
    index = HashIndex()
    index.add(ids, catalog)
    for query in _random_hashes(rng, 15) + catalog[:5]:
        found = {n.id: n for n in index.range_search(query, radius)}
        expected = {
            i
            for i, h in zip(ids, catalog, strict=True)
            if min(
                hamming(query.phash, h.phash),
                hamming(query.dhash, h.dhash),
                hamming(query.phash_mirror, h.phash),
                hamming(query.dhash_mirror, h.dhash),
            )
            <= radius
        }
        assert set(found) == expected
        for image_id, neighbour in found.items():
            assert neighbour.distances == query.distances(catalog[image_id - 1000])


def test_hash_index_finds_a_flipped_copy_and_forgets_removed_images(fruits: Image.Image) -> None:
    index = HashIndex()
    rng = random.Random(5)
    index.add([1, 2, 3], [ImageHashes.of(fruits), *_random_hashes(rng, 2)])
    flipped = ImageHashes.of(ImageOps.mirror(fruits))
    hits = index.range_search(flipped, 4)
    assert [n.id for n in hits] == [1] and hits[0].mirrored
    assert index.search(flipped, 1)[0].id == 1
    assert index.remove([1]) == 1 and len(index) == 2
    assert index.range_search(flipped, 4) == []


# --- group_duplicates ----------------------------------------------------------------------------


def test_group_duplicates_joins_chains_and_ignores_similar_pairs() -> None:
    pairs = [
        (1, 2, "near_duplicate"),
        (2, 3, Verdict.EXACT),
        (4, 5, "similar"),  # a burst shot: not a duplicate
        (6, 7, "near_duplicate"),
        (8, 8, "exact"),
        (9, 10, "different"),
    ]
    assert group_duplicates(pairs) == [[1, 2, 3], [6, 7]]
    assert group_duplicates(pairs, min_verdict="exact") == [[2, 3]]
    assert group_duplicates(pairs, min_verdict="similar") == [[1, 2, 3], [4, 5], [6, 7]]
    assert group_duplicates([]) == []
