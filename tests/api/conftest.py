"""A small real catalog indexed with the tiny random-weight model, and apps serving it."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api import create_app
from app.config import Settings
from app.encoder import Encoder
from app.store import Store
from indexer import Indexer
from tests.helpers import copy_photos

DAY = 86_400.0
#: 2020-01-01T00:00:00Z; file i of the catalog is modified on day i after it
BASE_MTIME = 1_577_836_800.0
ROTATED_SIZE = (120, 60)  # stored landscape; EXIF orientation 6 makes it portrait 60x120


def rotated_jpeg() -> bytes:
    """A JPEG stored landscape (left half red, right half blue) whose EXIF says 'rotate 90 degrees clockwise'.

    Shown upright it is portrait, red on top and blue at the bottom."""
    image = Image.new("RGB", ROTATED_SIZE, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, ROTATED_SIZE[0] // 2, ROTATED_SIZE[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


@dataclass
class Catalog:
    root: Path
    files: list[Path]
    rotated: Path
    png: Path

    @property
    def trips(self) -> Path:
        return self.root / "trips"


def make_catalog(root: Path, count: int = 28) -> Catalog:
    """``count`` real photos in two folders plus a generated PNG and an EXIF-rotated JPEG, with known mtimes."""
    photos = copy_photos(root / "_incoming", count)
    (root / "trips").mkdir(parents=True)
    (root / "home").mkdir(parents=True)
    files = []
    for i, photo in enumerate(photos):
        target = root / ("trips" if i < count // 2 else "home") / photo.name
        shutil.move(photo, target)
        files.append(target)
    (root / "_incoming").rmdir()
    png = root / "home" / "drawing.png"
    with Image.open(files[0]) as source:
        source.convert("L").resize((300, 200)).save(png)
    rotated = root / "home" / "rotated.jpg"
    rotated.write_bytes(rotated_jpeg())
    files += [png, rotated]
    for i, path in enumerate(files):
        os.utime(path, (BASE_MTIME + i * DAY, BASE_MTIME + i * DAY))
    return Catalog(root=root, files=files, rotated=rotated, png=png)


def build_index(settings: Settings, encoder: Encoder, roots: list[Path]) -> None:
    store = Store(settings.effective_database_url)
    try:
        Indexer(settings, store, encoder, progress=False).run(roots)
    finally:
        store.close()


def api_settings(data_dir: Path, model_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "model": f"local-dir:{model_dir}",
        "device": "cpu",
        "batch_size": 8,
        "decode_workers": 2,
        "index_check_seconds": 0.0,
        "frontend_dir": data_dir / "no-frontend",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def assert_served_in_mode(tmp_path: Path, model_dir: Path, encoder: Encoder, inference: str) -> Path:
    """Index 4 real photos with the fp32 torch encoder, serve that index with ``inference`` and check that the
    service is ready, says which mode it runs and answers a search. Returns the data dir."""
    data_dir = tmp_path / "data"
    copy_photos(tmp_path / "catalog", 4)
    build_index(api_settings(data_dir, model_dir), encoder, [tmp_path / "catalog"])
    with TestClient(create_app(api_settings(data_dir, model_dir, inference=inference))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["inference"] == inference and ready.json()["index_count"] == 4
        hits = client.get("/search", params={"q": "a photo"})
        assert hits.status_code == 200 and len(hits.json()["hits"]) >= 1, hits.text
    return data_dir


@pytest.fixture(scope="session")
def catalog(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Catalog:
    return make_catalog(tmp_path_factory.mktemp("api-catalog"))


@pytest.fixture(scope="session")
def indexed_settings(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_encoder: Encoder, catalog: Catalog
) -> Settings:
    """Settings of a data dir holding the index of the catalog (shared, read-only)."""
    settings = api_settings(tmp_path_factory.mktemp("api-data"), tiny_model_dir)
    build_index(settings, tiny_encoder, [catalog.root])
    return settings


@pytest.fixture(scope="session")
def client(indexed_settings: Settings) -> Iterator[TestClient]:
    """A running app over the shared index. Tests that change files or settings make their own."""
    with TestClient(create_app(indexed_settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def ids_by_name(client: TestClient) -> dict[str, int]:
    """Image id by file name, read back through the API."""
    body = client.get("/search", params={"q": "a photo", "k": 200}).json()
    return {Path(hit["path"]).name: hit["id"] for hit in body["hits"]}
