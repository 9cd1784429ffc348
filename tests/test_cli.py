"""The `loraplan` command on a tiny model directory, and on the real packaged SmolLM2 and MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplan import LoraPlan
from loraplan.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny Llama saved as a transformers directory, with SmolLM2's real tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=6,
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def review_file(tmp_path_factory, reviews):
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("".join(json.dumps({"review": r["text"]}) + "\n" for r in reviews[:64]))
    return path


def test_analyze_prints_the_table_and_writes_plan_and_figure(tiny_dir, review_file, tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    code = main(
        [
            "analyze",
            str(tiny_dir),
            "--data",
            str(review_file),
            "--text-field",
            "review",
            "--samples",
            "24",
            "--max-length",
            "64",
            "--selector",
            "cka",
            "--ratio",
            "0.5",
            "--share",
            "angular",
            "--share-threshold",
            "0.5",
            "--out",
            str(out),
            "--plot",
            str(png),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    plan = LoraPlan.load(out)
    assert len(plan.selected_layers) == 3 and plan.calibration["num_samples"] == 24
    assert "layer" in printed and "selected" in printed and "group" in printed
    for layer in range(6):
        assert any(line.strip().startswith(f"{layer} ") for line in printed.splitlines())
    assert "trainable LoRA parameters" in printed and "all layers at r=8" in printed
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"

    code = main(["show", str(out)])
    shown = capsys.readouterr().out
    assert code == 0
    table = lambda text: [l for l in text.splitlines() if l[:6].strip().isdigit()]  # noqa: E731
    assert table(shown) == table(printed)


def test_txt_data_and_explicit_count(tiny_dir, tmp_path, reviews, capsys):
    data = tmp_path / "reviews.txt"
    data.write_text("\n".join(r["text"].replace("\n", " ") for r in reviews[:20]) + "\n")
    code = main(
        [
            "analyze",
            str(tiny_dir),
            "--data",
            str(data),
            "--count",
            "2",
            "--selector",
            "activation",
            "--samples",
            "10",
            "--max-length",
            "32",
            "--out",
            str(tmp_path / "p.json"),
            "--quiet",
        ]
    )
    assert code == 0
    assert len(LoraPlan.load(tmp_path / "p.json").selected_layers) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--selector", "nope"], "`selector` is 'nope'"),
        (["--ratio", "1.5"], "`ratio` must be a number in (0, 1]"),
        (["--share", "angular", "--share-threshold", "2"], "`share_threshold`"),
        (["--count", "99"], "`count` must be between 1 and the model's 6 layers"),
    ],
    ids=["selector", "ratio", "threshold", "count"],
)
def test_bad_arguments_exit_with_a_clear_error(extra, message, tiny_dir, review_file, tmp_path, capsys):
    code = main(
        [
            "analyze",
            str(tiny_dir),
            "--data",
            str(review_file),
            "--text-field",
            "review",
            "--samples",
            "8",
            "--out",
            str(tmp_path / "p.json"),
            "--quiet",
            *extra,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_missing_data_and_wrong_field(tiny_dir, review_file, tmp_path, capsys):
    assert main(["analyze", str(tiny_dir), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", str(tiny_dir), "--data", str(review_file)]) == 2
    assert "`--text-field` is 'text'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_plan_is_plausible(smollm2_dir, tmp_path):
    """The packaged SmolLM2-135M on real reviews, through the installed console script."""
    data = (
        Path(
            subprocess.run(
                [sys.executable, "-m", "loraplan.assets", "path", "data"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        / "fine_foods_train.jsonl"
    )
    if not data.is_file():  # `make demo` writes it; write it here otherwise
        subprocess.run([sys.executable, "-m", "loraplan.assets", "prepare"], check=True, capture_output=True)
    out = tmp_path / "plan.json"
    script = Path(sys.executable).with_name("loraplan")
    result = subprocess.run(
        [
            str(script),
            "analyze",
            str(smollm2_dir),
            "--data",
            str(data),
            "--samples",
            "48",
            "--max-length",
            "96",
            "--share",
            "angular",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    plan = LoraPlan.load(out)
    assert plan.model_fingerprint["class"] == "LlamaForCausalLM" and plan.num_layers == 30
    assert len(plan.selected_layers) == 15
    # decoders favour early layers plus the last one (DESIGN §1): the embedding-adjacent block and the final
    # block (whose output is after the final norm) change the representation most
    assert 0 in plan.selected_layers and 29 in plan.selected_layers
    cka = plan.scores["cka"]
    assert min(cka[0], cka[29]) < min(cka[2:29])
    assert plan.share_groups and all(len(g) >= 2 for g in plan.share_groups)
    assert plan.stability["cka"] > 0.5
    assert "trainable LoRA parameters" in result.stdout


@pytest.mark.slow
def test_real_minilm_plan_is_plausible(minilm_dir, reviews, tmp_path, capsys):
    """The packaged MiniLM-L6 encoder: the [CLS] embedding is constant, so layer 0 is flagged; late layers win."""
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in reviews[:96]))
    code = main(
        [
            "analyze",
            str(minilm_dir),
            "--data",
            str(data),
            "--samples",
            "96",
            "--max-length",
            "128",
            "--out",
            str(tmp_path / "plan.json"),
            "--quiet",
        ]
    )
    assert code == 0
    plan = LoraPlan.load(tmp_path / "plan.json")
    assert plan.calibration["pooling"] == "first" and plan.num_layers == 6
    assert 0 in plan.flagged_layers and 0 not in plan.selected_layers
    assert 5 in plan.selected_layers  # encoders favour late layers (DESIGN §1)
    assert sum(1 for i in plan.selected_layers if i >= 3) >= 2
    assert "FLAGGED" in capsys.readouterr().out
