"""GET /images/{id} and GET /images/{id}/thumbnail: files served by id only, thumbnails upright and cached."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api import create_app
from app.config import Settings
from app.encoder import Encoder
from tests.api.conftest import Catalog, api_settings, build_index
from tests.helpers import copy_photos

TRAVERSALS = [
    "/images/..%2f..%2fetc%2fpasswd",
    "/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
    "/images/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/images/..%5c..%5cetc%5cpasswd",
    "/images/%2fetc%2fpasswd",
    "/images/1%2f..%2f..%2fetc%2fpasswd",
    "/images/etc/passwd",
    "/images/1;cat%20%2fetc%2fpasswd",
    "/images/-1",
    "/images/1e3",
]


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_original_is_served_by_id_with_its_content_type(
    client: TestClient, catalog: Catalog, ids_by_name: dict[str, int]
) -> None:
    for path, content_type in ((catalog.files[0], "image/jpeg"), (catalog.png, "image/png")):
        response = client.get(f"/images/{ids_by_name[path.name]}")
        assert response.status_code == 200
        assert response.headers["content-type"] == content_type
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == path.read_bytes()


@pytest.mark.parametrize("path", ["/images/999999", "/images/999999/thumbnail"])
def test_unknown_image_id_is_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "999999" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/images/abc", "/images/0", "/images/1.5/thumbnail", "/images/99999999999999999999"])
def test_malformed_image_id_is_422(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 422
    assert "image_id" in response.json()["detail"]


@pytest.fixture(scope="module")
def client_with_frontend(indexed_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    frontend = tmp_path_factory.mktemp("frontend")
    (frontend / "index.html").write_text("<!doctype html><title>clipsearch</title>")
    with TestClient(create_app(indexed_settings.with_overrides(frontend_dir=frontend))) as client:
        yield client


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_never_serves_a_file(client: TestClient, client_with_frontend: TestClient, path: str) -> None:
    for c in (client, client_with_frontend):
        response = c.get(path)
        assert response.status_code in (404, 422), (path, response.status_code)
        assert "root:" not in response.text
        assert response.headers["content-type"].startswith("application/json")


def test_thumbnail_is_a_small_jpeg_keeping_the_aspect_ratio(
    client: TestClient, catalog: Catalog, ids_by_name: dict[str, int]
) -> None:
    source = catalog.files[2]
    response = client.get(f"/images/{ids_by_name[source.name]}/thumbnail", params={"size": 128})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    thumb = open_image(response.content)
    with Image.open(source) as original:
        width, height = original.size
    assert thumb.format == "JPEG"
    assert max(thumb.size) == 128
    assert abs(thumb.size[0] / thumb.size[1] - width / height) < 0.05


def test_thumbnail_in_webp(client: TestClient, ids_by_name: dict[str, int]) -> None:
    response = client.get(f"/images/{ids_by_name['photo_006.jpg']}/thumbnail", params={"size": 256, "format": "webp"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    thumb = open_image(response.content)
    assert thumb.format == "WEBP" and max(thumb.size) == 256


@pytest.mark.parametrize(("params", "words"), [({"size": 100}, ["128, 256, 512"]), ({"size": "big"}, ["'size'"]),
                                                ({"format": "gif"}, ["'format'"])])  # fmt: skip
def test_thumbnail_size_and_format_are_limited(
    client: TestClient, ids_by_name: dict[str, int], params: dict, words: list[str]
) -> None:
    response = client.get(f"/images/{ids_by_name['photo_006.jpg']}/thumbnail", params=params)
    assert response.status_code == 422
    for word in words:
        assert word in response.json()["detail"]


def test_thumbnail_is_upright_for_an_exif_rotated_photo(
    client: TestClient, catalog: Catalog, ids_by_name: dict[str, int]
) -> None:
    response = client.get(f"/images/{ids_by_name[catalog.rotated.name]}/thumbnail", params={"size": 128})
    thumb = open_image(response.content).convert("RGB")
    width, height = thumb.size
    assert height > width  # stored landscape, shown portrait
    top, bottom = thumb.getpixel((width // 2, 5)), thumb.getpixel((width // 2, height - 6))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue at the bottom


def test_thumbnail_is_made_once_then_served_from_the_disk_cache(
    client: TestClient, indexed_settings: Settings, ids_by_name: dict[str, int]
) -> None:
    image_id = ids_by_name["photo_008.jpg"]
    cache = indexed_settings.data_dir / "thumbnails" / "512"
    before = set(cache.glob(f"{image_id}-*")) if cache.exists() else set()
    first = client.get(f"/images/{image_id}/thumbnail", params={"size": 512})
    made = set(cache.glob(f"{image_id}-*")) - before
    assert first.status_code == 200 and len(made) == 1
    cached = made.pop()
    assert cached.read_bytes() == first.content
    try:
        cached.write_bytes(b"served from the cache")
        second = client.get(f"/images/{image_id}/thumbnail", params={"size": 512})
        assert second.content == b"served from the cache"
    finally:
        cached.unlink()


def test_file_gone_from_disk_is_404_with_a_hint(
    tmp_path: Path, tiny_model_dir: Path, tiny_encoder: Encoder, shared_data: Path
) -> None:
    photos = copy_photos(tmp_path / "catalog", 3)
    settings = api_settings(tmp_path / "data", tiny_model_dir)
    build_index(settings, tiny_encoder, [tmp_path / "catalog"])
    with TestClient(create_app(settings)) as client:
        hits = client.get("/search", params={"q": "x", "k": 10}).json()["hits"]
        gone = next(h for h in hits if h["path"] == str(photos[0]))
        photos[0].unlink()
        for path in (f"/images/{gone['id']}", f"/images/{gone['id']}/thumbnail"):
            response = client.get(path)
            assert response.status_code == 404
            assert "clipsearch index" in response.json()["detail"]
