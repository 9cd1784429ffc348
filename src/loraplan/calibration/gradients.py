"""The gradient calibration pass: per batch and layer, the norms of dLoss/dW of the target modules' weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import CalibrationBatches
from ..errors import CalibrationError
from ..layers import LayerStack, base_layer
from .inputs import adapters_disabled, eval_mode, input_device, input_grads, labelled_loss, layer_name, progress_bar
from .stats import CalibrationStats

__all__ = ["gradient_pass"]


def gradient_pass(
    model: nn.Module,
    base: nn.Module,
    stack: LayerStack,
    data: CalibrationBatches,
    layer_targets: list[dict[str, nn.Module]],
    stats: CalibrationStats,
    progress: bool,
) -> None:
    weights: list[list[nn.Parameter]] = [[base_layer(m).weight for m in modules.values()] for modules in layer_targets]
    every = [p for ws in weights for p in ws]
    saved_flags = {id(p): p.requires_grad for p in base.parameters()}
    saved_grads = {id(p): p.grad for p in every}
    device = input_device(base)
    norms: list[torch.Tensor] = []
    bar = progress_bar(data.num_samples, "loraplan gradient scores", progress)
    try:
        for p in base.parameters():
            p.requires_grad_(False)
        for p in every:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad(), eval_mode(model), adapters_disabled(model), input_grads(base):
            for number, batch in enumerate(data.batches):
                loss = labelled_loss(
                    base,
                    batch,
                    device,
                    "the `gradient` selector needs a loss",
                    "the `gradient` selector cannot score it",
                )
                if not bool(torch.isfinite(loss)):
                    raise CalibrationError(f"the calibration loss is not finite on batch {number}: {float(loss)}")
                loss.backward()
                norms.append(_take_gradient_norms(weights, stack, number))
                bar.update(batch["input_ids"].shape[0])
    finally:
        bar.close()
        for p in base.parameters():
            p.requires_grad_(saved_flags.get(id(p), p.requires_grad))
        for p in every:
            p.grad = saved_grads[id(p)]
    stats.gradients = torch.stack(norms)


def _take_gradient_norms(weights: list[list[nn.Parameter]], stack: LayerStack, number: int) -> torch.Tensor:
    """Per layer, the summed Frobenius norms of its target weights' gradients (which are then cleared)."""
    row = []
    for layer_number, ws in enumerate(weights):
        total = 0.0
        for w in ws:
            if w.grad is not None:
                total += float(w.grad.detach().float().norm())
                w.grad = None
        if not math.isfinite(total):
            raise CalibrationError(
                f"non-finite gradient in the target modules of {layer_name(stack, layer_number)} on "
                f"calibration batch {number}."
            )
        row.append(total)
    return torch.tensor(row, dtype=torch.float64)
