"""Calibration data from a file (the CLI's ``--data``): :func:`read_texts` reads ``.txt`` itself and ``.jsonl``,
``.json``, ``.csv`` and ``.parquet`` with ``datasets.load_dataset``, into texts or conversational records, with
errors that name the file and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .samples import MESSAGES

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


def _check_utf8(path: Any) -> None:
    """A ``ConfigError`` naming the file, the offset and the encoding when a text data file is not UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = offset - (len(exc.object) - len(chunk)) + exc.start  # the decoder may hold bytes of the last chunk
                raise ConfigError(
                    f"`--data` {path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {at} cannot be "
                    "decoded as UTF-8. Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)."
                ) from exc
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"`--data` {path} is not UTF-8 text: it ends inside a multi-byte character (offset {offset}). "
                "Convert the file to UTF-8, or complete its last line."
            ) from exc


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
    if suffix in (".txt", *(k for k, v in _BUILDERS.items() if v != "parquet")):
        _check_utf8(p)
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
