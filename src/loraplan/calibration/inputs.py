"""What every calibration pass shares: the inputs of a forward, the token each sample is read at, the device, the
modes the model runs in, the progress bar, and the per-batch state the hooks read."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError
from ..layers import LayerStack

__all__ = [
    "BatchState",
    "adapters_disabled",
    "eval_mode",
    "first_tensor",
    "input_device",
    "layer_name",
    "loss_labels",
    "model_inputs",
    "positions",
    "progress_bar",
]


class BatchState:
    """Per-batch state the hooks read."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.batch_number = 0


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "last_hidden_state") and value.last_hidden_state is not None:
        return value.last_hidden_state
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def positions(batch: dict[str, torch.Tensor], pooling: str, last_token: str, pad_id: int) -> torch.Tensor:
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
    return width - 1 - real.flip(dims=[1]).int().argmax(dim=1)


def model_inputs(module: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The keyword arguments of one forward pass of ``module`` over ``batch``: the tokens and mask on ``device``, and
    ``use_cache=False`` where the forward takes it (a pass that only reads representations builds no cache)."""
    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
    }
    params: Any
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


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
        return labels
    return None
