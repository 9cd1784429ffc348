"""Tables and figures of the quality benchmark, from its JSON-lines results only (``quality.py --report``).

The Markdown goes between ``<!-- BEGIN quality:NAME -->`` / ``<!-- END quality:NAME -->`` markers of the results
page, so the prose around the tables is kept; a page without markers gets them appended.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from _markdown import replace_block  # benchmarks/_markdown.py; quality.py puts this folder on sys.path
from quality_summary import (
    current,
    groups_text,
    layers_text,
    mean_std,
    pm,
    stability_rows,
    task_summary,
)

ROOT = Path(__file__).resolve().parent.parent

MARKERS = ("environment", "stability")


# -- tables ---------------------------------------------------------------------------------------------------------


def results_table(config: dict[str, Any], data: dict[str, Any], task: str) -> str:
    facts = data["tasks"].get(task)
    rows = task_summary(config, data, task)
    if not rows or facts is None:
        return "_no results yet_\n"
    total = facts.get("num_layers") or next(
        (len(r["layers"]) for r in rows if r["method"] == "all" and r["layers"]), None
    )
    all_params = next((r["lora_params"][0] for r in rows if r["method"] == "all"), None)
    lines = [
        f"Test subset: {facts['test_examples']} reviews, majority baseline **{facts['majority']:.3f}**; "
        f"{facts['train_examples']} training reviews; seeds {config['seeds']}.",
        "",
        "| configuration | layers | share groups | r | LoRA params | vs all | accuracy (mean ± std) | Δ vs all "
        "(paired) | step, predicted | step, measured (CPU) | train s (wall) | train s (CPU) | n |",
        "|---|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    all_cpu = next((statistics.fmean(_cpu(r)) for r in rows if r["method"] == "all" and _cpu(r)), None)
    for r in rows:
        layers = layers_text(r["layers"], total) if r["layers"] is not None else f"{r['num_layers']} (seed-dependent)"
        groups = groups_text(r["groups"]) if r["groups"] is not None else "(seed-dependent)"
        params = statistics.fmean(r["lora_params"])
        ratio = f"{params / all_params:.0%}" if all_params else "–"
        diff = pm(r["diff"]) if r["diff"] else "–"
        if diff != "–" and not diff.startswith("-"):
            diff = "+" + diff
        mark = "" if r["plan_matches"] else " ⚠"
        ranks = r["lora_ranks"]
        rank = f"{min(ranks)}–{max(ranks)}" if len(ranks) > 1 else str(ranks[0] if ranks else r["rank"][0])
        predicted = f"{statistics.fmean(r['predicted_time']):.2f}×" if r["predicted_time"] else "–"
        measured = f"{statistics.fmean(_cpu(r)) / all_cpu:.2f}×" if all_cpu and _cpu(r) else "–"
        lines.append(
            f"| {r['label']}{mark} | {layers} | {groups} | {rank} | {params:,.0f} | {ratio} | "
            f"{pm(r['accuracy'])} | {diff} | {predicted} | {measured} | {pm(r['train_seconds'], 0)} | "
            f"{pm(r['train_cpu_seconds'], 0)} | {r['n']} |"
        )
    if any(not r["plan_matches"] for r in rows):
        lines.append("")
        lines.append("⚠ LoRA was found in other layers (or other tied groups) than the plan named.")
    lines += ["", frontier_line(rows, all_cpu)]
    return "\n".join(lines) + "\n"


def _cpu(row: dict[str, Any]) -> list[float]:
    """CPU seconds per training step of a row's runs (the measured step; CPU time, since the wall clock also counts
    the waits of a machine shared with other work)."""
    return [c / s for c, s in zip(row["train_cpu_seconds"], row["steps"]) if c and s]


def frontier_line(rows: list[dict[str, Any]], all_cpu: float | None) -> str:
    """The question users ask: the fastest configuration whose mean accuracy keeps at least 99 % of all-layer LoRA's,
    by the cost model's predicted step (deterministic; all layers count 1.00) and by the measured CPU step."""
    reference = next((statistics.fmean(r["accuracy"]) for r in rows if r["method"] == "all"), None)
    if reference is None or len(rows) < 2:
        return "_Frontier: needs all-layer LoRA and at least one plan beside it._"
    keep = [r for r in rows if statistics.fmean(r["accuracy"]) >= 0.99 * reference]

    def predicted(r: dict[str, Any]) -> float | None:
        return 1.0 if r["method"] == "all" else (statistics.fmean(r["predicted_time"]) if r["predicted_time"] else None)

    parts = []
    priced = [r for r in keep if predicted(r) is not None]
    if priced:
        best = min(priced, key=lambda r: (predicted(r), -statistics.fmean(r["accuracy"])))
        parts.append(f"by the predicted step, **{best['label']}** ({predicted(best):.2f}×)")
    measured = [r for r in keep if _cpu(r)] if all_cpu else []
    if measured:
        best = min(measured, key=lambda r: statistics.fmean(_cpu(r)))
        parts.append(f"by the measured CPU step, **{best['label']}** ({statistics.fmean(_cpu(best)) / all_cpu:.2f}×)")
    unpriced = [r["label"] for r in keep if predicted(r) is None]
    complete = all(r["n"] == max(x["n"] for x in rows) for r in keep)
    return (
        f"**Frontier**, the fastest configuration with mean accuracy ≥ 99 % of all-layer LoRA's {reference:.3f} "
        f"({len(keep)} of {len(rows)} configurations qualify): "
        + ("; ".join(parts) if parts else "no step figures")
        + (f". Without a predicted step (plans made before the cost model): {', '.join(unpriced)}" if unpriced else "")
        + ("" if complete else ". Some rows have fewer seeds than others, so this may change")
        + "."
    )


def plans_table(config: dict[str, Any], data: dict[str, Any], task: str) -> str:
    lines = [
        "| configuration | plan seed | selected layers | share groups | modules | r | half-split ρ | calibration s |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    found = False
    for method in config["methods"]:
        for key in sorted(
            (k for k in data["plans"] if k[0] == task and k[1] == method["name"]),
            key=lambda k: -1 if k[2] is None else k[2],
        ):
            found = True
            p = data["plans"][key]
            rho = next(iter(p["stability"].values()), None) if p.get("stability") else None
            secs = p.get("calibration_seconds")
            lines.append(
                f"| {method.get('label', method['name'])} | {'–' if key[2] is None else key[2]} | "
                f"{layers_text(p['selected_layers'], p['plan']['num_layers'])} | {groups_text(p['share_groups'])} | "
                f"{p['num_modules']} | "
                f"{p['rank']} | {'–' if rho is None else f'{rho:.2f}'} | {'–' if secs is None else f'{secs:.1f}'} |"
            )
    return ("\n".join(lines) + "\n") if found else "_no plans yet_\n"


def stability_table(config: dict[str, Any], data: dict[str, Any]) -> str:
    rows = stability_rows(config, data)
    if not rows:
        return "_no stability results yet_\n"
    study = config.get("stability") or {}
    n = (config.get("calibration") or {}).get("calibration_samples", 128)
    lines = [
        f"{len(study.get('seeds', [0, 1, 2]))} seeds × {study.get('subsets', 2)} disjoint subsets of {n} training "
        "reviews per seed (each seed shuffles the training split and initialises the classifier head). Spearman ρ "
        "of the per-layer importance between every pair of rankings; 'top-50 % overlap' is the share of the selected "
        "layers two rankings have in common; 'half-split' is the ρ each plan stores between the two halves of its "
        "own calibration batch.",
        "",
        "| model | selector | ρ, disjoint subsets, same seed (mean [min, max]) | ρ, across seeds | top-50 % overlap "
        "| half-split ρ (in plan) | rankings |",
        "|---|---|---|---|---|---|---:|",
    ]

    def span(values: list[float]) -> str:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return "–"
        return f"{statistics.fmean(values):.2f} [{min(values):.2f}, {max(values):.2f}]"

    for r in rows:
        flagged = f" (layer {','.join(map(str, r['flagged']))} unscorable, left out)" if r["flagged"] else ""
        lines.append(
            f"| {r['task']} | {r['selector']}{flagged} | {span(r['same_seed'])} | {span(r['cross_seed'])} | "
            f"{span(r['overlap'])} | {span(r['half_split'])} | {r['cells']} |"
        )
    return "\n".join(lines) + "\n"


def environment_block(config: dict[str, Any], data: dict[str, Any], config_path: str) -> str:
    envs = [t["environment"] for t in data["tasks"].values() if t.get("environment")]
    if not envs:
        return "_no results yet_\n"
    env = envs[0]
    runs = list(data["runs"].values())
    seconds = sum(s["seconds"] for s in data["sessions"])
    lines = [
        f"- Machine: {env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads, "
        f"{'CUDA' if env['cuda'] else 'no GPU'}; shared with other work, the benchmark ran at niceness "
        f"{env['niceness']} (`nice -n 19`), so times include waiting for the CPU.",
        f"- Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"trl {env['trl']}, datasets {env['datasets']}, accelerate {env['accelerate']}, loraplan {env['loraplan']}.",
        f"- {len(runs)} training runs, {len(data['plans'])} plans, {len(data['stability'])} stability calibrations.",
        f"- Wall time: {seconds / 60:.1f} min over {len(data['sessions'])} invocation(s) of "
        f"`python benchmarks/quality.py --config {config_path}`"
        + (" (sum of the invocations' elapsed times; resumed runs skip finished cells)." if data["sessions"] else "."),
        f"- Time in training runs: {sum(r['train_seconds'] for r in runs) / 60:.1f} min; in evaluation: "
        f"{sum(r['eval_seconds'] for r in runs) / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def pilots_table(path: Path) -> str:
    """The pilot runs (same script, all-layer LoRA, one seed) that chose the steps and learning rates."""
    import json

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tasks = {(r["pilot"], r["task_hash"]): r for r in records if r["type"] == "task"}
    lines = [
        "| pilot | task | steps × batch | lr | review tokens | LoRA targets | LoRA dropout | checkpointing "
        "| test reviews | majority | accuracy | train s |",
        "|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["type"] != "run":
            continue
        task = tasks[(r["pilot"], r["task_hash"])]
        s, t = task["settings"], task["settings"]["training"]
        checkpointing = (
            "on (TRL default)"
            if task["kind"] == "sft" and t.get("gradient_checkpointing") is None
            else ("off" if task["kind"] == "sft" else "–")
        )
        lines.append(
            f"| {r['pilot']} | {r['task']} | {t['max_steps']} × {t['per_device_train_batch_size']} | "
            f"{t['learning_rate']:g} | {s['review_tokens']} | {len(s['lora']['target_modules'])} | "
            f"{s['lora'].get('lora_dropout', 0.0):g} | {checkpointing} | "
            f"{task['test_examples']} | {task['majority']:.3f} | {r['accuracy']:.3f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# -- figures --------------------------------------------------------------------------------------------------------

MARKER_STYLE = ["o", "s", "D", "^", "v", "<", ">", "P", "X", "*", "h", "p", "d", "H", "8", "1", "2", "3"]
COLOURS = [
    "#000000",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#7f7f7f",
    "#9467bd",
    "#8c564b",
    "#d62728",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
]


def figure(config: dict[str, Any], data: dict[str, Any], model: str, path: Path) -> Path | None:
    """Accuracy (mean ± std over seeds) against trainable LoRA parameters, one panel per task of ``model``, one
    marker per configuration; configurations with the same parameter count are spread a little sideways."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    tasks = [t for t, s in config["tasks"].items() if s["model"] == model and t in data["tasks"]]
    if not tasks:
        return None
    index = {m["name"]: i for i, m in enumerate(config["methods"])}
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(7.5, 5.2 * len(tasks)), 4.4), squeeze=False)
    handles = {}
    for ax, task in zip(axes[0], tasks):
        rows = task_summary(config, data, task)
        same: dict[float, int] = {}
        for r in rows:
            x = statistics.fmean(r["lora_params"])
            same[x] = same.get(x, 0) + 1
        seen: dict[float, int] = {}
        for r in rows:
            m, s = mean_std(r["accuracy"])
            x = statistics.fmean(r["lora_params"])
            k = seen.get(x, 0)
            seen[x] = k + 1
            shift = 1.03 ** (k - (same[x] - 1) / 2)  # spread equal-x markers on the log axis (±3 % a step)
            i = index[r["method"]]
            h = ax.errorbar(
                x * shift,
                m,
                yerr=0 if math.isnan(s) else s,
                fmt=MARKER_STYLE[i % len(MARKER_STYLE)],
                markersize=6,
                capsize=3,
                label=r["label"],
                color=COLOURS[i % len(COLOURS)],
            )
            handles[r["label"]] = h
        majority = data["tasks"][task]["majority"]
        ax.axhline(majority, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.annotate(
            "majority class",
            (0.01, majority),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
            color="grey",
        )
        kind = config["tasks"][task]["kind"]
        ax.set_title(
            f"{task}: {'sequence classifier' if kind == 'classifier' else 'TRL SFT, exact answer'} "
            f"({data['tasks'][task]['test_examples']} test reviews)",
            fontsize=9,
        )
        ax.set_xlabel("trainable LoRA parameters (log; equal counts spread ±3 %)", fontsize=8)
        short = FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k")
        ax.xaxis.set_major_formatter(short)
        ax.xaxis.set_minor_formatter(short)
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.set_ylabel("test accuracy, mean ± std over seeds")
        ax.grid(alpha=0.3, which="both")
    columns = 4 if len(tasks) == 1 else 6
    fig.legend(
        handles.values(), handles.keys(), loc="lower center", ncol=min(columns, len(handles)), fontsize=8, frameon=False
    )
    rows_of_legend = math.ceil(len(handles) / columns)
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend + 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# -- writing --------------------------------------------------------------------------------------------------------


def blocks(
    config: dict[str, Any], data: dict[str, Any], config_path: str, figures: dict[str, Path], doc: Path
) -> dict[str, str]:
    out = {"environment": environment_block(config, data, config_path), "stability": stability_table(config, data)}
    for task in config["tasks"]:
        out[f"results-{task}"] = results_table(config, data, task)
        out[f"plans-{task}"] = plans_table(config, data, task)
    for model, path in figures.items():
        rel = Path(__import__("os").path.relpath(path, doc.parent)).as_posix()
        out[f"figure-{model}"] = f"![accuracy vs trainable LoRA parameters, {model}]({rel})\n"
    return out


def replace_blocks(text: str, new: dict[str, str]) -> str:
    """Each block of ``new`` between its ``quality:NAME`` markers (every copy of them), or appended with them."""
    for name, body in new.items():
        begin, end = f"<!-- BEGIN quality:{name} -->", f"<!-- END quality:{name} -->"
        text = replace_block(text, begin, end, f"{begin}\n{body}{end}", every=True, gap_if_empty=True)
    return text


def write(config: dict[str, Any], records: list[dict[str, Any]], config_path: str) -> None:
    settings = config.get("report") or {}
    doc = Path(settings.get("doc", "docs/results.md"))
    doc = doc if doc.is_absolute() else ROOT / doc
    fig_dir = Path(settings.get("figures", "docs/figures"))
    fig_dir = fig_dir if fig_dir.is_absolute() else ROOT / fig_dir
    prefix = settings.get("prefix", "quality")
    data = current(config, records)
    figures = {}
    for model in sorted({t["model"] for t in config["tasks"].values()}):
        made = figure(config, data, model, fig_dir / f"{prefix}_{model}.png")
        if made is not None:
            figures[model] = made
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Results\n"
    new = blocks(config, data, config_path, figures, doc)
    if settings.get("pilots"):
        pilots = Path(settings["pilots"])
        pilots = pilots if pilots.is_absolute() else ROOT / pilots
        if pilots.is_file():
            new["pilots"] = pilots_table(pilots)
    text = replace_blocks(text, new)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
    print(f"wrote {doc}" + "".join(f"\nwrote {p} ({p.stat().st_size // 1024} KB)" for p in figures.values()))
