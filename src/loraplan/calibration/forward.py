"""The forward calibration pass: pooled hidden states and target-module input norms, collected by hooks in one
streaming pass, so no ``[batch, tokens, hidden]`` tensor outlives its batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import PlanConfig
from ..data import CalibrationBatches
from ..errors import CalibrationError
from ..layers import LayerStack
from .inputs import (
    BatchState,
    adapters_disabled,
    batch_rows,
    capture_output_into,
    eval_mode,
    first_tensor,
    forward_runner,
    frames_into,
    input_device,
    layer_name,
    model_inputs,
    never_called,
    position_inputs_into,
    positions,
    progress_bar,
    reads_positions,
    shape_of,
    token_stream,
)
from .stats import ACTIVATIONS, HIDDEN, CalibrationStats

__all__ = ["StackPass", "forward_pass", "forward_passes"]


@dataclass
class StackPass:
    """One layer stack of a calibration forward pass: where its statistics go, and which batch keys are its tokens.

    An encoder-decoder model is calibrated in one pass with two of these: the encoder reads ``input_ids`` and
    ``attention_mask`` (Whisper's reads ``input_features``: ``ids_key`` and ``mask_key`` are then ``None`` and every
    frame counts), the decoder ``decoder_input_ids`` and ``decoder_attention_mask``; a decoder stack's modules that read
    the encoder's output (cross-attention keys and values, the same tensor in every layer) are not its tokens'
    inputs and are not counted (``other`` is that stack, whose output is captured)."""

    stack: LayerStack
    stats: CalibrationStats
    layer_targets: list[dict[str, nn.Module]]
    pooling: str
    ids_key: str | None = "input_ids"
    mask_key: str | None = "attention_mask"
    other: LayerStack | None = None
    state: BatchState = field(default_factory=BatchState)
    #: the state of the stack ``other`` is (its mask weighs a module that reads that stack's output)
    other_state: BatchState | None = None


def forward_pass(
    model: nn.Module,
    base: nn.Module,
    stack: LayerStack,
    data: CalibrationBatches,
    requires: frozenset[str] | set[str],
    pooling: str,
    config: PlanConfig,
    layer_targets: list[dict[str, nn.Module]],
    stats: CalibrationStats,
    progress: bool,
) -> None:
    """One stack's statistics (:func:`forward_passes` with one :class:`StackPass`)."""
    forward_passes(model, base, [StackPass(stack, stats, layer_targets, pooling)], data, requires, config, progress)


def forward_passes(
    model: nn.Module,
    base: nn.Module,
    passes: list[StackPass],
    data: CalibrationBatches,
    requires: frozenset[str] | set[str],
    config: PlanConfig,
    progress: bool,
) -> None:
    """Pooled hidden states and target-module input norms of every stack in ``passes``, in one streaming pass."""
    collectors: list[list[_HiddenStates | _ActivationNorms]] = []
    handles: list[Any] = []
    for one in passes:
        hidden = _HiddenStates(base, one.stack, one.state, one.pooling) if HIDDEN in requires else None
        activations = _ActivationNorms(one.stack, one.layer_targets, one.state) if ACTIVATIONS in requires else None
        collectors.append([c for c in (hidden, activations) if c is not None])
        handles += [handle for collector in collectors[-1] for handle in collector.install()]
        if one.other is not None:
            handles.append(one.other.backbone.register_forward_hook(capture_output_into(one.state)))
        handles += position_inputs_into(one.state, one.stack)
        if one.mask_key is None:  # before the collectors' hooks: they read the mask
            handles.append(
                one.stack.layers[0].register_forward_pre_hook(frames_into(one.state), prepend=True, with_kwargs=True)
            )
    device = input_device(base)
    bar = progress_bar(data.num_samples, "loraplan calibration", progress)
    read: list[list[torch.Tensor]] = [[] for _ in passes]  # the token each sample is read at
    try:
        with torch.no_grad(), eval_mode(model), adapters_disabled(model):
            for number, batch in enumerate(data.batches):
                rows = batch_rows(batch)
                for one, tokens in zip(passes, read):
                    start_batch(one, batch, number, rows, device, config, data)
                    if one.state.positions is not None and one.ids_key is not None:
                        tokens.append(batch[one.ids_key][torch.arange(rows), one.state.positions.cpu()])
                for group in collectors:
                    for collector in group:
                        collector.start_batch()
                if len(passes) == 1:
                    runner = forward_runner(base, passes[0].stack, batch)  # the backbone, or what reads the images
                else:
                    runner = base  # an encoder-decoder model: one forward runs both stacks
                runner(**model_inputs(runner, batch, device))
                for group in collectors:
                    for collector in group:
                        collector.end_batch(number)
                bar.update(rows)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        for group in collectors:
            for collector in group:
                if isinstance(collector, _ActivationNorms):
                    collector.norm_cache.clear()
        for one in passes:
            one.state.other_stream = None
            one.state.position_inputs.clear()
    for one, group, tokens in zip(passes, collectors, read):
        stats = one.stats
        stats.meta.update(last_token=config.last_token, eos_token_id=data.eos_token_id)
        for collector in group:
            if isinstance(collector, _HiddenStates):
                stats.hidden = [torch.cat(chunks) for chunks in collector.pooled]
                stats.read_tokens = torch.cat(tokens) if tokens else None
            else:
                stats.activation_sums = torch.cat(collector.batches)


def start_batch(
    one: StackPass,
    batch: dict[str, torch.Tensor],
    number: int,
    rows: int,
    device: torch.device,
    config: PlanConfig,
    data: CalibrationBatches,
) -> None:
    """The per-batch state of one stack: its rows, its mask (set by its first layer where the stack reads no tokens)
    and the position each sample is read at (none for mean pooling)."""
    state = one.state
    state.batch_number = number
    state.rows = torch.arange(rows, device=device)
    state.mask = None
    state.positions = None
    state.other_stream = None
    state.position_inputs.clear()
    if one.mask_key is None:
        return
    mask = batch[one.mask_key]
    state.mask = mask.to(device=device, dtype=torch.float32)
    if one.pooling != "mean" and one.ids_key is not None:
        view = {"input_ids": batch[one.ids_key], "attention_mask": mask}
        state.positions = positions(view, one.pooling, config.last_token, data.pad_token_id, data.eos_token_id).to(
            device
        )


class _HiddenStates:
    """``h_0`` .. ``h_L`` pooled to one vector per sample: ``h_0`` is layer 0's input, ``h_i`` layer ``i-1``'s
    output, ``h_L`` the backbone's (after its final norm, as ``output_hidden_states`` gives it)."""

    def __init__(self, base: nn.Module, stack: LayerStack, state: BatchState, pooling: str = "last") -> None:
        self.base, self.stack, self.state, self.pooling = base, stack, state, pooling
        self.pooled: list[list[torch.Tensor]] = [[] for _ in range(stack.num_layers + 1)]

    def install(self) -> list[Any]:
        stack = self.stack

        def pre_first(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.pool(0, args[0] if args else kwargs.get("hidden_states"))

        handles = [stack.layers[0].register_forward_pre_hook(pre_first, with_kwargs=True)]
        for i in range(stack.num_layers - 1):

            def post(module: nn.Module, args: tuple, output: Any, _i: int = i) -> None:
                self.pool(_i + 1, output)

            handles.append(stack.layers[i].register_forward_hook(post))

        def post_backbone(module: nn.Module, args: tuple, output: Any) -> None:
            self.pool(stack.num_layers, output)

        handles.append(stack.backbone.register_forward_hook(post_backbone))
        return handles

    def pool(self, index: int, value: Any) -> None:
        hidden = first_tensor(value)
        if hidden is None or hidden.dim() != 3:
            raise CalibrationError(
                f"cannot read the hidden state h_{index} of {type(self.base).__name__}: expected a (batch, tokens, "
                f"hidden) tensor, got {type(value).__name__}. Provide a `loraplan_find_layers` hook for this model."
            )
        state = self.state
        if self.pooling == "mean":
            mask = state.mask if state.mask is not None else torch.ones(hidden.shape[:2])
            weights = mask.to(device=hidden.device, dtype=torch.float32)[..., None]
            vec = (hidden.detach().float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        else:
            vec = hidden[state.rows, state.positions].detach().float()
        if not bool(torch.isfinite(vec).all()):
            where = (
                "the embedding output (input of layer 0)"
                if index == 0
                else f"the output of {layer_name(self.stack, index - 1)}"
            )
            raise CalibrationError(
                f"non-finite values (nan/inf) in {where} on calibration batch {state.batch_number}. The model "
                "overflows or is broken in this dtype: check the weights, or calibrate in float32."
            )
        self.pooled[index].append(vec.cpu())

    def start_batch(self) -> None:
        pass

    def end_batch(self, number: int) -> None:
        pass


class _ActivationNorms:
    """Per sample and layer: the mean over the layer's target modules of the summed (over real tokens) L2 norms of
    each module's input. Modules of one layer that read the same tensor (q/k/v, gate/up) compute its norms once."""

    def __init__(self, stack: LayerStack, layer_targets: list[dict[str, nn.Module]], state: BatchState) -> None:
        self.stack, self.layer_targets, self.state = stack, layer_targets, state
        num_layers = stack.num_layers
        self.batches: list[torch.Tensor] = []
        self.current: list[torch.Tensor | None] = [None] * num_layers
        self.calls = [0] * num_layers
        self.norm_cache: dict[Any, Any] = {}
        #: per layer, the shape of a call that was not on the token stream (for the error when no call was)
        self.other_shapes: dict[int, Any] = {}

    def install(self) -> list[Any]:
        handles = []
        for layer_number, modules in enumerate(self.layer_targets):
            for module in modules.values():

                def pre(module: nn.Module, args: tuple, kwargs: dict, _l: int = layer_number) -> None:
                    self.add(_l, args[0] if args else next(iter(kwargs.values())))

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        return handles

    def add(self, layer: int, x: torch.Tensor) -> None:
        cache = self.norm_cache
        if cache.get("layer") != layer:  # inputs are shared only within a layer (q/k/v, gate/up)
            cache.clear()
            cache["layer"] = layer
        # the cache holds the tensor itself, so its memory cannot be reused by another tensor meanwhile
        hit = cache.get(id(x))
        sums = hit[1] if hit is not None and hit[0] is x else None
        if sums is None:
            elsewhere = x is self.state.other_stream or reads_positions(x, self.state)
            stream = None if elsewhere else token_stream(x, self.state.mask)
            if stream is None:  # not a token's input (e.g. relative position embeddings): not counted
                self.other_shapes[layer] = shape_of(x)
                return
            norms = torch.linalg.vector_norm(stream.detach(), dim=-1, dtype=torch.float32)
            sums = (norms * self.state.mask).sum(dim=1).double()
            cache[id(x)] = (x, sums)
        self.calls[layer] += 1
        current = self.current[layer]
        self.current[layer] = sums if current is None else current + sums

    def start_batch(self) -> None:
        self.norm_cache.clear()
        for i in range(self.stack.num_layers):
            self.current[i] = None
            self.calls[i] = 0

    def end_batch(self, number: int) -> None:
        row = []
        for i, current in enumerate(self.current):
            if current is None:
                raise never_called(self.stack, i, self.other_shapes.get(i))
            row.append((current / self.calls[i]).cpu())
        block = torch.stack(row, dim=1)
        if not bool(torch.isfinite(block).all()):
            bad = int((~torch.isfinite(block)).any(dim=0).nonzero()[0])
            raise CalibrationError(
                f"non-finite values (nan/inf) in the inputs of the target modules of "
                f"{layer_name(self.stack, bad)} on calibration batch {number}. Check the weights, or "
                "calibrate in float32."
            )
        self.batches.append(block)
