"""`clipsearch dupes`: a photo is grouped with its edited copies, never with an unrelated photo or a burst shot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from app.cli import main
from app.encoder import Encoder
from tests.helpers import copy_photos
from tests.test_duplicates import dupe_settings, index_folder

#: Two Caltech-101 face photos of one person taken seconds apart: the same scene, not a copy.
BURST = ("Faces/image_0373.jpg", "Faces/image_0374.jpg")


@pytest.fixture(scope="module")
def catalog(
    tmp_path_factory: pytest.TempPathFactory, shared_data: Path, tiny_model_dir: Path, tiny_encoder: Encoder
) -> tuple[list[str], Path]:
    """Photos (one with a cropped, a flipped and a byte-identical copy in reposted/) and a burst pair."""
    root = tmp_path_factory.mktemp("dupes-cli")
    photos = copy_photos(root / "catalog", 4)
    with Image.open(photos[0]) as opened:
        original = opened.convert("RGB")
    width, height = original.size
    copies = root / "catalog" / "reposted"
    copies.mkdir()
    original.crop((width // 5, height // 5, width * 4 // 5, height * 4 // 5)).save(copies / "crop.jpg", quality=85)
    ImageOps.mirror(original).save(copies / "flip.jpg", quality=85)
    shutil.copy2(photos[0], copies / "same.jpg")
    for relative in BURST:
        shutil.copy2(shared_data / "caltech101" / relative, root / "catalog" / f"burst_{Path(relative).name}")
    settings = dupe_settings(root / "data", tiny_model_dir)
    index_folder(settings, tiny_encoder, root / "catalog")
    args = ["--data-dir", str(settings.data_dir), "--model", settings.model, "--device", "cpu"]
    return args, root / "catalog"


def run_dupes(args: list[str], *extra: str) -> Any:
    # Random-weight CLIP: its cosines must not make pairs 'similar' (see tests/test_duplicates.py).
    result = CliRunner().invoke(main, ["dupes", *extra, *args], env={"CLIPSEARCH_DUPE_SIMILAR_COSINE": "1.0"})
    assert result.exit_code == 0, result.output
    return result


def names(group: dict[str, Any]) -> list[str]:
    return sorted(Path(m["path"]).name for m in group["members"])


def test_dupes_groups_a_photo_with_its_edited_copies_only(catalog: tuple[list[str], Path]) -> None:
    args, _ = catalog
    body = json.loads(run_dupes(args, "--json").output)
    assert body["min_verdict"] == "near_duplicate" and body["images"] == 9
    assert [names(g) for g in body["groups"]] == [["crop.jpg", "flip.jpg", "photo_000.jpg", "same.jpg"]]
    first, *others = body["groups"][0]["members"]
    assert Path(first["path"]).name == "photo_000.jpg" and first["verdict"] is None  # the largest, then oldest id
    verdicts = {Path(m["path"]).name: m["verdict"] for m in others}
    assert verdicts == {"crop.jpg": "near_duplicate", "flip.jpg": "near_duplicate", "same.jpg": "exact"}
    assert all(m["reason"] for m in others)


def test_burst_shots_are_grouped_only_as_similar(catalog: tuple[list[str], Path]) -> None:
    args, _ = catalog
    body = json.loads(run_dupes(args, "--json", "--min-verdict", "similar").output)
    groups = [names(g) for g in body["groups"]]
    assert ["burst_image_0373.jpg", "burst_image_0374.jpg"] in groups
    burst = next(g for g in body["groups"] if names(g) == ["burst_image_0373.jpg", "burst_image_0374.jpg"])
    assert burst["members"][1]["verdict"] == "similar"


def test_min_verdict_exact_groups_only_identical_pixels(catalog: tuple[list[str], Path]) -> None:
    args, _ = catalog
    body = json.loads(run_dupes(args, "--json", "--min-verdict", "exact").output)
    assert [names(g) for g in body["groups"]] == [["photo_000.jpg", "same.jpg"]]


def test_dupes_table_and_folder_filter(catalog: tuple[list[str], Path]) -> None:
    args, root = catalog
    table = run_dupes(args).output.splitlines()
    assert table[0].split() == ["group", "id", "verdict", "path"]
    rows = [line.split() for line in table[1:5]]
    assert [row[0] for row in rows] == ["1"] * 4
    assert sorted(row[2] for row in rows) == ["(first)", "exact", "near_duplicate", "near_duplicate"]
    assert table[-1].startswith("1 groups of 4 images (near_duplicate or stronger) among 9 images")

    only_copies = json.loads(run_dupes(args, "--json", str(root / "reposted")).output)
    assert only_copies["images"] == 3
    assert [names(g) for g in only_copies["groups"]] == [["crop.jpg", "flip.jpg", "same.jpg"]]


def test_dupes_on_an_empty_data_dir_says_so(tmp_path: Path, tiny_model_dir: Path) -> None:
    args = ["--data-dir", str(tmp_path / "data"), "--model", f"local-dir:{tiny_model_dir}", "--device", "cpu"]
    assert "no indexed images" in run_dupes(args).output
