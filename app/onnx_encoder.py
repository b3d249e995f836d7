"""The service's ONNX start: answer queries from cached ONNX exports without importing torch.

With ``CLIPSEARCH_INFERENCE=onnx|onnx-int8`` the first start loads the model through torch and exports its towers
(``app.onnx_backend``). When the model allows it, that start also writes a *launch record* beside the exports:
which weights they came from, the two ONNX files, the tokenizer and the image preprocessing, as plain values.
Later starts of the service read the record, check that it still describes the configured model and the files
on disk, and build an :class:`OnnxEncoder` from it: two ONNX Runtime sessions, open_clip's tokenizer re-created
without torch (``app.clip_tokenizer``) and the numpy preprocessing (``app.pixels``). Importing torch,
torchvision and open_clip and creating the model, most of a start, are skipped; the vectors are the same
(the same ONNX files, the same token ids, the same pixels).

A model qualifies when its weights are a file, a ``local-dir:`` folder or an open_clip pretrained tag (random
weights change at every start), both towers were exported, it uses open_clip's own CLIP tokenizer and EOT pooling,
and its preprocessing is the standard resize + centre crop. Anything else, or a record that no longer matches
(weights or ONNX files changed, other library versions), starts through torch as before, which writes a fresh
record. The indexer and the other commands always use torch (``app.encoder``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from app.config import Settings
from app.errors import ModelLoadError
from app.model_spec import LOCAL_DIR_PREFIX, ModelSpec
from app.onnx_text import PastTextRunner, is_past_tower, set_prefix_cache_bytes
from app.pixels import CropResize

if TYPE_CHECKING:
    from app.encoder import Encoder

log = logging.getLogger(__name__)

ONNX_MODES = ("onnx", "onnx-int8")
#: CLIPSEARCH_INFERENCE's default: see resolve_inference.
AUTO = "auto"
#: Bump when the record's fields or what they mean change: older records are then ignored. 2: the text tower is
#: exported with its past (app.onnx_text), so a start through torch exports it anew. 3: its graph has fewer nodes
#: (app.onnx_backend.EXPORT_FORMAT 5), exported anew once by the next start.
LAUNCH_FORMAT = 3
#: Packages whose versions must match the ones the record was written with.
PINNED_PACKAGES = ("open_clip_torch", "onnxruntime")


@dataclass(frozen=True)
class LaunchRecord:
    """What an ONNX start needs, written by a torch start that exported the towers."""

    store_key: str
    mode: str
    weights: dict[str, Any]  # {"tag": ...} or {"files": [[path, size, mtime_ns], ...]}
    versions: dict[str, str]
    text_file: list[Any]  # [path, size, mtime_ns]
    image_file: list[Any]
    dim: int
    image_size: int
    vocab_file: str
    context_length: int
    pool: str  # "argmax" (the highest id, open_clip's EOT) or "eos" (the first eos_id)
    eos_id: int
    crop_size: int
    resample: int
    mean: list[float]
    std: list[float]
    format: int = LAUNCH_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LaunchRecord:
        return cls(**json.loads(text))

    @property
    def crop(self) -> CropResize:
        return CropResize.of(self.crop_size, Image.Resampling(self.resample), self.mean, self.std)

    def stale_because(self, spec: ModelSpec, mode: str) -> str | None:
        """None when the record still describes ``spec`` in ``mode`` and the files on disk; else why not."""
        if self.format != LAUNCH_FORMAT:
            return f"record format {self.format}, expected {LAUNCH_FORMAT}"
        if (self.store_key, self.mode) != (spec.store_key, mode):
            return "it was written for another model or mode"
        if self.weights != weights_identity(spec):
            return "the weights changed since the export"
        if self.versions != package_versions():
            return f"library versions changed ({self.versions} -> {package_versions()})"
        for entry in (self.text_file, self.image_file):
            if file_identity(Path(entry[0])) != entry:
                return f"{entry[0]} changed or is missing"
        if not Path(self.vocab_file).is_file():
            return f"the tokenizer vocabulary {self.vocab_file} is missing"
        return None


def record_path(cache_root: Path, store_key: str, mode: str) -> Path:
    """Where the launch record of ``store_key`` in ``mode`` lives (found without loading the weights)."""
    digest = hashlib.sha256(f"{store_key}\n{mode}".encode()).hexdigest()[:20]
    return cache_root / "launch" / f"{digest}.json"


def file_identity(path: Path) -> list[Any] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [str(path), st.st_size, st.st_mtime_ns]


def weights_identity(spec: ModelSpec) -> dict[str, Any] | None:
    """What the weights of ``spec`` are on disk, to tell whether they changed; None for random weights."""
    if spec.name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(spec.name[len(LOCAL_DIR_PREFIX) :])
        try:
            files = sorted(p for p in folder.iterdir() if p.is_file())
        except OSError:
            return None
        return {"files": [file_identity(p) for p in files]}
    if not spec.pretrained:
        return None
    path = Path(spec.pretrained)
    if path.is_file():
        return {"files": [file_identity(path)]}
    # An open_clip pretrained tag names one published set of weights.
    return {"tag": spec.pretrained}


def resolve_inference(mode: str, spec: ModelSpec, *, on_cpu: bool) -> str:
    """The mode ``auto`` stands for; other modes as they are. ``auto`` is ``onnx`` (exact, a faster text tower,
    a torch-free service start) only where it pays and is cached: on a CPU (a GPU keeps torch with autocast) and
    for weights that stay the same between starts (random weights would export again at every start); else
    ``fp32``. Both starts decide with it: the torch one (app.encoder) and the ONNX one (OnnxEncoder.open)."""
    if mode != AUTO:
        return mode
    return "onnx" if on_cpu and weights_identity(spec) is not None else "fp32"


def package_versions() -> dict[str, str]:
    out = {}
    for package in PINNED_PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "?"
    return out


#: whether the query sessions made from now on (text towers; image towers outside the indexer's lanes) spin-wait
#: between operators during a run (see new_session; CLIPSEARCH_QUERY_SPIN, set by the service's ``load_encoder``)
_query_spin = True


def set_query_spin(on: bool) -> None:
    """Whether the query sessions made from now on spin-wait between operators during a run (see new_session)."""
    global _query_spin
    _query_spin = bool(on)


#: ORT's session.dynamic_block_base (see new_session); 0 turns it off
DYNAMIC_BLOCK_BASE = 4


def default_threads() -> int:
    """torch's default intra-op thread count: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def new_session(path: Path | bytes, threads: int = 0, *, query: bool = False) -> Any:
    """An ORT CPU session on ``path`` (or a model's bytes): graph optimisation level ALL, ``threads`` intra-op
    threads (0: the default), and ORT's dynamic block sizing of parallel loops: without spinning, the second
    thread wakes late into each operator, and fixed halves leave the first one waiting for it at the end; with
    blocks claimed as the threads come (base 4), a one-query ViT-B-32 text encode ran 0.7 ms faster (11.55 ->
    10.75-10.89 ms p50 in process, bases 1, 2 and 4 alike) and image batches at the same rate (docs/PERFORMANCE.md,
    session 18). ``query``: a session that answers queries, whose intra-op threads spin-wait for the next operator
    during a run instead of sleeping, and stop when the run ends, unless set_query_spin turned that off
    (CLIPSEARCH_QUERY_SPIN): a one-query text encode is a few hundred operators of tens of microseconds, and waking
    the second thread for each cost 1.6-2.4 ms of 9.5 in process, an uploaded image's encode 5.8 ms of 54 (session
    19); under concurrent queries the spinning thread holds a core that FAISS and the other requests could use
    (about 5 % fewer queries per second at 8 clients). The indexer's image sessions, whose lanes share the cores
    with photo preparation, never spin."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    spin = query and _query_spin
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:  # but not after a run: left spinning, a thread burnt 35 ms of CPU in the 50 ms after each query
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.add_session_config_entry("session.dynamic_block_base", str(DYNAMIC_BLOCK_BASE))
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxTowers:
    """ORT sessions for a model's exported towers (None: that tower was not exported and stays on torch).

    Built by ``app.onnx_backend.load_towers`` in a torch process and by :class:`OnnxEncoder` without torch; both
    feed the sessions through these two methods."""

    mode: str
    folder: Path
    text: Any | None
    image: Any | None
    #: the image tower is exported in ``folder`` but was given no session (an indexing run whose image tower runs on
    #: torch bf16 keeps the export for the service's start without paying for a session it would not use)
    image_unopened: bool = False
    _runner: PastTextRunner | None = field(default=None, repr=False, compare=False)

    @property
    def image_exported(self) -> bool:
        """Whether the image tower is on disk in this mode (with a session or not)."""
        return self.image is not None or self.image_unopened

    def encode_text(self, tokens: np.ndarray, pooled_at: np.ndarray) -> np.ndarray:
        """Text features (not normalised) of ``tokens`` (batch, length) pooled at ``pooled_at`` (batch,): through
        the prefix cache of ``text_runner`` for a past-aware export, else the graph on all the tokens."""
        assert self.text is not None
        runner = self.text_runner
        if runner is not None:
            return runner.encode(tokens, pooled_at)
        feeds = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64), "pooled_at": pooled_at.astype(np.int64)}
        features: np.ndarray = self.text.run(None, feeds)[0]
        return features

    def prefix_rows(self) -> tuple[int, int]:
        """Token rows the text tower computed and took from the prefix cache since its runner was made."""
        runner = self._runner
        return (runner.rows_run, runner.rows_cached) if runner is not None else (0, 0)

    @property
    def text_runner(self) -> PastTextRunner | None:
        """The runner of the text session when it is a past-aware export (app.onnx_text), made at first use (the
        session can be set after the towers are); no prefix cache in the int8 mode."""
        runner = self._runner
        if runner is not None and runner.session is self.text:
            return runner
        if self.text is None or not is_past_tower(self.text):
            return None
        self._runner = PastTextRunner(self.text, None if self.mode == ONNX_MODES[0] else 0)
        return self._runner

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """Image features (not normalised) of preprocessed ``pixels`` (batch, 3, H, W)."""
        assert self.image is not None
        features: np.ndarray = self.image.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0]
        return features


class OnnxEncoder:
    """The part of :class:`app.encoder.Encoder` the service uses, on ONNX Runtime, numpy and Pillow only."""

    hf_text_model: str | None = None
    supports_truncated_text = True

    def __init__(self, spec: ModelSpec, record: LaunchRecord, threads: int = 0, *, lazy: bool = False) -> None:
        """``lazy``: open each tower's session when it is first used (a one-off command: ``clipsearch similar``
        uses neither, ``search "text"`` only the text tower), not both now (a server, ready for any query)."""
        from app.clip_tokenizer import ClipTokenizer

        self.spec = spec
        self.inference = record.mode
        self.record = record
        self.dim = record.dim
        self.image_size = record.image_size
        self.crop = record.crop
        self._threads = threads
        self._lock = threading.Lock()  # one model call at a time, as the torch encoder does
        self.towers = OnnxTowers(mode=record.mode, folder=Path(record.text_file[0]).parent, text=None, image=None)
        if lazy:
            self.tokenizer = ClipTokenizer(Path(record.vocab_file), record.context_length)
            return
        # The two sessions are built on two threads: ORT's graph optimisation releases the GIL.
        sessions: dict[str, Any] = {}
        errors: list[BaseException] = []

        def build(name: str, path: str) -> None:
            try:
                sessions[name] = new_session(Path(path), threads, query=True)
            except BaseException as exc:  # noqa: BLE001 - raised below, on the caller's thread
                errors.append(exc)

        image_thread = threading.Thread(target=build, args=("image", record.image_file[0]), name="onnx-image")
        image_thread.start()
        build("text", record.text_file[0])
        self.tokenizer = ClipTokenizer(Path(record.vocab_file), record.context_length)
        image_thread.join()
        if errors:
            raise errors[0]
        self.towers.text, self.towers.image = sessions["text"], sessions["image"]

    def _opened(self, tower: str) -> OnnxTowers:
        """The towers with ``tower``'s session open: a lazy encoder opens it here, at its first use (hold _lock)."""
        if getattr(self.towers, tower) is None:
            path = Path((self.record.text_file if tower == "text" else self.record.image_file)[0])
            started = time.perf_counter()
            try:
                setattr(self.towers, tower, new_session(path, self._threads, query=True))
            except Exception as exc:
                raise ModelLoadError(
                    f"the exported {tower} tower {path} cannot be loaded ({exc}): delete that file and run the "
                    "command again (the tower is then exported anew)"
                ) from exc
            log.info("ONNX %s tower opened in %.2fs", tower, time.perf_counter() - started)
        return self.towers

    @classmethod
    def open(cls, settings: Settings, *, lazy: bool = False) -> OnnxEncoder | None:
        """The encoder from a valid launch record for ``settings``, or None (with the reason logged) when the
        service must start through torch. ``lazy``: its sessions open at first use (see __init__)."""
        if settings.inference not in (*ONNX_MODES, AUTO):
            return None
        if settings.device == "cuda" or (settings.device == "auto" and Path("/proc/driver/nvidia/version").exists()):
            return None  # the torch start decides (and says) what these modes do with a GPU
        try:
            spec = ModelSpec.from_settings(settings)
        except Exception:  # noqa: BLE001 - the torch start reports bad settings
            return None
        mode = resolve_inference(settings.inference, spec, on_cpu=True)  # a GPU returned above
        if mode not in ONNX_MODES:
            return None
        path = record_path(settings.data_dir / "onnx", spec.store_key, mode)
        try:
            record = LaunchRecord.from_json(path.read_text())
        except FileNotFoundError:
            log.info("no ONNX launch record for %s yet: starting through torch (which writes one)", spec.label)
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring the unreadable ONNX launch record %s (%s): starting through torch", path, exc)
            return None
        reason = record.stale_because(spec, mode)
        if reason:
            log.info("the ONNX launch record of %s is out of date (%s): starting through torch", spec.label, reason)
            return None
        started = time.perf_counter()
        try:
            encoder = cls(spec, record, settings.torch_threads, lazy=lazy)
        except Exception as exc:  # noqa: BLE001 - a file that no longer loads: torch re-exports it
            log.warning("the ONNX start of %s failed (%s): starting through torch", spec.label, exc)
            return None
        if settings.torch_threads > 0:
            import faiss

            faiss.omp_set_num_threads(settings.torch_threads)
        log.info(
            "ONNX start: %s (%s) from %s without torch, in %.2fs",
            spec.label,
            mode,
            Path(record.text_file[0]).parent,
            time.perf_counter() - started,
        )
        return encoder

    @property
    def text_prefix_rows(self) -> tuple[int, int]:
        """(computed, cached) token rows of the text tower (app.onnx_text), for /metrics."""
        return self.towers.prefix_rows()

    def pooled_positions(self, tokens: np.ndarray) -> np.ndarray:
        if self.record.pool == "argmax":
            return tokens.argmax(axis=-1)
        return (tokens == self.record.eos_id).argmax(axis=-1)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, *, truncate: bool = True) -> np.ndarray:
        """Texts as unit vectors. ``truncate`` runs only up to the batch's last EOT token: in fp32 the same
        vectors as all 77 positions; int8 quantises activations over the positions it is given, so the two differ
        by about 5e-4 there (the truncated pass is the one the int8 mode's fidelity is measured on)."""
        out = []
        items = list(texts)
        for start in range(0, len(items), batch_size):
            tokens = self.tokenizer(items[start : start + batch_size])
            pooled_at = self.pooled_positions(tokens)
            length = int(pooled_at.max()) + 1 if truncate else tokens.shape[1]
            with self._lock:
                out.append(normalise(self._opened("text").encode_text(tokens[:, :length], pooled_at)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        return self.crop.array(image)

    def encode_pixels(self, batch: np.ndarray) -> np.ndarray:
        """A batch of preprocessed images (N, 3, H, W) as (N, dim) unit vectors."""
        with self._lock:
            features = self._opened("image").encode_image(batch)
        return normalise(features)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        return encode_in_batches(self, images, batch_size, np.stack)


def encode_in_batches(encoder: Any, images: Sequence[Image.Image], batch_size: int, stack: Callable) -> np.ndarray:
    """``images`` as (N, dim) unit vectors through ``encoder.preprocess_image`` and ``encoder.encode_pixels``,
    ``batch_size`` at a time; ``stack`` joins one batch's preprocessed images (np.stack or torch.stack)."""
    chunks = [
        encoder.encode_pixels(stack([encoder.preprocess_image(im) for im in images[i : i + batch_size]]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), dtype=np.float32)


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows of ``features`` scaled to unit length, as contiguous float32 (a zero row stays zero)."""
    vectors = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def load_encoder(
    settings: Settings, *, export_in_background: bool = False, lazy_towers: bool = False
) -> Encoder | OnnxEncoder:
    """The service's encoder: the ONNX start when a valid launch record allows it, else torch's. With
    ``export_in_background`` (a server), a first start under 'auto' does not wait for the export: it serves on
    torch meanwhile (Encoder.onnx_ready); one-off commands export first, so that the export is kept.
    ``lazy_towers`` (one-off commands): the ONNX start opens each tower's session at its first use."""
    set_prefix_cache_bytes(settings.text_prefix_cache_mb << 20)
    set_query_spin(settings.query_spin)
    light = OnnxEncoder.open(settings, lazy=lazy_towers)
    if light is not None:
        return light
    from app.encoder import Encoder

    return Encoder.from_settings(settings, export_in_background=export_in_background)


# Strings whose tokens a record's writer compares between open_clip and app.clip_tokenizer before it trusts
# the latter for this model: cleaning, case, HTML entities, digits, punctuation runs, contractions, non-Latin
# scripts, emoji, the special tokens typed as text, and a text longer than the context.
TOKENIZER_PROBES = (
    "a photo of a dog.",
    "  A Red   BICYCLE leaning on a wall  ",
    "it's 2024 &amp; we'll see 3.14159 cats!!",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m stra\u00dfe \u0130stanbul",
    "\u72ac\u306e\u5199\u771f \u0444\u043e\u0442\u043e \u0441\u043e\u0431\u0430\u043a\u0438",
    "\u0635\u0648\u0631\u0629 \U0001f415\U0001f6b2 x\u0301 \ufb01",
    "<start_of_text> <end_of_text>x !!<end_of_text>",
    "tab\tnew\nline\u00a0nbsp \u2014 dashes -- and ... dots",
    " ".join(["long"] * 100),
)


def write_launch_record(
    encoder: Encoder, cache_root: Path, towers: Any, reference_tokenizer: Any, vocab_file: Path
) -> Path | None:
    """Write (or keep) the launch record for ``encoder``'s ONNX towers; None, logged, when the model does not
    qualify. Called by the torch encoder after it loaded both towers."""
    from app.clip_tokenizer import ClipTokenizer
    from app.preprocess import CenterCropResize

    spec = encoder.spec
    reasons = []
    weights = weights_identity(spec)
    if weights is None:
        reasons.append("random weights change at every start")
    if towers.text is None or not towers.image_exported:
        reasons.append("a tower stays on torch")
    if not encoder.supports_truncated_text:
        reasons.append("its text tower is not open_clip's causal one")
    if not isinstance(encoder.preprocess, CenterCropResize):
        reasons.append("its image preprocessing is not the standard resize + centre crop")
    plain_clip_tokenizer = getattr(reference_tokenizer, "reduction_fn", "missing") is None
    if type(reference_tokenizer).__name__ != "SimpleTokenizer" or not plain_clip_tokenizer:
        reasons.append("its tokenizer is not open_clip's CLIP tokenizer")
    if reasons:
        log.info("no ONNX start for %s: %s", spec.label, "; ".join(reasons))
        return None
    assert weights is not None and isinstance(encoder.preprocess, CenterCropResize)
    model = encoder.model
    from app.onnx_backend import tower_path

    crop = encoder.preprocess.core
    record = LaunchRecord(
        store_key=spec.store_key,
        mode=towers.mode,
        weights=weights,
        versions=package_versions(),
        text_file=file_identity(tower_path(towers.folder, "text", towers.mode)) or [],
        image_file=file_identity(tower_path(towers.folder, "image", towers.mode)) or [],
        dim=encoder.dim,
        image_size=encoder.image_size,
        vocab_file=str(Path(vocab_file).resolve()),
        context_length=int(reference_tokenizer.context_length),
        pool=str(model.text_pool_type),
        eos_id=int(getattr(model, "text_eos_id", reference_tokenizer.eot_token_id) or 0),
        crop_size=crop.size,
        resample=int(crop.resample),
        mean=list(crop.mean),
        std=list(crop.std),
    )
    path = record_path(cache_root, spec.store_key, towers.mode)
    try:
        if LaunchRecord.from_json(path.read_text()) == record:
            return path
    except (OSError, ValueError, TypeError):
        pass
    light = ClipTokenizer(Path(vocab_file), record.context_length)
    for probe in TOKENIZER_PROBES:
        if not np.array_equal(light([probe]), reference_tokenizer([probe]).numpy()):
            log.warning("no ONNX start for %s: the torch-free tokenizer differs on %r", spec.label, probe)
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.to_json())
    os.replace(tmp, path)
    log.info("ONNX launch record written for %s: the next service start skips torch", spec.label)
    return path
