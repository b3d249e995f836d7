"""`clipsearch models`: the recommended models with published quality, size, speed, and how to switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import main
from app.models_catalog import CATALOG, CatalogModel, table_lines


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_table_lists_every_catalog_model_with_its_figures_and_how_to_switch(runner: CliRunner) -> None:
    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.split()}
    for model in CATALOG:
        row = rows[model.name]
        assert model.pretrained in row
        if model.imagenet_top1 is not None:
            assert f"{model.imagenet_top1:.3f}" in row
        if model.download_mb is not None:
            assert f"{model.download_mb:.0f}" in row
    assert "xlm-roberta-base-ViT-B-32" in rows and "multi" in rows["xlm-roberta-base-ViT-B-32"]
    assert "CLIPSEARCH_MODEL" in result.output and "CLIPSEARCH_PRETRAINED" in result.output
    assert "clipsearch index" in result.output


def test_unpublished_figures_stay_blank_instead_of_invented() -> None:
    model = CatalogModel("some-arch", "some-tag", "English", None, imagenet_top1=0.5)
    row = table_lines([model])[2]
    assert row.split() == ["some-arch", "some-tag", "en", "0.500"]


def test_json_output_parses_and_carries_the_catalog(runner: CliRunner) -> None:
    result = runner.invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    names = [(m["name"], m["pretrained"]) for m in payload["models"]]
    assert names == [(m.name, m.pretrained) for m in CATALOG]
    default = payload["models"][0]
    assert default["settings"] == "CLIPSEARCH_MODEL=ViT-B-32 CLIPSEARCH_PRETRAINED=laion2b_s34b_b79k"
    assert default["download_mb"] == pytest.approx(default["params_millions"] * 4)
    assert "re-embedded" in payload["how_to_switch"] and payload["measured_now"] == []


def test_measure_times_a_local_model_with_its_parameter_count(runner: CliRunner, tiny_model_dir: Path) -> None:
    import open_clip

    result = runner.invoke(main, ["models", "--json", "--measure", f"local-dir:{tiny_model_dir}", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["measured_now"]
    assert "error" not in row, row
    model = open_clip.create_model(f"local-dir:{tiny_model_dir}")
    assert row["params_millions"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=0.01)
    assert row["images_per_second"] > 0 and row["text_ms"] > 0 and row["batch_size"] == 2


def test_measure_reports_an_architecture_it_cannot_build(runner: CliRunner) -> None:
    result = runner.invoke(main, ["models", "--measure", "no-such-architecture"])
    assert result.exit_code == 0, result.output
    assert "no-such-architecture: could not measure" in result.output
