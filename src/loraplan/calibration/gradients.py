"""The gradient calibration pass: per batch and layer, the norms of dLoss/dW of the target modules' weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..data import CalibrationBatches
from ..errors import CalibrationError
from ..layers import LayerStack, base_layer
from .inputs import (
    adapters_disabled,
    batch_rows,
    eval_mode,
    input_device,
    input_grads,
    labelled_loss,
    layer_name,
    progress_bar,
)
from .stats import CalibrationStats

__all__ = ["gradient_pass"]


def gradient_pass(
    model: nn.Module,
    base: nn.Module,
    stacks: list[tuple[LayerStack, list[dict[str, nn.Module]], CalibrationStats]],
    data: CalibrationBatches,
    progress: bool,
) -> None:
    """Per batch and layer of every stack, the summed ``||dLoss/dW||_F`` of the layer's target modules (one backward
    pass per batch serves every stack). A floating-point weight gets its gradient from autograd; a quantized one
    (bitsandbytes 4-bit or 8-bit, which cannot require grad) from its module's input and output gradient,
    ``dLoss/dW = Σ_tokens g xᵀ``, the gradient of the weight it stands for."""
    modules = [
        [[base_layer(m) for m in targets.values()] for targets in layer_targets] for _, layer_targets, _ in stacks
    ]
    flat = [m for per_stack in modules for ms in per_stack for m in ms]
    every = [m.weight for m in flat if m.weight.is_floating_point()]
    quantized = _QuantizedGradients([m for m in flat if not m.weight.is_floating_point()])
    saved_flags = {id(p): p.requires_grad for p in base.parameters()}
    saved_grads = {id(p): p.grad for p in every}
    device = input_device(base)
    norms: list[list[torch.Tensor]] = [[] for _ in stacks]
    bar = progress_bar(data.num_samples, "loraplan gradient scores", progress)
    handles = quantized.install()
    try:
        for p in base.parameters():
            if p.is_floating_point():
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
                for rows, per_stack, (stack, _, _) in zip(norms, modules, stacks):
                    rows.append(_take_gradient_norms(per_stack, quantized, stack, number))
                bar.update(batch_rows(batch))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        for p in base.parameters():
            if p.is_floating_point():
                p.requires_grad_(saved_flags.get(id(p), p.requires_grad))
        for p in every:
            p.grad = saved_grads[id(p)]
    for rows, (_, _, stats) in zip(norms, stacks):
        stats.gradients = torch.stack(rows)


class _QuantizedGradients:
    """``dLoss/dW`` of modules whose weight is stored quantized, summed over a batch's calls: a forward hook keeps each
    call's input and hooks its output's gradient, which adds ``gᵀ x`` (over every token) to the module's sum."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[int, torch.Tensor] = {}

    def install(self) -> list[Any]:
        return [module.register_forward_hook(self._forward) for module in self.modules]

    def _forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
            return
        x = args[0].detach()

        def add(grad: torch.Tensor) -> None:
            g = grad.reshape(-1, grad.shape[-1]).float()
            product = g.T @ x.reshape(-1, x.shape[-1]).float()
            key = id(module)
            self.sums[key] = product if key not in self.sums else self.sums[key] + product

        output.register_hook(add)

    def take(self, module: nn.Module) -> float | None:
        """The Frobenius norm of ``module``'s summed gradient for the batch (cleared), ``None`` without one."""
        total = self.sums.pop(id(module), None)
        return None if total is None else float(total.norm())


def _take_gradient_norms(
    modules: list[list[nn.Module]], quantized: _QuantizedGradients, stack: LayerStack, number: int
) -> torch.Tensor:
    """Per layer, the summed Frobenius norms of its target weights' gradients (which are then cleared)."""
    row = []
    for layer_number, ms in enumerate(modules):
        total = 0.0
        for module in ms:
            w = module.weight
            if not w.is_floating_point():
                total += quantized.take(module) or 0.0
            elif w.grad is not None:
                total += float(w.grad.detach().float().norm())
                w.grad = None
        if not math.isfinite(total):
            raise CalibrationError(
                f"non-finite gradient in the target modules of {layer_name(stack, layer_number)} on "
                f"calibration batch {number}."
            )
        row.append(total)
    return torch.tensor(row, dtype=torch.float64)
