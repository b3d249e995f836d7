"""CLIP encoder over open_clip: loading (name + tag | checkpoint | local-dir:) and batched encoding."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.errors import ModelLoadError
from app.model_spec import LOCAL_DIR_PREFIX, ModelSpec
from app.onnx_encoder import AUTO, default_threads, encode_in_batches, normalise, resolve_inference
from app.preprocess import fast_transform
from app.quantize import (
    BF16,
    FP32,
    ONNX_INT8,
    TORCH_MODES,
    bf16_pays,
    check_inference,
    quantize,
    set_cpu_threads,
)
from app.text_prefix import PrefixTower, project_text

log = logging.getLogger(__name__)


#: CPU inference modes as the indexer's summary names what ran the image tower
IMAGE_BACKENDS = {
    "fp32": "torch fp32",
    "int8": "torch int8",
    "bf16": "torch bf16 products",
    "onnx": "ONNX Runtime fp32",
    "onnx-int8": "ONNX Runtime int8",
}

#: CLIPSEARCH_ENCODE_LANES=0 gives one lane per core up to this many (each lane holds a batch's activations;
#: measured on 2 cores only)
MAX_AUTO_LANES = 4


def resolve_lanes(requested: int, device: torch.device, threads: int = 0) -> int:
    """The indexer's encode lanes: ``requested``, or one per core (at most MAX_AUTO_LANES) for 0; one on a GPU."""
    if device.type != "cpu":
        return 1
    return requested or min(threads or default_threads(), MAX_AUTO_LANES)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CLIPSEARCH_DEVICE=cuda but no CUDA device is available; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class Encoder:
    """Turns images and texts into float32, L2-normalised vectors in one shared space."""

    def __init__(
        self,
        spec: ModelSpec,
        device: torch.device,
        cache_dir: Path | None = None,
        *,
        inference: str = FP32,  # or 'auto' (app.onnx_encoder.resolve_inference)
        threads: int = 0,
        onnx_cache_dir: Path | None = None,
        export_in_background: bool = False,
        lanes: int = 1,
        indexing: bool = False,
    ) -> None:
        """``export_in_background`` (the service's start under 'auto'): when the ONNX export is not cached yet,
        start on torch fp32 at once and switch to ONNX Runtime once a thread has exported the towers
        (``onnx_ready`` is set then); otherwise the export, when needed, happens here, before the encoder is usable.
        ``lanes`` (CPU only): the indexer's lanes, threads that each encode their own batches at once
        (``encode_pixels_in_lane``); the image tower's threads are shared out between them.
        ``indexing``: the encoder of an indexing run. Under 'auto' on a CPU that multiplies bfloat16 natively and
        faster than fp32 (app.quantize.bf16_pays: AVX512_BF16 or AMX, and a product measured) its image tower runs
        its products in bf16 on torch, 1.7x ORT fp32's rate or more there and within the default path's bar (cosine
        >= 0.999, top-10 overlap >= 0.98); its text tower stays on ONNX Runtime."""
        import open_clip

        from app.model_build import create_model_and_transforms

        if threads:
            set_cpu_threads(threads)

        self.spec = spec
        self.device = device
        total_threads = threads or torch.get_num_threads()
        self.image_lanes = max(1, min(lanes, total_threads)) if device.type == "cpu" else 1
        #: torch's intra-op threads in each lane (encode_pixels_in_lane); ORT's lanes share one session instead,
        #: whose pool holds the cores the lanes' own threads leave (one: none, for one lane per core)
        self.lane_threads = max(1, total_threads // self.image_lanes)
        image_threads = total_threads - self.image_lanes + 1 if self.image_lanes > 1 else 0
        try:
            model, _, preprocess = create_model_and_transforms(
                spec, device=device, cache_dir=str(cache_dir) if cache_dir else None
            )
            # Multilingual models (xlm-roberta-*, nllb-clip-*) get open_clip's HFTokenizer here, and their
            # text tower is a Hugging Face model built from its config: both come through open_clip's own path.
            self.tokenizer = open_clip.get_tokenizer(spec.name, cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as exc:
            raise ModelLoadError(_explain_load_failure(spec, exc)) from exc
        model.eval()
        # int8 and bf16 keep the weights' embedding space (same model, same manifest), approximated (~1e-3, ~1e-5).
        self.inference = check_inference(resolve_inference(inference, spec, on_cpu=device.type == "cpu"), device)
        model = quantize(model, self.inference)
        # The ONNX modes run ONNX Runtime on an export of the fp32 model; a tower it cannot take stays on torch.
        self._onnx: Any | None = None
        self.onnx_ready = threading.Event()  # set once the ONNX towers are in use, or will not be
        background_mode = None
        if self.inference not in TORCH_MODES and export_in_background and inference == AUTO:
            background_mode, self.inference = self.inference, FP32  # torch until the export is done
        elif self.inference not in TORCH_MODES:
            # an indexing run under 'auto' on a CPU whose bf16 products pay runs the image tower on torch
            # (_images_on_bf16): its export is kept for the service's start, but no ORT session is opened for it
            images_bf16 = indexing and inference == AUTO and bf16_pays()
            self._onnx = _load_onnx(
                model,
                spec,
                self.inference,
                onnx_cache_dir,
                threads,
                chosen=inference != AUTO,
                image_threads=image_threads,
                open_image=not images_bf16,
                spin_image=not indexing,
            )
            if self._onnx is None:
                self.inference = FP32
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # open_clip's transform as it is (what fidelity checks compare with), and the single-pass equivalent used
        self.reference_preprocess: Callable[[Image.Image], torch.Tensor] = preprocess
        self.preprocess: Callable[[Image.Image], torch.Tensor] = fast_transform(preprocess)
        self.image_size = _image_size(model)
        self.dim = _embed_dim(model, self.tokenizer, device)
        # One model call at a time: torch already uses every core, and GPU memory is shared.
        self._lock = threading.Lock()
        if background_mode is not None:
            threading.Thread(
                target=self._export_then_switch,
                args=(background_mode, onnx_cache_dir, threads),
                name="onnx-export",
                daemon=True,
            ).start()
            return
        if self._onnx is not None:
            self._record_onnx_start(onnx_cache_dir)
            if self._onnx.image_unopened:
                self._images_on_bf16()
        self.onnx_ready.set()

    def _images_on_bf16(self) -> None:
        """Run the image tower's products in bf16 on torch where ORT fp32 could have run it (its export, which has no
        session here, is in the launch record written already, for the service's start)."""
        quantize(self.model, BF16)
        log.info("%s: the image tower's products run in bf16 (faster than fp32 on this CPU)", self.spec.label)

    def _export_then_switch(self, mode: str, cache_dir: Path | None, threads: int) -> None:
        """Export (or load the cached export of) the towers while the encoder serves on torch, then use them."""
        try:
            started = time.perf_counter()
            towers = _load_onnx(self.model, self.spec, mode, cache_dir, threads, chosen=False, spin_image=True)
            if towers is None:
                return
            with self._lock:  # between two model calls
                self._onnx, self.inference = towers, mode
            seconds = time.perf_counter() - started
            log.info("%s now runs on ONNX Runtime (%s), ready after %.1fs", self.spec.label, mode, seconds)
            self._record_onnx_start(cache_dir)
        except Exception:  # noqa: BLE001 - the encoder keeps working on torch
            log.exception("the background ONNX export of %s failed: it stays on torch", self.spec.label)
        finally:
            self.onnx_ready.set()

    def _record_onnx_start(self, cache_dir: Path | None) -> None:
        """Let the next service start skip torch (app.onnx_encoder); a failure here only costs that."""
        if cache_dir is None:
            return
        try:
            from open_clip.tokenizer import default_bpe

            from app.onnx_encoder import write_launch_record

            write_launch_record(self, cache_dir, self._onnx, self.tokenizer, Path(default_bpe()))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not write the ONNX launch record for %s: %s", self.spec.label, exc)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, export_in_background: bool = False, indexing: bool = False
    ) -> Encoder:
        """``indexing``: the encoder of an indexing run, with CLIPSEARCH_ENCODE_LANES lanes on a CPU."""
        device = resolve_device(settings.device)
        return cls(
            ModelSpec.from_settings(settings),
            device,
            settings.model_cache_dir,
            inference=settings.inference,
            threads=settings.torch_threads,
            onnx_cache_dir=settings.data_dir / "onnx",
            export_in_background=export_in_background,
            lanes=resolve_lanes(settings.encode_lanes, device, settings.torch_threads) if indexing else 1,
            indexing=indexing,
        )

    def _autocast_dtype(self) -> torch.dtype | None:
        """What the model computes in on a GPU (autocast: bf16 where the GPU has it, else fp16); None on a CPU."""
        if self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self._autocast_dtype()
        return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        tensor: torch.Tensor = self.preprocess(image)
        return tensor

    def encode_pixels(self, batch: torch.Tensor) -> np.ndarray:
        """Encode a batch of preprocessed images (N, 3, H, W) into (N, dim) unit vectors."""
        if self._onnx is not None and self._onnx.image is not None:
            with self._lock:
                return _normalise(self._onnx.encode_image(batch.cpu().numpy()))
        with self._lock, torch.inference_mode(), self._autocast():
            batch = batch.to(self.device, non_blocking=True)
            if self.device.type == "cpu":
                batch = batch.contiguous(memory_format=torch.channels_last)
            features = self.model.encode_image(batch)
        return _normalise(features)

    @property
    def image_inference(self) -> str:
        """The mode the image tower runs in: ``inference``'s, 'bf16' for an indexing encoder under 'auto' on a CPU
        with native bf16 (its image export has no session: _images_on_bf16), or 'fp32' for a tower ONNX Runtime
        could not take."""
        if self._onnx is not None and self._onnx.image_unopened:
            return BF16
        if self._onnx is not None and self._onnx.image is not None:
            return str(self._onnx.mode)
        return self.inference if self.inference in TORCH_MODES else FP32

    @property
    def image_backend(self) -> str:
        """What runs the image tower, in words (indexing summaries): 'ONNX Runtime fp32', 'torch bf16 products', ..."""
        dtype = self._autocast_dtype()
        if dtype is not None:
            return f"{self.device.type} ({'bf16' if dtype == torch.bfloat16 else 'fp16'} autocast)"
        return IMAGE_BACKENDS.get(self.image_inference, self.image_inference)

    def image_tower_file(self) -> tuple[Path, str] | None:
        """The ONNX file the image tower runs on and its mode (onnx | onnx-int8), or None when it runs on torch."""
        if self._onnx is None or self._onnx.image is None:
            return None
        from app.onnx_backend import tower_path

        return tower_path(self._onnx.folder, "image", self._onnx.mode), self._onnx.mode

    def enter_lane(self) -> None:
        """Called once by each of the indexer's lane threads: its share of torch's intra-op threads (torch counts
        them per thread; the caller restores the process-wide count when the lanes are done)."""
        torch.set_num_threads(self.lane_threads)

    def encode_pixels_in_lane(self, batch: torch.Tensor) -> np.ndarray:
        """``encode_pixels`` for one of ``image_lanes`` threads that encode at once (CPU only): without the lock,
        as ONNX Runtime sessions and an inference-mode torch forward can run from several threads."""
        if self._onnx is not None and self._onnx.image is not None:
            return _normalise(self._onnx.encode_image(batch.numpy()))
        with torch.inference_mode():
            return _normalise(self.model.encode_image(batch.contiguous(memory_format=torch.channels_last)))

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        return encode_in_batches(self, images, batch_size, torch.stack)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, *, truncate: bool = True) -> np.ndarray:
        """Encode texts. With ``truncate`` (default), causal towers run only up to the longest real
        token sequence of the batch, which gives the same vectors as the full 77-token pass much faster."""
        out = []
        for chunk in _chunks(list(texts), batch_size):
            tokens = self.tokenizer(chunk).to(self.device)
            with self._lock, torch.inference_mode(), self._autocast():
                if truncate and self.supports_truncated_text and self._onnx is not None and self._onnx.text is not None:
                    pooled_at = _pooled_positions(self.model, tokens)
                    length = int(pooled_at.max()) + 1
                    features = self._onnx.encode_text(tokens[:, :length].cpu().numpy(), pooled_at.cpu().numpy())
                elif truncate and self.supports_truncated_text:
                    features = _encode_text_truncated(self.model, tokens)
                else:
                    features = self.model.encode_text(tokens)
            out.append(_normalise(features))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    @property
    def text_prefix_rows(self) -> tuple[int, int]:
        """(computed, cached) token rows of the ONNX text tower (app.onnx_text), for /metrics; (0, 0) on torch."""
        towers = self._onnx
        return towers.prefix_rows() if towers is not None else (0, 0)

    @property
    def shares_prompt_prefixes(self) -> bool:
        """Whether ``encode_prompts`` runs shared prefixes once: open_clip's own causal text tower of plain blocks,
        on a CPU, its layers not quantised to int8 (an ``onnx-int8`` encoder's torch tower is fp32)."""
        return self.device.type == "cpu" and PrefixTower.of(self.model) is not None

    def encode_prompts(self, texts: Sequence[str], on_encoded: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit vectors of many prompts at once (a vocabulary: app.zeroshot.class_embeddings), each prefix they share
        computed once (app.text_prefix; ``shares_prompt_prefixes`` must hold). The products run in bf16 where the
        image tower's do (``CLIPSEARCH_INFERENCE=bf16``, or an indexing run under 'auto') and the CPU multiplies bf16
        faster than fp32 (app.quantize.bf16_pays: emulated, or on some CPUs even with the instructions, it is
        slower). ``on_encoded``: called with the number of prompts of each chunk done. Needs no lock: the tower
        only reads the model."""
        tower = PrefixTower.of(self.model, bf16=self.image_inference == BF16 and bf16_pays())
        if tower is None:
            raise ValueError(f"{self.spec.label}: its text tower cannot share prompt prefixes; use encode_texts")
        tokens = self.tokenizer(list(texts))
        with torch.inference_mode():
            features = tower.encode(tokens, _pooled_positions(self.model, tokens), on_encoded)
        return _normalise(features)

    @property
    def hf_text_model(self) -> str | None:
        """The Hugging Face model behind the text tower (multilingual models), or None for open_clip's own."""
        return _hf_text_model(self.model)

    @property
    def supports_truncated_text(self) -> bool:
        """True for open_clip's own causal text tower pooled at the EOT token. Hugging Face towers
        (CustomTextCLIP: bidirectional attention, mean/CLS pooling) always take the full encode."""
        import open_clip

        model = self.model
        return (
            type(model) is open_clip.model.CLIP
            and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        )


def _encode_text_truncated(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text on the first L positions only, L = the last pooled position + 1.

    Under the causal mask no position attends to a later one, so the states up to the EOT token (the
    only one pooled) do not depend on the padding after it: cutting it off changes nothing but the time.
    """
    pooled_at = _pooled_positions(model, tokens)
    length = int(pooled_at.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), pooled_at]
    return project_text(model.text_projection, x)


def _pooled_positions(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """The position each row of ``tokens`` is pooled at: its EOT token (the highest id, for 'argmax' pooling)."""
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == model.text_eos_id).int().argmax(dim=-1)


def _load_onnx(
    model: Any,
    spec: ModelSpec,
    mode: str,
    cache_dir: Path | None,
    threads: int,
    *,
    chosen: bool = True,
    image_threads: int = 0,
    open_image: bool = True,
    spin_image: bool = False,
) -> Any | None:
    """ONNX Runtime sessions for ``model``'s towers (see app.onnx_backend), or None (with a warning saying
    why) when neither tower can run there: the encoder then stays on torch fp32. ``spin_image``: the image tower's
    session spin-waits during a run like the text tower's (a service's; never the indexer's lanes)."""
    try:
        from app.onnx_backend import load_towers
    except ImportError as exc:
        log.warning("CLIPSEARCH_INFERENCE=%s needs onnxruntime and onnx (%s): using torch fp32 instead", mode, exc)
        return None
    folder = cache_dir or Path(tempfile.gettempdir()) / "clipsearch-onnx"
    towers = load_towers(
        model,
        spec.store_key,
        folder,
        mode,
        _image_size(model),
        threads,
        chosen=chosen,
        image_threads=image_threads,
        open_image=open_image,
        spin_image=spin_image,
    )
    if towers.text is None and not towers.image_exported:
        log.warning(
            "CLIPSEARCH_INFERENCE=%s: neither tower of %s runs on ONNX Runtime; using torch fp32", mode, spec.label
        )
        return None
    log.info(
        "ONNX Runtime (%s) for the %s of %s",
        "int8" if mode == ONNX_INT8 else "fp32",
        " and ".join(t for t, s in (("text tower", towers.text), ("image tower", towers.image)) if s is not None),
        spec.label,
    )
    return towers


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _normalise(features: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.float().cpu().numpy()
    return normalise(features)


def _image_size(model: torch.nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def _embed_dim(model: Any, tokenizer: Any, device: torch.device) -> int:
    with torch.inference_mode():
        return int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])


def _hf_text_model(model: Any) -> str | None:
    text = getattr(model, "text", None)
    config = getattr(text, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
    return str(name) if name and hasattr(text, "transformer") else None


def _hf_text_config(spec: ModelSpec) -> str | None:
    """The Hugging Face text model named by the spec's open_clip config (None: open_clip's own text tower)."""
    try:
        import open_clip

        if spec.name.startswith(LOCAL_DIR_PREFIX):
            folder = Path(spec.name[len(LOCAL_DIR_PREFIX) :])
            config = json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg", {})
        else:
            config = open_clip.get_model_config(spec.name) or {}
    except Exception:
        return None
    name = config.get("text_cfg", {}).get("hf_model_name")
    return str(name) if name else None


def _explain_load_failure(spec: ModelSpec, exc: Exception) -> str:
    reason = f"{exc.__class__.__name__}: {exc}"
    hf_model = _hf_text_config(spec)
    if hf_model and (isinstance(exc, OSError | ImportError) or "transformers" in reason):
        return (
            f"could not load the text tower of {spec.label}, the Hugging Face model '{hf_model}': "
            f"{reason.rstrip('. ')}. "
            "Multilingual models need the 'transformers' package, and fetch that model's config and tokenizer "
            "from the Hugging Face hub on first use: run once with network access (they are cached under "
            "HF_HOME), or point the open_clip config at a local copy."
        )
    if spec.name.startswith(LOCAL_DIR_PREFIX):
        return (
            f"could not load model from {spec.name}: {reason}. The folder must hold open_clip_config.json "
            "and open_clip_model.safetensors (or open_clip_pytorch_model.bin)."
        )
    if "not found in built-ins" in reason:
        return f"unknown model '{spec.name}': use an open_clip model name (e.g. ViT-B-32) or local-dir:/path"
    if "not a known tag or valid file path" in reason:
        return (
            f"pretrained '{spec.pretrained}' is neither a known tag for {spec.name} nor an existing checkpoint "
            "file: fix CLIPSEARCH_PRETRAINED (or leave it empty for random weights)"
        )
    return (
        f"could not load model {spec.label}: {reason}. If the weights must be downloaded, check network "
        "access or point CLIPSEARCH_PRETRAINED at a local checkpoint file."
    )
