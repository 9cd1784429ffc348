"""What a saved adapter says about how it was made: a ``loraplan`` section in the PEFT model card (``README.md``)
and the ``loraplan`` tag.

:func:`attach_card` is called by :func:`loraplan.apply_plan`: it tags the base model (``add_model_tags``, which
PEFT copies into the card's tags) and makes the PEFT model's own ``create_or_update_model_card``, which every
``save_pretrained`` calls (``save_adapter``, ``Trainer`` checkpoints), also write the section. The section sits
between markers, so saving again replaces it and leaves the rest of the card as PEFT and the user wrote it.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from torch import nn

from .plan import PLAN_FILE, LoraPlan
from .report import parameter_count
from .sites import fold_ranges

__all__ = ["BEGIN", "END", "TAG", "attach_card", "card_section", "lora_parameters", "write_card"]

TAG = "loraplan"
BEGIN = "<!-- loraplan:begin -->"
END = "<!-- loraplan:end -->"


def lora_parameters(model: nn.Module, adapter: str | None = None) -> int:
    """Distinct LoRA parameters of ``adapter`` (any adapter if ``None``) in ``model``: a shared module counts once."""
    seen: dict[int, int] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) and (adapter is None or adapter in parts):
            seen[id(param)] = param.numel()
    return sum(seen.values())


def card_section(plan: LoraPlan, adapter_parameters: int | None = None) -> str:
    """The Markdown section, markers included: method, layers, share groups, rank and the parameters saved."""
    config = plan.config
    method = f"selector `{plan.selector}`"
    if config.get("count") is not None:
        method += f" (count {config['count']})"
    elif config.get("cumulative") is not None:
        method += f" (cumulative {config['cumulative']})"
    elif config.get("time_budget") is not None or config.get("param_budget") is not None:
        budgets = [f"{k} {config[k]}" for k in ("time_budget", "param_budget") if config.get(k) is not None]
        method += f" ({', '.join(budgets)})"
    else:
        method += f" (ratio {config.get('ratio')})"
    method += f", sharer `{plan.share}` (threshold {config.get('share_threshold')})" if plan.share else ", no sharing"
    groups = (
        "; ".join(
            (f"{one.stack.name} " if plan.stacks else "") + fold_ranges(group)
            for one in plan.stack_plans()
            for group in one.share_groups
        )
        or "none"
    )
    count = parameter_count(plan)
    rank = f"r={plan.rank}" if plan.rank is not None else "the LoRA config's r"
    if plan.rank_pattern:
        rank += ", per layer " + ", ".join(f"{i}: {r}" for i, r in sorted(plan.rank_pattern.items()))
    rest = plan.shared_rest
    lines = [
        BEGIN,
        "## loraplan",
        "",
        f"The layers that carry LoRA and the layers that share one LoRA module were planned by loraplan "
        f"{plan.versions.get('loraplan', '')} from a calibration pass of {plan.calibration.num_samples} samples "
        f"(the whole plan: `{PLAN_FILE}` beside this file).",
        "",
        f"- **Method**: {method}",
        f"- **Layers with LoRA**: {len(plan.adapted_layers)} of {plan.num_layers} ("
        + ", ".join(f"`{one.stack_path}.{{{fold_ranges(one.adapted_layers)}}}`" for one in plan.stack_plans())
        + ")"
        + (f", of which {fold_ranges(rest)} through one shared module set (the shared rest)" if rest else ""),
        f"- **Share groups** (one LoRA module per target module for each group): {groups}",
        f"- **Rank**: {rank} (rank policy `{config.get('rank_policy', 'keep')}`)",
        f"- **LoRA parameters**: {count.plan:,} planned against {count.all_layers:,} for LoRA on every layer at "
        f"r={count.rank} ({count.ratio:.0%}), counting the target modules calibration read",
    ]
    if adapter_parameters is not None:
        lines.append(f"- **In this adapter**: {adapter_parameters:,} distinct LoRA parameters")
    lines.append(END)
    return "\n".join(lines)


def write_card(directory: str | Path, plan: LoraPlan, adapter_parameters: int | None = None) -> Path:
    """Write (or replace) the section in ``directory/README.md`` and add the ``loraplan`` tag to its metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(directory) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard.from_template(ModelCardData())
    tags = list(card.data.tags or [])
    if TAG not in tags:
        card.data.tags = sorted([*tags, TAG])
    text = card.text
    section = card_section(plan, adapter_parameters)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    card.text = text
    card.save(path)
    return path


def create_or_update_model_card(self: Any, output_dir: str) -> None:
    """PEFT's own card, then the loraplan section (bound to a planned PEFT model by :func:`attach_card`)."""
    type(self).create_or_update_model_card(self, output_dir)
    plan = getattr(self, "loraplan_plan", None)
    if plan is not None:
        adapter = getattr(self, "active_adapter", None)
        write_card(output_dir, plan, lora_parameters(self, adapter if isinstance(adapter, str) else None))


def attach_card(peft_model: nn.Module) -> None:
    """Tag the base model and make every ``save_pretrained`` of ``peft_model`` write the loraplan section."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if hasattr(base, "add_model_tags"):
        base.add_model_tags([TAG])
    # an instance attribute shadows the class method (same name, so a pickled model falls back to PEFT's own); a deep
    # copy of the model rebinds it to the copy
    peft_model.__dict__["create_or_update_model_card"] = types.MethodType(create_or_update_model_card, peft_model)
