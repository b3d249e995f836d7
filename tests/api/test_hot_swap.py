"""A new index written by the indexer is picked up without a restart, and no query fails meanwhile."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from app.api import create_app
from app.config import Settings
from app.encoder import Encoder
from app.index import MANIFEST_FILE
from tests.api.conftest import build_index, make_catalog
from tests.helpers import DATA, copy_photos

WAIT_LIMIT_S = 120  # a bound on waiting for the threads, not a timing assertion


class Traffic:
    """Threads sending a mix of queries until stopped, recording every status and the totals seen."""

    def __init__(self, client: TestClient, image_id: int, threads: int = 3) -> None:
        self.client = client
        self.image_id = image_id
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.totals: Counter[int] = Counter()
        self.requests = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        queries = ["a dog", "a red car", "people on a street", "a plate of food"]
        n = seed
        while not self.stop.is_set():
            n += 1
            if n % 3 == 0:
                response = self.client.get(f"/similar/{self.image_id}", params={"k": 5})
            else:
                response = self.client.get("/search", params={"q": queries[n % len(queries)], "k": 5})
            with self.lock:
                self.requests += 1
                if response.status_code != 200:
                    self.failures.append(f"{response.request.url}: {response.status_code} {response.text}")
                elif "/search" in str(response.request.url):
                    self.totals[response.json()["total"]] += 1

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def wait_for_requests(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_LIMIT_S
        with self.lock:
            target = self.requests + count
        while time.monotonic() < deadline:
            with self.lock:
                if self.requests >= target or self.failures:
                    return
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT_LIMIT_S)


def test_new_index_is_picked_up_while_queries_run(
    settings: Settings, tmp_path: Path, tiny_encoder: Encoder, shared_data: Path
) -> None:
    settings = settings.with_overrides(index_check_seconds=0.0, frontend_dir=tmp_path / "no-ui")
    catalog = make_catalog(tmp_path / "catalog", count=12)
    build_index(settings, tiny_encoder, [catalog.root])
    first_count = len(catalog.files)

    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["index_count"] == first_count
        hits = client.get("/search", params={"q": "a photo", "k": 200}).json()["hits"]
        keep_id = next(h["id"] for h in hits if h["path"] == str(catalog.files[-1]))
        traffic = Traffic(client, keep_id)
        traffic.start()
        try:
            traffic.wait_for_requests(10)
            # The indexer adds 10 photos and removes one, writing new index files twice.
            added = copy_photos(catalog.root / "new", 10, source=DATA / "caltech101" / "airplanes")
            build_index(settings, tiny_encoder, [catalog.root])
            traffic.wait_for_requests(10)
            catalog.files[0].unlink()
            build_index(settings, tiny_encoder, [catalog.root])
            traffic.wait_for_requests(20)
        finally:
            traffic.finish()

        assert traffic.failures == []
        final_count = first_count + len(added) - 1
        ready = client.get("/readyz").json()
        assert ready["index_count"] == ready["images"] == final_count
        assert traffic.totals[first_count] > 0 and traffic.totals[final_count] > 0
        assert set(traffic.totals) <= {first_count, first_count + len(added), final_count}
        paths = {h["path"] for h in client.get("/search", params={"q": "a photo", "k": 200}).json()["hits"]}
        assert {str(p) for p in added} <= paths and str(catalog.files[0]) not in paths


def test_an_unreadable_new_manifest_keeps_the_current_index(
    settings: Settings, tmp_path: Path, tiny_encoder: Encoder, shared_data: Path
) -> None:
    settings = settings.with_overrides(index_check_seconds=0.0, frontend_dir=tmp_path / "no-ui")
    catalog = make_catalog(tmp_path / "catalog", count=6)
    build_index(settings, tiny_encoder, [catalog.root])
    manifest_path = settings.index_dir / MANIFEST_FILE
    good = manifest_path.read_text()
    with TestClient(create_app(settings)) as client:
        broken = json.loads(good) | {"index_file": "index-missing.faiss"}
        manifest_path.write_text(json.dumps(broken))
        response = client.get("/search", params={"q": "a dog"})
        assert response.status_code == 200
        assert response.json()["total"] == len(catalog.files)
        assert client.get("/readyz").status_code == 200
        # Once a good index is written again, it is picked up.
        copy_photos(catalog.root / "more", 2, source=DATA / "caltech101" / "anchor")
        manifest_path.write_text(good)
        build_index(settings, tiny_encoder, [catalog.root])
        assert client.get("/readyz").json()["index_count"] == len(catalog.files) + 2


def test_a_file_changed_in_place_shows_its_new_size_after_reindexing(
    settings: Settings, tmp_path: Path, tiny_encoder: Encoder, shared_data: Path
) -> None:
    settings = settings.with_overrides(index_check_seconds=0.0, frontend_dir=tmp_path / "no-ui")
    catalog = make_catalog(tmp_path / "catalog", count=4)
    build_index(settings, tiny_encoder, [catalog.root])
    target = catalog.files[1]

    def hit_for_target(client: TestClient) -> dict:
        params = {"q": "a photo", "k": 200, "min_width": 1}  # a filter: rows come from the service's cache
        return next(h for h in client.get("/search", params=params).json()["hits"] if h["path"] == str(target))

    with TestClient(create_app(settings)) as client:
        before = hit_for_target(client)
        with Image.open(target) as image:
            image.resize((77, 55)).save(target, format="JPEG")
        build_index(settings, tiny_encoder, [catalog.root])
        after = hit_for_target(client)
        assert after["id"] == before["id"]
        assert (after["width"], after["height"]) == (77, 55) != (before["width"], before["height"])


def test_service_started_before_the_first_index_becomes_ready_when_it_appears(
    settings: Settings, tmp_path: Path, tiny_encoder: Encoder, shared_data: Path
) -> None:
    settings = settings.with_overrides(index_check_seconds=0.0, frontend_dir=tmp_path / "no-ui")
    catalog = make_catalog(tmp_path / "catalog", count=3)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/search", params={"q": "a dog"}).status_code == 503
        build_index(settings, tiny_encoder, [catalog.root])
        assert client.get("/search", params={"q": "a dog"}).json()["total"] == len(catalog.files)
        assert client.get("/readyz").json()["index_count"] == len(catalog.files)
