"""SearchService: text, image and "more like this" queries over the index. No HTTP, no CLI here."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.config import Settings
from app.encoder import Encoder, ModelSpec
from app.errors import BadQuery, NotFound, NotReady
from app.imaging import decode_image
from app.index import Manifest, VectorIndex, read_manifest
from app.store import Store

log = logging.getLogger(__name__)

MAX_K = 1000


@dataclass(frozen=True)
class Hit:
    id: int
    path: str
    score: float
    width: int | None
    height: int | None


class SearchService:
    """Answers queries from the current index; picks up a newer index written by the indexer."""

    def __init__(self, settings: Settings, encoder: Encoder, store: Store) -> None:
        self.settings = settings
        self.encoder = encoder
        self.store = store
        self.spec: ModelSpec = encoder.spec
        self._index: VectorIndex | None = None
        self._manifest: Manifest | None = None
        self._swap_lock = threading.Lock()

    # --- index lifecycle -------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    def load_index(self) -> Manifest:
        """Load (or reload) the index from the data dir. Raises NotReady / IndexMismatch."""
        with self._swap_lock:
            index, manifest = VectorIndex.load(
                self.settings.index_dir, model=self.spec.name, pretrained=self.spec.pretrained
            )
            if manifest.dim != self.encoder.dim:
                raise NotReady(f"the index has {manifest.dim}-d vectors but the model gives {self.encoder.dim}-d")
            # Swap references in one step: a query already running keeps the index it started with.
            self._index, self._manifest = index, manifest
            log.info("loaded index %s with %d vectors", manifest.index_file, manifest.count)
            return manifest

    def refresh_if_changed(self) -> bool:
        """Reload when the manifest on disk names another index file. Returns True if swapped."""
        try:
            current = read_manifest(self.settings.index_dir)
        except NotReady:
            return False
        if self._manifest is not None and current.index_file == self._manifest.index_file:
            return False
        self.load_index()
        return True

    def _require_index(self) -> VectorIndex:
        index = self._index
        if index is None:
            raise NotReady("no index loaded yet: run 'clipsearch index PATH' first")
        return index

    # --- queries ---------------------------------------------------------------------------------

    def embed_text(self, text: str) -> np.ndarray:
        text = text.strip()
        if not text:
            raise BadQuery("the query text is empty: type a few words describing the picture")
        vector: np.ndarray = self.encoder.encode_texts([text])[0]
        return vector

    def embed_image_bytes(self, data: bytes) -> np.ndarray:
        decoded = decode_image(
            data, max_pixels=self.settings.max_image_pixels, draft_size=self.encoder.image_size * 2
        )
        vector: np.ndarray = self.encoder.encode_images([decoded.image])[0]
        return vector

    def search_text(self, text: str, k: int = 20) -> list[Hit]:
        return self.search_vector(self.embed_text(text), k)

    def search_image_file(self, path: Path, k: int = 20) -> list[Hit]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadQuery(f"cannot read query image {path}: {exc.strerror or exc}") from exc
        return self.search_vector(self.embed_image_bytes(data), k)

    def similar(self, image_id: int, k: int = 20) -> list[Hit]:
        index = self._require_index()
        vector = index.reconstruct(image_id)
        if vector is None:
            record = self.store.get(image_id)  # raises NotFound for unknown ids
            raise NotFound(f"image {image_id} ({record.path}) is not in the index (status: {record.status})")
        return self.search_vector(vector, k, exclude={image_id})

    def search_vector(self, vector: np.ndarray, k: int, exclude: set[int] | None = None) -> list[Hit]:
        if not 1 <= k <= MAX_K:
            raise BadQuery(f"k must be between 1 and {MAX_K}, got {k}")
        index = self._require_index()
        exclude = exclude or set()
        scores, ids = index.search(vector[None, :], k + len(exclude))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and i not in exclude]
        pairs = pairs[:k]
        records = self.store.get_many([i for i, _ in pairs])
        return [
            Hit(id=i, path=records[i].path, score=s, width=records[i].width, height=records[i].height)
            for i, s in pairs
            if i in records
        ]


def open_service(settings: Settings, *, require_index: bool = True) -> SearchService:
    """Load the model, open the store and the index named by the settings."""
    store = Store(settings.effective_database_url)
    encoder = Encoder.from_settings(settings)
    service = SearchService(settings, encoder, store)
    if require_index:
        service.load_index()
    return service
