"""Settings: the only place that reads the environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Settings(BaseSettings):
    """Every knob of clipsearch. Environment variables use the prefix ``CLIPSEARCH_``."""

    model_config = SettingsConfigDict(env_prefix="CLIPSEARCH_", extra="ignore", protected_namespaces=())

    data_dir: Path = Field(
        default=Path("clipsearch-data"),
        description="Folder holding the SQLite metadata file, the FAISS index and caches.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the metadata store; default: SQLite file in the data dir.",
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        description="open_clip model name, or 'local-dir:/path' for a model folder carrying its own weights.",
    )
    pretrained: str = Field(
        default=DEFAULT_PRETRAINED,
        description="open_clip pretrained tag, a local checkpoint path, or empty for none.",
    )
    model_cache_dir: Path | None = Field(default=None, description="Where downloaded weights are kept.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=32, ge=1, le=4096)
    decode_workers: int = Field(default_factory=_default_workers, ge=1, le=256)
    max_image_pixels: int = Field(
        default=100_000_000, ge=1, description="Images with more pixels are refused (decompression bombs)."
    )

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand_data_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'clipsearch.db').resolve()}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    def with_overrides(self, **overrides: object) -> Settings:
        """A copy with the given fields replaced (None values are ignored), validated again."""
        values = self.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings.model_validate(values)
