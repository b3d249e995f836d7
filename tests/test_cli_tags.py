"""`clipsearch tags`: the catalog's labels with counts, one image's labels, and re-tagging from stored vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import main
from app.config import Settings
from app.store import Store, TagKind

SEASONS = "name: seasons\ntemplates: single\nthreshold: 0.0\nlabels: [spring, summer, autumn, winter]\n"


@pytest.fixture
def indexed(settings: Settings, photos: list[Path]) -> list[str]:
    """The photos indexed through the CLI (with the tests' default small tag vocabulary); the shared flags."""
    args = ["--data-dir", str(settings.data_dir), "--model", settings.model, "--device", "cpu"]
    result = CliRunner().invoke(main, ["index", str(photos[0].parent), "-q", *args])
    assert result.exit_code == 0, result.output
    assert "tagged 24" in result.output
    return args


def test_tags_lists_labels_with_the_counts_the_store_holds(settings: Settings, indexed: list[str]) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["tags", "--json", *indexed])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert (body["vocabulary"], body["safe_search_vocabulary"]) == ("test-tags", "safe-search")
    store = Store(settings.effective_database_url)
    try:
        assert {t["label"]: t["count"] for t in body["tags"]} == store.label_counts(TagKind.TAG)
        assert sum(t["count"] for t in body["tags"]) >= 24  # the max of six softmax shares passes 0.1
    finally:
        store.close()
    text = runner.invoke(main, ["tags", *indexed]).output
    assert "tags (vocabulary 'test-tags'):" in text and "flags (vocabulary 'safe-search'):" in text
    top = body["tags"][0]
    assert f"{top['count']:>7}  {top['label']}" in text
    limited = json.loads(runner.invoke(main, ["tags", "--json", "-n", "1", "--all", *indexed]).output)
    assert len(limited["tags"]) == 1
    everything = json.loads(runner.invoke(main, ["tags", "--json", "--all", "-n", "0", *indexed]).output)
    assert {t["label"] for t in everything["tags"]} == {"dog", "cat", "car", "food", "building", "tree"}


def test_tags_of_one_image_and_of_an_unknown_one(settings: Settings, indexed: list[str], photos: list[Path]) -> None:
    store = Store(settings.effective_database_url)
    try:
        image_id = store.file_states()[str(photos[0])].id
        stored = store.tags_of(image_id)
    finally:
        store.close()
    runner = CliRunner()
    body = json.loads(runner.invoke(main, ["tags", "--image", str(image_id), "--json", *indexed]).output)
    assert [t["label"] for t in body["tags"]] == [t.label for t in stored if t.kind == "tag"]
    text = runner.invoke(main, ["tags", "--image", str(image_id), *indexed]).output
    assert str(photos[0]) in text and f"{stored[0].label} {stored[0].score:.2f}" in text
    missing = runner.invoke(main, ["tags", "--image", "99999", *indexed])
    assert missing.exit_code == 2 and "no image with id 99999" in missing.output


def test_retag_recomputes_every_image_under_the_new_vocabulary(
    settings: Settings, indexed: list[str], tmp_path: Path
) -> None:
    seasons = tmp_path / "seasons.yaml"
    seasons.write_text(SEASONS)
    runner = CliRunner()
    env = {"CLIPSEARCH_TAG_VOCABULARY": str(seasons), "CLIPSEARCH_TAG_TOP_K": "2"}
    result = runner.invoke(main, ["tags", "--retag", "--json", "-q", *indexed], env=env)
    assert result.exit_code == 0, result.output
    assert "tagged 24 images" in result.stderr
    body = json.loads(result.stdout)
    assert body["vocabulary"] == "seasons"
    assert {t["label"] for t in body["tags"]} <= {"spring", "summer", "autumn", "winter"}
    assert sum(t["count"] for t in body["tags"]) == 24 * 2
    # the next index run finds every image up to date: nothing to embed, nothing to tag
    again = runner.invoke(main, ["index", str(settings.data_dir.parent / "catalog"), "-q", *indexed], env=env)
    assert "embedded 0 images" in again.output and "tagged" not in again.output
    broken = runner.invoke(main, ["tags", *indexed], env={"CLIPSEARCH_TAG_VOCABULARY": str(tmp_path / "nope.yaml")})
    assert broken.exit_code == 2 and "CLIPSEARCH_TAG_VOCABULARY" in broken.output
