"""Costs measured on the model's own device: a copy of layer 0 timed in every regime, the head and an AdamW step,
and the bytes autograd saves (``cost_model="timed"``). The model itself is not changed."""

from __future__ import annotations

import copy
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..calibration import model_inputs
from ..errors import ConfigError
from ..layers import LayerStack, find_layers, parameter_device, parameter_dtype, text_config, unwrap
from ..truncate import LAYER_STATE
from .flops import flop_costs, lora_shapes, output_head
from .prediction import REGIMES, LayerCosts

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["capture_layer_inputs", "costs_for", "measure_costs"]


class _Captured(Exception):
    pass


def capture_layer_inputs(base: nn.Module, stack: LayerStack, batch: int, seq_len: int) -> tuple[tuple, dict]:
    """The positional and keyword arguments layer 0 receives for a batch of random tokens (the model runs only up to
    layer 0). Caches are dropped so that repeated calls cost the same: whatever their keyword (``past_key_values``
    before transformers 5.24, ``cache`` since), a cache would grow at every timed call and carry the autograd graph
    of the previous one."""
    from transformers.cache_utils import Cache

    config = text_config(base)
    vocab = int(getattr(config, "vocab_size", 0) or 100)
    device = parameter_device(base, torch.device("cpu"))
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
            raise ConfigError(
                f"`cost_model`: layer 0 of {type(base).__name__} gets no hidden state; use cost_model='flops'."
            )
        args = (hidden,)
    return args, kwargs


def _plain_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` without hooks, LoRA or checkpointing, all parameters frozen."""
    clone = copy.deepcopy(layer)
    for module in clone.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        module._backward_hooks.clear()
        module.__dict__.pop(LAYER_STATE, None)
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
    from ..processes import is_partitioned

    base = unwrap(model)
    if is_partitioned(base):
        raise ConfigError(
            "`cost_model` is 'timed', but the weights are partitioned by DeepSpeed ZeRO-3, so layer 0 cannot be "
            "copied and timed. Use cost_model='flops', or plan before the model is partitioned."
        )
    stack = stack if stack is not None else find_layers(base)
    flops = flop_costs(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, stack=stack)
    device, dtype = parameter_device(base, torch.device("cpu")), parameter_dtype(base, torch.float32)
    bench = _LayerBench(base, stack, targets, rank, batch, seq_len)
    jobs = {regime: bench.job(regime) for regime in REGIMES}
    saved = {
        "frozen": _saved_bytes(bench.job("frozen"), bench.exclude),
        "lora": _saved_bytes(bench.job("lora"), bench.exclude),
        "checkpointed": float(bench.hidden.numel() * bench.hidden.element_size()),
        "head": 0.0,
    }
    head_step = _head_job(base, batch, seq_len, device, dtype, bench)
    if head_step is not None:
        jobs["head"], saved["head"] = head_step
    costs = _median_times(jobs, passes, device, bench.reset)
    head_time = costs.pop("head", 0.0)
    bench.reset()
    bench.job("lora")()  # gradients for the optimizer step
    optimizer = torch.optim.AdamW(bench.lora_params, lr=1e-4)
    optimizer_time = _median_times({"step": optimizer.step}, passes, device, lambda: None)["step"]
    return LayerCosts(
        source="timed",
        unit="s",
        shape=[batch, seq_len],
        rank=rank,
        num_layers=stack.num_layers,
        layer=costs,
        head=head_time,
        optimizer_per_param=optimizer_time / max(1, sum(p.numel() for p in bench.lora_params)),
        lora_params_per_layer=flops.lora_params_per_layer,
        memory={
            "source": "measured",
            "weights": flops.memory["weights"],
            "saved": saved,
            "head_transient": flops.memory["head_transient"],
        },
        device=device.type,
        dtype=str(dtype).replace("torch.", ""),
        notes=[f"median of {passes} timed rounds (regimes and head in turn) of a copy of layer 0, after one warm-up"],
    )


class _LayerBench:
    """Two frozen copies of layer 0, one with LoRA on the targets, the inputs layer 0 gets, and a job per regime."""

    def __init__(
        self, base: nn.Module, stack: LayerStack, targets: list[str] | None, rank: int, batch: int, seq_len: int
    ) -> None:
        args, self.kwargs = capture_layer_inputs(base, stack, batch, seq_len)
        self.hidden, self.rest = args[0], args[1:]
        self.plain = _plain_copy(stack.layers[0])
        self.lora = _lora_copy(self.plain, list(lora_shapes(stack, targets)), rank)
        self.lora_params = [p for p in self.lora.parameters() if p.requires_grad]
        self.generator = torch.Generator().manual_seed(1)
        self.upstream = torch.randn(self.hidden.shape, generator=self.generator).to(
            device=self.hidden.device, dtype=self.hidden.dtype
        )
        #: storages that are not activations: parameters and the layer inputs
        self.exclude = {p.untyped_storage().data_ptr() for p in [*self.plain.parameters(), *self.lora.parameters()]}
        self.exclude |= {
            t.untyped_storage().data_ptr() for t in (self.hidden, *self.rest) if isinstance(t, torch.Tensor)
        }

    def job(self, regime: str) -> Callable[[], None]:
        """One forward (and backward to the layer input, unless skipped) of the right copy in ``regime``."""
        from torch.utils.checkpoint import checkpoint

        layer = self.lora if regime.startswith("lora") else self.plain
        kind, ckpt = regime.removesuffix("_ckpt"), regime.endswith("_ckpt")
        hidden, rest, kwargs = self.hidden, self.rest, self.kwargs

        def fn() -> None:
            if kind == "skip":
                with torch.no_grad():
                    layer(hidden, *rest, **kwargs)
                return
            x = hidden.detach().requires_grad_(kind != "lora_first")
            out = checkpoint(layer, x, *rest, use_reentrant=False, **kwargs) if ckpt else layer(x, *rest, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.backward(self.upstream)

        return fn

    def reset(self) -> None:
        for p in self.lora_params:
            p.grad = None


def _head_job(
    base: nn.Module, batch: int, seq_len: int, device: torch.device, dtype: torch.dtype, bench: _LayerBench
) -> tuple[Callable[[], None], float] | None:
    """The output head's forward, loss and backward on random features, and the bytes it saves (``None`` without a
    linear head)."""
    head_module = output_head(base)
    if head_module is None:
        return None
    weight = head_module.weight.detach()
    bias = head_module.bias.detach() if head_module.bias is not None else None
    vocab = weight.shape[0]
    features = torch.randn(batch, seq_len, weight.shape[1], generator=bench.generator).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (batch * seq_len,), generator=bench.generator).to(device)

    def head_step() -> None:
        x = features.detach().requires_grad_(True)
        logits = torch.nn.functional.linear(x, weight, bias)
        torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), labels).backward()

    return head_step, _saved_bytes(head_step, bench.exclude | {weight.untyped_storage().data_ptr()})


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
    """``flop_costs``, ``measure_costs`` or ``fitted_costs`` by ``source``."""
    if source == "fitted":
        from .fitted import fitted_costs

        return fitted_costs(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, stack=stack)
    if source == "timed":
        return measure_costs(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, stack=stack)
    return flop_costs(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, stack=stack)
