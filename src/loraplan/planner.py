"""`make_plan`: calibrate, score, select, share, and record every decision in a :class:`LoraPlan`."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from .calibration import CalibrationStats, calibrate
from .config import PlanConfig
from .cost import LayerCosts, costs_for, predictions, select_within_budget
from .data import prepare_batches
from .errors import CalibrationError, ConfigError, PluginError
from .hooks.manager import Registered, call_hook, get_plugin_manager, lookup, selectors, sharers
from .layers import LayerStack, find_layers, linear_modules, other_text_stacks, target_modules_of, unwrap
from .layout import refuse_other_stacks
from .plan import LoraPlan, fingerprint
from .similarity import is_constant, sample_variance_share, spearman
from .strategies import SelectionContext, SharingContext, SharingResult, cumulative_pick

if TYPE_CHECKING:
    import pluggy
    from torch import nn

logger = logging.getLogger("loraplan")

__all__ = ["make_plan", "resolve_targets", "versions"]

#: the LoRA rank the cost model assumes when neither the model nor the caller says
DEFAULT_COST_RANK = 8

#: a single sample carrying at least this share of a layer's variance across samples makes calibration degenerate
DEGENERATE_SHARE = 0.5


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


def _check_importance(strategy: Registered, scores: Any, num_layers: int) -> list[float]:
    if not isinstance(scores, dict) or "importance" not in scores:
        raise PluginError(
            f"plugin {strategy.plugin!r}: selector {strategy.name!r} must return a dict of per-layer scores with an "
            f"'importance' entry, got {type(scores).__name__}"
            + (f" with keys {sorted(scores)}" if isinstance(scores, dict) else "")
            + "."
        )
    for key, values in scores.items():
        if not isinstance(values, (list, tuple)) or len(values) != num_layers:
            raise PluginError(
                f"plugin {strategy.plugin!r}: selector {strategy.name!r} returned {len(values) if hasattr(values, '__len__') else values!r} "
                f"values for score {key!r}; expected one per layer ({num_layers})."
            )
    return [float(v) if v is not None else math.nan for v in scores["importance"]]


def _selection(
    strategy: Registered, ctx: SelectionContext, importance: list[float], config: PlanConfig
) -> list[int]:
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
        raise PluginError(f"plugin {strategy.plugin!r}: selector {strategy.name!r} chose {chosen!r}, not layer indices.") from exc
    if any(i < 0 or i >= ctx.num_layers for i in chosen):
        raise PluginError(
            f"plugin {strategy.plugin!r}: selector {strategy.name!r} chose layers {chosen} outside 0..{ctx.num_layers - 1}."
        )
    return chosen


def _check_groups(strategy: Registered, result: Any, selected: list[int]) -> SharingResult:
    if not isinstance(result, SharingResult):
        raise PluginError(
            f"plugin {strategy.plugin!r}: sharer {strategy.name!r} must return a loraplan.strategies.SharingResult, "
            f"got {type(result).__name__}."
        )
    groups = [sorted(int(i) for i in g) for g in result.groups]
    used: set[int] = set()
    for group in groups:
        bad = [i for i in group if i not in selected]
        if bad or len(group) < 2 or used & set(group):
            raise PluginError(
                f"plugin {strategy.plugin!r}: sharer {strategy.name!r} returned group {group}; groups must hold two "
                f"or more distinct selected layers ({selected}) and not overlap."
            )
        used |= set(group)
    result.groups = sorted(groups)
    return result


def _flag_reasons(stats: CalibrationStats, importance: list[float], selector: str) -> dict[int, str]:
    flagged: dict[int, str] = {}
    constant = [is_constant(h) for h in stats.hidden] if stats.hidden is not None else None
    for i, value in enumerate(importance):
        if not math.isnan(value):
            continue
        if constant is not None and (constant[i] or constant[i + 1]):
            which = f"input h_{i}" if constant[i] else f"output h_{i + 1}"
            flagged[i] = (
                f"its {which} is identical for every calibration sample (zero variance): {selector} cannot score it "
                "(CKA is 0/0; the reference code would call it 'most important')"
            )
        else:
            flagged[i] = f"selector {selector!r} could not score it"
    return flagged


def _diagnostics(stats: CalibrationStats) -> tuple[dict[str, Any], list[str]]:
    if stats.hidden is None:
        return {}, []
    shares = [sample_variance_share(h) for h in stats.hidden]
    distinct = [int(torch.unique(h, dim=0).shape[0]) for h in stats.hidden]
    warnings = []
    bad = [i for i, s in enumerate(shares) if not math.isnan(s) and s >= DEGENERATE_SHARE and stats.num_samples > 2]
    if bad:
        warnings.append(
            f"calibration is degenerate at h_{bad[0]}"
            + (f" (and {len(bad) - 1} more hidden states)" if len(bad) > 1 else "")
            + f": one sample carries {shares[bad[0]]:.0%} of the variance across samples there "
            f"({distinct[bad[0]]} distinct vectors among {stats.num_samples}); scores that use it rest on that sample. "
            "Use more varied calibration data or last_token='mask'."
        )
    return {"max_sample_variance_share": shares, "distinct_vectors": distinct}, warnings


def _stability(strategy: Registered, stats: CalibrationStats, config: PlanConfig, num_layers: int, k: int) -> float | None:
    if not strategy.strategy.data_dependent or not config.stability:
        return None
    halves = stats.halves()
    if halves is None:
        return None
    need = strategy.strategy.minimum_samples(config)
    if any(h.num_samples < need for h in halves):
        return None
    rankings = []
    for half in halves:
        scores = strategy.call("score", SelectionContext(half, config, num_layers, k))
        rankings.append(_check_importance(strategy, scores, num_layers))
    value = spearman(rankings[0], rankings[1])
    return None if math.isnan(value) else value


def _module_shapes(stack: LayerStack, targets: list[str] | None) -> dict[str, list[int]]:
    shapes = {}
    for name, module in target_modules_of(stack.layers[0], targets).items():
        inner = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if hasattr(inner, "in_features"):
            shapes[name] = [int(inner.in_features), int(inner.out_features)]
        else:  # Conv1D: weight is (in, out)
            shapes[name] = [int(inner.weight.shape[0]), int(inner.weight.shape[1])]
    return dict(sorted(shapes.items()))


def _other_stacks(base: nn.Module, stack: LayerStack, targets: list[str] | None) -> list[dict[str, Any]]:
    """Other text layer stacks (the other half of an encoder-decoder model): refused when the LoRA targets reach
    them, else recorded in the plan so that a LoraConfig reaching them later is refused too."""
    found = []
    reached: dict[str, list[str]] = {}
    for path, blocks in other_text_stacks(base, stack.path):
        modules = sorted(linear_modules(blocks[0]))
        found.append({"path": path, "num_layers": len(blocks), "modules": modules})
        reached[path] = [f"{path}.{i}.{name}" for i, block in enumerate(blocks) for name in target_modules_of(block, targets)]
    refuse_other_stacks(reached, stack.path, type(base).__name__)
    return found


def _costs(
    model: nn.Module, stack: LayerStack, config: PlanConfig, targets: list[str] | None, base_rank: int | None
) -> tuple[LayerCosts | None, str | None]:
    """The cost model for this plan, or ``None`` and why not. A failure is an error only where the selection needs
    the cost model (a budget) or the timed model was asked for; otherwise the plan records that it has none."""
    batch, seq_len = config.step_shape()
    try:
        costs = costs_for(
            model, source=config.cost_model, targets=targets, rank=base_rank or DEFAULT_COST_RANK, batch=batch,
            seq_len=seq_len, stack=stack,
        )
    except ConfigError as exc:
        if config.time_budget is not None or config.param_budget is not None or config.cost_model == "timed":
            raise
        return None, str(exc)
    return costs, None


def make_plan(
    model: nn.Module,
    calibration_data: Any,
    config: PlanConfig | dict | None = None,
    tokenizer: Any = None,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    lora_rank: int | None = None,
    progress: bool = True,
) -> LoraPlan:
    """Calibrate ``model`` on ``calibration_data`` and decide which layers get LoRA and which share it.

    Args:
        model: a transformers model, unwrapped (a PEFT-wrapped model is calibrated as its base model).
        calibration_data: texts (with ``tokenizer``), a ``datasets.Dataset`` with a text column, records with
            ``config.text_field``, or an iterable of tokenised batches (``input_ids``, ``attention_mask``).
        config: a :class:`PlanConfig` or a dict of its settings.
        tokenizer: tokenises text data.
        plugin_manager: the manager to take strategies from (default: :func:`get_plugin_manager`).
        lora_rank: the LoRA config's ``r``, to resolve ``plan.rank`` now (else it is resolved when applied).
        progress: show a progress bar.
    """
    config = _config(config)
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    selector = lookup(selectors(pm), config.selector, "selector")
    sharer = lookup(sharers(pm), config.share, "share") if config.share is not None else None
    base = unwrap(model)
    stack = find_layers(base, pm)
    num_layers = stack.num_layers
    k = config.layer_count(num_layers)
    targets = resolve_targets(model, config)
    other_stacks = _other_stacks(base, stack, targets)

    requires = set(selector.strategy.requires) | (set(sharer.strategy.requires) if sharer else set())
    needed = max(
        selector.strategy.minimum_samples(config), sharer.strategy.minimum_samples(config) if sharer else 1
    )
    batches = prepare_batches(calibration_data, config, tokenizer, getattr(base, "config", None))
    if batches.num_samples < needed:
        raise CalibrationError(
            f"`calibration_samples`: {batches.num_samples} calibration sample(s) given, but selector "
            f"{config.selector!r}" + (" (debiased)" if config.debiased else "") + f" needs at least {needed}. "
            "Give more calibration data."
        )
    plan_warnings: list[str] = []
    if batches.num_samples < config.calibration_samples:
        plan_warnings.append(
            f"only {batches.num_samples} calibration samples were available; {config.calibration_samples} were asked for."
        )
    stats = calibrate(model, stack, batches, frozenset(requires), config, targets, progress)

    ctx = SelectionContext(stats=stats, config=config, num_layers=num_layers, k=k)
    scores = selector.call("score", ctx)
    importance = _check_importance(selector, scores, num_layers)
    flagged = _flag_reasons(stats, importance, config.selector)
    for layer, reason in flagged.items():
        message = f"layer {layer} is flagged and not selected: {reason}."
        plan_warnings.append(message)
    usable = num_layers - len(flagged)
    if usable == 0:
        raise CalibrationError(
            f"selector {config.selector!r} could not score any layer (every representation is constant across "
            "the calibration samples). Give varied calibration data."
        )
    if k > usable:
        ctx.k = usable
    base_rank = _base_rank(model, lora_rank)
    costs, cost_problem = _costs(model, stack, config, targets, base_rank)
    budget = None
    if config.time_budget is not None or config.param_budget is not None:
        if costs is None:
            raise ConfigError(f"`time_budget`/`param_budget` need the cost model, which failed: {cost_problem}")
        scored = [math.nan if i in flagged else v for i, v in enumerate(importance)]
        selected, budget = select_within_budget(
            scored,
            costs,
            time_budget=config.time_budget,
            param_budget=config.param_budget,
            checkpointing=config.cost_checkpointing,
            base_rank=costs.rank,
            plan_rank=config.rank_policy if isinstance(config.rank_policy, int) else costs.rank,
            max_count=config.count,
        )
    else:
        selected = _selection(selector, ctx, importance, config)
    selected = [i for i in selected if i not in flagged]
    if not selected:
        raise CalibrationError(f"selector {config.selector!r} selected no scorable layer.")

    share_groups: list[list[int]] = []
    similarity = None
    extra_scores: dict[str, list[float]] = {}
    if sharer is not None:
        result = _check_groups(
            sharer, sharer.call("share", SharingContext(stats, config, num_layers, list(selected))), selected
        )
        share_groups, similarity, extra_scores = result.groups, result.similarity, dict(result.scores)
        if not share_groups:
            best = None
            if similarity is not None and len(selected) > 1:
                best = max(similarity[i][j] for i in selected for j in selected if j > i)
            plan_warnings.append(
                f"`share_threshold` {config.share_threshold} formed no share group among the {len(selected)} "
                "selected layers" + (f" (highest similarity between them: {best:.4f})" if best is not None else "")
                + "; no layers share. Lower share_threshold to form groups."
            )

    diagnostics, degenerate = _diagnostics(stats)
    plan_warnings += degenerate
    stability = {}
    rho = _stability(selector, stats, config, num_layers, ctx.k)
    if rho is not None:
        stability[config.selector] = rho

    dtype = next((p.dtype for p in base.parameters()), None)
    device = next((p.device for p in base.parameters()), None)
    plan = LoraPlan(
        num_layers=num_layers,
        selected_layers=selected,
        share_groups=share_groups,
        rank=None,
        scores={**{k_: [float(v) for v in vals] for k_, vals in scores.items()}, **extra_scores},
        similarity=similarity,
        config=config.to_dict(),
        model=fingerprint(base, stack),
        layers={
            "path": stack.path,
            "pattern": stack.pattern,
            "ambiguous": stack.ambiguous,
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name in stats.target_names[0]}),
            "module_shapes": _module_shapes(stack, targets),
            "targets_from": "config" if config.target_modules else ("peft" if targets else "all-linear"),
            "other_stacks": other_stacks,
        },
        calibration={
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
        },
        flagged_layers=flagged,
        diagnostics=diagnostics,
        stability=stability,
        warnings=plan_warnings,
        versions=versions(),
    )
    call_hook(pm, "loraplan_adjust_plan", plan=plan, model=base, stats=stats)
    plan.validate()
    if base_rank is not None:
        # after the adjust hook: the budget rank depends on the final selection and groups
        plan.rank = plan.resolve_rank(base_rank)
        plan.calibration["base_rank"] = base_rank
    if costs is not None:
        # after the adjust hook, so that the predictions are those of the final selection
        rank = plan.resolve_rank(costs.rank)
        plan.cost = {**costs.to_dict(), "predicted": predictions(costs, plan.selected_layers, plan.num_modules(), rank)}
        if budget is not None:
            plan.cost["budget"] = budget
        if base_rank is None:
            plan.cost["notes"].append(f"the LoRA rank was not known when planning; the cost model assumed r={costs.rank}")
    else:
        plan.cost = {"unavailable": cost_problem}
        plan.warnings.append(f"no cost model: {cost_problem}")
    # round-trip through JSON so the in-memory plan equals the saved one exactly
    plan = LoraPlan.from_dict(plan.to_dict())
    for message in plan.warnings:
        logger.warning("loraplan: %s", message)
    logger.info(
        "loraplan: %s selected %d/%d layers %s%s",
        config.selector,
        len(plan.selected_layers),
        num_layers,
        plan.selected_layers,
        f", share groups {plan.share_groups}" if plan.share_groups else "",
    )
    call_hook(pm, "loraplan_plan_final", plan=plan)
    return plan

