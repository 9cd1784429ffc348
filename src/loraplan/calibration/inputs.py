"""What every calibration pass shares: the inputs of a forward, the token each sample is read at, the device, the
modes the model runs in, the progress bar, and the per-batch state the hooks read."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..data import PIXELS, TOKEN_KEYS, image_token_id
from ..errors import CalibrationError
from ..layers import LayerStack

__all__ = [
    "BatchState",
    "adapters_disabled",
    "batch_rows",
    "capture_output_into",
    "frames_into",
    "eval_mode",
    "extra_inputs",
    "first_tensor",
    "forward_runner",
    "input_device",
    "input_grads",
    "labelled_loss",
    "layer_name",
    "loss_labels",
    "no_loss",
    "model_inputs",
    "never_called",
    "position_inputs_into",
    "positions",
    "progress_bar",
    "reads_positions",
    "shape_of",
    "token_stream",
]


class BatchState:
    """Per-batch state the hooks read."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.batch_number = 0
        #: another stack's output in this pass (the encoder's, which a decoder's cross-attention reads): not a token's
        #: input of this stack
        self.other_stream: torch.Tensor | None = None
        #: the relative position embeddings this batch's attention modules were handed (DeBERTa's `rel_embeddings`,
        #: and their dropout's output when training): what a target module reads through them is not a token's input
        self.position_inputs: list[torch.Tensor] = []
        #: per sample, the positions of a stack that reads no tokens (a speech encoder), as its first layer saw them
        self.frames: list[float] = []


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "last_hidden_state") and value.last_hidden_state is not None:
        return value.last_hidden_state
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def positions(
    batch: dict[str, torch.Tensor], pooling: str, last_token: str, pad_id: int, eos_id: int | None = None
) -> torch.Tensor:
    """The position each sample of ``batch`` is read at: the first token (``pooling="first"``), else the last real
    token as ``last_token`` finds it (``"auto"``: the attention mask's last token, stepping back over a trailing run
    of ``eos_id`` as long as a token is left; ``"mask"``: the attention mask's last token; ``"reference"``: the count
    of tokens that are not ``pad_id``, minus one)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if pooling == "first":
        return torch.zeros(ids.shape[0], dtype=torch.long)
    real = (ids != pad_id) if last_token == "reference" else mask.bool()
    has = real.any(dim=1)
    if not bool(has.all()):
        bad = int((~has).nonzero()[0])
        raise CalibrationError(
            f"calibration sample {bad} of a batch has no real token "
            + (
                "(every token equals the pad/eos id in last_token='reference' mode)"
                if last_token == "reference"
                else ""
            )
            + ". Remove empty samples, or use last_token='mask'."
        )
    if last_token == "reference":
        # the reference's own rule: the count of non-pad tokens minus one, every eos (= pad) masked, also one in the
        # middle of a sample (a chat template's end-of-turn): not the last real position then
        return real.sum(dim=1) - 1
    width = ids.shape[1]
    last = width - 1 - real.flip(dims=[1]).int().argmax(dim=1)
    if last_token == "auto" and eos_id is not None:
        first = real.int().argmax(dim=1)
        for row in range(ids.shape[0]):
            end = int(last[row])
            while end > int(first[row]) and int(ids[row, end]) == eos_id and bool(real[row, end - 1]):
                end -= 1
            last[row] = end
    return last


def token_stream(x: Any, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` as ``(batch, tokens, features)`` when it is the token stream of the batch whose attention mask is
    ``mask`` (also flattened to ``(batch * tokens, features)``), else ``None``: a module called on something else
    (DeBERTa's query and key projections also read the relative position embeddings) is not a token's input."""
    if not isinstance(x, torch.Tensor) or mask is None:
        return None
    if x.dim() == 2 and x.shape[0] == mask.numel():
        x = x.reshape(mask.shape[0], mask.shape[1], -1)
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return None
    return x


def shape_of(value: Any) -> Any:
    """What a call that was not on the token stream was made on, for :func:`never_called`'s message."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def never_called(stack: LayerStack, layer: int, other_shape: Any = None) -> CalibrationError:
    """The error for a layer whose target modules never read the token stream in a calibration forward pass."""
    return CalibrationError(
        f"the target modules of {layer_name(stack, layer)} were never called on the token stream (batch, tokens, "
        "features) in the forward pass"
        + (
            f"; they were called only on a tensor of shape {other_shape}, which is not a token's input"
            if other_shape is not None
            else "; is the layer skipped for these inputs?"
        )
        + ". Set `target_modules` to modules that read the hidden states (e.g. ['query_proj', 'value_proj'])."
    )


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    """How many samples ``batch`` holds (a speech batch has ``input_features`` and ``labels``, no ``input_ids``)."""
    for key in ("input_ids", "labels", "input_features"):
        if key in batch:
            return int(batch[key].shape[0])
    raise CalibrationError(f"a calibration batch with keys {sorted(batch)} has no `input_ids`.")


def frames_into(state: BatchState) -> Any:
    """A pre-hook on the first layer of a stack that reads no tokens (a speech encoder): every position of its input
    counts, so its mask is all ones, and the positions are its samples' token counts."""

    def frames(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = first_tensor(args[0] if args else kwargs.get("hidden_states"))
        if hidden is not None and hidden.dim() == 3:
            state.mask = torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.float32)
            state.frames += [float(hidden.shape[1])] * int(hidden.shape[0])

    return frames


#: the argument through which an attention module is handed relative position embeddings (DeBERTa v1/v2/v3)
RELATIVE_POSITIONS_ARG = "rel_embeddings"


def position_inputs_into(state: BatchState, stack: LayerStack) -> list[Any]:
    """Hooks that record, in ``state``, the relative position embeddings each attention module of ``stack`` is
    handed (its ``rel_embeddings`` argument, and what its ``pos_dropout`` makes of them), so that a target module
    called on them (DeBERTa's ``query_proj`` and ``key_proj`` with ``share_att_key``) is told from one called on the
    tokens by identity, whatever the shapes. Returns the handles."""
    handles = []

    def recorder(at: int) -> Any:  # ``at``: the argument's position in the module's forward
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            value = kwargs.get(RELATIVE_POSITIONS_ARG, args[at] if at < len(args) else None)
            if isinstance(value, torch.Tensor):
                state.position_inputs.append(value)

        return record

    def record_dropped(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            state.position_inputs.append(output)

    for layer in stack.layers:
        for module in layer.modules():
            try:
                names = list(inspect.signature(module.forward).parameters)
            except (TypeError, ValueError):
                continue
            if RELATIVE_POSITIONS_ARG in names:  # the layer, its attention and its inner module pass on one tensor
                at = names.index(RELATIVE_POSITIONS_ARG)
                handles.append(module.register_forward_pre_hook(recorder(at), with_kwargs=True))
                dropout = getattr(module, "pos_dropout", None)
                if isinstance(dropout, nn.Module):
                    handles.append(dropout.register_forward_hook(record_dropped))
    return handles


def reads_positions(x: Any, state: BatchState) -> bool:
    """Whether ``x`` is one of this batch's relative position embeddings, or a view of one (a slice, an unsqueeze)."""
    if not isinstance(x, torch.Tensor) or not state.position_inputs:
        return False
    base = x._base if x._base is not None else x
    return any(base is t or (t._base is not None and base is t._base) for t in state.position_inputs)


def capture_output_into(state: BatchState) -> Any:
    """A forward hook that keeps the output of another stack (an encoder's, which a decoder's cross-attention reads)."""

    def capture(module: nn.Module, args: tuple, output: Any) -> None:
        state.other_stream = first_tensor(output)

    return capture


def extra_inputs(batch: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``batch`` beside its tokens (``pixel_values``, ``image_sizes``, ...): a multimodal batch's."""
    return sorted(k for k in batch if k not in TOKEN_KEYS)


def _named_parameters(module: nn.Module) -> dict[str, Any]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def model_inputs(module: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The keyword arguments of one forward pass of ``module`` over ``batch``: the tokens and mask on ``device``, a
    multimodal batch's other inputs (``pixel_values``, ...; floating ones in the module's dtype), and
    ``use_cache=False`` where the forward takes it (a pass that only reads representations builds no cache)."""
    inputs: dict[str, Any] = {key: batch[key].to(device) for key in ("input_ids", "attention_mask") if key in batch}
    params = _named_parameters(module)
    extras = extra_inputs(batch)
    if extras:
        missing = [k for k in extras if k not in params]
        if missing:
            raise CalibrationError(
                f"the calibration batches carry {missing}, but {type(module).__name__}.forward does not take "
                f"{'it' if len(missing) == 1 else 'them'}: this model cannot read images. Calibrate the "
                "multimodal model itself (e.g. LlavaForConditionalGeneration), or give text-only calibration data."
            )
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        for key in extras:
            value = batch[key]
            floating = dtype is not None and value.is_floating_point()
            inputs[key] = value.to(device=device, dtype=dtype) if floating else value.to(device)
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def forward_runner(base: nn.Module, stack: LayerStack, batch: dict[str, torch.Tensor]) -> nn.Module:
    """The module a forward pass over ``batch`` runs: the stack's backbone, or, for a batch with other inputs than
    tokens (``pixel_values``, ...), the innermost module between ``base`` and the backbone whose forward takes them
    all (LLaVA: the ``LlavaModel`` around the language model, which puts the image features at the image tokens);
    the backbone runs inside it, so its hooks see the same pass."""
    extras = extra_inputs(batch)
    if not extras:
        return stack.backbone
    chain = [base]
    current: Any = base
    for part in stack.path.split(".")[:-1]:
        if current is stack.backbone:
            break
        try:
            current = current[int(part)] if part.isdigit() else getattr(current, part)
        except (AttributeError, IndexError, TypeError):
            break
        chain.append(current)
    if stack.backbone not in chain:
        chain = [base]
    for module in reversed(chain):
        params = _named_parameters(module)
        if all(k in params for k in extras):
            return module
    return base  # model_inputs says what it does not take


def input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run a PEFT-wrapped model as its base model."""
    disable = getattr(model, "disable_adapter", None)
    if callable(disable) and hasattr(model, "peft_config"):
        with disable():
            yield
    else:
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False)


def layer_name(stack: LayerStack, i: int) -> str:
    return f"layer {i} ({stack.path}.{i})"


def loss_labels(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if "labels" in batch:
        return batch["labels"]
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")):
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        token = image_token_id(None, getattr(model, "config", None)) if PIXELS in batch else None
        if token is not None:  # an image's placeholder tokens stand for its features: nothing to predict there
            labels[batch["input_ids"] == token] = -100
        return labels
    return None


def no_loss(model: nn.Module, needs: str) -> CalibrationError:
    """The error for a pass that needs a loss (``needs``: who needs it and why) on a model without one."""
    return CalibrationError(
        f"{needs}, but {type(model).__name__} has no language-modelling head and the calibration batches carry no "
        "`labels`. Pass tokenised batches with `labels`, or calibrate a *ForCausalLM / *ForMaskedLM model."
    )


def labelled_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, needs: str, cannot: str
) -> torch.Tensor:
    """The loss of one forward pass of ``model`` over ``batch`` with its labels (:func:`loss_labels`); a
    :class:`CalibrationError` when there are none (``needs``) or the model returns no loss (``cannot``: what then
    cannot be done). Whether the loss is finite is the caller's to say, where it knows the step."""
    labels = loss_labels(model, batch)
    if labels is None:
        raise no_loss(model, needs)
    inputs = model_inputs(model, batch, device)
    inputs["labels"] = labels.to(device)
    loss = getattr(model(**inputs), "loss", None)
    if loss is None:
        raise CalibrationError(f"{type(model).__name__} returned no loss for labelled calibration batches; {cannot}.")
    return loss


@contextlib.contextmanager
def input_grads(model: nn.Module) -> Iterator[None]:
    """The embedding output requires grad while the block runs: keeps reentrant activation checkpointing from
    dropping the parameter gradients of a backward pass."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None

    def require_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    handle = embeddings.register_forward_hook(require_grad) if embeddings is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
