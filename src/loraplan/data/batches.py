"""Tokenised batches into samples and samples into batches: splitting a batch (``input_ids`` with, optionally,
``attention_mask``, ``labels`` and, beside ``pixel_values``, other tensors) into its rows without their padding,
giving each row its per-token and per-image tensors and refusing a ``max_length`` cut through image tokens; then
building a padded batch's other tensors from its rows, and hashing a row's tensors into the data hash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..config import PlanConfig
from ..errors import CalibrationError
from .samples import _IMAGE_KEY_PREFIXES, PIXELS, TOKEN_KEYS, Sample


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
