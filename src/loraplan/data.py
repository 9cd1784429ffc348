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
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import PlanConfig
from .errors import CalibrationError, ConfigError

__all__ = ["CalibrationBatches", "chat_ids", "image_token_id", "prepare_batches", "read_texts"]

logger = logging.getLogger("loraplan")

#: the key of a conversational record: a list of ``{"role": ..., "content": ...}`` messages (TRL's format)
MESSAGES = "messages"
#: the keys of a batch that are its tokens; every other tensor of a multimodal batch travels beside them
TOKEN_KEYS = ("input_ids", "attention_mask", "labels")
#: a batch with this key is multimodal: all its other tensors go to the model with it
PIXELS = "pixel_values"
#: keys that are never aligned with the tokens, whatever their shape (one entry per image)
_IMAGE_KEY_PREFIXES = ("pixel_values", "image_")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int] | None = None
    #: a multimodal row's other inputs aligned with its tokens (e.g. ``token_type_ids``), shape ``(tokens, ...)``
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    #: its inputs per image (``pixel_values``, ``image_sizes``): leading dimension its images; a batch concatenates them
    per_image: dict[str, torch.Tensor] = field(default_factory=dict)


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


def image_token_id(processor: Any = None, model_config: Any = None) -> int | None:
    """The id of the placeholder token that marks where an image goes (the processor's, else the model config's
    ``image_token_id`` / ``image_token_index``), or ``None`` when neither names one."""
    for source, names in ((processor, ("image_token_id",)), (model_config, ("image_token_id", "image_token_index"))):
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _extras(batch: Mapping, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a multimodal batch (one with ``pixel_values``) but its tokens; none of a text batch's."""
    if batch.get(PIXELS) is None:
        return {}
    extras = {}
    for key, value in batch.items():
        if key in TOKEN_KEYS or value is None:
            continue
        try:
            extras[key] = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CalibrationError(
                f"{where}: `{key}` is {type(value).__name__} ({str(value)[:60]!r}), not a tensor; a batch with "
                f"`{PIXELS}` gives every other key to the model as a tensor. Remove `{key}` from the batch, or "
                "give it as numbers."
            ) from exc
    return extras


def _image_owners(
    key: str, value: torch.Tensor, ids: torch.Tensor, token_id: int | None, where: str
) -> list[int] | range:
    """The row each entry of a per-image tensor belongs to: one entry per row that holds the image token, or one
    per row."""
    rows = ids.shape[0]
    count = int(value.shape[0]) if value.dim() > 0 else 0
    holders = [r for r in range(rows) if token_id is not None and bool((ids[r] == token_id).any())]
    if token_id is not None and value.dim() > 0 and count == len(holders):
        return holders
    if value.dim() > 0 and count == rows:
        return range(rows)
    raise CalibrationError(
        f"{where}: `{key}` has shape {tuple(value.shape)} for {rows} rows"
        + (f" ({len(holders)} of them with the image token {token_id})" if token_id is not None else "")
        + "; loraplan splits tokenised batches into rows, so it needs one image per row (or per row that holds "
        "image tokens) along the first dimension. Give one image per row, or give the images and texts as rows "
        "(a Dataset or records) with processor=."
    )


def _split_batch(batch: Any, where: str, config: PlanConfig, room: int, token_id: int | None) -> list[Sample]:
    """The rows of one tokenised batch (at most ``room``), without their padding; a multimodal batch's other tensors
    go with their rows."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise CalibrationError(
            f"{where} is {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            + "; tokenised calibration data must be mappings with `input_ids` (and optionally "
            "`attention_mask`, `labels`). Pass texts with a tokenizer instead if you have raw text."
        )
    ids = torch.as_tensor(batch["input_ids"])
    unbatched = ids.dim() == 1
    if unbatched:
        ids = ids.unsqueeze(0)
    if ids.numel() == 0 or ids.shape[0] == 0:
        raise CalibrationError(f"{where} is empty (input_ids of shape {tuple(ids.shape)}).")
    mask = torch.as_tensor(batch["attention_mask"]) if batch.get("attention_mask") is not None else None
    if mask is None:
        mask = torch.ones_like(ids)
    elif mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise CalibrationError(
            f"{where}: attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape)}."
        )
    if not bool(mask.any()):
        raise CalibrationError(
            f"{where} is all padding (its attention_mask is all zeros). Remove empty samples from the calibration data."
        )
    labels = torch.as_tensor(batch["labels"]) if batch.get("labels") is not None else None
    extras = _extras(batch, where)
    if unbatched:  # one row without its batch dimension: so are its other tensors
        extras = {k: v.unsqueeze(0) for k, v in extras.items()}
    per_token = {
        k: v
        for k, v in extras.items()
        if not k.startswith(_IMAGE_KEY_PREFIXES) and v.dim() >= 2 and tuple(v.shape[:2]) == tuple(ids.shape)
    }
    per_image: list[dict[str, torch.Tensor]] = [{} for _ in range(ids.shape[0])]
    for key, value in extras.items():
        if key in per_token:
            continue
        if ids.shape[0] == 1:  # a lone row owns all of it (a processor's output for one row: all its images)
            per_image[0][key] = value
            continue
        for entry, owner in enumerate(_image_owners(key, value, ids, token_id, where)):
            per_image[owner][key] = value[entry : entry + 1]
    samples: list[Sample] = []
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        if not bool(keep.any()):
            raise CalibrationError(
                f"{where}, row {row} is all padding (attention_mask all zeros). Remove empty samples from the "
                "calibration data."
            )
        row_ids = ids[row][keep]
        _check_length(
            row_ids, bool(per_image[row]), config, token_id, where if ids.shape[0] == 1 else f"{where}, row {row}"
        )
        row_labels = None
        if labels is not None:
            if labels.dim() == 2 and labels.shape == ids.shape:
                row_labels = labels[row][keep][: config.max_length].tolist()
            else:  # sequence-level labels (classification)
                row_labels = [int(labels.reshape(-1)[row])]
        samples.append(
            Sample(
                row_ids[: config.max_length].tolist(),
                row_labels,
                {k: v[row][keep][: config.max_length] for k, v in per_token.items()},
                per_image[row],
            )
        )
        if len(samples) >= room:
            break
    return samples


def _check_length(ids: torch.Tensor, has_images: bool, config: PlanConfig, token_id: int | None, where: str) -> None:
    """Refuses to cut a row with images at ``max_length`` where the cut would take image tokens with it (the model
    then finds fewer image tokens than image features)."""
    limit = config.max_length
    if not has_images or ids.numel() <= limit:
        return
    if token_id is not None and not bool((ids[limit:] == token_id).any()):
        return  # only text after the image is cut
    raise CalibrationError(
        f"`max_length`: {where} has an image and is {ids.numel()} tokens long with its image tokens; max_length="
        f"{limit} would cut "
        + (
            "some of its image tokens"
            if token_id is not None
            else "it (and, with no known image token, maybe its image)"
        )
        + f" off, which the model refuses. Raise max_length to at least {ids.numel()}, or shorten the text."
    )


def _from_batches(batches: Iterable[Any], config: PlanConfig, limit: int, token_id: int | None = None) -> list[Sample]:
    samples: list[Sample] = []
    for number, batch in enumerate(batches):
        if len(samples) >= limit:
            break
        samples.extend(_split_batch(batch, f"calibration batch {number}", config, limit - len(samples), token_id))
    return samples


def _no_processor(config: PlanConfig, rows: str) -> ConfigError:
    return ConfigError(
        f"`processor`: {rows} have images in `{config.image_field}` but no processor was given; pass "
        "processor=AutoProcessor.from_pretrained(<the model's name or path>) to make_plan, which turns each image "
        f"and its text into `{PIXELS}` and tokens (or drop `{config.image_field}` for text-only calibration)."
    )


def _no_images(config: PlanConfig, rows: str) -> ConfigError:
    return ConfigError(
        f"`image_field` is {config.image_field!r}, but {rows}: a processor was given, and the rows have no image "
        "column. Set image_field to the column that holds the images, or leave out processor= (and pass "
        "tokenizer=processor.tokenizer) for text-only calibration."
    )


def _images_of(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def _multimodal(rows: list[tuple[Any, Any]], processor: Any, config: PlanConfig, token_id: int | None) -> list[Sample]:
    """``(text, image)`` rows through the processor one by one: its tokens (each image's placeholder expanded to
    the image's tokens) and its other outputs (``pixel_values``, ...)."""
    token = getattr(processor, "image_token", None)
    samples: list[Sample] = []
    images_seen = 0
    for index, (text, image) in enumerate(rows):
        where = f"calibration row {index}"
        if not isinstance(text, str):
            raise CalibrationError(
                f"{where}: `{config.text_field}` is {type(text).__name__}, not text: {str(text)[:80]!r}. Every "
                f"row needs its text under `{config.text_field}` (its image under `{config.image_field}`)."
            )
        images = _images_of(image)
        if isinstance(token, str) and token and text.count(token) != len(images):
            raise CalibrationError(
                f"{where} has {len(images)} image(s) in `{config.image_field}` but {text.count(token)} {token!r} "
                f"placeholder(s) in its text ({text[:60]!r}); the processor puts each image where its {token!r} "
                f"is. Write one {token!r} per image into the text (e.g. {token!r} + '\\n' + text), or render the rows "
                "with processor.apply_chat_template."
            )
        try:
            out = processor(images=images or None, text=text, return_tensors="pt")
        except Exception as exc:  # noqa: BLE001 - whatever the processor raises, the message names the row
            raise CalibrationError(
                f"{where}: the processor ({type(processor).__name__}) failed on it: {type(exc).__name__}: "
                f"{str(exc)[:300]}"
                + (" (the row has no image: this processor may need one in every row)" if not images else "")
            ) from exc
        if images and out.get(PIXELS) is None:
            raise CalibrationError(
                f"{where}: the processor ({type(processor).__name__}) gave no `{PIXELS}` for its image; give a "
                "processor that reads images (AutoProcessor.from_pretrained of the model)."
            )
        images_seen += len(images)
        samples.extend(_split_batch(dict(out), where, config, 1, token_id))
    logger.info(
        "loraplan: %d calibration rows (%d images) through %s", len(samples), images_seen, type(processor).__name__
    )
    return samples


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


def _image_rows(records: list[Any], config: PlanConfig) -> list[tuple[Any, Any]]:
    rows = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping) or config.text_field not in record:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ConfigError(
                f"`text_field` is {config.text_field!r}, but calibration record {index} has keys {keys}. A record "
                f"with an image needs its text under text_field and its image under image_field "
                f"({config.image_field!r}; None for a text-only row)."
            )
        rows.append((record[config.text_field], record.get(config.image_field)))
    return rows


def prepare_batches(
    data: Any, config: PlanConfig, tokenizer: Any = None, model_config: Any = None, processor: Any = None
) -> CalibrationBatches:
    """The first ``config.calibration_samples`` samples of ``data``, tokenised and right-padded in batches.

    With ``processor`` (a transformers ``ProcessorMixin``, e.g. ``LlavaProcessor``), rows with an image
    (``config.image_field``; ``None`` for a text-only row) and a text (``config.text_field``) become tokens and
    ``pixel_values``; a batch with ``pixel_values`` keeps its other tensors (``image_sizes``, ...) beside its tokens.
    """
    token_id = image_token_id(processor, model_config)
    samples = _collect(data, tokenizer, config, processor, token_id)
    if not samples:
        raise CalibrationError("`calibration_data` is empty: give at least one sample.")
    if tokenizer is None and processor is not None:
        tokenizer = getattr(processor, "tokenizer", None)
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
            for key, value in sorted(sample.per_token.items()) + sorted(sample.per_image.items()):
                _hash_tensor(digest, key, value)
            digest.update(b"|")
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
    )


def _hash_tensor(digest: Any, key: str, value: torch.Tensor) -> None:
    """``key``, dtype, shape and bytes of one of a row's other inputs (its pixel values, ...) into the data hash."""
    digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}:".encode())
    digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _batch_extras(chunk: list[Sample], width: int, number: int, token_id: int | None) -> dict[str, torch.Tensor]:
    """A batch's other inputs: the per-token ones right-padded with zeros like its tokens (zeros for a row without
    them), the per-image ones of its rows concatenated in row order."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted({k for s in chunk for k in s.per_token}):
        values = [s.per_token.get(key) for s in chunk]
        first = next(v for v in values if v is not None)
        padded = torch.zeros((len(chunk), width, *first.shape[1:]), dtype=first.dtype)
        for row, value in enumerate(values):
            if value is not None:
                if value.shape[1:] != first.shape[1:]:
                    raise CalibrationError(
                        f"calibration batch {number}: `{key}` has shape {tuple(value.shape)} in one row and "
                        f"{tuple(first.shape)} in another; its rows must agree beyond their length."
                    )
                padded[row, : value.shape[0]] = value
        out[key] = padded
    for key in sorted({k for s in chunk for k in s.per_image}):
        owners = [row for row, s in enumerate(chunk) if key in s.per_image]
        if len(owners) < len(chunk) and token_id is None:
            without = [row for row in range(len(chunk)) if row not in owners]
            raise CalibrationError(
                f"`batch_size`: calibration batch {number} mixes rows with `{key}` (rows {owners}) and rows without "
                f"(rows {without}), and neither the processor nor the model config names an image token "
                "(`image_token_id`) that places each image at its row. Set batch_size=1, give every row an image, "
                "or calibrate on the rows with images and the text-only rows separately."
            )
        parts = [chunk[row].per_image[key] for row in owners]
        try:
            out[key] = torch.cat(parts)
        except RuntimeError as exc:
            shapes = sorted({tuple(p.shape) for p in parts})
            raise CalibrationError(
                f"calibration batch {number}: the rows' `{key}` have shapes {shapes}, which cannot be batched. "
                "Give images of one size (the processor's image processor resizes them), or set batch_size=1."
            ) from exc
    return out


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
