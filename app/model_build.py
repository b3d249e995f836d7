"""Building an open_clip model without filling weights that its checkpoint replaces at once.

open_clip builds a model's layers, each filling its weights with random numbers (``torch.nn.init``), then loads
the checkpoint over all of them (``load_state_dict(strict=True)``). For ViT-B-32 the random fills took 0.5-1 s of a
2.3 s load on a 2-core CPU, about a third of a no-op ``clipsearch index``. While a model whose weights come from a
checkpoint is built here, ``torch.nn.init``'s fills leave their tensors as they are; the weights that are computed
rather than drawn (open_clip's causal mask, a ``torch.randn`` or two) are made as usual. A build that turns out not
to load a whole checkpoint (open_clip took another path) is built again the usual way, so no weight is ever left
unfilled.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import open_clip
import open_clip.factory
from torch.nn import init

from app.model_spec import LOCAL_DIR_PREFIX, ModelSpec

log = logging.getLogger(__name__)

_HUB_PREFIX = "hf-hub:"
# torch.nn.init's in-place fills (uniform_, normal_, kaiming_uniform_, ...): what nn.Linear, nn.MultiheadAttention
# and open_clip's init_parameters call
_FILLS = tuple(name for name in dir(init) if name.endswith("_") and not name.startswith("_"))
# the fills are module attributes, so this holds for the whole process: one build at a time
_lock = threading.Lock()


def has_checkpoint(spec: ModelSpec) -> bool:
    """Whether open_clip loads ``spec``'s weights from a checkpoint (a tag, a file, a local-dir: or hf-hub: model)
    rather than keeping random ones."""
    return bool(spec.pretrained) or spec.name.startswith((LOCAL_DIR_PREFIX, _HUB_PREFIX))


def _keep(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


@contextlib.contextmanager
def _fills_skipped() -> Iterator[list[str]]:
    """torch.nn.init's fills do nothing inside; yields the checkpoints open_clip loaded in full meanwhile."""
    loaded: list[str] = []
    load_checkpoint = open_clip.factory.load_checkpoint

    def recording(model: Any, checkpoint_path: str, strict: bool = True, *args: Any, **kwargs: Any) -> Any:
        result = load_checkpoint(model, checkpoint_path, strict, *args, **kwargs)
        # strict: every parameter and buffer of the model was in it; big_vision's .npz files take another path
        if strict and Path(checkpoint_path).suffix not in (".npz", ".npy"):
            loaded.append(str(checkpoint_path))
        return result

    with _lock:
        saved = {name: getattr(init, name) for name in _FILLS}
        for name in _FILLS:
            setattr(init, name, _keep)
        open_clip.factory.load_checkpoint = recording
        try:
            yield loaded
        finally:
            open_clip.factory.load_checkpoint = load_checkpoint
            for name, fill in saved.items():
                setattr(init, name, fill)


def create_model_and_transforms(spec: ModelSpec, **kwargs: Any) -> tuple[Any, Any, Any]:
    """``open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained or None, **kwargs)``, without
    the random fills of weights that the checkpoint replaces."""
    build: Callable[[], tuple[Any, Any, Any]] = lambda: open_clip.create_model_and_transforms(  # noqa: E731
        spec.name, pretrained=spec.pretrained or None, **kwargs
    )
    if not has_checkpoint(spec):
        return build()
    with _fills_skipped() as loaded:
        built = build()
    if loaded:
        return built
    log.info("%s did not load a whole checkpoint: building it again with its weights filled", spec.label)
    return build()
