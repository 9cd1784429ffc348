"""The ``loraplan:`` block of an Axolotl YAML, as a pydantic model Axolotl merges into its config schema.

Every field is generated from :class:`loraplan.PlanConfig` (names, types, defaults and descriptions), and the block
is validated by building a ``PlanConfig``: defaults and validation exist once, in the core. An unknown or misspelt
key is a validation error that names it (Axolotl would otherwise drop undeclared keys silently).
Imports pydantic only.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ...config import TRUNCATE_BACKWARD_HELP, PlanConfig
from ...errors import ConfigError

__all__ = ["PLUGIN", "LoraPlanArgs", "LoraPlanAxolotlConfig"]

#: the dotted name users list under ``plugins:``
PLUGIN = "loraplan.integrations.axolotl.LoraPlanPlugin"

#: keys of the block that are not plan settings: how the Axolotl plugin finds a plan
EXTRA_KEYS = {
    "plan_path": (
        str | None,
        "A saved loraplan.json (or its directory) to use instead of calibrating. Default: reuse "
        "`<output_dir>/loraplan.json` when an earlier run left one there, else calibrate on the first "
        "`calibration_samples` examples of the configured training dataset.",
    ),
    "truncate_backward": (bool | None, TRUNCATE_BACKWARD_HELP),
}


class _BlockBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _validate_with_core(cls, data: Any) -> Any:
        if data is None:
            return data
        if not isinstance(data, dict):
            raise ValueError(
                f"`loraplan` must be a mapping of settings, got {type(data).__name__} ({data!r}). Write e.g. "
                "`loraplan: {selector: cka, ratio: 0.5}`, or `loraplan: {}` for the defaults."
            )
        settings = {k: v for k, v in dict(data).items() if k not in EXTRA_KEYS}
        try:
            config = PlanConfig.from_dict(settings)
        except ConfigError as exc:
            note = f" The block also takes {', '.join(f'`{k}`' for k in EXTRA_KEYS)}." if "unknown" in str(exc) else ""
            raise ValueError(f"loraplan: {exc}{note}") from None
        return {**config.to_dict(), **{k: v for k, v in dict(data).items() if k in EXTRA_KEYS}}

    def plan_config(self) -> PlanConfig:
        """The core settings of this block."""
        return PlanConfig.from_dict({k: v for k, v in self.model_dump().items() if k not in EXTRA_KEYS})


def _build_block() -> type[BaseModel]:
    hints = typing.get_type_hints(PlanConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(PlanConfig):
        help_text = f.metadata["help"]  # the one description of the setting (loraplan.config.setting)
        if f.default is not dataclasses.MISSING:
            spec = Field(default=f.default, description=help_text)
        else:
            spec = Field(default_factory=f.default_factory, description=help_text)  # type: ignore[arg-type]
        fields[f.name] = (hints[f.name], spec)
    for name, (annotation, description) in EXTRA_KEYS.items():
        fields[name] = (annotation, Field(default=None, description=description))
    return create_model(
        "LoraPlanAxolotlConfig",
        __base__=_BlockBase,
        __module__=__name__,
        __doc__="The `loraplan:` block: the fields of loraplan.PlanConfig, plus `plan_path` and `truncate_backward`.",
        **fields,
    )


LoraPlanAxolotlConfig = _build_block()


class LoraPlanArgs(BaseModel):
    """Plugin entry that exposes the nested `loraplan` block to the Axolotl config."""

    loraplan: LoraPlanAxolotlConfig | None = Field(  # type: ignore[valid-type]
        default=None,
        description=(
            "Layer selection and LoRA sharing (loraplan). Register the "
            f"`{PLUGIN}` plugin to enable this block; `loraplan: {{}}` uses the defaults."
        ),
    )

    @model_validator(mode="after")
    def _block_required(self) -> Any:
        if getattr(self, "loraplan", None) is None:
            raise ValueError(missing_block_message())
        return self


def missing_block_message() -> str:
    """What is wrong with a config that lists the plugin but has no ``loraplan:`` block, and the fix: the one wording
    of the args model's validation and of the plugin's own check when it reads the block."""
    defaults = PlanConfig()
    return (
        f"`loraplan`: the plugin `{PLUGIN}` is listed under `plugins:` but the config has no `loraplan:` block (or "
        "an empty one), so the plugin would do nothing. Add the block with the settings you want, e.g. "
        "`loraplan: {selector: cka, ratio: 0.5, share: angular}`, or `loraplan: {}` for the defaults "
        f"(selector={defaults.selector}, ratio={defaults.ratio}, share={defaults.share}); or remove the plugin."
    )
