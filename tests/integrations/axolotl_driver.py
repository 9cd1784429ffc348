"""Runs inside the Axolotl venv for tests/integrations/test_axolotl.py (the main venv cannot import axolotl 0.21).

``python axolotl_driver.py train CONFIG REPORT``
    Axolotl's Python entry point, as ``axolotl train`` runs it (``load_cfg`` → ``load_datasets`` → ``train``),
    then writes REPORT (JSON): the LoRA modules of each layer with their identities after the steps, every LoRA site
    of the model with its rank, the sites that the saved adapter config alone gives a fresh model, the checkpointing
    functions, the losses, and the largest difference between the trained model's logits and those of the saved
    adapter loaded with stock ``PeftModel.from_pretrained``. The test makes the assertions.
``python axolotl_driver.py validate CONFIG...``
    Validates each Axolotl YAML with the plugin's args model merged in, as ``load_cfg`` does (no model download).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def train(config: str, report: str) -> None:
    import torch
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.integrations.base import PluginManager
    from axolotl.train import train as axolotl_train
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_cfg(config)
    # Axolotl's logger class drops INFO from non-axolotl loggers; the test reads loraplan's INFO lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[loraplan-driver] [%(levelname)s] %(message)s"))
    logger = logging.getLogger("loraplan")
    logger.filters.clear()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    dataset_meta = load_datasets(cfg=cfg)
    model, tokenizer, trainer = axolotl_train(cfg=cfg, dataset_meta=dataset_meta)
    PluginManager.get_instance().post_train_unload(cfg)

    layers: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A and ".layers." in name:
            index, inner = name.split(".layers.", 1)[1].split(".", 1)
            layers.setdefault(index, {})[inner] = {
                "lora_A_id": id(module.lora_A["default"]),
                "lora_B_id": id(module.lora_B["default"]),
                "lora_A_data_ptr": module.lora_A["default"].weight.data_ptr(),
                "lora_B_data_ptr": module.lora_B["default"].weight.data_ptr(),
                "lora_B_absmax": float(module.lora_B["default"].weight.detach().abs().max()),
            }
    checkpointing = sorted(
        {
            repr(getattr(m._gradient_checkpointing_func, "keywords", None))
            for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")
        }
    )
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    inputs = tok(["A fine cup of tea.", "Stale and bitter, never again."], return_tensors="pt", padding=True)
    quantization = _quantization(cfg)
    # a quantized model is compared in train mode (no dropout here): in eval mode under no_grad bitsandbytes repacks
    # 4-bit weights for CPU inference, which is not what trained
    mode = "train" if quantization is not None else "eval"
    if quantization is None:
        base = AutoModelForCausalLM.from_pretrained(cfg.base_model)
    else:  # as Axolotl loads a quantized model: in its dtype (float16 for 8-bit), then prepared for k-bit training
        from peft import prepare_model_for_kbit_training

        base = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, quantization_config=quantization, dtype=cfg.torch_dtype
        )
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    fresh_state = _quantized_state(base)
    fresh = PeftModel.from_pretrained(base, cfg.output_dir)
    live = dict(model.named_parameters(remove_duplicate=False))
    for name, param in fresh.named_parameters(remove_duplicate=False):
        if name in live and param.is_floating_point() and param.dtype != live[name].dtype:
            # Axolotl keeps an 8-bit model's norms, embeddings and LoRA in its own dtype: the reload gets the same
            param.data = param.data.to(live[name].dtype)
    for m in (model, fresh):
        m.train(mode == "train")
    with torch.no_grad():
        want = model(**inputs).logits
        got = fresh(**inputs).logits
    reloaded_layers = sorted(
        {int(n.split(".layers.")[1].split(".")[0]) for n, _ in fresh.named_modules() if ".lora_A." in n}
    )
    saved = LoraConfig.from_pretrained(cfg.output_dir)
    from_config = get_peft_model(AutoModelForCausalLM.from_pretrained(cfg.base_model), saved)
    facts = {
        "layers": layers,
        "checkpointing": checkpointing,
        "global_step": trainer.state.global_step,
        "losses": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        "stock_reload_max_abs_diff": float((got - want).abs().max()),
        "stock_reload_class": type(fresh).__module__ + "." + type(fresh).__name__,
        "stock_reload_layers": reloaded_layers,
        "sites": _sites(model),
        "config_sites": _sites(from_config),
        "saved_exclude_modules": saved.exclude_modules,
        "gradient_checkpointing_kwargs": dict(cfg.gradient_checkpointing_kwargs or {}),
        "parameter_differences": _differences(model, fresh),
        "quantized_weights": len(fresh_state),
        "quantized_weights_changed": sorted(k for k, v in _quantized_state(model).items() if fresh_state.get(k) != v),
    }
    Path(report).write_text(json.dumps(facts, indent=1), encoding="utf-8")


def _differences(model, fresh) -> dict[str, float]:
    """The floating-point parameters (and buffers) whose values differ between the trained model and the reload."""
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    found = {}
    for name, value in [*fresh.named_parameters(), *fresh.named_buffers()]:
        other = live.get(name)
        if other is None or not value.is_floating_point() or other.shape != value.shape:
            continue
        diff = float((other.detach().float() - value.detach().float()).abs().max())
        if diff > 0 or other.dtype != value.dtype:
            found[name] = diff
    return dict(sorted(found.items())[:8])


def _quantization(cfg):
    """The BitsAndBytesConfig of an ``adapter: qlora`` / ``load_in_8bit`` run, for fresh loads of the base model."""
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type or "nf4",
            bnb_4bit_use_double_quant=bool(
                cfg.bnb_4bit_use_double_quant if cfg.bnb_4bit_use_double_quant is not None else True
            ),
            bnb_4bit_compute_dtype=torch.float32,
        )
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _quantized_state(model) -> dict[str, str]:
    """A digest of every quantized weight's bytes and quantization state (4-bit: absmax, code, the nested state of
    double quantization; 8-bit: the row scales), by module name without PEFT's prefixes."""
    import hashlib

    import torch

    from loraplan.quantized import quantized_weights

    def digest(t) -> str:
        return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

    found = {}
    for name, weight in quantized_weights(model).items():
        # the stored bytes, not the tensor's dtype: Axolotl keeps 4-bit weights in a float32 `bnb_4bit_quant_storage`,
        # the same bytes a fresh uint8-stored load holds
        parts = [digest(weight.data)]
        state = getattr(weight, "quant_state", None)
        if state is not None:
            parts += [str(state.dtype), digest(state.absmax), digest(state.code)]
            if getattr(state, "nested", False):
                parts += [digest(state.offset), digest(state.state2.absmax)]
        # 8-bit: the row scales live on the weight until the first forward moves them to the module's state
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(model.get_submodule(name), "state", None), "SCB", None)
        if isinstance(scales, torch.Tensor):
            parts.append(digest(scales))
        found[name.replace("base_model.model.", "").replace(".base_layer", "")] = "|".join(parts)
    return found


def _sites(model) -> dict[str, int]:
    """``{module name: rank}`` of every module owning a ``lora_A`` for the default adapter, under every name it has
    (``remove_duplicate=False``: a shared module is listed in each of its layers)."""
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name.endswith(".lora_A") and "default" in module:
            found[name.removesuffix(".lora_A").removeprefix("base_model.model.")] = int(
                module["default"].weight.shape[0]
            )
    return found


def validate(configs: list[str]) -> None:
    import yaml
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    for path in configs:
        cfg = DictDefault(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
        prepare_plugins(cfg)
        checked = validate_config(cfg)
        print(json.dumps({"config": path, "loraplan": dict(checked["loraplan"])}))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "validate":
        validate(sys.argv[2:])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
