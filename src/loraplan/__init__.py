"""loraplan: decide which transformer layers get LoRA and which share one LoRA module, from a short calibration
pass over real data, before PEFT wraps the model."""

from __future__ import annotations

from .apply import apply_plan, load_adapter, save_adapter
from .config import PlanConfig
from .errors import (
    CalibrationError,
    ConfigError,
    LayerDiscoveryError,
    LoraPlanError,
    PlanMismatchError,
    PluginError,
)
from .hooks import get_plugin_manager, hookimpl
from .plan import LoraPlan
from .planner import make_plan
from .truncate import remove_truncation

__all__ = [
    "CalibrationError",
    "ConfigError",
    "LayerDiscoveryError",
    "LoraPlan",
    "LoraPlanError",
    "PlanConfig",
    "PlanMismatchError",
    "PluginError",
    "apply_plan",
    "get_plugin_manager",
    "hookimpl",
    "load_adapter",
    "make_plan",
    "remove_truncation",
    "save_adapter",
]
