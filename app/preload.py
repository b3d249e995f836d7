"""Read the vector index while the rest of the service starts.

``clipsearch serve`` spends most of its start importing torch and open_clip and creating the model; reading a
large index file (about 0.6 s per million vectors in IVF-SQ8 here, more from a cold disk) can happen meanwhile,
because FAISS reads without holding the GIL. This module imports only FAISS and numpy (through app.index), so
the read starts before the heavy imports do. The service then takes the preloaded index only if it is the one the
manifest still names and it matches the configured model; otherwise it loads as usual.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from app.index import Manifest, VectorIndex, check_manifest, read_manifest

log = logging.getLogger(__name__)


class IndexPreload:
    """The index named by the manifest in ``directory``, read on a background thread from construction on."""

    def __init__(self, directory: Path, *, nprobe: int = 32) -> None:
        self.directory = Path(directory)
        self.nprobe = nprobe
        self._result: tuple[VectorIndex, Manifest] | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._load, name="index-preload", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            manifest = read_manifest(self.directory)
            # The manifest's own model: whether it is the configured one is checked in take().
            self._result = VectorIndex.load(
                self.directory, model=manifest.model, pretrained=manifest.pretrained, nprobe=self.nprobe
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the normal load, which runs instead
            self._error = exc
        self.seconds = time.perf_counter() - started

    def take(self, *, model: str, pretrained: str) -> tuple[VectorIndex, Manifest] | None:
        """The preloaded index and manifest, once; None when the read failed or the manifest changed since
        (the caller then loads normally and reports any problem). Raises IndexMismatch, as a load does,
        when the index was built with another model."""
        self._thread.join()
        result, self._result = self._result, None
        if result is None:
            log.debug("index preload gave nothing (%s): loading normally", self._error)
            return None
        index, manifest = result
        try:
            current = read_manifest(self.directory)
        except Exception:  # noqa: BLE001 - the normal load reports it
            return None
        if current.index_file != manifest.index_file:
            log.info("the index changed while it was being preloaded: loading the new one")
            return None
        check_manifest(manifest, model=model, pretrained=pretrained)
        log.info("index preloaded in %.2fs while the model loaded", self.seconds)
        return index, manifest
