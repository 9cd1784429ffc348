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


# -- bad input is refused before the model loads, in one line (issue 18) ------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the CLI gets as far as loading the model."""
    import loraplan.cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the input could be refused before")

    monkeypatch.setattr(loraplan.cli, "_load_model", refuse)


def _analyze(tiny_dir, data, *extra):
    return main(["analyze", str(tiny_dir), "--data", str(data), "--text-field", "review", "--quiet", *extra])


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda tmp: tmp / "a-file" / "plan.json", "is a file, not a directory"),
        (lambda tmp: Path("/proc/loraplan-test/plan.json"), "no file can be created in '/proc'"),
    ],
    ids=["under-a-file", "proc"],
)
def test_an_unwritable_out_is_refused_before_the_model_loads(
    where, message, tiny_dir, review_file, tmp_path, capsys, no_model_load
):
    (tmp_path / "a-file").write_text("x")
    assert _analyze(tiny_dir, review_file, "--out", str(where(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "`--out`" in err and message in err and len(err.strip().splitlines()) == 1


def test_a_plot_suffix_matplotlib_cannot_write_is_refused_before_the_model_loads(
    tiny_dir, review_file, tmp_path, capsys, no_model_load
):
    args = ["--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / "plan.docx")]
    assert _analyze(tiny_dir, review_file, *args) == 2
    err = capsys.readouterr().err
    assert "`--plot`" in err and ".docx" in err and ".png" in err


def test_a_selector_typo_is_refused_before_the_model_loads(tiny_dir, review_file, tmp_path, capsys, no_model_load):
    assert _analyze(tiny_dir, review_file, "--out", str(tmp_path / "p.json"), "--selector", "ckaa") == 2
    assert "Did you mean 'cka'?" in capsys.readouterr().err
    assert _analyze(tiny_dir, review_file, "--out", str(tmp_path / "p.json"), "--share", "angualr") == 2
    assert "`share` is 'angualr'" in capsys.readouterr().err
    # a per-stack strategy (an encoder-decoder model's) is looked up before the model loads too
    assert _analyze(tiny_dir, review_file, "--out", str(tmp_path / "p.json"), "--stacks", "decoder.selector=ckaa") == 2
    err = capsys.readouterr().err
    assert "`stacks.decoder`" in err and "Did you mean 'cka'?" in err and len(err.strip().splitlines()) == 1


def test_a_plot_in_a_directory_that_cannot_be_written_is_refused_before_the_model_loads(
    tiny_dir, review_file, tmp_path, capsys, no_model_load
):
    (tmp_path / "a-file").write_text("x")
    args = ["--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / "a-file" / "plan.png")]
    assert _analyze(tiny_dir, review_file, *args) == 2
    err = capsys.readouterr().err
    assert "`--plot`" in err and "a-file" in err and len(err.strip().splitlines()) == 1


def test_a_directory_without_config_json_is_named(review_file, tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"")
    assert main(["analyze", str(tmp_path), "--data", str(review_file), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "has no config.json" in err and "weights.bin" in err and "Traceback" not in err


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".json"])
def test_data_that_is_not_utf8_names_the_file_and_the_encoding(suffix, tiny_dir, tmp_path, capsys, no_model_load):
    data = tmp_path / f"latin1{suffix}"
    text = {
        ".txt": "café crème",
        ".jsonl": '{"review": "café crème"}',
        ".csv": "review\ncafé crème",
        ".json": '[{"review": "café crème"}]',
    }[suffix]
    data.write_bytes((text + "\n").encode("latin-1"))
    assert _analyze(tiny_dir, data, "--out", str(tmp_path / "p.json")) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "not UTF-8" in err and f"0xe9 at offset {text.index('é')}" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_the_model_loads(
    tiny_dir, review_file, tmp_path, capsys, no_model_load
):
    assert _analyze(tiny_dir, review_file, "--out", str(tmp_path / "p.json"), "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "`--device` 'cuda'" in err and "--device cpu" in err
    assert _analyze(tiny_dir, review_file, "--out", str(tmp_path / "p.json"), "--device", "gpu0") == 2
    assert "is not a device torch knows" in capsys.readouterr().err


def test_quiet_silences_the_loading_bar_too(tiny_dir, review_file, tmp_path):
    script = Path(sys.executable).with_name("loraplan")
    command = [str(script), "analyze", str(tiny_dir), "--data", str(review_file), "--text-field", "review"]
    command += ["--samples", "16", "--max-length", "32", "--out", str(tmp_path / "p.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    loud = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    quiet = subprocess.run([*command, "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "Loading weights" in loud.stderr and "loraplan calibration" in loud.stderr  # what --quiet is to silence
    assert "Loading weights" not in quiet.stderr and "%|" not in quiet.stderr


def test_a_plan_that_cannot_be_saved_at_the_end_is_kept(tiny_dir, review_file, tmp_path, capsys, monkeypatch):
    # --out was writable when the run began and is not when the plan is saved: the plan goes elsewhere, named
    out = tmp_path / "out" / "plan.json"
    import loraplan.cli

    original = loraplan.cli._load_model

    def load_then_block(*args, **kwargs):
        loaded = original(*args, **kwargs)
        (tmp_path / "out").write_text("now a file")  # the directory --out needs is gone
        return loaded

    monkeypatch.setattr(loraplan.cli, "_load_model", load_then_block)
    assert _analyze(tiny_dir, review_file, "--samples", "8", "--max-length", "32", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "could not be written" in err
    kept = Path(err.split("the plan was saved to ")[1].split(" instead")[0])
    try:
        assert LoraPlan.load(kept).num_layers == 6
    finally:
        kept.unlink()


def test_show_on_an_adapter_config_says_where_the_plan_is(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert main(["show", str(tmp_path / "adapter_config.json")]) == 2
    err = capsys.readouterr().err
    assert "is a PEFT adapter config, not a loraplan plan" in err and "loraplan.json beside a saved adapter" in err
    assert "Recompute" not in err


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_analyze_plans_both_stacks_of_an_encoder_decoder_model(family, tmp_path, review_file, capsys, smollm2_dir):
    import torch
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
    if family == "t5":
        config = tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4, vocab_size=len(tokenizer), **ids)
        model = tf.T5ForConditionalGeneration(config)
    else:
        sizes = dict(encoder_layers=4, decoder_layers=4, encoder_attention_heads=4, decoder_attention_heads=4)
        config = tf.BartConfig(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=len(tokenizer), **sizes)
        model = tf.BartForConditionalGeneration(tf.BartConfig(**{**config.to_dict(), **ids}))
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    out = tmp_path / "plan.json"
    args = ["--samples", "12", "--max-length", "32", "--share", "angular", "--share-threshold", "0"]
    code = main(
        [
            "analyze",
            str(tmp_path / family),
            "--data",
            str(review_file),
            "--text-field",
            "review",
            *args,
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    plan = LoraPlan.load(out)
    assert [one.stack.get("name") for one in plan.stacks] == ["encoder", "decoder"]
    assert [len(one.selected_layers) for one in plan.stacks] == [2, 2]
    assert "== encoder stack ==" in printed and "== decoder stack ==" in printed
    assert "trainable LoRA parameters of the whole model" in printed
    assert main(["show", str(out)]) == 0 and "== decoder stack ==" in capsys.readouterr().out
