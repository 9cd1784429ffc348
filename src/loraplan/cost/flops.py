"""Costs from FLOP counts of the module shapes (deterministic; no pass through the model), and the shapes the timed
costs share with them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import (
    LayerStack,
    features,
    find_layers,
    hidden_size,
    linear_modules,
    parameter_device,
    parameter_dtype,
    target_shapes,
    text_config,
    unwrap,
)
from .prediction import REGIMES, LayerCosts

__all__ = ["flop_costs", "lora_shapes", "output_head", "weight_bytes"]


def _attention_width(config: Any) -> tuple[int | None, int | None]:
    """(heads x head_dim, hidden size) from a transformers config, or Nones."""
    if config is None:
        return None, None
    hidden = hidden_size(config)
    heads = next(
        (
            getattr(config, k)
            for k in ("num_attention_heads", "n_head", "num_heads")
            if isinstance(getattr(config, k, None), int)
        ),
        None,
    )
    if heads is None or hidden is None:
        return None, hidden
    head_dim = getattr(config, "head_dim", None)
    head_dim = head_dim if isinstance(head_dim, int) else hidden // heads
    return heads * head_dim, hidden


def output_head(base: nn.Module) -> nn.Module | None:
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Linear) else None


def weight_bytes(base: nn.Module) -> int:
    """Bytes of the base model's parameters (whole, also when ZeRO-3 partitioned them) and buffers, LoRA excluded."""
    total = sum(
        (getattr(p, "ds_numel", None) or p.numel()) * p.element_size()
        for name, p in base.named_parameters()
        if "lora_" not in name
    )
    return total + sum(b.numel() * b.element_size() for b in base.buffers())


def lora_shapes(stack: LayerStack, targets: list[str] | None) -> dict[str, tuple[int, int]]:
    """(in, out) of the target modules of layer 0; a config error when there are none (no LoRA to price)."""
    found = target_shapes(stack.layers[0], targets)
    if not found:
        raise ConfigError(
            f"`target_modules` {targets!r} match no linear module of layer 0 ({stack.path}.0), so the cost model has "
            "no LoRA to count. Name modules the layers have, e.g. "
            + ", ".join(sorted(linear_modules(stack.layers[0]))[:4])
            + "."
        )
    return found


def flop_costs(
    model: nn.Module,
    *,
    targets: list[str] | None,
    rank: int,
    batch: int,
    seq_len: int,
    stack: LayerStack | None = None,
) -> LayerCosts:
    """Costs from FLOP counts of the module shapes (deterministic; no pass through the model).

    Matrix multiplies only: the linear modules, attention scores and values (causal for decoders), the head, and
    LoRA's low-rank products; element-wise work is ignored, so memory-bound layers cost more than this says.
    """
    base = unwrap(model)
    stack = stack if stack is not None else find_layers(base)
    tokens = batch * seq_len
    linear = sum(i * o for i, o in (features(m) for m in linear_modules(stack.layers[0]).values()))
    shapes = lora_shapes(stack, targets)
    lora_width = sum(i + o for i, o in shapes.values())
    width, hidden = _attention_width(text_config(base))
    notes = []
    context = seq_len / 2 if stack.pooling == "last" else seq_len
    if width is None:
        notes.append("attention width unknown (no num_attention_heads in the config): attention FLOPs not counted")
        attention = 0.0
    else:
        attention = 4.0 * context * width
    giga = tokens / 1e9
    forward = (2.0 * linear + attention) * giga
    backward = (2.0 * linear + 2.0 * attention) * giga  # to the input only: the base weights are frozen
    lora_forward = 2.0 * rank * lora_width * giga
    lora_backward = 4.0 * rank * lora_width * giga  # dA, dB, and the input gradient through B and A
    layer = {
        "skip": forward,
        "frozen": forward + backward,
        "lora": forward + backward + lora_forward + lora_backward,
    }
    layer["lora_first"] = layer["lora"]  # FLOPs do not tell which input gradients the layer still needs
    for name in ("frozen", "lora", "lora_first"):
        layer[name + "_ckpt"] = layer[name] + (forward + lora_forward if name.startswith("lora") else forward)
    head_module = output_head(base)
    head = 4.0 * head_module.in_features * head_module.out_features * giga if head_module is not None else 0.0
    if head_module is None:
        notes.append("no output head found: its cost is not counted")
    dtype = parameter_dtype(base, torch.float32)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    linear_inputs = sum(i for i, _ in (features(m) for m in linear_modules(stack.layers[0]).values()))
    hidden = hidden or next(iter(shapes.values()))[0]
    saved_frozen = float(tokens * size * (linear_inputs + 4 * hidden))
    memory = {
        "source": "estimate",
        "weights": float(weight_bytes(base)),
        "saved": {
            "frozen": saved_frozen,
            "lora": saved_frozen + float(tokens * 4 * rank * len(shapes)),
            "checkpointed": float(tokens * size * hidden),
            "head": float(tokens * head_module.out_features * 4 * 2) if head_module is not None else 0.0,
        },
        # the gradient of the (float32) logits, alive while the head back-propagates
        "head_transient": float(tokens * head_module.out_features * 4) if head_module is not None else 0.0,
    }
    return LayerCosts(
        source="flops",
        unit="GFLOP",
        shape=[batch, seq_len],
        rank=rank,
        num_layers=stack.num_layers,
        layer={k: layer[k] for k in REGIMES},
        head=head,
        optimizer_per_param=12e-9,  # AdamW: about a dozen operations per parameter
        lora_params_per_layer=rank * lora_width,
        memory=memory,
        device=parameter_device(base, torch.device("cpu")).type,
        dtype=str(dtype).replace("torch.", ""),
        notes=notes,
    )
