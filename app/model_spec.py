"""What names a model: its open_clip name and weights, as settings give them (no torch here, so that code which
only needs the name, such as the service's ONNX start, does not import it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.errors import ModelLoadError

LOCAL_DIR_PREFIX = "local-dir:"


@dataclass(frozen=True)
class ModelSpec:
    """What identifies the vectors a model produces: two specs that differ cannot share an index."""

    name: str
    pretrained: str

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelSpec:
        name = settings.model.strip()
        if not name:
            raise ModelLoadError("CLIPSEARCH_MODEL is empty: set it to an open_clip model name such as ViT-B-32")
        if name.startswith(LOCAL_DIR_PREFIX):
            folder = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser().resolve()
            # A local-dir model carries its own weights: the pretrained setting does not apply.
            return cls(name=f"{LOCAL_DIR_PREFIX}{folder}", pretrained="")
        pretrained = settings.pretrained.strip()
        if pretrained and os.path.exists(os.path.expanduser(pretrained)):
            pretrained = str(Path(pretrained).expanduser().resolve())
        return cls(name=name, pretrained=pretrained)

    @property
    def store_key(self) -> str:
        """The model column of the store's rows: the architecture and its weights, so that changing only
        CLIPSEARCH_PRETRAINED re-embeds the catalog instead of mixing two embedding spaces."""
        return f"{self.name}|{self.pretrained}" if self.pretrained else self.name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.pretrained})" if self.pretrained else self.name

    def cli_hint(self) -> str:
        """The settings that select this model, as a person would type them."""
        hint = f"CLIPSEARCH_MODEL={self.name}"
        if not self.name.startswith(LOCAL_DIR_PREFIX):
            hint += f" CLIPSEARCH_PRETRAINED={self.pretrained}"
        return hint
