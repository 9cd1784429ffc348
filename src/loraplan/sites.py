"""LoRA sites: the places a wrapped model carries LoRA, and the places a ``LoraConfig`` reaches on a model.

A *site* is one place that carries LoRA: a module PEFT replaced, ``("module", "model.layers.3.self_attn.q_proj")``,
or a parameter it wraps through ``target_parameters``, ``("parameter", "model.layers.3.mlp.experts.down_proj")``.
Names are relative to the transformers model, as PEFT's own matching sees them, and the sites a config reaches are
found with PEFT's own matching functions (not a copy of their rules), so that what this module predicts is what
``get_peft_model`` and ``PeftModel.from_pretrained`` do. The ``LoraConfig`` that realises a plan is
:mod:`loraplan.layout`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

from .layers import unwrap

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = [
    "MODULE",
    "PARAMETER",
    "Site",
    "adapters_of",
    "default_targets",
    "fold_ranges",
    "layer_index",
    "layers_carrying",
    "lora_sites",
    "reached_sites",
    "refused_targets",
    "resolved_config",
    "show",
    "show_all",
    "strip_base_layer",
    "summarise_sites",
]

Site = tuple[str, str]
MODULE = "module"
PARAMETER = "parameter"

#: path components of the internals of PEFT's other wrappers (modules_to_save, trainable tokens): never targets
_INTERNAL_PARTS = frozenset({"original_module", "modules_to_save", "token_adapter"})


def show(site: Site) -> str:
    """A site as the messages print it."""
    kind, name = site
    return name if kind == MODULE else f"{name} (parameter)"


def show_all(sites: Iterable[Site], limit: int = 6) -> str:
    names = [show(s) for s in sorted(sites)]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _internal(name: str) -> bool:
    """A module inside a PEFT wrapper (LoRA's own ``lora_A``/``lora_B``/..., a modules_to_save copy)."""
    return any(part.startswith("lora_") or part in _INTERNAL_PARTS for part in name.split("."))


def strip_base_layer(name: str) -> str:
    """A module name as PEFT matches it: without the ``base_layer`` components its wrappers insert."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def layer_index(name: str, path: str) -> int | None:
    """The index of the layer of the stack at ``path`` that holds ``name``, or ``None`` outside the stack."""
    if not name.startswith(path + "."):
        return None
    head = name[len(path) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def layers_carrying(model: nn.Module, adapter: str | None, path: str) -> list[int]:
    """The layers of the stack at ``path`` in which ``adapter`` has LoRA."""
    return sorted({i for _, name in lora_sites(model, adapter) if (i := layer_index(name, path)) is not None})


def adapters_of(module: nn.Module) -> set[str]:
    return set(getattr(module, "lora_A", {}) or {}) | set(getattr(module, "lora_embedding_A", {}) or {})


def lora_sites(model: nn.Module, adapter: str | None = None) -> dict[Site, nn.Module]:
    """Every site of ``model`` (a PEFT model or its base model) that carries LoRA for ``adapter`` (any adapter if
    ``None``), mapped to its LoRA layer. Nested parameter wrappers are one site each."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    found: dict[Site, nn.Module] = {}
    for name, module in unwrap(model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = adapters_of(module)
        if not adapters or (adapter is not None and adapter not in adapters):
            continue
        if isinstance(module, ParamWrapper):
            found[(PARAMETER, f"{strip_base_layer(name)}.{module.parameter_name}")] = module
        else:
            found[(MODULE, name)] = module
    return found


def default_targets(model_type: str | None) -> str | set[str] | None:
    """PEFT's default LoRA targets for a model type (what it uses when ``target_modules`` is unset)."""
    from peft.tuners.lora import LoraModel

    mapping = LoraModel.target_module_mapping.get(model_type)
    return mapping if mapping is None or isinstance(mapping, str) else set(mapping)


def resolved_config(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """A copy of ``config`` with the targets PEFT itself would resolve on ``model`` when wrapping it: the transformers
    v5 MoE conversion, the default targets of the model type, ``"all-linear"``."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    config = copy.deepcopy(config)
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "model_type"):
        try:
            from peft.utils.transformers_weight_conversion import (
                convert_peft_config_for_transformers,
                get_model_conversion_mapping,
            )
        except ImportError:  # pragma: no cover - older PEFT without the transformers v5 conversion
            pass
        else:
            convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
        if config.target_modules is None:
            config.target_modules = default_targets(getattr(model_config, "model_type", None))
    return _maybe_include_all_linear_layers(config, model)


def refused_targets(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Which of the module ``names`` (leaf names) stock PEFT refuses to give LoRA on ``model`` (its rule for Mamba-like
    models: no LoRA on ``out_proj`` or ``conv1d``), checked with PEFT's own function."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:  # pragma: no cover - a PEFT without the rule refuses nothing
        return set()
    config = LoraConfig(target_modules=["q_proj"])
    refused = set()
    for name in names:
        try:
            _check_lora_target_modules_mamba(config, model, name)
        except ValueError:
            refused.add(name)
    return refused


def _matches_parameter(key: str, targets: Iterable[str]) -> bool:
    """PEFT's rule for ``target_parameters``: the full name, or a suffix of it after a dot."""
    return any(key == t or key.endswith("." + t) for t in targets)


def reached_sites(model: nn.Module, config: LoraConfig) -> set[Site]:
    """The sites stock PEFT gives LoRA when it wraps ``model`` (or, for a wrapped model, loads an adapter onto its
    base) with ``config``: modules by PEFT's ``check_target_module_exists``, parameters by its ``target_parameters``
    rule."""
    from peft.tuners.tuners_utils import check_target_module_exists

    base = unwrap(model)
    config = resolved_config(config, base)
    sites: set[Site] = set()
    seen: set[str] = set()
    targets = config.target_modules
    parameters = set(config.target_parameters or [])
    for name, module in base.named_modules():
        if not name or _internal(name):
            continue
        key = strip_base_layer(name)
        if targets and key not in seen and check_target_module_exists(config, key):
            sites.add((MODULE, key))
        seen.add(key)
        if parameters:
            for parameter, _ in module.named_parameters(recurse=False):
                full = f"{key}.{parameter}"
                if _matches_parameter(full, parameters):
                    sites.add((PARAMETER, full))
    return sites


def fold_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, start = [], None
    for position, value in enumerate(indices):
        if start is None:
            start = value
        if position + 1 == len(indices) or indices[position + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def summarise_sites(sites: set[Site]) -> list[str]:
    """Sites as short lines: one per name pattern, with the layer numbers folded (``...layers.{0-23}.q_proj``)."""
    folded: dict[tuple[str, str], list[int]] = {}
    for kind, name in sites:
        match = re.search(r"\.(\d+)(?=\.)", name)
        if match is None:
            folded.setdefault((kind, name), [])
            continue
        pattern = name[: match.start()] + ".{}" + name[match.end() :]
        folded.setdefault((kind, pattern), []).append(int(match.group(1)))
    lines = []
    for (kind, pattern), indices in sorted(folded.items()):
        name = pattern.replace("{}", "{" + fold_ranges(sorted(indices)) + "}") if indices else pattern
        lines.append(show((kind, name)))
    return lines
