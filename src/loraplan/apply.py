"""Realising a plan with PEFT: a `LoraConfig` for a fresh model, narrowing and tying an already wrapped one, and
saving/loading adapters so that stock PEFT reads them and loraplan re-ties them."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError, PlanMismatchError
from .layers import LayerStack, find_layers, unwrap
from .plan import PLAN_FILE, LoraPlan
from .truncate import apply_to_plan

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

logger = logging.getLogger("loraplan")

__all__ = ["apply_plan", "load_adapter", "lora_modules_by_layer", "plan_lora_config", "save_adapter", "tie_share_groups"]


# -- LoraConfig ---------------------------------------------------------------------------------------------------


def _module_names(plan: LoraPlan, base: Any) -> list[str] | None:
    targets = base.target_modules
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets == "all-linear":
            names = plan.layers.get("target_modules")
            if not names:
                raise PlanMismatchError(
                    "the plan does not record the layers' linear modules, so `target_modules='all-linear'` cannot be "
                    "narrowed to its layers; recompute the plan or list the target modules."
                )
            return list(names)
        return None
    return sorted(targets)


def _default_targets(plan: LoraPlan) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = plan.model.get("model_type")
    if model_type in defaults:
        return list(defaults[model_type])
    raise ConfigError(
        f"`target_modules` is not set and PEFT has no default targets for model type {model_type!r}; set "
        "target_modules in the LoraConfig."
    )


def plan_lora_config(plan: LoraPlan, base: LoraConfig) -> LoraConfig:
    """A copy of ``base`` whose ``layers_to_transform``/``layers_pattern`` (or, where the layer container is
    ambiguous or ``target_modules`` is a regex, a ``target_modules`` regex) and ``r`` realise ``plan``.

    Never produces ``layers_to_transform=[]`` (PEFT reads an empty list as "all layers").
    """
    from peft import LoraConfig

    if not isinstance(base, LoraConfig):
        raise ConfigError(f"`base_lora_config` must be a peft.LoraConfig, got {type(base).__name__}.")
    plan.validate()
    if not plan.selected_layers:  # pragma: no cover - validate() refuses it
        raise PlanMismatchError("the plan selects no layer.")
    config = copy.deepcopy(base)
    config.r = plan.resolve_rank(base.r)
    path = plan.layers.get("path") or plan.model.get("layers_path")
    pattern = plan.layers.get("pattern") or (path.rsplit(".", 1)[-1] if path else None)
    if not path or not pattern:
        raise PlanMismatchError("the plan does not record where the layers are (`layers.path`); recompute it.")
    indices = "|".join(str(i) for i in plan.selected_layers)
    names = _module_names(plan, base)
    regex_target = isinstance(base.target_modules, str) and base.target_modules != "all-linear"
    if plan.layers.get("ambiguous") or regex_target:
        layer_prefix = rf"{re.escape(path)}\.(?:{indices})\."
        if regex_target:
            # keep the user's regex, and require the module to sit in a planned layer
            config.target_modules = rf"(?=(?:.*\.)?{layer_prefix})(?:{base.target_modules})"
        else:
            wanted = names if names is not None else _default_targets(plan)
            alternatives = "|".join(re.escape(n) for n in wanted)
            config.target_modules = rf"(?:.*\.)?{layer_prefix}(?:.*\.)?(?:{alternatives})"
        config.layers_to_transform = None
        config.layers_pattern = None
    else:
        if names is not None:
            config.target_modules = names
        config.layers_to_transform = list(plan.selected_layers)
        config.layers_pattern = pattern
    return config


# -- wrapped models -----------------------------------------------------------------------------------------------


def _lora_layer_cls() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def lora_modules_by_layer(
    peft_model: nn.Module, stack: LayerStack | None = None, adapter_name: str | None = None
) -> dict[int, dict[str, nn.Module]]:
    """LoRA-wrapped modules of each layer (relative name -> module), for ``adapter_name`` if given."""
    stack = stack if stack is not None else find_layers(peft_model)
    lora_layer = _lora_layer_cls()
    found: dict[int, dict[str, nn.Module]] = {}
    for index, layer in enumerate(stack.layers):
        modules = {}
        for name, module in layer.named_modules():
            if isinstance(module, lora_layer) and (adapter_name is None or adapter_name in module.lora_A):
                modules[name] = module
        found[index] = modules
    return found


def _adapter(peft_model: nn.Module, adapter_name: str | None) -> str:
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ConfigError(
            f"apply_plan needs a PEFT LoRA model, got {type(peft_model).__name__}. Wrap it first with "
            "peft.get_peft_model(model, plan.to_lora_config(LoraConfig(...))), or use plan.to_lora_config."
        )
    if adapter_name is None:
        active = getattr(peft_model, "active_adapter", None)
        adapter_name = active if isinstance(active, str) else next(iter(configs))
    if adapter_name not in configs:
        raise ConfigError(f"`adapter_name` {adapter_name!r} is not an adapter of this model; it has {sorted(configs)}.")
    peft_type = str(getattr(configs[adapter_name], "peft_type", ""))
    if "LORA" not in peft_type.upper():
        raise ConfigError(f"adapter {adapter_name!r} is {peft_type}, not LoRA; loraplan plans LoRA adapters.")
    return adapter_name


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _fold_delta(module: nn.Module, adapter: str, why: str) -> None:
    """Add a module's current LoRA delta to its base weight before the module is dropped or re-created, so an
    initialisation that leaves B non-zero (PiSSA, OLoRA...) does not change the model's function."""
    if not _b_nonzero(module, module, adapter):
        return
    if module.use_dora.get(adapter, False):
        raise ConfigError(
            f"a DoRA adapter with a non-zero initialisation (`init_lora_weights`) cannot be {why} after wrapping. "
            "Build the model with plan.to_lora_config(...) instead of narrowing it with apply_plan."
        )
    base = module.get_base_layer()
    with torch.no_grad():
        base.weight.add_(module.get_delta_weight(adapter).to(base.weight.dtype))


def _narrow(peft_model: nn.Module, plan: LoraPlan, stack: LayerStack, adapter: str) -> int:
    removed = 0
    selected = set(plan.selected_layers)
    for index, modules in lora_modules_by_layer(peft_model, stack, adapter).items():
        if index in selected:
            continue
        layer = stack.layers[index]
        for name, module in modules.items():
            _fold_delta(module, adapter, "removed from an unplanned layer")
            if set(module.lora_A.keys()) == {adapter}:
                _set_submodule(layer, name, module.get_base_layer())
            else:
                module.delete_adapter(adapter)
            removed += 1
    return removed


def _rerank(peft_model: nn.Module, plan: LoraPlan, stack: LayerStack, adapter: str, config: Any) -> int:
    changed = 0
    for modules in lora_modules_by_layer(peft_model, stack, adapter).values():
        for module in modules.values():
            if module.r[adapter] != config.r:
                _fold_delta(module, adapter, f"re-created at r={config.r}")
                alpha = module.lora_alpha[adapter]
                module.update_layer(adapter, config.r, lora_alpha=alpha, config=config)
                changed += 1
    return changed


def tie_share_groups(
    peft_model: nn.Module,
    plan: LoraPlan,
    adapter_name: str | None = None,
    *,
    verify_equal: bool = False,
    stack: LayerStack | None = None,
) -> int:
    """Make every layer of each share group use the first layer's ``lora_A``/``lora_B`` modules (one tensor).

    Base weights are corrected when an initialisation leaves B non-zero (PiSSA, OLoRA...), so the model's function
    is unchanged by tying. With ``verify_equal`` (re-tying a loaded adapter) the copies must already be equal.
    Returns the number of modules tied.
    """
    adapter = _adapter(peft_model, adapter_name)
    stack = stack if stack is not None else find_layers(peft_model)
    by_layer = lora_modules_by_layer(peft_model, stack, adapter)
    tied = 0
    for group in plan.share_groups:
        leader, members = group[0], group[1:]
        if not by_layer.get(leader):
            raise PlanMismatchError(f"share group {group}: layer {leader} has no LoRA module for adapter {adapter!r}.")
        for name, lead in by_layer[leader].items():
            for member in members:
                other = by_layer.get(member, {}).get(name)
                if other is None:
                    raise PlanMismatchError(
                        f"share group {group}: layer {member} has no LoRA module {name!r} to share with layer {leader}."
                    )
                if other.lora_A[adapter] is lead.lora_A[adapter] and other.lora_B[adapter] is lead.lora_B[adapter]:
                    continue
                for part in ("lora_A", "lora_B"):
                    a, b = getattr(lead, part)[adapter].weight, getattr(other, part)[adapter].weight
                    if a.shape != b.shape:
                        raise PlanMismatchError(
                            f"share group {group}: {part} of {name!r} has shape {tuple(b.shape)} in layer {member} "
                            f"but {tuple(a.shape)} in layer {leader}; only same-shaped modules can share."
                        )
                    if verify_equal and not torch.equal(a.detach().cpu(), b.detach().cpu()):
                        raise PlanMismatchError(
                            f"share group {group}: the saved {part} of {name!r} differs between layers {leader} and "
                            f"{member}, so this adapter was not trained with these groups tied. Load it with stock "
                            "PEFT, or with the plan it was trained with."
                        )
                correct = not verify_equal and _b_nonzero(lead, other, adapter)
                before = other.get_delta_weight(adapter).detach() if correct else None
                other.lora_A[adapter] = lead.lora_A[adapter]
                other.lora_B[adapter] = lead.lora_B[adapter]
                if correct:
                    after = other.get_delta_weight(adapter).detach()
                    with torch.no_grad():
                        other.get_base_layer().weight.add_((before - after).to(other.get_base_layer().weight.dtype))
                tied += 1
    return tied


def _b_nonzero(lead: nn.Module, other: nn.Module, adapter: str) -> bool:
    with torch.no_grad():
        return any(bool(m.lora_B[adapter].weight.detach().abs().max() > 0) for m in (lead, other))


def apply_plan(
    peft_model: PeftModel, plan: LoraPlan, *, adapter_name: str | None = None, truncate_backward: bool = True
) -> PeftModel:
    """Narrow an already wrapped LoRA model to ``plan`` and tie its share groups.

    LoRA is removed from layers the plan does not select, modules are re-created at the plan's rank if it differs
    from the adapter's, every share group is tied to one set of ``lora_A``/``lora_B`` modules, and the adapter's
    config is updated so that ``save_pretrained`` writes an adapter stock PEFT loads with the same structure.
    With ``truncate_backward`` (the default) the layers below the lowest planned layer run without autograd and
    without activation checkpointing (:mod:`loraplan.truncate`; exact, and left off with the reason when something
    below is trainable); ``False`` removes that again. What was done is the last line of ``plan.notes``.
    Call it before any optimizer, DeepSpeed engine or DDP wrapper exists. Returns the same model.
    """
    adapter = _adapter(peft_model, adapter_name)
    stack = find_layers(peft_model)
    plan.validate()
    plan.check_model(peft_model, stack)
    config = plan_lora_config(plan, peft_model.peft_config[adapter])
    if isinstance(peft_model.peft_config[adapter].target_modules, (set, list, tuple)) and not isinstance(
        config.target_modules, str
    ):
        config.target_modules = set(peft_model.peft_config[adapter].target_modules)
    by_layer = lora_modules_by_layer(peft_model, stack, adapter)
    missing = [i for i in plan.selected_layers if not by_layer.get(i)]
    if missing:
        raise PlanMismatchError(
            f"the plan selects layers {missing}, but the model has no LoRA module there for adapter {adapter!r}. "
            "Wrap the model with LoRA on every layer (or at least the planned ones) before apply_plan."
        )
    removed = _narrow(peft_model, plan, stack, adapter)
    reranked = _rerank(peft_model, plan, stack, adapter, config)
    peft_model.peft_config[adapter] = config
    tied = tie_share_groups(peft_model, plan, adapter, stack=stack)
    truncation = apply_to_plan(peft_model, plan, truncate_backward, stack)
    peft_model.loraplan_plan = plan
    logger.info(
        "loraplan: LoRA kept on layers %s (%d modules removed%s), %d modules tied in %d share groups; %s",
        plan.selected_layers,
        removed,
        f", {reranked} re-created at r={config.r}" if reranked else "",
        tied,
        len(plan.share_groups),
        truncation.note(),
    )
    return peft_model


# -- save / load --------------------------------------------------------------------------------------------------


def save_adapter(peft_model: PeftModel, path: str | Path, plan: LoraPlan | None = None, **kwargs: Any) -> Path:
    """``peft_model.save_pretrained(path)`` (a standard PEFT adapter; shared modules are written once per layer)
    plus the plan beside it as ``loraplan.json``."""
    plan = plan if plan is not None else getattr(peft_model, "loraplan_plan", None)
    if plan is None:
        raise ConfigError("no plan to save: pass `plan=` or apply one with apply_plan first.")
    out = Path(path)
    peft_model.save_pretrained(str(out), **kwargs)
    plan.save(out / PLAN_FILE)
    return out


def load_adapter(
    model: nn.Module, path: str | Path, *, adapter_name: str = "default", truncate_backward: bool = True, **kwargs: Any
) -> PeftModel:
    """Load an adapter saved by :func:`save_adapter` (or by a trainer with the plan beside it), re-tie its share
    groups and, with ``truncate_backward``, run the layers below the lowest planned layer without autograd (as
    :func:`apply_plan` does). ``kwargs`` go to ``PeftModel.from_pretrained`` (e.g. ``is_trainable=True``)."""
    from peft import PeftModel

    plan = LoraPlan.load(Path(path) / PLAN_FILE)
    plan.check_model(unwrap(model))
    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, **kwargs)
    tie_share_groups(peft_model, plan, adapter_name, verify_equal=True)
    apply_to_plan(peft_model, plan, truncate_backward)
    peft_model.loraplan_plan = plan
    return peft_model
