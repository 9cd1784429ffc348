"""The quality benchmark's data and models: the Fine Foods splits, tokenised rows, SFT prompts and padded batches;
the pretrained models, their LoRA config, and where LoRA ended up in a model (layout, trainable parameters)."""

from __future__ import annotations

import contextlib
import io
import random
from typing import Any

# -- data -----------------------------------------------------------------------------------------------------------


def model_path(name: str) -> str:
    from loraplan.assets import minilm_path, smollm2_path

    return str(minilm_path() if name == "minilm" else smollm2_path(quiet=True))


def splits(config: dict[str, Any], task: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The training examples (the training split shuffled once with ``data.seed``, the first ``train_examples``)
    and the fixed evaluation subset (the test split shuffled with ``data.seed``, the first ``test_examples``)."""
    from loraplan.assets import fine_foods

    data = config.get("data") or {}
    seed = int(data.get("seed", 0))
    train = fine_foods("train")
    random.Random(seed).shuffle(train)
    test = fine_foods("test")
    random.Random(seed + 1).shuffle(test)
    n_train, n_test = task.get("train_examples"), task.get("test_examples")
    return train[: n_train or len(train)], test[: n_test or len(test)]


def truncate(tokenizer: Any, text: str, tokens: int) -> str:
    """The first ``tokens`` tokens of ``text``, as text (so the SFT prompt never loses its question)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= tokens else tokenizer.decode(ids[:tokens])


def load_tokenizer(task: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(task["model"]))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def classifier_rows(tokenizer: Any, records: list[dict], tokens: int) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        enc = tokenizer(r["text"], truncation=True, max_length=tokens)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": r["label"]})
    return rows


def sft_prompt(task: dict[str, Any], tokenizer: Any, text: str) -> str:
    template = task.get("prompt") or "Review: {review}\nIs this review great or other? Answer:"
    return template.format(review=truncate(tokenizer, text, int(task["review_tokens"])).strip())


def answer(label: int) -> str:
    return "great" if label else "other"


def batched(rows: list[dict[str, Any]], size: int, pad_id: int) -> list[dict[str, Any]]:
    import torch

    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in chunk[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in chunk])
        out.append(batch)
    return out


# -- models ---------------------------------------------------------------------------------------------------------


def load_classifier(task: dict[str, Any], tokenizer: Any, seed: int) -> Any:
    """A sequence classifier with a fresh head initialised from ``seed``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with quiet():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path(task["model"]), num_labels=2, dtype=torch.float32
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


@contextlib.contextmanager
def quiet():
    """Silence transformers' load reports (missing head weights are expected: the head is new)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)


def lora_config(task: dict[str, Any]) -> Any:
    from peft import LoraConfig

    settings = dict(task.get("lora") or {})
    settings.setdefault("task_type", "SEQ_CLS" if task["kind"] == "classifier" else "CAUSAL_LM")
    return LoraConfig(**settings)


def count_params(model: Any) -> dict[str, int]:
    """Trainable parameters, each tensor once (shared LoRA modules count once): all, LoRA, the rest (head)."""
    seen: set[int] = set()
    total = lora = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if "lora_" in name:
            lora += p.numel()
    return {"trainable_params": total, "lora_params": lora, "other_trainable_params": total - lora}


def lora_layout(model: Any) -> dict[str, Any]:
    """Where LoRA actually is after the plan was applied: layers with LoRA, tied module sets, ranks."""
    from loraplan.apply import lora_modules_by_layer

    by_layer = lora_modules_by_layer(model)
    layers = sorted(i for i, mods in by_layer.items() if mods)
    owners: dict[int, list[int]] = {}
    ranks = set()
    for i in layers:
        for module in by_layer[i].values():
            adapter = next(iter(module.lora_A))
            owners.setdefault(id(module.lora_A[adapter].weight), []).append(i)
            ranks.add(int(module.r[adapter]))
    tied = sorted({tuple(sorted(set(v))) for v in owners.values() if len(set(v)) > 1})
    return {
        "lora_layers": layers,
        "tied_groups": [list(g) for g in tied],
        "lora_ranks": sorted(ranks),
        "modules_per_layer": sorted({len(by_layer[i]) for i in layers}),
    }
