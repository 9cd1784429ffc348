"""The steps of :func:`loraplan.make_plan` that every layer stack goes through: the strategies a config names, the
targets and the calibration data, the cost model, the record of one stack's decisions as a plan, and the end of
planning (plugins adjust the plan, it is priced, checked against its saved form and handed to the final hook).
:mod:`loraplan.planner` runs them in order; the decision itself is :mod:`loraplan.allocation`'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .calibration import CalibrationStats
from .config import PlanConfig
from .cost.prediction import LayerCosts, predictions
from .cost.timing import costs_for
from .data import CalibrationBatches, prepare_batches
from .diagnostics import calibration_diagnostics, stability
from .errors import CalibrationError, ConfigError
from .hooks.manager import Registered, call_hook, lookup, selectors, sharers
from .layers import LayerStack, linear_modules, parameter_device, parameter_dtype, target_shapes
from .plan import LoraPlan, fingerprint
from .plan_records import CalibrationRecord, CostRecord, StackRecord
from .quantized import quantization_of
from .sites import refused_targets
from .strategies import WEIGHTS
from .weights import ModelWeights, WeightSource

if TYPE_CHECKING:
    import pluggy
    from torch import nn

    from .allocation import Allocation, BudgetRecord, Scoring

logger = logging.getLogger("loraplan")

__all__ = ["NOT_PRICED", "Strategies", "check_strategies", "resolve_targets", "strategies_for", "versions"]

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


def _active_lora_config(model: nn.Module) -> Any:
    """The LoRA config of a PEFT-wrapped model's active adapter (the first one where none is active), else ``None``."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        return None
    active = getattr(model, "active_adapter", None)
    return peft_config.get(active) if isinstance(active, str) else next(iter(peft_config.values()))


def resolve_targets(model: nn.Module, config: PlanConfig) -> list[str] | None:
    """Target module names: the config's, else the PEFT wrapper's LoRA targets, else ``None`` (all linear)."""
    if config.target_modules is not None:
        return list(config.target_modules)
    targets = getattr(_active_lora_config(model), "target_modules", None)
    if isinstance(targets, (set, list, tuple)) and targets:
        return sorted(targets)
    return None


def targets_from(config: PlanConfig, targets: list[str] | None) -> str:
    """Where the targets came from, as the plan's stack record says it."""
    return "config" if config.target_modules else ("peft" if targets else "all-linear")


def linear_targets(base: nn.Module, stack: LayerStack) -> list[str] | None:
    """The targets of "every linear module inside the layers" (``None``), less the ones stock PEFT refuses on this model
    (Mamba's ``out_proj``): what could carry LoRA, so every statistic and the LoRA-drop warm-up read the same modules.
    ``None`` where PEFT refuses none of them."""
    leaves = {name.rsplit(".", 1)[-1] for name in linear_modules(stack.layers[0])}
    refused = refused_targets(base, leaves)
    return sorted(leaves - refused) if refused else None


def settings_of(config: PlanConfig | dict | None) -> PlanConfig:
    if config is None:
        return PlanConfig()
    if isinstance(config, PlanConfig):
        return config
    if isinstance(config, dict):
        return PlanConfig.from_dict(config)
    raise ConfigError(f"`config` must be a PlanConfig or a dict of settings, got {type(config).__name__}.")


def lora_rank_of(model: nn.Module, lora_rank: int | None) -> int | None:
    """The LoRA rank ``r``: the caller's, else the active adapter's of a PEFT-wrapped model (as for its targets)."""
    if lora_rank is not None:
        return lora_rank
    return getattr(_active_lora_config(model), "r", None)


def cost_model(
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


def check_strategies(config: PlanConfig, pm: pluggy.PluginManager) -> None:
    """Every strategy ``config`` names, the per-stack ones of ``stacks`` too, looked up before any model loads: an
    unknown name is a config error listing the installed ones (the stack's key in front)."""
    strategies_for(config, pm)
    for name in config.stacks or {}:
        try:
            strategies_for(config.for_stack(name), pm)
        except ConfigError as exc:
            raise ConfigError(f"`stacks.{name}`: {exc}") from None


def calibration_batches(
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


def calibration_record(
    base: nn.Module,
    batches: CalibrationBatches | None,
    stats: CalibrationStats,
    config: PlanConfig,
    requires: frozenset[str],
) -> CalibrationRecord:
    """The calibration facts of ``base`` (``batches`` ``None``: planned without data, from the weights alone)."""
    dtype, device = parameter_dtype(base), parameter_device(base)
    return calibration_facts(
        batches,
        stats,
        config,
        requires,
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
        device=device.type if device is not None else None,
        quantization=quantization_of(base) or None,
        weights="model" if WEIGHTS in requires else None,
    )


def calibration_facts(
    batches: CalibrationBatches | None,
    stats: CalibrationStats,
    config: PlanConfig,
    requires: frozenset[str],
    *,
    dtype: str | None,
    device: str | None,
    quantization: str | None,
    weights: str | None,
) -> CalibrationRecord:
    """The calibration record from the data, the statistics and what is known of the weights (``weights``: where a
    weight-only selector read them, ``"model"`` or ``"checkpoint"``)."""
    return CalibrationRecord(
        num_samples=batches.num_samples if batches is not None else 0,
        num_tokens=batches.num_tokens if batches is not None else 0,
        max_length=config.max_length,
        batch_size=config.batch_size,
        data_hash=batches.data_hash if batches is not None else None,
        seed=config.seed,
        pooling=stats.meta.get("pooling"),
        last_token=config.last_token,
        dtype=dtype,
        device=device,
        statistics=sorted(requires),
        batching="by length" if batches is not None and batches.order is not None else None,
        lora_drop=dict(stats.meta["lora_drop"]) if "lora_drop" in stats.meta else None,
        quantization=quantization,
        weights=weights,
    )


def check_data_free(chosen: Strategies, config: PlanConfig) -> None:
    """Planning without calibration data (``calibration_data=None``): only for strategies that read no statistic of
    a calibration pass (weight-only selectors such as ``snr``, the fixed baselines); anything else is refused."""
    needs = {
        "selector": set(chosen.selector.strategy.requires) - {WEIGHTS},
        "share": set(chosen.sharer.strategy.requires) - {WEIGHTS} if chosen.sharer else set(),
    }
    if needs["selector"]:
        raise ConfigError(
            f"`calibration_data` is None, but selector {config.selector!r} reads the calibration statistics "
            f"{sorted(needs['selector'])}. Give calibration data, or use a weight-only selector (snr, condition)."
        )
    if needs["share"]:
        raise ConfigError(
            f"`calibration_data` is None, but `share` {config.share!r} groups layers by their representations on "
            f"data ({sorted(needs['share'])}). Give calibration data, or set share=None."
        )


def data_free_stats(target_names: list[list[str]]) -> CalibrationStats:
    """The statistics of no calibration pass: no sample, only each layer's target modules (``target_names``)."""
    return CalibrationStats(
        num_layers=len(target_names),
        tokens=torch.zeros(0, dtype=torch.float64),
        batch_index=torch.zeros(0, dtype=torch.long),
        target_names=target_names,
    )


def weights_of(chosen: Strategies, stack: LayerStack, targets: list[str] | None, progress: bool) -> WeightSource | None:
    """What a weight-only selector reads: the model's own weights (``None`` for a selector that does not)."""
    if WEIGHTS not in chosen.requires:
        return None
    weights = ModelWeights(stack, targets)
    weights.progress = progress
    return weights


def record(
    base: nn.Module,
    stack: LayerStack,
    stats: CalibrationStats,
    config: PlanConfig,
    scoring: Scoring,
    allocation: Allocation,
    targets: list[str] | None,
    warnings: list[str],
) -> LoraPlan:
    """One stack's decisions as a plan of that stack, with the calibration's diagnostics and the stability of the
    ranking; what the plan warns about is added to ``warnings`` in the order it arose."""
    warnings += scoring.warnings + allocation.warnings
    diagnostics, degenerate = calibration_diagnostics(stats)
    warnings += degenerate
    rho = stability(scoring.selector, stats, config, stack.num_layers, scoring.ctx.k)
    sharing = allocation.sharing
    return LoraPlan(
        num_layers=stack.num_layers,
        selected_layers=allocation.selected,
        share_groups=sharing.groups,
        rank=None,
        rank_pattern=allocation.ranks.pattern,
        scores={**{name: [float(v) for v in values] for name, values in scoring.scores.items()}, **sharing.scores},
        similarity=sharing.similarity,
        config=config.to_dict(),
        model_fingerprint=fingerprint(base, stack),
        stack=StackRecord(
            path=stack.path,
            pattern=stack.pattern,
            ambiguous=stack.ambiguous,
            target_modules=sorted({name.rsplit(".", 1)[-1] for name in stats.target_names[0]}),
            module_shapes={name: list(io) for name, io in target_shapes(stack.layers[0], targets).items()},
        ),
        flagged_layers=scoring.flagged,
        diagnostics=diagnostics,
        stability={config.selector: rho} if rho is not None else {},
        notes=list(allocation.notes),
    )


def adjust(plan: LoraPlan, pm: pluggy.PluginManager, base: nn.Module, stats: CalibrationStats) -> None:
    """Let plugins adjust the plan, then check it (the rank and the price depend on its final selection and groups)."""
    call_hook(pm, "loraplan_adjust_plan", plan=plan, model=base, stats=stats)
    plan.validate()


def price(
    plan: LoraPlan,
    base_rank: int | None,
    costs: LayerCosts | None,
    cost_problem: str | None,
    budget: BudgetRecord | None,
) -> None:
    """Resolve the plan's rank (where ``r`` is known) and price it with the cost model, the budget's record kept
    beside the prediction; a plan without a cost model says why."""
    if base_rank is not None:
        plan.rank = plan.resolve_rank(base_rank)
        plan.calibration.base_rank = base_rank
        for stack in plan.stacks:  # an encoder-decoder model's: every stack at the rank the plan asks for
            stack.rank = plan.rank
            stack.calibration.base_rank = base_rank
    if costs is not None:
        rank = plan.resolve_rank(costs.rank)
        units = sum(plan.module_ranks(costs.rank)) if plan.rank_pattern else None
        predicted = predictions(costs, plan.adapted_layers, plan.num_modules(), rank, rank_units=units)
        recorded = LayerCosts.from_dict(costs.to_dict())  # a copy: the plan's notes are added to it
        plan.cost = CostRecord(costs=recorded, predicted=predicted, budget=budget)
        if base_rank is None:
            recorded.notes.append(f"the LoRA rank was not known when planning; the cost model assumed r={costs.rank}")
        quantized = plan.calibration.quantization
        if quantized:
            recorded.notes.append(_quantized_cost_note(quantized, costs.source))
    else:
        plan.cost = CostRecord(unavailable=cost_problem)
        plan.warnings.append(f"no cost model: {cost_problem}")


def final(plan: LoraPlan, pm: pluggy.PluginManager) -> LoraPlan:
    """The plan made equal to its saved form, logged and handed to the final hook."""
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


# -- encoder-decoder models -------------------------------------------------------------------------------------

#: why an encoder-decoder plan has no cost model (and so no time or parameter budget)
NOT_PRICED = (
    "the cost model prices one layer stack; an encoder-decoder model's step (two stacks, cross-attention) is not "
    "priced yet"
)


def refuse_stacks(config: PlanConfig, stacks: list[LayerStack]) -> None:
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
