"""DupeService: an indexed photo's edited copies are found with evidence; unrelated photos are not.

The catalog is a few real photos indexed with the tiny random-weight model, whose CLIP cosines mean nothing:
``dupe_similar_cosine=1.0`` keeps them from making pairs 'similar', so every verdict here comes from hashes and
local features. The ORB-vote shortlist (built in the background) is off unless a test is about it, so that the
candidates of a look-up do not depend on how far that build got.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from app.config import Settings
from app.dupes import DupeThresholds, ImageHashes, Verdict
from app.duplicates import DupeService
from app.encoder import Encoder
from app.errors import BadQuery, NotFound, NotReady
from app.search import SearchService, open_service
from app.store import Store
from indexer import Indexer
from tests.helpers import DATA, copy_photos

CATALOG_SIZE = 6


def dupe_settings(data_dir: Path, model_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "model": f"local-dir:{model_dir}",
        "device": "cpu",
        "batch_size": 8,
        "decode_workers": 2,
        "index_check_seconds": 0.0,
        "tag_vocabulary": "none",
        "safe_search_vocabulary": "none",
        "dupe_similar_cosine": 1.0,
        "dupe_feature_candidates": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def index_folder(settings: Settings, encoder: Encoder, folder: Path) -> None:
    store = Store(settings.effective_database_url)
    try:
        Indexer(settings, store, encoder, progress=False).run([folder])
    finally:
        store.close()


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def edited_copies(photo: Path) -> dict[str, bytes]:
    """Edited copies of a photo, as someone re-posting it would make them."""
    with Image.open(photo) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    return {
        "jpeg_q30_smaller": jpeg(image.resize((width * 3 // 4, height * 3 // 4)), quality=30),
        "crop_70": jpeg(image.crop((width * 15 // 100, height * 15 // 100, width * 85 // 100, height * 85 // 100))),
        "flip": jpeg(ImageOps.mirror(image)),
        "border": jpeg(ImageOps.expand(image, border=max(width, height) // 12, fill=(250, 250, 250))),
    }


def unrelated_photo() -> bytes:
    """A COCO photo that copy_photos does not put in the catalog."""
    return sorted((DATA / "coco-mini" / "images").glob("*.jpg"))[-1].read_bytes()


class Catalog:
    def __init__(self, settings: Settings, photos: list[Path], search: SearchService, dupes: DupeService) -> None:
        self.settings, self.photos, self.search, self.dupes = settings, photos, search, dupes
        self.ids = {Path(path).name: state.id for path, state in search.store.file_states().items()}

    def id_of(self, photo: Path) -> int:
        return self.ids[photo.name]


def open_catalog(settings: Settings, photos: list[Path]) -> Iterator[Catalog]:
    search = open_service(settings)
    dupes = DupeService(settings, search)
    try:
        yield Catalog(settings, photos, search, dupes)
    finally:
        dupes.close()
        search.store.close()


@pytest.fixture(scope="module")
def indexed(
    tmp_path_factory: pytest.TempPathFactory, shared_data: Path, tiny_model_dir: Path, tiny_encoder: Encoder
) -> tuple[Settings, list[Path]]:
    root = tmp_path_factory.mktemp("dupes")
    photos = copy_photos(root / "catalog", CATALOG_SIZE)
    settings = dupe_settings(root / "data", tiny_model_dir)
    index_folder(settings, tiny_encoder, root / "catalog")
    return settings, photos


@pytest.fixture(scope="module")
def catalog(indexed: tuple[Settings, list[Path]]) -> Iterator[Catalog]:
    yield from open_catalog(*indexed)


@pytest.fixture(scope="module")
def copies(indexed: tuple[Settings, list[Path]]) -> dict[str, bytes]:
    return edited_copies(indexed[1][0])


@pytest.mark.parametrize("edit", ["jpeg_q30_smaller", "crop_70", "flip", "border"])
def test_an_edited_copy_of_an_indexed_photo_is_a_near_duplicate_with_evidence(
    catalog: Catalog, copies: dict[str, bytes], edit: str
) -> None:
    report = catalog.dupes.lookup_bytes(copies[edit])
    assert report.verdict == Verdict.NEAR_DUPLICATE
    assert [m.id for m in report.matches] == [catalog.id_of(catalog.photos[0])]
    match = report.matches[0]
    assert match.path == str(catalog.photos[0])
    evidence = match.evidence_dict()
    assert evidence["inliers"] >= catalog.settings.dupe_min_inliers
    assert evidence["agreement"] >= catalog.settings.dupe_min_agreement
    assert evidence["mirrored"] is (edit == "flip")
    x0, y0, x1, y1 = evidence["candidate_box"]
    assert 0 <= x0 < x1 <= match.width + 1 and 0 <= y0 < y1 <= match.height + 1
    assert "verified copy" in match.evidence.reason or "hashes" in match.evidence.reason
    assert report.candidates >= 1 and report.took_ms > 0


def test_a_crop_is_located_inside_its_original(catalog: Catalog, copies: dict[str, bytes]) -> None:
    match = catalog.dupes.lookup_bytes(copies["crop_70"]).matches[0]
    x0, y0, x1, y1 = match.evidence_dict()["candidate_box"]
    assert match.width is not None and match.height is not None
    # The crop kept the middle 70 % of each side: so does the matched region of the original.
    assert abs((x1 - x0) / match.width - 0.7) < 0.08 and abs((y1 - y0) / match.height - 0.7) < 0.08
    assert abs(x0 / match.width - 0.15) < 0.05 and abs(y0 / match.height - 0.15) < 0.05


def test_a_byte_identical_copy_is_exact(catalog: Catalog) -> None:
    report = catalog.dupes.lookup_bytes(catalog.photos[2].read_bytes())
    assert report.verdict == Verdict.EXACT
    assert report.matches[0].id == catalog.id_of(catalog.photos[2])
    assert report.matches[0].evidence.same_pixels
    assert report.matches[0].evidence.reason == "identical decoded pixels"


def test_an_unrelated_photo_has_no_match(catalog: Catalog) -> None:
    report = catalog.dupes.lookup_bytes(unrelated_photo())
    assert report.verdict == Verdict.DIFFERENT
    assert report.matches == []
    assert report.candidates == CATALOG_SIZE  # every image was checked, none is a copy


def test_min_verdict_different_lists_every_candidate_with_its_verdict(catalog: Catalog) -> None:
    report = catalog.dupes.lookup_bytes(unrelated_photo(), min_verdict="different", limit=50)
    assert len(report.matches) == CATALOG_SIZE
    assert {m.verdict for m in report.matches} == {Verdict.DIFFERENT}
    with pytest.raises(BadQuery, match="unknown verdict"):
        catalog.dupes.lookup_bytes(unrelated_photo(), min_verdict="twin")


def test_copies_are_found_through_the_hash_index_without_clip(
    indexed: tuple[Settings, list[Path]], copies: dict[str, bytes]
) -> None:
    settings, photos = indexed
    for catalog in open_catalog(settings.with_overrides(dupe_clip_candidates=0), photos):
        for edit in ("jpeg_q30_smaller", "flip"):
            report = catalog.dupes.lookup_bytes(copies[edit])
            assert [m.id for m in report.matches] == [catalog.id_of(photos[0])], edit
            assert report.candidates < CATALOG_SIZE  # only hash neighbours were verified


def test_duplicates_of_an_indexed_image_leave_it_out(catalog: Catalog) -> None:
    image_id = catalog.id_of(catalog.photos[1])
    report = catalog.dupes.duplicates_of(image_id, min_verdict="different", limit=50)
    assert image_id not in [m.id for m in report.matches]
    assert len(report.matches) == CATALOG_SIZE - 1
    with pytest.raises(NotFound):
        catalog.dupes.duplicates_of(99_999)


def test_thresholds_come_from_the_settings(
    indexed: tuple[Settings, list[Path]], copies: dict[str, bytes], catalog: Catalog
) -> None:
    settings, photos = indexed
    assert catalog.dupes.lookup_bytes(copies["crop_70"]).verdict == Verdict.NEAR_DUPLICATE
    strict = settings.with_overrides(dupe_min_inliers=100_000, dupe_hash_near=0)
    for strict_catalog in open_catalog(strict, photos):
        report = strict_catalog.dupes.lookup_bytes(copies["crop_70"], min_verdict="similar")
        assert report.verdict == Verdict.SIMILAR
        assert "fewer than 100000" in report.matches[0].evidence.reason


def test_dupe_settings_name_every_threshold_with_its_calibrated_default() -> None:
    assert Settings().dupe_thresholds == DupeThresholds()
    assert {f"dupe_{name}" for name in DupeThresholds.model_fields} <= set(Settings.model_fields)
    assert Settings(dupe_min_inliers=40, dupe_ratio=0.7).dupe_thresholds.model_dump() == {
        **DupeThresholds().model_dump(),
        "min_inliers": 40,
        "ratio": 0.7,
    }


def test_catalog_features_are_cached_between_look_ups(
    catalog: Catalog, copies: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = catalog.dupes.lookup_bytes(copies["border"])
    assert len(catalog.dupes.prepared) >= first.candidates

    def no_decoding(path: str) -> Image.Image:
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(catalog.dupes, "_decode_file", no_decoding)
    again = catalog.dupes.lookup_bytes(copies["border"])
    assert [m.id for m in again.matches] == [m.id for m in first.matches]


@pytest.mark.parametrize(
    "stage",
    [{"dupe_hash_candidates": 20}, {"dupe_hash_candidates": 0, "dupe_feature_candidates": 10}],
    ids=["hash", "orb"],
)
def test_candidate_stages_follow_a_new_index(
    tmp_path: Path, shared_data: Path, tiny_model_dir: Path, tiny_encoder: Encoder, stage: dict[str, int]
) -> None:
    photos = copy_photos(tmp_path / "catalog", 3)
    settings = dupe_settings(tmp_path / "data", tiny_model_dir, dupe_clip_candidates=0, **stage)
    index_folder(settings, tiny_encoder, tmp_path / "catalog")
    query = edited_copies(photos[0])["flip"]
    for catalog in open_catalog(settings, photos):
        catalog.dupes.start()
        assert catalog.dupes.features.wait(timeout=60)
        before = catalog.dupes.lookup_bytes(query)
        assert len(before.matches) == 1
        if "dupe_feature_candidates" in stage:
            # A crop: ORB votes find it, and identical descriptors of a byte-identical copy would split the votes.
            with Image.open(photos[0]) as image:
                width, height = image.size
                image.crop((width // 10, height // 10, width * 9 // 10, height * 9 // 10)).save(
                    tmp_path / "catalog" / "copy.jpg", quality=90
                )
        else:
            shutil.copy2(photos[0], tmp_path / "catalog" / "copy.jpg")
        index_folder(settings, tiny_encoder, tmp_path / "catalog")
        catalog.dupes.lookup_bytes(query)  # notices the new index
        assert catalog.dupes.features.wait(timeout=60)
        after = catalog.dupes.lookup_bytes(query)
        assert sorted(Path(m.path).name for m in after.matches) == ["copy.jpg", photos[0].name]


def test_the_orb_shortlist_finds_copies_that_hashes_miss(
    indexed: tuple[Settings, list[Path]], copies: dict[str, bytes]
) -> None:
    settings, photos = indexed
    without_clip = settings.with_overrides(dupe_clip_candidates=0)
    for catalog in open_catalog(without_clip, photos):
        assert catalog.dupes.lookup_bytes(copies["crop_70"]).matches == []  # hash neighbours miss a crop
    for catalog in open_catalog(without_clip.with_overrides(dupe_feature_candidates=3), photos):
        catalog.dupes.start()
        assert catalog.dupes.features.wait(timeout=60) and len(catalog.dupes.features) == CATALOG_SIZE
        for edit in ("crop_70", "border"):
            report = catalog.dupes.lookup_bytes(copies[edit])
            assert [m.id for m in report.matches] == [catalog.id_of(photos[0])], edit
            assert report.candidates <= 3


def test_no_index_is_not_ready(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = dupe_settings(tmp_path / "data", tiny_model_dir)
    search = open_service(settings, require_index=False)
    search.start()
    dupes = DupeService(settings, search)
    try:
        with pytest.raises(NotReady, match="clipsearch index"):
            dupes.lookup_bytes(unrelated_photo())
    finally:
        dupes.close()
        search.store.close()


def test_hash_index_is_built_from_stored_hashes() -> None:
    from benchmarks.store_scale import build_hash_index  # store_scale's baseline, as the service built it before

    hashes = ImageHashes(phash=1, dhash=2, phash_mirror=3, dhash_mirror=4)
    index = build_hash_index((i, hashes.as_dict()) for i in (5, 9))
    assert len(index) == 2 and index.get(9) == hashes
    assert [n.id for n in index.range_search(hashes, 0)] == [5, 9]
