"""Truncated backward: the layers below the lowest adapted layer run without autograd and without checkpointing.

Nothing below the lowest LoRA layer needs a gradient, but trainers make the embedding output require grad
(``activation_checkpointing_enable`` calls ``enable_input_require_grads``, and so does TRL), so autograd records,
recomputes and back-propagates every layer. Here each layer below the cut gets a forward pre-hook that switches
autograd off for its own call and, when activation checkpointing is on for it, calls its forward directly instead
of through the checkpoint function (the layer's own cache handling still runs); a forward hook (``always_call``)
restores both, also when the forward raises. The decision is taken at every call, so checkpointing or input grads
enabled after the plan was applied (``Trainer.train``, TRL, Axolotl) change nothing.

It is exact: a layer is run without autograd only when no parameter of its own requires grad and none of its
tensor inputs depends on a trainable parameter (the input's autograd graph is searched for one). Otherwise it runs
as stock PEFT runs it, and the first time that happens a warning says why. A requires-grad leaf that is not a
parameter, such as the embedding output that ``enable_input_require_grads`` marks, is not a reason to record: no
parameter gets a gradient through it. Its own gradient is then not computed (nothing in training reads it).

Reentrant checkpointing (``use_reentrant=True``, DeepSpeed's or other custom checkpoint functions) gives the
parameters of a checkpointed layer gradients only if one of its inputs requires grad, so the lowest adapted layer
gets a pre-hook too: when it is about to be checkpointed with anything but torch's non-reentrant checkpoint, its
hidden-state input becomes a detached leaf that requires grad.

The hooks are module-level functions and their state lives on the layers, so a deep copy of the model carries
working hooks; :func:`remove_truncation` takes them off again.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layers import LayerStack, find_layers, stack_at, unwrap

if TYPE_CHECKING:
    pass

logger = logging.getLogger("loraplan")

__all__ = [
    "LAYER_STATE",
    "MODEL_RESULT",
    "NOTE_PREFIX",
    "Truncation",
    "disable_truncation",
    "install_truncation",
    "is_non_reentrant",
    "is_torch_checkpoint",
    "remove_truncation",
    "truncation_blockers",
    "truncation_of",
    "truncations_of",
]

#: attribute on each hooked layer holding its :class:`_LayerState` (a timed copy of a layer drops it: cost/timing.py)
LAYER_STATE = "_loraplan_truncation"
#: attribute on the model holding the :class:`Truncation` last installed (:func:`truncation_of`)
MODEL_RESULT = "loraplan_truncation"
#: how many autograd nodes to search above a layer input before assuming it depends on a trainable parameter
_GRAPH_LIMIT = 10_000
_MISSING = object()
#: prefix of the plan note apply_plan writes (replaced, never duplicated, when the plan is applied again)
NOTE_PREFIX = "backward truncation:"


@dataclass
class Truncation:
    """What :func:`install_truncation` did.

    Attributes:
        lowest: the lowest adapted layer (the cut); layers ``0..lowest-1`` are the ones truncated.
        active: whether hooks were installed.
        reason: why not, when ``active`` is false.
        path: the layer stack it was installed on (what :func:`remove_truncation` takes off again).
    """

    lowest: int
    active: bool
    reason: str = ""
    path: str = ""
    #: the stack's name in an encoder-decoder model's plan ("encoder", "decoder"); empty for one stack
    name: str = ""
    #: layers in the stack (a stack without LoRA runs every one of them without autograd: ``lowest`` is this)
    size: int = 0

    @property
    def layers(self) -> list[int]:
        return list(range(self.lowest)) if self.active else []

    def note(self) -> str:
        """One line for the plan's notes and the log."""
        where = f" {self.name} stack (`{self.path}`):" if self.name else ""
        if self.active and self.size and self.lowest >= self.size:
            return (
                f"{NOTE_PREFIX}{where} every layer runs without autograd and without activation checkpointing (no "
                "LoRA in this stack); turn off with apply_plan(..., truncate_backward=False)."
            )
        if self.active:
            last = self.lowest - 1
            span = "layer 0" if last == 0 else f"layers 0-{last}"
            return (
                f"{NOTE_PREFIX}{where} {span} (below the lowest adapted layer {self.lowest}) run without autograd and "
                "without activation checkpointing; turn off with apply_plan(..., truncate_backward=False)."
            )
        return f"{NOTE_PREFIX}{where} off: {self.reason}"


@dataclass
class _Shared:
    """State shared by the hooked layers of one model."""

    lowest: int
    warned: bool = False


@dataclass
class _LayerState:
    role: str  # "below" or "boundary"
    index: int
    shared: _Shared
    #: one entry per call in progress: None (not truncated) or the checkpoint function to restore
    calls: list = field(default_factory=list)


# -- the hooks ----------------------------------------------------------------------------------------------------


def _call_directly(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for a layer's checkpoint function while the layer runs without autograd."""
    return function(*args, **kwargs)


def _tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 3:
        return []
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v, depth + 1)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v, depth + 1)]
    return []


def _reaches_parameter(tensor: torch.Tensor) -> bool:
    """Whether a gradient of ``tensor`` would reach a trainable parameter (conservatively true past the limit)."""
    if isinstance(tensor, nn.Parameter):
        return tensor.requires_grad
    if tensor.grad_fn is None:
        return False
    seen: set[int] = set()
    todo = [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _GRAPH_LIMIT:
            return True
        variable = getattr(node, "variable", None)
        if variable is not None and isinstance(variable, nn.Parameter):
            return True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


def _why_record(module: nn.Module, state: _LayerState, args: tuple, kwargs: dict) -> str | None:
    """Why this layer must run with autograd, or None when it can run without."""
    for name, param in module.named_parameters():
        if param.requires_grad:
            return f"layer {state.index} has a trainable parameter ({name})"
    for tensor in _tensors(args) + _tensors(kwargs):
        if tensor.requires_grad and _reaches_parameter(tensor):
            return f"the input of layer {state.index} depends on a trainable parameter"
    return None


def _below_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state: _LayerState | None = module.__dict__.get(LAYER_STATE)
    if state is None:
        return None
    if not torch.is_grad_enabled():
        state.calls.append(None)
        return None
    reason = _why_record(module, state, args, kwargs)
    if reason is not None:
        state.calls.append(None)
        if not state.shared.warned:
            state.shared.warned = True
            logger.warning(
                "loraplan: backward truncation does not apply to this forward pass: %s, so layers below the lowest "
                "adapted layer %d run with autograd, as with stock PEFT (exact, but slower). Make nothing below "
                "layer %d trainable, or turn truncation off with apply_plan(..., truncate_backward=False).",
                reason,
                state.shared.lowest,
                state.shared.lowest,
            )
        return None
    previous = _MISSING
    if getattr(module, "gradient_checkpointing", False):
        previous = module.__dict__.get("_gradient_checkpointing_func", _MISSING)
        module.__dict__["_gradient_checkpointing_func"] = _call_directly
    state.calls.append((previous,))
    torch.set_grad_enabled(False)
    return None


def _below_post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    state: _LayerState | None = module.__dict__.get(LAYER_STATE)
    if state is None or not state.calls:
        return None
    entry = state.calls.pop()
    if entry is None:
        return None
    torch.set_grad_enabled(True)
    (previous,) = entry
    if module.__dict__.get("_gradient_checkpointing_func") is _call_directly:
        if previous is _MISSING:
            del module.__dict__["_gradient_checkpointing_func"]
        else:
            module.__dict__["_gradient_checkpointing_func"] = previous
    return None


def is_torch_checkpoint(fn: Any) -> bool:
    """Whether ``fn`` (a checkpoint function, unwrapped from its ``functools.partial``) is torch's own checkpoint,
    also as transformers wraps it for ``offload=True`` (a local ``checkpoint_func`` in ``modeling_utils``)."""
    import torch.utils.checkpoint as tuc

    if fn is tuc.checkpoint:
        return True
    return (
        getattr(fn, "__name__", "") == "checkpoint_func"
        and getattr(fn, "__module__", "") == "transformers.modeling_utils"
    )


def is_non_reentrant(fn: Any) -> bool:
    """Whether a layer's checkpoint function is torch's checkpoint with ``use_reentrant=False`` (as transformers
    builds it: a ``functools.partial``, possibly around its offloading ``checkpoint_func``)."""
    if not isinstance(fn, functools.partial):
        return False
    return is_torch_checkpoint(fn.func) and fn.keywords.get("use_reentrant") is False


def _boundary_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    if LAYER_STATE not in module.__dict__ or not torch.is_grad_enabled():
        return None
    if not (getattr(module, "gradient_checkpointing", False) and module.training):
        return None
    if is_non_reentrant(getattr(module, "_gradient_checkpointing_func", None)):
        return None
    if args and isinstance(args[0], torch.Tensor):
        if args[0].requires_grad or not args[0].is_floating_point():
            return None
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
        return args, {**kwargs, "hidden_states": hidden.detach().requires_grad_(True)}
    return None


# -- install / remove ---------------------------------------------------------------------------------------------

_OUR_PRE_HOOKS = (_below_pre_hook, _boundary_pre_hook)


def _strip(module: nn.Module) -> bool:
    """Take loraplan's hooks and state off one layer. Returns whether there were any."""
    found = module.__dict__.pop(LAYER_STATE, None) is not None
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook in _OUR_PRE_HOOKS:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            found = True
    for key, hook in list(module._forward_hooks.items()):
        if hook is _below_post_hook:
            del module._forward_hooks[key]
            module._forward_hooks_always_called.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
            found = True
    if module.__dict__.get("_gradient_checkpointing_func") is _call_directly:  # removed mid-call
        del module.__dict__["_gradient_checkpointing_func"]
    return found


def remove_truncation(model: nn.Module, stack: LayerStack | None = None) -> int:
    """Undo :func:`install_truncation` (on ``stack``, or on every stack it was installed on): every layer runs as
    stock PEFT runs it. Returns the number of layers that had hooks. Works on the PEFT model, its base model, or a
    model merged with ``merge_and_unload``."""
    base = unwrap(model)
    recorded: dict[str, Truncation] = base.__dict__.get(MODEL_RESULT) or {}
    if stack is not None:
        stacks = [stack]
    elif recorded:
        stacks = [stack_at(model, path) for path in recorded if path]
    else:
        stacks = [find_layers(model)]
    removed = sum(_strip(layer) for one in stacks for layer in one.layers)
    for one in stacks:
        recorded.pop(one.path, None)
    if not recorded:
        base.__dict__.pop(MODEL_RESULT, None)
        model.__dict__.pop(MODEL_RESULT, None)
    return removed


def _input_embeddings(base: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        embeddings = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if embeddings is None:
        return []
    return [(name, module) for name, module in base.named_modules() if module is embeddings]


def truncation_blockers(model: nn.Module, lowest: int, stack: LayerStack | None = None) -> list[str]:
    """Trainable parameters below layer ``lowest`` (in the layers under it or in the input embeddings, e.g.
    embeddings in ``modules_to_save`` or trainable tokens). Any of them makes truncation inexact."""
    base = unwrap(model)
    stack = stack if stack is not None else find_layers(base)
    found = []
    for index in range(lowest):
        for name, param in stack.layers[index].named_parameters():
            if param.requires_grad:
                found.append(f"{stack.path}.{index}.{name}")
    for prefix, module in _input_embeddings(base):
        for name, param in module.named_parameters():
            if param.requires_grad:
                found.append(f"{prefix}.{name}" if prefix else name)
    return found


def install_truncation(model: nn.Module, lowest: int, stack: LayerStack | None = None, name: str = "") -> Truncation:
    """Run layers ``0..lowest-1`` of ``model``'s ``stack`` without autograd and without checkpointing (see the module
    docstring); ``lowest`` may be the stack's size (a stack without LoRA: all of it). Replaces an earlier installation
    on that stack. Left off, with the reason, when ``lowest`` is 0 or something below it is trainable. ``name``: the
    stack's name in an encoder-decoder model's plan."""
    base = unwrap(model)
    stack = stack if stack is not None else find_layers(base)
    remove_truncation(model, stack)
    if lowest <= 0:
        result = Truncation(lowest, False, "the lowest adapted layer is layer 0, so there is nothing below it to skip")
    elif blockers := truncation_blockers(base, lowest, stack):
        shown = ", ".join(blockers[:3]) + (f" and {len(blockers) - 3} more" if len(blockers) > 3 else "")
        result = Truncation(
            lowest,
            False,
            f"trainable parameters below layer {lowest} ({shown}) need the backward pass through the layers under "
            "it (e.g. embeddings in modules_to_save, trainable tokens), so every layer is back-propagated as with "
            "stock PEFT",
        )
        logger.warning("loraplan: %s", result.note())
    else:
        shared = _Shared(lowest=lowest)
        for index in range(lowest):
            layer = stack.layers[index]
            layer.__dict__[LAYER_STATE] = _LayerState("below", index, shared)
            layer.register_forward_pre_hook(_below_pre_hook, with_kwargs=True)
            layer.register_forward_hook(_below_post_hook, always_call=True)
        if lowest < stack.num_layers:  # a stack without LoRA has no boundary: nothing in it needs a gradient
            boundary = stack.layers[lowest]
            boundary.__dict__[LAYER_STATE] = _LayerState("boundary", lowest, shared)
            boundary.register_forward_pre_hook(_boundary_pre_hook, with_kwargs=True)
        result = Truncation(lowest, True)
    return _record(base, result, stack, name)


def _record(base: nn.Module, result: Truncation, stack: LayerStack, name: str) -> Truncation:
    result.path, result.name, result.size = stack.path, name, stack.num_layers
    base.__dict__.setdefault(MODEL_RESULT, {})[stack.path] = result
    return result


def truncations_of(model: nn.Module) -> list[Truncation]:
    """What :func:`install_truncation` last did on each stack of ``model`` (an encoder-decoder model: two)."""
    return list((unwrap(model).__dict__.get(MODEL_RESULT) or {}).values())


def truncation_of(model: nn.Module) -> Truncation | None:
    """What :func:`install_truncation` last did on ``model`` (``None`` if never); for an encoder-decoder model, on
    its first stack (all of them: :func:`truncations_of`)."""
    found = truncations_of(model)
    return found[0] if found else None


def disable_truncation(
    model: nn.Module, lowest: int, stack: LayerStack | None = None, name: str = "", reason: str = ""
) -> Truncation:
    """Remove any truncation (on ``stack``) and record that it is off and why (what :func:`truncation_of`
    returns); ``reason`` defaults to it having been turned off on purpose."""
    base = unwrap(model)
    stack = stack if stack is not None else find_layers(base)
    remove_truncation(model, stack)
    why = reason or "turned off (truncate_backward=False); every layer is back-propagated as with stock PEFT"
    return _record(base, Truncation(lowest, False, why), stack, name)
