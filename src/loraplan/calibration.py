"""The calibration pass: one streaming forward pass (plus a backward pass when gradients are asked for).

Forward hooks pool every layer's output to one vector per sample on the fly (last non-pad token for decoders,
first token for encoders) and reduce the inputs of the LoRA target modules to per-sample norm sums, so no
``[batch, tokens, hidden]`` tensor outlives its batch. Statistics are kept in float32/float64 whatever the
model's dtype.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .config import PlanConfig
from .data import CalibrationBatches
from .errors import CalibrationError
from .layers import LayerStack, target_modules_of, unwrap
from .strategies import ACTIVATIONS, GRADIENTS, HIDDEN

logger = logging.getLogger("loraplan")

__all__ = ["CalibrationStats", "calibrate"]


@dataclass
class CalibrationStats:
    """What the calibration pass measured. Strategies read this.

    Attributes:
        num_layers: L.
        hidden: ``L + 1`` float32 tensors of shape (N, d): ``h_0`` (embedding output) .. ``h_L`` (as
            ``output_hidden_states`` returns them), one pooled vector per sample. ``None`` unless asked for.
        activation_sums: (N, L) float64: per sample, the sum over its non-pad tokens of the L2 norm of the target
            modules' inputs, averaged over the modules of the layer. ``None`` unless asked for.
        tokens: (N,) float64 non-pad token counts.
        gradients: (B, L) float64: per calibration batch, the sum over the layer's target modules of
            ``||dLoss/dW||_F``. ``None`` unless asked for.
        batch_index: (N,) batch number of each sample.
        target_names: the target module names (relative to the block) of each layer.
    """

    num_layers: int
    tokens: torch.Tensor
    batch_index: torch.Tensor
    target_names: list[list[str]]
    hidden: list[torch.Tensor] | None = None
    activation_sums: torch.Tensor | None = None
    gradients: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_batches(self) -> int:
        return int(self.batch_index.max().item()) + 1 if self.num_samples else 0

    def subset_batches(self, batches: list[int]) -> CalibrationStats:
        """The statistics of some calibration batches only (used for stability across calibration subsets)."""
        chosen = torch.tensor(sorted(batches), dtype=torch.long)
        rows = torch.isin(self.batch_index, chosen).nonzero().flatten()
        renumber = {int(b): i for i, b in enumerate(chosen.tolist())}
        return CalibrationStats(
            num_layers=self.num_layers,
            tokens=self.tokens[rows],
            batch_index=torch.tensor([renumber[int(b)] for b in self.batch_index[rows]], dtype=torch.long),
            target_names=self.target_names,
            hidden=[h[rows] for h in self.hidden] if self.hidden is not None else None,
            activation_sums=self.activation_sums[rows] if self.activation_sums is not None else None,
            gradients=self.gradients[chosen] if self.gradients is not None else None,
            meta=dict(self.meta),
        )

    def halves(self) -> tuple[CalibrationStats, CalibrationStats] | None:
        """Two disjoint halves (by batch); ``None`` with fewer than two batches."""
        n = self.num_batches
        if n < 2:
            return None
        return self.subset_batches(list(range(n // 2))), self.subset_batches(list(range(n // 2, n)))


class _State:
    """Per-batch state the hooks read."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.batch_number = 0


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "last_hidden_state") and value.last_hidden_state is not None:
        return value.last_hidden_state
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _positions(batch: dict[str, torch.Tensor], pooling: str, last_token: str, pad_id: int) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if pooling == "first":
        return torch.zeros(ids.shape[0], dtype=torch.long)
    real = (ids != pad_id) if last_token == "reference" else mask.bool()
    has = real.any(dim=1)
    if not bool(has.all()):
        bad = int((~has).nonzero()[0])
        raise CalibrationError(
            f"calibration sample {bad} of a batch has no real token "
            + ("(every token equals the pad/eos id in last_token='reference' mode)" if last_token == "reference" else "")
            + ". Remove empty samples, or use last_token='mask'."
        )
    if last_token == "reference":
        # the reference's own rule: the count of non-pad tokens minus one, every eos (= pad) masked, also one in the
        # middle of a sample (a chat template's end-of-turn): not the last real position then
        return real.sum(dim=1) - 1
    width = ids.shape[1]
    return width - 1 - real.flip(dims=[1]).int().argmax(dim=1)


def model_inputs(module: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The keyword arguments of one forward pass of ``module`` over ``batch``: the tokens and mask on ``device``, and
    ``use_cache=False`` where the forward takes it (a pass that only reads representations builds no cache)."""
    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
    }
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run a PEFT-wrapped model as its base model."""
    disable = getattr(model, "disable_adapter", None)
    if callable(disable) and hasattr(model, "peft_config"):
        with disable():
            yield
    else:
        yield


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False)


def _layer_name(stack: LayerStack, i: int) -> str:
    return f"layer {i} ({stack.path}.{i})"


def calibrate(
    model: nn.Module,
    stack: LayerStack,
    data: CalibrationBatches,
    requires: frozenset[str] | set[str],
    config: PlanConfig,
    targets: list[str] | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Run the calibration pass(es) over ``data`` and return the statistics ``requires`` names."""
    base = unwrap(model)
    num_layers = stack.num_layers
    pooling = stack.pooling if config.pooling == "auto" else config.pooling
    layer_targets = [target_modules_of(layer, targets) for layer in stack.layers]
    empty = [i for i, t in enumerate(layer_targets) if not t]
    if (ACTIVATIONS in requires or GRADIENTS in requires) and empty:
        raise CalibrationError(
            f"no LoRA target module found in {_layer_name(stack, empty[0])}"
            + (f" for target_modules={targets}" if targets else "")
            + ". Set `target_modules` to names of linear modules inside the layers (e.g. ['q_proj', 'v_proj'])."
        )
    tokens = torch.tensor(
        [float(m.sum()) for b in data.batches for m in b["attention_mask"]], dtype=torch.float64
    )
    batch_index = torch.tensor(
        [n for n, b in enumerate(data.batches) for _ in range(b["input_ids"].shape[0])], dtype=torch.long
    )
    stats = CalibrationStats(
        num_layers=num_layers,
        tokens=tokens,
        batch_index=batch_index,
        target_names=[sorted(t) for t in layer_targets],
        meta={"pooling": pooling},
    )
    started = time.perf_counter()
    if HIDDEN in requires or ACTIVATIONS in requires:
        _forward_pass(model, base, stack, data, requires, pooling, config, layer_targets, stats, progress)
    if GRADIENTS in requires:
        _gradient_pass(model, base, stack, data, layer_targets, stats, progress)
    stats.meta["seconds"] = round(time.perf_counter() - started, 3)
    return stats


def _forward_pass(
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
    num_layers = stack.num_layers
    state = _State()
    handles = []
    pooled: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]
    act_batches: list[torch.Tensor] = []
    act_current: list[torch.Tensor | None] = [None] * num_layers
    act_calls = [0] * num_layers
    norm_cache: dict[Any, Any] = {}

    def pool(index: int, value: Any) -> None:
        hidden = _first_tensor(value)
        if hidden is None or hidden.dim() != 3:
            raise CalibrationError(
                f"cannot read the hidden state h_{index} of {type(base).__name__}: expected a (batch, tokens, "
                f"hidden) tensor, got {type(value).__name__}. Provide a `loraplan_find_layers` hook for this model."
            )
        vec = hidden[state.rows, state.positions].detach().float()
        if not bool(torch.isfinite(vec).all()):
            where = "the embedding output (input of layer 0)" if index == 0 else f"the output of {_layer_name(stack, index - 1)}"
            raise CalibrationError(
                f"non-finite values (nan/inf) in {where} on calibration batch {state.batch_number}. The model "
                "overflows or is broken in this dtype: check the weights, or calibrate in float32."
            )
        pooled[index].append(vec.cpu())

    if HIDDEN in requires:

        def pre_first(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pool(0, args[0] if args else kwargs.get("hidden_states"))

        handles.append(stack.layers[0].register_forward_pre_hook(pre_first, with_kwargs=True))
        for i in range(num_layers - 1):

            def post(module: nn.Module, args: tuple, output: Any, _i: int = i) -> None:
                pool(_i + 1, output)

            handles.append(stack.layers[i].register_forward_hook(post))

        def post_backbone(module: nn.Module, args: tuple, output: Any) -> None:
            pool(num_layers, output)

        handles.append(stack.backbone.register_forward_hook(post_backbone))

    if ACTIVATIONS in requires:
        for layer_number, modules in enumerate(layer_targets):
            for module in modules.values():

                def pre(module: nn.Module, args: tuple, kwargs: dict, _l: int = layer_number) -> None:
                    x = args[0] if args else next(iter(kwargs.values()))
                    if norm_cache.get("layer") != _l:  # inputs are shared only within a layer (q/k/v, gate/up)
                        norm_cache.clear()
                        norm_cache["layer"] = _l
                    # the cache holds the tensor itself, so its memory cannot be reused by another tensor meanwhile
                    hit = norm_cache.get(id(x))
                    sums = hit[1] if hit is not None and hit[0] is x else None
                    if sums is None:
                        original = x
                        mask = state.mask
                        if x.dim() == 2 and mask is not None and x.shape[0] == mask.numel():
                            x = x.reshape(mask.shape[0], mask.shape[1], -1)
                        if x.dim() != 3 or mask is None or tuple(x.shape[:2]) != tuple(mask.shape):
                            raise CalibrationError(
                                f"cannot read the input of a target module in {_layer_name(stack, _l)}: "
                                f"expected (batch, tokens, features), got shape {tuple(x.shape)}."
                            )
                        norms = torch.linalg.vector_norm(x.detach(), dim=-1, dtype=torch.float32)
                        sums = (norms * mask).sum(dim=1).double()
                        norm_cache[id(original)] = (original, sums)
                    act_calls[_l] += 1
                    act_current[_l] = sums if act_current[_l] is None else act_current[_l] + sums

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    device = _input_device(base)
    runner = stack.backbone
    bar = _progress(data.num_samples, "loraplan calibration", progress)
    try:
        with torch.no_grad(), _eval_mode(model), _adapters_disabled(model):
            for number, batch in enumerate(data.batches):
                state.batch_number = number
                rows = batch["input_ids"].shape[0]
                state.rows = torch.arange(rows, device=device)
                state.positions = _positions(batch, pooling, config.last_token, data.pad_token_id).to(device)
                state.mask = batch["attention_mask"].to(device=device, dtype=torch.float32)
                norm_cache.clear()
                for i in range(num_layers):
                    act_current[i] = None
                    act_calls[i] = 0
                runner(**model_inputs(runner, batch, device))
                if ACTIVATIONS in requires:
                    row = []
                    for i in range(num_layers):
                        if act_current[i] is None:
                            raise CalibrationError(
                                f"the target modules of {_layer_name(stack, i)} were never called in the forward "
                                "pass; is the layer skipped for these inputs?"
                            )
                        row.append((act_current[i] / act_calls[i]).cpu())
                    block = torch.stack(row, dim=1)
                    if not bool(torch.isfinite(block).all()):
                        bad = int((~torch.isfinite(block)).any(dim=0).nonzero()[0])
                        raise CalibrationError(
                            f"non-finite values (nan/inf) in the inputs of the target modules of "
                            f"{_layer_name(stack, bad)} on calibration batch {number}. Check the weights, or "
                            "calibrate in float32."
                        )
                    act_batches.append(block)
                bar.update(rows)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        norm_cache.clear()
    if HIDDEN in requires:
        stats.hidden = [torch.cat(chunks) for chunks in pooled]
    if ACTIVATIONS in requires:
        stats.activation_sums = torch.cat(act_batches)


def _loss_labels(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if "labels" in batch:
        return batch["labels"]
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")):
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        return labels
    return None


def _gradient_pass(
    model: nn.Module,
    base: nn.Module,
    stack: LayerStack,
    data: CalibrationBatches,
    layer_targets: list[dict[str, nn.Module]],
    stats: CalibrationStats,
    progress: bool,
) -> None:
    weights: list[list[nn.Parameter]] = []
    for modules in layer_targets:
        found = []
        for module in modules.values():
            inner = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            found.append(inner.weight)
        weights.append(found)
    every = [p for ws in weights for p in ws]
    saved_flags = {id(p): p.requires_grad for p in base.parameters()}
    saved_grads = {id(p): p.grad for p in every}
    device = _input_device(base)
    norms: list[torch.Tensor] = []
    bar = _progress(data.num_samples, "loraplan gradient scores", progress)
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None

    def require_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # keeps reentrant activation checkpointing from dropping parameter gradients
        output.requires_grad_(True)

    handle = embeddings.register_forward_hook(require_grad) if embeddings is not None else None
    try:
        for p in base.parameters():
            p.requires_grad_(False)
        for p in every:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad(), _eval_mode(model), _adapters_disabled(model):
            for number, batch in enumerate(data.batches):
                labels = _loss_labels(base, batch)
                if labels is None:
                    raise CalibrationError(
                        f"the `gradient` selector needs a loss, but {type(base).__name__} has no language-modelling "
                        "head and the calibration batches carry no `labels`. Pass tokenised batches with `labels`, "
                        "or calibrate a *ForCausalLM / *ForMaskedLM model."
                    )
                inputs = model_inputs(base, batch, device)
                inputs["labels"] = labels.to(device)
                out = base(**inputs)
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise CalibrationError(
                        f"{type(base).__name__} returned no loss for labelled calibration batches; the `gradient` "
                        "selector cannot score it."
                    )
                if not bool(torch.isfinite(loss)):
                    raise CalibrationError(f"the calibration loss is not finite on batch {number}: {float(loss)}")
                loss.backward()
                row = []
                for layer_number, ws in enumerate(weights):
                    total = 0.0
                    for w in ws:
                        if w.grad is not None:
                            total += float(w.grad.detach().float().norm())
                            w.grad = None
                    if not math.isfinite(total):
                        raise CalibrationError(
                            f"non-finite gradient in the target modules of {_layer_name(stack, layer_number)} on "
                            f"calibration batch {number}."
                        )
                    row.append(total)
                norms.append(torch.tensor(row, dtype=torch.float64))
                bar.update(batch["input_ids"].shape[0])
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
        for p in base.parameters():
            p.requires_grad_(saved_flags.get(id(p), p.requires_grad))
        for p in every:
            p.grad = saved_grads[id(p)]
    stats.gradients = torch.stack(norms)
