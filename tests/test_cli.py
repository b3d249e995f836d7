"""The `clipsearch` command as a user runs it: index, search, similar, stats, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import main
from app.config import Settings
from app.store import SCHEMA_VERSION


def _args(settings: Settings) -> list[str]:
    return ["--data-dir", str(settings.data_dir), "--model", settings.model, "--device", "cpu"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_index_then_search_then_stats(runner: CliRunner, settings: Settings, photos: list[Path]) -> None:
    result = runner.invoke(main, ["index", str(photos[0].parent), *_args(settings), "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    assert "added 24, updated 0, unchanged 0, reused 0, removed 0, failed 0" in result.output

    result = runner.invoke(main, ["search", "a photo of a dog", "-k", "5", "--json", *_args(settings)])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["hits"]
    assert len(hits) == 5 and all(Path(h["path"]).parent == photos[0].parent for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    result = runner.invoke(main, ["similar", str(hits[0]["id"]), "-k", "3", "--json", *_args(settings)])
    assert result.exit_code == 0, result.output
    similar = json.loads(result.output)["hits"]
    assert len(similar) == 3 and hits[0]["id"] not in [h["id"] for h in similar]

    result = runner.invoke(main, ["search", "--image", str(photos[4]), "-k", "1", "--json", *_args(settings)])
    assert json.loads(result.output)["hits"][0]["path"] == str(photos[4])  # an image finds itself first

    result = runner.invoke(main, ["stats", "--json", *_args(settings)])
    info = json.loads(result.output)
    assert info["images"]["indexed"] == 24 and info["index"]["count"] == 24 and info["schema_version"] == SCHEMA_VERSION


def test_running_index_again_on_unchanged_files_loads_no_model(
    runner: CliRunner, settings: Settings, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.encoder import Encoder

    builds: list[bool] = []
    real = Encoder.from_settings.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        Encoder, "from_settings", classmethod(lambda cls, *a, **k: builds.append(True) or real(cls, *a, **k))
    )
    args = ["index", str(photos[0].parent), *_args(settings)]
    assert runner.invoke(main, args).exit_code == 0 and len(builds) == 1
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "unchanged 24" in result.output and "index holds 24 vectors" in result.output
    assert len(builds) == 1  # the second run built no encoder
    # nor, in a process of its own, imported torch or open_clip (1.5 and 2.5 s of imports on a 2-core CPU)
    code = (
        "import json, sys; from app.cli import main; main(sys.argv[1:], standalone_mode=False); "
        "print(json.dumps([m in sys.modules for m in ('torch', 'open_clip', 'torchvision')]))"
    )
    run = subprocess.run([sys.executable, "-c", code, *args, "--quiet"], capture_output=True, text=True, check=True)
    assert "unchanged 24" in run.stdout and json.loads(run.stdout.splitlines()[-1]) == [False, False, False]


def test_environment_settings_apply_and_flags_override_them(
    runner: CliRunner, settings: Settings, photos: list[Path], tmp_path: Path
) -> None:
    env = {"CLIPSEARCH_DATA_DIR": str(tmp_path / "from-env"), "CLIPSEARCH_MODEL": settings.model}
    result = runner.invoke(main, ["index", str(photos[0].parent), "-q"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-env" / "clipsearch.db").exists()
    result = runner.invoke(main, ["stats", "--json", "--data-dir", str(tmp_path / "flag")], env=env)
    assert json.loads(result.output)["images"]["indexed"] == 0


def test_strict_fails_on_bad_files_but_plain_run_succeeds(
    runner: CliRunner, settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.jpg").write_text("not an image")
    result = runner.invoke(main, ["index", str(folder), *_args(settings)])
    assert result.exit_code == 0 and "failed 1" in result.output and "not a recognised image" in result.output
    result = runner.invoke(main, ["index", str(folder), "--strict", "--retry-failed", *_args(settings)])
    assert result.exit_code == 1


def test_fatal_errors_exit_2_with_a_message(runner: CliRunner, settings: Settings, tmp_path: Path) -> None:
    result = runner.invoke(main, ["index", str(tmp_path / "missing"), *_args(settings)])
    assert result.exit_code == 2 and "no such file or folder" in result.output
    result = runner.invoke(main, ["search", "anything", *_args(settings)])
    assert result.exit_code == 2 and "clipsearch index" in result.output  # no index yet
    result = runner.invoke(main, ["search", *_args(settings)])
    assert result.exit_code == 2 and "either a text QUERY or --image" in result.output


def test_searching_with_another_model_than_the_index_is_refused(
    runner: CliRunner, settings: Settings, photos: list[Path], tmp_path: Path
) -> None:
    from tests.helpers import save_local_dir_model

    runner.invoke(main, ["index", str(photos[0].parent), *_args(settings)])
    other = save_local_dir_model(tmp_path / "other-model", seed=3)
    args = ["--data-dir", str(settings.data_dir), "--model", f"local-dir:{other}", "--device", "cpu"]
    result = runner.invoke(main, ["search", "a cat", *args])
    assert result.exit_code == 2
    built_with = settings.model.removeprefix("local-dir:")
    assert f"was built with model local-dir:{Path(built_with).resolve()}" in result.output
    assert f"CLIPSEARCH_MODEL=local-dir:{Path(built_with).resolve()}" in result.output
