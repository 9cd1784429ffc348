"""Fixtures for the trainer-integration tests: a tiny random Llama with the real SmolLM2 tokenizer, real review
texts, and independent checks of what a training run ended with.

HF_HUB_OFFLINE is set before transformers is imported: no test touches a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("LORAPLAN_DISABLE_PLUGIN_AUTOLOAD", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
SRC = REPO / "src"

#: plan settings that give a share group on the tiny random model (threshold 0 groups every selected layer)
SHARED = {
    "selector": "cka",
    "ratio": 0.5,
    "share": "angular",
    "share_threshold": 0.0,
    "calibration_samples": 16,
    "max_length": 32,
    "last_token": "reference",
}
LAYER = re.compile(r"\.layers\.(\d+)\.")


def load_recipe_module(name: str):
    """A script under recipes/ (not a package) as a module."""
    path = RECIPES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipes_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random-init 4-layer Llama (d=32) with the SmolLM2 tokenizer, plus reviews as JSONL: what
    ``recipes/make_tiny_model.py`` writes."""
    out = tmp_path_factory.mktemp("tiny")
    maker = load_recipe_module("make_tiny_model")
    maker.write_tiny(out)
    maker.write_reviews(out)
    return out


@pytest.fixture(scope="session")
def model_dir(tiny_dir) -> Path:
    return tiny_dir / "model"


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    from loraplan.assets import fine_foods

    return [r["text"][:400] for r in fine_foods("train")[:64]]


def lora_model(model_dir, r: int = 4, targets=("q_proj", "v_proj", "up_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))


# -- independent checks -------------------------------------------------------------------------------------------


def lora_layers(model) -> list[int]:
    """Layers that hold a LoRA module, read from module names (not from loraplan)."""
    modules = model.named_modules(remove_duplicate=False)  # tied LoRA modules appear under every layer
    found = {int(m.group(1)) for name, _ in modules if ".lora_A." in name and (m := LAYER.search(name))}
    return sorted(found)


def lora_pairs(model, layer: int) -> dict[str, tuple]:
    """``{module path inside the layer: (lora_A module, lora_B module)}`` of the default adapter."""
    from peft.tuners.lora import LoraLayer

    pairs = {}
    prefix = f".layers.{layer}."
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and prefix in name and "default" in module.lora_A:
            pairs[name.split(prefix, 1)[1]] = (module.lora_A["default"], module.lora_B["default"])
    return pairs


def assert_plan_realised(model, plan, *, sharing: bool = True) -> None:
    """LoRA exactly in the planned layers (a shared rest included), at the plan's per-layer ranks; each share group
    is one set of modules, one tensor each."""
    assert lora_layers(model) == plan.adapted_layers
    if sharing:
        assert plan.share_groups, "the test settings are meant to form a share group"
    for layer, rank in plan.rank_pattern.items():
        assert {a.weight.shape[0] for a, _ in lora_pairs(model, layer).values()} == {rank}, f"rank of layer {layer}"
    for group in plan.share_groups:
        lead = lora_pairs(model, group[0])
        assert lead
        for member in group[1:]:
            pairs = lora_pairs(model, member)
            assert pairs.keys() == lead.keys()
            for name, (a, b) in pairs.items():
                assert a is lead[name][0] and b is lead[name][1], f"{name} of layer {member} is not tied"
                assert a.weight.data_ptr() == lead[name][0].weight.data_ptr()
                assert b.weight.data_ptr() == lead[name][1].weight.data_ptr()
    ungrouped = [i for i in plan.adapted_layers if not any(i in g for g in plan.share_groups)]
    for i in ungrouped:
        for j in plan.adapted_layers:
            if j != i:
                for name, (a, _) in lora_pairs(model, i).items():
                    assert a is not lora_pairs(model, j)[name][0]


def assert_trained(model, plan) -> None:
    """lora_B starts at zero; after the steps the shared one has moved."""
    lead = lora_pairs(model, plan.share_groups[0][0])
    assert any(float(b.weight.detach().abs().max()) > 0 for _, b in lead.values())


def assert_stock_reload(model, base_dir, adapter_dir, tokenizer) -> None:
    """The saved adapter loads with stock ``PeftModel.from_pretrained`` and gives the trained model's outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = tokenizer(["A fine cup of tea.", "Stale and bitter, never again."], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    assert type(fresh).__module__.startswith("peft.")
    with torch.no_grad():
        got = fresh(**inputs).logits
    assert lora_layers(fresh) == lora_layers(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def losses(trainer) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def tokenised(texts, tokenizer, max_length=32):
    from datasets import Dataset

    return Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )


def make_trainer(model, out, tokenizer, dataset, callback, **overrides):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    settings = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[callback] if callback is not None else None,
    )


@pytest.fixture
def checks():
    """The independent checks above, for the test modules (conftest is not importable under importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        lora_layers=lora_layers,
        lora_pairs=lora_pairs,
        plan_realised=assert_plan_realised,
        trained=assert_trained,
        stock_reload=assert_stock_reload,
        losses=losses,
        lora_model=lora_model,
        recipe=load_recipe_module,
        tokenised=tokenised,
        make_trainer=make_trainer,
    )


@pytest.fixture
def shared() -> dict:
    """Plan settings that form a share group on the tiny random model."""
    return dict(SHARED)
