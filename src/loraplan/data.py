"""Turning calibration data of any accepted form into right-padded token batches.

Accepted forms: a list of strings (with a tokenizer); a list of ``{text_field: ...}`` records; conversational
records ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat template; a HF
``datasets.Dataset`` with a text column, an ``input_ids`` column or a ``messages`` column; an iterable of tokenised
batches (mappings with ``input_ids`` and, optionally, ``attention_mask`` and ``labels``). The first
``calibration_samples`` samples are used, in order, as the reference does.
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

__all__ = ["CalibrationBatches", "chat_ids", "prepare_batches", "read_texts"]

#: the key of a conversational record: a list of ``{"role": ..., "content": ...}`` messages (TRL's format)
MESSAGES = "messages"


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


def _no_tokenizer() -> ConfigError:
    return ConfigError(
        "calibration data given as text needs a tokenizer: pass `tokenizer=` to make_plan (or use the CLI, "
        "which loads the model's tokenizer), or pass tokenised batches with `input_ids`."
    )


def _encode(text: Any, index: int, tokenizer: Any, config: PlanConfig, special_tokens: bool = True) -> Sample:
    if tokenizer is None:
        raise _no_tokenizer()
    if not isinstance(text, str):
        raise CalibrationError(
            f"calibration sample {index} is {type(text).__name__}, not text: {str(text)[:80]!r}. "
            f"Every entry of `{config.text_field}` must be a string."
        )
    encoded = tokenizer(text, truncation=True, max_length=config.max_length, add_special_tokens=special_tokens)
    ids = list(encoded["input_ids"])
    if not ids:
        raise CalibrationError(
            f"calibration sample {index} is empty after tokenisation ({text[:80]!r}). Remove empty texts "
            "from the calibration data."
        )
    return Sample(ids)


def _tokenize(texts: list[Any], tokenizer: Any, config: PlanConfig) -> list[Sample]:
    if tokenizer is None:  # also for an empty text column: the data needs a tokenizer before it needs samples
        raise _no_tokenizer()
    return [_encode(text, index, tokenizer, config) for index, text in enumerate(texts)]


def chat_text(
    messages: Any,
    tokenizer: Any,
    *,
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
    where: str = "calibration record",
) -> str:
    """``messages`` (a list of ``{"role": ..., "content": ...}``) rendered with the tokenizer's chat template."""
    if tokenizer is None:
        raise _no_tokenizer()
    if (
        not isinstance(messages, (list, tuple))
        or not messages
        or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages)
    ):
        raise CalibrationError(
            f"{where}: `{MESSAGES}` must be a non-empty list of {{'role': ..., 'content': ...}} mappings, got "
            f"{str(messages)[:80]!r}."
        )
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(
            f"{where} is a conversation (`{MESSAGES}`), but the tokenizer "
            f"({type(tokenizer).__name__}) has no chat template to render it with. Use a tokenizer with a chat "
            "template (set `tokenizer.chat_template`), or give the conversations as texts."
        )
    cleaned = [{k: v for k, v in m.items() if v is not None} for m in messages]  # datasets fills absent keys with None
    text = tokenizer.apply_chat_template(
        cleaned, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )
    if not isinstance(text, str):
        raise CalibrationError(f"{where}: the chat template rendered {type(text).__name__}, not text.")
    return text


def chat_ids(
    messages: Any, tokenizer: Any, *, add_generation_prompt: bool = False, chat_template: str | None = None
) -> list[int]:
    """The token ids of ``messages`` rendered with the chat template, as ``apply_chat_template(tokenize=True)``
    gives them: the template writes the special tokens, so the tokenizer adds none."""
    text = chat_text(messages, tokenizer, add_generation_prompt=add_generation_prompt, chat_template=chat_template)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _records(records: list[Any], tokenizer: Any, config: PlanConfig) -> list[Sample]:
    """Text records (``{text_field: ...}``) and conversational records (``{"messages": [...]}``)."""
    field = config.text_field
    samples = []
    for index, record in enumerate(records):
        if isinstance(record, str):
            samples.append(_encode(record, index, tokenizer, config))
        elif isinstance(record, Mapping) and field in record:
            samples.append(_encode(record[field], index, tokenizer, config))
        elif isinstance(record, Mapping) and MESSAGES in record:
            text = chat_text(record[MESSAGES], tokenizer, where=f"calibration record {index}")
            samples.append(_encode(text, index, tokenizer, config, special_tokens=False))
        else:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ConfigError(
                f"`text_field` is {field!r}, but calibration record {index} has keys {keys}. Set text_field "
                f"to the key that holds the text (or give conversations as `{MESSAGES}` records)."
            )
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
        if MESSAGES in columns:
            return _records([{MESSAGES: m} for m in head[MESSAGES]], tokenizer, config)
        raise ConfigError(
            f"`text_field` is {field!r}, but the dataset has columns {columns}. Set text_field to the column "
            f"that holds the text (or give the dataset an `input_ids` or a `{MESSAGES}` column)."
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
        return _records(list(itertools.islice(rest, limit)), tokenizer, config)
    return _from_batches(rest, config, limit)


def prepare_batches(
    data: Any, config: PlanConfig, tokenizer: Any = None, model_config: Any = None, processor: Any = None
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


#: ``datasets.load_dataset`` builder of each data-file suffix ``read_texts`` reads (``.txt`` it reads itself)
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _bad_json_line(path: Any) -> str | None:
    """Where a JSON-lines file first fails to parse, as ``line N is not valid JSON (why)``."""
    import json

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg})"
    return None


def _load_file(path: Any) -> Any:
    """``path`` as a ``datasets.Dataset`` (``load_dataset`` with the builder its suffix names), or a
    ``ConfigError`` naming the file and what is wrong with it."""
    import datasets

    suffix = path.suffix.lower()
    builder = _BUILDERS[suffix]
    if path.stat().st_size == 0:
        raise ConfigError(f"`--data` {path} holds no samples.")
    if suffix == ".json":
        with path.open(encoding="utf-8") as handle:
            head = handle.read(4096).lstrip()
        if not head.startswith("["):
            raise ConfigError(f"`--data` {path} must hold a JSON list of records or strings.")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(
        datasets.logging.CRITICAL
    )  # its own "Failed to load JSON" lines: the error below says it once
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - whatever the builder raises, the message names the file
        where = _bad_json_line(path) if suffix == ".jsonl" else None
        cause = exc.__cause__ or exc.__context__ or exc
        detail = where or f"it could not be read as {builder} ({type(cause).__name__}: {str(cause)[:200]})"
        raise ConfigError(f"`--data` {path}: {detail}.") from exc
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def read_texts(path: str, text_field: str = "text", limit: int | None = None) -> list[Any]:
    """The calibration samples in a data file: ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` (read with
    ``datasets.load_dataset``: the text under ``text_field``, or, when there is no such column, conversations under
    ``messages``), or ``.txt`` (one sample per non-empty line).

    Returns texts, or ``{"messages": [...]}`` records for conversational files (rendered later with the
    tokenizer's chat template, see :func:`prepare_batches`). A ``.json`` list of plain strings is read as texts.
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`--data` file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    samples: list[Any] = []
    if suffix == ".txt":
        samples = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix in _BUILDERS:
        dataset = _load_file(p)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        columns = list(dataset.column_names)
        conversational = text_field not in columns and MESSAGES in columns
        for index, record in enumerate(dataset):
            value = record.get(text_field)
            if isinstance(value, Mapping):  # a .json list mixing strings and objects: the objects land in `text`
                value = value.get(text_field)
            if conversational and record.get(MESSAGES) is not None:
                samples.append({MESSAGES: record[MESSAGES]})
            elif isinstance(value, str):
                samples.append(value)
            else:
                keys = sorted(k for k, v in record.items() if v is not None)
                raise ConfigError(
                    f"`--text-field` is {text_field!r}, but record {index} of {p} has keys {keys}. "
                    f"Pass --text-field with the key that holds the text (or give conversations under `{MESSAGES}`)."
                )
    else:
        raise ConfigError(f"`--data` must be a .jsonl, .json, .csv, .parquet or .txt file, got {p.name!r}.")
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ConfigError(f"`--data` {p} holds no samples.")
    return samples
