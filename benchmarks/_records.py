"""The quality benchmark's records: the hashes that tie a JSON-lines record to the config it came from, and the
append-only results file that makes a run resumable. Shared by ``quality.py`` (which writes the records) and
``quality_report.py`` (which reads those of the current config)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("quality")


# -- record hashes --------------------------------------------------------------------------------------------------


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_hash(config: dict[str, Any]) -> str:
    """The config without its `report` section (where the tables go does not change the numbers)."""
    return digest({k: v for k, v in config.items() if k != "report"})


def task_hash(config: dict[str, Any], task_name: str) -> str:
    """Changes whenever anything that decides a task's numbers changes (not which methods the task runs)."""
    task = {k: v for k, v in config["tasks"][task_name].items() if k != "methods"}
    return digest({"task": task, "data": config.get("data"), "calibration": config.get("calibration")})


# -- results file ---------------------------------------------------------------------------------------------------


class Results:
    """Append-only JSON lines; each line is flushed and synced when written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: ignore it, the cell reruns
                    logger.warning("%s:%d is not JSON (cut by a crash?); ignored", self.path, number)

    def find(self, **key: Any) -> dict[str, Any] | None:
        found = None
        for record in self.records:
            if all(record.get(k) == v for k, v in key.items()):
                found = record  # the last one wins
        return found

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)
        return record
