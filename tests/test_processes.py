"""loraplan.processes without a process group (one process: rank 0 of 1), and loraplan.distributed built on it: a plan
everywhere that is the plan of make_plan (and the helpers it re-exported, still there for a release with a warning)."""

from __future__ import annotations

import pytest
import torch

import loraplan.distributed
import loraplan.processes
from loraplan import PlanConfig, make_plan
from loraplan.errors import ConfigError
from loraplan.processes import from_main, gathered_parameters, is_main_process, is_partitioned, rank, world_size

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_process_group():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_one_process_is_rank_0_of_1():
    assert rank() == 0
    assert world_size() == 1
    assert is_main_process() is True


def test_from_main_is_just_fn_once():
    calls = []

    def fn():
        calls.append(1)
        return {"answer": 42}

    assert from_main(fn) == {"answer": 42}
    assert calls == [1]
    # one process: nothing is broadcast, so the result is not encoded or decoded
    assert from_main(fn, every_rank=True, encode=lambda value: 1 / 0, decode=lambda value: 1 / 0) == {"answer": 42}
    assert calls == [1, 1]


def test_from_main_lets_the_exception_of_fn_through():
    def fails():
        raise ValueError("no calibration data")

    with pytest.raises(ValueError, match="^no calibration data$"):
        from_main(fails)

    def refuses():
        raise ConfigError("`ratio` is 2")

    with pytest.raises(ConfigError, match=r"^`ratio` is 2$"):  # the same error, not re-wrapped
        from_main(refuses, every_rank=True)


def test_a_plain_model_is_not_partitioned_and_gathering_changes_nothing(make_llama, make_batches):
    model = make_llama(layers=2)
    assert is_partitioned(model) is False
    batch = make_batches(n_batches=1, batch=2, length=8)[0]
    with torch.no_grad():
        before = model(**batch).logits
        for whole_model in (False, True):
            with gathered_parameters(model, whole_model=whole_model):
                inside = model(**batch).logits
            torch.testing.assert_close(inside, before, rtol=0, atol=0)
    # no hook is left behind
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"), gathered_parameters(model):
        raise RuntimeError("raised inside")  # the context does not swallow an error


@pytest.mark.parametrize("name", loraplan.processes.__all__)
def test_the_process_helpers_from_distributed_warn_and_are_the_same(name):
    assert name not in loraplan.distributed.__all__
    with pytest.warns(
        DeprecationWarning, match=rf"loraplan\.distributed\.{name} has moved to loraplan\.processes\.{name}"
    ):
        helper = getattr(loraplan.distributed, name)
    assert helper is getattr(loraplan.processes, name)


def test_make_plan_everywhere_without_a_process_group_is_make_plan(pm, make_llama, make_batches):
    config = PlanConfig(selector="cka", share="angular", share_threshold=0.5, calibration_samples=16)
    everywhere = loraplan.distributed.make_plan_everywhere(
        make_llama(layers=4), make_batches(), config, plugin_manager=pm, progress=False
    )
    plan = make_plan(make_llama(layers=4), make_batches(), config, plugin_manager=pm, progress=False)
    assert everywhere.to_dict() == plan.to_dict()
    assert everywhere.selected_layers == plan.selected_layers and len(plan.selected_layers) == 2


def test_load_plan_everywhere_without_a_process_group_reads_the_file(pm, make_llama, make_batches, tmp_path):
    plan = make_plan(
        make_llama(layers=4), make_batches(), PlanConfig(calibration_samples=16), plugin_manager=pm, progress=False
    )
    path = plan.save(tmp_path / "plan.json")
    assert loraplan.distributed.load_plan_everywhere(path).to_dict() == plan.to_dict()
