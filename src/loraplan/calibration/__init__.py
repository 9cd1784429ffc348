"""The calibration pass: one streaming forward pass (plus a backward pass when gradients are asked for).

Forward hooks pool every layer's output to one vector per sample on the fly (last non-pad token for decoders,
first token for encoders) and reduce the inputs of the LoRA target modules to per-sample norm sums, so no
``[batch, tokens, hidden]`` tensor outlives its batch. Statistics are kept in float32/float64 whatever the
model's dtype.

The pieces: :mod:`.stats` (what is measured), :mod:`.inputs` (what the passes share), :mod:`.forward` (hidden
states and activation norms), :mod:`.gradients` (gradient norms) and :mod:`.warmup` (LoRA-drop's outputs of a
temporary, briefly trained LoRA).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..config import PlanConfig
from ..data import CalibrationBatches
from ..errors import CalibrationError
from ..layers import LayerStack, target_modules_of, unwrap
from .forward import forward_pass
from .gradients import gradient_pass
from .inputs import layer_name, loss_labels, model_inputs
from .stats import ACTIVATIONS, GRADIENTS, HIDDEN, LORA_OUTPUTS, STATISTICS, CalibrationStats
from .warmup import lora_drop_pass

__all__ = [
    "ACTIVATIONS",
    "GRADIENTS",
    "HIDDEN",
    "LORA_OUTPUTS",
    "STATISTICS",
    "CalibrationStats",
    "calibrate",
    "loss_labels",
    "model_inputs",
]


def calibrate(
    model: nn.Module,
    stack: LayerStack,
    data: CalibrationBatches,
    requires: frozenset[str] | set[str],
    config: PlanConfig,
    targets: list[str] | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Run the calibration pass(es) over ``data`` and return the statistics ``requires`` names."""
    base = unwrap(model)
    num_layers = stack.num_layers
    pooling = stack.pooling if config.pooling == "auto" else config.pooling
    layer_targets = [target_modules_of(layer, targets) for layer in stack.layers]
    empty = [i for i, t in enumerate(layer_targets) if not t]
    if empty and any(name in requires for name in (ACTIVATIONS, GRADIENTS, LORA_OUTPUTS)):
        raise CalibrationError(
            f"no LoRA target module found in {layer_name(stack, empty[0])}"
            + (f" for target_modules={targets}" if targets else "")
            + ". Set `target_modules` to names of linear modules inside the layers (e.g. ['q_proj', 'v_proj'])."
        )
    tokens = torch.tensor([float(m.sum()) for b in data.batches for m in b["attention_mask"]], dtype=torch.float64)
    batch_index = torch.tensor(
        [n for n, b in enumerate(data.batches) for _ in range(b["input_ids"].shape[0])], dtype=torch.long
    )
    stats = CalibrationStats(
        num_layers=num_layers,
        tokens=tokens,
        batch_index=batch_index,
        target_names=[sorted(t) for t in layer_targets],
        meta={"pooling": pooling},
    )
    started = time.perf_counter()
    if HIDDEN in requires or ACTIVATIONS in requires:
        forward_pass(model, base, stack, data, requires, pooling, config, layer_targets, stats, progress)
    if GRADIENTS in requires:
        gradient_pass(model, base, stack, data, layer_targets, stats, progress)
    if LORA_OUTPUTS in requires:  # last: the passes above read the model as it is, before any warm-up
        lora_drop_pass(model, base, stack, data, layer_targets, stats, config, progress)
    stats.meta["seconds"] = round(time.perf_counter() - started, 3)
    return stats
