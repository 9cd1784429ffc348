"""Multimodal (LLaVA-style) calibration rows: the image placeholder token (:func:`image_token_id`), ``(text, image)``
rows from records, each row through the ``processor`` into tokens and ``pixel_values`` (checking its placeholders
against its images), and the errors for images without a processor and a processor without images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..config import PlanConfig
from ..errors import CalibrationError, ConfigError
from .batches import _split_batch
from .samples import PIXELS, Sample

logger = logging.getLogger("loraplan")


def image_token_id(processor: Any = None, model_config: Any = None) -> int | None:
    """The id of the placeholder token that marks where an image goes (the processor's, else the model config's
    ``image_token_id`` / ``image_token_index``), or ``None`` when neither names one."""
    for source, names in ((processor, ("image_token_id",)), (model_config, ("image_token_id", "image_token_index"))):
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


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
