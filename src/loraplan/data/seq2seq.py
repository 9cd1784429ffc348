"""Calibration data of an encoder-decoder model (T5, BART, Whisper): each sample has an encoder side (tokens, or a
speech model's ``input_features``) and a decoder side (``labels``), and a batch carries what one forward pass of the
whole model reads: ``input_ids`` and ``attention_mask`` (or ``input_features``), ``labels`` (right-padded with
-100), and the decoder's own inputs, ``decoder_input_ids`` (the labels shifted right behind the model's
``decoder_start_token_id``, as the model shifts them for its loss) and ``decoder_attention_mask``.

Accepted forms: texts with a tokenizer (the decoder reads the text too); records or a ``datasets.Dataset`` with the
text under ``text_field`` and, optionally, the decoder's text under ``target_field``; tokenised batches with
``input_ids`` (and ``attention_mask``) or ``input_features``, and ``labels``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import PlanConfig
from ..errors import CalibrationError, ConfigError
from .samples import CalibrationBatches, _eos_id, _pad_id
from .text import _no_tokenizer

__all__ = ["is_encoder_decoder", "prepare_seq2seq_batches"]


def is_encoder_decoder(model_config: Any) -> bool:
    """Whether a transformers config describes an encoder-decoder model."""
    return bool(getattr(model_config, "is_encoder_decoder", False))


@dataclass
class _Pair:
    labels: list[int]
    input_ids: list[int] | None = None
    features: torch.Tensor | None = None


def _tokens(text: Any, tokenizer: Any, config: PlanConfig, where: str) -> list[int]:
    if tokenizer is None:
        raise _no_tokenizer()
    if not isinstance(text, str):
        raise CalibrationError(f"{where} is {type(text).__name__}, not text: {str(text)[:80]!r}.")
    ids = list(tokenizer(text, truncation=True, max_length=config.max_length)["input_ids"])
    if not ids:
        raise CalibrationError(f"{where} is empty after tokenisation ({text[:80]!r}). Remove empty texts.")
    return ids


def _from_text(records: Iterable[Any], tokenizer: Any, config: PlanConfig) -> list[_Pair]:
    pairs = []
    for index, record in enumerate(records):
        source: Any
        target: Any
        if isinstance(record, str):
            source, target = record, record
        elif isinstance(record, Mapping) and config.text_field in record:
            source = record[config.text_field]
            target = record.get(config.target_field) if record.get(config.target_field) is not None else source
        else:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ConfigError(
                f"`text_field` is {config.text_field!r}, but calibration record {index} has keys {keys}. Set "
                "text_field to the key of the encoder's text (and target_field to the decoder's, if any)."
            )
        source_ids = _tokens(source, tokenizer, config, f"calibration sample {index}")
        pairs.append(_Pair(_tokens(target, tokenizer, config, f"the target of calibration sample {index}"), source_ids))
    return pairs


def _rows(batch: Mapping, number: int, config: PlanConfig, room: int) -> list[_Pair]:
    """The samples of one tokenised encoder-decoder batch, without their padding."""
    where = f"calibration batch {number}"
    if batch.get("labels") is None:
        raise CalibrationError(
            f"{where} has no `labels`: an encoder-decoder model is calibrated on what its decoder reads. Give each "
            "batch `labels` (the target tokens, -100 where padded) beside `input_ids` or `input_features`."
        )
    labels = torch.as_tensor(batch["labels"])
    labels = labels.unsqueeze(0) if labels.dim() == 1 else labels
    features = batch.get("input_features")
    if features is None and batch.get("input_ids") is None:
        raise CalibrationError(f"{where} has neither `input_ids` nor `input_features` for the encoder.")
    ids = torch.as_tensor(batch["input_ids"]) if features is None else None
    if ids is not None and ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.as_tensor(mask) if mask is not None and ids is not None else None
    if mask is not None and mask.dim() == 1:
        mask = mask.unsqueeze(0)
    pairs = []
    for row in range(labels.shape[0]):
        real = [int(t) for t in labels[row] if int(t) != -100][: config.max_length]
        if not real:
            raise CalibrationError(f"{where}, row {row} has no label token (all -100). Remove empty samples.")
        if ids is not None:
            keep = mask[row].bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
            pairs.append(_Pair(real, ids[row][keep][: config.max_length].tolist()))
        else:
            value = torch.as_tensor(features)
            pairs.append(_Pair(real, features=value[row] if value.dim() == 3 else value))
        if len(pairs) >= room:
            break
    return pairs


def _collect(data: Any, config: PlanConfig, tokenizer: Any) -> list[_Pair]:
    limit = config.calibration_samples
    if data is None or isinstance(data, (str, bytes)):
        raise ConfigError(
            "`calibration_data` for an encoder-decoder model must be texts, records, a datasets.Dataset or tokenised "
            f"batches with `labels`, got {type(data).__name__}."
        )
    if hasattr(data, "column_names") and hasattr(data, "select"):
        head = data.select(range(min(limit, len(data))))
        if "labels" in data.column_names:
            return [pair for number, row in enumerate(head) for pair in _rows(row, number, config, 1)]
        return _from_text(list(head), tokenizer, config)
    if isinstance(data, Mapping):
        data = [data]
    first, rest = None, iter(data)
    first = next(rest, None)
    if first is None:
        raise CalibrationError("`calibration_data` is empty: give at least one sample.")
    rows = itertools.chain([first], rest)
    if isinstance(first, Mapping) and any(key in first for key in ("input_ids", "input_features", "labels")):
        pairs: list[_Pair] = []
        for number, batch in enumerate(rows):
            if len(pairs) >= limit:
                break
            pairs += _rows(batch, number, config, limit - len(pairs))
        return pairs
    return _from_text(itertools.islice(rows, limit), tokenizer, config)


def _start_token(model_config: Any) -> int:
    start = getattr(model_config, "decoder_start_token_id", None)
    if isinstance(start, int):
        return start
    raise ConfigError(
        f"{type(model_config).__name__} names no `decoder_start_token_id`, which the decoder's inputs begin with. "
        "Set model.config.decoder_start_token_id."
    )


def prepare_seq2seq_batches(
    data: Any, config: PlanConfig, tokenizer: Any = None, model_config: Any = None
) -> CalibrationBatches:
    """The first ``config.calibration_samples`` samples of ``data`` as encoder-decoder batches (see the module
    docstring), right-padded, in order."""
    pairs = _collect(data, config, tokenizer)[: config.calibration_samples]
    pad = _pad_id(tokenizer, model_config, "mask")
    start = _start_token(model_config)
    digest = hashlib.sha256()
    batches = []
    for first in range(0, len(pairs), config.batch_size):
        chunk = pairs[first : first + config.batch_size]
        width = max(len(p.labels) for p in chunk)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        decoder_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        decoder_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, pair in enumerate(chunk):
            n = len(pair.labels)
            labels[row, :n] = torch.tensor(pair.labels)
            decoder_ids[row, :n] = torch.tensor([start, *pair.labels[:-1]])
            decoder_mask[row, :n] = 1
            digest.update(torch.tensor(pair.labels, dtype=torch.int64).numpy().tobytes() + b"|")
        batch = {"labels": labels, "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask}
        if chunk[0].features is not None:
            shapes = {tuple(p.features.shape) for p in chunk if p.features is not None}
            if len(shapes) != 1 or any(p.features is None for p in chunk):
                raise CalibrationError(
                    f"calibration batch {first // config.batch_size}: `input_features` of shapes {sorted(shapes)}; a "
                    "batch needs one shape (the feature extractor pads every clip to the same length)."
                )
            batch["input_features"] = torch.stack([p.features for p in chunk if p.features is not None])
            for pair in chunk:
                digest.update(pair.features.detach().float().contiguous().numpy().tobytes())  # type: ignore[union-attr]
        else:
            source = max(len(p.input_ids or []) for p in chunk)
            ids = torch.full((len(chunk), source), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), source), dtype=torch.long)
            for row, pair in enumerate(chunk):
                n = len(pair.input_ids or [])
                ids[row, :n] = torch.tensor(pair.input_ids or [])
                mask[row, :n] = 1
                digest.update(torch.tensor(pair.input_ids or [], dtype=torch.int64).numpy().tobytes())
            batch.update(input_ids=ids, attention_mask=mask)
        batches.append(batch)
    return CalibrationBatches(
        batches=batches,
        num_samples=len(pairs),
        requested=config.calibration_samples,
        data_hash="sha256:" + digest.hexdigest()[:16],
        pad_token_id=pad,
        num_tokens=sum(len(p.labels) + len(p.input_ids or []) for p in pairs),
        eos_token_id=_eos_id(tokenizer, model_config),
    )
