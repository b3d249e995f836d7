"""Settings: the only place that reads the environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from app.dupes import DupeThresholds

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
    inference: Literal["auto", "fp32", "int8", "onnx", "onnx-int8", "bf16"] = Field(
        default="auto",
        description="CPU inference: 'int8' quantises the model's linear layers (faster, cosine >= 0.995 to fp32); "
        "'onnx' / 'onnx-int8' run ONNX Runtime on an export cached under data_dir/onnx (fp32 / int8); 'auto' is "
        "'onnx' on a CPU when the weights are fixed (a file, a local-dir folder, a pretrained tag), else 'fp32'; "
        "'bf16' runs the image tower's matrix products, and the attention and MLP activations between them, in "
        "bfloat16 (1.8x fp32 on a Zen 4 with AVX512_BF16, 3.4x on a Xeon with AMX; cosine >= 0.9999 to fp32; slower "
        "than fp32 elsewhere), its residual stream, layer norms and the text tower in fp32; 'auto' indexes with it "
        "on such CPUs.",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Threads for torch and FAISS in this process; 0: the library defaults (all cores).",
    )
    batch_size: int = Field(default=32, ge=1, le=4096)
    decode_workers: int = Field(
        default_factory=_default_workers,
        ge=1,
        le=256,
        description="Threads decoding images for the model; when not set: min(4, cores), and every core when the "
        "model runs on a GPU (the indexer decides: the threads are then what feeds it).",
    )
    encode_lanes: int = Field(
        default=0,
        ge=0,
        le=64,
        description="CPU indexing: how many batches are prepared and encoded at once, each by its own thread on its "
        "share of the cores (every core prepares its photos, then runs the model on them, with no core waiting on "
        "another); 0: one lane per core, at most 4; 1: one batch at a time with the model on every core and "
        "decode_workers preparing photos for it. At most one lane per thread (CLIPSEARCH_TORCH_THREADS, else the "
        "cores); a GPU always uses one lane.",
    )
    decode_overlap: Literal["auto", "always", "between-batches"] = Field(
        default="auto",
        description="With one encode lane: when the indexer's decode workers run: 'always' (alongside the model), "
        "'between-batches' "
        "(only while the model is idle and the batch is not being committed: on a CPU the model's threads use "
        "every core, and a decode thread that takes one makes the others wait), 'auto': between batches when the "
        "model runs on the CPU.",
    )
    jpeg_decoder: Literal["auto", "pillow", "torchvision"] = Field(
        default="auto",
        description="How the indexer decodes JPEGs: 'pillow' (the decode workers, with JPEG draft mode), "
        "'torchvision' (also in batches on the model's device, nvjpeg on a GPU, while the decode workers take the "
        "rest: both feed the model), 'auto': torchvision when the model runs on a GPU, else pillow.",
    )
    text_prefix_cache_mb: int = Field(
        default=32,
        ge=0,
        le=65536,
        description="ONNX text tower: memory for the keys and values of recent queries' token prefixes, so that a "
        "query opening like an earlier one (typing it, or 'a photo of ...') computes only its new tokens (ViT-B-32: "
        "48 KB per token); 0 turns it off.",
    )
    query_spin: bool = Field(
        default=True,
        description="ONNX Runtime, the service's towers: during a query their threads spin-wait between operators "
        "instead of sleeping (a lone text query 1-2.5 ms faster on 2 cores, an uploaded image 6 ms; with many "
        "concurrent queries about 5 % fewer per second); false: they sleep. The indexer's never spin.",
    )
    warm_up: bool = Field(
        default=True,
        description="After the service starts, run one query's path in the background (the text tower's first run, "
        "which allocates its buffers; the index search; the automatic cut-off's catalog sample), so that the first "
        "real query does not pay for it.",
    )
    max_image_pixels: int = Field(
        default=100_000_000, ge=1, description="Images with more pixels are refused (decompression bombs)."
    )
    index_type: Literal["auto", "flat", "ivf-sq8", "ivf-ondisk"] = Field(
        default="auto",
        description="auto: exact 'flat' below ivf_min_vectors, 'ivf-sq8' (approximate, in memory) above, "
        "'ivf-ondisk' (IVF-SQ8 lists in memory-mapped shard files) from ondisk_min_vectors.",
    )
    ivf_min_vectors: int = Field(default=200_000, ge=1, description="Catalog size from which auto picks IVF.")
    # The in-memory IVF-SQ8 index took 675 B/vector of RSS at 512-d (codes, ids, the id hash table, list growth
    # slack; measured at 200k), so 10M vectors are ~6.8 GB held whole by every serving process and by the indexer
    # while it builds: a good share of a 16-32 GB server. Past that, the lists are mapped from disk instead.
    ondisk_min_vectors: int = Field(
        default=10_000_000, ge=1, description="Catalog size from which auto picks the on-disk index."
    )
    ondisk_part_vectors: int = Field(
        default=1_000_000,
        ge=1,
        description="On-disk builds fill parts of at most this many vectors (~0.5 GB each at 512-d) before merging.",
    )
    ondisk_max_small_shards: int = Field(
        default=4,
        ge=1,
        description="An index run merges the shards under ondisk_part_vectors (its delta shards) beyond this many.",
    )
    ondisk_max_deleted: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="An index run rewrites a shard whose deleted (tombstoned) share exceeds this.",
    )
    nprobe: int = Field(default=32, ge=1, le=65536, description="IVF lists scanned per query (recall vs speed).")

    # --- web API (clipsearch serve) ---
    api_key: SecretStr | None = Field(
        default=None,
        description="When set, admin routes require it (header 'X-API-Key: KEY' or 'Authorization: Bearer KEY').",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (comma-separated); empty: CORS closed.",
    )
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1, description="Largest query image accepted by POST /search/image."
    )
    max_upload_pixels: int = Field(
        default=40_000_000, ge=1, description="Uploaded query images with more pixels are refused (bombs)."
    )
    thumbnail_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [128, 256, 512],
        description="Thumbnail sizes (longest side, pixels) the API serves (comma-separated).",
    )
    thumbnail_format: Literal["jpeg", "webp"] = "jpeg"
    thumbnail_quality: int = Field(default=85, ge=1, le=100)
    search_max_candidates: int = Field(
        default=1000, ge=1, le=100_000, description="How deep a query looks: the bound of 'total' and offset."
    )
    text_cache_size: int = Field(default=1024, ge=0, description="Text embeddings kept in the LRU cache.")
    labels_in_memory: bool = Field(
        default=True,
        description="Keep every image's tags and flags in memory for facets and tag filters (about 40 bytes per "
        "image at 5 tags); false: read a page's candidates' labels from the database.",
    )
    index_check_seconds: float = Field(
        default=2.0, ge=0, description="How often a query checks the manifest for a newer index (0: always)."
    )
    frontend_dir: Path | None = Field(
        default=None, description="Static web UI served at /; default: the frontend/ folder beside app/."
    )

    # --- zero-shot tags and safe-search flags (computed at index time from the stored vectors) ---
    tag_vocabulary: str = Field(
        default="imagenet",
        description="Labels images are tagged with: 'imagenet' (built in), a YAML/JSON vocabulary file, or 'none'.",
    )
    tag_top_k: int = Field(default=5, ge=1, le=100, description="At most this many tags are stored per image.")
    tag_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Tags scoring below this (softmax probability, 0..1) are not stored; None: the vocabulary's.",
    )
    safe_search_vocabulary: str = Field(
        default="safe-search",
        description="Flags that safe=true hides: 'safe-search' (built in), a YAML/JSON vocabulary file, or 'none'.",
    )
    safe_search_thresholds: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description="Per-flag threshold overrides, 'flag=0.5,other=0.7' (0..1); others keep the vocabulary's.",
    )

    # --- near-duplicate look-up (POST /lookup, /images/{id}/duplicates, clipsearch dupes) ---
    # Candidates: how many images each stage proposes for verification.
    dupe_clip_candidates: int = Field(
        default=20, ge=0, le=1000, description="CLIP nearest neighbours of the query checked as candidates."
    )
    dupe_hash_radius: int = Field(
        default=10, ge=0, le=64, description="Catalog images within this many bits (pHash or dHash) are candidates."
    )
    dupe_hash_candidates: int = Field(
        default=20, ge=0, le=1000, description="At most this many hash neighbours (closest first) are checked."
    )
    dupe_feature_candidates: int = Field(
        default=10,
        ge=0,
        le=1000,
        description="Images shortlisted by ORB descriptor votes (0: none; the server then prepares no feature index).",
    )
    dupe_feature_cache: bool = Field(
        default=True,
        description="Store prepared local features under data_dir/dupes at index time; the server maps them.",
    )
    dupe_cache_size: int = Field(
        default=1024, ge=0, description="Catalog images whose prepared features the server keeps in memory."
    )
    # Verdict thresholds: app.dupes.DupeThresholds, with its calibrated defaults (benchmarks/dupes.py).
    dupe_ratio: float = Field(default=0.8, gt=0, le=1, description="Lowe's ratio test for ORB matches.")
    dupe_ransac_px: float = Field(default=4.0, gt=0, description="RANSAC tolerance in 512-px work-image pixels.")
    dupe_min_inliers: int = Field(default=15, ge=4, description="Geometric inliers needed to call a pair a copy.")
    dupe_min_inlier_ratio: float = Field(
        default=0.15, ge=0, le=1, description="Inliers as a share of the ratio-test matches (repetitive patterns fail)."
    )
    dupe_min_agreement: float = Field(
        default=0.85, ge=0, le=1, description="Share of the overlap whose aligned pixels must agree for a copy."
    )
    dupe_min_texture_agreement: float = Field(
        default=0.6, ge=0, le=1, description="The same agreement over the overlap's non-flat (textured) areas only."
    )
    dupe_min_containment: float = Field(
        default=0.6, ge=0, le=1, description="The overlap must cover this share of one image for a copy."
    )
    dupe_hash_near: int = Field(
        default=4, ge=0, le=64, description="pHash and dHash both within this many bits: near_duplicate."
    )
    dupe_similar_inliers: int = Field(default=12, ge=4, description="Inliers that make a pair 'similar'.")
    dupe_hash_similar: int = Field(default=10, ge=0, le=64, description="pHash within this many bits: 'similar'.")
    dupe_similar_cosine: float = Field(
        default=0.9, ge=-1, le=1, description="CLIP cosine from which a pair is 'similar' (model-dependent)."
    )

    @field_validator("safe_search_thresholds", mode="before")
    @classmethod
    def _parse_thresholds(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        out: dict[str, str] = {}
        for part in value.split(","):
            if not part.strip():
                continue
            label, sep, number = part.rpartition("=")
            if not sep or not label.strip():
                raise ValueError(f"'{part.strip()}' is not 'flag=threshold' (e.g. 'weapons=0.7')")
            out[" ".join(label.split())] = number.strip()
        return out

    @field_validator("safe_search_thresholds", mode="after")
    @classmethod
    def _check_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {label: t for label, t in value.items() if not 0.0 <= t <= 1.0}
        if bad:
            raise ValueError(f"flag thresholds must be between 0 and 1: {bad}")
        return value

    @field_validator("cors_origins", "thumbnail_sizes", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("thumbnail_sizes", mode="after")
    @classmethod
    def _check_thumbnail_sizes(cls, value: list[int]) -> list[int]:
        if not value or any(not 16 <= size <= 2048 for size in value):
            raise ValueError("thumbnail sizes must be between 16 and 2048 pixels")
        return sorted(set(value))

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

    @property
    def dupe_thresholds(self) -> DupeThresholds:
        """The near-duplicate verdict thresholds named by the dupe_* settings."""
        from app.dupes import DupeThresholds  # heavy (OpenCV, FAISS): only when asked for

        named = {name: getattr(self, f"dupe_{name}", None) for name in DupeThresholds.model_fields}
        return DupeThresholds(**{name: value for name, value in named.items() if value is not None})

    def with_overrides(self, **overrides: object) -> Settings:
        """A copy with the given fields replaced (None values are ignored), validated again."""
        values = self.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings.model_validate(values)
