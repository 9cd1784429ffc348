"""`LoraPlanCallback`: layer-selective and shared LoRA in a ``transformers.Trainer`` (and TRL's trainers) without
changing the training code.

The callback acts at ``on_init_end``, the last moment before anything holds the trainable parameters: the
optimizer, the DeepSpeed engine, FSDP and DDP are all created later, inside ``train()``. There it loads or
computes the plan, narrows the LoRA model to it, ties the share groups, makes activation checkpointing
non-reentrant when layers share modules, and writes ``loraplan.json`` to ``output_dir``. Every checkpoint gets the
plan beside it; a resumed run reuses the saved plan and checks the checkpoint against it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..apply import apply_plan, tie_share_groups
from ..config import PlanConfig
from ..distributed import make_plan_everywhere
from ..errors import ConfigError, PlanMismatchError
from ..plan import PLAN_FILE, LoraPlan
from ..processes import from_main
from ..quantized import quantization_of
from ..truncate import truncation_of
from ._common import (
    SHARING_REASON,
    check_applied,
    check_checkpoint,
    fsdp_in_use,
    non_reentrant_model,
    refuse_under_fsdp,
    refuse_untested_engine,
    resolve_plan,
    sharding_engine,
)
from .trackers import report_plan
from .trainer_data import is_text, training_rows

logger = logging.getLogger("loraplan")

__all__ = ["TRAIN_DATASET", "LoraPlanCallback", "plan_trainer"]

#: ``calibration_data=TRAIN_DATASET`` calibrates on the first N examples of the trainer's own (formatted,
#: tokenised) training dataset, as the CKA reference implementation does.
TRAIN_DATASET = "train_dataset"

_CALLBACK_ARGS = "Trainer(..., callbacks=[LoraPlanCallback(...)])"
_ATTACH_MESSAGE = (
    f"`calibration_data`: {TRAIN_DATASET!r} calibrates on the trainer's own training rows, which a callback is not "
    "told. After building the trainer and before train(), call loraplan.integrations.hf.plan_trainer(trainer, "
    "settings) (or callback.attach(trainer) for a callback you passed to the trainer)."
)


def _tokenizer_of(processing_class: Any) -> Any:
    """The text tokenizer inside a processor, or the tokenizer itself."""
    inner = getattr(processing_class, "tokenizer", None)
    return inner if inner is not None else processing_class


def _checkpointing_enabled(args: Any) -> bool:
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None))


def non_reentrant_args(args: Any) -> bool | None:
    """Make the ``TrainingArguments`` ask for non-reentrant activation checkpointing, under both the
    ``activation_checkpointing_kwargs`` name (transformers >= 5.23, what ``Trainer.train`` reads) and the
    deprecated ``gradient_checkpointing_kwargs`` name (what TRL and Axolotl write).

    Returns ``None`` when checkpointing is off, ``True`` when reentrant had been asked for (e.g. forced by TRL
    under ZeRO-3 + PEFT) and was switched, ``False`` when it was already non-reentrant or unspecified.
    """
    if not _checkpointing_enabled(args):
        return None
    names = [n for n in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if hasattr(args, n)]
    merged: dict[str, Any] = {}
    was_reentrant = False
    for name in reversed(names):  # the new name wins where both set a key
        value = getattr(args, name) or {}
        if isinstance(value, dict):
            was_reentrant = was_reentrant or value.get("use_reentrant") is True
            merged.update(value)
    merged["use_reentrant"] = False
    for name in names:
        setattr(args, name, merged)
    return was_reentrant


class LoraPlanCallback(TrainerCallback):
    """Plan LoRA (which layers, which share) for the model a ``Trainer`` is about to train.

    Pass it to the trainer's constructor together with a LoRA-wrapped model (or, for TRL, a ``peft_config``)::

        trainer = SFTTrainer(model=..., peft_config=LoraConfig(...), train_dataset=...,
                             callbacks=[LoraPlanCallback({"selector": "cka", "ratio": 0.5, "share": "angular"},
                                                         calibration_data=TRAIN_DATASET)])

    Args:
        config (`PlanConfig` or `dict`, *optional*):
            The plan settings (:class:`loraplan.PlanConfig` or a dict of its fields). Default: ``PlanConfig()``.
        calibration_data (*optional*):
            What to calibrate on: texts (tokenised with the trainer's tokenizer/processing class), a
            ``datasets.Dataset``, records, tokenised batches, or :data:`TRAIN_DATASET` for the first
            ``calibration_samples`` examples of the trainer's own formatted training dataset.
        plan_path (`str`, *optional*):
            A saved plan (``loraplan.json`` or its directory) to use instead of calibrating.
        plan (`LoraPlan`, *optional*):
            An already computed plan to use as is.
        adapter_name (`str`, *optional*):
            The LoRA adapter to plan; default: the active one.
        progress (`bool`, defaults to `True`):
            Show a calibration progress bar on rank 0 (never when the trainer's ``disable_tqdm`` is set).
        truncate_backward (`bool`, defaults to `True`):
            Run the layers below the lowest planned layer without autograd and without activation checkpointing
            (exact; see :func:`loraplan.apply_plan`). ``False`` back-propagates every layer, as stock PEFT does.

    A ``loraplan.json`` already in ``output_dir`` (an earlier or resumed run) is reused and never recomputed.
    Without a plan and without calibration data the callback raises :class:`~loraplan.ConfigError`.
    """

    def __init__(
        self,
        config: PlanConfig | dict | None = None,
        calibration_data: Any = None,
        plan_path: str | Path | None = None,
        *,
        plan: LoraPlan | None = None,
        adapter_name: str | None = None,
        progress: bool = True,
        truncate_backward: bool = True,
    ) -> None:
        if config is not None and not isinstance(config, (PlanConfig, dict)):
            raise ConfigError(
                f"`config` must be a loraplan.PlanConfig or a dict of its settings, got {type(config).__name__}."
            )
        if isinstance(calibration_data, str) and calibration_data != TRAIN_DATASET:
            raise ConfigError(
                f"`calibration_data` is the string {calibration_data!r}; pass a list of texts, a dataset, tokenised "
                f"batches, or loraplan.integrations.hf.TRAIN_DATASET ({TRAIN_DATASET!r})."
            )
        self.config = PlanConfig.from_dict(dict(config)) if isinstance(config, dict) else (config or PlanConfig())
        self._config_given = config is not None
        self.calibration_data = calibration_data
        self.plan_path = plan_path
        self.plan = plan
        self.adapter_name = adapter_name
        self.progress = progress
        if not isinstance(truncate_backward, bool):
            raise ConfigError(f"`truncate_backward` must be true or false, got {truncate_backward!r}.")
        self.truncate_backward = truncate_backward
        self._initialised = False
        #: the checkpoint directory the Trainer loaded this adapter from (a resumed run), once it has
        self._loaded_from: str | None = None
        #: the trainer given to attach(); a callback is not told it otherwise
        self._trainer: Any = None
        #: on_init_end saw calibration_data=TRAIN_DATASET and no trainer: attach(trainer) must plan before train()
        self._waiting_for_trainer = False

    # -- on_init_end --------------------------------------------------------------------------------------------
    def on_init_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        processing_class: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self._needs_trainer():
            # a callback is not told the trainer's dataset: attach(trainer) (or plan_trainer) plans once it is given
            self._waiting_for_trainer = True
            return control
        self._setup(args, model, processing_class, optimizer)
        return control

    def attach(self, trainer: Any) -> LoraPlanCallback:
        """Plan for ``trainer`` now, with what only the trainer knows: its training dataset (for
        ``calibration_data=TRAIN_DATASET``) and its own chat template (GRPO). Call it after building the trainer
        and before ``train()`` (which builds the optimizer and the DeepSpeed/DDP wrappers); the callback is added
        to the trainer if it is not one of its callbacks yet. Returns the callback."""
        handler = getattr(trainer, "callback_handler", None)
        if handler is None or not hasattr(trainer, "train_dataset"):
            raise ConfigError(
                f"`attach` takes a transformers Trainer (or a TRL trainer), got {type(trainer).__name__}."
            )
        if not any(cb is self for cb in handler.callbacks):
            trainer.add_callback(self)
        self._trainer = trainer
        if not self._initialised:
            self._setup(trainer.args, trainer.model, trainer.processing_class, getattr(trainer, "optimizer", None))
        return self

    def _needs_trainer(self) -> bool:
        wants_rows = isinstance(self.calibration_data, str) and self.calibration_data == TRAIN_DATASET
        return wants_rows and self._trainer is None and self.plan is None and self.plan_path is None

    def _setup(self, args: Any, model: Any, processing_class: Any, optimizer: Any) -> None:
        """Plan (or take the given or saved plan) and apply it to ``model``: what on_init_end, or attach, does."""
        if model is None:
            raise ConfigError(f"LoraPlanCallback got no model at on_init_end; use it as {_CALLBACK_ARGS}.")
        if optimizer is not None:
            raise ConfigError(
                "`optimizers`: the Trainer was given an optimizer built before loraplan narrowed and tied the LoRA "
                "modules, so it would hold parameters that no longer train and miss the tied ones. Let the Trainer "
                "build it (optimizer_cls_and_kwargs=... or TrainingArguments(optim=...)), or build it after "
                "loraplan.apply_plan."
            )
        if not isinstance(getattr(model, "peft_config", None), dict):
            raise ConfigError(
                f"LoraPlanCallback needs a LoRA-wrapped model, got {type(model).__name__}. Wrap it with "
                "peft.get_peft_model(model, LoraConfig(...)) before the Trainer, or pass peft_config= to TRL's "
                "trainers."
            )
        output_dir = Path(args.output_dir)
        fsdp = fsdp_in_use()
        if self.plan is None and self.plan_path is None:  # before any calibration is spent
            refuse_under_fsdp(fsdp, share=self.config.share)
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        refuse_untested_engine(sharding_engine(), encoder_decoder, quantization_of(model))
        plan, how = resolve_plan(
            plan=self.plan,
            plan_path=self.plan_path,
            reuse_dirs=[output_dir],
            config=self.config,
            config_given=self._config_given,
            calibrate=(lambda: self._calibrate(model, processing_class, args))
            if self.calibration_data is not None
            else None,
            no_data_message=(
                "`calibration_data`: LoraPlanCallback has neither calibration data nor a plan. Either pass "
                "calibration_data= (texts, a datasets.Dataset, tokenised batches, or "
                "loraplan.integrations.hf.TRAIN_DATASET for the first `calibration_samples` examples of the "
                "trainer's own training data), or plan_path= with a saved loraplan.json."
            ),
        )
        refuse_under_fsdp(fsdp, plan=plan)
        apply_plan(model, plan, adapter_name=self.adapter_name, truncate_backward=self.truncate_backward)
        self.plan = plan
        if not getattr(model.load_adapter, "__loraplan_guard__", False):
            self._guard_adapter_loads(model, plan)
            model.load_adapter.__loraplan_guard__ = True
        logger.info(
            "loraplan: plan %s: LoRA on layers %s%s",
            how,
            plan.selected_layers,
            f", share groups {plan.share_groups}" if plan.share_groups else "",
        )
        if plan.share_groups:
            self._non_reentrant(args, model, "on_init_end")
        if args.should_save:
            plan.save(output_dir / PLAN_FILE)
        self._initialised = True
        self._waiting_for_trainer = False

    def _calibrate(self, model: Any, processing_class: Any, args: Any) -> LoraPlan:
        data = self.calibration_data
        if isinstance(data, str) and data == TRAIN_DATASET:
            trainer = self._trainer
            if trainer is None:  # pragma: no cover - _needs_trainer deferred the plan until attach
                raise ConfigError(_ATTACH_MESSAGE)
            if trainer.train_dataset is None:
                raise ConfigError(
                    f"`calibration_data`: {TRAIN_DATASET!r} asks for the trainer's training dataset, but the Trainer "
                    "has none. Pass train_dataset= to the Trainer, or give calibration_data explicitly."
                )
            data = training_rows(
                trainer.train_dataset,
                self.config.text_field,
                _tokenizer_of(processing_class),
                getattr(trainer, "chat_template", None),  # GRPOTrainer's own template (chat_template_path)
            )
        tokenizer = _tokenizer_of(processing_class)
        if tokenizer is None and is_text(data, self.config.text_field):
            raise ConfigError(
                "`calibration_data` is text, but the Trainer has no tokenizer to tokenise it. Pass "
                "processing_class=tokenizer to the Trainer, or give tokenised batches (with `input_ids`)."
            )
        # the trainer's own switch for progress bars counts too (TrainingArguments.disable_tqdm)
        progress = self.progress and not getattr(args, "disable_tqdm", False)
        return make_plan_everywhere(model, data, self.config, tokenizer, progress=progress)

    def _non_reentrant(self, args: Any, model: Any, when: str) -> None:
        switched_args = non_reentrant_args(args)
        if switched_args:
            logger.warning(
                "loraplan: activation checkpointing switched from reentrant to non-reentrant (at %s): %s.",
                when,
                SHARING_REASON,
            )
        elif switched_args is False:
            logger.info("loraplan: share groups present; activation checkpointing will be non-reentrant.")
        switched = non_reentrant_model(model)
        if switched:
            logger.warning(
                "loraplan: %d module(s) already checkpointed reentrantly were switched to non-reentrant (at %s): %s.",
                switched,
                when,
                SHARING_REASON,
            )

    # -- on_train_begin -----------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if self._waiting_for_trainer:
            raise ConfigError(_ATTACH_MESSAGE)
        if not self._initialised:
            raise ConfigError(
                "LoraPlanCallback was added after the Trainer was constructed (trainer.add_callback), so it never "
                "saw on_init_end, the last point before the optimizer and the DeepSpeed/DDP wrappers take the "
                f"parameters; training now would ignore the plan. Pass it to the constructor ({_CALLBACK_ARGS}), "
                "or call callback.attach(trainer) before train()."
            )
        plan = self.plan
        assert plan is not None  # on_init_end made or loaded it
        attached: Any = getattr(model, "loraplan_plan", None)
        if attached is not plan:
            raise ConfigError(
                "the model that trains is not the one LoraPlanCallback planned at on_init_end (with `model_init` the "
                "Trainer builds a new model in train()). loraplan does not support `model_init`; pass the model."
            )
        if plan.share_groups:
            # checkpointing may have been enabled after on_init_end (Trainer.train does it first thing)
            self._non_reentrant(args, model, "on_train_begin")
        if state.global_step > 0:
            self._check_resume(args, state, plan)
        check_applied(model, plan, self.adapter_name)
        truncation = truncation_of(model)
        if truncation is not None:
            logger.info("loraplan: %s", truncation.note())
        handler = getattr(self._trainer, "callback_handler", None)  # known after attach(trainer)
        callbacks = list(handler.callbacks) if handler is not None else None
        report_plan(plan, args, state, callbacks=callbacks, truncate_backward=self.truncate_backward)
        return control

    def _check_resume(self, args: Any, state: Any, plan: LoraPlan) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        # where the weights came from, by what the Trainer tells: the directory it loaded the adapter from (its resume
        # path without DeepSpeed/FSDP goes through model.load_adapter), the documented TrainingArguments field, and
        # the checkpoint of this step in output_dir (what resume_from_checkpoint=True resolves to)
        given = (self._loaded_from, getattr(args, "resume_from_checkpoint", None))
        candidates = [Path(p) for p in given if isinstance(p, str) and p]
        candidates.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

        def verify() -> str | None:
            for candidate in candidates:
                if (candidate / "trainer_state.json").is_file():
                    check_checkpoint(candidate, plan)
                    return str(candidate)
            return None

        checked = from_main(verify)
        if checked is None:
            raise PlanMismatchError(
                f"the run resumed at step {state.global_step}, but none of {[str(c) for c in candidates]} is a "
                "checkpoint, so the loaded weights cannot be checked against the plan. Resume from a checkpoint "
                "in this run's output_dir (trainer.train(resume_from_checkpoint=True)), or name the directory in "
                "TrainingArguments(resume_from_checkpoint=...) too."
            )
        logger.info("loraplan: resumed from %s, which was trained with this plan; share groups still tied", checked)

    def _guard_adapter_loads(self, model: Any, plan: LoraPlan) -> None:
        """Check a checkpoint against the plan before ``Trainer`` loads it into the model (``load_adapter``, the
        resume path without DeepSpeed/FSDP), and re-tie the share groups once it is loaded."""
        original = model.load_adapter
        adapter = self.adapter_name or getattr(model, "active_adapter", "default")

        @functools.wraps(original)
        def load_adapter(model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
            planned = adapter_name == adapter and Path(str(model_id)).is_dir()
            if planned:
                check_checkpoint(model_id, plan)
                self._loaded_from = str(model_id)
            result = original(model_id, adapter_name, *args, **kwargs)
            if planned:
                tie_share_groups(model, plan, adapter_name, verify_equal=True)
            return result

        model.load_adapter = load_adapter

    # -- saving -------------------------------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self.plan is not None and args.should_save:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                self.plan.save(checkpoint / PLAN_FILE)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.plan is not None and args.should_save:
            self.plan.save(Path(args.output_dir) / PLAN_FILE)
        return control


def plan_trainer(
    trainer: Any, config: PlanConfig | dict | None = None, calibration_data: Any = TRAIN_DATASET, **kwargs: Any
) -> LoraPlanCallback:
    """Plan LoRA for ``trainer`` (a transformers ``Trainer`` or a TRL trainer, built with a LoRA-wrapped model or a
    ``peft_config``) on the first ``calibration_samples`` of its own formatted training rows, apply the plan, and
    keep a :class:`LoraPlanCallback` in its callbacks for the rest (resume checks, saving the plan, trackers)::

        trainer = SFTTrainer(model=..., peft_config=LoraConfig(...), train_dataset=...)
        plan_trainer(trainer, {"selector": "cka", "ratio": 0.5, "share": "angular"})
        trainer.train()

    ``calibration_data`` and the other keyword arguments are :class:`LoraPlanCallback`'s. Returns the callback
    (``.plan`` is the plan).
    """
    return LoraPlanCallback(config, calibration_data, **kwargs).attach(trainer)
