"""Realising a plan with PEFT: narrowing and tying an already wrapped model, and saving/loading adapters so that
stock PEFT reads them and loraplan re-ties them. Where LoRA may sit, and the `LoraConfig` that says so, is
:mod:`loraplan.layout`; taking LoRA out and re-creating it at another rank is :mod:`loraplan.narrowing`, and what
apply_plan refuses before it changes anything (an optimizer or wrapper built too early) :mod:`loraplan.apply_guards`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .apply_guards import _parameters_replaced, _refuse_early_optimizers, _refuse_early_wrappers
from .card import attach_card
from .errors import ConfigError, PlanMismatchError
from .layers import LayerStack, find_layers, stack_at
from .layout import plan_lora_config, planned_config
from .narrowing import _b_nonzero, _narrow, _rerank
from .plan import PLAN_FILE, LoraPlan
from .quantized import refuse_repacked
from .sites import (
    Site,
    adapters_of,
    layer_index,
    layers_carrying,
    lora_sites,
    reached_sites,
    show_all,
    summarise_sites,
)
from .truncate import NOTE_PREFIX, Truncation, disable_truncation, install_truncation

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger("loraplan")

__all__ = [
    "adapter_of",
    "apply_plan",
    "check_layout",
    "load_adapter",
    "lora_modules_by_layer",
    "plan_lora_config",
    "plan_stack",
    "save_adapter",
    "tie_share_groups",
]


# -- wrapped models -----------------------------------------------------------------------------------------------

#: prefix of the plan note that lists the LoRA apply_plan kept outside the planned stack
OUTSIDE_NOTE = "LoRA outside the layer stack:"


def plan_stack(model: nn.Module, plan: LoraPlan) -> LayerStack:
    """The model's layer stack where ``plan`` found it. No plugin is asked again, so a stack that a plugin on the
    planner's manager found is found here too."""
    return stack_at(model, plan.stack_path) if plan.stack_path else find_layers(model)


def lora_modules_by_layer(
    peft_model: nn.Module, stack: LayerStack | None = None, adapter_name: str | None = None
) -> dict[int, dict[str, nn.Module]]:
    """LoRA layers of each layer of the stack (relative name -> module), for ``adapter_name`` if given. Nested
    parameter wrappers (``target_parameters``) appear under their own names (``mlp.experts``,
    ``mlp.experts.base_layer``)."""
    from peft.tuners.lora import LoraLayer

    stack = stack if stack is not None else find_layers(peft_model)
    found: dict[int, dict[str, nn.Module]] = {}
    for index, layer in enumerate(stack.layers):
        found[index] = {
            name: module
            for name, module in layer.named_modules()
            if isinstance(module, LoraLayer)
            and (adapters := adapters_of(module))
            and (adapter_name is None or adapter_name in adapters)
        }
    return found


def adapter_of(peft_model: nn.Module, adapter_name: str | None) -> str:
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
    adapter = adapter_of(peft_model, adapter_name)
    if plan.stacks and stack is None:  # an encoder-decoder model's plan: each stack's groups in that stack
        return sum(tie_share_groups(peft_model, one, adapter, verify_equal=verify_equal) for one in plan.stacks)
    stack = stack if stack is not None else plan_stack(peft_model, plan)
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
                if adapter not in lead.lora_A:
                    raise ConfigError(
                        f"share group {group}: {name!r} is a LoRA {type(lead).__name__} without lora_A/lora_B "
                        "modules (an embedding); loraplan ties linear LoRA modules only. Leave it out of "
                        "target_modules, or set `share` to None."
                    )
                if other.lora_A[adapter] is lead.lora_A[adapter] and other.lora_B[adapter] is lead.lora_B[adapter]:
                    continue
                for part in ("lora_A", "lora_B"):
                    a, b = getattr(lead, part)[adapter].weight, getattr(other, part)[adapter].weight
                    if a.shape != b.shape:
                        raise PlanMismatchError(
                            f"share group {group}: {part} of {name!r} has shape {tuple(b.shape)} in layer {member} "
                            f"but {tuple(a.shape)} in layer {leader}; only same-shaped modules can share (a "
                            "layer-specific `rank_pattern` entry gives them different ranks)."
                        )
                    if verify_equal and not torch.equal(a.detach().cpu(), b.detach().cpu()):
                        raise PlanMismatchError(
                            f"share group {group}: the saved {part} of {name!r} differs between layers {leader} and "
                            f"{member}, so this adapter was not trained with these groups tied. Load it with stock "
                            "PEFT, or with the plan it was trained with."
                        )
                correct = not verify_equal and (_b_nonzero(lead, adapter) or _b_nonzero(other, adapter))
                before = other.get_delta_weight(adapter).detach() if correct else None
                other.lora_A[adapter] = lead.lora_A[adapter]
                other.lora_B[adapter] = lead.lora_B[adapter]
                if correct:
                    after = other.get_delta_weight(adapter).detach()
                    with torch.no_grad():
                        other.get_base_layer().weight.add_((before - after).to(other.get_base_layer().weight.dtype))
                tied += 1
    return tied


def check_layout(peft_model: nn.Module, adapter: str, config: Any, what: str) -> None:
    """:class:`PlanMismatchError` unless the adapter's LoRA sits exactly where ``config`` puts it."""
    have = set(lora_sites(peft_model, adapter))
    want = reached_sites(peft_model, config)
    if have != want:
        parts = []
        if have - want:
            parts.append(f"LoRA on {show_all(have - want)}, which its config does not reach")
        if want - have:
            parts.append(f"no LoRA on {show_all(want - have)}, which its config reaches")
        raise PlanMismatchError(
            f"adapter {adapter!r} has " + " and ".join(parts) + f" ({what}). Something changed the LoRA modules "
            "without updating the adapter's LoraConfig, so a saved adapter would not reload as it trained. Wrap the "
            "model with peft.get_peft_model (or TRL's peft_config) and leave its LoRA modules to loraplan."
        )


def _record_outside(plan: LoraPlan, sites: set[Site], paths: list[str]) -> list[str]:
    """Note (in the plan and the log) the LoRA that the user's config puts outside the planned stack(s)."""
    outside = summarise_sites(
        {(kind, name) for kind, name in sites if all(layer_index(name, path) is None for path in paths)}
    )
    plan.notes = [n for n in plan.notes if not n.startswith(OUTSIDE_NOTE)]
    if outside:
        covered = " and ".join(f"`{path}`" for path in paths)
        plan.notes.append(
            f"{OUTSIDE_NOTE} {', '.join(outside)} keep LoRA as the LoraConfig says (the plan covers {covered} only); "
            "they are in the saved adapter config. Leave them out with LoraConfig(exclude_modules=...)."
        )
    return outside


#: why a decoder below its lowest adapted layer is back-propagated when the encoder carries LoRA
_ENCODER_GRADIENT = (
    "the encoder carries LoRA, and its gradient reaches it through the cross-attention of every decoder layer, so "
    "every decoder layer is back-propagated"
)


def _truncate_for_plan(
    model: nn.Module, plan: LoraPlan, enabled: bool, stacks: list[tuple[LoraPlan, LayerStack]] | None = None
) -> list[Truncation]:
    """Install (or, with ``enabled=False``, remove) truncation below the lowest planned layer of each stack, and
    record what was done in ``plan.notes`` (a line per stack, replaced when the plan is applied again).

    An encoder-decoder model: the encoder's layers below its lowest adapted layer (all of them when it has no LoRA)
    run without autograd, since the decoder needs the encoder's output and not its gradient; the decoder's are
    truncated the same way only when the encoder carries no LoRA (else its gradient flows through them)."""
    if stacks is None:
        stacks = [(one, plan_stack(model, one)) for one in plan.stack_plans()]
    encoder_adapted = len(stacks) > 1 and bool(stacks[0][0].adapted_layers)
    results = []
    for position, (one, stack) in enumerate(stacks):
        name = str(one.stack.name or "") if plan.stacks else ""
        lowest = min(one.adapted_layers) if one.adapted_layers else stack.num_layers
        if not enabled:
            results.append(disable_truncation(model, lowest, stack, name))
        elif position > 0 and encoder_adapted:
            results.append(disable_truncation(model, lowest, stack, name, reason=_ENCODER_GRADIENT))
        else:
            results.append(install_truncation(model, lowest, stack, name))
    plan.notes = [n for n in plan.notes if not n.startswith(NOTE_PREFIX)] + [r.note() for r in results]
    return results


def apply_plan(
    peft_model: PeftModel, plan: LoraPlan, *, adapter_name: str | None = None, truncate_backward: bool = True
) -> PeftModel:
    """Narrow a LoRA model to ``plan`` and tie its share groups.

    The model is one wrapped with the user's own ``LoraConfig`` (any targets: a list, a regex, ``"all-linear"``,
    ``target_parameters``; any ``rank_pattern``/``alpha_pattern``, ``modules_to_save``, DoRA...), or one wrapped with
    ``plan.to_lora_config(...)``. The user's targets decide what carries LoRA, the plan where in its layer stack:
    LoRA is removed from the stack's unplanned layers, kept on every target in the planned ones and, as the config
    says, outside the stack (listed in ``plan.notes`` and the log). Modules are re-created where the plan's rank
    policy changes a rank, every share group is tied to one set of ``lora_A``/``lora_B`` modules, and the adapter's
    config is rewritten (:func:`loraplan.layout.plan_lora_config`) so that ``save_pretrained`` writes an adapter that
    stock PEFT loads with exactly this structure; the result is checked against what PEFT builds from that config.
    Targets that reach a second text stack (encoder-decoder models) are refused before anything changes.

    With ``truncate_backward`` (the default) the layers below the lowest planned layer run without autograd and
    without activation checkpointing (:mod:`loraplan.truncate`; exact, and left off with the reason when something
    below is trainable); ``False`` removes that again. What was done is in the last lines of ``plan.notes``.
    Call it before any optimizer, DeepSpeed engine or DDP wrapper exists: it removes, re-creates and ties LoRA
    parameters, and an optimizer built earlier would hold the old ones (a live one that does is refused, before
    anything changes, and so is a DeepSpeed engine, DDP, FSDP or DataParallel wrapper around the model). Applying
    the same plan again changes nothing. Returns the same model.
    """
    adapter = adapter_of(peft_model, adapter_name)
    plan.validate()
    refuse_repacked(peft_model)
    stacks = [(one, plan_stack(peft_model, one)) for one in plan.stack_plans()]
    for one, stack in stacks:
        one.check_model(peft_model, stack)
    current = peft_model.peft_config[adapter]
    check_layout(peft_model, adapter, current, "before the plan was applied")
    for one, stack in stacks:
        carried = layers_carrying(peft_model, adapter, stack.path)
        missing = [i for i in one.adapted_layers if i not in carried]
        if missing:
            raise PlanMismatchError(
                f"the plan adapts layers {missing} of `{stack.path}`, but the model has no LoRA module there for "
                f"adapter {adapter!r}. Wrap the model with LoRA on every layer (or at least the planned ones) before "
                "apply_plan."
            )
    config, wanted = planned_config(plan, current, model=peft_model)  # refuses a text stack the plan does not cover
    by_stack = [(one, stack, lora_modules_by_layer(peft_model, stack, adapter)) for one, stack in stacks]
    replaced = _parameters_replaced(peft_model, plan, by_stack, adapter, config)
    _refuse_early_optimizers(replaced)
    _refuse_early_wrappers(peft_model, replaced)
    removed = sum(
        _narrow(one, stack, lora_modules_by_layer(peft_model, stack, adapter), adapter) for one, stack in stacks
    )
    reranked = _rerank(peft_model, adapter, config)
    peft_model.peft_config[adapter] = config
    tied = sum(tie_share_groups(peft_model, one, adapter, stack=stack) for one, stack in stacks)
    # the config gives LoRA exactly `wanted` (planned_config checked that), so this is: LoRA where it must be
    check_layout(peft_model, adapter, config, "after the plan was applied")
    assert wanted is not None  # planned_config returns the sites whenever it is given the model
    outside = _record_outside(plan, wanted, [stack.path for _, stack in stacks])
    truncations = _truncate_for_plan(peft_model, plan, truncate_backward, stacks)
    peft_model.loraplan_plan = plan
    attach_card(peft_model)
    logger.info(
        "loraplan: LoRA kept on layers %s (%d modules removed%s), %d modules tied in %d share groups%s; %s",
        "; ".join(f"{stack.path}: {one.adapted_layers}" for one, stack in stacks)
        if plan.stacks
        else plan.adapted_layers,
        removed,
        f", {reranked} re-created at the planned rank" if reranked else "",
        tied,
        len(plan.share_groups),
        f"; outside the stack, as the LoraConfig says: {', '.join(outside)}" if outside else "",
        " ".join(t.note() for t in truncations),
    )
    return peft_model


# -- save / load --------------------------------------------------------------------------------------------------


def save_adapter(peft_model: PeftModel, path: str | Path, plan: LoraPlan | None = None, **kwargs: Any) -> Path:
    """``peft_model.save_pretrained(path)`` (a standard PEFT adapter; shared modules are written once per layer)
    plus the plan beside it as ``loraplan.json``. The model card (``README.md``) gets a ``loraplan`` section and tag,
    as on every ``save_pretrained`` of a planned model (:mod:`loraplan.card`)."""
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
    stacks = [(one, plan_stack(model, one)) for one in plan.stack_plans()]
    for one, stack in stacks:
        one.check_model(model, stack)
    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, **kwargs)
    for one, stack in stacks:
        carried = layers_carrying(peft_model, adapter_name, stack.path)
        if carried != one.adapted_layers:
            raise PlanMismatchError(
                f"the adapter at {path} has LoRA in layers {carried} of `{stack.path}`, but the plan beside it "
                f"adapts {one.adapted_layers}: the two do not belong together. Load it with stock PEFT, or put the "
                "plan it was trained with beside it."
            )
        tie_share_groups(peft_model, one, adapter_name, verify_equal=True, stack=stack)
    _truncate_for_plan(peft_model, plan, truncate_backward, stacks)
    peft_model.loraplan_plan = plan
    attach_card(peft_model)
    return peft_model
