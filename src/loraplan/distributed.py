"""Plans across processes: every rank ends with the identical plan, and calibration works on weights that
DeepSpeed ZeRO-3 has already partitioned.

- :func:`make_plan_everywhere` computes a plan once and hands rank 0's plan to every rank. With ZeRO-3 weights
  every rank runs the same calibration (the parameter gathers are collectives), each module's parameters gathered
  around its own forward, in the same order everywhere; otherwise only rank 0 calibrates.
- :func:`load_plan_everywhere` reads a plan file on rank 0 and gives it to every rank.

The process helpers these are built from (rank, :func:`~loraplan.processes.from_main`,
:func:`~loraplan.processes.gathered_parameters`) are :mod:`loraplan.processes`'s; importing them from here still
works for a release, with a DeprecationWarning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import processes as _processes
from ._moved import moved
from .config import PlanConfig
from .hooks.manager import get_plugin_manager
from .plan import LoraPlan
from .planner import make_plan, strategies_for
from .strategies import GRADIENTS, LORA_OUTPUTS

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger("loraplan")

__all__ = ["load_plan_everywhere", "make_plan_everywhere"]

#: the process helpers this module re-exported until they were :mod:`loraplan.processes`'s alone
__getattr__ = moved(
    __name__,
    {
        name: "loraplan.processes"
        for name in ("from_main", "gathered_parameters", "is_main_process", "is_partitioned", "rank", "world_size")
    },
)


def _needs_whole_model(config: Any, plugin_manager: Any) -> bool:
    """Gradient scores and LoRA-drop's warm-up run a backward pass, which needs the weights again after each module's
    forward."""
    cfg = config if isinstance(config, PlanConfig) else PlanConfig.from_dict(dict(config or {}))
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    return bool({GRADIENTS, LORA_OUTPUTS} & strategies_for(cfg, pm).requires)


def make_plan_everywhere(
    model: nn.Module,
    calibration_data: Any,
    config: Any = None,
    tokenizer: Any = None,
    *,
    lora_rank: int | None = None,
    progress: bool = True,
    plugin_manager: Any = None,
    processor: Any = None,
) -> LoraPlan:
    """:func:`loraplan.make_plan` for a possibly distributed run: every rank returns rank 0's plan.

    With ZeRO-3 partitioned weights every rank calibrates on ``calibration_data`` (which must then be the same
    on every rank, as the first N training samples are) with the parameters gathered module by module; otherwise
    only rank 0 calibrates and the others wait for its plan.
    """
    partitioned = _processes.is_partitioned(model)
    whole = partitioned and _needs_whole_model(config, plugin_manager)

    def compute() -> LoraPlan:
        with _processes.gathered_parameters(model, whole_model=whole):
            return make_plan(
                model,
                calibration_data,
                config,
                tokenizer,
                lora_rank=lora_rank,
                progress=progress and _processes.is_main_process(),
                plugin_manager=plugin_manager,
                processor=processor,
            )

    if partitioned and _processes.world_size() > 1:
        logger.info("loraplan: ZeRO-3 partitioned weights; every rank calibrates, rank 0's plan is used")
    return _processes.from_main(compute, every_rank=partitioned, encode=LoraPlan.to_dict, decode=LoraPlan.from_dict)


def load_plan_everywhere(path: str | Path) -> LoraPlan:
    """Rank 0 reads the plan at ``path`` and every rank gets it (other ranks need not see the file)."""
    return _processes.from_main(lambda: LoraPlan.load(path), encode=LoraPlan.to_dict, decode=LoraPlan.from_dict)
