"""CPU inference through ONNX Runtime: the open_clip towers exported once per model and weights, then cached.

``CLIPSEARCH_INFERENCE=onnx`` runs both towers in ONNX Runtime in fp32 (the same vectors as torch to ~1e-6);
``onnx-int8`` runs ORT's dynamic int8 quantisation of their matrix multiplications (weights int8 per output
channel, activations quantised to 8 bits on the fly). The text tower is exported in its truncated form (see
``app.encoder._encode_text_truncated``): a dynamic sequence length, the positional embedding and causal mask
sliced to it, pooled at the EOT position given as an input, projected, not normalised (the encoder normalises
every backend's output the same way); open_clip's own tower also takes the keys and values of a prefix computed
before (``PastTextTower``, run by ``app.onnx_text`` with a cache of recent prefixes). The image tower takes a
dynamic batch.

Exports live under ``<data dir>/onnx/<key>/`` where the key hashes the model's store key, a fingerprint of its
weights (random-weight and re-saved local-dir models change weights under one name) and the torch, onnx and
ONNX Runtime versions. Files are written to a temp name and renamed; a file that does not load is rebuilt.
Towers that cannot be exported (Hugging Face text towers, which pool differently) stay on torch: the encoder
logs a warning and uses its torch path for them. Nothing is downloaded here: the export starts from the model
already loaded.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.onnx_encoder import OnnxTowers
from app.onnx_encoder import new_session as onnx_session
from app.quantize import ONNX, ONNX_INT8
from app.text_prefix import PrefixTower, project_text

log = logging.getLogger(__name__)

ONNX_MODES = (ONNX, ONNX_INT8)
#: Bump when the exported graphs change (their inputs, what they compute, how): old caches are then ignored.
#: 5: the past-aware text tower's shapes are built from its inputs' sizes (fewer nodes, the same vectors).
EXPORT_FORMAT = 5
OPSET = 18


class OnnxExportError(RuntimeError):
    """A tower could not be exported or loaded: the encoder keeps torch for it."""


class TextTower(nn.Module):
    """open_clip's causal text tower on the first L positions, pooled at the given positions (< L), projected."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.attn_mask: torch.Tensor
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)

    def forward(self, tokens: torch.Tensor, pooled_at: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pooled_at]
        return project_text(self.text_projection, x)


class PastTextTower(nn.Module):
    """open_clip's causal text tower on the tokens after a cached prefix (app.onnx_text): ``past_keys`` and
    ``past_values`` (layers, heads, P, head width) are the keys and values of the prefix's P positions, the same for
    every row; ``tokens`` (batch, n) fill positions P .. P + n - 1 and ``pooled_at`` (batch,) indexes them. Returns
    the projected features at the pooled positions and the n new positions' keys and values (layers, batch, heads, n,
    head width). The last layer runs only the pooled rows (its other rows feed nothing). Built on the blocks as
    ``app.text_prefix`` takes them apart, so only for open_clip's own tower of plain residual attention blocks."""

    def __init__(self, model: Any, blocks: tuple[Any, ...]) -> None:
        super().__init__()
        self.token_embedding = model.token_embedding
        self.transformer = model.transformer  # registered: the blocks' weights are this module's
        self.blocks = blocks
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.positions: torch.Tensor
        self.attn_mask: torch.Tensor
        self.register_buffer("positions", model.positional_embedding.detach().float().clone(), persistent=False)
        self.register_buffer("attn_mask", model.attn_mask.detach().clone(), persistent=False)
        self.scale = float((model.transformer.width // blocks[0].heads) ** -0.5)  # a constant, as LinearSelfAttention

    @property
    def past_shape(self) -> tuple[int, int, int]:
        """(layers, heads, head width) of ``past_keys``."""
        return len(self.blocks), self.blocks[0].heads, self.transformer.width // self.blocks[0].heads

    def forward(
        self, tokens: torch.Tensor, pooled_at: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Every shape below is built from the inputs' sizes, read once here: traced, a size read off a layer's own
        # tensor becomes that layer's chain of Shape, Gather, Unsqueeze and Concat nodes, which ORT cannot merge
        # across layers, while sizes of the inputs give every layer the same chains, merged into one. ViT-B-32's
        # graph after ORT's optimisation: 368 nodes instead of 609, the same vectors bit for bit, a one-query
        # encode 0.4-1.5 ms faster (docs/PERFORMANCE.md, session 22).
        batch, count = tokens.shape
        start = past_keys.shape[2]
        end = start + count
        layers, heads, head_width = self.past_shape
        x = self.token_embedding(tokens) + self.positions[start:end]
        mask = self.attn_mask[start:end, :end]  # the prefix, then causal among the new positions
        rows = torch.arange(batch)
        past_k, past_v = (
            p.unsqueeze(1).expand(layers, batch, heads, start, head_width) for p in (past_keys, past_values)
        )
        last = len(self.blocks) - 1
        new_keys, new_values = [], []
        for depth, block in enumerate(self.blocks):
            # (batch, count, 3 x width) -> q, k, v (batch, heads, count, head width), as attention_heads splits it
            qkv = block.in_proj(block.ln_1(x)).reshape(batch, count, 3 * heads, head_width).transpose(1, 2)
            q, k, v = qkv.split(heads, dim=1)
            new_keys.append(k)
            new_values.append(v)
            keys = torch.cat([past_k[depth], k], dim=2)
            values = torch.cat([past_v[depth], v], dim=2)
            if depth < last:
                attended = F.scaled_dot_product_attention(q, keys, values, mask, scale=self.scale)
                x = block.after_attention(x, attended.transpose(1, 2).reshape(batch, count, heads * head_width))
            else:  # the pooled rows only
                pooled_q = q[rows, :, pooled_at].unsqueeze(2)
                pooled_mask = self.attn_mask[start + pooled_at, :end][:, None, None, :]
                attended = F.scaled_dot_product_attention(pooled_q, keys, values, pooled_mask, scale=self.scale)
                merged = attended.transpose(1, 2).reshape(batch, 1, heads * head_width)
                x = block.after_attention(x[rows, pooled_at].unsqueeze(1), merged)
        features = project_text(self.text_projection, self.ln_final(x[:, 0]))
        shape = (layers, batch, heads, count, head_width)
        return features, torch.cat(new_keys).reshape(shape), torch.cat(new_values).reshape(shape)


class ImageTower(nn.Module):
    """open_clip's ``encode_image`` without normalisation."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.visual(pixels)
        return features


def text_tower_exportable(model: Any) -> str | None:
    """None when the text tower can be exported; otherwise why not (the encoder logs it)."""
    import open_clip

    if type(model) is not open_clip.model.CLIP:
        return f"its text tower is not open_clip's own causal transformer ({type(model).__name__})"
    if getattr(model, "attn_mask", None) is None or getattr(model, "text_pool_type", None) not in ("argmax", "eos"):
        return "its text tower is not causal and pooled at the EOT token"
    return None


def export_text_tower(model: Any, path: Path) -> None:
    """Write the text tower of ``model`` (fp32, CPU) to ``path``, output ``features`` (batch, dim), not normalised.

    open_clip's tower of plain blocks is written as :class:`PastTextTower` (app.onnx_text runs it): inputs ``tokens``
    (batch, n) and ``pooled_at`` (batch,) int64 after a prefix's ``past_keys`` and ``past_values``, outputs the
    features, ``keys`` and ``values``. Other causal towers as :class:`TextTower`: ``tokens`` (batch, length) and
    ``pooled_at``, the features only."""
    reason = text_tower_exportable(model)
    if reason:
        raise OnnxExportError(reason)
    copy = _export_copy(model)
    prefix_tower = PrefixTower.of(copy)
    tokens = torch.ones((2, 3), dtype=torch.int64)
    pooled_at = torch.tensor([2, 1], dtype=torch.int64)
    batch_dims = {"tokens": {0: "batch", 1: "length"}, "pooled_at": {0: "batch"}}
    if prefix_tower is None:
        _export(TextTower(copy).eval(), (tokens, pooled_at), path, input_names=["tokens", "pooled_at"],
                dynamic_axes=batch_dims)  # fmt: skip
        return
    tower = PastTextTower(copy, prefix_tower.blocks).eval()
    past = torch.zeros((*tower.past_shape[:2], 2, tower.past_shape[2]))
    new_dims = {1: "batch", 3: "length"}
    _export(
        tower,
        (tokens, pooled_at, past, past.clone()),
        path,
        input_names=["tokens", "pooled_at", "past_keys", "past_values"],
        dynamic_axes={**batch_dims, "past_keys": {2: "past"}, "past_values": {2: "past"}},
        outputs={"features": {0: "batch"}, "keys": new_dims, "values": new_dims},
    )


def export_image_tower(model: Any, path: Path, image_size: int) -> None:
    """Write ``model``'s image tower (fp32, CPU) to ``path``: input ``pixels`` (batch, 3, H, W) float32,
    output ``features`` (batch, dim), not normalised."""
    tower = ImageTower(_export_copy(model)).eval()
    pixels = torch.zeros((2, 3, image_size, image_size), dtype=torch.float32)
    _export(tower, (pixels,), path, input_names=["pixels"], dynamic_axes={"pixels": {0: "batch"}})


def _export_copy(model: Any) -> Any:
    """An fp32 CPU copy of ``model`` whose self-attention is written as plain linear layers.

    torch's TorchScript exporter bakes ``nn.MultiheadAttention``'s shapes into reshapes (the sequence length
    of the example would be fixed); :class:`app.quantize.LinearSelfAttention` computes the same thing with
    shapes read at run time, and gives ORT's quantiser plain MatMuls to quantise.
    """
    from app.quantize import swap_self_attention

    clone = copy.deepcopy(model).float().cpu().eval()
    swap_self_attention(clone)
    return clone


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    outputs: dict[str, dict[int, str]] | None = None,
) -> None:
    outputs = outputs or {"features": {0: "batch"}}

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript exporter (deprecated in favour of the dynamo one, kept in torch 2.14): measured on
            # ViT-B-32, the dynamo export gives the same vectors (3e-6) at the same ORT speed, but takes 4x as
            # long (17 s vs 4 s per tower) and needs onnxscript. Revisit when the pinned torch drops it.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=input_names,
                output_names=list(outputs),
                dynamic_axes={**dynamic_axes, **outputs},
                opset_version=OPSET,
                dynamo=False,
            )

    _atomic_file(path, write)


def quantize_file(source: Path, target: Path) -> None:
    """ORT's dynamic int8 quantisation of ``source``'s MatMuls (weights per output channel), written to
    ``target``. Embedding look-ups and the patch convolution stay fp32: little time, most of the error."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(tmp: Path) -> None:
        hint = _DropMessage("pre-processing before quantization")  # ORT's advice for static quantisation
        logging.getLogger().addFilter(hint)
        try:
            quantize_dynamic(
                str(source),
                str(tmp),
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                # 7-bit weights: CPUs without VNNI multiply u8 x s8 pairs into saturating int16 sums, which
                # with full-range weights cost the trained model's image neighbours 2 points of top-10 overlap
                # (0.947 vs 0.966 with VNNI); with 7 bits no sum can saturate, on any x86 CPU.
                reduce_range=True,
            )
        finally:
            logging.getLogger().removeFilter(hint)

    _atomic_file(target, write)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


#: A temporary export file older than this was left by a process that stopped mid-export (a server exporting
#: in the background, app.encoder): removed by the next export of that file.
STALE_TEMP_SECONDS = 3600.0


def _atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.stem}.*.onnx"):
        with contextlib.suppress(OSError):  # another process may be removing it too
            if time.time() - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                leftover.unlink()
                log.info("removed %s, left by an export that did not finish", leftover)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp's 0600 would keep other users of the data dir (a server) from reading it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_session(path: Path, threads: int = 0, *, query: bool = False) -> Any:
    """An ORT CPU session on ``path`` with ``threads`` intra-op threads (0: torch's count); see
    app.onnx_encoder.new_session."""
    return onnx_session(path, threads or torch.get_num_threads(), query=query)


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of ``model``'s weights: a strided sample of every tensor, its name, shape and dtype.

    Cheap (milliseconds for ViT-B-32) and enough to tell two random initialisations or two checkpoints apart.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if flat.numel():
            step = max(1, flat.numel() // 4096)
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(store_key: str, model: nn.Module) -> str:
    """The cache folder's name: a readable prefix and a hash of what makes an export valid."""
    versions = [_version(p) for p in ("torch", "onnx", "onnxruntime")]
    parts = [store_key, weights_fingerprint(model), *versions, f"format{EXPORT_FORMAT}", f"opset{OPSET}"]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]
    readable = "".join(c if c.isalnum() or c in "-_." else "-" for c in store_key.rsplit("/", 1)[-1])[:40]
    return f"{readable}-{digest}"


def _version(package: str) -> str:
    try:
        return f"{package}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package}==?"


def tower_path(folder: Path, tower: str, mode: str) -> Path:
    """Where the ``tower`` ('text' | 'image') of ``mode`` lives in a model's cache ``folder``."""
    return folder / (f"{tower}-int8.onnx" if mode == ONNX_INT8 else f"{tower}.onnx")


def load_towers(
    model: Any,
    store_key: str,
    cache_root: Path,
    mode: str,
    image_size: int,
    threads: int = 0,
    *,
    chosen: bool = True,
    image_threads: int = 0,
    open_image: bool = True,
    spin_image: bool = False,
) -> OnnxTowers:
    """Sessions for ``model``'s towers in ``mode`` (onnx | onnx-int8), exporting (and quantising) into
    ``cache_root/<key>/`` what is not there yet or does not load. ``threads``: intra-op threads of both sessions
    (0: torch's count); ``image_threads``, when set, those of the image tower's (the indexer's lanes). A tower
    that cannot be exported is None, with a warning saying why; a tower of a kind ONNX Runtime does not take (a
    Hugging Face text tower) is said at INFO level when the mode was not ``chosen`` by the user but picked by
    CLIPSEARCH_INFERENCE=auto. With ``open_image`` false the image tower is exported where it is missing but given
    no session (``OnnxTowers.image_unopened``): a cached file is then not loaded to check it, and a broken one is
    found, and exported again, by the next start that opens it (a service's ONNX start falls back to torch's).
    The text tower's session is a query session (its threads spin during a run, see app.onnx_encoder.new_session),
    and so is the image tower's with ``spin_image`` (a service's; never the indexer's lanes)."""
    if mode not in ONNX_MODES:
        raise ValueError(f"unknown ONNX mode {mode!r}: use one of {', '.join(ONNX_MODES)}")
    folder = cache_root / cache_key(store_key, model)

    def session(tower: str, export: Callable[[Path], None], opened: bool = True) -> Any | None:
        """The tower's session; with ``opened`` false, True once its file is there (exported if need be)."""
        fp32_path, path = tower_path(folder, tower, ONNX), tower_path(folder, tower, mode)
        tower_threads = image_threads if tower == "image" and image_threads else threads
        query = tower == "text" or spin_image  # the indexer's lanes never spin
        if not opened and path.exists():
            return True
        if path.exists():
            try:
                return new_session(path, tower_threads, query=query)
            except Exception as exc:  # truncated or corrupt (ORT says which): build it again
                log.warning("the cached ONNX file %s does not load (%s): exporting it again", path, exc)
                fp32_path.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
        try:
            if path != fp32_path and fp32_path.exists():
                try:
                    quantize_file(fp32_path, path)
                except Exception as exc:
                    log.warning("the cached ONNX file %s does not quantise (%s): exporting it again", fp32_path, exc)
                    fp32_path.unlink(missing_ok=True)
            if not path.exists():
                log.info("exporting the %s tower of %s to ONNX in %s", tower, store_key, folder)
                export(fp32_path)
                if path != fp32_path:
                    quantize_file(fp32_path, path)
            return new_session(path, tower_threads, query=query) if opened else True
        except OnnxExportError as exc:
            reason, level = str(exc), logging.WARNING if chosen else logging.INFO
        except Exception as exc:
            reason, level = f"{exc.__class__.__name__}: {exc}", logging.WARNING
        log.log(level, "ONNX Runtime not used for the %s tower of %s: %s; it stays on torch", tower, store_key, reason)
        return None

    text = session("text", lambda p: export_text_tower(model, p))
    image = session("image", lambda p: export_image_tower(model, p, image_size), opened=open_image)
    if not open_image:
        return OnnxTowers(mode=mode, folder=folder, text=text, image=None, image_unopened=image is True)
    return OnnxTowers(mode=mode, folder=folder, text=text, image=image)
