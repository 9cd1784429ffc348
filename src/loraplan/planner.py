"""`make_plan`: calibrate, score, select, share, and record every decision in a :class:`LoraPlan`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .calibration import ACTIVATIONS, HIDDEN, CalibrationStats, calibrate, calibrate_stacks
from .config import PlanConfig
from .cost import LayerCosts, costs_for, predictions, select_within_budget
from .cost.budget import Completion
from .data import CalibrationBatches, prepare_batches
from .diagnostics import calibration_diagnostics, flag_reasons, stability
from .errors import CalibrationError, ConfigError, PluginError
from .hooks.manager import Registered, call_hook, get_plugin_manager, lookup, selectors, sharers
from .layers import (
    LayerStack,
    find_stacks,
    linear_modules,
    parameter_device,
    parameter_dtype,
    stack_role,
    target_shapes,
    unwrap,
)
from .layout import other_stacks_reached
from .plan import LoraPlan, fingerprint
from .plan_stacks import combine
from .quantized import quantization_of, training_numerics
from .sites import refused_targets
from .strategies import (
    SelectionContext,
    SharingContext,
    check_groups,
    check_scores,
    cumulative_pick,
    shares_unselected,
)

if TYPE_CHECKING:
    import pluggy
    from torch import nn

logger = logging.getLogger("loraplan")

__all__ = ["Strategies", "make_plan", "resolve_targets", "strategies_for", "versions"]

#: the LoRA rank the cost model assumes when neither the model nor the caller says
DEFAULT_COST_RANK = 8


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("loraplan", "torch", "transformers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def resolve_targets(model: nn.Module, config: PlanConfig) -> list[str] | None:
    """Target module names: the config's, else the PEFT wrapper's LoRA targets, else ``None`` (all linear)."""
    if config.target_modules is not None:
        return list(config.target_modules)
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        active = getattr(model, "active_adapter", None)
        cfg = peft_config.get(active) if isinstance(active, str) else next(iter(peft_config.values()))
        targets = getattr(cfg, "target_modules", None)
        if isinstance(targets, (set, list, tuple)) and targets:
            return sorted(targets)
    return None


def _linear_targets(base: nn.Module, stack: LayerStack) -> list[str] | None:
    """The targets of "every linear module inside the layers" (``None``), less the ones stock PEFT refuses on this model
    (Mamba's ``out_proj``): what could carry LoRA, so every statistic and the LoRA-drop warm-up read the same modules.
    ``None`` where PEFT refuses none of them."""
    leaves = {name.rsplit(".", 1)[-1] for name in linear_modules(stack.layers[0])}
    refused = refused_targets(base, leaves)
    return sorted(leaves - refused) if refused else None


def _config(config: PlanConfig | dict | None) -> PlanConfig:
    if config is None:
        return PlanConfig()
    if isinstance(config, PlanConfig):
        return config
    if isinstance(config, dict):
        return PlanConfig.from_dict(config)
    raise ConfigError(f"`config` must be a PlanConfig or a dict of settings, got {type(config).__name__}.")


def _base_rank(model: nn.Module, lora_rank: int | None) -> int | None:
    if lora_rank is not None:
        return lora_rank
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        return getattr(next(iter(peft_config.values())), "r", None)
    return None


def _selection(strategy: Registered, ctx: SelectionContext, importance: list[float], config: PlanConfig) -> list[int]:
    if config.cumulative is not None:
        if not strategy.strategy.data_dependent:
            raise ConfigError(
                f"`cumulative` needs a data-driven selector, but {strategy.name!r} ignores the data. Use ratio/count "
                "with it, or pick e.g. selector='activation'."
            )
        if any(v < 0 for v in importance if not math.isnan(v)):
            raise ConfigError(
                f"`cumulative` needs non-negative importance scores; selector {strategy.name!r} gave negative ones."
            )
        chosen = cumulative_pick(importance, config.cumulative)
    else:
        chosen = strategy.call("choose", ctx, importance)
    try:
        chosen = sorted({int(i) for i in chosen})
    except (TypeError, ValueError) as exc:
        raise PluginError(
            f"plugin {strategy.plugin!r}: selector {strategy.name!r} chose {chosen!r}, not layer indices."
        ) from exc
    if any(i < 0 or i >= ctx.num_layers for i in chosen):
        raise PluginError(
            f"plugin {strategy.plugin!r}: selector {strategy.name!r} chose layers {chosen} outside "
            f"0..{ctx.num_layers - 1}."
        )
    return chosen


def _costs(
    model: nn.Module, stack: LayerStack, config: PlanConfig, targets: list[str] | None, base_rank: int | None
) -> tuple[LayerCosts | None, str | None]:
    """The cost model for this plan, or ``None`` and why not. A failure is an error only where the selection needs
    the cost model (a budget) or the timed model was asked for; otherwise the plan records that it has none."""
    batch, seq_len = config.step_shape()
    try:
        costs = costs_for(
            model,
            source=config.cost_model,
            targets=targets,
            rank=base_rank or DEFAULT_COST_RANK,
            batch=batch,
            seq_len=seq_len,
            stack=stack,
        )
    except ConfigError as exc:
        if config.time_budget is not None or config.param_budget is not None or config.cost_model == "timed":
            raise
        return None, str(exc)
    return costs, None


@dataclass(frozen=True)
class Strategies:
    """The selector and the sharer a config names, as registered."""

    selector: Registered
    sharer: Registered | None

    @property
    def requires(self) -> frozenset[str]:
        """The statistics the calibration pass must collect for both."""
        sharer = set(self.sharer.strategy.requires) if self.sharer else set()
        return frozenset(set(self.selector.strategy.requires) | sharer)

    def minimum_samples(self, config: PlanConfig) -> int:
        sharer = self.sharer.strategy.minimum_samples(config) if self.sharer else 1
        return max(self.selector.strategy.minimum_samples(config), sharer)


def strategies_for(config: PlanConfig, pm: pluggy.PluginManager) -> Strategies:
    """The strategies ``config`` names; an unknown name is a config error listing the installed ones."""
    selector = lookup(selectors(pm), config.selector, "selector")
    sharer = lookup(sharers(pm), config.share, "share") if config.share is not None else None
    return Strategies(selector, sharer)


def _quantized_cost_note(quantized: str, source: str) -> str:
    """What the cost model's predictions mean on a quantized (bitsandbytes) model, by the model that made them."""
    if source == "flops":
        return (
            f"the base weights are {quantized} (bitsandbytes): the FLOPs model prices 16-bit weights and not the "
            "dequantization of each quantized matmul; cost_model='timed' or 'fitted' measures the quantized layers"
        )
    return (
        f"the base weights are {quantized} (bitsandbytes): the {source} model timed the quantized layers as they "
        "run, dequantization included"
    )


def check_strategies(config: PlanConfig, pm: pluggy.PluginManager) -> None:
    """Every strategy ``config`` names, the per-stack ones of ``stacks`` too, looked up before any model loads: an
    unknown name is a config error listing the installed ones (the stack's key in front)."""
    strategies_for(config, pm)
    for name in config.stacks or {}:
        try:
            strategies_for(config.for_stack(name), pm)
        except ConfigError as exc:
            raise ConfigError(f"`stacks.{name}`: {exc}") from None


@dataclass
class _Scoring:
    """The selector's verdict: its scores, the importance it ranks by, and the layers it could not score."""

    scores: dict[str, Any]
    importance: list[float]
    flagged: dict[int, str]
    ctx: SelectionContext


@dataclass
class _Sharing:
    groups: list[list[int]]
    similarity: list[list[float]] | None
    scores: dict[str, list[float]]


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
    config = _config(config)
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    chosen = strategies_for(config, pm)
    base = unwrap(model)
    stacks = find_stacks(base, pm)
    if len(stacks) > 1:  # an encoder-decoder model: every stack planned on its own
        return make_stacks_plan(model, base, stacks, calibration_data, config, tokenizer, pm, lora_rank, progress)
    stack = stacks[0]
    k = config.layer_count(stack.num_layers)  # a bad count is refused before the calibration pass
    targets = resolve_targets(model, config)
    targets_from = "config" if config.target_modules else ("peft" if targets else "all-linear")
    targets = targets if targets is not None else _linear_targets(base, stack)
    other_stacks = other_stacks_reached(base, stack, targets)
    warnings: list[str] = []
    needed = chosen.minimum_samples(config)
    # forward statistics are per sample: batched by length they pad far less (gradients are per batch: file order)
    by_length = chosen.requires <= {HIDDEN, ACTIVATIONS}
    batches = _calibration_batches(calibration_data, config, tokenizer, base, needed, warnings, processor, by_length)
    base_rank = _base_rank(model, lora_rank)
    with training_numerics(model):  # 4-bit weights stay as they are (loraplan.quantized)
        stats = calibrate(model, stack, batches, chosen.requires, config, targets, progress)
        costs, cost_problem = _costs(model, stack, config, targets, base_rank)
    plan, budget = _stack_plan(base, stack, stats, config, chosen, k, targets, base_rank, costs, cost_problem, warnings)
    plan.stack.update(targets_from=targets_from, other_stacks=other_stacks)
    plan.calibration = _calibration_record(base, batches, stats, config, chosen.requires)
    plan.warnings, plan.versions = warnings, versions()
    return _finish(plan, pm, base, stats, base_rank, costs, cost_problem, budget)


def _stack_plan(
    base: nn.Module,
    stack: LayerStack,
    stats: CalibrationStats,
    config: PlanConfig,
    chosen: Strategies,
    k: int,
    targets: list[str] | None,
    base_rank: int | None,
    costs: LayerCosts | None,
    cost_problem: str | None,
    warnings: list[str],
    allow_empty: bool = False,
) -> tuple[LoraPlan, dict[str, Any] | None]:
    """One stack's decisions from its statistics (score, select, share, ranks, diagnostics, stability) as a plan of
    that stack, and a budget's record. ``allow_empty``: selecting no layer is allowed (one stack of an
    encoder-decoder model, the other carrying the LoRA)."""
    scoring = _score(chosen.selector, stats, config, stack.num_layers, k, warnings)
    complete = _completion(chosen.sharer, stats, config, stack.num_layers, costs.rank if costs else base_rank)
    selected, budget = _select(
        chosen.selector, scoring, config, costs, cost_problem, base_rank, complete, allow_empty=allow_empty
    )
    sharing = _share(chosen.sharer, stats, config, stack.num_layers, selected, warnings)
    ranks = _Ranks({}, [])
    if config.rank_policy == "importance" and selected:
        selected, sharing, ranks = _importance_ranks(
            chosen.sharer, stats, config, stack.num_layers, selected, sharing, scoring, base_rank, warnings, budget
        )
    diagnostics, degenerate = calibration_diagnostics(stats)
    warnings += degenerate
    rho = stability(chosen.selector, stats, config, stack.num_layers, scoring.ctx.k)
    plan = LoraPlan(
        num_layers=stack.num_layers,
        selected_layers=selected,
        share_groups=sharing.groups,
        rank=None,
        rank_pattern=ranks.pattern,
        scores={**{name: [float(v) for v in values] for name, values in scoring.scores.items()}, **sharing.scores},
        similarity=sharing.similarity,
        config=config.to_dict(),
        model_fingerprint=fingerprint(base, stack),
        stack={
            "path": stack.path,
            "pattern": stack.pattern,
            "ambiguous": stack.ambiguous,
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in stats.target_names[0]}),
            "module_shapes": {name: list(io) for name, io in target_shapes(stack.layers[0], targets).items()},
        },
        flagged_layers=scoring.flagged,
        diagnostics=diagnostics,
        stability={config.selector: rho} if rho is not None else {},
        notes=list(ranks.notes),
    )
    plan.notes += _rest_notes(plan)
    return plan, budget


def _calibration_batches(
    data: Any,
    config: PlanConfig,
    tokenizer: Any,
    base: nn.Module,
    needed: int,
    warnings: list[str],
    processor: Any = None,
    by_length: bool = False,
) -> CalibrationBatches:
    """The calibration data as batches (``by_length``: batched shortest first), refused when the strategies need more
    samples (``needed``) than it has."""
    batches = prepare_batches(
        data, config, tokenizer, getattr(base, "config", None), processor=processor, by_length=by_length
    )
    if batches.num_samples < needed:
        raise CalibrationError(
            f"`calibration_samples`: {batches.num_samples} calibration sample(s) given, but selector "
            f"{config.selector!r}" + (" (debiased)" if config.debiased else "") + f" needs at least {needed}. "
            "Give more calibration data."
        )
    if batches.num_samples < config.calibration_samples:
        warnings.append(
            f"only {batches.num_samples} calibration samples were available; {config.calibration_samples} were "
            "asked for."
        )
    return batches


def _score(
    selector: Registered, stats: CalibrationStats, config: PlanConfig, num_layers: int, k: int, warnings: list[str]
) -> _Scoring:
    """The selector's scores, and the layers it could not score (flagged, never selected)."""
    ctx = SelectionContext(stats=stats, config=config, num_layers=num_layers, k=k)
    scores = selector.call("score", ctx)
    importance = check_scores(selector, scores, num_layers)
    flagged = flag_reasons(stats, importance, config.selector)
    for layer, reason in flagged.items():
        warnings.append(f"layer {layer} is flagged and not selected: {reason}.")
    usable = num_layers - len(flagged)
    if usable == 0:
        raise CalibrationError(
            f"selector {config.selector!r} could not score any layer (every representation is constant across "
            "the calibration samples). Give varied calibration data."
        )
    ctx.k = min(ctx.k, usable)
    return _Scoring(scores, importance, flagged, ctx)


def _select(
    selector: Registered,
    scoring: _Scoring,
    config: PlanConfig,
    costs: LayerCosts | None,
    cost_problem: str | None,
    base_rank: int | None = None,
    complete: Completion | None = None,
    *,
    allow_empty: bool = False,
) -> tuple[list[int], dict[str, Any] | None]:
    """The selected layers (by the selector, or within the budget with the cost model) and the budget's record."""
    budget = None
    if config.rank_policy == "importance" and config.param_budget is not None and config.time_budget is None:
        selected, budget = _ranked_selection(scoring, config, _importance_base(base_rank, config))
    elif config.time_budget is not None or config.param_budget is not None:
        if costs is None:
            raise ConfigError(f"`time_budget`/`param_budget` need the cost model, which failed: {cost_problem}")
        scored = [math.nan if i in scoring.flagged else v for i, v in enumerate(scoring.importance)]
        selected, budget = select_within_budget(
            scored,
            costs,
            time_budget=config.time_budget,
            param_budget=config.param_budget,
            checkpointing=config.cost_checkpointing,
            base_rank=costs.rank,
            plan_rank=config.rank_policy if isinstance(config.rank_policy, int) else costs.rank,
            max_count=config.count,
            complete=complete,
        )
    else:
        selected = _selection(selector, scoring.ctx, scoring.importance, config)
    selected = [i for i in selected if i not in scoring.flagged]
    if not selected and not allow_empty:
        raise CalibrationError(f"selector {config.selector!r} selected no scorable layer.")
    return selected, budget


def _completion(
    sharer: Registered | None, stats: CalibrationStats, config: PlanConfig, num_layers: int, rank: int | None
) -> Completion | None:
    """What a budget prices for a candidate selection when sharing or ranks change what trains: the layers the
    sharer adds (a shared rest), the module sets after sharing and their ranks (per-layer ranks spend the selected
    layers' ``r``, or the parameter budget). ``None`` where the selection trains as it is (the search's own rule:
    sharing among the selected layers only lowers the parameters)."""
    if rank is None or not (shares_unselected(sharer) or config.rank_policy == "importance"):
        return None
    r = rank

    def complete(selected: list[int]) -> tuple[list[int], int, int]:
        # only a sharer that reaches beyond the selection changes what is priced: groups among the selected layers
        # leave the adapted layers as they are, and per-layer ranks spend the same units over them (so the sharer,
        # ShareLoRA's similarity for one, is not run again for every candidate)
        groups: list[list[int]] = []
        if sharer is not None and shares_unselected(sharer):
            ctx = SharingContext(stats, config, num_layers, list(selected))
            groups = check_groups(sharer, sharer.call("share", ctx), selected, num_layers).groups
        draft = LoraPlan(
            num_layers=num_layers, selected_layers=list(selected), share_groups=groups, config=config.to_dict()
        )
        if config.rank_policy != "importance":
            return draft.adapted_layers, draft.num_modules(), sum(draft.module_ranks(r))
        rest = _rest_groups(groups, selected)
        units = _rank_total(config, num_layers, len(selected), r, len(rest)) + len(rest) * r
        return draft.adapted_layers, draft.num_modules(), units

    return complete


@dataclass
class _Ranks:
    """Per-layer ranks (``rank_policy="importance"``) and the plan note on how they were allocated (the budget's
    record, when there is a budget, has the numbers)."""

    pattern: dict[int, int]
    notes: list[str]


def _importance_base(base_rank: int | None, config: PlanConfig) -> int:
    if base_rank is None:
        raise ConfigError(
            f"`rank_policy` 'importance' allocates per-layer ranks from the LoRA rank `r`, which is not known here. "
            "Pass lora_rank=... to make_plan (CLI: --rank), or plan the model wrapped with your LoraConfig "
            f"(settings: {config.rank_policy!r}, param_budget {config.param_budget})."
        )
    return base_rank


def _rank_total(config: PlanConfig, num_layers: int, selected: int, base_rank: int, rest_sets: int) -> int:
    """The rank units to share out: a ``param_budget`` of LoRA on every layer at ``r`` (less the shared rest's module
    sets at ``r``), else the selected layers' ``r`` each, redistributed."""
    if config.param_budget is None:
        return selected * base_rank
    return math.floor(config.param_budget * num_layers * base_rank + 1e-9) - rest_sets * base_rank


def _ranked_selection(scoring: _Scoring, config: PlanConfig, base_rank: int) -> tuple[list[int], dict[str, Any]]:
    """With ``param_budget`` and per-layer ranks: every scorable layer is a candidate (the ``count`` most important
    ones with ``count``), the budget is shared out by importance, and the layers left with a rank are selected."""
    from .ranks import allocate_ranks
    from .strategies import top_k

    n = len(scoring.importance)
    usable = [i for i in range(n) if i not in scoring.flagged and not math.isnan(scoring.importance[i])]
    if config.count is not None:
        usable = top_k([scoring.importance[i] if i in usable else math.nan for i in range(n)], config.count)
    total = _rank_total(config, n, 0, base_rank, 0)
    weights = [scoring.importance[i] if i in usable else math.nan for i in range(n)]
    ranks = allocate_ranks(weights, total, min_rank=config.min_rank, rank_multiple=config.rank_multiple)
    selected = [i for i, r in enumerate(ranks) if r > 0]
    if not selected:
        raise ConfigError(
            f"`param_budget` {config.param_budget}: {total} rank units (of {n} layers at r={base_rank}) cannot give "
            f"any layer min_rank={config.min_rank} in multiples of {config.rank_multiple}. Lower min_rank or "
            "rank_multiple, or raise param_budget."
        )
    record = {
        "param_budget": config.param_budget,
        "rank_policy": "importance",
        "rank_units": total,
        "summary": (
            f"param_budget {config.param_budget}: {total} rank units ({config.param_budget} of {n} layers at "
            f"r={base_rank}) shared out by importance; {len(selected)} layers got a rank"
        ),
    }
    return selected, record


def _importance_ranks(
    sharer: Registered | None,
    stats: CalibrationStats,
    config: PlanConfig,
    num_layers: int,
    selected: list[int],
    sharing: _Sharing,
    scoring: _Scoring,
    base_rank: int | None,
    warnings: list[str],
    budget: dict[str, Any] | None = None,
) -> tuple[list[int], _Sharing, _Ranks]:
    """Ranks in proportion to importance over the module sets left after sharing (a group counts once, weighted by
    its selected layers' importance; a shared rest keeps ``r``). A set whose rank rounds below ``min_rank`` is left
    out and the sharer asked again, until every set keeps a rank. The allocation goes into ``budget``'s record
    (``ranks``), whose summary also says when layers the budget chose were left out here."""
    from .ranks import allocate_ranks

    r = _importance_base(base_rank, config)
    original = list(selected)
    while True:
        chosen = set(selected)
        rest = _rest_groups(sharing.groups, selected)
        units = [[i] for i in selected if not any(i in g for g in sharing.groups)]
        units += [g for g in sharing.groups if chosen & set(g)]
        units.sort()
        total = _rank_total(config, num_layers, len(selected), r, len(rest))
        if total < 1:
            raise ConfigError(
                f"`param_budget` {config.param_budget} leaves no rank for the selected layers once the shared rest "
                f"takes its r={r} per module set. Raise param_budget, or plan without share='{config.share}'."
            )
        weights = [sum(scoring.importance[i] for i in unit if i in chosen) for unit in units]
        got = allocate_ranks(weights, total, min_rank=config.min_rank, rank_multiple=config.rank_multiple)
        dropped = [i for unit, rank in zip(units, got) for i in unit if rank == 0 and i in chosen]
        if not dropped:
            break
        selected = [i for i in selected if i not in dropped]
        if not selected:
            raise ConfigError(
                f"`rank_policy` 'importance': {total} rank units cannot give any layer min_rank={config.min_rank} "
                f"in multiples of {config.rank_multiple}. Lower min_rank or rank_multiple, or raise the budget."
            )
        sharing = _share(sharer, stats, config, num_layers, selected, warnings)
    pattern = {i: rank for unit, rank in zip(units, got) for i in unit}
    left_out = [i for i in original if i not in selected]
    note = (
        f"rank_policy 'importance': {total} rank units over {len(units)} module sets in proportion to importance "
        f"(r={r}, min_rank {config.min_rank}, multiple {config.rank_multiple}): ranks "
        + ", ".join(f"{i}:{pattern[i]}" for i in sorted(pattern))
        + (f"; left out (rounded below min_rank): {left_out}" if left_out else "")
        + (f"; the shared rest keeps r={r}" if rest else "")
    )
    record = {"rank_units": total, "module_sets": len(units), "left_out": left_out, "ranks": dict(pattern)}
    if budget is not None:
        budget["ranks"] = record
        if "rank_units" in budget and left_out:
            budget["summary"] += (
                f"; {len(left_out)} of them left out again after sharing ({total} units for the {len(selected)} "
                "selected layers)"
            )
    return selected, sharing, _Ranks(pattern, [note])


def _rest_groups(groups: list[list[int]], selected: list[int]) -> list[list[int]]:
    """The groups that hold no selected layer: a shared rest's module sets (each paid at ``r``)."""
    chosen = set(selected)
    return [g for g in groups if not chosen & set(g)]


def _rest_notes(plan: LoraPlan) -> list[str]:
    rest = plan.shared_rest
    if not rest:
        return []
    lowest = min(plan.adapted_layers)
    return [
        f"shared rest: layers {rest} are not selected and carry LoRA through one shared module set per target "
        f"module; the lowest adapted layer is {lowest}, so the truncated backward "
        + ("has nothing to skip" if lowest == 0 else f"skips only layers 0..{lowest - 1}")
        + " (LoRA-drop trains every layer)"
    ]


def _share(
    sharer: Registered | None,
    stats: CalibrationStats,
    config: PlanConfig,
    num_layers: int,
    selected: list[int],
    warnings: list[str],
) -> _Sharing:
    """The sharer's groups among the selected layers (none without a sharer)."""
    if sharer is None:
        return _Sharing([], None, {})
    result = check_groups(
        sharer, sharer.call("share", SharingContext(stats, config, num_layers, list(selected))), selected, num_layers
    )
    if not result.groups and not shares_unselected(sharer):
        warnings.append(_no_groups(config, selected, result.similarity))
    return _Sharing(result.groups, result.similarity, dict(result.scores))


def _no_groups(config: PlanConfig, selected: list[int], similarity: list[list[float]] | None) -> str:
    """The warning for a sharer that formed no group, with the advice that fits why."""
    if len(selected) < 2:
        return (
            f"`share` {config.share!r}: only {len(selected)} layer is selected ({selected}), so no layers can share "
            "a module. Select more layers (ratio, count or a budget), or set share=None."
        )
    head = f"`share` {config.share!r} formed no share group among the {len(selected)} selected layers {selected}"
    if similarity is None:  # a sharer that does not group by similarity: the threshold is not what decides
        return head + "; no layers share."
    best = max(similarity[i][j] for i in selected for j in selected if j > i)
    if best < config.share_threshold:
        at_most = math.floor(best * 1e4) / 1e4
        return (
            f"{head} (highest similarity between them: {best:.4f}, below `share_threshold` "
            f"{config.share_threshold}); no layers share. Lower share_threshold to at most {at_most} to form groups."
        )
    return f"{head} although their highest similarity ({best:.4f}) reaches `share_threshold`; no layers share."


def _calibration_record(
    base: nn.Module, batches: CalibrationBatches, stats: CalibrationStats, config: PlanConfig, requires: frozenset[str]
) -> dict[str, Any]:
    dtype, device = parameter_dtype(base), parameter_device(base)
    return {
        "num_samples": batches.num_samples,
        "num_tokens": batches.num_tokens,
        "max_length": config.max_length,
        "batch_size": config.batch_size,
        "data_hash": batches.data_hash,
        "seed": config.seed,
        "pooling": stats.meta.get("pooling"),
        "last_token": config.last_token,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "device": device.type if device is not None else None,
        "statistics": sorted(requires),
        **({"batching": "by length"} if batches.order is not None else {}),
        **({"lora_drop": dict(stats.meta["lora_drop"])} if "lora_drop" in stats.meta else {}),
        **({"quantization": quantized} if (quantized := quantization_of(base)) else {}),
    }


def _finish(
    plan: LoraPlan,
    pm: pluggy.PluginManager,
    base: nn.Module,
    stats: CalibrationStats,
    base_rank: int | None,
    costs: LayerCosts | None,
    cost_problem: str | None,
    budget: dict[str, Any] | None,
) -> LoraPlan:
    """Let plugins adjust the plan, then resolve its rank and price it (both depend on the final selection and
    groups), make it equal to its saved form, log it and hand it to the final hook."""
    call_hook(pm, "loraplan_adjust_plan", plan=plan, model=base, stats=stats)
    plan.validate()
    if base_rank is not None:
        plan.rank = plan.resolve_rank(base_rank)
        plan.calibration["base_rank"] = base_rank
        for stack in plan.stacks:  # an encoder-decoder model's: every stack at the rank the plan asks for
            stack.rank = plan.rank
            stack.calibration["base_rank"] = base_rank
    if costs is not None:
        rank = plan.resolve_rank(costs.rank)
        units = sum(plan.module_ranks(costs.rank)) if plan.rank_pattern else None
        predicted = predictions(costs, plan.adapted_layers, plan.num_modules(), rank, rank_units=units)
        plan.cost = {**costs.to_dict(), "predicted": predicted}
        if budget is not None:
            plan.cost["budget"] = budget
        if base_rank is None:
            plan.cost["notes"].append(
                f"the LoRA rank was not known when planning; the cost model assumed r={costs.rank}"
            )
        quantized = plan.calibration.get("quantization")
        if quantized:
            plan.cost["notes"].append(_quantized_cost_note(quantized, costs.source))
    else:
        plan.cost = {"unavailable": cost_problem}
        plan.warnings.append(f"no cost model: {cost_problem}")
    # round-trip through JSON so the in-memory plan equals the saved one exactly
    plan = LoraPlan.from_dict(plan.to_dict())
    for message in plan.warnings:
        logger.warning("loraplan: %s", message)
    logger.info(
        "loraplan: %s selected %d/%d layers %s%s",
        plan.selector,
        len(plan.selected_layers),
        plan.num_layers,
        plan.selected_layers,
        f", share groups {plan.share_groups}" if plan.share_groups else "",
    )
    call_hook(pm, "loraplan_plan_final", plan=plan)
    return plan


# -- encoder-decoder models: one calibration pass, every stack planned on its own ---------------------------------

#: why an encoder-decoder plan has no cost model (and so no time or parameter budget)
NOT_PRICED = (
    "the cost model prices one layer stack; an encoder-decoder model's step (two stacks, cross-attention) is not "
    "priced yet"
)


def _refuse(config: PlanConfig, stacks: list[LayerStack]) -> None:
    """What encoder-decoder plans cannot do yet, refused before any calibration."""
    paths = " and ".join(f"`{s.path}`" for s in stacks)
    for name in ("time_budget", "param_budget"):
        if getattr(config, name) is not None:
            raise ConfigError(
                f"`{name}` ({getattr(config, name)}) needs the cost model, and {NOT_PRICED} ({paths}). Select by "
                "ratio, count or cumulative (per stack with `stacks`), or plan a decoder-only model."
            )
    if config.rank_policy in ("budget", "importance"):
        raise ConfigError(
            f"`rank_policy` {config.rank_policy!r} is not available for an encoder-decoder model ({paths}) yet: "
            "its ranks are allocated within one stack. Use rank_policy='keep' or an explicit rank."
        )


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
    _refuse(config, stacks)
    names = [stack_role(stack.path) for stack in stacks]
    settings = [config.for_stack(name) for name in names]
    chosen = [strategies_for(one, pm) for one in settings]
    counts = [one.layer_count(stack.num_layers) for one, stack in zip(settings, stacks)]  # refused before calibrating
    requires = frozenset().union(*(c.requires for c in chosen))
    targets = resolve_targets(model, config)
    targets_from = "config" if config.target_modules else ("peft" if targets else "all-linear")
    warnings: list[str] = []
    needed = max(c.minimum_samples(one) for c, one in zip(chosen, settings))
    batches = _calibration_batches(calibration_data, config, tokenizer, base, needed, warnings)
    base_rank = _base_rank(model, lora_rank)
    with training_numerics(model):
        all_stats = calibrate_stacks(model, stacks, batches, requires, config, targets, progress)
    plans = []
    for stack, name, one, strategies, k, stats in zip(stacks, names, settings, chosen, counts, all_stats):
        said: list[str] = []
        plan, _ = _stack_plan(
            base,
            stack,
            stats,
            one,
            strategies,
            k,
            targets,
            base_rank,
            None,
            NOT_PRICED,
            said,
            allow_empty=one.selector == "none",
        )
        plan.stack.update(name=name, targets_from=targets_from, pooling=stats.meta.get("pooling"))
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
        model_fingerprint={**fingerprint(base, stacks[0]), "stacks": [s.path for s in stacks]},
        calibration=_calibration_record(base, batches, all_stats[0], config, requires),
        warnings=warnings,
        versions=versions(),
    )
    whole.calibration["pooling"] = {name: stats.meta.get("pooling") for name, stats in zip(names, all_stats)}
    for plan in plans:
        plan.calibration = dict(whole.calibration)
        plan.versions = dict(whole.versions)
    plan = combine(plans, whole)
    return _finish(plan, pm, base, all_stats[0], base_rank, None, NOT_PRICED, None)
