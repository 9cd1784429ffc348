"""The ``LoraConfig`` that realises a plan, and the sites (:mod:`loraplan.sites`) it must give LoRA.

The rule a plan adds to a user's ``LoraConfig``: **the user's targets decide what gets LoRA, the plan decides where
in its layer stack.** The planned layers keep every target the config reaches there; the other layers of the stack
lose theirs (``exclude_modules``, and explicit ``target_parameters`` names, since PEFT's ``layers_to_transform`` and
``exclude_modules`` do not apply to parameters); whatever the config reaches outside the stack (a pooler, an
``lm_head`` target, a vision tower) keeps LoRA exactly as the config says and is reported. An encoder-decoder
model's plan covers both of its stacks (each excluded but for its planned layers); another text stack the plan does
not cover that the targets reach cannot be left unplanned: that is refused.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import ConfigError, PlanMismatchError
from .layers import LayerStack, linear_modules, other_text_stacks, target_modules_of, unwrap
from .sites import (
    MODULE,
    PARAMETER,
    Site,
    default_targets,
    layer_index,
    reached_sites,
    resolved_config,
    show_all,
)

if TYPE_CHECKING:
    from peft import LoraConfig

    from .plan import LoraPlan

__all__ = [
    "expected_sites",
    "is_planned",
    "other_stacks_reached",
    "plan_lora_config",
    "planned_config",
    "refuse_other_stacks",
    "stack_exclusion",
]

# -- the LoraConfig of a plan -------------------------------------------------------------------------------------


def _stack_path(plan: LoraPlan) -> str:
    path = plan.stack_path
    if not path:
        raise PlanMismatchError("the plan does not record where the layers are (`layers.path`); recompute it.")
    return path


def stack_exclusion(plan: LoraPlan) -> str:
    """The ``exclude_modules`` regex (PEFT full-matches it) of everything in the stack but the planned layers: the
    stack's own container and all of its unplanned layers (of every stack, for an encoder-decoder model's plan). It is
    always present in a planned config, so it also tells a config that was already made for this plan
    (:func:`plan_lora_config` is idempotent)."""
    if plan.stacks:
        return "|".join(f"(?:{stack_exclusion(one)})" for one in plan.stacks)
    selected = set(plan.adapted_layers)
    others = "|".join(str(i) for i in range(plan.num_layers) if i not in selected)
    path = re.escape(_stack_path(plan))
    return rf"{path}(?:\.(?:{others})(?:\..*)?)?" if others else path


def _made_for(exclusions: Any, ours: str) -> bool:
    return isinstance(exclusions, str) and (exclusions == ours or exclusions.endswith(f"|(?:{ours})"))


def _merged_exclusions(user: Any, ours: str) -> Any:
    """The user's ``exclude_modules`` (a regex or a list of names) and ours as one regex."""
    if not user or _made_for(user, ours):
        return user or ours
    if isinstance(user, str):
        return f"(?:{user})|(?:{ours})"
    names = "|".join(re.escape(n) for n in sorted(user))  # PEFT's list rule: the name, or a suffix after a dot
    return rf"(?:(?:.*\.)?(?:{names}))|(?:{ours})"


def _ranks(plan: LoraPlan, base: LoraConfig, config: LoraConfig) -> None:
    policy = plan.config.get("rank_policy", "keep")
    config.r = plan.resolve_rank(base.r)
    pattern = dict(base.rank_pattern or {})
    if plan.rank_pattern:
        _layer_ranks(plan, base, config)
        return
    if not pattern or policy == "keep":
        return
    if policy == "budget":
        # ShareLoRA's budget rule scales every rank by the same rule, the user's per-module ones included
        config.rank_pattern = {key: plan.resolve_rank(int(value)) for key, value in pattern.items()}
        return
    raise ConfigError(
        f"`rank_policy` is {policy!r}, one rank for every planned module, but the LoraConfig sets per-module ranks "
        f"(`rank_pattern` {pattern}). Keep them with rank_policy='keep' (or scale them with 'budget'), or drop "
        "rank_pattern from the LoraConfig."
    )


def _layer_ranks(plan: LoraPlan, base: LoraConfig, config: LoraConfig) -> None:
    """PEFT ``rank_pattern``/``alpha_pattern`` entries for the plan's per-layer ranks: layer ``i`` at rank ``r_i``
    scales every rank the LoraConfig gives its modules by ``r_i / r`` (so a per-module ``rank_pattern`` keeps its
    proportions), and its alphas by the same factor, which keeps ``alpha / r`` (not with ``use_rslora``, whose
    ``alpha / sqrt(r)`` is meant to stay put). Entries for a layer come first, so PEFT's first-match rule picks them;
    the user's own entries follow for everything else (outside the stack, the shared rest)."""
    made_for = plan.calibration.base_rank
    if made_for is not None and int(made_for) != base.r:
        raise ConfigError(
            f"`r`: the plan's per-layer ranks (rank_policy='importance') were allocated for a LoRA rank of "
            f"{made_for}, but the LoraConfig has r={base.r}. Use LoraConfig(r={made_for}), or make the plan again "
            f"with lora_rank={base.r} (CLI: --rank {base.r})."
        )
    user_ranks = dict(base.rank_pattern or {})
    user_alphas = dict(base.alpha_pattern or {})
    path = re.escape(_stack_path(plan))
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for layer, r in sorted(plan.rank_pattern.items()):
        factor = r / base.r
        prefix = rf"{path}\.{layer}\."
        for key, value in user_ranks.items():
            ranks[rf"{prefix}(?:.*\.)?(?:{key})"] = max(1, round(int(value) * factor))
        ranks[rf"{prefix}.*"] = r
        if base.use_rslora:
            continue
        for key, value in user_alphas.items():
            alphas[rf"{prefix}(?:.*\.)?(?:{key})"] = _number(value * factor)
        if factor != 1:
            alphas[rf"{prefix}.*"] = _number(base.lora_alpha * factor)
    config.rank_pattern = {**ranks, **user_ranks}
    config.alpha_pattern = {**alphas, **user_alphas}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _check_layers_to_transform(plan: LoraPlan, base: LoraConfig) -> None:
    given = base.layers_to_transform
    if given is None or (isinstance(given, list) and not given):
        return
    if plan.stacks:
        raise ConfigError(
            f"`layers_to_transform` is {given!r}, which PEFT applies to the layer numbers of every stack of this "
            "encoder-decoder model alike; loraplan decides the layers of each stack. Remove layers_to_transform "
            "(and layers_pattern) from the LoraConfig."
        )
    allowed = {given} if isinstance(given, int) else set(given)
    missing = [i for i in plan.adapted_layers if i not in allowed]
    if missing:
        raise ConfigError(
            f"`layers_to_transform` is {given!r}, which leaves out planned layers {missing}: LoRA would not reach "
            f"every layer the plan adapts ({plan.adapted_layers}). loraplan decides the layers: remove "
            "layers_to_transform (and layers_pattern) from the LoraConfig."
        )


def _other_stack_candidates(plan: LoraPlan) -> list[tuple[str, list[str]]]:
    """Recorded other text stacks, as (path, full module names of their linear modules)."""
    found = []
    for stack in plan.stack.other_stacks or []:
        names = [f"{stack['path']}.{i}.{m}" for i in range(int(stack["num_layers"])) for m in stack.get("modules", [])]
        found.append((stack["path"], names))
    return found


def _reached_by_name(config: LoraConfig, names: list[str], model_type: str | None) -> list[str]:
    """Which of ``names`` (linear modules) ``config`` would give LoRA, without the model at hand."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return list(names)
    if targets is None:
        defaults = default_targets(model_type)
        if defaults is None:
            return []
        config = copy.deepcopy(config)
        config.target_modules = defaults
    return [n for n in names if check_target_module_exists(config, n)]


def refuse_other_stacks(reached: dict[str, list[str]], planned: str, model_class: str | None) -> None:
    """:class:`ConfigError` when LoRA targets reach text stacks the plan does not cover (``reached``: stack path ->
    names reached there)."""
    reached = {path: names for path, names in reached.items() if names}
    if not reached:
        return
    stacks = ", ".join(f"`{path}` ({show_all([(MODULE, n) for n in names], 2)})" for path, names in reached.items())
    raise ConfigError(
        f"`target_modules`: the LoRA targets reach {stacks}, a text layer stack of {model_class or 'this model'} "
        f"that the plan does not cover beside the planned `{planned}`; it would keep LoRA on every layer, unplanned. "
        "loraplan plans one stack, or both stacks of an encoder-decoder model (config.is_encoder_decoder): restrict "
        f"target_modules to the planned stack (e.g. a regex that starts with {re.escape(planned)!r}), or plan this "
        "model as an encoder-decoder model."
    )


def other_stacks_reached(base: nn.Module, stack: LayerStack, targets: list[str] | None) -> list[dict[str, Any]]:
    """Other text layer stacks (the other half of an encoder-decoder model): refused when the LoRA targets reach
    them, else recorded in the plan so that a LoraConfig reaching them later is refused too."""
    found = []
    reached: dict[str, list[str]] = {}
    for path, blocks in other_text_stacks(base, stack.path):
        modules = sorted(linear_modules(blocks[0]))
        found.append({"path": path, "num_layers": len(blocks), "modules": modules})
        reached[path] = [
            f"{path}.{i}.{name}" for i, block in enumerate(blocks) for name in target_modules_of(block, targets)
        ]
    refuse_other_stacks(reached, stack.path, type(base).__name__)
    return found


def _planned_parameters(plan: LoraPlan, base: LoraConfig, model: nn.Module | None) -> list[str] | None:
    if not base.target_parameters:
        return None
    if model is None:
        raise ConfigError(
            f"`target_parameters` {sorted(base.target_parameters)}: PEFT's layers_to_transform and exclude_modules do "
            "not apply to parameters, so loraplan names each planned one, which needs the model. Call "
            "plan.to_lora_config(lora_config, model=model), or wrap the model with your LoraConfig and call "
            "loraplan.apply_plan(peft_model, plan)."
        )
    keys = [name for kind, name in reached_sites(model, base) if kind == PARAMETER and is_planned(plan, name)]
    return sorted(keys)


def is_planned(plan: LoraPlan, name: str) -> bool:
    """Whether a module or parameter ``name`` may carry LoRA under ``plan``: it is outside every planned stack, or in
    a layer the plan adapts."""
    for one in plan.stack_plans():
        index = layer_index(name, _stack_path(one))
        if index is not None:
            return index in one.adapted_layers
    return True


def _peft_rewrites_targets(base: LoraConfig, model_type: str | None) -> bool:
    """Whether PEFT, when it wraps a model of ``model_type``, turns some of ``base``'s targets into expert parameters
    (its transformers v5 MoE conversion), which only the model itself tells how to narrow."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:  # pragma: no cover - a PEFT without the conversion
        return False
    mapping = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), {})
    targets = base.target_modules
    if not mapping or not targets:
        return False
    return isinstance(targets, str) or any(t == old or t.endswith("." + old) for t in targets for old in mapping)


def plan_lora_config(plan: LoraPlan, base: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """A copy of ``base`` that gives LoRA exactly where ``plan`` and ``base`` together say (see the module
    docstring): ``exclude_modules`` gains the stack's unplanned layers, ``target_parameters`` become the planned
    parameters' full names, ``r`` and ``rank_pattern`` follow the plan's rank policy (the budget rule scales
    per-module ranks; alphas are kept). Applying it to a config it made already changes nothing.

    ``model`` (the model to wrap, or the wrapped one) is needed for ``target_parameters`` and for MoE targets that
    PEFT turns into parameters; with it, targets are first resolved as PEFT resolves them on that model
    (``"all-linear"``, default targets, the MoE conversion) and the result is checked against what PEFT builds from
    it. Never produces ``layers_to_transform=[]``.
    """
    return planned_config(plan, base, model)[0]


def planned_config(
    plan: LoraPlan, base: LoraConfig, model: nn.Module | None = None
) -> tuple[LoraConfig, set[Site] | None]:
    """:func:`plan_lora_config` and, with ``model``, the sites the config gives LoRA on it (checked against what
    ``base`` reaches there minus the unplanned layers)."""
    from peft import LoraConfig

    if not isinstance(base, LoraConfig):
        raise ConfigError(f"`base_lora_config` must be a peft.LoraConfig, got {type(base).__name__}.")
    plan.validate()
    path = _stack_path(plan.stack_plans()[0])
    _check_layers_to_transform(plan, base)
    model_type = plan.model_fingerprint.model_type
    if model is None and _peft_rewrites_targets(base, model_type):
        raise ConfigError(
            f"`target_modules` {base.target_modules!r}: when PEFT wraps a {model_type} model it turns these targets "
            "into expert parameters (target_parameters), which loraplan can narrow to the planned layers only with "
            "the model at hand. Call plan.to_lora_config(lora_config, model=model), or wrap the model with your "
            "LoraConfig and call loraplan.apply_plan(peft_model, plan)."
        )
    source = resolved_config(base, unwrap(model)) if model is not None else base
    config = copy.deepcopy(source)
    ours = stack_exclusion(plan)
    if not _made_for(source.exclude_modules, ours):  # a config made for this plan keeps its (already planned) ranks
        _ranks(plan, source, config)
    config.exclude_modules = _merged_exclusions(source.exclude_modules, ours)
    parameters = _planned_parameters(plan, source, model)
    if parameters is not None:
        config.target_parameters = parameters
    if model is None:
        refuse_other_stacks(
            {p: _reached_by_name(base, names, model_type) for p, names in _other_stack_candidates(plan)},
            path,
            plan.model_fingerprint.class_name,
        )
        return config, None
    wanted = expected_sites(model, plan, base)
    got = reached_sites(model, config)
    if got != wanted:  # pragma: no cover - a gap in the translation above, not a user error
        raise PlanMismatchError(
            "loraplan cannot express this plan in a LoraConfig for this model: the rewritten config would "
            + (f"add LoRA on {show_all(got - wanted)}" if got - wanted else "")
            + ("; " if got - wanted and wanted - got else "")
            + (f"miss {show_all(wanted - got)}" if wanted - got else "")
            + ". Please report this with the LoraConfig you used."
        )
    return config, wanted


def expected_sites(model: nn.Module, plan: LoraPlan, base: LoraConfig) -> set[Site]:
    """What ``base`` reaches on ``model``, minus the planned stacks' unplanned layers: where LoRA must sit once the
    plan is applied. Refuses a text stack the plan does not cover that ``base`` reaches."""
    paths = [_stack_path(one) for one in plan.stack_plans()]
    reached = reached_sites(model, base)
    others: dict[str, list[str]] = {
        p: [] for p, _ in other_text_stacks(unwrap(model), paths[0]) if p not in paths and not _nested(p, paths)
    }
    for site in reached:
        for other in others:
            if site[1].startswith(other + "."):
                others[other].append(site[1])
    refuse_other_stacks(others, paths[0], type(unwrap(model)).__name__)
    return {s for s in reached if is_planned(plan, s[1])}


def _nested(path: str, paths: list[str]) -> bool:
    return any(path.startswith(p + ".") or p.startswith(path + ".") for p in paths)
