"""POST /search/image: search by an uploaded picture, with size, type and pixel limits; nothing is stored."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api import create_app
from app.config import Settings
from tests.api.conftest import Catalog

UPLOAD_LIMIT = 50_000


@pytest.fixture(scope="module")
def small_upload_client(indexed_settings: Settings) -> Iterator[TestClient]:
    settings = indexed_settings.with_overrides(max_upload_bytes=UPLOAD_LIMIT, max_upload_pixels=1_000_000)
    with TestClient(create_app(settings)) as client:
        yield client


def upload(client: TestClient, data: bytes, name: str = "query.jpg", content_type: str = "image/jpeg", **params):
    return client.post("/search/image", files={"file": (name, data, content_type)}, params=params)


def small_jpeg(source: Path, side: int = 200) -> bytes:
    with Image.open(source) as image:
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (it would expand to gigabytes)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def real_bomb() -> bytes:
    """A real, valid 4000x4000 bilevel PNG: a few kilobytes on the wire, 16 megapixels once decoded."""
    out = io.BytesIO()
    Image.new("1", (4000, 4000), 0).save(out, format="PNG", optimize=True)
    return out.getvalue()


def files_under(folder: Path) -> set[Path]:
    return {Path(root) / name for root, _, names in os.walk(folder) for name in names}


def test_upload_of_an_indexed_photo_finds_it_first(client: TestClient, catalog: Catalog) -> None:
    target = catalog.files[4]
    response = upload(client, target.read_bytes(), name=target.name, k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == f"upload:{target.name}"
    assert body["total"] == len(catalog.files)
    assert body["hits"][0]["path"] == str(target)
    assert body["hits"][0]["score"] > 0.99


def test_upload_is_sniffed_by_content_not_by_name(client: TestClient, catalog: Catalog) -> None:
    photo = upload(client, catalog.files[1].read_bytes(), name="notes.txt", content_type="text/plain")
    assert photo.status_code == 200, photo.text
    text = upload(client, b"just some text, not a picture\n" * 20, name="holiday.jpg")
    assert text.status_code == 415
    assert "not a recognised image" in text.json()["detail"]


def test_empty_upload_is_415(client: TestClient) -> None:
    response = upload(client, b"")
    assert response.status_code == 415
    assert "empty" in response.json()["detail"]


def test_upload_paging_and_min_score(client: TestClient, catalog: Catalog) -> None:
    data = catalog.files[7].read_bytes()
    full = upload(client, data, k=200).json()
    page = upload(client, data, k=5, offset=5).json()
    assert [h["id"] for h in page["hits"]] == [h["id"] for h in full["hits"][5:10]]
    cutoff = full["hits"][2]["score"]
    cut = upload(client, data, min_score=cutoff).json()
    assert cut["total"] == sum(1 for h in full["hits"] if h["score"] >= cutoff)


def test_missing_file_field_is_422(client: TestClient) -> None:
    response = client.post("/search/image", data={"image": "x"})
    assert response.status_code == 422
    assert "'file'" in response.json()["detail"]


def test_bad_paging_on_upload_is_422(client: TestClient, catalog: Catalog) -> None:
    response = upload(client, catalog.files[0].read_bytes(), k=1000)
    assert response.status_code == 422
    assert "'k'" in response.json()["detail"]


def test_upload_just_over_the_limit_is_413(small_upload_client: TestClient) -> None:
    response = upload(small_upload_client, b"\xff" * (UPLOAD_LIMIT + 1))
    assert response.status_code == 413
    assert "50,000 bytes" in response.json()["detail"]


def test_far_too_large_upload_is_refused_before_parsing(small_upload_client: TestClient) -> None:
    response = upload(small_upload_client, b"\xff" * (20 * UPLOAD_LIMIT))
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "50,000 bytes" in detail and "smaller" in detail


def test_streamed_upload_without_a_length_is_cut_off_at_the_limit(small_upload_client: TestClient) -> None:
    boundary = "clipsearchtestboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(40):  # 40 x 16 KiB, well over the limit, with no Content-Length up front
            yield b"\xff" * 16_384
        yield f"\r\n--{boundary}--\r\n".encode()

    response = small_upload_client.post(
        "/search/image", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413
    assert "50,000 bytes" in response.json()["detail"]


def test_upload_under_the_limit_is_accepted(small_upload_client: TestClient, catalog: Catalog) -> None:
    data = small_jpeg(catalog.files[3])
    assert len(data) < UPLOAD_LIMIT
    assert upload(small_upload_client, data).status_code == 200


@pytest.mark.parametrize("bomb", [png_header_bomb(50_000, 50_000), real_bomb()], ids=["header", "real"])
def test_decompression_bomb_is_refused_with_its_pixel_count(small_upload_client: TestClient, bomb: bytes) -> None:
    assert len(bomb) < UPLOAD_LIMIT
    response = upload(small_upload_client, bomb, name="innocent.png", content_type="image/png")
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "pixels" in detail and "limit" in detail


def test_uploads_are_never_stored(client: TestClient, indexed_settings: Settings, catalog: Catalog) -> None:
    before_data, before_catalog = files_under(indexed_settings.data_dir), files_under(catalog.root)
    images_before = client.get("/readyz").json()["images"]
    marker = small_jpeg(catalog.files[9], side=150)
    assert upload(client, marker, name="secret-upload.jpg").status_code == 200
    assert files_under(indexed_settings.data_dir) == before_data
    assert files_under(catalog.root) == before_catalog
    assert client.get("/readyz").json()["images"] == images_before
    for path in files_under(indexed_settings.data_dir):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert marker not in path.read_bytes()
