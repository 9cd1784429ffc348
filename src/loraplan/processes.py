"""Which process this is, and what the processes share: rank and world size, rank 0's result (or error) on every
rank, and ZeRO-3 partitioned weights gathered for a calibration pass. Nothing here knows what a plan is (the plan
across processes is :mod:`loraplan.distributed`).

Nothing here imports a trainer. ``torch.distributed`` is used only when it is initialised; DeepSpeed only when a
model's parameters carry ZeRO-3 metadata (``ds_id``).

- :func:`from_main` runs any function on rank 0 (or on every rank) and broadcasts rank 0's result, or rank 0's
  error, so that a failure never leaves the other ranks waiting.
- :func:`gathered_parameters` gathers each module's partitioned parameters around its own forward.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from . import errors
from .errors import LoraPlanError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger("loraplan")

__all__ = [
    "from_main",
    "gathered_parameters",
    "is_main_process",
    "is_partitioned",
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


def from_main(
    fn: Callable[[], T],
    *,
    every_rank: bool = False,
    encode: Callable[[T], Any] | None = None,
    decode: Callable[[Any], T] | None = None,
) -> T:
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
