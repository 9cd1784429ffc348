"""Quantized base weights (bitsandbytes 4-bit and 8-bit, QLoRA): what loraplan must not change, and the one
bitsandbytes behaviour its own passes must step around.

bitsandbytes 0.50 repacks a ``Linear4bit`` weight for its CPU inference kernel the first time the layer runs on a
CPU with AVX512-BF16 in eval mode on an input that needs no gradient, which is exactly what a calibration pass is.
The repack rewrites the packed bytes and the quantization state in place; ``save_pretrained`` then converts them
back, but not exactly (the absmax scales come back in another order and dtype), so every save after a calibration
changed the live model's weights, and the packed layout has no backward, so training in between got no gradient
through the base weights. :func:`training_numerics` keeps loraplan's passes on the path training takes: the weights
are never repacked, and the scores are computed with the numerics the model trains with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError, ConfigError

__all__ = ["is_quantized", "quantization_of", "quantized_weights", "refuse_repacked", "training_numerics"]

#: the attribute by which a bitsandbytes ``Linear4bit`` decides to repack its weight for CPU inference
_CPU_REPACK = "support_avx512bf16_for_cpu"


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight stored quantized (a bitsandbytes ``Params4bit`` or an int8 ``Int8Params``), by module name."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and type(weight).__name__ in ("Params4bit", "Int8Params"):
            found[name] = weight
    return found


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is stored quantized by bitsandbytes."""
    return bool(quantized_weights(model))


def quantization_of(model: nn.Module) -> str | None:
    """``"4-bit nf4"``, ``"4-bit fp4"`` or ``"8-bit"`` for a bitsandbytes-quantized model, else ``None``."""
    for weight in quantized_weights(model).values():
        if type(weight).__name__ == "Params4bit":
            return f"4-bit {getattr(weight, 'quant_type', '') or ''}".strip()
        return "8-bit"
    return None


def _repacked(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


@contextlib.contextmanager
def training_numerics(model: nn.Module) -> Iterator[None]:
    """Run loraplan's own passes over ``model`` without bitsandbytes repacking 4-bit weights for CPU inference (see
    the module docstring); afterwards, a weight that was repacked all the same is an error, not a silent change."""
    switched: list[tuple[nn.Module, Any]] = []
    before = set()
    for module in model.modules():
        if hasattr(module, _CPU_REPACK):
            switched.append((module, module.__dict__.get(_CPU_REPACK)))
            module.__dict__[_CPU_REPACK] = False
            if _repacked(module):
                before.add(id(module))
    try:
        yield
    finally:
        for module, value in switched:
            if value is None:
                module.__dict__.pop(_CPU_REPACK, None)
            else:
                module.__dict__[_CPU_REPACK] = value
    now = [module for module, _ in switched if _repacked(module) and id(module) not in before]
    if now:  # pragma: no cover - a bitsandbytes release with another repack trigger
        raise CalibrationError(
            f"bitsandbytes repacked {len(now)} 4-bit weight(s) for CPU inference during loraplan's calibration, which "
            "changes the weights a later save writes. Please report this with your bitsandbytes version; calibrate "
            "on a GPU, or on the model before quantization, meanwhile."
        )


def refuse_repacked(model: nn.Module) -> None:
    """:class:`ConfigError` when bitsandbytes has already repacked 4-bit weights of ``model`` for CPU inference (the
    model ran in eval mode under ``no_grad`` before it was planned for training): training through them gets no
    gradient, and the next save changes them."""
    repacked = [name for name, module in model.named_modules() if hasattr(module, _CPU_REPACK) and _repacked(module)]
    if repacked:
        first = repacked[0] + (" ..." if len(repacked) > 1 else "")
        raise ConfigError(
            f"`model`: bitsandbytes repacked {len(repacked)} 4-bit weight(s) ({first}) "
            "for CPU inference, because the model ran in eval mode under torch.no_grad on a CPU with AVX512-BF16. "
            "bitsandbytes 0.50 back-propagates nothing through repacked weights and changes them when it saves, so "
            "training would be wrong. Load the model again and plan and train it without an eval-mode forward first "
            "(loraplan's own calibration does not repack)."
        )
