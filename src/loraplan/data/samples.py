"""What every form of calibration data becomes: a :class:`Sample` per row (its tokens, labels and a multimodal row's
other tensors) and the :class:`CalibrationBatches` built from them, the keys that name a batch's tokens, its images
and a conversation (``MESSAGES``, ``TOKEN_KEYS``, ``PIXELS``), and the pad token the batches are padded with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

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
    #: the EOS token of the tokenizer (else of the model config): ``last_token="auto"`` reads before a trailing one
    eos_token_id: int | None = None
    #: batched by length: the sample each row is, in batch order (``None``: the rows are the samples in order)
    order: list[int] | None = None

    def __len__(self) -> int:
        return len(self.batches)


def _eos_id(tokenizer: Any, model_config: Any) -> int | None:
    """The EOS token id of the tokenizer, else of the model config (the first of a list), else ``None``."""
    for candidate in (getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    return None


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
