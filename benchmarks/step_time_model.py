"""The step-time benchmark's model, plans and measured step (benchmarks/step_time.py runs them): the model at the
preset's shape, its CKA plans, one configuration's LoRA layout and checkpointing, and a timed or memory-measured
training step."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SMOLLM2_SHAPE = dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)


@dataclass
class Config:
    """One measured configuration."""

    plan: str
    layers: list[int]
    checkpointing: bool
    mode: str  # "all layers", "stock PEFT", "stock PEFT, input grads off", "loraplan", "limit"
    times: list[float] = field(default_factory=list)
    #: layers that ran without autograd (loraplan's truncation, as installed when the configuration ran)
    truncated: list[int] = field(default_factory=list)
    peak_bytes: float | None = None
    predicted_time: float | None = None
    predicted_memory: float | None = None
    predicted_flops: float | None = None
    predicted_fitted: float | None = None

    @property
    def key(self) -> str:
        return f"{self.plan}|{self.mode}|{'ckpt' if self.checkpointing else 'no-ckpt'}"


# -- the model and the plans ----------------------------------------------------------------------------------------


def build_model(settings: dict[str, Any]):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, settings["dtype"])
    source = "random init"
    if settings["model"] == "smollm2":
        try:
            from loraplan.assets import smollm2_path

            path = smollm2_path(quiet=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            return model, f"SmolLM2-135M-Instruct (real weights, {path})", path
        except Exception as exc:  # noqa: BLE001 - the shape is what matters for speed; say what was used
            print(f"step_time: SmolLM2 is not available ({exc}); timing its shape at random init", file=sys.stderr)
            settings = {**settings, **SMOLLM2_SHAPE}
            source = "SmolLM2-135M shape, random init"
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=settings["hidden"],
        intermediate_size=settings["intermediate"],
        num_attention_heads=settings["heads"],
        num_key_value_heads=settings["kv_heads"],
        num_hidden_layers=settings["layers"],
        vocab_size=settings["vocab"],
        max_position_embeddings=max(2048, settings["seq_len"]),
        tie_word_embeddings=settings["model"] == "smollm2",
    )
    model = LlamaForCausalLM(config).to(dtype)
    name = {"tiny": "tiny Llama", "tinyllama": "TinyLlama-1.1B shape", "llama8b": "Llama-3-8B shape"}.get(
        settings["model"], source
    )
    return model, f"{name} ({settings['layers']} layers, d={settings['hidden']}, random init)", None


def calibration_data(settings: dict[str, Any], model_path: Any, vocab: int):
    """Real reviews through the real tokenizer when the model is real, else random tokens."""
    if model_path is not None:
        from transformers import AutoTokenizer

        from loraplan.assets import fine_foods

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        texts = [r["text"] for r in fine_foods("train")[: settings["cka_samples"]]]
        return texts, tokenizer, f"the first {len(texts)} Fine Foods training reviews"
    g = torch.Generator().manual_seed(0)
    n, length = settings["cka_samples"], settings["cka_max_length"]
    batches = [
        {
            "input_ids": torch.randint(3, vocab, (8, length), generator=g),
            "attention_mask": torch.ones(8, length, dtype=torch.long),
        }
        for _ in range(max(1, n // 8))
    ]
    return batches, None, f"{n} random token sequences"


def make_plans(model, settings: dict[str, Any], model_path: Any, time_budget: float | None):
    from loraplan import PlanConfig, make_plan

    data, tokenizer, described = calibration_data(settings, model_path, model.config.vocab_size)
    common = dict(
        calibration_samples=settings["cka_samples"],
        max_length=settings["cka_max_length"],
        batch_size=8,
        target_modules=ALL_TARGETS,
        cost_shape=[settings["batch"], settings["seq_len"]],
        stability=False,
    )
    model.to(settings["device"])
    plans = {}
    # the fixed baselines ignore the data: a minimal calibration pass is enough for them
    fixed = {**common, "calibration_samples": 8, "max_length": 16}
    for name, selector in (("top half", "top"), ("bottom half", "bottom"), ("every other", "every_other")):
        plans[name] = make_plan(
            model,
            data,
            PlanConfig(selector=selector, ratio=0.5, **fixed),
            tokenizer,
            lora_rank=settings["rank"],
            progress=False,
        )
    plans["CKA"] = make_plan(
        model,
        data,
        PlanConfig(selector="cka", ratio=0.5, **common),
        tokenizer,
        lora_rank=settings["rank"],
        progress=False,
    )
    if time_budget is not None:
        # the fitted cost model: whole-model steps timed on this device (what holds on a GPU; docs/speed.md)
        config = PlanConfig(selector="cka", time_budget=time_budget, cost_model="fitted", **common)
        plans[f"CKA, time_budget={time_budget}"] = make_plan(
            model, data, config, tokenizer, lora_rank=settings["rank"], progress=False
        )
    return plans, described


def shared_copy(model):
    """A second module tree over the same parameter and buffer tensors (no extra weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


# -- switching a model between configurations -----------------------------------------------------------------------


def _checkpointing(model):
    """``(is_on, enable(non_reentrant), disable)`` under the transformers >= 5.23 names, else under the older
    ``gradient_checkpointing`` ones (the GPU machine ships transformers 5.17)."""
    if hasattr(model, "activation_checkpointing_enable"):
        return (
            lambda: model.is_activation_checkpointing,
            lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}),
            model.activation_checkpointing_disable,
        )
    return (
        lambda: model.is_gradient_checkpointing,
        lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}),
        model.gradient_checkpointing_disable,
    )


#: attribute on a layer the hand-made limit wrapped: its own forward and its checkpointing flag, to restore
_LIMIT = "_step_time_limit"


def _limit(peft_model, lowest: int | None) -> None:
    """The hand-made limit of "no autograd below the cut": the blocks below ``lowest`` run their forward under
    ``torch.no_grad()`` with their checkpointing off; ``None`` undoes it. No checks, no hooks: what loraplan's
    truncation is measured against."""
    from loraplan.layers import find_layers

    for index, layer in enumerate(find_layers(peft_model).layers):
        saved = layer.__dict__.pop(_LIMIT, None)
        if saved is not None:
            del layer.forward  # the class's forward again
            layer.gradient_checkpointing = saved
        if lowest is None or index >= lowest:
            continue
        layer.__dict__[_LIMIT] = getattr(layer, "gradient_checkpointing", False)
        layer.gradient_checkpointing = False
        forward = type(layer).forward.__get__(layer)

        def no_grad_forward(*args, _forward=forward, **kwargs):
            with torch.no_grad():
                return _forward(*args, **kwargs)

        layer.forward = no_grad_forward


def configure(peft_model, plan, config: Config) -> None:
    from loraplan import apply_plan, remove_truncation

    _limit(peft_model, None)
    base = peft_model.base_model.model
    base.disable_input_require_grads()
    is_on, enable, disable = _checkpointing(base)
    if config.checkpointing:
        if not is_on():
            enable()
        else:
            base.enable_input_require_grads()
    else:
        if is_on():
            disable()
        if config.mode not in ("stock PEFT, input grads off", "all layers"):
            base.enable_input_require_grads()
    if config.mode == "loraplan":
        apply_plan(peft_model, plan)
    else:
        remove_truncation(peft_model)
    if config.mode == "limit":  # the layers above the cut keep their checkpointing; below, _limit turns it off
        _limit(peft_model, min(config.layers))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model, optimizer, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def static_bytes(model, optimizer) -> float:
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return float(sum(seen.values()))


def peak_step_bytes(model, optimizer, batch, device: str) -> float:
    """Bytes alive at the start of a step plus the peak growth during it."""
    base = static_bytes(model, optimizer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, batch)
        torch.cuda.synchronize()
        return base + torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, optimizer, batch)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return base + peak
