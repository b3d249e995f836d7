"""Models whose checkpoint replaces every weight are built without filling the weights at random first."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from torch.nn import init

from app import model_build
from app.model_spec import ModelSpec
from tests.helpers import register_tiny_architecture, save_checkpoint


@pytest.fixture
def fills(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the calls of torch.nn.init's real fills (the ones the build must not make for a checkpoint model)."""
    calls: Counter[str] = Counter()
    for name in model_build._FILLS:
        real = getattr(init, name)

        def counted(tensor: Any, *args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(init, name, counted)
    return calls


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_a_checkpoint_model_is_built_without_random_fills(
    fills: Counter[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """local-dir: models and checkpoint files: the same weights and buffers as open_clip's own build (the causal
    mask included), and not one random fill on the way; the fills work again afterwards."""
    name = register_tiny_architecture(tmp_path / "configs")
    for spec in (
        ModelSpec(f"local-dir:{tiny_model_dir}", ""),
        ModelSpec(name, str(save_checkpoint(tmp_path / "tiny.pt", seed=3))),
    ):
        assert model_build.has_checkpoint(spec)
        fills.clear()
        model, _, preprocess = model_build.create_model_and_transforms(spec)
        assert sum(fills.values()) == 0, fills
        reference, _, reference_preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained or None
        )
        assert fills["kaiming_uniform_"] > 0  # open_clip's own build fills every nn.Linear first
        _same_weights(model, reference)
        assert torch.equal(model.attn_mask, reference.attn_mask)
        assert repr(preprocess) == repr(reference_preprocess)
    assert init.normal_ is not model_build._keep and open_clip.factory.load_checkpoint.__name__ == "load_checkpoint"


def test_random_weights_are_filled_as_usual(fills: Counter[str], tmp_path: Path) -> None:
    name = register_tiny_architecture(tmp_path / "configs")
    spec = ModelSpec(name, "")
    assert not model_build.has_checkpoint(spec)
    model, _, _ = model_build.create_model_and_transforms(spec)
    assert fills["kaiming_uniform_"] > 0 and fills["normal_"] > 0
    assert all(p.std() > 0 for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2)


def test_a_build_that_loads_no_checkpoint_is_built_again_with_its_fills(
    fills: Counter[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where open_clip ends up loading no whole checkpoint although one was expected, no weight is left unfilled."""
    name = register_tiny_architecture(tmp_path / "configs")
    monkeypatch.setattr(model_build, "has_checkpoint", lambda spec: True)
    with caplog.at_level(logging.INFO, logger="app.model_build"):
        model, _, _ = model_build.create_model_and_transforms(ModelSpec(name, ""))
    assert "building it again" in caplog.text
    assert fills["kaiming_uniform_"] > 0
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2]
    assert weights and all(bool(torch.isfinite(p).all()) and p.std() > 0 for p in weights)


def test_the_fills_come_back_when_a_build_fails(tmp_path: Path) -> None:
    name = register_tiny_architecture(tmp_path / "configs")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    real_normal, real_load = init.normal_, open_clip.factory.load_checkpoint
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.load raises for it
        model_build.create_model_and_transforms(ModelSpec(name, str(broken)))
    assert init.normal_ is real_normal and open_clip.factory.load_checkpoint is real_load
    assert not model_build._lock.locked()
