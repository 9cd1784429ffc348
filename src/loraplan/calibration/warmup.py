"""LoRA-drop's calibration pass (Zhou et al., COLING 2025): a temporary LoRA on every layer, trained briefly on the
calibration batches, then one no-grad pass measuring per sample and layer ``Σ ||ΔW x||²`` (the squared norm of the
LoRA branch's output, summed over the layer's target modules and the sample's non-pad tokens). The temporary adapter
is removed afterwards and the model is left exactly as it was: its modules, parameter values, ``requires_grad``
flags, train/eval modes, ``peft_config`` and, for a model that already carries adapters, their active adapters."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..config import PlanConfig
from ..data import CalibrationBatches
from ..errors import CalibrationError
from .forward import StackPass, start_batch
from .inputs import (
    BatchState,
    batch_rows,
    capture_output_into,
    eval_mode,
    forward_runner,
    frames_into,
    input_device,
    input_grads,
    labelled_loss,
    layer_name,
    loss_labels,
    model_inputs,
    never_called,
    no_loss,
    position_inputs_into,
    progress_bar,
    reads_positions,
    shape_of,
    token_stream,
)

__all__ = ["ADAPTER_NAME", "WARMUP_ALPHA", "WARMUP_LR", "WARMUP_RANK", "lora_drop_pass", "temporary_adapter"]

#: the temporary adapter's name (beside a PEFT model's own adapters)
ADAPTER_NAME = "loraplan_lora_drop"
WARMUP_RANK = 8
WARMUP_ALPHA = 16
#: AdamW's learning rate for the warm-up. The paper trains the all-layer LoRA with the task's ordinary LoRA setting
#: and states no rate of its own for this stage (we found none); 1e-4 is PEFT's and the common LoRA default.
WARMUP_LR = 1e-4

_MISSING = object()


def lora_drop_pass(
    model: nn.Module,
    base: nn.Module,
    passes: list[StackPass],
    data: CalibrationBatches,
    config: PlanConfig,
    progress: bool,
) -> None:
    """Fill ``stats.lora_outputs`` (N, L) and ``stats.meta["lora_drop"]`` of every stack in ``passes`` (one temporary
    adapter over all of them, one warm-up); the model is unchanged afterwards."""
    steps = config.lora_drop_steps if config.lora_drop_steps is not None else len(data.batches)
    if any(loss_labels(base, batch) is None for batch in data.batches):
        raise no_loss(base, _NEEDS)  # before anything is injected
    device = input_device(base)
    owners = [(one, i) for one in passes for i in range(one.stack.num_layers)]  # global layer -> (stack, layer)
    layer_targets = [one.layer_targets[i] for one, i in owners]
    with temporary_adapter(model, base, owners, layer_targets, config.seed) as adapted:
        with eval_mode(model):  # dropout off, as in the gradient pass: the same data gives the same plan
            losses = _warm_up(base, data, adapted, steps, device, progress)
            outputs = _measure(base, passes, owners, data, adapted, device, config, progress)
    start = 0
    for one in passes:
        one.stats.lora_outputs = outputs[:, start : start + one.stack.num_layers]
        start += one.stack.num_layers
        one.stats.meta["lora_drop"] = {
            "steps": steps,
            "rank": WARMUP_RANK,
            "alpha": WARMUP_ALPHA,
            "lr": WARMUP_LR,
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }


def _where(owners: Sequence[tuple[StackPass | None, int]], layer: int) -> str:
    one, index = owners[layer]
    return layer_name(one.stack, index) if one is not None else f"layer {index}"


#: who needs the loss, and what cannot be done without it (the messages of :func:`.inputs.labelled_loss`)
_NEEDS = "the `lora_drop` selector trains a temporary LoRA and needs a loss"
_CANNOT = "the `lora_drop` selector cannot train its temporary LoRA on it"


# -- the temporary adapter ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def temporary_adapter(
    model: nn.Module,
    base: nn.Module,
    owners: Sequence[tuple[StackPass | None, int]],
    layer_targets: list[dict[str, nn.Module]],
    seed: int,
    rank: int = WARMUP_RANK,
) -> Iterator[list[list[nn.Module]]]:
    """Inject a LoRA adapter named :data:`ADAPTER_NAME` on the target modules of every layer, the only active and
    the only trainable adapter; yield, per layer, the LoRA layers carrying it; then remove it and restore the model."""
    from peft import LoraConfig

    temporary = _Temporary(model, base, owners, layer_targets)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        bias="none",
        # full names: exactly the modules the scores read, nothing else with the same leaf name
        target_modules=sorted({temporary.names[id(module)] for _, _, _, module in temporary.sites}),
    )
    try:
        yield temporary.inject(lora_config, seed)
    finally:
        temporary.restore()
    temporary.check_restored()


class _Temporary:
    """Where :func:`temporary_adapter` puts its adapter, and what has to be as it was afterwards."""

    def __init__(
        self,
        model: nn.Module,
        base: nn.Module,
        owners: Sequence[tuple[StackPass | None, int]],
        layer_targets: list[dict[str, nn.Module]],
    ) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.model, self.base, self.owners, self.num_layers = model, base, owners, len(layer_targets)
        self.names = {id(m): n for n, m in base.named_modules()}
        self.sites: list[tuple[int, nn.Module, str, nn.Module]] = []  # (layer, parent, attribute, module there now)
        for layer_number, modules in enumerate(layer_targets):
            for module in modules.values():
                full = self.names.get(id(module))
                if full is None:  # pragma: no cover - the targets come from the stack inside `base`
                    raise CalibrationError(f"a target module of {_where(owners, layer_number)} is not inside the model")
                parent_name, _, attribute = full.rpartition(".")
                parent = base.get_submodule(parent_name) if parent_name else base
                self.sites.append((layer_number, parent, attribute, module))
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and module.merged:
                raise CalibrationError(
                    "selector='lora_drop' adds a temporary adapter beside the model's own, which cannot be done while "
                    "an adapter is merged into the weights. Unmerge it first (`model.unmerge_adapter()`)."
                )
            if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in getattr(module, "lora_A", {}):
                raise CalibrationError(f"the model already has an adapter named {ADAPTER_NAME!r}; remove it first.")

        # what has to be as it was afterwards
        self.structure = [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.adapter_states = [
            (m, list(m.active_adapters), bool(m.disable_adapters))
            for m in model.modules()
            if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        ]
        # PEFT's injection adds its config to a `peft_config` the model already has (a PEFT model's), else sets one
        self.peft_config = base.__dict__.get("peft_config", _MISSING)
        self.peft_entries = list(self.peft_config.items()) if isinstance(self.peft_config, dict) else None
        if self.peft_entries is not None and ADAPTER_NAME in dict(self.peft_entries):
            raise CalibrationError(f"the model already has an adapter named {ADAPTER_NAME!r}; remove it first.")

    def inject(self, lora_config: Any, seed: int) -> list[list[nn.Module]]:
        """Inject the adapter, the only one that runs and trains; per layer, the LoRA layers carrying it."""
        from peft.functional import cast_adapter_dtype, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        base = self.base
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # PEFT's notes on the temporary config (e.g. Conv1D's fan_in_fan_out)
            # the LoRA A matrices are drawn on the CPU generator (then moved): seeded, and the caller's RNG kept
            torch.random.default_generator.manual_seed(seed)
            try:
                inject_adapter_in_model(lora_config, base, adapter_name=ADAPTER_NAME)
            except ValueError as exc:  # PEFT refuses a target on this model (e.g. Mamba's out_proj)
                raise CalibrationError(
                    f"`target_modules`: selector='lora_drop' trains a temporary LoRA on the target modules, and PEFT "
                    f"refuses one of them on {type(base).__name__}: {exc} Set target_modules to modules PEFT can "
                    "give LoRA on this model (the ones your LoraConfig targets)."
                ) from exc
            cast_adapter_dtype(base, adapter_name=ADAPTER_NAME)  # fp16/bf16 weights train a float32 LoRA, as PEFT's
        adapted: list[list[nn.Module]] = [[] for _ in range(self.num_layers)]
        for layer_number, parent, attribute, _ in self.sites:
            wrapper = getattr(parent, attribute)
            if not isinstance(wrapper, BaseTunerLayer) or ADAPTER_NAME not in getattr(wrapper, "lora_A", {}):
                raise CalibrationError(  # pragma: no cover - PEFT matched the full names given
                    f"PEFT did not put the temporary LoRA on {self.names[id(parent)]}.{attribute} in "
                    f"{_where(self.owners, layer_number)}; selector='lora_drop' cannot score this model."
                )
            adapted[layer_number].append(wrapper)
        # only the temporary adapter runs and trains. PEFT's injection made it the only active one on every LoRA
        # layer and switched modules_to_save off; the layers of another adapter type it does not know are switched off
        for module, _, _ in self.adapter_states:
            if isinstance(module, BaseTunerLayer) and not hasattr(module, "lora_A"):
                module.enable_adapters(False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for wrappers in adapted:
            for wrapper in wrappers:
                for p in (*wrapper.lora_A[ADAPTER_NAME].parameters(), *wrapper.lora_B[ADAPTER_NAME].parameters()):
                    p.requires_grad_(True)
        return adapted

    def restore(self) -> None:
        """The model's own adapters active again (the temporary one then is nowhere active), then the temporary one
        gone, and the rest as it was."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module, active, disabled in self.adapter_states:
            module.set_adapter(active)
            module.enable_adapters(not disabled)
        for _, parent, attribute, original in self.sites:
            current = getattr(parent, attribute)
            if current is original:
                if isinstance(current, BaseTunerLayer) and ADAPTER_NAME in getattr(current, "lora_A", {}):
                    current.delete_adapter(ADAPTER_NAME)  # a layer of the model's own adapter
            elif isinstance(current, BaseTunerLayer) and getattr(current, "base_layer", None) is original:
                setattr(parent, attribute, original)  # the wrapper PEFT put around a plain module
        if self.peft_config is _MISSING:
            self.base.__dict__.pop("peft_config", None)
        else:
            self.base.__dict__["peft_config"] = self.peft_config
            if isinstance(self.peft_config, dict) and self.peft_entries is not None:
                self.peft_config.clear()
                self.peft_config.update(self.peft_entries)
        for module, training in self.modes:
            module.training = training
        for p, flag in self.flags:
            p.requires_grad_(flag)

    def check_restored(self) -> None:
        """Refuse a model that :meth:`restore` could not bring back."""
        if [(n, id(m)) for n, m in self.model.named_modules(remove_duplicate=False)] != self.structure:
            raise CalibrationError(  # pragma: no cover - a PEFT release that injects differently
                "the temporary LoRA-drop adapter could not be removed completely; the model's modules changed. Please "
                "report this with your PEFT version."
            )
        for module, active, disabled in self.adapter_states:
            if list(module.active_adapters) != active or bool(module.disable_adapters) != disabled:
                raise CalibrationError(  # pragma: no cover - idem
                    "the model's active adapters could not be restored after the LoRA-drop warm-up. Please report "
                    "this with your PEFT version."
                )


# -- the warm-up and the measurement ------------------------------------------------------------------------------


def _warm_up(
    base: nn.Module,
    data: CalibrationBatches,
    adapted: list[list[nn.Module]],
    steps: int,
    device: torch.device,
    progress: bool,
) -> list[float]:
    """``steps`` AdamW steps on the temporary adapter, one calibration batch each (cycling); the losses."""
    params = [p for wrappers in adapted for w in wrappers for p in w.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=WARMUP_LR)
    batches = data.batches
    losses: list[float] = []
    samples = sum(batch_rows(batches[step % len(batches)]) for step in range(steps))
    bar = progress_bar(samples, "loraplan LoRA-drop warm-up", progress)
    try:
        with torch.enable_grad(), input_grads(base):
            for step in range(steps):
                number = step % len(batches)
                batch = batches[number]
                loss = labelled_loss(base, batch, device, _NEEDS, _CANNOT)
                if not bool(torch.isfinite(loss)):
                    raise CalibrationError(
                        f"the LoRA-drop warm-up loss is not finite at step {step} (calibration batch {number}): "
                        f"{float(loss.detach())}. Check the weights, or calibrate in float32."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.update(batch_rows(batch))
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _measure(
    base: nn.Module,
    passes: list[StackPass],
    owners: list[tuple[StackPass, int]],
    data: CalibrationBatches,
    adapted: list[list[nn.Module]],
    device: torch.device,
    config: PlanConfig,
    progress: bool,
) -> torch.Tensor:
    """Per sample and layer, ``Σ ||ΔW x||²`` over the layer's adapted modules and the sample's tokens: a module that
    reads another stack's output (a decoder's cross-attention keys and values read the encoder's) over that stack's
    tokens."""
    current: list[torch.Tensor | None] = [None] * len(adapted)
    other: dict[int, Any] = {}  # per layer, the shape of a call that was not on the token stream
    handles = _stack_hooks(passes) + _output_hooks(owners, adapted, current, other)
    for one in passes:
        one.other_state = next((p.state for p in passes if p.stack is one.other), one.state)
    rows: list[torch.Tensor] = []
    bar = progress_bar(data.num_samples, "loraplan LoRA-drop outputs", progress)
    try:
        with torch.no_grad():
            for number, batch in enumerate(data.batches):
                count = batch_rows(batch)
                for one in passes:
                    start_batch(one, batch, number, count, device, config, data)
                current[:] = [None] * len(adapted)
                runner = forward_runner(base, passes[0].stack, batch) if len(passes) == 1 else base
                runner(**model_inputs(runner, batch, device))
                rows.append(_block(current, other, owners, number))
                bar.update(count)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        for one in passes:
            one.state.other_stream = None
            one.state.position_inputs.clear()
    return torch.cat(rows)


def _stack_hooks(passes: list[StackPass]) -> list[Any]:
    """The hooks that fill each stack's batch state: position inputs, the other stack's output, the frames."""
    handles = []
    for one in passes:
        handles += position_inputs_into(one.state, one.stack)
        if one.other is not None:
            handles.append(one.other.backbone.register_forward_hook(capture_output_into(one.state)))
        if one.mask_key is None:
            handles.append(
                one.stack.layers[0].register_forward_pre_hook(frames_into(one.state), prepend=True, with_kwargs=True)
            )
    return handles


def _output_hooks(
    owners: list[tuple[StackPass, int]],
    adapted: list[list[nn.Module]],
    current: list[torch.Tensor | None],
    other: dict[int, Any],
) -> list[Any]:
    """The hooks that add each temporary LoRA branch's output to ``current`` (see :func:`_add`)."""
    reads_other: dict[int, bool] = {}  # per LoRA layer, whether this call's input is another stack's output
    reads_pos: dict[int, bool] = {}  # per LoRA layer, whether this call's input is relative position embeddings
    handles = []
    for layer_number, wrappers in enumerate(adapted):
        one = owners[layer_number][0]
        for wrapper in wrappers:
            scaling = float(wrapper.scaling[ADAPTER_NAME])

            def pre(module: nn.Module, args: tuple, _one: StackPass = one) -> None:
                reads_other[id(module)] = bool(args) and args[0] is _one.state.other_stream
                reads_pos[id(module)] = bool(args) and reads_positions(args[0], _one.state)

            # lora_B's output is B A x (dropout is 0); times PEFT's scaling it is the branch's output ΔW x
            def post(
                module: nn.Module,
                args: tuple,
                output: Any,
                _l: int = layer_number,
                _s: float = scaling,
                _w: nn.Module = wrapper,
                _one: StackPass = one,
            ) -> None:
                if reads_pos.get(id(_w)):  # DeBERTa's projection of its relative position embeddings: not counted
                    other[_l] = shape_of(output)
                    return
                state = _one.other_state if reads_other.get(id(_w)) and _one.other_state else _one.state
                _add(current, other, state, _l, output, _s)

            handles.append(wrapper.register_forward_pre_hook(pre))
            handles.append(wrapper.lora_B[ADAPTER_NAME].register_forward_hook(post))
    return handles


def _block(
    current: list[torch.Tensor | None], other: dict[int, Any], owners: list[tuple[StackPass, int]], number: int
) -> torch.Tensor:
    """One batch's sums (samples, layers), refused where a layer's LoRA never ran or an output is not finite."""
    row = []
    for i, value in enumerate(current):
        if value is None:
            one, index = owners[i]
            raise never_called(one.stack, index, other.get(i))
        row.append(value.cpu())
    block = torch.stack(row, dim=1)
    if not bool(torch.isfinite(block).all()):
        bad = int((~torch.isfinite(block)).any(dim=0).nonzero()[0])
        raise CalibrationError(
            f"non-finite LoRA outputs (nan/inf) in {_where(owners, bad)} on calibration batch {number} "
            "after the LoRA-drop warm-up. Check the weights, or calibrate in float32."
        )
    return block


def _add(
    current: list[torch.Tensor | None],
    other: dict[int, Any],
    state: BatchState,
    layer: int,
    output: Any,
    scaling: float,
) -> None:
    """Add one module's ``Σ_tokens ||ΔW x||²`` (per sample) to its layer's sums for the batch."""
    mask = state.mask.to(torch.float64) if state.mask is not None else None
    out = token_stream(output, mask)
    if out is None:  # not a token's output (DeBERTa's projections of its relative position embeddings): not counted
        other[layer] = shape_of(output)
        return
    squares = out.detach().to(torch.float64).square().sum(dim=-1) * (scaling * scaling)
    sums = (squares * mask).sum(dim=1)
    previous = current[layer]
    current[layer] = sums if previous is None else previous + sums
