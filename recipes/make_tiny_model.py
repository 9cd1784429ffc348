"""Write a random-init tiny Llama (with the SmolLM2 tokenizer) and the Fine Foods reviews as JSONL, for the
tiny CPU recipes (recipes/axolotl/tiny_cpu.yaml) and the tests.

Usage (from the repository root):
    python recipes/make_tiny_model.py runs/tiny
writes runs/tiny/model/ (4 layers, d=32) and runs/tiny/fine_foods_train.jsonl. Offline: the tokenizer and data
come from loraplan[assets].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=4,
    max_position_embeddings=256,
)


def write_tiny(out: Path, seed: int = 0, layers: int = 4) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraplan.assets import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(quiet=True))
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{**SHAPE, "num_hidden_layers": layers},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_dir = out / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def write_reviews(out: Path, limit: int = 256) -> Path:
    from loraplan.assets import fine_foods

    path = out / "fine_foods_train.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for record in fine_foods("train")[:limit]:
            fh.write(json.dumps({"text": record["text"]}, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_tiny(args.out, args.seed, args.layers))
    print(write_reviews(args.out))


if __name__ == "__main__":
    main()
