"""What the calibration pass measures (:class:`CalibrationStats`) and the names strategies ask for it by."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._removed import removed

__all__ = ["ACTIVATIONS", "GRADIENTS", "HIDDEN", "LORA_OUTPUTS", "CalibrationStats"]

#: The statistics a strategy can ask the calibration pass for (its ``requires``): the fields of CalibrationStats.
HIDDEN = "hidden"  # pooled residual-stream vectors h_0..h_L, one per sample
ACTIVATIONS = "activations"  # input norms of the LoRA target modules, per sample and layer
GRADIENTS = "gradients"  # Frobenius norms of dLoss/dW of the target modules, per batch and layer
LORA_OUTPUTS = "lora_outputs"  # squared norms of a warmed-up LoRA's outputs (LoRA-drop), per sample and layer
_STATISTICS = (HIDDEN, ACTIVATIONS, GRADIENTS, LORA_OUTPUTS)  # STATISTICS, deprecated: nothing used it


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
        lora_outputs: (N, L) float64: per sample, the sum over the layer's target modules and the sample's non-pad
            tokens of ``||ΔW x||²``, the squared norm of the output of a temporary LoRA (on every layer) after a short
            warm-up on the calibration batches (LoRA-drop); the warm-up is described by ``meta["lora_drop"]``
            (``steps``, ``rank``, ``alpha``, ``lr``, ``loss_first``, ``loss_last``). ``None`` unless asked for.
        read_tokens: (N,) the token id each sample's pooled vector is read at (with ``hidden``), so that a
            calibration whose samples are all read at one token (every row ends with EOS) can be told.
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
    lora_outputs: torch.Tensor | None = None
    read_tokens: torch.Tensor | None = None
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
            lora_outputs=self.lora_outputs[rows] if self.lora_outputs is not None else None,
            read_tokens=self.read_tokens[rows] if self.read_tokens is not None else None,
            meta=dict(self.meta),
        )

    def halves(self) -> tuple[CalibrationStats, CalibrationStats] | None:
        """Two disjoint halves (by batch); ``None`` with fewer than two batches."""
        n = self.num_batches
        if n < 2:
            return None
        return self.subset_batches(list(range(n // 2))), self.subset_batches(list(range(n // 2, n)))


__getattr__ = removed(__name__, {"STATISTICS": _STATISTICS})
