"""Text into samples: tokenising texts and ``{text_field: ...}`` records, and rendering conversational records
(``{"messages": [...]}``) with the tokenizer's chat template (:func:`chat_text`; :func:`chat_ids`, which the trainer
integrations use too), with the errors for text without a tokenizer, non-text entries and empty samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import PlanConfig
from ..errors import CalibrationError, ConfigError
from .samples import MESSAGES, Sample


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
