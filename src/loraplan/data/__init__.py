"""Turning calibration data of any accepted form into right-padded token batches.

Accepted forms: a list of strings (with a tokenizer); a list of ``{text_field: ...}`` records; conversational
records ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat template; a HF
``datasets.Dataset`` with a text column, an ``input_ids`` column or a ``messages`` column; an iterable of tokenised
batches (mappings with ``input_ids`` and, optionally, ``attention_mask`` and ``labels``). The first
``calibration_samples`` samples are used, in order, as the reference does.

Multimodal (LLaVA-style) data: rows with an image (``image_field``) and a text (``text_field``), as a ``Dataset`` or
records, turned into tokens and ``pixel_values`` by a ``processor``; or tokenised batches that carry
``pixel_values``. A batch with ``pixel_values`` keeps every other tensor it has (``image_sizes``, ...) beside its
tokens, and the calibration passes give them all to the model.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from typing import Any

import torch

from ..config import PlanConfig
from ..errors import CalibrationError, ConfigError
from .batches import _batch_extras, _from_batches, _hash_tensor
from .files import read_texts
from .images import _image_rows, _multimodal, _no_images, _no_processor, image_token_id
from .samples import MESSAGES, PIXELS, TOKEN_KEYS, CalibrationBatches, Sample, _eos_id, _pad_id
from .seq2seq import is_encoder_decoder, prepare_seq2seq_batches
from .text import _records, _tokenize, chat_ids
from .text import chat_text as chat_text

__all__ = [
    "CalibrationBatches",
    "MESSAGES",
    "PIXELS",
    "TOKEN_KEYS",
    "chat_ids",
    "image_token_id",
    "is_encoder_decoder",
    "prepare_batches",
    "read_texts",
]


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "select") and hasattr(data, "__len__")


def _collect(
    data: Any, tokenizer: Any, config: PlanConfig, processor: Any = None, token_id: int | None = None
) -> list[Sample]:
    limit = config.calibration_samples
    field = config.text_field
    image = config.image_field
    if data is None:
        raise ConfigError("`calibration_data` is None: pass texts, a datasets.Dataset or tokenised batches.")
    if isinstance(data, (str, bytes)):
        raise ConfigError(
            "`calibration_data` is a single string; pass a list of texts (one per sample), e.g. [text1, text2]."
        )
    if _is_dataset(data):
        columns = list(data.column_names)
        head = data.select(range(min(limit, len(data))))
        if image in columns and "input_ids" not in columns:
            if processor is None:
                raise _no_processor(config, "the dataset's rows")
            if field not in columns:
                raise ConfigError(
                    f"`text_field` is {field!r}, but the dataset has columns {columns}. Set text_field to the column "
                    f"that holds the text beside the images in `{image}`."
                )
            return _multimodal(list(zip(head[field], head[image], strict=True)), processor, config, token_id)
        if processor is not None and "input_ids" not in columns:
            raise _no_images(config, f"the dataset has columns {columns}")
        if field in columns:
            return _tokenize(list(head[field]), tokenizer, config)
        if "input_ids" in columns:
            multimodal = PIXELS in columns
            rows = [
                {
                    k: [v]
                    for k, v in row.items()
                    if v is not None
                    and (
                        k in ("input_ids", "attention_mask", "labels")
                        or (multimodal and k not in (field, image, MESSAGES))
                    )
                }
                for row in head
            ]
            return _from_batches(rows, config, limit, token_id)
        if MESSAGES in columns:
            return _records([{MESSAGES: m} for m in head[MESSAGES]], tokenizer, config)
        raise ConfigError(
            f"`text_field` is {field!r}, but the dataset has columns {columns}. Set text_field to the column "
            f"that holds the text (or give the dataset an `input_ids` or a `{MESSAGES}` column)."
        )
    if isinstance(data, Mapping):
        return _from_batches([data], config, limit, token_id)
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise CalibrationError("`calibration_data` is empty: give at least one sample.")
    rest = itertools.chain([first], iterator)
    if isinstance(first, str):
        if processor is not None:
            raise _no_images(config, "the calibration data are plain texts")
        return _tokenize(list(itertools.islice(rest, limit)), tokenizer, config)
    if isinstance(first, Mapping) and "input_ids" not in first:
        records = list(itertools.islice(rest, limit))
        if processor is None:
            if any(isinstance(r, Mapping) and r.get(image) is not None for r in records):
                raise _no_processor(config, "the calibration records")
            return _records(records, tokenizer, config)
        if not any(isinstance(r, Mapping) and image in r for r in records):
            keys = sorted(first)
            raise _no_images(config, f"the calibration records have keys {keys}")
        return _multimodal(_image_rows(records, config), processor, config, token_id)
    return _from_batches(rest, config, limit, token_id)


def prepare_batches(
    data: Any,
    config: PlanConfig,
    tokenizer: Any = None,
    model_config: Any = None,
    processor: Any = None,
    by_length: bool = False,
) -> CalibrationBatches:
    """The first ``config.calibration_samples`` samples of ``data``, tokenised and right-padded in batches.

    ``by_length``: the samples (still the first N, in order for the data hash) are batched shortest first, so that a
    batch pads little; ``order`` then says which sample each row is, and the calibration pass puts its per-sample
    statistics back in sample order.

    With ``processor`` (a transformers ``ProcessorMixin``, e.g. ``LlavaProcessor``), rows with an image
    (``config.image_field``; ``None`` for a text-only row) and a text (``config.text_field``) become tokens and
    ``pixel_values``; a batch with ``pixel_values`` keeps its other tensors (``image_sizes``, ...) beside its tokens.
    """
    if is_encoder_decoder(model_config):
        if processor is not None:
            raise ConfigError(
                "`processor`: an encoder-decoder model is calibrated from texts or tokenised batches (for Whisper: "
                "`input_features` from its feature extractor, with `labels`), not through a processor."
            )
        return prepare_seq2seq_batches(data, config, tokenizer, model_config)
    token_id = image_token_id(processor, model_config)
    samples = _collect(data, tokenizer, config, processor, token_id)
    if not samples:
        raise CalibrationError("`calibration_data` is empty: give at least one sample.")
    if tokenizer is None and processor is not None:
        tokenizer = getattr(processor, "tokenizer", None)
    pad = _pad_id(tokenizer, model_config, config.last_token)
    digest = hashlib.sha256()
    for sample in samples:  # in sample order, however they are batched
        digest.update(torch.tensor(sample.input_ids, dtype=torch.int64).numpy().tobytes())
        for key, value in sorted(sample.per_token.items()) + sorted(sample.per_image.items()):
            _hash_tensor(digest, key, value)
        digest.update(b"|")
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids)) if by_length else None
    ordered = [samples[i] for i in order] if order is not None else samples
    batches = []
    for start in range(0, len(ordered), config.batch_size):
        chunk = ordered[start : start + config.batch_size]
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
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = labels
        batch.update(_batch_extras(chunk, width, start // config.batch_size, token_id))
        batches.append(batch)
    return CalibrationBatches(
        batches=batches,
        num_samples=len(samples),
        requested=config.calibration_samples,
        data_hash="sha256:" + digest.hexdigest()[:16],
        pad_token_id=pad,
        num_tokens=sum(len(s.input_ids) for s in samples),
        eos_token_id=_eos_id(tokenizer, model_config),
        order=order if order != list(range(len(samples))) else None,
    )
