"""What :func:`loraplan.apply_plan` refuses before it changes anything: an optimizer, or a DeepSpeed engine, DDP,
FSDP or DataParallel wrapper, built before it and holding LoRA parameters that applying the plan replaces (it would
go on training tensors that are no longer in the model)."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError
from .layout import is_planned
from .narrowing import _rank_changes

if TYPE_CHECKING:
    from .layers import LayerStack
    from .plan import LoraPlan


def _adapter_parameters(module: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The parameters of ``adapter`` in one LoRA layer (its ``lora_A``/``lora_B``, embedding and DoRA entries)."""
    return [p for name, p in module.named_parameters() if adapter in name.split(".") and "base_layer" not in name]


def _parameters_replaced(
    peft_model: nn.Module,
    plan: LoraPlan,
    stacks: list[tuple[LoraPlan, LayerStack, dict[int, dict[str, nn.Module]]]],
    adapter: str,
    config: Any,
) -> dict[int, str]:
    """What :func:`~loraplan.apply_plan` is about to take out of the model (``id`` -> a name for messages): the LoRA
    parameters of the unplanned layers (of every stack), of the modules re-created at another rank, and of the
    share-group members that take their leader's modules. ``stacks``: each stack's plan, the stack and its LoRA layers
    of ``adapter`` (:func:`loraplan.apply.lora_modules_by_layer`). An optimizer that holds any of them was built too
    early."""
    replaced: dict[int, str] = {}

    def add(module: nn.Module, where: str) -> None:
        for p in _adapter_parameters(module, adapter):
            replaced.setdefault(id(p), where)

    for one, stack, by_layer in stacks:
        selected = set(one.adapted_layers)
        for index, modules in by_layer.items():
            if index not in selected:
                for name, module in modules.items():
                    add(module, f"{stack.path}.{index}.{name} (removed: layer {index} is not planned)")
        for group in one.share_groups:
            for member in group[1:]:
                for name, module in by_layer.get(member, {}).items():
                    lead = by_layer.get(group[0], {}).get(name)
                    if lead is None or adapter not in getattr(module, "lora_A", {}):
                        continue
                    if module.lora_A[adapter] is not lead.lora_A[adapter]:
                        add(module, f"{stack.path}.{member}.{name} (tied to layer {group[0]}'s module)")
    for module, r, _ in _rank_changes(peft_model, adapter, config, lambda key: is_planned(plan, key)):
        add(module, f"a LoRA module re-created at r={r}")
    return replaced


#: the wrappers that take a model's parameters over (their own buckets, flat copies, an optimizer inside): built
#: around the model before apply_plan, they would go on with the replaced parameters. Matched by class name, so that
#: DeepSpeed need not be imported to be recognised.
_WRAPPERS = ("DeepSpeedEngine", "DistributedDataParallel", "FullyShardedDataParallel", "DataParallel")


def _refuse_early_wrappers(peft_model: nn.Module, replaced: dict[int, str]) -> None:
    """:class:`ConfigError` when a live DeepSpeed engine, DDP, FSDP (1) or DataParallel wrapper holds ``peft_model``
    and apply_plan would replace some of its parameters."""
    if not replaced:
        return
    for candidate in gc.get_objects():
        name = type(candidate).__name__
        if name in _WRAPPERS and isinstance(candidate, nn.Module) and candidate._modules.get("module") is peft_model:
            raise ConfigError(
                f"`model`: a {name} was built around the model before apply_plan, and applying the plan replaces "
                f"{len(replaced)} of its LoRA parameter(s) ({next(iter(replaced.values()))}); the {name} would go on "
                "training the old ones. Nothing was changed. Call apply_plan(peft_model, plan) on the PEFT model "
                f"first, then build the {name} (and the optimizer) around it."
            )


def _refuse_early_optimizers(replaced: dict[int, str]) -> None:
    """:class:`ConfigError` when a live ``torch.optim.Optimizer`` holds parameters apply_plan would replace: it would
    go on updating tensors that are no longer in the model, and miss the ones that replace them."""

    def holding() -> list[tuple[torch.optim.Optimizer, list[str]]]:
        found = []
        for candidate in gc.get_objects():
            if issubclass(type(candidate), torch.optim.Optimizer):  # type(): no attribute lookup on odd objects
                held = [replaced[id(p)] for g in candidate.param_groups for p in g["params"] if id(p) in replaced]
                if held:
                    found.append((candidate, held))
        return found

    if not replaced or not holding():
        return
    gc.collect()  # an optimizer nobody holds any more is no reason to refuse
    found = holding()
    if found:
        optimizer, held = found[0]
        raise ConfigError(
            f"`optimizer`: an optimizer ({type(optimizer).__name__}) built before apply_plan holds {len(held)} LoRA "
            f"parameter(s) that applying the plan replaces ({held[0]}{' and more' if len(held) > 1 else ''}); it "
            "would update tensors that are no longer in the model and miss the ones that replace them. Nothing was "
            "changed. Call apply_plan(peft_model, plan) first, then build the optimizer from the model's trainable "
            "parameters."
        )
