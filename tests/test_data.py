"""Calibration data (`loraplan.data`): every accepted form becomes the same right-padded token batches, and bad
input is an error that says what was given."""

from __future__ import annotations

import json

import pytest
import torch

from loraplan import PlanConfig, make_plan
from loraplan.data import CalibrationBatches, prepare_batches, read_texts
from loraplan.errors import CalibrationError, ConfigError

WORDS = ["[PAD]", "[UNK]", "</s>", "great", "bad", "product", "would", "buy", "again", "not"]
TEXTS = ["great product", "bad product would not buy again", "would buy again", "not great", "bad"]


@pytest.fixture
def tokenizer():
    """A real fast tokenizer over a ten-word vocabulary, built here (no hub, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def _ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def test_samples_are_right_padded_in_batches_and_capped(tokenizer):
    data = prepare_batches(TEXTS, PlanConfig(calibration_samples=4, batch_size=3), tokenizer)
    assert isinstance(data, CalibrationBatches) and len(data) == 2
    assert (data.num_samples, data.requested, data.pad_token_id) == (4, 4, 0)
    assert data.num_tokens == sum(len(_ids(t)) for t in TEXTS[:4]) == 13
    first, second = data.batches
    assert first["input_ids"].tolist() == [
        [3, 5, 0, 0, 0, 0],
        [4, 5, 6, 9, 7, 8],
        [6, 7, 8, 0, 0, 0],
    ]
    assert first["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]
    assert second["input_ids"].tolist() == [[9, 3]] and second["attention_mask"].tolist() == [[1, 1]]
    assert first["input_ids"].dtype == torch.long and "labels" not in first


def test_texts_records_datasets_and_token_batches_give_the_same_data_hash(tokenizer):
    from datasets import Dataset

    config = PlanConfig(calibration_samples=5, batch_size=2)
    hashes = {
        "texts": prepare_batches(TEXTS, config, tokenizer).data_hash,
        "records": prepare_batches(
            [{"review": t} for t in TEXTS], PlanConfig(calibration_samples=5, text_field="review"), tokenizer
        ).data_hash,
        "dataset": prepare_batches(Dataset.from_dict({"text": TEXTS}), config, tokenizer).data_hash,
        "ids column": prepare_batches(Dataset.from_dict({"input_ids": [_ids(t) for t in TEXTS]}), config).data_hash,
        "1-d batches": prepare_batches([{"input_ids": _ids(t)} for t in TEXTS], config).data_hash,
    }
    assert len(set(hashes.values())) == 1, hashes
    assert hashes["texts"].startswith("sha256:")
    other = prepare_batches(TEXTS[:4] + ["good product"], config, tokenizer).data_hash
    assert other != hashes["texts"]


def test_padding_and_max_length_apply_to_tokenised_batches(make_batches):
    batches = make_batches(n_batches=2, batch=4, length=12)
    data = prepare_batches(batches, PlanConfig(calibration_samples=8, batch_size=8, max_length=5))
    (batch,) = data.batches
    kept = [row[m.bool()][:5].tolist() for b in batches for row, m in zip(b["input_ids"], b["attention_mask"])]
    assert [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])] == kept
    assert batch["input_ids"].shape == (8, 5) and data.num_tokens == sum(len(k) for k in kept)


def test_token_and_sequence_labels_are_kept(make_batches):
    (b,) = make_batches(n_batches=1, batch=3, length=6, ragged=False)
    tokens = prepare_batches([{**b, "labels": b["input_ids"] + 1}], PlanConfig(calibration_samples=3))
    assert torch.equal(tokens.batches[0]["labels"], b["input_ids"] + 1)
    ragged = [{"input_ids": [[5, 6, 7]], "labels": [[1, 2, 3]]}, {"input_ids": [[8]], "labels": [[4]]}]
    padded = prepare_batches(ragged, PlanConfig(calibration_samples=2))
    assert padded.batches[0]["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    sequence = prepare_batches([{**b, "labels": torch.tensor([1, 0, 1])}], PlanConfig(calibration_samples=3))
    assert sequence.batches[0]["labels"].tolist() == [1, 0, 1]
    with pytest.raises(CalibrationError, match="some calibration samples have `labels` and others do not"):
        prepare_batches(
            [{"input_ids": [5, 6], "labels": [1, 2]}, {"input_ids": [7]}], PlanConfig(calibration_samples=2)
        )


def test_the_pad_id_follows_the_tokenizer_and_reference_mode_pads_with_eos(tokenizer, make_llama):
    config = make_llama(layers=1).config
    config.pad_token_id, config.eos_token_id = 7, 9
    batches = [{"input_ids": [5, 6, 4]}, {"input_ids": [3]}]
    assert prepare_batches(TEXTS, PlanConfig(calibration_samples=2), tokenizer, config).pad_token_id == 0
    assert (
        prepare_batches(TEXTS, PlanConfig(calibration_samples=2, last_token="reference"), tokenizer).pad_token_id == 2
    )
    by_config = prepare_batches(batches, PlanConfig(calibration_samples=2), None, config)
    assert by_config.pad_token_id == 7 and by_config.batches[0]["input_ids"].tolist() == [[5, 6, 4], [3, 7, 7]]
    reference = prepare_batches(batches, PlanConfig(calibration_samples=2, last_token="reference"), None, config)
    assert reference.pad_token_id == 9 and reference.batches[0]["input_ids"][1].tolist() == [3, 9, 9]


def test_bad_records_and_batches_say_what_was_given(tokenizer):
    from datasets import Dataset

    config = PlanConfig(calibration_samples=4)
    with pytest.raises(ConfigError, match=r"`text_field` is 'text', but the dataset has columns \['review'\]"):
        prepare_batches(Dataset.from_dict({"review": TEXTS}), config, tokenizer)
    with pytest.raises(CalibrationError, match="calibration sample 1 is int, not text: '42'.*`text`"):
        prepare_batches(["great", 42], config, tokenizer)
    with pytest.raises(CalibrationError, match="calibration sample 1 is empty after tokenisation"):
        prepare_batches(["great", ""], config, tokenizer)
    with pytest.raises(CalibrationError, match="calibration batch 0 is tuple; tokenised calibration data must be"):
        prepare_batches([(1, 2, 3)], config)
    mismatched = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    with pytest.raises(
        CalibrationError, match=r"batch 0: attention_mask shape \(2, 3\) does not match input_ids shape \(2, 4\)"
    ):
        prepare_batches([mismatched], config)


def test_empty_and_all_padding_batches(pm, make_llama):
    model = make_llama()
    empty = [{"input_ids": torch.zeros(0, 5, dtype=torch.long)}]
    with pytest.raises(CalibrationError, match="batch 0 is empty"):
        make_plan(model, empty, PlanConfig(), plugin_manager=pm, progress=False)
    padding = [{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]
    with pytest.raises(CalibrationError, match="all padding"):
        make_plan(model, padding, PlanConfig(), plugin_manager=pm, progress=False)
    one_row = torch.ones(2, 5, dtype=torch.long)
    one_row[1] = 0
    with pytest.raises(CalibrationError, match="row 1 is all padding"):
        make_plan(
            model,
            [{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": one_row}],
            PlanConfig(),
            plugin_manager=pm,
            progress=False,
        )
    with pytest.raises(CalibrationError, match="empty"):
        make_plan(model, [], PlanConfig(), plugin_manager=pm, progress=False)


def test_text_without_a_tokenizer_and_other_wrong_data(pm, make_llama):
    model = make_llama()
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        make_plan(model, ["a text", "another"], PlanConfig(), plugin_manager=pm, progress=False)
    with pytest.raises(ConfigError, match="single string"):
        make_plan(model, "a text", PlanConfig(), plugin_manager=pm, progress=False)
    with pytest.raises(ConfigError, match="`text_field` is 'text', but calibration record 0 has keys \\['review'\\]"):
        make_plan(model, [{"review": "x"}], PlanConfig(), plugin_manager=pm, progress=False)
    with pytest.raises(ConfigError, match="None"):
        make_plan(model, None, PlanConfig(), plugin_manager=pm, progress=False)


def test_read_texts_from_jsonl_json_and_txt(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"review": t, "stars": i}) for i, t in enumerate(TEXTS)) + "\n\n")
    assert read_texts(str(jsonl), "review") == TEXTS
    assert read_texts(str(jsonl), "review", limit=2) == TEXTS[:2]
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps([TEXTS[0], {"text": TEXTS[1]}]))
    assert read_texts(str(listed)) == TEXTS[:2]
    lines = tmp_path / "rows.txt"
    lines.write_text("first sample\n\n   \nsecond sample\n")
    assert read_texts(str(lines)) == ["first sample", "second sample"]


def test_read_texts_errors_name_the_file_the_line_and_the_key(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ConfigError, match="rows.jsonl: line 2 is not valid JSON"):
        read_texts(str(jsonl))
    jsonl.write_text('{"text": "ok"}\n{"review": "no text key", "stars": 3}\n')
    with pytest.raises(
        ConfigError, match=r"`--text-field` is 'text', but record 1 of .* has keys \['review', 'stars'\]"
    ):
        read_texts(str(jsonl))
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps({"text": "an object, not a list"}))
    with pytest.raises(ConfigError, match="must hold a JSON list"):
        read_texts(str(listed))
    (tmp_path / "rows.xml").write_text("<text>x</text>\n")
    with pytest.raises(ConfigError, match="must be a .jsonl, .json, .csv, .parquet or .txt file, got 'rows.xml'"):
        read_texts(str(tmp_path / "rows.xml"))
    with pytest.raises(ConfigError, match="does not exist"):
        read_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no samples"):
        read_texts(str(tmp_path / "blank.txt"))
