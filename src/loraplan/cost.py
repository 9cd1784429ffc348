"""The cost model: what a plan costs per training step, in time and peak memory, relative to LoRA on every layer.

A step is the forward and backward pass of every layer, the output head with its loss, and the optimizer step. What
one layer costs depends on its *regime*:

==================  ============================================================================================
``skip``            forward without autograd (below the lowest adapted layer with loraplan's truncation, or with
                    stock PEFT when nothing makes the embedding output require grad)
``frozen``          forward recorded and backward to its input, no LoRA (a layer without LoRA above the lowest
                    adapted layer, or any layer of stock PEFT once input grads are on)
``lora``            forward and backward of a layer with LoRA on the target modules
``lora_first``      the same for the lowest adapted layer when nothing below needs a gradient (no input gradient)
``*_ckpt``          the same under torch's non-reentrant activation checkpointing (the forward runs twice)
==================  ============================================================================================

Costs come from FLOP counts (``source="flops"``: deterministic, from the module shapes alone) or from timing one
layer of the model in each regime, and the head, on the model's own device (``source="timed"``: a few forward and
backward passes of a copy of layer 0, so the model itself is not touched). Peak memory is the weights, the LoRA
parameters with their gradients and AdamW state, and the tensors autograd saves: per recorded layer, per
checkpointed layer (its input), for the head, plus the larger of the logits' gradient and (under checkpointing) one
layer's recomputation; estimated from shapes with ``flops``, measured (bytes of saved tensors of one layer) with
``timed``.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError
from .layers import LayerStack, find_layers, linear_modules, target_modules_of, unwrap

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

logger = logging.getLogger("loraplan")

__all__ = ["REGIMES", "LayerCosts", "Prediction", "flop_costs", "measure_costs", "predict", "relative"]

REGIMES = ("skip", "frozen", "frozen_ckpt", "lora", "lora_ckpt", "lora_first", "lora_first_ckpt")
#: bytes per LoRA parameter held in training: fp32 weight, gradient and AdamW's two moments
LORA_TRAIN_BYTES = 4 * 4


@dataclass
class LayerCosts:
    """Per-step costs of one layer in each regime, the head and the optimizer, for one batch shape."""

    source: str  # "flops" or "timed"
    unit: str  # "GFLOP" or "s"
    shape: list[int]  # [batch, sequence length]
    rank: int
    num_layers: int
    layer: dict[str, float]
    head: float
    optimizer_per_param: float
    lora_params_per_layer: int
    memory: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerCosts:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Prediction:
    """Predicted step cost (in ``LayerCosts.unit``) and peak memory (bytes) of one configuration."""

    time: float
    memory: float
    regimes: list[str]


# -- prediction ---------------------------------------------------------------------------------------------------


def regimes(
    num_layers: int, selected: Sequence[int], *, checkpointing: bool, truncate: bool, input_grads: bool
) -> list[str]:
    """The regime of every layer for LoRA on ``selected``.

    ``input_grads``: the embedding output requires grad (trainers do this whenever they checkpoint).
    ``truncate``: loraplan's truncated backward is on (it makes ``input_grads`` irrelevant below the cut).
    """
    chosen = set(selected)
    lowest = min(chosen)
    records_below = input_grads and not truncate
    suffix = "_ckpt" if checkpointing else ""
    out = []
    for i in range(num_layers):
        if i < lowest:
            out.append(("frozen" + suffix) if records_below else "skip")
        elif i == lowest:
            out.append(("lora" if records_below else "lora_first") + suffix)
        else:
            out.append(("lora" if i in chosen else "frozen") + suffix)
    return out


def predict(
    costs: LayerCosts,
    selected: Sequence[int],
    *,
    checkpointing: bool,
    truncate: bool = True,
    input_grads: bool | None = None,
    num_modules: int | None = None,
    rank: int | None = None,
) -> Prediction:
    """Step cost and peak memory of LoRA on ``selected`` (``num_modules`` distinct layer-module sets after sharing, at
    ``rank``). ``input_grads`` defaults to ``checkpointing`` (what HF ``Trainer`` and TRL do)."""
    input_grads = checkpointing if input_grads is None else input_grads
    per_layer = regimes(costs.num_layers, selected, checkpointing=checkpointing, truncate=truncate, input_grads=input_grads)
    modules = len(selected) if num_modules is None else num_modules
    params = modules * costs.lora_params_per_layer * (rank or costs.rank) / costs.rank
    step = sum(costs.layer[r] for r in per_layer) + costs.head + costs.optimizer_per_param * params
    mem = costs.memory
    saved = mem.get("saved", {})
    kept = {"skip": 0.0, "frozen": saved.get("frozen", 0.0), "lora": saved.get("lora", 0.0),
            "lora_first": saved.get("lora", 0.0)}
    activations = sum(saved.get("checkpointed", 0.0) if r.endswith("_ckpt") else kept[r] for r in per_layer)
    transient = mem.get("head_transient", 0.0)  # while the head back-propagates
    if checkpointing:  # later, one layer at a time is recomputed
        recorded = [r.removesuffix("_ckpt") for r in per_layer if r != "skip"]
        transient = max([transient] + [kept[r] for r in recorded])
    memory = mem.get("weights", 0.0) + params * LORA_TRAIN_BYTES + activations + transient + saved.get("head", 0.0)
    return Prediction(step, memory, per_layer)


def relative(costs: LayerCosts, selected: Sequence[int], **kwargs: Any) -> tuple[float, float]:
    """(step time, peak memory) of ``selected`` as ratios of LoRA on every layer with the same checkpointing, run
    the way HF ``Trainer`` runs it (input grads on exactly when checkpointing)."""
    checkpointing = kwargs["checkpointing"]
    reference = predict(costs, range(costs.num_layers), checkpointing=checkpointing, truncate=False)
    plan = predict(costs, selected, **kwargs)
    return plan.time / reference.time, plan.memory / reference.memory


# -- what the model looks like ------------------------------------------------------------------------------------


def _inner(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _shape(module: nn.Module) -> tuple[int, int]:
    inner = _inner(module)
    if hasattr(inner, "in_features"):
        return int(inner.in_features), int(inner.out_features)
    return int(inner.weight.shape[0]), int(inner.weight.shape[1])  # Conv1D: (in, out)


def _text_config(base: nn.Module) -> Any:
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _attention_width(config: Any) -> tuple[int | None, int | None]:
    """(heads x head_dim, hidden size) from a transformers config, or Nones."""
    if config is None:
        return None, None
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if isinstance(getattr(config, k, None), int)), None)
    heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if isinstance(getattr(config, k, None), int)), None)
    if heads is None or hidden is None:
        return None, hidden
    head_dim = getattr(config, "head_dim", None)
    head_dim = head_dim if isinstance(head_dim, int) else hidden // heads
    return heads * head_dim, hidden


def _output_head(base: nn.Module) -> nn.Module | None:
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Linear) else None


def _weight_bytes(base: nn.Module) -> int:
    """Bytes of the base model's parameters (whole, also when ZeRO-3 partitioned them) and buffers, LoRA excluded."""
    total = sum(
        (getattr(p, "ds_numel", None) or p.numel()) * p.element_size()
        for name, p in base.named_parameters()
        if "lora_" not in name
    )
    return total + sum(b.numel() * b.element_size() for b in base.buffers())


def _targets(stack: LayerStack, targets: list[str] | None) -> dict[str, tuple[int, int]]:
    found = target_modules_of(stack.layers[0], targets)
    if not found:
        raise ConfigError(
            f"`target_modules` {targets!r} match no linear module of layer 0 ({stack.path}.0), so the cost model has "
            "no LoRA to count. Name modules the layers have, e.g. " + ", ".join(sorted(linear_modules(stack.layers[0]))[:4]) + "."
        )
    return {name: _shape(module) for name, module in found.items()}


def _dtype(base: nn.Module) -> torch.dtype:
    return next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)


def _device(base: nn.Module) -> torch.device:
    return next((p.device for p in base.parameters()), torch.device("cpu"))


# -- FLOP counts --------------------------------------------------------------------------------------------------


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
    linear = sum(i * o for i, o in (_shape(m) for m in linear_modules(stack.layers[0]).values()))
    lora_shapes = _targets(stack, targets)
    lora_width = sum(i + o for i, o in lora_shapes.values())
    width, hidden = _attention_width(_text_config(base))
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
    head_module = _output_head(base)
    head = 4.0 * head_module.in_features * head_module.out_features * giga if head_module is not None else 0.0
    if head_module is None:
        notes.append("no output head found: its cost is not counted")
    dtype = _dtype(base)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    linear_inputs = sum(i for i, _ in (_shape(m) for m in linear_modules(stack.layers[0]).values()))
    hidden = hidden or next(iter(lora_shapes.values()))[0]
    saved_frozen = float(tokens * size * (linear_inputs + 4 * hidden))
    memory = {
        "source": "estimate",
        "weights": float(_weight_bytes(base)),
        "saved": {
            "frozen": saved_frozen,
            "lora": saved_frozen + float(tokens * 4 * rank * len(lora_shapes)),
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
        device=_device(base).type,
        dtype=str(dtype).replace("torch.", ""),
        notes=notes,
    )


# -- timing -------------------------------------------------------------------------------------------------------


class _Captured(Exception):
    pass


def capture_layer_inputs(base: nn.Module, stack: LayerStack, batch: int, seq_len: int) -> tuple[tuple, dict]:
    """The positional and keyword arguments layer 0 receives for a batch of random tokens (the model runs only up to
    layer 0). Caches are dropped so that repeated calls cost the same: whatever their keyword (``past_key_values``
    before transformers 5.24, ``cache`` since), a cache would grow at every timed call and carry the autograd graph
    of the previous one."""
    from transformers.cache_utils import Cache

    from .calibration import model_inputs

    config = _text_config(base)
    vocab = int(getattr(config, "vocab_size", 0) or 100)
    device = _device(base)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = stack.layers[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            base(**model_inputs(base, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, device))
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise ConfigError(
            f"`cost_model`: a forward pass of {type(base).__name__} with input_ids never reached layer 0 "
            f"({stack.path}.0), so it cannot be timed. Use cost_model='flops'."
        )
    args, kwargs = captured["args"], dict(captured["kwargs"])
    for key, value in kwargs.items():
        if isinstance(value, Cache) or key in ("past_key_values", "past_key_value", "layer_past", "cache"):
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if not args:
        hidden = kwargs.pop("hidden_states", None)
        if hidden is None:
            raise ConfigError(f"`cost_model`: layer 0 of {type(base).__name__} gets no hidden state; use cost_model='flops'.")
        args = (hidden,)
    return args, kwargs


def _plain_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` without hooks, LoRA or checkpointing, all parameters frozen."""
    clone = copy.deepcopy(layer)
    for module in clone.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        module._backward_hooks.clear()
        module.__dict__.pop("_loraplan_truncation", None)
        if "gradient_checkpointing" in module.__dict__:
            module.gradient_checkpointing = False
    for name, module in list(clone.named_modules()):
        if name and hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            parent = clone.get_submodule(parent_name) if parent_name else clone
            setattr(parent, child, module.get_base_layer())
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.train()


def _lora_copy(plain: nn.Module, names: list[str], rank: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    clone = copy.deepcopy(plain)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=leaves), clone)
    for n, p in clone.named_parameters():
        p.requires_grad_("lora_" in n)
    return clone.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_times(
    jobs: dict[str, Callable[[], None]], passes: int, device: torch.device, reset: Callable[[], None]
) -> dict[str, float]:
    """Median seconds of each job over ``passes`` rounds after one warm-up each. The jobs take turns within every
    round, so that a change in the machine's load shifts all of them alike."""
    for fn in jobs.values():
        reset()
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(passes):
        for name, fn in jobs.items():
            reset()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _saved_bytes(fn: Callable[[], None], exclude: set[int]) -> float:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return float(sum(seen.values()))


def measure_costs(
    model: nn.Module,
    *,
    targets: list[str] | None,
    rank: int,
    batch: int,
    seq_len: int,
    passes: int = 5,
    stack: LayerStack | None = None,
) -> LayerCosts:
    """Time a copy of layer 0 in every regime, the head and an AdamW step on the model's device (median of
    ``passes`` rounds after one warm-up, the regimes taking turns), and measure the bytes autograd saves. The model
    itself is not changed."""
    with torch.enable_grad():
        return _measure(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, passes=passes, stack=stack)


def _measure(
    model: nn.Module,
    *,
    targets: list[str] | None,
    rank: int,
    batch: int,
    seq_len: int,
    passes: int,
    stack: LayerStack | None,
) -> LayerCosts:
    from torch.utils.checkpoint import checkpoint

    from .distributed import is_partitioned

    base = unwrap(model)
    if is_partitioned(base):
        raise ConfigError(
            "`cost_model` is 'timed', but the weights are partitioned by DeepSpeed ZeRO-3, so layer 0 cannot be "
            "copied and timed. Use cost_model='flops', or plan before the model is partitioned."
        )
    stack = stack if stack is not None else find_layers(base)
    flops = flop_costs(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, stack=stack)
    device, dtype = _device(base), _dtype(base)
    args, kwargs = capture_layer_inputs(base, stack, batch, seq_len)
    hidden, rest = args[0], args[1:]
    plain = _plain_copy(stack.layers[0])
    lora = _lora_copy(plain, list(_targets(stack, targets)), rank)
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(hidden.shape, generator=generator).to(device=device, dtype=hidden.dtype)

    def run(layer: nn.Module, regime: str) -> Callable[[], None]:
        kind, ckpt = regime.removesuffix("_ckpt"), regime.endswith("_ckpt")

        def fn() -> None:
            if kind == "skip":
                with torch.no_grad():
                    layer(hidden, *rest, **kwargs)
                return
            x = hidden.detach().requires_grad_(kind != "lora_first")
            out = checkpoint(layer, x, *rest, use_reentrant=False, **kwargs) if ckpt else layer(x, *rest, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.backward(upstream)

        return fn

    def reset() -> None:
        for p in lora_params:
            p.grad = None

    jobs = {regime: run(lora if regime.startswith("lora") else plain, regime) for regime in REGIMES}
    exclude = {p.untyped_storage().data_ptr() for p in list(plain.parameters()) + list(lora.parameters())}
    exclude |= {t.untyped_storage().data_ptr() for t in (hidden, *rest) if isinstance(t, torch.Tensor)}
    saved = {
        "frozen": _saved_bytes(run(plain, "frozen"), exclude),
        "lora": _saved_bytes(run(lora, "lora"), exclude),
        "checkpointed": float(hidden.numel() * hidden.element_size()),
    }
    head_module = _output_head(base)
    saved["head"] = 0.0
    if head_module is not None:
        weight = head_module.weight.detach()
        bias = head_module.bias.detach() if head_module.bias is not None else None
        vocab = weight.shape[0]
        features = torch.randn(batch, seq_len, weight.shape[1], generator=generator).to(device=device, dtype=dtype)
        labels = torch.randint(0, vocab, (batch * seq_len,), generator=generator).to(device)

        def head_step() -> None:
            x = features.detach().requires_grad_(True)
            logits = torch.nn.functional.linear(x, weight, bias)
            torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), labels).backward()

        jobs["head"] = head_step
        saved["head"] = _saved_bytes(head_step, exclude | {weight.untyped_storage().data_ptr()})
    costs = _median_times(jobs, passes, device, reset)
    head_time = costs.pop("head", 0.0)
    reset()
    run(lora, "lora")()  # gradients for the optimizer step
    optimizer = torch.optim.AdamW(lora_params, lr=1e-4)
    optimizer_time = _median_times({"step": optimizer.step}, passes, device, lambda: None)["step"]
    del plain, lora, optimizer
    return LayerCosts(
        source="timed",
        unit="s",
        shape=[batch, seq_len],
        rank=rank,
        num_layers=stack.num_layers,
        layer=costs,
        head=head_time,
        optimizer_per_param=optimizer_time / max(1, sum(p.numel() for p in lora_params)),
        lora_params_per_layer=flops.lora_params_per_layer,
        memory={"source": "measured", "weights": flops.memory["weights"], "saved": saved,
                "head_transient": flops.memory["head_transient"]},
        device=device.type,
        dtype=str(dtype).replace("torch.", ""),
        notes=[f"median of {passes} timed rounds (regimes and head in turn) of a copy of layer 0, after one warm-up"],
    )


def costs_for(
    model: nn.Module,
    *,
    source: str,
    targets: list[str] | None,
    rank: int,
    batch: int,
    seq_len: int,
    stack: LayerStack | None = None,
) -> LayerCosts:
    """``flop_costs`` or ``measure_costs`` by ``source``."""
    if source == "timed":
        return measure_costs(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, stack=stack)
    return flop_costs(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, stack=stack)


def fmt_ratio(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}x"


# -- choosing layers within a budget ------------------------------------------------------------------------------


def _time_ratio(costs: LayerCosts, selected: Sequence[int], checkpointing: bool, reference: float, rank: int) -> float:
    return predict(costs, selected, checkpointing=checkpointing, rank=rank).time / reference


def select_within_budget(
    importance: Sequence[float],
    costs: LayerCosts,
    *,
    time_budget: float | None,
    param_budget: float | None,
    checkpointing: bool,
    base_rank: int,
    plan_rank: int,
    max_count: int | None = None,
) -> tuple[list[int], dict[str, Any]]:
    """The layers to adapt under a step-time and/or parameter budget, and the record of the trade-off.

    Importance is shifted to be non-negative and summed. With a parameter budget only, that is the top ``k`` layers
    (``k`` from the budget). With a time budget, every possible lowest layer ``m`` (the cut: loraplan runs the layers
    below it without autograd) is tried: ``m`` plus the most important layers above it, as many as the predicted
    step time allows (each added layer costs the same, so this is the best set for that cut); the cut with the
    highest summed importance wins (ties: lower predicted time). Unscorable (nan) layers are never chosen.
    """
    n = costs.num_layers
    usable = [i for i in range(n) if importance[i] is not None and not math.isnan(importance[i])]
    floor = min(importance[i] for i in usable)
    worth = {i: float(importance[i]) - floor for i in usable}
    order = sorted(usable, key=lambda i: (-importance[i], i))
    cap = min(max_count or n, len(usable))
    record: dict[str, Any] = {
        "time_budget": time_budget,
        "param_budget": param_budget,
        "checkpointing": checkpointing,
        "objective": "sum of importance, shifted so that the least important layer counts 0",
    }
    if param_budget is not None:
        allowed = math.floor(param_budget * n * base_rank / plan_rank + 1e-9)
        if allowed < 1:
            raise ConfigError(
                f"`param_budget` {param_budget} allows {param_budget * n * base_rank / plan_rank:.2f} layers of LoRA "
                f"at r={plan_rank} ({n} layers at r={base_rank} are the whole budget), fewer than one. Raise it to at "
                f"least {plan_rank / (n * base_rank):.3g}, or lower the rank."
            )
        cap = min(cap, allowed)
        record["param_layers"] = allowed
    reference = predict(costs, range(n), checkpointing=checkpointing, truncate=False).time

    def entry(layers: list[int]) -> dict[str, Any]:
        time_ratio, memory_ratio = relative(costs, layers, checkpointing=checkpointing, rank=plan_rank)
        return {
            "lowest": min(layers),
            "count": len(layers),
            "layers": sorted(layers),
            "importance": sum(worth[i] for i in layers),
            "time": time_ratio,
            "memory": memory_ratio,
        }

    top = entry(sorted(order[:cap]))
    if time_budget is None:
        record["chosen"] = top
        record["summary"] = (
            f"param_budget {param_budget}: the {cap} most important layers (LoRA parameters "
            f"{cap * plan_rank / (n * base_rank):.0%} of LoRA on every layer at r={base_rank})"
        )
        return top["layers"], record
    candidates = []
    for cut in usable:
        chosen = [cut]
        for i in order:
            if len(chosen) >= cap:
                break
            if i <= cut:
                continue
            if _time_ratio(costs, chosen + [i], checkpointing, reference, plan_rank) > time_budget + 1e-12:
                break  # every layer above the cut adds the same cost: the next one would not fit either
            chosen.append(i)
        item = entry(chosen)
        item["fits"] = item["time"] <= time_budget + 1e-12
        candidates.append(item)
    fitting = [c for c in candidates if c["fits"]]
    if not fitting:
        cheapest = min(candidates, key=lambda c: c["time"])
        raise ConfigError(
            f"`time_budget` {time_budget} is below the cheapest plan the cost model predicts: "
            f"{cheapest['time']:.3f}x of LoRA on every layer (layer {cheapest['lowest']} alone, "
            f"{'with' if checkpointing else 'without'} checkpointing; the head, embeddings and the layers below still "
            f"run). Raise time_budget to at least {math.ceil(cheapest['time'] * 1000) / 1000:.3f}."
        )
    best = max(fitting, key=lambda c: (c["importance"], -c["time"], c["lowest"]))
    top = entry(sorted(order[: best["count"]]))
    record["chosen"] = {k: v for k, v in best.items() if k != "fits"}
    record["top_by_importance"] = top
    record["candidates"] = [{k: c[k] for k in ("lowest", "count", "layers", "importance", "time", "fits")} for c in candidates]
    record["summary"] = (
        f"time_budget {time_budget} ({'with' if checkpointing else 'without'} checkpointing): {best['count']} layers "
        f"from layer {best['lowest']} up, predicted {best['time']:.2f}x the step time and {best['memory']:.2f}x the "
        f"peak memory of LoRA on every layer, {best['importance']:.4g} of importance; the {top['count']} most "
        f"important layers (lowest {top['lowest']}) would cost {top['time']:.2f}x"
        + (" and fit the budget too" if top["time"] <= time_budget + 1e-12 else "")
    )
    return best["layers"], record


def predictions(costs: LayerCosts, selected: Sequence[int], num_modules: int, rank: int) -> dict[str, Any]:
    """What the plan records: step-time and peak-memory ratios versus LoRA on every layer, with and without
    checkpointing, with loraplan's truncation and with stock PEFT."""
    out: dict[str, Any] = {}
    for label, checkpointing in (("checkpointing", True), ("no_checkpointing", False)):
        rows = {"loraplan": dict(truncate=True), "stock": dict(truncate=False, input_grads=True)}
        if not checkpointing:
            rows["stock_no_input_grads"] = dict(truncate=False, input_grads=False)
        out[label] = {}
        for name, kwargs in rows.items():
            time_ratio, memory_ratio = relative(
                costs, selected, checkpointing=checkpointing, num_modules=num_modules, rank=rank, **kwargs
            )
            out[label][name] = {"time": time_ratio, "memory": memory_ratio}
    return out
