"""Plans across processes: every rank ends with the identical plan, and calibration works on weights that
DeepSpeed ZeRO-3 has already partitioned.

Nothing here imports a trainer. ``torch.distributed`` is used only when it is initialised; DeepSpeed only when a
model's parameters carry ZeRO-3 metadata (``ds_id``).

- :func:`make_plan_everywhere` computes a plan once and hands rank 0's plan to every rank. With ZeRO-3 weights
  every rank runs the same calibration (the parameter gathers are collectives), each module's parameters gathered
  around its own forward, in the same order everywhere; otherwise only rank 0 calibrates.
- :func:`from_main` runs any function on rank 0 (or on every rank) and broadcasts rank 0's result, or rank 0's
  error, so that a failure never leaves the other ranks waiting.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from . import errors
from .errors import LoraPlanError
from .plan import LoraPlan

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger("loraplan")

__all__ = [
    "from_main",
    "gathered_parameters",
    "is_main_process",
    "is_partitioned",
    "load_plan_everywhere",
    "make_plan_everywhere",
    "rank",
    "world_size",
]

T = TypeVar("T")


def _group_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if _group_ready() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return torch.distributed.get_world_size() if _group_ready() else 1


def is_main_process() -> bool:
    return rank() == 0


def is_partitioned(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is managed by DeepSpeed ZeRO-3 (created under ``deepspeed.zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _error_payload(exc: BaseException) -> tuple[str, str, str]:
    return ("error", type(exc).__name__, str(exc))


def _raise_from_payload(payload: tuple[str, str, str]) -> None:
    _, name, message = payload
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, LoraPlanError):
        raise cls(f"{message} (raised on rank 0)")
    raise LoraPlanError(f"rank 0 failed with {name}: {message}")


def from_main(fn: Callable[[], T], *, every_rank: bool = False, encode: Callable[[T], Any] | None = None,
              decode: Callable[[Any], T] | None = None) -> T:
    """Run ``fn`` on rank 0 (or on every rank with ``every_rank``) and return rank 0's result on every rank.

    An exception on rank 0 is broadcast and raised on every rank (as the same loraplan error class, or as
    :class:`~loraplan.errors.LoraPlanError` naming the original type), so no rank waits forever. ``encode`` turns
    the result into something picklable and ``decode`` turns it back (default: the object itself).
    Without a process group this is just ``fn()``.
    """
    if world_size() == 1:
        return fn()
    encode = encode or (lambda value: value)
    decode = decode or (lambda value: value)
    result: Any = None
    failure: BaseException | None = None
    if every_rank or is_main_process():
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after every rank has the news
            failure = exc
    payload: list[Any] = [None]
    if is_main_process():
        payload[0] = _error_payload(failure) if failure is not None else ("ok", encode(result))
    torch.distributed.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    kind = payload[0][0]
    if kind == "error":
        _raise_from_payload(payload[0])
    if is_main_process():
        return result
    return decode(payload[0][1])


@contextlib.contextmanager
def gathered_parameters(model: nn.Module, *, whole_model: bool = False) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters usable for a calibration pass.

    By default every module's own parameters are gathered just before its forward and released right after, so
    at most one module's weights are whole at a time. Every rank must run the same forward passes (same number
    of batches), because each gather is a collective. ``whole_model`` gathers everything for the duration (needed
    when a backward pass reads the weights again, e.g. gradient scores). A no-op for a model without ZeRO-3
    parameters.
    """
    if not is_partitioned(model):
        yield
        return
    import deepspeed

    if whole_model:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
        return
    open_contexts: dict[int, list[Any]] = {}
    handles = []

    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        if not own:
            continue

        def gather(mod: nn.Module, args: tuple, _own: list = own) -> None:
            context = deepspeed.zero.GatheredParameters(_own, modifier_rank=None)
            context.__enter__()
            open_contexts.setdefault(id(mod), []).append(context)

        def release(mod: nn.Module, args: tuple, output: Any) -> None:
            stack = open_contexts.get(id(mod))
            if stack:
                stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(gather))
        handles.append(module.register_forward_hook(release, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in open_contexts.values():
            while stack:
                stack.pop().__exit__(None, None, None)


def _needs_whole_model(config: Any, plugin_manager: Any) -> bool:
    """Gradient scores run a backward pass, which needs the weights again after each module's forward."""
    from .config import PlanConfig
    from .hooks.manager import get_plugin_manager, lookup, selectors
    from .strategies import GRADIENTS

    cfg = config if isinstance(config, PlanConfig) else PlanConfig.from_dict(dict(config or {}))
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    return GRADIENTS in set(lookup(selectors(pm), cfg.selector, "selector").strategy.requires)


def make_plan_everywhere(
    model: nn.Module,
    calibration_data: Any,
    config: Any = None,
    tokenizer: Any = None,
    *,
    lora_rank: int | None = None,
    progress: bool = True,
    plugin_manager: Any = None,
) -> LoraPlan:
    """:func:`loraplan.make_plan` for a possibly distributed run: every rank returns rank 0's plan.

    With ZeRO-3 partitioned weights every rank calibrates on ``calibration_data`` (which must then be the same
    on every rank, as the first N training samples are) with the parameters gathered module by module; otherwise
    only rank 0 calibrates and the others wait for its plan.
    """
    from .planner import make_plan

    partitioned = is_partitioned(model)
    whole = partitioned and _needs_whole_model(config, plugin_manager)

    def compute() -> LoraPlan:
        with gathered_parameters(model, whole_model=whole):
            return make_plan(
                model,
                calibration_data,
                config,
                tokenizer,
                lora_rank=lora_rank,
                progress=progress and is_main_process(),
                plugin_manager=plugin_manager,
            )

    if partitioned and world_size() > 1:
        logger.info("loraplan: ZeRO-3 partitioned weights; every rank calibrates, rank 0's plan is used")
    return from_main(compute, every_rank=partitioned, encode=LoraPlan.to_dict, decode=LoraPlan.from_dict)


def load_plan_everywhere(path: str | Path) -> LoraPlan:
    """Rank 0 reads the plan at ``path`` and every rank gets it (other ranks need not see the file)."""
    return from_main(lambda: LoraPlan.load(path), encode=LoraPlan.to_dict, decode=LoraPlan.from_dict)
