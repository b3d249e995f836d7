"""/readyz reports the store's count of indexed images without scanning the table on every call."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.search import open_service
from app.store import Store


def test_the_count_starts_with_the_service_and_is_kept_per_loaded_index(
    indexed_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_count = Store.count_indexed

    def counting(self: Store, model: str) -> int:
        calls.append(model)
        return real_count(self, model)

    monkeypatch.setattr(Store, "count_indexed", counting)
    service = open_service(indexed_settings, require_index=False)
    try:
        first = service.start()
        again = [service.readiness(refresh=False) for _ in range(3)]
        assert first.ready and first.images == service.index_count > 0
        assert all(r.ready and r.images == first.images for r in again)
        assert calls == [service.spec.store_key]  # counted once, while the model loaded

        service.reload()  # another loaded index: counted again, once
        assert service.readiness(refresh=False).images == first.images
        service.readiness(refresh=False)
        assert len(calls) == 2

        def down(self: Store) -> None:
            raise OperationalError("SELECT 1", None, Exception("connection refused"))

        monkeypatch.setattr(Store, "ping", down)  # the cached count must not hide a dead database
        gone = service.readiness(refresh=False)
        assert not gone.ready and gone.reason is not None and "unreachable" in gone.reason
    finally:
        service.store.close()
