"""CPU inference options: opt-in int8 dynamic quantisation of an open_clip model, and thread counts.

``torch.ao.quantization.quantize_dynamic`` only converts ``nn.Linear`` modules. open_clip's default blocks
hold their attention projections inside ``nn.MultiheadAttention`` (a bare ``in_proj_weight`` parameter and a
``NonDynamicallyQuantizableLinear``), so on their own those would stay fp32: about a third of each block's
weights. :func:`quantize` first swaps each self-attention module for :class:`LinearSelfAttention`, the
same computation written with two ``nn.Linear`` layers, then quantises all linear layers. Weights become
int8 (7 bits used, one scale per output channel), activations are quantised to 8 bits on the fly per call.
The model keeps its embedding space (the same weights, approximated: cosine to fp32 >= 0.995), so an index
built with one mode serves the other.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import warnings
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from app.errors import ModelLoadError

log = logging.getLogger(__name__)

FP32 = "fp32"
INT8 = "int8"
#: ONNX Runtime's fp32 and int8 paths (app.onnx_backend): the same model, exported once and cached.
ONNX = "onnx"
ONNX_INT8 = "onnx-int8"
#: the image tower's matrix products and the activations between them in bfloat16 (torch, CPU), its residual stream,
#: layer norms and the text tower in fp32: for CPUs that multiply bf16 natively
BF16 = "bf16"
INFERENCE_MODES = (FP32, INT8, ONNX, ONNX_INT8, BF16)
#: the modes that run on the torch model itself (no ONNX export)
TORCH_MODES = (FP32, INT8, BF16)
ModelT = TypeVar("ModelT", bound=nn.Module)


class LinearSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, no dropout) with its projections as ``nn.Linear`` layers,
    called the way open_clip's ``ResidualAttentionBlock`` calls it: ``attn(x, x, x, need_weights=False,
    attn_mask=mask)[0]``."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim**-0.5  # SDPA's default, as a constant: an export computes it at run time otherwise
        self.batch_first = attention.batch_first
        bias = attention.in_proj_bias is not None
        # skip_init: no random fill of weights that are copied in below (ViT-B-32: 0.2 s per model)
        self.in_proj = skip_init(nn.Linear, dim, 3 * dim, bias=bias)
        self.out_proj = skip_init(nn.Linear, dim, dim, bias=attention.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(attention.in_proj_weight)
            if bias:
                self.in_proj.bias.copy_(attention.in_proj_bias)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.out_proj.bias is not None:
                self.out_proj.bias.copy_(attention.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("LinearSelfAttention only computes self-attention (key and value must be the query)")
        x = query if self.batch_first else query.transpose(0, 1)
        qkv = self._qkv(x)
        # (3, batch, heads, length, head_dim) in one transpose
        q, k, v = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # MHA's convention: True = masked out
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, scale=self.scale).transpose(1, 2)
        out = self.out_proj(out.reshape(out.shape[0], out.shape[1], self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x)


class Bf16Linear(nn.Module):
    """``nn.Linear`` with its weight stored in bfloat16: the product runs in bf16 (on oneDNN's bf16 kernels, which
    accumulate in fp32), its input cast down and its result back to fp32, the bias added in fp32. Around it the
    model stays fp32 (residual stream, layer norms, softmax): casting the whole tower to bf16 instead runs 5 %
    faster on ViT-B-32 but moves its vectors 10x further from fp32's (docs/PERFORMANCE.md, session 12)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def of(cls, linear: nn.Linear) -> Bf16Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(torch.bfloat16), self.weight)
        # fp32 bias: the add promotes (one pass over the product, the same values as ``out.float() + bias``)
        return out.float() if self.bias is None else torch.add(out, self.bias)

    def bf16_bias(self) -> torch.Tensor | None:
        """The bias rounded to bfloat16, for a product whose result stays in bf16 (oneDNN adds it in fp32)."""
        return None if self.bias is None else self.bias.detach().to(torch.bfloat16)


class Bf16SelfAttention(LinearSelfAttention):
    """:class:`LinearSelfAttention` in bfloat16 between its projections: q, k and v come out of the input
    projection in bf16 (its bias added by oneDNN in fp32 before rounding), attention runs on them (the CPU kernel
    accumulates in fp32) and its bf16 result goes straight into the output projection, whose result is fp32 again.
    Casting those activations to fp32 and back cost more than the products themselves on a CPU with AMX."""

    in_bias_bf16: torch.Tensor | None

    def __init__(self, attention: LinearSelfAttention) -> None:
        nn.Module.__init__(self)
        self.num_heads, self.head_dim, self.scale = attention.num_heads, attention.head_dim, attention.scale
        self.batch_first = attention.batch_first
        self.in_proj = Bf16Linear.of(attention.in_proj)
        self.out_proj = Bf16Linear.of(attention.out_proj)
        self.register_buffer("in_bias_bf16", self.in_proj.bf16_bias(), persistent=False)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.in_proj.weight, self.in_bias_bf16)


class Bf16Mlp(nn.Module):
    """A transformer block's MLP (linear, activation, linear; open_clip's ``c_fc``, ``gelu``, ``c_proj``) with its
    hidden layer in bfloat16: the first product's bf16 result, bias included, goes through the activation and into
    the second product without a round trip to fp32 (the widest activations of a ViT: 4x its width)."""

    fc_bias_bf16: torch.Tensor | None

    def __init__(self, fc: nn.Linear, activation: nn.Module, proj: nn.Linear) -> None:
        super().__init__()
        self.c_fc, self.activation, self.c_proj = Bf16Linear.of(fc), activation, Bf16Linear.of(proj)
        self.register_buffer("fc_bias_bf16", self.c_fc.bf16_bias(), persistent=False)

    @staticmethod
    def parts(module: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear] | None:
        """(first linear, activation, second linear) of a plain MLP ``nn.Sequential``, else None."""
        if not isinstance(module, nn.Sequential) or len(module) != 3:
            return None
        fc, activation, proj = module
        if type(fc) is not nn.Linear or type(proj) is not nn.Linear or any(True for _ in activation.parameters()):
            return None
        return fc, activation, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(F.linear(x.to(torch.bfloat16), self.c_fc.weight, self.fc_bias_bf16))
        return self.c_proj(hidden)


def to_bf16_products(tower: nn.Module) -> None:
    """Run ``tower``'s matrix products in bf16, in place: its self-attention modules become
    :class:`Bf16SelfAttention` and its plain MLPs :class:`Bf16Mlp` (their activations between the products stay
    bf16), then every other ``nn.Linear`` a :class:`Bf16Linear`. The residual stream and the layer norms stay fp32;
    convolutions too. A ViT's products are almost all of its time without AMX; with it, the fp32 round trips of the
    activations around them took about as long as the products (docs/PERFORMANCE.md, session 16)."""
    swap_self_attention(tower)
    layers = [(parent, name, child) for parent in tower.modules() for name, child in parent.named_children()]
    for parent, name, child in layers:
        if type(child) is LinearSelfAttention:
            setattr(parent, name, Bf16SelfAttention(child))
        elif (mlp := Bf16Mlp.parts(child)) is not None:
            setattr(parent, name, Bf16Mlp(*mlp))
    for parent, name, child in [(p, n, c) for p in tower.modules() for n, c in p.named_children()]:
        if type(child) is nn.Linear:
            setattr(parent, name, Bf16Linear.of(child))


def swap_self_attention(model: nn.Module) -> int:
    """Replace the plain self-attention modules of open_clip's blocks by :class:`LinearSelfAttention`."""
    swapped = 0
    for block in model.modules():
        attention = getattr(block, "attn", None)
        if (
            isinstance(attention, nn.MultiheadAttention)
            and not hasattr(block, "ln_1_kv")  # cross-attention blocks keep theirs
            and attention._qkv_same_embed_dim
            and attention.bias_k is None
            and not attention.add_zero_attn
            and attention.dropout == 0.0
        ):
            block.attn = LinearSelfAttention(attention)
            swapped += 1
    return swapped


class FullRangeDynamicLinear(torch.ao.nn.quantized.dynamic.Linear):
    """torch's dynamic int8 linear layer with activations quantised to 8 bits instead of its default 7.

    fbgemm's AVX2 kernels add pairs of uint8 x int8 products in int16, which saturates for 8-bit activations
    times full-range int8 weights; torch avoids it with 7-bit activations (``reduce_range``). We keep 8-bit
    activations and take the bit from the weights instead (7-bit per-channel weights,
    2 x 255 x 64 fits int16). Measured against fp32 (top-10 neighbour overlap, mean cosine): on the trained
    64 px model, 200 real photos, 0.92 / 0.9977 with torch's defaults and 0.96 / 0.9994 this way; on ViT-B-32
    random weights 0.9925 / 0.99987 (full-range weights with 8-bit activations: cosine 0.991, saturated)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
        return y.to(x.dtype)


def _int8_qconfig() -> torch.ao.quantization.QConfig:
    from torch.ao.quantization import PerChannelMinMaxObserver, PlaceholderObserver, QConfig

    activation = PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)
    weight = PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-64, quant_max=63
    )
    return QConfig(activation=activation, weight=weight)


def _finish_int8(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        if type(module) is torch.ao.nn.quantized.dynamic.Linear and module._packed_params.dtype == torch.qint8:
            module.__class__ = FullRangeDynamicLinear
            # open_clip asks a block for its weight dtype through ``mlp.c_fc.weight.dtype`` unless the layer
            # says ``int8_original_dtype`` (its bitsandbytes hook); a quantised layer has no ``.weight`` tensor.
            setattr(module, "int8_original_dtype", dtype)  # noqa: B010 (not a declared attribute)


def quantize(model: ModelT, mode: str) -> ModelT:
    """``model`` prepared for ``mode`` ('fp32': unchanged; 'int8': dynamic int8 linear layers, CPU only;
    'bf16': the image tower's products and their activations in bfloat16, in place (:func:`to_bf16_products`), the text
    tower left on fp32; the ONNX modes leave the torch model unchanged: ONNX Runtime runs an export of it)."""
    if mode in (FP32, ONNX, ONNX_INT8):
        return model
    if mode == BF16:
        visual = getattr(model, "visual", None)
        if not isinstance(visual, nn.Module):
            raise ModelLoadError("CLIPSEARCH_INFERENCE=bf16 needs a model with an image tower (.visual)")
        to_bf16_products(visual)
        return model
    if mode != INT8:
        raise ValueError(f"unknown inference mode {mode!r}: use one of {', '.join(INFERENCE_MODES)}")
    quantized = copy.deepcopy(model).cpu().eval()
    swap_self_attention(quantized)
    with warnings.catch_warnings():
        # torch.ao's eager quantisation works in torch 2.14 but is deprecated in favour of torchao: that
        # move is for when the pinned torch changes (tests/test_quantize.py then shows whether it still holds).
        warnings.filterwarnings("ignore", message=r".*(quantiz|torchao).*")
        quantized = torch.ao.quantization.quantize_dynamic(quantized, {nn.Linear: _int8_qconfig()}, dtype=torch.qint8)
    _finish_int8(quantized, torch.float32)
    return cast(ModelT, quantized)


def check_inference(mode: str, device: torch.device) -> str:
    """``mode`` if it can run on ``device``; a clear error otherwise."""
    if mode not in INFERENCE_MODES:
        from app.onnx_encoder import AUTO

        modes = ", ".join((AUTO, *INFERENCE_MODES))
        raise ModelLoadError(f"CLIPSEARCH_INFERENCE={mode!r} is unknown: use one of {modes}")
    if mode != FP32 and device.type != "cpu":
        raise ModelLoadError(
            f"CLIPSEARCH_INFERENCE={mode} runs on the CPU only: set CLIPSEARCH_DEVICE=cpu, "
            "or CLIPSEARCH_INFERENCE=fp32 on a GPU (which already uses fp16/bf16 autocast)"
        )
    if mode == BF16 and not native_bf16():
        log.warning(
            "CLIPSEARCH_INFERENCE=bf16: this CPU has no native bfloat16 instructions (AVX512_BF16 or AMX), so the "
            "image tower runs emulated, slower than fp32: use 'auto' (ONNX Runtime fp32) or 'int8' here"
        )
    elif mode == BF16 and not bf16_pays():
        log.warning(
            "CLIPSEARCH_INFERENCE=bf16: this CPU has bfloat16 instructions but multiplies bf16 no faster than fp32 "
            "(measured; the log line above gives the ratio): use 'auto' (ONNX Runtime fp32) or 'int8' here"
        )
    return mode


def native_bf16() -> bool:
    """True where the CPU has bfloat16 instructions (AVX512_BF16 or AMX): there bf16 ran a ViT image tower 1.8x
    (Zen 4) to 3.4x (Xeon with AMX) as fast as fp32 (docs/PERFORMANCE.md); elsewhere oneDNN emulates bf16, slower
    than fp32. Having them is not enough for 'auto' to take bf16: see bf16_pays."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch 2.14: absent means no
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


#: how much faster than fp32 a bf16 product must run here for 'auto' to run the image tower's products in bf16
#: (bf16_pays). Where bf16 was chosen, ViT-B-32's image tower ran 1.8x (Zen 4) to 3.4x (Xeon with AMX) as fast as
#: fp32; on a Xeon VM with AVX512_BF16 but no AMX a product ran at 0.53x and the tower at 0.56x (session 19).
BF16_MIN_SPEEDUP = 1.3


def bf16_product_speedup(rows: int = 256, width: int = 768, reps: int = 3) -> float:
    """fp32's time over bf16's for one product the size of a ViT-B MLP's first layer (``rows`` tokens of ``width``
    by ``4 * width`` outputs, ``F.linear`` as Bf16Linear runs it) on torch's current threads: the best of ``reps``
    runs of each, interleaved, after one of each to warm up."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randn(4 * width, width, generator=generator)
    pairs = {torch.float32: (x, weight), torch.bfloat16: (x.to(torch.bfloat16), weight.to(torch.bfloat16))}
    best = dict.fromkeys(pairs, float("inf"))
    with torch.inference_mode():
        for _ in range(reps + 1):
            for dtype, (a, b) in pairs.items():
                started = time.perf_counter()
                F.linear(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - started)  # the first, a warm-up, is slowest
    return best[torch.float32] / best[torch.bfloat16]


@functools.cache
def bf16_pays() -> bool:
    """Whether 'auto' runs the image tower's products in bf16 on this CPU: it has the instructions (native_bf16)
    and a product measured once per process (bf16_product_speedup, about 0.1 s) runs at least BF16_MIN_SPEEDUP
    times as fast as fp32's. The instructions alone are not enough: a Xeon VM with AVX512_BF16 but no AMX ran bf16
    products at half fp32's speed."""
    if not native_bf16():
        return False
    speedup = bf16_product_speedup()
    pays = speedup >= BF16_MIN_SPEEDUP
    log.info(
        "bf16 products run at %.2fx fp32's speed on this CPU: 'auto' runs the image tower in %s",
        speedup,
        "bf16" if pays else "fp32",
    )
    return pays


def set_cpu_threads(threads: int) -> None:
    """Threads for torch's intra-op pool and FAISS's OpenMP pool (process-wide; 0 leaves the defaults)."""
    if threads <= 0:
        return
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    log.info("CPU threads: torch %d, faiss %d", threads, threads)
