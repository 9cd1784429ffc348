"""Hook specifications: what a loraplan plugin can implement.

A plugin is any object or module with functions marked ``@loraplan.hookimpl`` whose names are below. Hooks are
called with keyword arguments only; an implementation may take fewer arguments than its specification.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._markers import hookspec

if TYPE_CHECKING:
    from torch import nn

    from ..layers import LayerStack
    from ..plan import LoraPlan
    from ..strategies import Selector, Sharer


# -------------------------------------------------------------------------------------------------------------------
# strategy registration hooks
# -------------------------------------------------------------------------------------------------------------------


@hookspec
def loraplan_register_selectors(register: Callable[[Selector], None]) -> None:
    """Register layer selectors by calling ``register(selector)`` once per selector.

    A selector is an object with a ``name`` and a ``score(ctx)`` method (see :class:`loraplan.strategies.Selector`).
    Its name is what users write in ``PlanConfig(selector=...)``, in ``--selector`` and in YAML.

    :param register: Call it with each selector this plugin provides.
    """


@hookspec
def loraplan_register_sharers(register: Callable[[Sharer], None]) -> None:
    """Register layer sharers by calling ``register(sharer)`` once per sharer.

    A sharer is an object with a ``name`` and a ``share(ctx)`` method (see :class:`loraplan.strategies.Sharer`).
    Its name is what users write in ``PlanConfig(share=...)``.

    :param register: Call it with each sharer this plugin provides.
    """


# -------------------------------------------------------------------------------------------------------------------
# model hooks
# -------------------------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def loraplan_find_layers(model: nn.Module) -> LayerStack | None:
    """Find the transformer layer stack of ``model``.

    Stops at first non-None result. Built-in discovery runs last, so a plugin can teach loraplan an
    architecture it does not know, or override how a known one is read.

    :param model: The unwrapped model (a PEFT wrapper has already been removed).
    :returns: A :class:`loraplan.layers.LayerStack`, or ``None`` if this plugin does not know the model.
    """


# -------------------------------------------------------------------------------------------------------------------
# plan hooks
# -------------------------------------------------------------------------------------------------------------------


@hookspec
def loraplan_adjust_plan(plan: LoraPlan, model: nn.Module, stats: Any) -> None:
    """Adjust a plan after selection and sharing, before it is final.

    Change ``plan`` in place (for example pin a layer, or drop a group); record why in ``plan.warnings`` or
    ``plan.notes``. Called once per plan, in plugin order.

    :param plan: The plan being built.
    :param model: The unwrapped model it is for.
    :param stats: The :class:`loraplan.calibration.CalibrationStats` of the calibration pass.
    """


@hookspec
def loraplan_plan_final(plan: LoraPlan) -> None:
    """Be told a plan is final (for logging, tracking, checks). Do not change it.

    :param plan: The finished plan.
    """
