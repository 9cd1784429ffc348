"""The validation of :class:`~loraplan.config.PlanConfig`'s settings, and the values they allow.

One check per group of related settings, each error naming its key and the fix; ``PlanConfig.__post_init__`` calls
them in field order. The checks take the values, not the config, so this module needs nothing from
:mod:`loraplan.config` (which imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

__all__ = [
    "COST_MODELS",
    "LAST_TOKEN_MODES",
    "POOLINGS",
    "RANK_POLICIES",
    "STACK_NAMES",
    "STACK_SETTINGS",
    "check_budgets",
    "check_calibration",
    "check_cost",
    "check_data",
    "check_options",
    "check_ranks",
    "check_selection",
    "check_stacks",
    "check_switches",
    "check_target_modules",
]

POOLINGS = ("auto", "last", "first", "mean")
#: the settings `stacks` may give one stack of an encoder-decoder model (how that stack is selected and shared)
STACK_SETTINGS = ("selector", "ratio", "count", "cumulative", "share", "share_threshold")
#: the stacks `stacks` may name (loraplan.layers.STACK_ROLES)
STACK_NAMES = ("encoder", "decoder")
LAST_TOKEN_MODES = ("auto", "mask", "reference")
RANK_POLICIES = ("keep", "budget", "importance")
COST_MODELS = ("flops", "timed", "fitted")


# -- the groups of settings, in PlanConfig's field order ------------------------------------------------------------


def check_selection(
    *, selector: Any, ratio: Any, count: Any, cumulative: Any, share: Any, share_threshold: Any
) -> None:
    """How many layers, chosen how, and how they are shared."""
    _check_str("selector", selector, "a selector name such as 'cka' or 'activation'")
    _check_number("ratio", ratio, 0.0, 1.0, low_open=True, fix="e.g. ratio=0.5 keeps half the layers")
    if count is not None:
        _check_int("count", count, 1, "an explicit number of layers to keep, at least 1")
    if cumulative is not None:
        _check_number(
            "cumulative", cumulative, 0.0, 1.0, low_open=True, fix="e.g. cumulative=0.9 keeps 90 % of the score"
        )
    if share is not None:
        _check_str("share", share, "a sharer name such as 'angular', or None for no sharing")
    _check_number("share_threshold", share_threshold, 0.0, 1.0, fix="the paper used 0.85 for LLaMA-2, 0.80 for LLaMA-3")


def check_ranks(*, rank_policy: Any, min_rank: Any, rank_multiple: Any, max_rank: Any = None) -> None:
    """The rank of the planned modules, and the bounds of an importance allocation."""
    if isinstance(rank_policy, bool) or not (
        rank_policy in RANK_POLICIES or (isinstance(rank_policy, int) and rank_policy >= 1)
    ):
        raise ConfigError(
            f"`rank_policy` must be 'keep', 'budget', 'importance' or a positive integer, got "
            f"{rank_policy!r}. Use 'keep' for the LoRA config's r, 'budget' for ShareLoRA's budget rule, "
            "'importance' for per-layer ranks in proportion to the selector's scores, or e.g. rank_policy=16."
        )
    _check_int("min_rank", min_rank, 1, "the smallest rank a layer gets, e.g. 4")
    _check_int("rank_multiple", rank_multiple, 1, "the multiple every allocated rank is rounded to, e.g. 4")
    if max_rank is not None:
        _check_int("max_rank", max_rank, 1, "the largest rank a layer gets, e.g. 64, or None for no cap")
        if max_rank < min_rank or max_rank < rank_multiple:
            raise ConfigError(
                f"`max_rank` {max_rank} is below `min_rank` {min_rank} or `rank_multiple` {rank_multiple}, so no "
                "layer could get a rank. Raise max_rank to at least both, or lower them."
            )


def check_calibration(
    *, lora_drop_steps: Any, calibration_samples: Any, max_length: Any, batch_size: Any, seed: Any
) -> None:
    """The sizes of the calibration pass (and of LoRA-drop's warm-up), and the seed."""
    if lora_drop_steps is not None:
        _check_int("lora_drop_steps", lora_drop_steps, 1, "the warm-up steps of selector='lora_drop'")
    _check_int("calibration_samples", calibration_samples, 1, "the number of calibration samples, e.g. 128")
    _check_int("max_length", max_length, 1, "tokens per calibration sample, e.g. 512")
    _check_int("batch_size", batch_size, 1, "samples per calibration batch, e.g. 8")
    _check_int("seed", seed, 0, "a non-negative integer seed")


def check_target_modules(target_modules: Any) -> list[str] | None:
    """The modules the metrics read, as a list (``None`` stays ``None``)."""
    if target_modules is None:
        return None
    if isinstance(target_modules, str) or not all(isinstance(m, str) for m in target_modules):
        raise ConfigError(
            f"`target_modules` must be a list of module names, got {target_modules!r}. "
            "Pass e.g. ['q_proj', 'v_proj'], or leave it unset to use the LoRA config's targets."
        )
    if not target_modules:
        raise ConfigError(
            "`target_modules` must name at least one module, got []. Name e.g. ['q_proj'], or leave it unset."
        )
    return list(target_modules)


def check_data(*, text_field: Any, target_field: Any, image_field: Any, pooling: Any, last_token: Any) -> None:
    """Where a calibration row keeps its text and image, and how a sample becomes one vector."""
    _check_str("text_field", text_field, "the name of the text column, e.g. 'text'")
    _check_str("target_field", target_field, "the name of the decoder's text column, e.g. 'target'")
    _check_str("image_field", image_field, "the name of the image column, e.g. 'image'")
    _check_choice("pooling", pooling, POOLINGS)
    _check_choice("last_token", last_token, LAST_TOKEN_MODES)


def check_switches(**switches: Any) -> None:
    """The on/off settings, in the order given."""
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise ConfigError(f"`{name}` must be true or false, got {value!r}.")


def check_budgets(*, time_budget: Any, param_budget: Any, cumulative: Any) -> None:
    """The step-time and parameter budgets, which `cumulative` must not be set beside."""
    if time_budget is not None:
        _check_number(
            "time_budget",
            time_budget,
            0.0,
            1.0,
            low_open=True,
            fix="a fraction of the step time of LoRA on every layer, e.g. time_budget=0.6",
        )
    if param_budget is not None:
        _check_number(
            "param_budget",
            param_budget,
            0.0,
            1.0,
            low_open=True,
            fix="a fraction of the trainable parameters of LoRA on every layer, e.g. param_budget=0.5",
        )
    if cumulative is not None and (time_budget is not None or param_budget is not None):
        given, value = ("time_budget", time_budget) if time_budget is not None else ("param_budget", param_budget)
        raise ConfigError(
            f"`cumulative` ({cumulative!r}) and `{given}` ({value!r}) both decide how many "
            f"layers to keep; set one of them (e.g. cumulative=None)."
        )


def check_cost(*, cost_model: Any, cost_shape: Any) -> list[int] | None:
    """How the cost model prices a layer; the step shape it assumes, as a list (``None`` stays ``None``)."""
    _check_choice("cost_model", cost_model, COST_MODELS)
    if cost_shape is None:
        return None
    if (
        isinstance(cost_shape, str)
        or not hasattr(cost_shape, "__len__")
        or len(cost_shape) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in cost_shape)
    ):
        raise ConfigError(
            f"`cost_shape` must be [batch, sequence length], two positive integers, got {cost_shape!r}. "
            "Give the training step's shape, e.g. cost_shape=[8, 1024], or leave it unset."
        )
    return list(cost_shape)


def check_stacks(stacks: Any, for_stack: Callable[[str], object]) -> None:
    """The per-stack settings of an encoder-decoder model; ``for_stack`` builds (and so validates) one stack's."""
    if not isinstance(stacks, dict):
        raise ConfigError(
            f"`stacks` must be a mapping of stack name to settings, got {stacks!r}. Write e.g. "
            "stacks={'encoder': {'count': 2}, 'decoder': {'selector': 'all'}}."
        )
    for name, overrides in stacks.items():
        if name not in STACK_NAMES:
            raise ConfigError(
                f"`stacks` names the stack {name!r}; the stacks of an encoder-decoder model are "
                f"{', '.join(map(repr, STACK_NAMES))}."
            )
        if not isinstance(overrides, dict):
            raise ConfigError(f"`stacks.{name}` must be a mapping of settings, got {overrides!r}.")
        unknown = sorted(set(overrides) - set(STACK_SETTINGS))
        if unknown:
            raise ConfigError(
                f"`stacks.{name}` sets {', '.join(f'`{k}`' for k in unknown)}, which is not a per-stack setting. "
                f"Per stack: {', '.join(STACK_SETTINGS)}; every other setting holds for the whole model."
            )
        try:
            for_stack(name)
        except ConfigError as exc:
            raise ConfigError(f"`stacks.{name}`: {exc}") from None


def check_options(options: Any) -> None:
    """The third-party strategies' settings: any mapping."""
    if not isinstance(options, dict):
        raise ConfigError(f"`options` must be a mapping of plugin settings, got {options!r}.")


# -- one value ------------------------------------------------------------------------------------------------------


def _check_str(name: str, value: Any, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"`{name}` must be {what}, got {value!r}.")


def _check_int(name: str, value: Any, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"`{name}` must be {what} (an integer >= {low}), got {value!r}.")


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False, fix: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"`{name}` must be a number in {interval}, got {value!r}." + (f" Fix: {fix}." if fix else ""))


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}.")
