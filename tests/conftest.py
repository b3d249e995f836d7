from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import Settings
from app.encoder import Encoder
from app.search import SearchService
from app.store import Store
from indexer.pipeline import Indexer
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


@pytest.fixture(scope="session", autouse=True)
def torch_inference_by_default() -> Iterator[None]:
    """Tests run the torch path unless they choose a mode: the default ('auto') exports both towers to ONNX once
    per data dir with fixed weights (seconds per test). The tests that cover 'auto' and the ONNX modes pass
    ``inference=`` or set the variable themselves (arguments win over the environment)."""
    before = os.environ.get("CLIPSEARCH_INFERENCE")
    os.environ["CLIPSEARCH_INFERENCE"] = "fp32"
    yield
    if before is None:
        os.environ.pop("CLIPSEARCH_INFERENCE", None)
    else:
        os.environ["CLIPSEARCH_INFERENCE"] = before


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


@dataclass(frozen=True)
class TrainedCatalog:
    """Caltech-101 indexed once with the trained model, through the product path (see ``trained_caltech``).

    ``settings``: the Settings it was indexed with (tmp data dir, trained model, default index settings: flat).
    ``data_dir``: that data dir (store + index). ``root``: the photo folder that was indexed.
    Open things on it with ``open_store()`` / ``open_service()`` (close the store, or ``service.store``, when done),
    and read the whole catalog with ``vectors()``. Treat it as read-only: other tests share it.
    """

    settings: Settings
    data_dir: Path
    root: Path
    encoder: Encoder

    def open_store(self) -> Store:
        return Store(self.settings.effective_database_url)

    def open_service(self) -> SearchService:
        """A SearchService with the index loaded (shares the session's encoder: no second model load)."""
        service = SearchService(self.settings, self.encoder, self.open_store())
        service.load_index()
        return service

    def relative(self, path: str | Path) -> str:
        """A stored (absolute) path as a path under ``root``, e.g. 'Leopards/image_0001.jpg'."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def vectors(self) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """Every indexed image: (ids, unit vectors (N, dim) float32, relative paths, class folder of each)."""
        store = self.open_store()
        try:
            chunks = list(store.iter_vectors(self.encoder.spec.name))
            ids = np.concatenate([c[0] for c in chunks])
            vectors = np.concatenate([c[1] for c in chunks])
            records = store.get_many([int(i) for i in ids])
        finally:
            store.close()
        paths = [self.relative(records[int(i)].path) for i in ids]
        return ids, vectors, paths, [p.split("/", 1)[0] for p in paths]


@pytest.fixture(scope="session")
def trained_caltech(
    tmp_path_factory: pytest.TempPathFactory, shared_data: Path, instrument_encoder: Encoder
) -> TrainedCatalog:
    """``../shared/data/caltech101`` (3,345 photos in 101 class folders) indexed ONCE per test session with the
    trained model ``local-dir:../shared/models/clipsearch-tiny-64``, by ``Indexer(...).run([root])`` with default
    index settings (a flat, exact index). Takes about a minute; every test that needs it shares it."""
    root = shared_data / "caltech101"
    if not root.is_dir():
        pytest.skip(f"the Caltech-101 catalog is missing at {root}")
    data_dir = tmp_path_factory.mktemp("trained-caltech") / "data"
    settings = Settings(data_dir=data_dir, model=instrument_encoder.spec.name, device="cpu")
    encoder = instrument_encoder
    store = Store(settings.effective_database_url)
    try:
        Indexer(settings, store, encoder, progress=False).run([root])
    finally:
        store.close()
    return TrainedCatalog(settings=settings, data_dir=data_dir, root=root, encoder=encoder)


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
