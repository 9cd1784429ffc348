"""The numbers of the quality benchmark's report: the records of the current config, means and spreads, and the
per-task and stability summaries that the tables and figures (``quality_report.py``) are drawn from."""

from __future__ import annotations

import math
import statistics
from itertools import combinations
from typing import Any

from _records import config_hash, digest, task_hash

# -- selecting the records of the current config --------------------------------------------------------------------


def current(config: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The records that belong to the current config (task and method hashes match), the last of duplicates."""
    out: dict[str, Any] = {"tasks": {}, "runs": {}, "plans": {}, "stability": [], "sessions": []}
    hashes = {name: task_hash(config, name) for name in config["tasks"]}
    methods = {m["name"]: digest(m) for m in config["methods"]}
    for r in records:
        kind = r.get("type")
        if kind == "task" and hashes.get(r["task"]) == r["task_hash"]:
            out["tasks"][r["task"]] = r
        elif (
            kind in ("run", "plan")
            and hashes.get(r["task"]) == r["task_hash"]
            and methods.get(r["method"]) == r["method_hash"]
        ):
            if kind == "run":
                out["runs"][(r["task"], r["method"], r["seed"])] = r
            else:
                out["plans"][(r["task"], r["method"], r["plan_seed"])] = r
        elif kind == "session" and r.get("config_hash") == config_hash(config):
            out["sessions"].append(r)
    study = config.get("stability") or {}
    stability_hashes = {digest({"task": hashes[t], "study": study}) for t in study.get("tasks", []) if t in hashes}
    cells = {}
    for r in records:
        if r.get("type") == "stability" and r.get("study_hash") in stability_hashes:
            cells[(r["task"], r["seed"], r["subset"], r["selector"])] = r
    out["stability"] = list(cells.values())
    return out


# -- numbers --------------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def pm(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if not math.isnan(s) else "")


def spearman(a: list[float], b: list[float]) -> float:
    from loraplan.similarity import spearman as rho

    keep = [
        i
        for i in range(len(a))
        if a[i] is not None
        and b[i] is not None
        and not (isinstance(a[i], float) and math.isnan(a[i]))
        and not (isinstance(b[i], float) and math.isnan(b[i]))
    ]
    return rho([a[i] for i in keep], [b[i] for i in keep])


def layers_text(layers: list[int], total: int | None) -> str:
    if total is not None and layers == list(range(total)):
        return f"all {total}"
    spans, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            spans.append(f"{start}" if start == layer else f"{start}–{layer}")
            start = None
    return ",".join(spans)


def groups_text(groups: list[list[int]]) -> str:
    return " ".join("{" + layers_text(g, None) + "}" for g in groups) if groups else "–"


# -- summaries ---------------------------------------------------------------------------------------------------------


def predicted_time(
    config: dict[str, Any], data: dict[str, Any], task: str, method: dict[str, Any], run: dict[str, Any]
) -> float | None:
    """The cost model's step-time ratio to all-layer LoRA for the plan a run trained with, with the task's
    checkpointing and loraplan's truncated backward (the plans record it; ``None`` for a plan without it)."""
    plan = data["plans"].get((task, method["name"], run.get("plan_seed")))
    predicted = ((plan or {}).get("plan") or {}).get("cost", {}).get("predicted")
    if not predicted:
        return None
    checkpointing = bool((config["tasks"][task].get("training") or {}).get("gradient_checkpointing", False))
    return predicted["checkpointing" if checkpointing else "no_checkpointing"]["loraplan"]["time"]


def task_summary(config: dict[str, Any], data: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """One row per method: accuracy over seeds, paired difference to all-layer LoRA, params, times, plan."""
    rows = []
    seeds = config["seeds"]
    base = {s: data["runs"].get((task, "all", s)) for s in seeds}
    listed = config["tasks"][task].get("methods")
    for method in config["methods"]:
        if listed is not None and method["name"] not in listed:
            continue
        runs = [data["runs"][(task, method["name"], s)] for s in seeds if (task, method["name"], s) in data["runs"]]
        if not runs:
            continue
        acc = [r["accuracy"] for r in runs]
        diffs = [r["accuracy"] - base[r["seed"]]["accuracy"] for r in runs if base.get(r["seed"])]
        layers = {tuple(r["selected_layers"]) for r in runs}
        groups = {tuple(map(tuple, r["share_groups"])) for r in runs}
        rows.append(
            {
                "method": method["name"],
                "label": method.get("label", method["name"]),
                "n": len(runs),
                "accuracy": acc,
                "diff": diffs if method["name"] != "all" else [],
                "lora_params": [r["lora_params"] for r in runs],
                "trainable_params": [r["trainable_params"] for r in runs],
                "train_seconds": [r["train_seconds"] for r in runs],
                "train_cpu_seconds": [r.get("train_cpu_seconds") for r in runs],
                "layers": runs[0]["selected_layers"] if len(layers) == 1 else None,
                "num_layers": len(runs[0]["selected_layers"]),
                "groups": runs[0]["share_groups"] if len(groups) == 1 else None,
                "num_modules": runs[0]["num_modules"],
                "rank": sorted({r["rank"] for r in runs}),
                "lora_ranks": sorted({k for r in runs for k in r.get("lora_ranks") or [r["rank"]]}),
                "predicted_time": [t for t in (predicted_time(config, data, task, method, r) for r in runs) if t],
                "steps": [r.get("steps") for r in runs],
                "plan_matches": all(r.get("plan_matches") for r in runs),
                "runs": runs,
            }
        )
    return rows


def stability_rows(config: dict[str, Any], data: dict[str, Any]) -> list[dict[str, Any]]:
    study = config.get("stability") or {}
    out = []
    for task in study.get("tasks", []):
        for selector in study.get("selectors", ["cka", "activation", "gradient"]):
            cells = [c for c in data["stability"] if c["task"] == task and c["selector"] == selector]
            if len(cells) < 2:
                continue
            same, cross, overlap, halves = [], [], [], []
            for a, b in combinations(cells, 2):
                rho = spearman(a["importance"], b["importance"])
                k = len(a["selected_layers"])
                shared = len(set(a["selected_layers"]) & set(b["selected_layers"])) / k if k else math.nan
                (same if a["seed"] == b["seed"] else cross).append(rho)
                overlap.append(shared)
            halves = [c["half_split"] for c in cells if c.get("half_split") is not None]
            out.append(
                {
                    "task": task,
                    "selector": selector,
                    "same_seed": same,
                    "cross_seed": cross,
                    "overlap": overlap,
                    "half_split": halves,
                    "cells": len(cells),
                    "flagged": sorted({i for c in cells for i in c.get("flagged_layers", [])}),
                }
            )
    return out
