"""LoraPlanCallback in TRL's SFTTrainer on conversations, DPOTrainer and GRPOTrainer (each with ``peft_config``,
2 CPU steps on the tiny model), and conversational / ``datasets.load_dataset``-read calibration data through
``make_plan`` and the CLI.

What each trainer calibrates on with ``calibration_data=TRAIN_DATASET``: SFT, TRL's tokenised conversations
(``input_ids``); DPO, prompt + chosen completion (TRL's ``prompt_ids`` + ``chosen_ids``); GRPO, the prompts, through
the chat template with the generation prompt, as GRPO tokenises them to generate.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from loraplan import ConfigError, PlanConfig, make_plan
from loraplan.data import prepare_batches, read_texts
from loraplan.integrations.hf import LoraPlanCallback, plan_trainer

TARGETS = ["q_proj", "v_proj", "up_proj"]


def common(out, **overrides) -> dict:
    settings = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return settings


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)


def conversations(texts, n=24):
    return [
        [{"role": "user", "content": f"Summarise this review: {t[:120]}"}, {"role": "assistant", "content": t[:60]}]
        for t in texts[:n]
    ]


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_changed(before, model) -> None:
    after = lora_state(model)
    assert after.keys() == before.keys() and after
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert any(".lora_B." in n for n in moved), "training left every lora_B at its initial value"


def assert_trains_as_planned(trainer, plan, checks, *, finite_losses: bool = True) -> None:
    """Two real steps on the planned model: LoRA where the plan says, tied, and moved by training (with
    ``finite_losses``, every logged loss finite too)."""
    before = lora_state(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    if finite_losses:
        assert all(math.isfinite(loss) for _, loss in checks.losses(trainer))
    checks.plan_realised(trainer.model, plan)
    assert_changed(before, trainer.model)


def assert_calibrated_on(plan, ids: list[list[int]], config: PlanConfig, tokenizer) -> None:
    """The plan's calibration is exactly the first ``calibration_samples`` of these token sequences."""
    head = ids[: config.calibration_samples]
    assert plan.calibration["num_samples"] == len(head) == config.calibration_samples
    assert plan.calibration["num_tokens"] == sum(min(len(s), config.max_length) for s in head)
    want = prepare_batches([{"input_ids": s} for s in head], config, tokenizer)
    assert plan.calibration["data_hash"] == want.data_hash


# -- SFTTrainer on a conversational dataset ----------------------------------------------------------------------


def test_sft_on_conversations_calibrates_on_trls_tokenised_messages(
    tmp_path, model_dir, tokenizer, texts, checks, shared
):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    chats = conversations(texts)
    shared["max_length"] = 256  # whole conversations, not their first 32 tokens
    trainer = SFTTrainer(
        model=str(model_dir),
        args=SFTConfig(**common(tmp_path, max_length=256)),
        train_dataset=Dataset.from_dict({"messages": chats}),
        peft_config=lora_config(),
    )
    callback = plan_trainer(trainer, shared)
    plan = callback.plan
    config = PlanConfig.from_dict(shared)
    rows = trainer.train_dataset
    assert "input_ids" in rows.column_names
    trl_ids = [list(r) for r in rows["input_ids"]]
    # TRL's rows are the conversations through the chat template (independently: transformers' own tokenisation)
    for chat, ids in zip(chats, trl_ids):
        templated = list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        assert ids[: len(templated)] == templated and len(ids) - len(templated) <= 1  # TRL may append EOS
    assert max(len(i) for i in trl_ids) < config.max_length
    assert_calibrated_on(plan, trl_ids, config, tokenizer)
    assert_trains_as_planned(trainer, plan, checks)


# -- DPOTrainer ---------------------------------------------------------------------------------------------------


def preferences(texts, n=20) -> dict[str, list[str]]:
    return {
        "prompt": [f"Review: {t[:80]}\nVerdict:" for t in texts[:n]],
        "chosen": [" worth buying again." for _ in texts[:n]],
        "rejected": [" never again, stale." for _ in texts[:n]],
    }


def test_dpo_calibrates_on_prompt_plus_chosen(tmp_path, model_dir, tokenizer, texts, checks, shared):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = preferences(texts)
    trainer = DPOTrainer(
        model=str(model_dir),
        args=DPOConfig(**common(tmp_path, per_device_train_batch_size=2, max_length=48)),
        train_dataset=Dataset.from_dict(data),
        peft_config=lora_config(),
    )
    callback = plan_trainer(trainer, shared)
    plan = callback.plan
    config = PlanConfig.from_dict(shared)
    rows = trainer.train_dataset
    sequences = [list(p) + list(c) for p, c in zip(rows["prompt_ids"], rows["chosen_ids"])]
    # independently of TRL's columns: each calibrated sequence is the prompt and the chosen completion (TRL adds EOS)
    for i in range(config.calibration_samples):
        assert tokenizer.decode(sequences[i]) == data["prompt"][i] + data["chosen"][i] + tokenizer.eos_token
    assert_calibrated_on(plan, sequences, config, tokenizer)
    assert_trains_as_planned(trainer, plan, checks)


# -- GRPOTrainer --------------------------------------------------------------------------------------------------


def varied_reward(completions, **kwargs) -> list[float]:
    """Trivial, but different for different completions (equal rewards in a group would give no gradient)."""
    out = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        out.append(float(len(text) + sum(map(ord, text)) % 13))
    return out


def test_grpo_calibrates_on_the_prompts_through_the_chat_template(
    tmp_path, model_dir, tokenizer, texts, checks, shared
):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = [[{"role": "user", "content": f"Rate this review: {t[:80]}"}] for t in texts[:20]]
    shared["max_length"] = 256  # the whole rendered prompt, generation prompt included, is calibrated on
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=varied_reward,
        args=GRPOConfig(
            **common(
                tmp_path,
                per_device_train_batch_size=2,
                num_generations=2,
                max_completion_length=4,
                beta=0.0,
            )
        ),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=lora_config(),
    )
    callback = plan_trainer(trainer, shared)
    plan = callback.plan
    config = PlanConfig.from_dict(shared)
    assert "input_ids" not in trainer.train_dataset.column_names  # GRPO tokenises only when generating
    ids = [
        list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for p in prompts
    ]
    assert max(len(i) for i in ids) < config.max_length
    assert_calibrated_on(plan, ids, config, tokenizer)
    assert_trains_as_planned(trainer, plan, checks, finite_losses=False)


# -- conversational rows through make_plan and the CLI; load_dataset-backed --data --------------------------------


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def test_messages_rows_and_a_messages_dataset_go_through_the_chat_template(model_dir, tokenizer, texts, shared):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    chats = conversations(texts, 16)
    config = PlanConfig.from_dict(shared)
    want = prepare_batches([{"input_ids": chat_ids(tokenizer, m)} for m in chats], config, tokenizer)
    rows = [{"messages": m} for m in chats]
    assert prepare_batches(rows, config, tokenizer).data_hash == want.data_hash
    assert prepare_batches(Dataset.from_dict({"messages": chats}), config, tokenizer).data_hash == want.data_hash
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    plan = make_plan(model, rows, config, tokenizer, progress=False)
    assert plan.calibration["data_hash"] == want.data_hash
    assert plan.calibration["num_tokens"] == want.num_tokens


def test_messages_without_a_chat_template_is_a_config_error(tokenizer, texts):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError, match=r"calibration record 0 is a conversation \(`messages`\).*no chat template"):
        prepare_batches([{"messages": conversations(texts, 1)[0]}], PlanConfig(calibration_samples=1), plain)
    with pytest.raises(Exception, match=r"`messages` must be a non-empty list of"):
        prepare_batches([{"messages": "hello"}], PlanConfig(calibration_samples=1), tokenizer)


def test_callback_takes_messages_rows_as_calibration_data(tmp_path, model_dir, tokenizer, texts, checks, shared):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    chats = conversations(texts)
    callback = LoraPlanCallback(shared, calibration_data=[{"messages": m} for m in chats])
    SFTTrainer(
        model=str(model_dir),
        args=SFTConfig(**common(tmp_path, max_length=32)),
        train_dataset=Dataset.from_dict({"messages": chats}),
        peft_config=lora_config(),
        callbacks=[callback],
    )
    config = PlanConfig.from_dict(shared)
    assert_calibrated_on(callback.plan, [chat_ids(tokenizer, m) for m in chats], config, tokenizer)


def write(path, rows, kind) -> None:
    from datasets import Dataset

    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        Dataset.from_list(rows).to_parquet(str(path))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_data_files_are_read_with_load_dataset(tmp_path, texts, kind):
    rows = [{"review": t, "stars": i % 5} for i, t in enumerate(texts[:10])]
    path = tmp_path / f"reviews.{kind}"
    write(path, rows, kind)
    assert read_texts(str(path), "review") == texts[:10]
    assert read_texts(str(path), "review", limit=3) == texts[:3]
    with pytest.raises(ConfigError, match=r"`--text-field` is 'text', but record 0 of .*reviews\.\w+ has keys"):
        read_texts(str(path))


def test_malformed_data_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(ConfigError, match=r"`--data` .*broken\.parquet: it could not be read as parquet"):
        read_texts(str(bad))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('text,stars\n"unclosed,1\n')
    with pytest.raises(ConfigError, match=r"ragged\.csv"):
        read_texts(str(ragged))
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds no samples"):
        read_texts(str(tmp_path / "empty.parquet"))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_cli_analyze_on_a_conversational_file(tmp_path, model_dir, tokenizer, texts, shared, kind, capsys):
    from loraplan import LoraPlan
    from loraplan.cli import main

    chats = conversations(texts, 16)
    path = tmp_path / f"chats.{kind}"
    write(path, [{"messages": m} for m in chats], kind)
    samples = read_texts(str(path), limit=16)
    assert samples == [{"messages": m} for m in chats]
    out = tmp_path / "plan.json"
    args = ["analyze", str(model_dir), "--data", str(path), "--samples", "16", "--max-length", "32"]
    code = main([*args, "--selector", "cka", "--ratio", "0.5", "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = LoraPlan.load(out)
    want = prepare_batches(
        [{"input_ids": chat_ids(tokenizer, m)} for m in chats], PlanConfig(calibration_samples=16, max_length=32)
    )
    assert plan.calibration["data_hash"] == want.data_hash
    assert plan.calibration["num_tokens"] == want.num_tokens
