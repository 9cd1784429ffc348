"""Truncated backward with real PEFT: the same loss and LoRA gradients as stock PEFT on the same plan, while the
layers below the lowest adapted layer record nothing and are not recomputed; removable; left alone (and said so)
when something below is trainable; kept through save/load and deep copies."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraplan import LoraPlan, apply_plan, load_adapter, remove_truncation, save_adapter
from loraplan.layers import find_layers
from loraplan.plan import fingerprint
from loraplan.truncate import NOTE_PREFIX, truncation_of

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYERS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


PLANS = {
    "top": ([3, 4, 5], []),
    "every-other": ([1, 3, 5], []),
    "shared": ([2, 3, 5], [[3, 5]]),
}
CHECKPOINTING = {
    # (checkpointing kwargs or None, whether the embedding output is made to require grad as trainers do)
    "none+input-grads": (None, True),
    "non-reentrant": ({"use_reentrant": False}, True),
    "reentrant": ({"use_reentrant": True}, True),
}


def plan_for(model, layers: list[int], groups: list[list[int]]) -> LoraPlan:
    stack = find_layers(model)
    return LoraPlan(
        num_layers=LAYERS,
        selected_layers=layers,
        share_groups=groups,
        config={"selector": "top"},
        model_fingerprint=fingerprint(model, stack),
        stack={"path": stack.path, "pattern": stack.pattern, "ambiguous": False},
    )


def build(make_llama, layers, groups, *, truncate=True, checkpointing=None, input_grads=True, **lora):
    """A LoRA model narrowed to the plan; checkpointing and input grads switched on afterwards, as Trainer.train
    does."""
    base = make_llama(layers=LAYERS, seed=0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, **lora))
    plan = plan_for(base, layers, groups)
    apply_plan(model, plan, truncate_backward=truncate)
    model.train()
    if checkpointing is not None:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    elif input_grads:
        base.enable_input_require_grads()
    return model, plan


class Recorder:
    """Per layer: whether its output required grad, and how often its MLP started (twice when recomputed; a pre-hook,
    because torch's non-reentrant recomputation stops as soon as it has what backward needs)."""

    def __init__(self, model):
        self.records: dict[int, list[bool]] = {}
        self.mlp_calls: dict[int, int] = {}
        self.handles = []
        for index, layer in enumerate(find_layers(model).layers):
            self.handles.append(layer.register_forward_hook(self._output(index)))
            self.handles.append(layer.mlp.register_forward_pre_hook(self._mlp(index)))

    def _output(self, index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.records.setdefault(index, []).append(hidden.requires_grad)

        return hook

    def _mlp(self, index):
        def hook(module, args):
            self.mlp_calls[index] = self.mlp_calls.get(index, 0) + 1

        return hook


def step(model, seed: int = 1):
    ids = torch.randint(3, 100, (3, 11), generator=torch.Generator().manual_seed(seed))
    recorder = Recorder(model)
    try:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        for handle in recorder.handles:
            handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, recorder


def assert_same_gradients(expected: dict, got: dict) -> None:
    assert got.keys() == expected.keys() and expected
    for name, grad in expected.items():
        assert grad.abs().max() > 0, f"{name}: no gradient reached it, the comparison would prove nothing"
        torch.testing.assert_close(got[name], grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", CHECKPOINTING, ids=list(CHECKPOINTING))
@pytest.mark.parametrize("which", PLANS, ids=list(PLANS))
def test_same_loss_and_lora_gradients_as_stock_peft(make_llama, which, mode):
    layers, groups = PLANS[which]
    checkpointing, input_grads = CHECKPOINTING[mode]
    stock, _ = build(make_llama, layers, groups, truncate=False, checkpointing=checkpointing, input_grads=input_grads)
    ours, plan = build(make_llama, layers, groups, checkpointing=checkpointing, input_grads=input_grads)
    stock_loss, stock_grads, stock_seen = step(stock)
    loss, grads, seen = step(ours)
    torch.testing.assert_close(loss, stock_loss)
    assert_same_gradients(stock_grads, grads)
    lowest = min(layers)
    below, above = range(lowest), range(lowest, LAYERS)
    # stock PEFT records every layer (the trainer made the embedding output require grad); loraplan not below
    assert all(stock_seen.records[i] == [True] for i in range(LAYERS))
    assert all(seen.records[i] == [False] for i in below)
    assert all(seen.records[i] == [True] for i in above)
    if checkpointing is not None:  # stock recomputes every layer in backward; loraplan none of those below
        assert all(stock_seen.mlp_calls[i] == 2 for i in range(LAYERS))
        assert all(seen.mlp_calls[i] == 1 for i in below) and all(seen.mlp_calls[i] == 2 for i in above)
    assert plan.notes[-1].startswith(NOTE_PREFIX) and f"below the lowest adapted layer {lowest})" in plan.notes[-1]
    assert truncation_of(ours).layers == list(below)
    assert torch.is_grad_enabled()


def test_deprecated_gradient_checkpointing_name_and_a_later_input_grads_call(make_llama):
    """What TRL does: `gradient_checkpointing_enable` (deprecated name) and `enable_input_require_grads` after the
    plan."""
    ours, _ = build(make_llama, [3, 4, 5], [], input_grads=False)
    stock, _ = build(make_llama, [3, 4, 5], [], truncate=False, input_grads=False)
    for model in (ours, stock):
        with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.base_model.model.enable_input_require_grads()
    stock_loss, stock_grads, _ = step(stock)
    loss, grads, seen = step(ours)
    torch.testing.assert_close(loss, stock_loss)
    assert_same_gradients(stock_grads, grads)
    assert [seen.records[i] for i in range(3)] == [[False]] * 3 and [seen.mlp_calls[i] for i in range(3)] == [1] * 3


def test_truncate_backward_false_and_remove_truncation_give_stock_behaviour(make_llama):
    model, plan = build(make_llama, [3, 4, 5], [], truncate=False)
    assert (
        plan.notes[-1]
        == f"{NOTE_PREFIX} off: turned off (truncate_backward=False); every layer is back-propagated as with stock PEFT"
    )
    layers = find_layers(model).layers
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    apply_plan(model, plan)  # applied again: installed, and the note replaced rather than added
    assert sum(n.startswith(NOTE_PREFIX) for n in plan.notes) == 1 and "layers 0-2" in plan.notes[-1]
    assert step(model)[2].records[0] == [False]
    assert remove_truncation(model) == 4  # three layers below and the boundary layer
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    assert step(model)[2].records[0] == [True]
    assert truncation_of(model) is None


def test_bottom_plan_has_nothing_to_truncate(make_llama):
    model, plan = build(make_llama, [0, 1, 2], [])
    assert "the lowest adapted layer is layer 0" in plan.notes[-1]
    assert all(step(model)[2].records[i] == [True] for i in range(LAYERS))


@pytest.mark.parametrize(
    "lora",
    # trainable tokens 15 and 58 occur in step()'s batch
    [dict(modules_to_save=["embed_tokens"]), dict(trainable_token_indices=[15, 58])],
    ids=["embeddings-in-modules_to_save", "trainable-tokens"],
)
def test_trainable_embeddings_leave_it_off_and_say_why(make_llama, lora, caplog):
    with caplog.at_level(logging.WARNING, logger="loraplan"):
        ours, plan = build(make_llama, [3, 4, 5], [], **lora)
    assert "off: trainable parameters below layer 3" in plan.notes[-1] and "embed_tokens" in plan.notes[-1]
    assert any("embed_tokens" in r.getMessage() and "off" in r.getMessage() for r in caplog.records)
    assert truncation_of(ours).active is False
    stock, _ = build(make_llama, [3, 4, 5], [], truncate=False, **lora)
    stock_loss, stock_grads, _ = step(stock)
    loss, grads, seen = step(ours)
    assert any("embed_tokens" in name for name in grads)
    torch.testing.assert_close(loss, stock_loss)
    assert_same_gradients(stock_grads, grads)
    assert all(seen.records[i] == [True] for i in range(LAYERS))


@pytest.mark.parametrize("what", ["lower-layer", "embeddings"])
def test_something_made_trainable_after_apply_runs_with_autograd(make_llama, what, caplog):
    models = []
    for truncate in (False, True):
        model, _ = build(make_llama, [3, 4, 5], [], truncate=truncate)
        base = model.base_model.model
        param = base.model.layers[1].mlp.up_proj.weight if what == "lower-layer" else base.model.embed_tokens.weight
        param.requires_grad_(True)
        models.append(model)
    stock_loss, stock_grads, _ = step(models[0])
    with caplog.at_level(logging.WARNING, logger="loraplan"):
        loss, grads, seen = step(models[1])
        step(models[1], seed=2)
    torch.testing.assert_close(loss, stock_loss)
    assert_same_gradients(stock_grads, grads)
    warnings = [r.getMessage() for r in caplog.records if "does not apply to this forward pass" in r.getMessage()]
    assert len(warnings) == 1  # once, not every step
    assert ("layer 1 has a trainable parameter" if what == "lower-layer" else "input of layer 0 depends") in warnings[0]
    if what == "embeddings":
        assert all(seen.records[i] == [True] for i in range(LAYERS))
    else:
        assert seen.records[0] == [False] and seen.records[1] == [True]


def test_an_error_inside_a_truncated_layer_restores_autograd_and_checkpointing(make_llama):
    model, _ = build(make_llama, [3, 4, 5], [], checkpointing={"use_reentrant": False})
    layer = find_layers(model).layers[1]
    checkpoint_func = layer._gradient_checkpointing_func

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = layer.mlp.register_forward_hook(fail)
    ids = torch.randint(3, 100, (2, 5))
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=ids, labels=ids)
    assert torch.is_grad_enabled()
    assert layer._gradient_checkpointing_func is checkpoint_func
    handle.remove()
    assert step(model)[2].records[1] == [False]


def test_save_and_load_keep_truncation(tmp_path, make_llama):
    model, plan = build(make_llama, [2, 3, 5], [[3, 5]])
    save_adapter(model, tmp_path / "adapter")
    assert LoraPlan.load(tmp_path / "adapter").notes[-1] == plan.notes[-1]
    loaded = []
    for truncate in (False, True):
        peft = load_adapter(
            make_llama(layers=LAYERS, seed=0), tmp_path / "adapter", is_trainable=True, truncate_backward=truncate
        )
        peft.train()
        peft.base_model.model.activation_checkpointing_enable()
        loaded.append(peft)
    stock_loss, stock_grads, _ = step(loaded[0])
    loss, grads, seen = step(loaded[1])
    torch.testing.assert_close(loss, stock_loss)
    assert_same_gradients(stock_grads, grads)
    assert seen.records[0] == seen.records[1] == [False] and seen.records[2] == [True]


def test_a_deep_copy_truncates_its_own_layers(make_llama):
    model, _ = build(make_llama, [3, 4, 5], [])
    twin = copy.deepcopy(model)
    loss, grads, seen = step(twin)
    assert seen.records[0] == [False] and seen.records[3] == [True]
    reference_loss, reference_grads, _ = step(model)
    torch.testing.assert_close(loss, reference_loss)
    assert_same_gradients(reference_grads, grads)
    assert remove_truncation(twin) == 4 and step(model)[2].records[0] == [False]
