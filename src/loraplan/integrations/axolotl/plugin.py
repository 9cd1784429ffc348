"""`LoraPlanPlugin`: layer-selective and shared LoRA from an Axolotl YAML.

Lifecycle (Axolotl's model loader calls the hooks in this order):

- ``pre_model_load``: checks the config (a LoRA adapter, no hand-set ``peft_layers_to_transform``) and, when the
  ``loraplan:`` block asks for sharing, makes gradient checkpointing non-reentrant (or refuses a checkpointing
  mode that cannot be, with the reason).
- ``pre_lora_load``: reuses a saved plan, or calibrates the base model on the first ``calibration_samples``
  examples of the configured training dataset (every rank gets rank 0's plan), and writes it to ``output_dir``.
- ``post_lora_load``: applies the plan to the fresh ``PeftModel`` exactly as the HF callback does
  (:func:`loraplan.apply_plan`): LoRA stays on every target of the planned layers and, as the YAML's LoRA settings
  say, outside the stack; the stack's other layers lose it; ranks follow the plan's rank policy (``lora_rank_pattern``
  included); share groups are tied; the adapter config is rewritten so that the saved adapter reloads as it
  trained. (Setting ``peft_layers_to_transform`` before wrapping would drop targets outside the layers, would not
  reach ``lora_target_parameters`` and cannot address a stack whose name another module list shares.)
- ``add_callbacks_pre_trainer``: a :class:`~loraplan.integrations.hf.LoraPlanCallback` that writes the plan to
  ``output_dir`` and beside every checkpoint, and checks a resumed checkpoint against the plan.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin

from ...apply import apply_plan
from ...config import PlanConfig
from ...distributed import make_plan_everywhere
from ...errors import ConfigError
from ...plan import PLAN_FILE, LoraPlan
from ...processes import is_main_process
from .._common import (
    SHARING_REASON,
    Fsdp,
    check_checkpoint,
    refuse_under_fsdp,
    refuse_untested_engine,
    resolve_plan,
)
from .args import PLUGIN, LoraPlanAxolotlConfig, missing_block_message

logger = logging.getLogger("loraplan")
#: Axolotl's logger class shows INFO only for loggers under "axolotl": the plugin's summary lines go there
LOG = logging.getLogger("axolotl.loraplan")

__all__ = ["LoraPlanPlugin"]

#: Axolotl's activation-offloading modes that checkpoint with their own reentrant-style autograd functions
_CUSTOM_CHECKPOINTING = ("legacy", "disk", "offload_disk")


def _block(cfg: Any) -> Any:
    data = cfg.get("loraplan")
    if data is None:
        raise ConfigError(missing_block_message())
    return LoraPlanAxolotlConfig.model_validate(_plain(data))


def _plain(value: Any) -> Any:
    """Axolotl's DictDefault (and nested ones) as plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@contextlib.contextmanager
def _plain_attention(model: Any) -> Iterator[None]:
    """Let the base model run a forward pass between Axolotl's LoRA-kernel patches.

    With ``lora_qkv_kernel``/``lora_o_kernel`` (auto-enabled), Axolotl rewrites the attention class's forward
    before the model loads to call per-module ``apply_qkv``/``apply_o``, and installs those only after LoRA is
    loaded. For the calibration pass in between, each attention module gets Axolotl's own plain projections,
    removed again afterwards so that Axolotl's kernel setup proceeds as usual.
    """
    import types

    added = []
    try:
        from axolotl.monkeypatch import lora_kernels
    except ImportError:  # pragma: no cover - older/newer Axolotl without LoRA kernels
        yield
        return
    for module in model.modules():
        if not hasattr(type(module), "_original_forward") or not hasattr(module, "q_proj"):
            continue
        if not hasattr(module, "apply_qkv"):
            plain = (
                lora_kernels.original_apply_qkv_optional_v
                if getattr(module, "v_proj", "absent") is None
                else lora_kernels.original_apply_qkv
            )
            module.apply_qkv = types.MethodType(plain, module)
            added.append((module, "apply_qkv"))
        if not hasattr(module, "apply_o"):
            module.apply_o = types.MethodType(lora_kernels.original_apply_o, module)
            added.append((module, "apply_o"))
    try:
        yield
    finally:
        for module, name in added:
            delattr(module, name)


def _fsdp(cfg: Any) -> Fsdp | None:
    """Axolotl's FSDP settings (``fsdp_config``, ``fsdp_version``), when the config trains with FSDP."""
    fsdp = cfg.get("fsdp_config")
    if not fsdp:
        return None
    version = cfg.get("fsdp_version") or fsdp.get("fsdp_version") or 2
    state_dict = fsdp.get("state_dict_type") or fsdp.get("fsdp_state_dict_type") or "FULL_STATE_DICT"
    return Fsdp(version=int(version), state_dict_type=str(state_dict))


class LoraPlanPlugin(BasePlugin):
    """Axolotl plugin: plan which layers get LoRA and which share it, from a short calibration pass.

    Enable it with ``plugins: [loraplan.integrations.axolotl.LoraPlanPlugin]`` and a ``loraplan:`` block (see
    ``README.md`` next to this file).
    """

    def __init__(self) -> None:
        super().__init__()
        self.plan: LoraPlan | None = None
        self.truncate_backward = True

    def get_input_args(self) -> str:
        return "loraplan.integrations.axolotl.args.LoraPlanArgs"

    # -- before the model ---------------------------------------------------------------------------------------
    def pre_model_load(self, cfg: Any) -> None:
        block = _block(cfg)
        if cfg.get("adapter") not in ("lora", "qlora"):
            raise ConfigError(
                f"`adapter` is {cfg.get('adapter')!r}, but loraplan plans LoRA adapters. Set `adapter: lora` (or "
                f"qlora), or remove `{PLUGIN}` from `plugins:`."
            )
        if cfg.get("peft_layers_to_transform"):
            raise ConfigError(
                f"`peft_layers_to_transform` is set to {list(cfg.peft_layers_to_transform)}, but loraplan decides "
                "which layers get LoRA. Remove `peft_layers_to_transform` (and `peft_layers_pattern`) from the config."
            )
        refuse_under_fsdp(_fsdp(cfg), share=block.share)
        quantized = "4-bit" if cfg.get("load_in_4bit") else ("8-bit" if cfg.get("load_in_8bit") else None)
        engine = "DeepSpeed" if cfg.get("deepspeed") else ("FSDP" if cfg.get("fsdp_config") else None)
        refuse_untested_engine(engine, quantized=quantized)
        if block.share is not None and cfg.get("gradient_checkpointing"):
            offloading = cfg.get("activation_offloading")
            if offloading in _CUSTOM_CHECKPOINTING:
                raise ConfigError(
                    f"`activation_offloading: {offloading}` checkpoints layers with a custom reentrant autograd "
                    f"function, which cannot train shared LoRA modules: {SHARING_REASON}. Use "
                    "`activation_offloading: true` (or none), or set `loraplan: {share: null}`."
                )
            kwargs = dict(cfg.get("gradient_checkpointing_kwargs") or {})
            if kwargs.get("use_reentrant") is not False:
                logger.warning(
                    "loraplan: `gradient_checkpointing_kwargs.use_reentrant` was %r; set to false because `loraplan."
                    "share` is %r: %s.",
                    kwargs.get("use_reentrant"),
                    block.share,
                    SHARING_REASON,
                )
                kwargs["use_reentrant"] = False
                cfg.gradient_checkpointing_kwargs = kwargs

    # -- the plan: before PEFT wraps -----------------------------------------------------------------------------
    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        block = _block(cfg)
        config = block.plan_config()
        reuse = [Path(cfg.lora_model_dir)] if cfg.get("lora_model_dir") else []
        reuse.append(Path(cfg.output_dir))
        plan, how = resolve_plan(
            plan=None,
            plan_path=block.plan_path,
            reuse_dirs=reuse,
            config=config,
            config_given=True,
            calibrate=lambda: self._calibrate(cfg, model, config),
            no_data_message="`loraplan`: no plan and no calibration data.",
        )
        plan.check_model(model)
        refuse_under_fsdp(_fsdp(cfg), plan=plan)  # a saved plan (plan_path) may carry share groups
        self.truncate_backward = block.truncate_backward is not False
        self.plan = plan
        LOG.info(
            "loraplan: plan %s: LoRA on layers %s%s",
            how,
            plan.selected_layers,
            f", share groups {plan.share_groups}" if plan.share_groups else "",
        )
        if is_main_process():
            plan.save(Path(cfg.output_dir) / PLAN_FILE)

    def _calibrate(self, cfg: Any, model: Any, config: PlanConfig) -> LoraPlan:
        if cfg.get("rl"):
            raise ConfigError(
                f"`rl` is {cfg.rl!r}: loraplan calibrates on supervised training rows, not preference pairs. Compute "
                "a plan first (e.g. `loraplan analyze`) and pass it as `loraplan: {plan_path: ...}`."
            )
        from axolotl.loaders import load_tokenizer
        from axolotl.utils.data import prepare_datasets

        tokenizer = load_tokenizer(cfg)
        # Axolotl prepared (and cached) the training data before loading the model; this reads the same rows back
        train_dataset, _, _, _ = prepare_datasets(cfg, tokenizer)
        columns = getattr(train_dataset, "column_names", None) or []
        if "input_ids" in columns:
            train_dataset = train_dataset.select_columns(
                [c for c in ("input_ids", "attention_mask", "labels") if c in columns]
            )
        with _plain_attention(model):
            return make_plan_everywhere(model, train_dataset, config, tokenizer, lora_rank=int(cfg.lora_r))

    # -- applying it: after PEFT wraps ---------------------------------------------------------------------------
    def post_lora_load(self, cfg: Any, model: Any) -> None:
        if self.plan is None:
            raise ConfigError(f"`{PLUGIN}`: post_lora_load ran without pre_lora_load; the plan is missing.")
        if cfg.get("lora_model_dir"):
            check_checkpoint(cfg.lora_model_dir, self.plan)
        apply_plan(model, self.plan, truncate_backward=self.truncate_backward)

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        from ..hf import LoraPlanCallback

        if self.plan is None:
            return []
        return [LoraPlanCallback(plan=self.plan, progress=False, truncate_backward=self.truncate_backward)]

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Hand the trainer to the plugin's LoraPlanCallback (a callback is not told it): its trackers then write
        into the trainer's own TensorBoard event file."""
        from ..hf import LoraPlanCallback

        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, LoraPlanCallback):
                callback.attach(trainer)
