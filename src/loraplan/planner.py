"""`make_plan`: calibrate, score, allocate, record every decision in a :class:`LoraPlan`, adjust it, price it.

Each phase is one call (:mod:`loraplan.plan_steps` holds the steps, :mod:`loraplan.allocation` the decision), so
that :func:`make_plan` reads in the order it plans. An encoder-decoder model (:func:`make_stacks_plan`) is
calibrated in one pass and every layer stack planned on its own, the stacks then combined into one plan
(:mod:`loraplan.plan_stacks`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .allocation import allocate, score
from .calibration import ACTIVATIONS, HIDDEN, calibrate, calibrate_stacks
from .config import PlanConfig
from .errors import ConfigError
from .hooks.manager import get_plugin_manager
from .layers import LayerStack, find_stacks, stack_role, target_modules_of, unwrap
from .layout import other_stacks_reached
from .plan import LoraPlan, fingerprint
from .plan_stacks import combine
from .plan_steps import (
    NOT_PRICED,
    Strategies,
    adjust,
    calibration_batches,
    calibration_record,
    check_data_free,
    check_strategies,
    cost_model,
    data_free_stats,
    final,
    linear_targets,
    lora_rank_of,
    price,
    record,
    refuse_stacks,
    resolve_targets,
    settings_of,
    strategies_for,
    targets_from,
    versions,
    weights_of,
)
from .quantized import training_numerics
from .strategies import WEIGHTS

if TYPE_CHECKING:
    import pluggy
    from torch import nn

logger = logging.getLogger("loraplan")

__all__ = [
    "Strategies",
    "check_strategies",
    "make_plan",
    "make_stacks_plan",
    "resolve_targets",
    "strategies_for",
    "versions",
]


def make_plan(
    model: nn.Module,
    calibration_data: Any,
    config: PlanConfig | dict | None = None,
    tokenizer: Any = None,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    lora_rank: int | None = None,
    progress: bool = True,
    processor: Any = None,
) -> LoraPlan:
    """Calibrate ``model`` on ``calibration_data`` and decide which layers get LoRA and which share it.

    Args:
        model: a transformers model, unwrapped (a PEFT-wrapped model is calibrated as its base model).
        calibration_data: texts (with ``tokenizer``), a ``datasets.Dataset`` with a text column, records with
            ``config.text_field``, or an iterable of tokenised batches (``input_ids``, ``attention_mask``, and
            ``pixel_values`` for images); rows with an image (``config.image_field``) and a text need ``processor``
            (docs/methods.md, "Multimodal (images)").
        config: a :class:`PlanConfig` or a dict of its settings.
        tokenizer: tokenises text data.
        plugin_manager: the manager to take strategies from (default: :func:`get_plugin_manager`).
        lora_rank: the LoRA config's ``r``, to resolve ``plan.rank`` now (else it is resolved when applied).
        progress: show a progress bar.
        processor: a multimodal processor (LLaVA-style): turns rows with an image (``config.image_field``) and text
            into ``pixel_values`` and tokens.
    """
    config = settings_of(config)
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    chosen = strategies_for(config, pm)
    base = unwrap(model)
    stacks = find_stacks(base, pm)
    if len(stacks) > 1:  # an encoder-decoder model: every stack planned on its own
        return make_stacks_plan(model, base, stacks, calibration_data, config, tokenizer, pm, lora_rank, progress)
    stack = stacks[0]
    k = config.layer_count(stack.num_layers)  # a bad count is refused before the calibration pass
    targets = resolve_targets(model, config)
    source = targets_from(config, targets)
    targets = targets if targets is not None else linear_targets(base, stack)
    other_stacks = other_stacks_reached(base, stack, targets)
    warnings: list[str] = []
    batches = None  # without data: only strategies that read no calibration statistic (weight-only selectors)
    if calibration_data is None:
        check_data_free(chosen, config)
    else:  # forward statistics are per sample: batched by length they pad far less (gradients: file order)
        by_length, needed = chosen.requires <= {HIDDEN, ACTIVATIONS, WEIGHTS}, chosen.minimum_samples(config)
        batches = calibration_batches(calibration_data, config, tokenizer, base, needed, warnings, processor, by_length)
    base_rank = lora_rank_of(model, lora_rank)
    with training_numerics(model):  # 4-bit weights stay as they are (loraplan.quantized)
        if batches is None:
            stats = data_free_stats([sorted(target_modules_of(layer, targets)) for layer in stack.layers])
        else:
            stats = calibrate(model, stack, batches, chosen.requires, config, targets, progress)
        costs, cost_problem = cost_model(model, stack, config, targets, base_rank)
        weights = weights_of(chosen, stack, targets, progress)
        scoring = score(chosen.selector, stats, config, stack.num_layers, k, weights)
    allocation = allocate(
        scoring, chosen.sharer, stats, config, base_rank=base_rank, costs=costs, cost_problem=cost_problem
    )
    plan = record(base, stack, stats, config, scoring, allocation, targets, warnings)
    plan.stack.targets_from, plan.stack.other_stacks = source, other_stacks
    plan.calibration = calibration_record(base, batches, stats, config, chosen.requires)
    plan.warnings, plan.versions = warnings, versions()
    adjust(plan, pm, base, stats)
    price(plan, base_rank, costs, cost_problem, allocation.budget)
    return final(plan, pm)


def make_stacks_plan(
    model: nn.Module,
    base: nn.Module,
    stacks: list[LayerStack],
    calibration_data: Any,
    config: PlanConfig,
    tokenizer: Any,
    pm: pluggy.PluginManager,
    lora_rank: int | None,
    progress: bool,
) -> LoraPlan:
    """:func:`loraplan.make_plan` for an encoder-decoder model: see the module docstring."""
    refuse_stacks(config, stacks)
    names = [stack_role(stack.path) for stack in stacks]
    settings = [config.for_stack(name) for name in names]
    chosen = [strategies_for(one, pm) for one in settings]
    counts = [one.layer_count(stack.num_layers) for one, stack in zip(settings, stacks)]  # refused before calibrating
    requires = frozenset().union(*(c.requires for c in chosen))
    targets = resolve_targets(model, config)
    source = targets_from(config, targets)
    warnings: list[str] = []
    if calibration_data is None:
        raise ConfigError(
            f"`calibration_data` is None: an encoder-decoder model ({' and '.join(s.path for s in stacks)}) is not "
            "planned without data yet. Give calibration data (a weight-only selector such as snr reads the weights "
            "then, and the data only sizes the pass)."
        )
    needed = max(c.minimum_samples(one) for c, one in zip(chosen, settings))
    batches = calibration_batches(calibration_data, config, tokenizer, base, needed, warnings)
    base_rank = lora_rank_of(model, lora_rank)
    with training_numerics(model):
        all_stats = calibrate_stacks(model, stacks, batches, requires, config, targets, progress)
    plans = []
    for stack, name, one, strategies, k, stats in zip(stacks, names, settings, chosen, counts, all_stats):
        said: list[str] = []
        weights = weights_of(strategies, stack, targets, progress)
        scoring = score(strategies.selector, stats, one, stack.num_layers, k, weights)
        allocation = allocate(
            scoring,
            strategies.sharer,
            stats,
            one,
            base_rank=base_rank,
            costs=None,
            cost_problem=NOT_PRICED,
            allow_empty=one.selector == "none",
        )
        plan = record(base, stack, stats, one, scoring, allocation, targets, said)
        plan.stack.name, plan.stack.targets_from, plan.stack.pooling = name, source, stats.meta.get("pooling")
        plan.warnings = said
        warnings += [f"{name} stack: {message}" for message in said]
        plans.append(plan)
    if not any(plan.selected_layers for plan in plans):
        raise ConfigError(
            "`stacks`: no stack selects a layer, so nothing would train. Select layers in at least one stack."
        )
    whole = LoraPlan(
        num_layers=0,
        selected_layers=[],
        config=config.to_dict(),
        model_fingerprint=fingerprint(base, stacks[0]).replace(stacks=[s.path for s in stacks]),
        calibration=calibration_record(base, batches, all_stats[0], config, requires),
        warnings=warnings,
        versions=versions(),
    )
    whole.calibration.pooling = {name: stats.meta.get("pooling") for name, stats in zip(names, all_stats)}
    for plan in plans:
        plan.calibration = whole.calibration.copy()
        plan.versions = dict(whole.versions)
    plan = combine(plans, whole)
    adjust(plan, pm, base, all_stats[0])
    price(plan, base_rank, None, NOT_PRICED, None)
    return final(plan, pm)
