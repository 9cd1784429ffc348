"""LoRA fine-tuning with TRL's SFTTrainer, the layers and share groups planned by loraplan.

The training code is stock TRL: the only loraplan piece is ``plan_trainer(trainer, settings)`` between building
the trainer and ``train()``. The model is given to TRL as a path, so TRL loads it (and, under DeepSpeed ZeRO-3,
partitions it while loading), wraps it with the ``lora:`` settings, formats the dataset; ``plan_trainer`` then
calibrates on the first ``loraplan.calibration_samples`` examples of TRL's formatted training data, narrows/ties
the LoRA modules before the optimizer or the DeepSpeed engine exist, and leaves a ``LoraPlanCallback`` in the
trainer for resuming, saving and the trackers.

Usage (from the repository root):

    # one process (CPU or one GPU)
    python recipes/trl_sft.py --config recipes/configs/trl/tiny_cpu.yaml
    # several processes, DDP
    torchrun --nproc_per_node 2 recipes/trl_sft.py --config recipes/configs/trl/smollm2_135m_cka_share.yaml
    # DeepSpeed ZeRO-3 through accelerate, or with the deepspeed launcher
    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/trl_sft.py --config <config.yaml>
    deepspeed --num_gpus 8 recipes/trl_sft.py --config <config.yaml> training.deepspeed=recipes/deepspeed/zero3.json

Override any value with dotted ``key=value`` arguments after the config (YAML syntax for the value), e.g.
``training.max_steps=10 loraplan.ratio=0.25 loraplan.share=null model.name_or_path=/data/my-model``.
``--report PATH`` writes what the run ended with (plan, tied modules, losses, which layers ran without autograd) as
JSON, one file per rank.

Config sections: ``model`` (``name_or_path``: a hub id, a local directory, or ``packaged:smollm2`` for the offline
SmolLM2-135M-Instruct of ``loraplan.assets``; ``tiny``: a Llama shape to build with random weights and the
tokenizer of ``name_or_path``, for smoke tests and speed runs), ``dataset`` (``fine_foods`` or a ``.jsonl`` path),
``lora`` (``peft.LoraConfig`` arguments), ``loraplan`` (``loraplan.PlanConfig`` settings, plus
``truncate_backward: false`` to back-propagate every layer as stock PEFT does), ``training`` (``trl.SFTConfig``
arguments).

DeepSpeed without a GPU: accelerate does not set DeepSpeed up on a machine with no accelerator (it counts one
process, or, with ``use_cpu``, never initialises DeepSpeed's communication, so DeepSpeed's batch-size check fails).
This script then initialises ``deepspeed.comm`` with gloo before the training arguments and sets ``use_cpu``.

FSDP without a GPU: accelerate sets FSDP up only on accelerators and otherwise silently trains each process alone
or under DDP; this script then keeps the FSDP plugin on accelerate's CPU processes (gloo), see :func:`cpu_fsdp`:

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no \
        recipes/trl_sft.py --config recipes/configs/trl/tiny_cpu.yaml loraplan.share=null
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from loraplan.overrides import load_yaml


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML at ``path`` with dotted ``key=value`` overrides applied, validated."""
    return validate_config(load_yaml(path, overrides))


SECTIONS = ("model", "dataset", "lora", "loraplan", "training")


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check the sections and let loraplan, PEFT and TRL validate their own parts (raises on a bad key)."""
    from peft import LoraConfig
    from trl import SFTConfig

    from loraplan import PlanConfig

    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown config section(s) {unknown}; sections are {list(SECTIONS)}")
    model = config.get("model") or {}
    if not model.get("name_or_path"):
        raise SystemExit("`model.name_or_path` is required (a hub id, a local directory or packaged:smollm2)")
    bad = sorted(set(model) - {"name_or_path", "tiny", "dtype"})
    if bad:
        raise SystemExit(f"unknown `model` key(s) {bad}; known: name_or_path, tiny, dtype")
    bad = sorted(set(config.get("dataset") or {}) - {"name", "split", "max_samples", "format"})
    if bad:
        raise SystemExit(f"unknown `dataset` key(s) {bad}; known: name, split, max_samples, format")
    settings = {k: v for k, v in dict(config.get("loraplan") or {}).items() if k != "truncate_backward"}
    PlanConfig.from_dict(settings)
    if not isinstance((config.get("loraplan") or {}).get("truncate_backward", True), bool):
        raise SystemExit("`loraplan.truncate_backward` must be true or false")
    LoraConfig(**(config.get("lora") or {}))
    fields = set(SFTConfig.__dataclass_fields__)
    bad = sorted(set(config.get("training") or {}) - fields)
    if bad:
        raise SystemExit(f"unknown `training` key(s) {bad}: not trl.SFTConfig fields")
    return config


def resolve_path(name: str) -> str:
    if name == "packaged:smollm2":
        from loraplan.assets import smollm2_path

        return str(smollm2_path(quiet=True))
    return name


def tiny_model(shape: dict[str, Any], tokenizer_path: str) -> str:
    """A random-init Llama of ``shape`` saved with the tokenizer of ``tokenizer_path`` (built once, cached)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraplan.assets import cache_dir

    key = hashlib.sha256(json.dumps([shape, tokenizer_path], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "tiny" / key
    if (target / "config.json").is_file():
        return str(target)
    import torch

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(int(shape.get("seed", 0)))
    settings = {k: v for k, v in shape.items() if k != "seed"}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    scratch = target.with_name(f"{key}.tmp{os.getpid()}")
    LlamaForCausalLM(config).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    try:
        scratch.rename(target)
    except OSError:  # another rank got there first; both built the same model
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


def load_dataset(spec: dict[str, Any]):
    from datasets import Dataset

    name = spec.get("name", "fine_foods")
    limit = spec.get("max_samples")
    if name == "fine_foods":
        from loraplan.assets import fine_foods

        records = fine_foods(spec.get("split", "train"))
    else:
        records = [json.loads(line) for line in Path(name).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = records[:limit] if limit else records
    if spec.get("format", "text") == "prompt_completion" and "text" in records[0] and "prompt" not in records[0]:
        records = [
            {
                "prompt": f"Review: {r['text']}\nIs this review great? Answer:",
                "completion": f" {r.get('score', 'great' if r.get('label') else 'other')}",
            }
            for r in records
        ]
    elif spec.get("format", "text") == "text":
        records = [{"text": r["text"]} for r in records]
    return Dataset.from_list(records)


def _cpu_deepspeed(training: dict[str, Any]) -> None:
    import torch

    if not training.get("deepspeed") or torch.cuda.is_available():
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    training["use_cpu"] = True


def cpu_fsdp(training: dict[str, Any]) -> bool:
    """FSDP without a GPU: run it on CPU processes with gloo. Returns whether it did anything.

    accelerate (1.16) sets FSDP up only on accelerators. Launched with an FSDP config on a machine without one, each
    process trains alone (or, with ``use_cpu``, under DDP), and nothing says so; ``TrainingArguments(fsdp=...)``
    with ``use_cpu`` falls back to DDP the same way. So when FSDP is asked for (``accelerate launch`` with an FSDP
    config, or ``training.fsdp``) and there is no GPU, this asks accelerate for its CPU processes and keeps the FSDP
    plugin it was given: ``fully_shard`` then runs for real over gloo. On a GPU it does nothing.
    """
    import torch

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training.get("fsdp"))
    if not asked or torch.cuda.is_available():
        return False
    from accelerate import state
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_USE_CPU"] = "true"
    training["use_cpu"] = True
    training.setdefault("ddp_backend", "gloo")
    original = state.AcceleratorState.__init__
    if getattr(original, "__cpu_fsdp__", False):
        return True

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.__cpu_fsdp__ = True  # type: ignore[attr-defined]
    state.AcceleratorState.__init__ = init
    return True


#: per layer, whether its output required grad in the training forwards (for --report)
_OUTPUT_RECORDS: dict[int, set[bool]] = {}
#: per LoRA parameter, the sum of squares of this rank's part of its gradient at the first optimizer step
_FIRST_GRADIENTS: dict[str, float] = {}


def _gradient_recorder() -> Any:
    """A callback that keeps, at the first optimizer step, every LoRA gradient's sum of squares (of this rank's
    shard under FSDP2 and ZeRO, so that runs with the same sharding compare exactly) for --report."""
    from transformers import TrainerCallback

    class FirstGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if _FIRST_GRADIENTS or model is None:
                return
            for name, param in model.named_parameters():
                grad = param.grad
                if "lora_" in name and grad is not None:
                    local = grad.to_local() if hasattr(grad, "to_local") else grad
                    _FIRST_GRADIENTS[name] = float(local.detach().double().square().sum())

    return FirstGradients()


def _record_lower_layers(model: Any) -> None:
    """Note, per layer, whether its output required grad during training (what truncation changes)."""
    from loraplan.layers import find_layers

    def hook(index: int):
        def record(module: Any, args: Any, output: Any) -> None:
            if module.training:
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                _OUTPUT_RECORDS.setdefault(index, set()).add(bool(hidden.requires_grad))

        return record

    for index, layer in enumerate(find_layers(model).layers):
        layer.register_forward_hook(hook(index))


def report(trainer: Any, callback: Any, path: str) -> None:
    """Per-rank facts for tests and logs: the plan, the LoRA modules of each layer and their identities."""
    import torch

    from loraplan.apply import lora_modules_by_layer

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    model = trainer.model
    layers = {}
    for index, modules in lora_modules_by_layer(model).items():
        layers[str(index)] = {
            name: {
                "lora_A_id": id(m.lora_A["default"]),
                "lora_B_id": id(m.lora_B["default"]),
                "lora_A_data_ptr": m.lora_A["default"].weight.data_ptr(),
                "lora_B_data_ptr": m.lora_B["default"].weight.data_ptr(),
            }
            for name, m in modules.items()
        }
    facts = {
        "rank": rank,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "deepspeed": trainer.is_deepspeed_enabled,
        "fsdp_version": getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", None)
        if trainer.is_fsdp_enabled
        else None,
        "probe_logits": _probe_logits(trainer),
        "base_model": model.get_base_model().config._name_or_path,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "engine": type(trainer.model_wrapped).__name__,
        "plan": callback.plan.to_dict(),
        # the bytes this rank's plan saves as (LoraPlan.save writes to_json()): compared across ranks and with the file
        "plan_sha256": hashlib.sha256(callback.plan.to_json().encode()).hexdigest(),
        "first_gradients": dict(sorted(_FIRST_GRADIENTS.items())),
        "layers": layers,
        "global_step": trainer.state.global_step,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "checkpointing_kwargs": trainer.args.activation_checkpointing_kwargs
        if hasattr(trainer.args, "activation_checkpointing_kwargs")
        else trainer.args.gradient_checkpointing_kwargs,
        "gradient_checkpointing_kwargs": trainer.args.gradient_checkpointing_kwargs,
        # what the model's checkpointed layers actually run with
        "truncation": _truncation(model),
        "output_requires_grad": {str(i): sorted(v) for i, v in sorted(_OUTPUT_RECORDS.items())},
        "model_checkpointing": sorted(
            {
                repr(getattr(m._gradient_checkpointing_func, "keywords", None))
                for m in model.modules()
                if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")
            }
        ),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(f"{out.stem}.rank{rank}{out.suffix}").write_text(json.dumps(facts, indent=2), encoding="utf-8")


def _probe_logits(trainer: Any) -> list:
    """The trained model's logits on two fixed sentences, the first 256 of the vocabulary (every rank runs the
    forward: under FSDP and ZeRO-3 it is collective), so that a saved adapter can be checked to reload to the same
    outputs."""
    import torch

    tokenizer = trainer.processing_class
    batch = tokenizer(["A fine cup of tea.", "Stale and bitter, never again."], return_tensors="pt", padding=True)
    model = trainer.model
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v.to(trainer.args.device) for k, v in batch.items()}).logits
    return logits[..., :256].float().cpu().tolist()


def _truncation(model: Any) -> dict[str, Any] | None:
    from loraplan.truncate import truncation_of

    truncation = truncation_of(model)
    return (
        None
        if truncation is None
        else {"active": truncation.active, "layers": truncation.layers, "reason": truncation.reason}
    )


def loraplan_section_help() -> str:
    """What the ``loraplan:`` section takes, from ``PlanConfig``'s field metadata (``loraplan.config.settings``)."""
    import textwrap

    from loraplan.config import TRUNCATE_BACKWARD_HELP, settings

    lines = ["the loraplan: section (loraplan.PlanConfig settings; override with loraplan.KEY=VALUE):"]
    items = [(s.name, s.default, s.help) for s in settings()] + [("truncate_backward", True, TRUNCATE_BACKWARD_HELP)]
    for name, default, text in items:
        lines.append(f"  {name} (default: {'null' if default is None else default})")
        lines += textwrap.wrap(text, 100, initial_indent="      ", subsequent_indent="      ", break_on_hyphens=False)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=loraplan_section_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML config (see recipes/configs/trl/)")
    parser.add_argument("--report", default=None, help="write per-rank JSON facts to PATH (PATH.rank<N>.json)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)

    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from loraplan.integrations.hf import plan_trainer

    training = dict(config.get("training") or {})
    _cpu_deepspeed(training)
    cpu_fsdp(training)
    sft_args = SFTConfig(**training)

    model_spec = config["model"]
    model = resolve_path(model_spec["name_or_path"])
    if model_spec.get("tiny"):
        model = tiny_model(model_spec["tiny"], model)
    if model_spec.get("dtype"):
        sft_args.model_init_kwargs = {**(sft_args.model_init_kwargs or {}), "dtype": model_spec["dtype"]}

    settings = dict(config.get("loraplan") or {})
    truncate_backward = settings.pop("truncate_backward", True)  # how the plan is applied, not a plan setting
    recorded = _record_lower_layers if args.report else None
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=load_dataset(config.get("dataset") or {}),
        peft_config=LoraConfig(**(config.get("lora") or {})),
    )
    # the one loraplan line: plan on TRL's own formatted rows, narrow and tie the LoRA modules, before train()
    callback = plan_trainer(trainer, settings, truncate_backward=truncate_backward)
    if recorded is not None:
        recorded(trainer.model)
        trainer.add_callback(_gradient_recorder())
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model()
    if args.report:
        report(trainer, callback, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
