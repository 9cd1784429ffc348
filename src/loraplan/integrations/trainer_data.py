"""A trainer's training dataset as calibration data: what the trainer trains on, by the trainer.

- SFTTrainer (and a plain Trainer on tokenised data): the token columns of its formatted rows (conversations are
  already through the chat template there).
- DPOTrainer: prompt + chosen, concatenated (the rejected completion is not used).
- GRPOTrainer: the prompts, tokenised as GRPO tokenises them for generation (it does not tokenise its dataset).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..data import MESSAGES, chat_ids
from ..errors import ConfigError

__all__ = ["is_text", "training_rows"]


#: the token columns of TRL's processed preference data (DPOTrainer), newest names first
_PREFERENCE_COLUMNS = (("prompt_ids", "chosen_ids"), ("prompt_input_ids", "chosen_input_ids"))


def _preference_rows(dataset: Any, prompt: str, chosen: str) -> Iterator[dict[str, list[int]]]:
    """Each example as the sequence DPO trains the policy on: prompt + chosen completion."""
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns([prompt, chosen])
    for row in dataset:
        yield {"input_ids": list(row[prompt]) + list(row[chosen])}


def _prompt_rows(dataset: Any, tokenizer: Any, chat_template: str | None) -> Iterator[dict[str, list[int]]]:
    """Each example's prompt as GRPOTrainer tokenises it for generation: a conversation through the chat template
    with the generation prompt, a text with the tokenizer's special tokens."""
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns(["prompt"])
    for row in dataset:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ConfigError(
                    "`calibration_data`: the training prompts are text, but the Trainer has no tokenizer to "
                    "tokenise them. Pass processing_class=tokenizer to the Trainer."
                )
            yield {"input_ids": list(tokenizer(prompt)["input_ids"])}
        else:
            yield {"input_ids": chat_ids(prompt, tokenizer, add_generation_prompt=True, chat_template=chat_template)}


def training_rows(dataset: Any, text_field: str = "text", tokenizer: Any = None, chat_template: Any = None) -> Any:
    """What the trainer trains on, as calibration data: the token columns of a formatted dataset (SFTTrainer,
    conversational or not), prompt + chosen of a tokenised preference dataset (DPOTrainer), the prompts of a
    prompt-only dataset (GRPOTrainer, which tokenises them only when generating); anything else as it is."""
    columns = list(getattr(dataset, "column_names", None) or [])
    if "input_ids" in columns and hasattr(dataset, "select_columns"):
        return dataset.select_columns([c for c in ("input_ids", "attention_mask", "labels") if c in columns])
    for prompt, chosen in _PREFERENCE_COLUMNS:
        if prompt in columns and chosen in columns:
            return _preference_rows(dataset, prompt, chosen)
    if "prompt" in columns and text_field not in columns and MESSAGES not in columns:
        return _prompt_rows(dataset, tokenizer, chat_template if isinstance(chat_template, str) else None)
    return dataset


def is_text(data: Any, text_field: str) -> bool:
    """Whether ``data`` still needs tokenising (texts, text records, conversations)."""
    columns = getattr(data, "column_names", None)
    if columns is not None:
        return (text_field in columns or MESSAGES in columns) and "input_ids" not in columns
    if isinstance(data, (list, tuple)) and data:
        first = data[0]
        return isinstance(first, str) or (isinstance(first, dict) and "input_ids" not in first)
    return False
