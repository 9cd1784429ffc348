"""Costs fitted from whole-model training steps timed on the model's own device (``cost_model="fitted"``).

A step costs a fixed part, plus a cost for every layer carrying LoRA, plus a cost for every layer back-propagated:

    t = F + c_lora · n_lora + c_bp · n_bp

(``n_bp``: every layer for stock PEFT with the embedding output requiring grad; the layers from the lowest adapted
one up with loraplan's truncated backward). Three layouts of the model itself, each a few real steps (forward,
backward and AdamW) with a temporary LoRA on the target modules, give the three costs for each checkpointing setting:
LoRA on every layer, LoRA on the top half back-propagating every layer, and the top half with the layers below it
run without autograd. Unlike the timed copy of layer 0 (:mod:`.timing`), this prices what a GPU step really costs:
a LoRA module's many small kernels and the optimizer's per-tensor work, which its FLOPs miss.

On the H200 table of ``docs/speed.md`` the structure, fitted on those three rows, predicts every other row within
1.1 % (``tests/test_cost.py``): an offline replay of recorded steps. The model timing its own layouts on a GPU, and a
``time_budget`` plan made with it measured against its budget there, are still owed to a GPU run; on the 2-core CPU
it holds within 8.4 % on every row of ``docs/speed.md`` and a 0.6 budget measured 0.56x. Peak memory is the FLOPs
model's estimate. The model is left as it was.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import LayerStack, find_layers, parameter_device, target_modules_of, text_config, unwrap
from .flops import flop_costs
from .prediction import LayerCosts

__all__ = ["LAYOUTS", "fit_step_costs", "fitted_costs", "layer_costs_from_fit", "paired_times"]

#: the layouts timed: (name, LoRA on the top half only, truncated backward)
LAYOUTS = (("all layers", False, False), ("top half, stock", True, False), ("top half, truncated", True, True))


def fit_step_costs(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """``(F, c_lora, c_bp)`` from ``(n_lora, n_bp, seconds)`` samples by least squares (exact for three
    independent ones)."""
    if len(samples) < 3:
        raise ValueError(f"three or more timed layouts are needed to fit the step costs, got {len(samples)}")
    design = torch.tensor([[1.0, float(n), float(b)] for n, b, _ in samples], dtype=torch.float64)
    times = torch.tensor([[t] for _, _, t in samples], dtype=torch.float64)
    solution = torch.linalg.lstsq(design, times).solution.flatten().tolist()
    return float(solution[0]), float(solution[1]), float(solution[2])


def layer_costs_from_fit(
    fits: dict[bool, tuple[float, float, float]], template: LayerCosts, samples: dict[str, Any]
) -> LayerCosts:
    """:class:`LayerCosts` whose regimes carry the fitted costs (``fits``: checkpointing -> ``(F, c_lora, c_bp)``):
    a skipped layer costs nothing beyond the fixed part, a back-propagated one ``c_bp``, one with LoRA
    ``c_bp + c_lora`` (the optimizer's work included); memory from ``template`` (the FLOPs model)."""
    layer: dict[str, float] = {"skip": 0.0}
    for checkpointing, suffix in ((False, ""), (True, "_ckpt")):
        _, lora, backprop = fits[checkpointing]
        layer["frozen" + suffix] = backprop
        layer["lora" + suffix] = backprop + lora
        layer["lora_first" + suffix] = backprop + lora
    return LayerCosts(
        source="fitted",
        unit="s",
        shape=list(template.shape),
        rank=template.rank,
        num_layers=template.num_layers,
        layer={name: layer[name] for name in template.layer},
        head=fits[False][0],
        head_checkpointing=fits[True][0],
        optimizer_per_param=0.0,  # in c_lora: the optimizer's work grows with the layers carrying LoRA
        lora_params_per_layer=template.lora_params_per_layer,
        memory=template.memory,
        device=template.device,
        dtype=template.dtype,
        notes=[
            "fitted from whole-model steps timed on this device: t = F + c_lora n_lora + c_bp n_bp; peak memory "
            "estimated from shapes",
            *template.notes,
        ],
        samples=samples,
    )


def fitted_costs(
    model: nn.Module,
    *,
    targets: list[str] | None,
    rank: int,
    batch: int,
    seq_len: int,
    stack: LayerStack | None = None,
    steps: int = 5,
    warmup: int = 1,
) -> LayerCosts:
    """Time the three layouts (:data:`LAYOUTS`) with and without checkpointing, ``warmup`` + ``steps`` rounds of
    one real training step each (the layouts taking turns, :func:`paired_times`), and fit the step costs. The model
    is left as it was: the temporary LoRA, checkpointing, input grads and truncation are all undone."""
    from ..processes import is_partitioned

    base = unwrap(model)
    if is_partitioned(base):
        raise ConfigError(
            "`cost_model` is 'fitted', but the weights are partitioned by DeepSpeed ZeRO-3, so the model cannot be "
            "stepped on its own. Use cost_model='flops', or plan before the model is partitioned."
        )
    stack = stack if stack is not None else find_layers(base)
    if stack.num_layers < 2:
        raise ConfigError("`cost_model` 'fitted' needs a model of two or more layers (it times a top-half layout).")
    template = flop_costs(model, targets=targets, rank=rank, batch=batch, seq_len=seq_len, stack=stack)
    vocab = int(getattr(text_config(base), "vocab_size", 0) or 100)
    device = parameter_device(base, torch.device("cpu"))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    with _Steps(model, base, stack, targets, rank) as bench:
        times = bench.time(ids, steps, warmup)
    half = stack.num_layers - stack.num_layers // 2
    counts = {"all layers": (stack.num_layers, stack.num_layers)}
    counts["top half, stock"] = (half, stack.num_layers)
    counts["top half, truncated"] = (half, half)
    fits = {
        checkpointing: fit_step_costs([(*counts[name], times[(name, checkpointing)]) for name, _, _ in LAYOUTS])
        for checkpointing in (True, False)
    }
    samples = {f"{name}|{'ckpt' if c else 'no-ckpt'}": seconds for (name, c), seconds in times.items()}
    return layer_costs_from_fit(fits, template, samples)


class _Steps:
    """A temporary LoRA on every layer of the model (LoRA-drop's, at ``rank``) and the switches between the layouts;
    everything undone on exit."""

    def __init__(self, model: nn.Module, base: nn.Module, stack: LayerStack, targets: list[str] | None, rank: int):
        self.model, self.base, self.stack, self.targets, self.rank = model, base, stack, targets, rank

    def __enter__(self) -> _Steps:
        from ..calibration.warmup import temporary_adapter

        self.saved = [
            (
                m,
                m.__dict__.get("gradient_checkpointing", _ABSENT),
                m.__dict__.get("_gradient_checkpointing_func", _ABSENT),
            )
            for m in self.base.modules()
        ]
        embeddings = self.base.get_input_embeddings() if hasattr(self.base, "get_input_embeddings") else None
        self.hooks = dict(embeddings._forward_hooks) if embeddings is not None else None
        self.embeddings = embeddings
        layer_targets = [target_modules_of(layer, self.targets) for layer in self.stack.layers]
        self.context = temporary_adapter(
            self.model, self.base, [(None, i) for i in range(self.stack.num_layers)], layer_targets, 0, rank=self.rank
        )
        self.adapted = self.context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        from ..truncate import remove_truncation

        remove_truncation(self.base, self.stack)
        try:
            self.context.__exit__(*exc)
        finally:
            for module, flag, function in self.saved:
                for name, value in (("gradient_checkpointing", flag), ("_gradient_checkpointing_func", function)):
                    if value is _ABSENT:
                        module.__dict__.pop(name, None)
                    else:
                        module.__dict__[name] = value
            if self.embeddings is not None and self.hooks is not None:
                self.embeddings._forward_hooks.clear()
                self.embeddings._forward_hooks.update(self.hooks)

    def _layout(self, top_only: bool, truncated: bool, checkpointing: bool) -> list[nn.Parameter]:
        """Switch the model to a layout; its trainable LoRA parameters."""
        from ..truncate import install_truncation, remove_truncation

        cut = self.stack.num_layers // 2 if top_only else 0
        trainable = []
        for index, wrappers in enumerate(self.adapted):
            for wrapper in wrappers:
                wrapper.enable_adapters(index >= cut)
                for part in (wrapper.lora_A, wrapper.lora_B):
                    for p in part.parameters():
                        p.requires_grad_(index >= cut)
                        if index >= cut:
                            trainable.append(p)
        _checkpointing(self.base, checkpointing)
        self.base.enable_input_require_grads()  # as HF Trainer and TRL do for a PEFT model
        remove_truncation(self.base, self.stack)
        if truncated:
            install_truncation(self.base, cut, self.stack)
        return trainable

    def time(self, ids: torch.Tensor, steps: int, warmup: int) -> dict[tuple[str, bool], float]:
        """The step time of every layout and checkpointing setting, the layouts taking turns (:func:`paired_times`)."""
        device = ids.device
        runs = [(name, top, cut, ckpt) for ckpt in (True, False) for name, top, cut in LAYOUTS]
        optimizers: dict[tuple[str, bool], torch.optim.Optimizer] = {}
        times: dict[tuple[str, bool], list[float]] = {(name, ckpt): [] for name, _, _, ckpt in runs}
        self.base.train()
        with torch.enable_grad():
            for round_index in range(warmup + steps):
                for name, top, cut, ckpt in runs:
                    trainable = self._layout(top, cut, ckpt)
                    if (name, ckpt) not in optimizers:
                        optimizers[(name, ckpt)] = torch.optim.AdamW(trainable, lr=1e-6)
                    optimizer = optimizers[(name, ckpt)]
                    _sync(device)
                    started = time.perf_counter()
                    loss = self.base(input_ids=ids, labels=ids).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    _sync(device)
                    if round_index >= warmup:
                        times[(name, ckpt)].append(time.perf_counter() - started)
        return paired_times(times, reference=(LAYOUTS[0][0], True))


def paired_times(times: dict[Any, list[float]], reference: Any) -> dict[Any, float]:
    """One time per layout from rounds in which every layout ran once: the median of the reference layout's times,
    times the median over the rounds of each layout's time over the reference's in the same round.

    A shared CPU drifts by 10-20 % within a minute; a ratio taken within a round cancels that drift, and the median
    drops a round another process disturbed. (The fastest step of each layout, the estimate before this, put stock
    PEFT's top half 8 % apart between fits of the same model on a 2-core CPU; paired ratios, 4 %.) On a GPU the steps
    agree to well under 1 %, and every estimate is the same."""
    base = times[reference]
    middle = statistics.median(base)
    return {
        key: middle * statistics.median(t / r for t, r in zip(values, base, strict=True))
        for key, values in times.items()
    }


_ABSENT = object()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _checkpointing(base: nn.Module, on: bool) -> None:
    """Non-reentrant activation checkpointing on or off (transformers >= 5.23 names, else the older ones)."""
    if hasattr(base, "activation_checkpointing_enable"):
        if on:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()
        return
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
