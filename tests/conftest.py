from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.encoder import Encoder
from app.store import Store
from tests.helpers import DATA, INSTRUMENT_MODEL, copy_photos, save_local_dir_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_report_header() -> list[str]:
    pg = os.environ.get("CLIPSEARCH_TEST_POSTGRES_URL")
    return [
        f"shared data: {DATA} ({'found' if DATA.exists() else 'MISSING'})",
        f"postgres tests: {'on, ' + pg if pg else 'off (set CLIPSEARCH_TEST_POSTGRES_URL)'}",
    ]


#: The tag vocabulary of every test that does not choose one (see small_tag_vocabulary).
TEST_TAG_VOCABULARY = """\
name: test-tags
templates: single
labels: [dog, cat, car, food, building, tree]
"""


@pytest.fixture(scope="session", autouse=True)
def small_tag_vocabulary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests tag with six labels: the built-in ImageNet vocabulary (~80k prompts) takes minutes to encode for each
    new data dir. Settings built in tests, and the CLI and servers they start, read this from the environment; a
    test that wants another vocabulary passes ``tag_vocabulary=`` (arguments win over the environment)."""
    path = tmp_path_factory.mktemp("vocabulary") / "test-tags.yaml"
    path.write_text(TEST_TAG_VOCABULARY)
    before = os.environ.get("CLIPSEARCH_TAG_VOCABULARY")
    os.environ["CLIPSEARCH_TAG_VOCABULARY"] = str(path)
    yield path
    if before is None:
        os.environ.pop("CLIPSEARCH_TAG_VOCABULARY", None)
    else:
        os.environ["CLIPSEARCH_TAG_VOCABULARY"] = before


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.exists():
        pytest.skip(f"the shared data folder {DATA} is missing (set CLIPSEARCH_SHARED_DIR)")
    return DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight CLIP saved to disk in open_clip's local-dir format."""
    return save_local_dir_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def instrument_model_dir() -> Path:
    if not (INSTRUMENT_MODEL / "open_clip_config.json").exists():
        pytest.skip(f"the trained instrument model is missing at {INSTRUMENT_MODEL}")
    return INSTRUMENT_MODEL


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        model=f"local-dir:{tiny_model_dir}",
        device="cpu",
        batch_size=8,
        decode_workers=2,
    )


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir: Path) -> Encoder:
    return Encoder.from_settings(Settings(model=f"local-dir:{tiny_model_dir}", device="cpu"))


@pytest.fixture(scope="session")
def instrument_encoder(instrument_model_dir: Path) -> Encoder:
    return Encoder.from_settings(Settings(model=f"local-dir:{instrument_model_dir}", device="cpu"))


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    s = Store(settings.effective_database_url)
    yield s
    s.close()


@pytest.fixture
def photos(tmp_path: Path, shared_data: Path) -> list[Path]:
    """A temp copy of 24 real photos from ../shared/data/coco-mini."""
    return copy_photos(tmp_path / "catalog", 24)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh empty database: SQLite always, PostgreSQL when CLIPSEARCH_TEST_POSTGRES_URL is set."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    base = os.environ.get("CLIPSEARCH_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("PostgreSQL tests need CLIPSEARCH_TEST_POSTGRES_URL (set by .ci/run)")
    from sqlalchemy import create_engine, text

    name = f"clipsearch_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
