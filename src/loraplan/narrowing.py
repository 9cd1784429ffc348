"""Taking LoRA out of an already wrapped model, and re-creating it at another rank, without changing what the model
computes: :func:`loraplan.apply_plan` removes the adapter from the unplanned layers (:func:`_narrow`) and re-creates
the modules whose rank or alpha the plan changes (:func:`_rerank`). A module whose initialisation leaves B non-zero
(PiSSA, OLoRA...) has its delta added to the base weight first."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError
from .sites import adapters_of, lora_sites

if TYPE_CHECKING:
    from .layers import LayerStack
    from .plan import LoraPlan


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _b_nonzero(module: nn.Module, adapter: str) -> bool:
    with torch.no_grad():
        if adapter in module.lora_B:
            return bool(module.lora_B[adapter].weight.detach().abs().max() > 0)
        if adapter in getattr(module, "lora_embedding_B", {}):
            return bool(module.lora_embedding_B[adapter].detach().abs().max() > 0)
    return False


def _fold_delta(module: nn.Module, adapter: str, why: str) -> None:
    """Add a module's current LoRA delta to its base weight before the module is dropped or re-created, so an
    initialisation that leaves B non-zero (PiSSA, OLoRA...) does not change the model's function."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    if not isinstance(module, LoraLayer) or not _b_nonzero(module, adapter):
        return
    if module.use_dora.get(adapter, False) or isinstance(module, ParamWrapper) or adapter not in module.lora_A:
        raise ConfigError(
            f"`init_lora_weights`: a LoRA module with a non-zero initialisation ({type(module).__name__}"
            f"{', DoRA' if module.use_dora.get(adapter, False) else ''}) cannot be {why} after wrapping. Build the "
            "model with plan.to_lora_config(...) instead of narrowing it with apply_plan."
        )
    base = module.get_base_layer()
    with torch.no_grad():
        base.weight.add_(module.get_delta_weight(adapter).to(base.weight.dtype))


def _wrapper_chain(module: nn.Module) -> list[nn.Module]:
    """A LoRA layer and the LoRA layers it wraps (parameter wrappers nest, one per targeted parameter)."""
    from peft.tuners.lora import LoraLayer

    chain = [module]
    while isinstance(getattr(chain[-1], "base_layer", None), LoraLayer):
        chain.append(chain[-1].base_layer)
    return chain


def _narrow(plan: LoraPlan, stack: LayerStack, by_layer: dict[int, dict[str, nn.Module]], adapter: str) -> int:
    """Remove ``adapter`` from the layers of ``stack`` that ``plan`` does not select; ``by_layer`` is the stack's LoRA
    layers of ``adapter`` (:func:`loraplan.apply.lora_modules_by_layer`). Returns the number of sites removed."""
    removed = 0
    selected = set(plan.adapted_layers)
    for index, modules in by_layer.items():
        if index in selected:
            continue
        layer = stack.layers[index]
        handled: list[str] = []
        for name in sorted(modules):  # an outer wrapper sorts before the wrappers nested in it
            if any(name.startswith(done + ".") for done in handled):
                continue
            handled.append(name)
            chain = [m for m in _wrapper_chain(modules[name]) if adapter in adapters_of(m)]
            for module in chain:
                _fold_delta(module, adapter, "removed from an unplanned layer")
            if all(adapters_of(m) <= {adapter} for m in _wrapper_chain(modules[name])):
                _set_submodule(layer, name, modules[name].get_base_layer())
            else:
                for module in chain:
                    module.delete_adapter(adapter)
            removed += len(chain)
    return removed


def _rank_changes(
    peft_model: nn.Module, adapter: str, config: Any, keep: Callable[[str], bool] = lambda name: True
) -> list[tuple[nn.Module, int, Any]]:
    """The LoRA layers (among the sites ``keep`` accepts) whose rank or alpha differs from what ``config`` gives them
    (PEFT's own pattern rule), with the rank and alpha it gives."""
    from peft.utils.other import get_pattern_key

    changes = []
    for (_, key), module in lora_sites(peft_model, adapter).items():
        if not keep(key):
            continue
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
        if module.r[adapter] != r or module.lora_alpha[adapter] != alpha:
            changes.append((module, r, alpha))
    return changes


def _rerank(peft_model: nn.Module, adapter: str, config: Any) -> int:
    """Re-create every LoRA layer whose rank or alpha differs from what ``config`` gives it, so that the model is
    what stock PEFT builds from the saved config. Returns how many were re-created."""
    changes = _rank_changes(peft_model, adapter, config)
    for module, r, alpha in changes:
        _fold_delta(module, adapter, f"re-created at r={r}")
        module.update_layer(adapter, r, lora_alpha=alpha, config=config)
    return len(changes)
