"""What every integration does the same way: find or compute the plan, check a model or a checkpoint against it,
and keep activation checkpointing non-reentrant when layers share LoRA modules.

Imports transformers/peft only inside functions, and no trainer framework at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..apply import adapter_of, check_layout, lora_modules_by_layer, plan_stack
from ..config import PlanConfig
from ..distributed import load_plan_everywhere
from ..errors import ConfigError, PlanMismatchError
from ..plan import PLAN_FILE, LoraPlan
from ..processes import from_main
from ..sites import layers_carrying
from ..truncate import is_torch_checkpoint

logger = logging.getLogger("loraplan")

__all__ = [
    "check_applied",
    "check_checkpoint",
    "Fsdp",
    "fsdp_in_use",
    "refuse_under_fsdp",
    "refuse_untested_engine",
    "non_reentrant_model",
    "resolve_plan",
]

#: why sharing needs non-reentrant checkpointing, quoted in warnings and errors
SHARING_REASON = (
    "layers share LoRA modules, and reentrant checkpointing runs a separate backward per layer, so the shared "
    "parameters' gradient hooks fire once per layer (DeepSpeed ZeRO-2/3 asserts, DDP reports a parameter marked "
    "ready twice)"
)


@dataclasses.dataclass(frozen=True)
class Fsdp:
    """How a run shards the model with FSDP: its version and the state dict a save writes."""

    version: int
    state_dict_type: str


def fsdp_in_use() -> Fsdp | None:
    """The FSDP settings of the accelerate state a ``Trainer`` set up, when it trains with FSDP, else ``None``. The
    state exists from ``Trainer.__init__`` on, before ``on_init_end``."""
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate comes with transformers' Trainer
        return None
    state = AcceleratorState._shared_state
    if not state or state.get("distributed_type") != DistributedType.FSDP:
        return None
    plugin = state.get("fsdp_plugin")
    return Fsdp(
        version=int(getattr(plugin, "fsdp_version", 1) or 1),
        state_dict_type=str(getattr(plugin, "state_dict_type", None) or "FULL_STATE_DICT"),
    )


def refuse_under_fsdp(fsdp: Fsdp | None, share: Any = None, plan: LoraPlan | None = None) -> None:
    """:class:`ConfigError` for what does not train right under FSDP: FSDP1 (loraplan's ties and truncation are
    proven with FSDP2 only), layers that share LoRA modules (``share`` asked for, or ``plan`` has share groups), and a
    sharded state dict (``Trainer.save_model`` then writes no adapter)."""
    if fsdp is None:
        return
    if fsdp.version != 2:
        raise ConfigError(
            f"`fsdp_version` is {fsdp.version}: loraplan is tested with FSDP2 only (fully_shard; its share groups and "
            "backward truncation are not proven with FSDP1's flat parameters). Set fsdp_version: 2 in the FSDP "
            "config (accelerate's fsdp_config, TrainingArguments.fsdp_config or Axolotl's fsdp_version)."
        )
    groups = plan.share_groups if plan is not None else None
    if share is not None or groups:
        name = share if share is not None else plan.share if plan is not None else None
        raise ConfigError(
            f"`share` is {name!r}"
            + (f" (share groups {groups})" if groups else "")
            + ": under FSDP2 every decoder layer is its own fully_shard unit, and a LoRA module shared by two layers "
            "would belong to two units (torch stops at accelerator.prepare with an unclear TypeError; sharded by "
            "hand, the tie survives training but a FULL_STATE_DICT checkpoint no longer resumes). Plan without "
            "sharing (share: null) under FSDP2, or train the shared plan with DDP or DeepSpeed ZeRO-2/3."
        )
    if "SHARDED" in fsdp.state_dict_type.upper():
        raise ConfigError(
            f"`fsdp_state_dict_type` is {fsdp.state_dict_type}: with a sharded state dict Trainer.save_model writes "
            "no adapter at all (only shard folders), so the planned adapter would not be saved. Set "
            "fsdp_state_dict_type: FULL_STATE_DICT."
        )


def sharding_engine() -> str | None:
    """``"DeepSpeed"`` or ``"FSDP"`` when the accelerate state a ``Trainer`` set up shards the model, else ``None``."""
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate comes with transformers' Trainer
        return None
    kind = (AcceleratorState._shared_state or {}).get("distributed_type")
    return {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.FSDP: "FSDP"}.get(kind)


def refuse_untested_engine(engine: str | None, encoder_decoder: bool = False, quantized: str | None = None) -> None:
    """:class:`ConfigError` for the combinations of a sharding engine (DeepSpeed, FSDP) with an encoder-decoder model
    or a quantized one, which loraplan does not test (docs/support.md): refused rather than trusted."""
    if engine is None:
        return
    what = []
    if encoder_decoder:
        what.append("an encoder-decoder model")
    if quantized:
        what.append(f"a {quantized} (bitsandbytes) model")
    if what:
        raise ConfigError(
            f"`{engine.lower()}`: training {' and '.join(what)} under {engine} is not tested with loraplan, so it is "
            "refused rather than trusted to be exact. Train it on one process or with DDP (both tested; "
            "docs/support.md), or without loraplan."
        )


def _normalised(config: PlanConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), sort_keys=True))


def config_differences(plan: LoraPlan, config: PlanConfig) -> list[str]:
    """Settings in which ``config`` differs from the ones ``plan`` was made with. A setting the plan does not record
    (it was made before the setting existed) counts as its default."""
    wanted = _normalised(config)
    defaults = _normalised(PlanConfig())
    made = {key: plan.config.get(key, defaults[key]) for key in wanted}
    return [f"{key}: plan {made[key]!r}, now {wanted[key]!r}" for key in sorted(wanted) if made[key] != wanted[key]]


def resolve_plan(
    *,
    plan: LoraPlan | None,
    plan_path: str | Path | None,
    reuse_dirs: Sequence[str | Path],
    config: PlanConfig,
    config_given: bool,
    calibrate: Callable[[], LoraPlan] | None,
    no_data_message: str,
) -> tuple[LoraPlan, str]:
    """The plan to use, and how it was obtained.

    Order: a plan object; ``plan_path``; a ``loraplan.json`` already in one of ``reuse_dirs`` (a resumed or
    repeated run: reused, never recomputed, and it must have been made with the same settings when settings are
    given); else ``calibrate()``. Without any of them: :class:`ConfigError` with ``no_data_message``.
    Every rank gets rank 0's plan.
    """
    if plan is not None:
        return plan, "given"
    if plan_path is not None:
        return load_plan_everywhere(plan_path), f"loaded from {plan_path}"

    def existing() -> str | None:
        for directory in reuse_dirs:
            candidate = Path(directory) / PLAN_FILE
            if candidate.is_file():
                return str(candidate)
        return None

    found = from_main(existing)
    if found is not None:
        reused = load_plan_everywhere(found)
        differences = config_differences(reused, config) if config_given else []
        if differences:
            raise ConfigError(
                f"`plan_path`: {found} holds the plan of an earlier run, made with other settings ("
                + "; ".join(differences)
                + "). A resumed run reuses its saved plan and never recomputes it. To plan again with the new "
                "settings, delete that file or use a fresh output directory; to keep the saved plan, pass the "
                "settings it was made with (or none)."
            )
        return reused, f"reused {found} (not recomputed)"
    if calibrate is None:
        raise ConfigError(no_data_message)
    return calibrate(), "computed from the calibration data"


def check_applied(model: Any, plan: LoraPlan, adapter_name: str | None = None) -> None:
    """Raise :class:`PlanMismatchError` unless, over the whole model, LoRA sits exactly where the plan and the
    adapter's config say (in the planned layers of the stack, and outside it only where the config reaches) and
    every share group uses one set of ``lora_A``/``lora_B`` modules."""
    adapter = adapter_of(model, adapter_name)
    if plan.stacks:  # an encoder-decoder model's plan: every stack as its own plan
        for one in plan.stacks:
            check_applied(model, one, adapter)
        return
    stack = plan_stack(model, plan)
    with_lora = layers_carrying(model, adapter, stack.path)
    if with_lora != plan.adapted_layers:
        raise PlanMismatchError(
            f"the model has LoRA in layers {with_lora} of `{stack.path}`, but the plan adapts {plan.adapted_layers}. "
            "Something re-wrapped or re-created the model after loraplan applied the plan (e.g. `model_init`); apply "
            "the plan to the model that trains."
        )
    check_layout(model, adapter, model.peft_config[adapter], "when training began")
    by_layer = lora_modules_by_layer(model, stack, adapter)
    for group in plan.share_groups:
        lead = by_layer[group[0]]
        for member in group[1:]:
            for name, module in by_layer[member].items():
                if name not in lead:
                    continue
                for part in ("lora_A", "lora_B"):
                    if getattr(module, part)[adapter] is not getattr(lead[name], part)[adapter]:
                        raise PlanMismatchError(
                            f"share group {group}: {part} of {name!r} in layer {member} is no longer the module of "
                            f"layer {group[0]}. The tie was broken after the plan was applied (a checkpoint or "
                            "adapter load that re-created LoRA modules); re-apply the plan before training."
                        )


def _adapter_weights(directory: Path) -> dict[str, Any] | None:
    import torch

    safe = directory / "adapter_model.safetensors"
    if safe.is_file():
        from safetensors.torch import load_file

        return load_file(str(safe))
    legacy = directory / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(str(legacy), map_location="cpu", weights_only=True)
    return None


def check_checkpoint(checkpoint: str | Path, plan: LoraPlan) -> None:
    """Raise :class:`PlanMismatchError` unless ``checkpoint`` was trained with ``plan``: its ``loraplan.json``
    records the same layers, groups and rank, its adapter holds LoRA only in the planned layers, and the saved
    copies of each share group are identical (they were one tensor)."""
    directory = Path(checkpoint)
    plan_file = directory / PLAN_FILE
    if not plan_file.is_file():
        raise PlanMismatchError(
            f"the checkpoint {directory} has no {PLAN_FILE}, so it was not saved by a run with this plan (loraplan "
            "writes the plan beside every checkpoint). Resume from a checkpoint of this run, or start a new run "
            "in a fresh output directory."
        )
    saved = LoraPlan.load(plan_file)
    for what in ("selected_layers", "share_groups", "rank", "rank_pattern", "num_layers"):
        if getattr(saved, what) != getattr(plan, what):
            raise PlanMismatchError(
                f"`{what}`: the checkpoint {directory} was trained with {getattr(saved, what)!r}, this run's plan "
                f"has {getattr(plan, what)!r}. Resume with the plan of that run (it is {plan_file}), or train "
                "from scratch in a fresh output directory."
            )
    weights = _adapter_weights(directory)
    if weights is None:
        return
    for one in plan.stack_plans():
        _check_saved_layers(directory, one, weights)


def _check_saved_layers(directory: Path, plan: LoraPlan, weights: dict[str, Any]) -> None:
    """The adapter's LoRA weights in ``plan``'s stack sit in its adapted layers, and each share group's are equal."""
    path = plan.stack_path or ""
    pattern = re.compile(rf"(?:^|\.){re.escape(path)}\.(\d+)\.")
    by_layer: dict[int, dict[str, Any]] = {}
    for key, tensor in weights.items():
        if "lora_" not in key:
            continue
        match = pattern.search(key)
        if match is None:
            continue
        layer = int(match.group(1))
        if layer not in plan.adapted_layers:
            raise PlanMismatchError(
                f"the checkpoint {directory} has LoRA weights in layer {layer} ({key}), which the plan does not "
                f"adapt ({plan.adapted_layers}). It was trained with another plan."
            )
        by_layer.setdefault(layer, {})[key[: match.start(1)] + "{}" + key[match.end(1) :]] = tensor
    for group in plan.share_groups:
        lead = by_layer.get(group[0], {})
        for member in group[1:]:
            for key, tensor in by_layer.get(member, {}).items():
                other = lead.get(key)
                if other is None or tensor.numel() == 0:
                    continue
                if not bool((other == tensor).all()):
                    raise PlanMismatchError(
                        f"share group {group}: the checkpoint {directory} holds different {key.format('<i>')} in "
                        f"layers {group[0]} and {member}, so they were not one tensor when it was saved. It was "
                        "trained without these share groups."
                    )


def non_reentrant_model(model: Any) -> int:
    """Make every module that already checkpoints its forward use torch's non-reentrant checkpointing.

    Returns how many modules were switched from reentrant (or unspecified) to non-reentrant. A module that
    checkpoints with something other than ``torch.utils.checkpoint.checkpoint`` (e.g. a custom offloading
    autograd function) cannot be switched: :class:`ConfigError` says which and why.
    """
    switched = 0
    for name, module in model.named_modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is None or not getattr(module, "gradient_checkpointing", False):
            continue
        inner, keywords = (fn.func, dict(fn.keywords)) if isinstance(fn, functools.partial) else (fn, {})
        if not is_torch_checkpoint(inner):
            label = getattr(inner, "__qualname__", type(inner).__name__)
            raise ConfigError(
                f"activation checkpointing of {name or 'the model'} uses {label}, not torch's checkpoint, and "
                f"shared LoRA modules need non-reentrant checkpointing: {SHARING_REASON}. Turn off the custom "
                "checkpointing/offloading (e.g. Axolotl `activation_offloading: legacy` or `disk`), or set "
                "`share: null` in the loraplan settings."
            )
        if keywords.get("use_reentrant") is False:
            continue
        keywords["use_reentrant"] = False
        module._gradient_checkpointing_func = functools.partial(inner, *getattr(fn, "args", ()), **keywords)
        switched += 1
    return switched
