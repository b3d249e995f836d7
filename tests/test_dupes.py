"""Near-duplicate core (app.dupes): hashes, hash index, local features, verification, verdicts, grouping."""

from __future__ import annotations

import io
import itertools
import json
import random
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont, ImageOps

from app.dupes import (
    FEATURES_VERSION,
    HASH_FIELDS,
    Candidate,
    DupeThresholds,
    FeatureIndex,
    HashIndex,
    ImageHashes,
    PreparedImage,
    Verdict,
    compare,
    group_duplicates,
    hamming,
    lookup,
    pack_hashes,
    prepare_catalog_image,
    prepare_query,
    shortlist,
    verify,
)

OPENCV = Path("photo-samples") / "opencv"


def _open(shared_data: Path, relative: str) -> Image.Image:
    return Image.open(shared_data / relative).convert("RGB")


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _sample(shared_data: Path, name: str) -> Image.Image:
    return _open(shared_data, str(OPENCV / name))


@pytest.fixture(scope="module")
def fruits(shared_data: Path) -> Image.Image:
    return _sample(shared_data, "fruits.jpg")


@pytest.fixture(scope="module")
def fruits_prepared(fruits: Image.Image) -> PreparedImage:
    return prepare_catalog_image(fruits)


@pytest.fixture(scope="module")
def building(shared_data: Path) -> Image.Image:
    return _sample(shared_data, "building.jpg")


@pytest.fixture(scope="module")
def building_prepared(building: Image.Image) -> PreparedImage:
    return prepare_catalog_image(building)


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


def test_hashes_are_exactly_imagehash_of_the_photo_and_of_its_mirror(shared_data: Path) -> None:
    """ImageHashes.of shrinks once and mirrors the small images: the bits must be those imagehash gives for the
    (grey, size-capped) photo and for the mirrored photo, hashed the library's own way."""
    import imagehash

    from app.dupes.hashing import _hash_input, _to_int

    photos = sorted((shared_data / "coco-mini" / "images").glob("*.jpg"))[:40]
    photos += sorted((shared_data / "caltech101").glob("*/image_0001.jpg"))[:60]
    for path in photos:
        with Image.open(path) as image:
            image.load()
            grey = _hash_input(image)
            mirror = ImageOps.mirror(grey)
            expected = ImageHashes(
                phash=_to_int(imagehash.phash(grey)),
                dhash=_to_int(imagehash.dhash(grey)),
                phash_mirror=_to_int(imagehash.phash(mirror)),
                dhash_mirror=_to_int(imagehash.dhash(mirror)),
            )
            assert ImageHashes.of(image) == expected, path


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


def test_a_bulk_loaded_hash_index_answers_as_one_built_by_add() -> None:
    """HashIndex.from_arrays (a whole catalog's hashes as arrays: how a server loads them) against add()."""
    rng = random.Random(11)
    catalog = _random_hashes(rng, 300)
    ids = [5000 - 7 * n for n in range(300)]  # not sorted
    table = np.array([[getattr(h, k) for k in HASH_FIELDS] for h in catalog], dtype=np.uint64)
    bulk, added = HashIndex.from_arrays(np.array(ids), table), HashIndex()
    added.add(ids, catalog)
    queries = _random_hashes(rng, 10) + catalog[:4]
    for index in (bulk, added):  # the same edits on both
        assert len(index) == 300 and ids[3] in index and 1 not in index
        assert index.remove([ids[0], ids[0], ids[1], 12345]) == 2 and ids[0] not in index
        index.add([ids[2], 7], [catalog[5], catalog[6]])  # replaces a bulk image, adds a new one
    assert len(bulk) == len(added) == 299
    for image_id in (ids[0], ids[2], ids[3], 7, 12345):
        assert bulk.get(image_id) == added.get(image_id)
    for query in queries:
        for radius in (0, 9, 14):
            assert bulk.range_search(query, radius) == added.range_search(query, radius)
    # the k nearest (FAISS breaks ties at the k-th distance by insertion order, which differs here: exact members)
    for n in range(8, 13):
        assert bulk.search(catalog[n], 1) == added.search(catalog[n], 1) and bulk.search(catalog[n], 1)[0].id == ids[n]
    assert len(HashIndex.from_arrays(np.empty(0, np.int64), np.empty((0, 4), np.uint64))) == 0
    with pytest.raises(ValueError, match="distinct"):
        HashIndex.from_arrays(np.array([1, 1]), table[:2])


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


# --- prepared features ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_pixel_digest_is_sha256_of_the_whole_rgb_image(
    mode: str, fruits: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Large images are hashed in bands of rows: the digest must be that of the size and every RGB byte at once,
    # for an image of many bands with a short last one, and for one hashed at once.
    import hashlib

    from app.dupes import features

    wide = fruits.resize((1501, 997)).convert(mode)  # 4.5 MB packed: hashed at once by default
    small = fruits.resize((40, 30)).convert(mode)

    def whole(image: Image.Image) -> str:
        rgb = image.convert("RGB")
        return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()

    at_once = features.pixel_digest(wide)
    assert at_once == whole(wide) and features.pixel_digest(small) == whole(small)
    monkeypatch.setattr(features, "DIGEST_BANDS_ABOVE", 1 << 20)  # now in 17 bands of 58 rows and one of 11
    assert wide.height % (features.DIGEST_BAND_BYTES // (3 * wide.width)) == 11
    assert features.pixel_digest(wide) == at_once and features.pixel_digest(small) == whole(small)
    # every band counts: the first pixel and the last one (in the short last band)
    for xy in ((0, 0), (wide.width - 1, wide.height - 1)):
        edited = wide.copy()
        value = edited.getpixel(xy)
        edited.putpixel(xy, 255 - value if mode == "L" else tuple(255 - v for v in value))
        assert features.pixel_digest(edited) == whole(edited) != at_once


def test_prepared_image_survives_serialisation(fruits: Image.Image) -> None:
    prepared = prepare_query(fruits)
    restored = PreparedImage.from_bytes(prepared.to_bytes())
    assert (restored.width, restored.height, restored.pixel_digest) == (
        fruits.width,
        fruits.height,
        prepared.pixel_digest,
    )
    assert restored.hashes == prepared.hashes
    np.testing.assert_array_equal(restored.features.descriptors, prepared.features.descriptors)
    np.testing.assert_array_equal(restored.features.points, prepared.features.points)
    assert restored.thumb.shape == prepared.thumb.shape
    assert np.abs(restored.thumb.astype(int) - prepared.thumb).mean() < 2  # stored as JPEG 90
    assert restored.mirrored is not None and prepared.mirrored is not None
    np.testing.assert_array_equal(restored.mirrored.descriptors, prepared.mirrored.descriptors)
    assert compare(restored, prepare_catalog_image(fruits)).verdict == Verdict.EXACT
    assert PreparedImage.from_bytes(prepared.without_mirror().to_bytes()).mirrored is None


def test_features_of_another_version_are_refused(fruits_prepared: PreparedImage) -> None:
    data = fruits_prepared.to_bytes()
    with np.load(io.BytesIO(data)) as npz:
        arrays = dict(npz)
    arrays["meta"][0] = FEATURES_VERSION + 1
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with pytest.raises(ValueError, match="prepare the image again"):
        PreparedImage.from_bytes(buffer.getvalue())


def test_catalog_images_keep_fewer_keypoints_than_queries_and_no_mirror(fruits: Image.Image) -> None:
    query, catalog = prepare_query(fruits), prepare_catalog_image(fruits)
    assert catalog.mirrored is None and query.mirrored is not None
    assert 100 < len(catalog.features) < len(query.features)
    assert max(catalog.features.work_size) == 512  # matched at a bounded size whatever the photo's size


def test_soft_and_tiny_images_still_get_keypoints(fruits: Image.Image) -> None:
    tiny = fruits.resize((40, 38))
    prepared = prepare_catalog_image(tiny)
    assert max(prepared.features.work_size) == 256  # enlarged so that ORB's patches fit
    assert len(prepared.features) >= 50


# --- geometric verification and verdicts ------------------------------------------------------------


def test_an_unchanged_image_is_exact(fruits: Image.Image, fruits_prepared: PreparedImage) -> None:
    evidence = compare(prepare_query(fruits.copy()), fruits_prepared)
    assert evidence.verdict == Verdict.EXACT and evidence.same_pixels
    assert evidence.reason == "identical decoded pixels"


def test_equal_hashes_and_size_are_exact_without_identical_pixels(
    fruits: Image.Image, fruits_prepared: PreparedImage
) -> None:
    touched = fruits.copy()
    touched.putpixel((3, 3), (0, 255, 0))
    evidence = compare(prepare_query(touched), fruits_prepared)
    assert not evidence.same_pixels
    assert (evidence.hashes.phash, evidence.hashes.dhash) == (0, 0)
    assert evidence.verdict == Verdict.EXACT and "distance 0" in evidence.reason


def test_a_re_encoded_copy_is_a_near_duplicate_covering_the_whole_image(
    fruits: Image.Image, fruits_prepared: PreparedImage
) -> None:
    evidence = compare(prepare_query(_jpeg(fruits, 30)), fruits_prepared)
    assert evidence.verdict == Verdict.NEAR_DUPLICATE
    assert evidence.inliers >= 100 and evidence.geometry.agreement > 0.9
    assert evidence.query_box.area / (fruits.width * fruits.height) > 0.95
    assert evidence.candidate_box.area / (fruits.width * fruits.height) > 0.95


def test_a_crop_to_half_the_sides_is_found_with_its_region_in_the_original(
    building: Image.Image, building_prepared: PreparedImage
) -> None:
    x0, y0 = 300, 120
    w, h = building.width // 2, building.height // 2
    crop = _jpeg(building.crop((x0, y0, x0 + w, y0 + h)), 90)
    evidence = compare(prepare_query(crop), building_prepared)
    assert evidence.verdict == Verdict.NEAR_DUPLICATE
    box = evidence.candidate_box
    assert abs(box.x0 - x0) < 8 and abs(box.y0 - y0) < 8
    assert abs(box.x1 - (x0 + w)) < 8 and abs(box.y1 - (y0 + h)) < 8
    assert evidence.geometry.query_overlap > 0.97  # the whole crop lies inside the original
    transform = evidence.geometry.transform
    assert transform is not None
    corner = transform @ np.array([x0 + 100, y0 + 50, 1.0])
    assert np.allclose(corner[:2] / corner[2], [100, 50], atol=4)


def test_a_flipped_copy_is_verified_through_the_mirror_image(
    fruits: Image.Image, fruits_prepared: PreparedImage
) -> None:
    query = prepare_query(_jpeg(ImageOps.mirror(fruits), 90))
    evidence = compare(query, fruits_prepared)
    assert evidence.verdict == Verdict.NEAR_DUPLICATE and evidence.geometry.mirrored
    assert "mirrored" in evidence.reason
    unflippable = replace(query, mirrored=None)
    assert compare(unflippable, fruits_prepared).verdict != Verdict.NEAR_DUPLICATE


@pytest.mark.parametrize("degrees", [10, -5, 90])
def test_a_rotated_copy_is_a_near_duplicate(
    building: Image.Image, building_prepared: PreparedImage, degrees: int
) -> None:
    rotated = building.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=degrees == 90)
    evidence = compare(prepare_query(_jpeg(rotated, 90)), building_prepared)
    assert evidence.verdict == Verdict.NEAR_DUPLICATE
    assert evidence.inliers >= 50


def test_a_bordered_copy_is_found_inside_the_border(fruits: Image.Image, fruits_prepared: PreparedImage) -> None:
    bordered = ImageOps.expand(fruits, border=(60, 30, 60, 30), fill=(20, 200, 40))
    evidence = compare(prepare_query(_jpeg(bordered, 90)), fruits_prepared)
    assert evidence.verdict == Verdict.NEAR_DUPLICATE
    box = evidence.query_box
    assert abs(box.x0 - 60) < 6 and abs(box.y0 - 30) < 6 and abs(box.x1 - (60 + fruits.width)) < 6
    assert evidence.geometry.candidate_overlap > 0.97


def test_a_copy_with_a_text_overlay_on_a_larger_canvas_is_a_near_duplicate(
    building: Image.Image, building_prepared: PreparedImage
) -> None:
    canvas = Image.new("RGB", (building.width + 400, building.height + 300), (240, 240, 240))
    canvas.paste(building, (150, 100))
    draw = ImageDraw.Draw(canvas)
    draw.text((200, 300), "(c) someone else 2024", font=ImageFont.load_default(size=48), fill=(255, 255, 255))
    evidence = compare(prepare_query(_jpeg(canvas, 85)), building_prepared)
    assert evidence.verdict == Verdict.NEAR_DUPLICATE
    assert evidence.geometry.candidate_overlap > 0.97 and evidence.geometry.query_overlap < 0.8


def test_two_photos_of_one_scene_are_similar_not_duplicates(shared_data: Path) -> None:
    for left, right in (("aloeL.jpg", "aloeR.jpg"), ("leuvenA.jpg", "leuvenB.jpg")):
        evidence = compare(
            prepare_query(_sample(shared_data, left)), prepare_catalog_image(_sample(shared_data, right))
        )
        assert evidence.verdict == Verdict.SIMILAR, evidence.reason
        assert evidence.inliers >= 15 and "not a copy" in evidence.reason


def test_a_burst_shot_of_the_same_person_is_not_a_duplicate(shared_data: Path) -> None:
    # Same person, pose and room seconds apart: the background aligns, the face does not.
    query = prepare_query(_open(shared_data, "caltech101/Faces_easy/image_0373.jpg"))
    burst = compare(query, prepare_catalog_image(_open(shared_data, "caltech101/Faces/image_0374.jpg")))
    same = compare(query, prepare_catalog_image(_open(shared_data, "caltech101/Faces/image_0373.jpg")))
    assert burst.verdict == Verdict.SIMILAR and burst.inliers >= 15
    assert same.verdict == Verdict.NEAR_DUPLICATE  # the same photo, cropped tighter


def test_unrelated_photos_are_different(fruits_prepared: PreparedImage, shared_data: Path) -> None:
    evidence = compare(prepare_query(_sample(shared_data, "baboon.jpg")), fruits_prepared)
    assert evidence.verdict == Verdict.DIFFERENT
    assert evidence.inliers < 15


def test_verify_reports_no_match_for_featureless_images(fruits_prepared: PreparedImage) -> None:
    blank = prepare_query(Image.new("RGB", (300, 200), (128, 128, 128)))
    match = verify(blank, fruits_prepared)
    assert match.inliers == 0 and match.model == "none"


def test_thresholds_decide_the_verdict(fruits: Image.Image, fruits_prepared: PreparedImage) -> None:
    query = prepare_query(_jpeg(fruits.rotate(7, resample=Image.Resampling.BICUBIC), 80))
    assert compare(query, fruits_prepared).verdict == Verdict.NEAR_DUPLICATE
    strict = compare(query, fruits_prepared, thresholds=DupeThresholds(min_texture_agreement=1.0, hash_near=0))
    assert strict.verdict == Verdict.SIMILAR and "agrees pixel-wise" in strict.reason
    pattern = compare(query, fruits_prepared, thresholds=DupeThresholds(min_inlier_ratio=1.0, hash_near=0))
    assert pattern.verdict == Verdict.SIMILAR and "of the matches" in pattern.reason
    blind = DupeThresholds(min_inliers=10_000, similar_inliers=10_000, hash_near=0, hash_similar=0)
    assert compare(query, fruits_prepared, thresholds=blind).verdict == Verdict.DIFFERENT


def test_close_hashes_decide_when_local_features_cannot(shared_data: Path) -> None:
    # A smooth gradient has almost no corners: the hashes vouch for its re-encoded copy.
    ramp = np.tile(np.linspace(0, 255, 320, dtype=np.float32), (240, 1))
    image = Image.fromarray(np.stack([ramp, ramp[::-1] * 0.5, np.full_like(ramp, 90)], axis=2).astype(np.uint8))
    evidence = compare(prepare_query(_jpeg(image, 60)), prepare_catalog_image(image))
    assert evidence.inliers < 15
    assert evidence.verdict == Verdict.NEAR_DUPLICATE and "hashes nearly equal" in evidence.reason


def test_a_clip_cosine_alone_makes_a_pair_similar(fruits_prepared: PreparedImage, shared_data: Path) -> None:
    query = prepare_query(_sample(shared_data, "baboon.jpg"))
    assert compare(query, fruits_prepared, cosine=0.95).verdict == Verdict.SIMILAR
    assert compare(query, fruits_prepared, cosine=0.2).verdict == Verdict.DIFFERENT


def test_evidence_is_json_ready(fruits: Image.Image, fruits_prepared: PreparedImage) -> None:
    evidence = compare(prepare_query(_jpeg(fruits, 50)), fruits_prepared, cosine=0.97)
    data = json.loads(json.dumps(evidence.to_dict()))
    assert data["verdict"] == "near_duplicate" and data["cosine"] == 0.97
    assert len(data["query_box"]) == 4 and data["inliers"] == evidence.inliers
    assert set(data) >= {"phash_distance", "dhash_distance", "phash_distance_mirrored", "dhash_distance_mirrored"}


# --- lookup --------------------------------------------------------------------------------------


def test_lookup_ranks_by_verdict_and_gives_the_overall_verdict(
    fruits: Image.Image, fruits_prepared: PreparedImage, building_prepared: PreparedImage, shared_data: Path
) -> None:
    query = prepare_query(_jpeg(fruits, 40))
    aloe_l = prepare_catalog_image(_sample(shared_data, "aloeL.jpg"))
    candidates = [
        Candidate(3, building_prepared, cosine=0.99),  # CLIP's favourite, but another photo: similar at most
        Candidate(7, fruits_prepared),
        Candidate(9, aloe_l),
        Candidate(7, fruits_prepared, cosine=0.5),  # the same id twice is compared once
    ]
    result = lookup(query, candidates)
    assert result.verdict == Verdict.NEAR_DUPLICATE
    assert [m.id for m in result.matches] == [7, 3]
    assert [m.verdict for m in result.matches] == [Verdict.NEAR_DUPLICATE, Verdict.SIMILAR]
    assert result.matches[0].evidence.cosine == 0.5
    everything = lookup(query, candidates, min_verdict=Verdict.DIFFERENT)
    assert [m.id for m in everything.matches] == [7, 3, 9]
    assert lookup(query, candidates, min_verdict="near_duplicate", limit=1).to_dict()["matches"][0]["id"] == 7
    assert lookup(query, []).verdict == Verdict.DIFFERENT


# --- the local-feature shortlist ---------------------------------------------------------------------


def test_feature_index_shortlists_the_original_of_a_crop_among_distractors(shared_data: Path) -> None:
    names = ["fruits.jpg", "building.jpg", "baboon.jpg", "home.jpg", "aero1.jpg", "butterfly.jpg", "messi5.jpg"]
    catalog = [prepare_catalog_image(_sample(shared_data, n)) for n in names]
    index = FeatureIndex.build(list(range(10, 17)), catalog)
    assert len(index) == 7
    home = _sample(shared_data, "home.jpg")
    crop = home.crop((home.width // 4, home.height // 4, home.width * 3 // 4, home.height * 3 // 4))
    query = prepare_query(_jpeg(ImageOps.mirror(crop), 80))
    hits = index.search(query, 3)
    assert hits[0].id == 13 and hits[0].mirrored
    assert hits[0].votes > 3 * max([h.votes for h in hits[1:]] + [1])
    assert index.remove([13]) == 1 and 13 not in index
    assert all(h.id != 13 for h in index.search(query, 7))
    assert FeatureIndex.build([], []).search(query, 3) == []


def test_shortlist_merges_hash_orb_and_clip_neighbours(shared_data: Path) -> None:
    names = ["fruits.jpg", "building.jpg", "baboon.jpg", "home.jpg", "aero1.jpg", "butterfly.jpg"]
    images = [_sample(shared_data, n) for n in names]
    catalog = [prepare_catalog_image(im) for im in images]
    ids = [20, 21, 22, 23, 24, 25]
    hashes = HashIndex()
    hashes.add(ids, [p.hashes for p in catalog])
    features = FeatureIndex.build(ids, catalog)
    fruits, building = images[0], images[1]
    # A re-encode is found by its hashes (and its ORB votes); a crop only by its ORB votes.
    listed = {s.id: s for s in shortlist(prepare_query(_jpeg(fruits, 70)), hashes=hashes, features=features)}
    assert {"hash", "orb"} <= set(listed[20].sources)
    crop = building.crop((200, 100, 200 + building.width // 2, 100 + building.height // 2))
    listed = {s.id: s for s in shortlist(prepare_query(_jpeg(crop, 90)), hashes=hashes, features=features)}
    assert "orb" in listed[21].sources and "hash" not in listed[21].sources
    with_clip = shortlist(prepare_query(crop), clip_neighbours=[(25, 0.31), (21, 0.8)])
    assert [(s.id, s.sources, s.cosine) for s in with_clip] == [(25, ("clip",), 0.31), (21, ("clip",), 0.8)]
    assert shortlist(prepare_query(crop)) == []


def test_two_product_shots_on_white_are_not_duplicates(shared_data: Path) -> None:
    # The white backgrounds agree after any alignment; the scissors and the wrench on them do not.
    scissors = prepare_query(_open(shared_data, "caltech101/scissors/image_0021.jpg"))
    wrench = prepare_catalog_image(_open(shared_data, "caltech101/wrench/image_0005.jpg"))
    evidence = compare(scissors, wrench)
    assert evidence.verdict == Verdict.SIMILAR
    assert evidence.geometry.texture_agreement < 0.6 < 0.8 < evidence.geometry.agreement
    lenient = compare(scissors, wrench, thresholds=DupeThresholds(min_agreement=0.8))
    assert lenient.verdict == Verdict.SIMILAR and "textured part" in lenient.reason
    blind = DupeThresholds(min_agreement=0.8, min_texture_agreement=0.0)
    assert compare(scissors, wrench, thresholds=blind).verdict == Verdict.NEAR_DUPLICATE
