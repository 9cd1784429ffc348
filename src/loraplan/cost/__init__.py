"""The cost model: what a plan costs per training step, in time and peak memory, relative to LoRA on every layer.

A step is the forward and backward pass of every layer, the output head with its loss, and the optimizer step. What
one layer costs depends on its *regime*:

==================  ============================================================================================
``skip``            forward without autograd (below the lowest adapted layer with loraplan's truncation, or with
                    stock PEFT when nothing makes the embedding output require grad)
``frozen``          forward recorded and backward to its input, no LoRA (a layer without LoRA above the lowest
                    adapted layer, or any layer of stock PEFT once input grads are on)
``lora``            forward and backward of a layer with LoRA on the target modules
``lora_first``      the same for the lowest adapted layer when nothing below needs a gradient (no input gradient)
``*_ckpt``          the same under torch's non-reentrant activation checkpointing (the forward runs twice)
==================  ============================================================================================

Costs come from FLOP counts (``source="flops"``: deterministic, from the module shapes alone), from timing one
layer of the model in each regime, and the head, on the model's own device (``source="timed"``: a few forward and
backward passes of a copy of layer 0, so the model itself is not touched), or from whole-model training steps of
three layouts timed on the device and fitted to ``t = F + c_lora n_lora + c_bp n_bp`` (``source="fitted"``, the
one that holds on a GPU, where a LoRA module costs far more than its FLOPs). Peak memory is the weights, the LoRA
parameters with their gradients and AdamW state, and the tensors autograd saves: per recorded layer, per
checkpointed layer (its input), for the head, plus the larger of the logits' gradient and (under checkpointing) one
layer's recomputation; estimated from shapes with ``flops``, measured (bytes of saved tensors of one layer) with
``timed``.

The pieces: :mod:`.prediction` (the regimes and the arithmetic over :class:`LayerCosts`, nothing touches a model),
:mod:`.flops` (costs from module shapes), :mod:`.timing` (costs measured on a copy of layer 0) and :mod:`.fitted`
(costs fitted from timed whole-model steps). Choosing layers within a budget is :mod:`loraplan.allocation`'s.
"""

from .._removed import removed
from .fitted import fit_step_costs, fitted_costs
from .flops import flop_costs
from .prediction import (
    LORA_TRAIN_BYTES,
    REGIMES,
    LayerCosts,
    Prediction,
    _fmt_ratio,
    predict,
    predictions,
    regimes,
    relative,
)
from .timing import capture_layer_inputs, costs_for, measure_costs

__all__ = [
    "LORA_TRAIN_BYTES",
    "REGIMES",
    "LayerCosts",
    "Prediction",
    "capture_layer_inputs",
    "costs_for",
    "fit_step_costs",
    "fitted_costs",
    "flop_costs",
    "measure_costs",
    "predict",
    "predictions",
    "regimes",
    "relative",
]

#: select_within_budget moved to :mod:`loraplan.allocation` (the budget search decides what trains; this package only
#: prices it); fmt_ratio is gone (nothing used it)
__getattr__ = removed(__name__, {"fmt_ratio": _fmt_ratio}, moved={"select_within_budget": "loraplan.allocation.budget"})
