"""The quality benchmark's config: the YAML with its dotted overrides, checked section by section, and the
PlanConfig settings each method gets on each task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplan.overrides import load_yaml

TASK_KINDS = ("classifier", "sft")
MODELS = ("minilm", "smollm2")
TOP_KEYS = {"output", "seeds", "data", "calibration", "methods", "tasks", "stability", "report"}
TASK_KEYS = {
    "model",
    "kind",
    "share_threshold",
    "lora",
    "training",
    "review_tokens",
    "train_examples",
    "test_examples",
    "eval_batch_size",
    "prompt",
    "methods",
}
METHOD_KEYS = {"name", "label", "plan", "plan_seed_from_run"}


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML at ``path`` with dotted ``key=value`` overrides applied, validated."""
    return validate_config(load_yaml(path, overrides))


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check every section; loraplan, PEFT and the trainers validate their own settings."""
    from peft import LoraConfig

    from loraplan import PlanConfig

    unknown = sorted(set(config) - TOP_KEYS)
    if unknown:
        raise SystemExit(f"unknown top-level key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    for key in ("output", "seeds", "methods", "tasks"):
        if key not in config:
            raise SystemExit(f"`{key}` is required in the benchmark config")
    seeds = config["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SystemExit(f"`seeds` must be a non-empty list of non-negative integers, got {seeds!r}")
    names = set()
    for method in config["methods"]:
        bad = sorted(set(method) - METHOD_KEYS)
        if bad:
            raise SystemExit(f"method {method.get('name')!r}: unknown key(s) {bad}; known: {sorted(METHOD_KEYS)}")
        if not method.get("name") or method["name"] in names:
            raise SystemExit(f"every method needs a unique `name`, got {method.get('name')!r}")
        names.add(method["name"])
        PlanConfig.from_dict(dict(method.get("plan") or {}))
    for name, task in config["tasks"].items():
        bad = sorted(set(task) - TASK_KEYS)
        if bad:
            raise SystemExit(f"task {name!r}: unknown key(s) {bad}; known: {sorted(TASK_KEYS)}")
        if task.get("model") not in MODELS:
            raise SystemExit(f"task {name!r}: `model` must be one of {MODELS}, got {task.get('model')!r}")
        if task.get("kind") not in TASK_KINDS:
            raise SystemExit(f"task {name!r}: `kind` must be one of {TASK_KINDS}, got {task.get('kind')!r}")
        LoraConfig(**(task.get("lora") or {}))
        bad = sorted(set(task.get("methods") or []) - names)
        if bad:
            raise SystemExit(f"task {name!r}: `methods` names unknown method(s) {bad}; known: {sorted(names)}")
        for method in config["methods"]:
            PlanConfig.from_dict(plan_settings(config, name, method, seed=0))
    return config


def plan_settings(config: dict[str, Any], task_name: str, method: dict[str, Any], seed: int) -> dict[str, Any]:
    """The PlanConfig of ``method`` on ``task_name``: calibration defaults, the task's share threshold, the method."""
    task = config["tasks"][task_name]
    settings = dict(config.get("calibration") or {})
    settings.setdefault("max_length", int(task["review_tokens"]) + 32)
    plan = dict(method.get("plan") or {})
    if plan.get("share") == "angular" and "share_threshold" not in plan:
        if task.get("share_threshold") is None:
            raise SystemExit(
                f"task {task_name!r}: method {method['name']!r} shares (angular) but the task sets no `share_threshold`"
            )
        plan["share_threshold"] = float(task["share_threshold"])
    if task["kind"] == "sft":
        plan.setdefault("last_token", "reference")  # TRL ends every row with EOS (docs/integrations/trl.md)
    if method.get("plan_seed_from_run"):
        plan["seed"] = seed
    settings.update(plan)
    return settings
