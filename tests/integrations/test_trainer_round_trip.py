"""The round trip through the trainers: HF ``Trainer`` with a model the user wrapped, TRL's ``SFTTrainer`` with a
``peft_config``, each with ``LoraPlanCallback``, on the LoraConfig features that apply_plan has to rewrite (all-linear
with per-module ranks and the budget rank, modules_to_save, MoE target_parameters). After two real optimizer steps:
LoRA exactly where stock PEFT puts it with the user's config minus the unplanned layers, at the ranks the plan's
policy gives, share groups one tensor, the saved config alone reproducing the layout, and stock PEFT reloading the
saved adapter with the trained model's logits (fp32, no autocast)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from loraplan.integrations.hf import TRAIN_DATASET, LoraPlanCallback

LLAMA_ALL_LINEAR = dict(
    r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 8}, alpha_pattern={"v_proj": 4}
)
MOE = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "o_proj"],
    target_parameters=["experts.gate_up_proj", "experts.down_proj"],
)

CASES = [
    ("trainer", "llama", LLAMA_ALL_LINEAR, "keep"),
    ("trainer", "mixtral", MOE, "keep"),
    ("sft", "llama", dict(LLAMA_ALL_LINEAR, modules_to_save=["lm_head"]), "budget"),
    ("sft", "mixtral", MOE, "budget"),
    # per-layer ranks from CKA importance (the user's per-module v_proj rank scaled in each layer)
    ("trainer", "llama", LLAMA_ALL_LINEAR, "importance"),
    ("sft", "llama", LLAMA_ALL_LINEAR, "importance"),
    # LoRA-drop's shared rest: the unselected layers carry one shared module set
    ("trainer", "llama", LLAMA_ALL_LINEAR, "rest"),
    ("sft", "mixtral", MOE, "rest"),
]
#: the plan settings of each policy beside the shared ones
POLICIES = {
    "keep": {"rank_policy": "keep"},
    "budget": {"rank_policy": "budget"},
    "importance": {"rank_policy": "importance", "param_budget": 0.75, "share": None, "rank_multiple": 2},
    "rest": {"rank_policy": "keep", "share": "lora_drop"},
}


@pytest.fixture(scope="session")
def mixtral_dir(tiny_dir, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tiny_dir / "mixtral"
    MixtralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _load(path, dtype=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))


def _layer(site: str) -> int | None:
    match = re.match(r"^model\.layers\.(\d+)\.", site)
    return int(match.group(1)) if match else None


def _expected(path, settings, plan, read_sites, policy) -> dict[str, int]:
    """Stock PEFT with the user's config, minus the unplanned layers; under the budget policy each rank scaled by
    ShareLoRA's rule floor(L r / (L - sum|S| + |S|)), written out here independently of loraplan."""
    from peft import LoraConfig, get_peft_model

    stock = read_sites(get_peft_model(_load(path), LoraConfig(**copy.deepcopy(settings))))
    adapted = set(plan.selected_layers) | {i for g in plan.share_groups for i in g}
    kept = {s: r for s, r in stock.items() if _layer(s) is None or _layer(s) in adapted}
    if policy == "importance":  # layer i at rank r_i scales each of its modules' ranks by r_i / r
        base = settings["r"]
        kept = {
            s: (r if _layer(s) is None else max(1, round(r * plan.rank_pattern[_layer(s)] / base)))
            for s, r in kept.items()
        }
    if policy == "budget":
        layers, groups = len(plan.selected_layers), plan.share_groups
        modules = layers - sum(len(g) for g in groups) + len(groups)
        kept = {s: max(r, layers * r // modules) for s, r in kept.items()}
    return kept


def _trainer(kind, path, out, settings, callback, tokenizer, texts, dtype=None):
    from datasets import Dataset

    common = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        bf16=dtype is torch.bfloat16,
    )
    if kind == "trainer":
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        data = Dataset.from_dict({"text": texts}).map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"]
        )
        return Trainer(
            model=get_peft_model(_load(path, dtype), LoraConfig(**copy.deepcopy(settings))),
            args=TrainingArguments(**common, dataloader_num_workers=0),
            train_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            processing_class=tokenizer,
            callbacks=[callback],
        )
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(
        model=_load(path, dtype),
        args=SFTConfig(**common, max_length=32),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(**copy.deepcopy(settings)),
        callbacks=[callback],
    )


@pytest.mark.parametrize(("kind", "arch", "settings", "policy"), CASES, ids=[f"{k}-{a}-{p}" for k, a, _, p in CASES])
def test_trainer_round_trip(
    kind, arch, settings, policy, tmp_path, model_dir, mixtral_dir, tokenizer, texts, shared, read_sites
):
    from peft import LoraConfig, PeftModel, get_peft_model

    path = model_dir if arch == "llama" else mixtral_dir
    callback = LoraPlanCallback({**shared, **POLICIES[policy]}, calibration_data=TRAIN_DATASET)
    trainer = _trainer(kind, path, tmp_path / "out", settings, callback, tokenizer, texts)
    callback.attach(trainer)  # plans on the trainer's own rows (TRAIN_DATASET)
    plan = callback.plan
    if policy == "importance":
        assert not plan.share_groups and len(set(plan.rank_pattern.values())) > 1, "ranks differ between layers"
        assert sum(plan.rank_pattern.values()) == 0.75 * plan.num_layers * settings["r"]
    else:
        assert plan.share_groups, "the shared settings form a group on the tiny model"
    if policy == "rest":
        assert plan.shared_rest and plan.adapted_layers == list(range(plan.num_layers))
    want = _expected(path, settings, plan, read_sites, policy)
    assert {_layer(s) for s in want} - {None} == set(plan.adapted_layers)
    if arch == "mixtral":
        assert any(".experts" in s for s in want)
    if policy == "budget":
        assert plan.rank == 2 * settings["r"]  # two planned layers in one group: the budget doubles every rank
    model = trainer.model
    assert read_sites(model) == want
    trainer.train()
    assert trainer.state.global_step == 2
    assert read_sites(model) == want
    by_layer: dict[int, dict[str, torch.nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        match = re.match(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_A$", name)
        if match and "default" in module:
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = module["default"]
    for group in plan.share_groups:
        for member in group[1:]:
            assert by_layer[member].keys() == by_layer[group[0]].keys()
            assert all(a is by_layer[group[0]][n] for n, a in by_layer[member].items())
    trainer.save_model()
    out = tmp_path / "out"
    assert read_sites(get_peft_model(_load(path), LoraConfig.from_pretrained(out))) == want

    batch = tokenizer(["A fine cup of tea.", "Stale and bitter, never again."], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        stock = PeftModel.from_pretrained(_load(path), str(out)).eval()
        assert read_sites(stock) == want
        torch.testing.assert_close(stock(**batch).logits, expected)


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_bf16_weights_round_trip_through_the_trainers(kind, tmp_path, model_dir, tokenizer, texts, shared, read_sites):
    """bf16 base weights and bf16 mixed precision (`bf16=True`, CPU autocast) through HF Trainer and TRL: LoRA where
    the plan says, the base weights untouched, and stock PEFT reloading the saved adapter onto a fresh bf16 load with
    the trained model's logits."""
    from peft import PeftModel

    settings = dict(r=4, lora_alpha=8, target_modules="all-linear")
    callback = LoraPlanCallback(dict(shared), calibration_data=TRAIN_DATASET)
    trainer = _trainer(kind, model_dir, tmp_path / "out", settings, callback, tokenizer, texts, dtype=torch.bfloat16)
    callback.attach(trainer)
    plan = callback.plan
    model = trainer.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert all(p.dtype == torch.bfloat16 for p in base.values())
    trainer.train()
    assert trainer.state.global_step == 2
    assert {_layer(s) for s in read_sites(model)} - {None} == set(plan.adapted_layers)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    trainer.save_model()
    batch = tokenizer(["A fine cup of tea.", "Stale and bitter, never again."], return_tensors="pt", padding=True)
    # mixed precision wrapped the model's forward in autocast and fp32 outputs; the plain bf16 forward is compared
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        expected = model(**batch).logits
        assert expected.dtype == torch.bfloat16
        stock = PeftModel.from_pretrained(_load(model_dir, torch.bfloat16), str(tmp_path / "out")).eval()
        assert read_sites(stock) == read_sites(model)
        torch.testing.assert_close(stock(**batch).logits, expected, rtol=0, atol=0)
