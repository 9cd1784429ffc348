"""Shared fixtures. HF_HUB_OFFLINE is set before transformers is imported: no test touches a model hub."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["LORAPLAN_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # tests register plugins explicitly

import pytest
import torch

from loraplan import get_plugin_manager, hookimpl
from loraplan.strategies import Selector, Sharer, SharingResult


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-matrix tests: faster, and far faster on a CPU other jobs share.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pm():
    """A fresh plugin manager for each test (built-ins only; no installed plugins)."""
    return get_plugin_manager(load_entrypoints=False)


def tiny_llama(layers: int = 6, seed: int = 0, vocab: int = 101):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(layers: int = 4, seed: int = 0, vocab: int = 101, head: bool = True):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=128,
        num_labels=2,
    )
    model = BertForSequenceClassification(config) if head else BertModel(config)
    return model.eval()


def random_batches(
    n_batches: int = 4, batch: int = 4, length: int = 12, vocab: int = 101, seed: int = 0, ragged: bool = True
):
    """Token batches with right padding of varying length (token 0 never used as a real token)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if ragged:
            lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
            for row, n in enumerate(lengths.tolist()):
                ids[row, n:] = 0
                mask[row, n:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    from loraplan.assets import smollm2_path

    return smollm2_path(quiet=True)


@pytest.fixture(scope="session")
def minilm_dir():
    from loraplan.assets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def reviews():
    from loraplan.assets import fine_foods

    return fine_foods("train")


_LORA_A = re.compile(r"^(?:base_model\.model\.)?(?P<site>.+)\.lora_(?:A|embedding_A)$")


def lora_sites_by_name(model) -> dict[str, int]:
    """``{site: rank}`` of the ``default`` adapter, read from module names alone (not from loraplan): every module
    that owns a ``lora_A`` (or embedding A), under every name it has, so that a module shared by several layers is
    listed in each (``remove_duplicate=False``)."""
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        match = _LORA_A.match(name)
        if match and "default" in module:
            entry = module["default"]
            found[match["site"]] = int(entry.weight.shape[0] if hasattr(entry, "weight") else entry.shape[0])
    return found


@pytest.fixture
def read_sites():
    """:func:`lora_sites_by_name`, for test modules (conftest is not importable under importlib mode)."""
    return lora_sites_by_name


def load_script(path: Path | str, name: str):
    """A script of benchmarks/, recipes/ or .ci/ (not a package) as a module, registered in ``sys.modules`` (its
    dataclasses look themselves up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script():
    """:func:`load_script`, for test modules (which cannot import this file)."""
    return load_script


@pytest.fixture
def make_llama():
    return tiny_llama


def deberta_v3(cls_name: str = "DebertaV2ForSequenceClassification", position_buckets: int = 256):
    """deberta-v3-base's attention settings (relative attention, shared attention keys, p2c and c2p) in a tiny model:
    its query and key projections are also called on the relative position embeddings."""
    import transformers

    torch.manual_seed(0)
    config = transformers.DebertaV2Config(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=101,
        max_position_embeddings=128,
        relative_attention=True,
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=position_buckets,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
    )
    return getattr(transformers, cls_name)(config).eval()


@pytest.fixture
def make_deberta_v3():
    return deberta_v3


@pytest.fixture
def make_bert():
    return tiny_bert


@pytest.fixture
def make_batches():
    return random_batches


def train_lm_steps(model, steps: int = 2, seed: int = 0, lr: float = 1e-2):
    """A few real AdamW steps of a causal LM on random tokens (what every round-trip test trains with); the model is
    left in eval mode. Returns the optimizer."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, 100, (4, 10), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def reload_identically(model, directory, make_base, *, seed: int = 9, **load_kwargs):
    """Save ``model`` with ``save_adapter`` to ``directory``, load it back into fresh base models (``make_base()``)
    with stock ``PeftModel.from_pretrained`` and with ``loraplan.load_adapter`` (``load_kwargs``), and assert that
    both give the saved model's logits on random tokens. Returns ``(stock, ours)``."""
    from peft import PeftModel

    from loraplan import load_adapter, save_adapter

    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, directory)
    stock = PeftModel.from_pretrained(make_base(), directory)
    ours = load_adapter(make_base(), directory, **load_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, expected)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected)
    return stock, ours


@pytest.fixture
def reloaded():
    """:func:`reload_identically`, for test modules."""
    return reload_identically


@pytest.fixture
def train_steps():
    """:func:`train_lm_steps`, for test modules."""
    return train_lm_steps


class _LastTwo(Selector):
    """A third-party selector: the last two layers."""

    name = "last_two"

    def score(self, ctx):
        return {"importance": [float(i) for i in range(ctx.num_layers)]}

    def choose(self, ctx, importance):
        return [ctx.num_layers - 2, ctx.num_layers - 1]


class _PairAll(Sharer):
    """A third-party sharer: every selected layer in one group."""

    name = "pair_all"

    def share(self, ctx):
        return SharingResult(groups=[list(ctx.selected)])


class _ThirdParty:
    """A plugin as an installed package would register it: the selector `last_two` and the sharer `pair_all`."""

    @hookimpl
    def loraplan_register_selectors(self, register):
        register(_LastTwo())

    @hookimpl
    def loraplan_register_sharers(self, register):
        register(_PairAll())


@pytest.fixture
def third_party():
    """The third-party plugin's classes: ``third_party.plugin()`` to register, ``LastTwo``/``PairAll`` the
    strategies (shared by the hook and plugin tests; test files cannot import each other)."""
    import types

    return types.SimpleNamespace(plugin=_ThirdParty, LastTwo=_LastTwo, PairAll=_PairAll)


# -- quantized (bitsandbytes) weights ------------------------------------------------------------------------------


def _digest(tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def quantized_state_of(model) -> dict[str, tuple]:
    """Every quantized weight: its stored bytes, dtype and shape, and each part of its quantization state (absmax,
    code, offset, the nested state of double quantization, the 8-bit scales), by module name without PEFT's
    prefixes."""
    found = {}
    from loraplan.quantized import quantized_weights

    for name, weight in quantized_weights(model).items():
        module = model.get_submodule(name)
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        parts = [("data", _digest(weight.data), str(weight.dtype), tuple(weight.shape))]
        state = getattr(weight, "quant_state", None)
        if state is not None:
            parts.append(("state", state.blocksize, state.quant_type, str(state.dtype), tuple(state.shape)))
            for field in ("absmax", "code", "offset"):
                value = getattr(state, field, None)
                if isinstance(value, torch.Tensor):
                    parts.append((field, _digest(value), str(value.dtype), tuple(value.shape)))
            if getattr(state, "nested", False):
                parts.append(("state2", _digest(state.state2.absmax), _digest(state.state2.code)))
        # 8-bit: the row scales live on the weight until the first forward moves them to the module's state
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scales, torch.Tensor):
            parts.append(("SCB", _digest(scales)))
        found[key] = tuple(parts)
    return found


@pytest.fixture
def quantized_state():
    """:func:`quantized_state_of`, for test modules: what no loraplan operation may change in a quantized model."""
    return quantized_state_of
