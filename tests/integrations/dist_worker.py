"""Worker for tests/integrations/test_distributed.py, launched with ``torchrun --nproc_per_node 2``.

``python dist_worker.py broadcast OUT MODEL_DIR``: plans and errors across two gloo ranks.
``python dist_worker.py zero3 OUT MODEL_DIR``: calibration on weights DeepSpeed ZeRO-3 partitioned at creation.
``python dist_worker.py fsdp2 OUT MODEL_DIR``: a top-half plan under FSDP2 (``fully_shard`` per layer) with
checkpointing, once with loraplan's truncated backward and once without.
``python dist_worker.py trainer_ddp OUT MODEL_DIR``: HF ``Trainer`` under DDP (gloo) with ``LoraPlanCallback`` on a
T5 (both stacks planned) and on the tiny Llama loaded in 4-bit NF4 (QLoRA), two steps each.
``python dist_worker.py trainer_fsdp2 OUT MODEL_DIR``: HF ``Trainer`` with ``TrainingArguments(fsdp=...,
fsdp_config={"fsdp_version": 2, ...})`` and ``LoraPlanCallback``, two steps (on the CPU through the TRL recipe's
``cpu_fsdp``, which keeps accelerate's FSDP plugin on its gloo processes).
Each rank writes ``OUT/rank<N>.json`` with what it observed; the test makes the assertions.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

SETTINGS = {
    "selector": "cka",
    "ratio": 0.5,
    "share": "angular",
    "share_threshold": 0.0,
    "calibration_samples": 12,
    "max_length": 24,
    "batch_size": 4,
    "last_token": "reference",
}


def texts(reverse: bool) -> list[str]:
    from loraplan.assets import fine_foods

    rows = [r["text"][:300] for r in fine_foods("train")[:40]]
    return rows[::-1] if reverse else rows


def broadcast(out: Path, model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplan import CalibrationError, make_plan
    from loraplan.distributed import load_plan_everywhere, make_plan_everywhere
    from loraplan.processes import from_main

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    facts: dict = {"rank": rank, "world_size": dist.get_world_size()}
    facts["value"] = from_main(lambda: rank * 10 + 1)
    try:
        from_main(lambda: (_ for _ in ()).throw(CalibrationError("no real token")) if rank == 0 else 5)
    except CalibrationError as exc:
        facts["error"] = ["CalibrationError", str(exc)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # each rank holds different data; every rank must end with rank 0's plan
    plan = make_plan_everywhere(model, texts(reverse=rank == 1), SETTINGS, tokenizer, progress=False)
    facts["plan"] = plan.to_dict()
    facts["own_plan"] = make_plan(model, texts(reverse=rank == 1), SETTINGS, tokenizer, progress=False).to_dict()
    if rank == 0:  # only rank 0 can see this file
        plan.save(out / "rank0-only" / "loraplan.json")
    dist.barrier()
    facts["loaded"] = load_plan_everywhere(out / "rank0-only" / "loraplan.json").to_dict()
    return facts


def zero3(out: Path, model_dir: str) -> dict:
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from loraplan import make_plan
    from loraplan.distributed import make_plan_everywhere
    from loraplan.processes import is_partitioned

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank = dist.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    # as under a ZeRO-3 Trainer: with a live HfDeepSpeedConfig, from_pretrained partitions while loading
    ds_config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    partitioned = AutoModelForCausalLM.from_pretrained(model_dir)
    facts = {
        "rank": rank,
        "partitioned": is_partitioned(partitioned),
        "local_numel": sum(p.numel() for p in partitioned.parameters()),
        "full_numel": sum(p.numel() for p in reference.parameters()),
    }
    plan = make_plan_everywhere(partitioned, texts(False), SETTINGS, tokenizer, progress=False)
    facts["plan"] = plan.to_dict()
    facts["reference_plan"] = make_plan(reference, texts(False), SETTINGS, tokenizer, progress=False).to_dict()
    facts["still_partitioned_after"] = sum(p.numel() for p in partitioned.parameters())
    del ds_config
    return facts


def fsdp2(out: Path, model_dir: str) -> dict:
    """Two steps of SGD under FSDP2 with the plan applied before sharding, truncated and stock, same data."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from loraplan import LoraPlan, apply_plan
    from loraplan.layers import find_layers
    from loraplan.plan import fingerprint

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    facts: dict = {"rank": rank}
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(rank))
    for truncate in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        stack = find_layers(base)
        plan = LoraPlan(
            num_layers=4,
            selected_layers=[2, 3],
            config={"selector": "top"},
            model_fingerprint=fingerprint(base, stack),
            stack={"path": stack.path, "pattern": stack.pattern, "ambiguous": False},
        )
        model = get_peft_model(
            base,
            plan.to_lora_config(
                LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
            ),
        )
        apply_plan(model, plan, truncate_backward=truncate)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        seen: dict[int, set] = {}
        for index, layer in enumerate(stack.layers):
            layer.register_forward_hook(
                lambda m, a, o, index=index: seen.setdefault(index, set()).add(  # noqa: B023 - one dict for all
                    bool((o[0] if isinstance(o, tuple) else o).requires_grad)
                )
            )
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        name = "truncated" if truncate else "stock"
        facts[name] = {
            "losses": losses,
            "lora": {n: p.full_tensor().flatten().tolist() for n, p in model.named_parameters() if "lora_" in n},
            "output_requires_grad": {str(i): sorted(v) for i, v in sorted(seen.items())},
        }
    return facts


def trainer_fsdp2(out: Path, model_dir: str) -> dict:
    """HF Trainer under FSDP2 from its own arguments, the plan computed by the callback at on_init_end."""
    import importlib.util

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from loraplan.apply import lora_modules_by_layer
    from loraplan.integrations.hf import LoraPlanCallback
    from loraplan.truncate import truncation_of

    spec = importlib.util.spec_from_file_location("trl_sft", Path(__file__).parents[2] / "recipes" / "trl_sft.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    fsdp_config = {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
        "cpu_ram_efficient_loading": False,
    }
    training = {"fsdp": True, "fsdp_config": fsdp_config}
    recipe.cpu_fsdp(training)  # no GPU here: keep the FSDP plugin on accelerate's CPU processes
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"text": texts(False)}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"]
    )
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    callback = LoraPlanCallback({**SETTINGS, "share": None}, calibration_data=texts(False)[:16])
    args = TrainingArguments(
        output_dir=str(out / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        seed=0,
        gradient_checkpointing=True,
        dataloader_num_workers=0,
        **training,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    trainer.save_model()
    truncation = truncation_of(trainer.model)
    return {
        "rank": dist.get_rank(),
        "fsdp": trainer.is_fsdp_enabled,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version,
        "model_class": type(trainer.model).__name__,
        "plan": callback.plan.to_dict(),
        "layers": sorted(i for i, modules in lora_modules_by_layer(trainer.model).items() if modules),
        "truncation": {"active": truncation.active, "layers": truncation.layers},
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "global_step": trainer.state.global_step,
    }


def trainer_ddp(out: Path, model_dir: str) -> dict:
    """An encoder-decoder model and a 4-bit model under DDP, the plan computed by the callback."""
    import hashlib

    import transformers as tf
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from loraplan.apply import lora_modules_by_layer
    from loraplan.integrations.hf import LoraPlanCallback
    from loraplan.quantized import quantized_weights

    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    rows = texts(False)[:16]
    facts: dict = {"rank": dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])}

    def train(model, data, collator, name: str):
        callback = LoraPlanCallback({**SETTINGS, "calibration_samples": 8}, calibration_data=rows[:8])
        args = tf.TrainingArguments(
            output_dir=str(out / name), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
            use_cpu=True, ddp_backend="gloo", save_steps=2, seed=0, dataloader_num_workers=0, logging_steps=1,
        )  # fmt: skip
        trainer = tf.Trainer(
            model=model, args=args, train_dataset=data, data_collator=collator, processing_class=tokenizer,
            callbacks=[callback],
        )  # fmt: skip
        trainer.train()
        trainer.save_model()
        plan = callback.plan
        ties = []
        for one in plan.stack_plans():
            from loraplan.layers import stack_at

            by_layer = lora_modules_by_layer(trainer.model, stack_at(trainer.model, one.stack_path))
            for group in one.share_groups:
                for member in group[1:]:
                    ties += [
                        by_layer[member][n].lora_A["default"] is by_layer[group[0]][n].lora_A["default"]
                        for n in by_layer[member]
                    ]
        return trainer, plan, ties

    # an encoder-decoder model: T5 with the SmolLM2 tokenizer, both stacks planned
    torch.manual_seed(0)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4, vocab_size=len(tokenizer), **ids)
    )
    seq2seq = Dataset.from_dict({"text": rows}).map(
        lambda b: {
            **tokenizer(b["text"], truncation=True, max_length=24),
            "labels": tokenizer(b["text"], truncation=True, max_length=12)["input_ids"],
        },
        batched=True,
        remove_columns=["text"],
    )
    model = get_peft_model(t5, LoraConfig(r=4, target_modules=["q", "v", "wo"]))
    trainer, plan, ties = train(model, seq2seq, tf.DataCollatorForSeq2Seq(tokenizer, model=t5), "t5")
    facts["t5"] = {
        "ddp": trainer.args.parallel_mode.name,
        "plan": plan.to_dict(),
        "ties": ties,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }

    # QLoRA: the tiny Llama in 4-bit NF4
    quantization = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization)

    def digest(model) -> str:
        by_name = {  # a PEFT wrapper and its base layer name the same weight once
            name.replace("base_model.model.", "").replace(".base_layer", ""): weight
            for name, weight in quantized_weights(model).items()
        }
        h = hashlib.sha256()
        for name, weight in sorted(by_name.items()):
            h.update(name.encode())
            h.update(weight.data.contiguous().view(torch.uint8).numpy().tobytes())
            h.update(weight.quant_state.absmax.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    fresh = digest(base)
    model = get_peft_model(prepare_model_for_kbit_training(base), LoraConfig(r=4, target_modules="all-linear"))
    causal = Dataset.from_dict({"text": rows}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=24), batched=True, remove_columns=["text"]
    )
    trainer, plan, ties = train(model, causal, tf.DataCollatorForLanguageModeling(tokenizer, mlm=False), "qlora")
    facts["qlora"] = {
        "ddp": trainer.args.parallel_mode.name,
        "plan": plan.to_dict(),
        "ties": ties,
        "unchanged": digest(trainer.model) == fresh,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    return facts


def main() -> None:
    mode, out, model_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    workers = {
        "broadcast": broadcast,
        "zero3": zero3,
        "fsdp2": fsdp2,
        "trainer_ddp": trainer_ddp,
        "trainer_fsdp2": trainer_fsdp2,
    }
    facts = workers[mode](out, model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{facts['rank']}.json").write_text(json.dumps(facts, indent=1), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
