"""An indexing run's encoder, built only if the run needs the model (without importing torch until then)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.model_spec import ModelSpec

if TYPE_CHECKING:
    from app.encoder import Encoder


class LazyEncoder:
    """An indexing run's encoder, built the first time something needs the model.

    A run that finds every file unchanged embeds nothing and tags nothing: it then never builds the model, nor
    imports torch or open_clip (nothing on that path does: ``indexer.pipeline`` imports them when it embeds). A
    no-op ``clipsearch index`` of ViT-B-32 took 8.7-10.9 s, most of it the imports (torch 1.5 s, torchvision and
    transformers through open_clip 2.5-3.9 s) and the model with its ONNX sessions. ``spec`` needs no model; ``dim``
    is the model's once it is built, else ``known_dim`` (the length of the vectors the store holds for it:
    ``Indexer`` sets it), else it builds; any other attribute is the built encoder's. Bad model settings are then
    reported when the model is first needed rather than before the scan."""

    def __init__(self, settings: Settings, *, indexing: bool = False) -> None:
        self.spec = ModelSpec.from_settings(settings)
        self.known_dim: int | None = None
        self._settings, self._indexing = settings, indexing
        self._encoder: Encoder | None = None
        self._building = threading.Lock()

    @property
    def built(self) -> bool:
        return self._encoder is not None

    def get(self) -> Encoder:
        """The encoder, built on the first call (once, whichever thread asks first)."""
        with self._building:
            if self._encoder is None:
                from app.encoder import Encoder  # torch, open_clip: only now

                self._encoder = Encoder.from_settings(self._settings, indexing=self._indexing)
            return self._encoder

    @property
    def dim(self) -> int:
        if self._encoder is None and self.known_dim is not None:
            return self.known_dim
        return self.get().dim

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never build for the interpreter's own probes (copy, pickle) or in __init__
            raise AttributeError(name)
        return getattr(self.get(), name)
