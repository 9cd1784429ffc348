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

from .._removed import removed
from ..config import PlanConfig
from ..data import CalibrationBatches
from ..errors import CalibrationError
from ..layers import LayerStack, target_modules_of, unwrap
from .forward import StackPass, forward_passes
from .gradients import gradient_pass
from .inputs import batch_rows, layer_name, loss_labels, model_inputs
from .stats import _STATISTICS, ACTIVATIONS, GRADIENTS, HIDDEN, LORA_OUTPUTS, CalibrationStats
from .warmup import lora_drop_pass

__all__ = [
    "ACTIVATIONS",
    "GRADIENTS",
    "HIDDEN",
    "LORA_OUTPUTS",
    "CalibrationStats",
    "calibrate",
    "calibrate_stacks",
    "loss_labels",
    "model_inputs",
]

#: STATISTICS is gone (nothing used it); kept for a release
__getattr__ = removed(__name__, {"STATISTICS": _STATISTICS})


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
    return calibrate_stacks(model, [stack], data, requires, config, targets, progress)[0]


def calibrate_stacks(
    model: nn.Module,
    stacks: list[LayerStack],
    data: CalibrationBatches,
    requires: frozenset[str] | set[str],
    config: PlanConfig,
    targets: list[str] | None = None,
    progress: bool = True,
) -> list[CalibrationStats]:
    """The statistics of every stack in ``stacks`` (one, or an encoder-decoder model's encoder and decoder), from the
    same passes over ``data``: one forward pass, one backward per batch for gradients, one LoRA-drop warm-up."""
    base = unwrap(model)
    passes = [_stack_pass(stack, stacks, data, requires, config, targets) for stack in stacks]
    started = time.perf_counter()
    if HIDDEN in requires or ACTIVATIONS in requires:
        forward_passes(model, base, passes, data, requires, config, progress)
    if GRADIENTS in requires:
        gradient_pass(model, base, [(p.stack, p.layer_targets, p.stats) for p in passes], data, progress)
    if LORA_OUTPUTS in requires:  # last: the passes above read the model as it is, before any warm-up
        lora_drop_pass(model, base, passes, data, config, progress)
    seconds = round(time.perf_counter() - started, 3)
    for one in passes:
        if data.order is not None:
            _in_sample_order(one.stats, data.order, data.batches[0], config.batch_size)
        one.stats.meta["seconds"] = seconds
        if one.mask_key is None and one.state.frames:  # an audio encoder's positions are known after its forward
            one.stats.tokens = torch.tensor(one.state.frames, dtype=torch.float64)
    return [one.stats for one in passes]


def _in_sample_order(stats: CalibrationStats, order: list[int], first: dict, batch_size: int) -> None:
    """Per-sample statistics of batches made by length (``order``: the sample each row is) put back in sample order,
    with batches numbered by sample (the first ``batch_size`` samples, the next...) so that the stability halves split
    the samples, not the lengths. Only forward statistics are ever batched this way (per-batch gradients are not)."""
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    for name in ("tokens", "activation_sums", "read_tokens", "lora_outputs"):
        value = getattr(stats, name)
        if value is not None:
            setattr(stats, name, value[position])
    if stats.hidden is not None:
        stats.hidden = [h[position] for h in stats.hidden]
    stats.batch_index = torch.arange(len(order), dtype=torch.long) // max(1, batch_size)
    stats.meta["batching"] = "by length"


def _stack_pass(
    stack: LayerStack,
    stacks: list[LayerStack],
    data: CalibrationBatches,
    requires: frozenset[str] | set[str],
    config: PlanConfig,
    targets: list[str] | None,
) -> StackPass:
    """What one stack reads in a calibration pass (its tokens, its mask), and where its statistics go."""
    layer_targets = [target_modules_of(layer, targets) for layer in stack.layers]
    empty = [i for i, t in enumerate(layer_targets) if not t]
    if empty and any(name in requires for name in (ACTIVATIONS, GRADIENTS, LORA_OUTPUTS)):
        raise CalibrationError(
            f"no LoRA target module found in {layer_name(stack, empty[0])}"
            + (f" for target_modules={targets}" if targets else "")
            + ". Set `target_modules` to names of linear modules inside the layers (e.g. ['q_proj', 'v_proj'])."
        )
    pooling = stack.pooling if config.pooling == "auto" else config.pooling
    ids_key: str | None = "input_ids"
    mask_key: str | None = "attention_mask"
    other: LayerStack | None = None
    if len(stacks) > 1 and stack is not stacks[0]:  # an encoder-decoder model's decoder
        ids_key, mask_key, other = "decoder_input_ids", "decoder_attention_mask", stacks[0]
    elif "input_ids" not in data.batches[0]:  # a speech encoder: every frame of its output counts
        ids_key, mask_key = None, None
        pooling = "mean" if pooling == "last" else pooling
    rows = [batch_rows(b) for b in data.batches]
    tokens: list[float] = []
    for batch, count in zip(data.batches, rows):  # a speech encoder's are counted by its forward (BatchState.frames)
        tokens += [float(m.sum()) for m in batch[mask_key]] if mask_key is not None else [0.0] * count
    stats = CalibrationStats(
        num_layers=stack.num_layers,
        tokens=torch.tensor(tokens, dtype=torch.float64),
        batch_index=torch.tensor([n for n, count in enumerate(rows) for _ in range(count)], dtype=torch.long),
        target_names=[sorted(t) for t in layer_targets],
        meta={"pooling": pooling},
    )
    return StackPass(stack, stats, layer_targets, pooling, ids_key, mask_key, other)
