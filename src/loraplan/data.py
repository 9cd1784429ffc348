"""Turning calibration data of any accepted form into right-padded token batches.

Accepted forms: a list of strings (with a tokenizer); a list of ``{text_field: ...}`` records; a HF
``datasets.Dataset`` with a text column (or ``input_ids``); an iterable of tokenised batches (mappings with
``input_ids`` and, optionally, ``attention_mask`` and ``labels``). The first ``calibration_samples`` samples are
used, in order, as the reference does.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import PlanConfig
from .errors import CalibrationError, ConfigError

__all__ = ["CalibrationBatches", "prepare_batches", "read_texts"]


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int] | None = None


@dataclass
class CalibrationBatches:
    """Right-padded CPU batches of the calibration samples, and what identifies them."""

    batches: list[dict[str, torch.Tensor]]
    num_samples: int
    requested: int
    data_hash: str
    pad_token_id: int
    num_tokens: int

    def __len__(self) -> int:
        return len(self.batches)


def _pad_id(tokenizer: Any, model_config: Any, last_token: str) -> int:
    candidates = []
    if last_token == "reference":  # the reference pads with eos and treats every eos as padding
        candidates += [getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)]
    candidates += [
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(model_config, "pad_token_id", None),
        getattr(model_config, "eos_token_id", None),
    ]
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if isinstance(c, int):
            return c
    return 0


def _tokenize(texts: list[str], tokenizer: Any, config: PlanConfig) -> list[Sample]:
    if tokenizer is None:
        raise ConfigError(
            "calibration data given as text needs a tokenizer: pass `tokenizer=` to make_plan (or use the CLI, "
            "which loads the model's tokenizer), or pass tokenised batches with `input_ids`."
        )
    samples = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise CalibrationError(
                f"calibration sample {index} is {type(text).__name__}, not text: {str(text)[:80]!r}. "
                f"Every entry of `{config.text_field}` must be a string."
            )
        encoded = tokenizer(text, truncation=True, max_length=config.max_length)
        ids = list(encoded["input_ids"])
        if not ids:
            raise CalibrationError(
                f"calibration sample {index} is empty after tokenisation ({text[:80]!r}). Remove empty texts "
                "from the calibration data."
            )
        samples.append(Sample(ids))
    return samples


def _from_batches(batches: Iterable[Any], config: PlanConfig, limit: int) -> list[Sample]:
    samples: list[Sample] = []
    for number, batch in enumerate(batches):
        if len(samples) >= limit:
            break
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise CalibrationError(
                f"calibration batch {number} is {type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
                + "; tokenised calibration data must be mappings with `input_ids` (and optionally "
                "`attention_mask`, `labels`). Pass texts with a tokenizer instead if you have raw text."
            )
        ids = torch.as_tensor(batch["input_ids"])
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.numel() == 0 or ids.shape[0] == 0:
            raise CalibrationError(f"calibration batch {number} is empty (input_ids of shape {tuple(ids.shape)}).")
        mask = torch.as_tensor(batch["attention_mask"]) if batch.get("attention_mask") is not None else None
        if mask is None:
            mask = torch.ones_like(ids)
        elif mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise CalibrationError(
                f"calibration batch {number}: attention_mask shape {tuple(mask.shape)} does not match "
                f"input_ids shape {tuple(ids.shape)}."
            )
        if not bool(mask.any()):
            raise CalibrationError(
                f"calibration batch {number} is all padding (its attention_mask is all zeros). Remove empty "
                "samples from the calibration data."
            )
        labels = torch.as_tensor(batch["labels"]) if batch.get("labels") is not None else None
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            if not bool(keep.any()):
                raise CalibrationError(
                    f"calibration batch {number}, row {row} is all padding (attention_mask all zeros). Remove "
                    "empty samples from the calibration data."
                )
            row_ids = ids[row][keep][: config.max_length].tolist()
            row_labels = None
            if labels is not None:
                if labels.dim() == 2 and labels.shape == ids.shape:
                    row_labels = labels[row][keep][: config.max_length].tolist()
                else:  # sequence-level labels (classification)
                    row_labels = [int(labels.reshape(-1)[row])]
            samples.append(Sample(row_ids, row_labels))
            if len(samples) >= limit:
                break
    return samples


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "select") and hasattr(data, "__len__")


def _collect(data: Any, tokenizer: Any, config: PlanConfig) -> list[Sample]:
    limit = config.calibration_samples
    field = config.text_field
    if data is None:
        raise ConfigError("`calibration_data` is None: pass texts, a datasets.Dataset or tokenised batches.")
    if isinstance(data, (str, bytes)):
        raise ConfigError(
            "`calibration_data` is a single string; pass a list of texts (one per sample), e.g. [text1, text2]."
        )
    if _is_dataset(data):
        columns = list(data.column_names)
        head = data.select(range(min(limit, len(data))))
        if field in columns:
            return _tokenize(list(head[field]), tokenizer, config)
        if "input_ids" in columns:
            rows = [
                {k: [row[k]] for k in ("input_ids", "attention_mask", "labels") if k in row and row[k] is not None}
                for row in head
            ]
            return _from_batches(rows, config, limit)
        raise ConfigError(
            f"`text_field` is {field!r}, but the dataset has columns {columns}. Set text_field to the column "
            "that holds the text (or give the dataset an `input_ids` column)."
        )
    if isinstance(data, Mapping):
        return _from_batches([data], config, limit)
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise CalibrationError("`calibration_data` is empty: give at least one sample.")
    rest = itertools.chain([first], iterator)
    if isinstance(first, str):
        return _tokenize(list(itertools.islice(rest, limit)), tokenizer, config)
    if isinstance(first, Mapping) and "input_ids" not in first:
        records = list(itertools.islice(rest, limit))
        texts = []
        for index, record in enumerate(records):
            if not isinstance(record, Mapping) or field not in record:
                keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
                raise ConfigError(
                    f"`text_field` is {field!r}, but calibration record {index} has keys {keys}. Set text_field "
                    "to the key that holds the text."
                )
            texts.append(record[field])
        return _tokenize(texts, tokenizer, config)
    return _from_batches(rest, config, limit)


def prepare_batches(
    data: Any, config: PlanConfig, tokenizer: Any = None, model_config: Any = None
) -> CalibrationBatches:
    """The first ``config.calibration_samples`` samples of ``data``, tokenised and right-padded in batches."""
    samples = _collect(data, tokenizer, config)
    if not samples:
        raise CalibrationError("`calibration_data` is empty: give at least one sample.")
    pad = _pad_id(tokenizer, model_config, config.last_token)
    digest = hashlib.sha256()
    batches = []
    for start in range(0, len(samples), config.batch_size):
        chunk = samples[start : start + config.batch_size]
        width = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        has_labels = [s.labels is not None for s in chunk]
        if any(has_labels) and not all(has_labels):
            raise CalibrationError("some calibration samples have `labels` and others do not; give all or none.")
        token_labels = all(has_labels) and all(len(s.labels) == len(s.input_ids) for s in chunk)  # type: ignore[arg-type]
        labels = None
        if all(has_labels):
            labels = (
                torch.full((len(chunk), width), -100, dtype=torch.long)
                if token_labels
                else torch.tensor([s.labels[0] for s in chunk], dtype=torch.long)  # type: ignore[index]
            )
        for row, sample in enumerate(chunk):
            n = len(sample.input_ids)
            ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
            mask[row, :n] = 1
            if labels is not None and token_labels:
                labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
            digest.update(torch.tensor(sample.input_ids, dtype=torch.int64).numpy().tobytes())
            digest.update(b"|")
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = labels
        batches.append(batch)
    return CalibrationBatches(
        batches=batches,
        num_samples=len(samples),
        requested=config.calibration_samples,
        data_hash="sha256:" + digest.hexdigest()[:16],
        pad_token_id=pad,
        num_tokens=sum(len(s.input_ids) for s in samples),
    )


def read_texts(path: str, text_field: str = "text", limit: int | None = None) -> list[str]:
    """Texts from a ``.jsonl`` (one JSON object per line, text under ``text_field``), ``.json`` (a list of such
    objects or of strings) or ``.txt`` file (one sample per non-empty line)."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`--data` file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    texts: list[str] = []
    if suffix == ".txt":
        texts = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix in (".jsonl", ".json"):
        if suffix == ".jsonl":
            records = []
            for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"`--data` {p}: line {number} is not valid JSON ({exc.msg}).") from exc
                if limit is not None and len(records) >= limit:
                    break
        else:
            records = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise ConfigError(f"`--data` {p} must hold a JSON list of records or strings.")
        for index, record in enumerate(records):
            if isinstance(record, str):
                texts.append(record)
            elif isinstance(record, dict) and isinstance(record.get(text_field), str):
                texts.append(record[text_field])
            else:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(
                    f"`--text-field` is {text_field!r}, but record {index} of {p} has keys {keys}. "
                    "Pass --text-field with the key that holds the text."
                )
    else:
        raise ConfigError(f"`--data` must be a .jsonl, .json or .txt file, got {p.name!r}.")
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ConfigError(f"`--data` {p} holds no samples.")
    return texts
