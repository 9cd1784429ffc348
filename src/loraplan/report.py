"""Text reports of a plan: the per-layer table and the trainable-parameter comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .plan import LoraPlan
from .truncate import NOTE_PREFIX

__all__ = ["ParameterCount", "format_plan", "parameter_count", "score_columns"]


@dataclass
class ParameterCount:
    """Trainable LoRA parameters of LoRA on every layer versus the plan (same target modules)."""

    rank: int
    plan_rank: int
    all_layers: int
    plan: int

    @property
    def ratio(self) -> float:
        return self.plan / self.all_layers if self.all_layers else math.nan


def parameter_count(plan: LoraPlan, rank: int | None = None) -> ParameterCount:
    """LoRA parameters ``r (in + out)`` per target module, all layers at ``rank`` versus the plan's distinct modules
    at the plan's rank. ``rank`` defaults to the rank the plan was made for, else 8."""
    if plan.stacks:  # an encoder-decoder model: each stack's modules at its own shapes, added up
        counts = [parameter_count(one, rank) for one in plan.stacks]
        return ParameterCount(
            rank=counts[0].rank,
            plan_rank=counts[0].plan_rank,
            all_layers=sum(c.all_layers for c in counts),
            plan=sum(c.plan for c in counts),
        )
    made_for = plan.calibration.base_rank
    if plan.rank_pattern and made_for:  # per-layer ranks hold for the rank they were allocated at
        rank = int(made_for)
    base = rank if rank is not None else made_for or plan.rank or 8
    plan_rank = plan.resolve_rank(base)
    shapes = plan.stack.module_shapes or {}
    per_layer = sum(i + o for i, o in shapes.values())
    return ParameterCount(
        rank=base,
        plan_rank=plan_rank,
        all_layers=plan.num_layers * per_layer * base,
        plan=sum(plan.module_ranks(base)) * per_layer,
    )


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 1000 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def score_columns(plan: LoraPlan) -> list[str]:
    """The plan's score names in table order: the selector's and sharer's own scores, then ``importance``."""
    return [n for n in plan.scores if n != "importance"] + (["importance"] if "importance" in plan.scores else [])


def format_plan(plan: LoraPlan, rank: int | None = None) -> str:
    """The per-layer table (scores, selected, group), the parameter comparison, stability and warnings; for an
    encoder-decoder model one such report per stack, then the parameters of the whole model."""
    if plan.stacks:
        parts = [
            f"loraplan plan: {plan.model_fingerprint.class_name}, {len(plan.stacks)} layer stacks planned on their "
            f"own, {plan.calibration.num_samples} calibration samples"
        ]
        for one in plan.stacks:
            parts += ["", f"== {one.stack.name} stack =="]
            parts.append(format_plan(one, rank))
        count = parameter_count(plan, rank)
        parts += [
            "",
            f"trainable LoRA parameters of the whole model: all layers of every stack at r={count.rank}: "
            f"{count.all_layers:,}; plan: {count.plan:,} ({count.ratio:.1%}, saving {1 - count.ratio:.1%})",
        ]
        parts += format_cost(plan)
        parts += [f"warning: {w}" for w in plan.warnings if w.split(" stack: ", 1)[0] not in ("encoder", "decoder")]
        return "\n".join(parts)
    names = score_columns(plan)
    rest = set(plan.shared_rest)
    show_ranks = bool(plan.rank_pattern or rest)
    base = parameter_count(plan, rank).rank
    header = ["layer", *names, "selected", "group", *(["rank"] if show_ranks else [])]
    rows = []
    for layer in range(plan.num_layers):
        group = plan.group_of(layer)
        mark = "yes" if layer in plan.selected_layers else ("rest" if layer in rest else "")
        mark = "FLAGGED" if not mark and layer in plan.flagged_layers else mark
        row = [str(layer), *(_fmt(plan.scores[n][layer]) for n in names), mark, "" if group is None else f"G{group}"]
        if show_ranks:
            row.append(str(plan.layer_rank(layer, base)) if layer in plan.adapted_layers else "")
        rows.append(row)
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(header)]
    lines = [
        f"loraplan plan: {plan.model_fingerprint.class_name} ({plan.num_layers} layers at {plan.stack.path}), "
        f"selector={plan.selector}"
        + (f", share={plan.share} (threshold {plan.config.get('share_threshold')})" if plan.share else "")
        + f", {plan.calibration.num_samples} calibration samples",
        "  ".join(h.rjust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append("")
    lines.append(f"selected layers ({len(plan.selected_layers)}/{plan.num_layers}): {plan.selected_layers}")
    if rest:
        lines.append(f"shared rest (LoRA through one shared module set per target module): {sorted(rest)}")
    if plan.share_groups:
        lines.append(
            "share groups: "
            + ", ".join(f"G{i}={g}" for i, g in enumerate(plan.share_groups))
            + f" -> {plan.num_modules()} distinct LoRA module sets"
        )
    count = parameter_count(plan, rank)
    if count.all_layers:
        targets = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in plan.stack.module_shapes or {}}))
        lines.append(
            f"trainable LoRA parameters ({targets}): all layers at r={count.rank}: {count.all_layers:,}; "
            f"plan at {'per-layer ranks' if plan.rank_pattern else f'r={count.plan_rank}'}: {count.plan:,} "
            f"({count.ratio:.1%}, saving {1 - count.ratio:.1%})"
        )
    lines += format_cost(plan)
    for name, rho in plan.stability.items():
        lines.append(f"stability of the {name} ranking across two halves of the calibration data: Spearman {rho:.3f}")
    for layer, reason in sorted(plan.flagged_layers.items()):
        lines.append(f"flagged layer {layer}: {reason}")
    for warning in plan.warnings:
        if not warning.startswith("layer ") or "flagged" not in warning:
            lines.append(f"warning: {warning}")
    return "\n".join(lines)


def format_cost(plan: LoraPlan) -> list[str]:
    """The cost model's predictions (and a budget's trade-off) as lines; none for a plan without a cost model."""
    cost = plan.cost
    if cost.unavailable is not None:
        return [f"cost model: unavailable ({cost.unavailable})"]
    predicted, costs = cost.predicted, cost.costs
    if not predicted or costs is None:
        return []
    batch, seq = costs.shape
    how = "FLOP counts" if costs.source == "flops" else f"timed on {costs.device} ({costs.dtype})"
    lines = [
        f"cost model ({how}, batch {batch} x {seq} tokens, r={costs.rank}): predicted step time / peak memory "
        "as a fraction of LoRA on every layer:"
    ]
    labels = {
        "loraplan": "with loraplan (no autograd below the lowest layer)",
        "stock": "stock PEFT, embedding output requiring grad",
        "stock_no_input_grads": "stock PEFT, input grads off",
    }
    for setting, title in (("checkpointing", "activation checkpointing"), ("no_checkpointing", "no checkpointing")):
        rows = predicted.get(setting, {})
        if rows:
            cells = [f"{labels.get(k, k)} {v['time']:.2f}x / {v['memory']:.2f}x" for k, v in rows.items()]
            lines.append(f"  {title}: " + "; ".join(cells))
    budget = cost.budget_dict()
    if budget:
        lines.append(f"budget: {budget.get('summary')}")
        candidates = [c for c in budget.get("candidates", []) if c.get("fits")]
        if candidates:
            best = sorted(candidates, key=lambda c: (-c["importance"], c["time"]))[:5]
            lines.append(
                "  best cuts (lowest layer: layers that fit, importance, predicted step time): "
                + "; ".join(f"{c['lowest']}: {c['count']}, {c['importance']:.4g}, {c['time']:.2f}x" for c in best)
            )
    for note in costs.notes:
        lines.append(f"  note: {note}")
    truncation = [n for n in plan.notes if n.startswith(NOTE_PREFIX)]
    lines += [f"{n}" for n in truncation]
    return lines
